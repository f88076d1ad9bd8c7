"""The run's tokenizer, kept in ``model_dir/tokenizer/`` so nothing depends on a cache folder.

A training run copies the tokenizer its data was made with (the built-in corpus' BPE, or the
``tokenizer.json`` of a preprocessed shards folder, which preprocess copies from whatever
tokenizer it was given, HuggingFace ones included) into ``model_dir/tokenizer/`` as a
HuggingFace tokenizer folder::

    tokenizer.json            the tokenizer itself (HF tokenizers format)
    tokenizer_config.json     tokenizer_class PreTrainedTokenizerFast, special tokens, max length
    special_tokens_map.json   the EOS token (also bos / unk, as GPT-2 does)

so ``AutoTokenizer.from_pretrained(model_dir / "tokenizer")`` works, the HF export copies the
folder as it is, and ``--eval_text`` tokenises with it. Data without a tokenizer (synthetic,
HDF5, TFRecord) leaves no folder, and the log says so.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer

from wsjax.data.textio import DEFAULT_EOS, load_tokenizer
from wsjax.distributed import is_main_process
from wsjax.errors import DataError
from wsjax.fileio import rust_os_error

log = logging.getLogger("wsjax.train")

TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def shards_tokenizer(source) -> tuple[Path, str] | None:
    """(tokenizer.json, EOS token) of a token-shards data source, None for other sources."""
    roots = getattr(source, "roots", None)
    meta = getattr(source, "meta", None)
    if not roots or not isinstance(meta, dict):
        return None
    info = meta.get("tokenizer") or {}
    path = Path(roots[0]) / info.get("file", "tokenizer.json")
    return (path, info.get("eos_token", DEFAULT_EOS)) if path.is_file() else None


def save_run_tokenizer(source, model_dir: Path, max_length: int) -> Path | None:
    """Copy the tokenizer of the data ``source`` into ``model_dir/tokenizer`` (atomically: a
    temporary folder renamed over the old one); None, with a log line, when it has none."""
    found = shards_tokenizer(source)
    if found is None:
        log.info(
            "%s carries no tokenizer: none saved in model_dir (the HF export will have none)",
            getattr(source, "name", type(source).__name__),
        )
        return None
    tokenizer_json, eos = found
    target = Path(model_dir) / TOKENIZER_DIR
    if not is_main_process():  # process 0 writes the run's files
        return target
    # what a killed earlier save left (this run holds the model_dir: no other writer is there)
    for stale in Path(model_dir).glob(".tokenizer-*"):
        log.info("removing %s, left by an interrupted save", stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=model_dir))
    aside = tmp.with_name(tmp.name + "-old")
    try:
        write_hf_tokenizer(load_tokenizer(tokenizer_json), eos, max_length, tmp)
        if target.exists():  # two renames, not a removal: the old folder is gone in one step
            os.replace(target, aside)
        os.replace(tmp, target)
    except DataError as e:  # training needs only the token ids: keep going, say what is lost
        log.warning("%s; the run keeps no tokenizer (no export tokenizer, no --eval_text)", e)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
    log.info("Saved the run's tokenizer (%s) in %s", tokenizer_json, target)
    return target


def write_hf_tokenizer(tok: Tokenizer, eos_token: str, max_length: int, out: Path) -> None:
    """``tokenizer.json`` + the two config files AutoTokenizer needs to pick
    PreTrainedTokenizerFast with the right special tokens."""
    if tok.token_to_id(eos_token) is None:
        raise DataError(f"tokenizer has no EOS token {eos_token!r}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        tok.save(str(out / "tokenizer.json"))
    except Exception as e:  # tokenizers' (Rust) I/O error is a plain Exception: "(os error N)"
        os_error = rust_os_error(e, out / "tokenizer.json")
        if os_error is None:
            raise
        raise os_error from None
    # GPT-2's convention: one special token serves as bos, eos and unk
    special = {"bos_token": eos_token, "eos_token": eos_token, "unk_token": eos_token}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": int(max_length),
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def run_tokenizer_dir(folder: Path) -> Path | None:
    """The tokenizer folder of ``folder``: ``folder/tokenizer`` of a model_dir, or ``folder``
    itself when it holds a tokenizer.json (an HF export); None when neither."""
    for path in (Path(folder) / TOKENIZER_DIR, Path(folder)):
        if (path / "tokenizer.json").is_file():
            return path
    return None


def load_run_tokenizer(model_dir: Path) -> tuple[Tokenizer, int]:
    """(tokenizer, EOS id) the run saved in ``model_dir`` (or of an HF export folder);
    DataError naming the folder if there is none."""
    path = run_tokenizer_dir(model_dir)
    if path is None:
        raise DataError(
            f"{Path(model_dir) / TOKENIZER_DIR}: the run saved no tokenizer (its data had none, "
            "or it was trained before wsjax kept one); train on token shards, or copy a "
            "tokenizer.json there"
        )
    tok = load_tokenizer(path)
    eos = DEFAULT_EOS
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file():
        eos = json.loads(cfg_file.read_text()).get("eos_token", DEFAULT_EOS)
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise DataError(f"{path}: tokenizer has no EOS token {eos!r}")
    return tok, eos_id

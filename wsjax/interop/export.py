"""Export a training run to a complete HuggingFace model folder, in one call.

``export_run(path, out)``: ``path`` is a model_dir (its newest checkpoint whose crc32c digest
checks; a corrupt newer one is skipped with a warning) or one ``model-ckpt-<step>`` folder. The
model config comes from the run's ``train/params_train.yaml`` (or ``params_yaml``). ``out`` gets
``config.json`` + safetensors (wsjax.interop.hf.export_hf) and the run's tokenizer folder
(wsjax.data.tokenizer), so ``AutoModelForCausalLM.from_pretrained(out)`` and
``AutoTokenizer.from_pretrained(out)`` both work, as does
``transformers.pipeline("text-generation", model=out)``: ``generation_config.json`` holds the
BOS / EOS / pad ids and ``max_length`` (the model's positions), and the pad token is the EOS
token where the tokenizer has none (GPT-2's practice), in config.json and the tokenizer's
files. Every file is readable by others (0644, the folder 0755), as a shared model folder
must be. ``wsjax-convert`` is the CLI.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import yaml

from wsjax.checkpoint import run_model_dir
from wsjax.config import config_from_dict
from wsjax.data.tokenizer import TOKENIZER_FILES, load_run_tokenizer, run_tokenizer_dir
from wsjax.errors import CheckpointError
from wsjax.interop.hf import DEFAULT_MAX_SHARD_SIZE, export_hf
from wsjax.interop.load import load_start
from wsjax.models import get_model

log = logging.getLogger("wsjax.interop.export")

PARAMS_TRAIN = Path("train") / "params_train.yaml"
# An HF export needs only the model section; the optimizer is a stand-in when it is absent.
PLACEHOLDER_OPTIMIZER = {"optimizer_type": "adamw", "learning_rate": 1.0e-4}
GENERATION_CONFIG = "generation_config.json"
PARTIAL = ".partial-"  # an export in progress: .<out name>.partial-<pid>, renamed when whole


def load_model_config(params_yaml: str | Path):
    """The model section of a params YAML (a missing optimizer section is tolerated)."""
    path = Path(params_yaml)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read params file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(raw, dict) or "model" not in raw:
        raise CheckpointError(f"{path}: no model section")
    raw.setdefault("optimizer", PLACEHOLDER_OPTIMIZER)
    return config_from_dict(raw, source=str(path)).model


def export_run(
    path: str | Path,
    out_dir: str | Path,
    *,
    params_yaml: str | Path | None = None,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write the HF model folder ``out_dir`` from a training run's checkpoint; return it.

    The folder is written whole beside ``out_dir`` (``.<name>.partial-<pid>``) and renamed onto
    it at the end, so a kill at any moment leaves either no ``out_dir`` or a complete one; a
    partial folder a killed export left is removed by the next export to the same place."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist (give a model_dir or model-ckpt-<step>)")
    model_dir = run_model_dir(path)
    params_yaml = Path(params_yaml) if params_yaml else model_dir / PARAMS_TRAIN
    if not params_yaml.is_file():
        raise CheckpointError(
            f"{params_yaml}: no params file (the run writes train/params_train.yaml into its "
            "model_dir; give --params PARAMS_YAML)"
        )
    model_cfg = load_model_config(params_yaml)
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: output folder exists and is not empty")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only chatter
    start = load_start(path, get_model(model_cfg), None, weights_only=True)
    clear_partial(out)
    tmp = out.with_name(f".{out.name}{PARTIAL}{os.getpid()}")
    try:
        export_hf(
            model_cfg, start.params, tmp, max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE
        )
        write_tokenizer_and_ids(model_dir, tmp, model_cfg.max_position_embeddings)
        share(tmp)
        os.replace(tmp, out)  # onto a missing or empty folder: atomic
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s", start.source, out)
    return out


def clear_partial(out: Path) -> None:
    """Remove what killed exports to ``out`` left (``.<name>.partial-*`` beside it)."""
    if out.parent.is_dir():
        for p in out.parent.glob(f".{out.name}{PARTIAL}*"):
            log.info("removing %s, left by an interrupted export", p)
            shutil.rmtree(p, ignore_errors=True)


def write_tokenizer_and_ids(model_dir: Path, out: Path, max_length: int) -> None:
    """The run's tokenizer into ``out``; its EOS id as config.json's BOS, EOS and pad ids (a
    tokenizer's own pad token wins), and generation_config.json."""
    tok_dir = run_tokenizer_dir(model_dir)
    eos_id = pad_id = None  # not HF's family default (GPT-2's 50256): maybe outside the vocab
    if tok_dir is None:
        log.warning("%s has no tokenizer/ folder: the export has no tokenizer", model_dir)
    else:
        eos_id = copy_tokenizer(tok_dir, out)
        pad_id = pad_token(out, eos_id)
    ids = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config.update(ids)  # where generate stops, and what it pads a batch with
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    generation = {**{k: v for k, v in ids.items() if v is not None}, "max_length": max_length}
    (out / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")


def pad_token(out: Path, eos_id: int) -> int:
    """The pad id of the tokenizer files in ``out``: its pad token's, else EOS's, which then
    becomes the pad token of tokenizer_config.json and special_tokens_map.json."""
    tok = load_run_tokenizer(out)[0]
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = out / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        pad = data.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if pad is not None and tok.token_to_id(pad) is not None:
            return tok.token_to_id(pad)
        data["pad_token"] = data.get("eos_token") or tok.id_to_token(eos_id)
        path.write_text(json.dumps(data, indent=2) + "\n")
    return eos_id


def share(folder: Path) -> None:
    """Files 0644, folders 0755: an export is read by others (a serving user, a shared cache)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def copy_tokenizer(tok_dir: Path, out: Path) -> int:
    """Copy the run's tokenizer files into ``out``; return its EOS id."""
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, out / name)
    return load_run_tokenizer(tok_dir)[1]

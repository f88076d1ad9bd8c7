"""Export a training run to a complete HuggingFace model folder, in one call.

``export_run(path, out)``: ``path`` is a model_dir (its newest checkpoint whose crc32c digest
checks; a corrupt newer one is skipped with a warning) or one ``model-ckpt-<step>`` folder. The
model config comes from the run's ``train/params_train.yaml`` (or ``params_yaml``). ``out`` gets
``config.json`` + safetensors (wsjax.interop.hf.export_hf) and the run's tokenizer folder
(wsjax.trainer.tokenizer), so ``AutoModelForCausalLM.from_pretrained(out)`` and
``AutoTokenizer.from_pretrained(out)`` both work. ``scripts/convert_hf.py`` is the CLI.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import yaml

from wsjax.errors import CheckpointError

log = logging.getLogger("wsjax.interop.export")

PARAMS_TRAIN = Path("train") / "params_train.yaml"
# An HF export needs only the model section; the optimizer is a stand-in when it is absent.
PLACEHOLDER_OPTIMIZER = {"optimizer_type": "adamw", "learning_rate": 1.0e-4}
_CKPT_NAME = re.compile(r"model-ckpt-\d+")


def run_model_dir(path: Path) -> Path:
    """The model_dir of ``path``: itself, or the parent of a ``model-ckpt-<step>`` folder."""
    return path.parent if _CKPT_NAME.fullmatch(path.name) else path


def load_model_config(params_yaml: str | Path):
    """The model section of a params YAML (a missing optimizer section is tolerated)."""
    from wsjax.config import config_from_dict

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
    """Write the HF model folder ``out_dir`` from a training run's checkpoint; return it."""
    from wsjax.checkpoint import load_start
    from wsjax.interop.hf import DEFAULT_MAX_SHARD_SIZE, export_hf
    from wsjax.models import get_model
    from wsjax.trainer.tokenizer import run_tokenizer_dir

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
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: output folder exists and is not empty")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only chatter
    start = load_start(path, get_model(model_cfg), None, weights_only=True)
    export_hf(model_cfg, start.params, out, max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    tok_dir = run_tokenizer_dir(model_dir)
    eos_id = None  # not HF's per-family default (GPT-2's 50256), which may lie outside the vocab
    if tok_dir is None:
        log.warning("%s has no tokenizer/ folder: the export has no tokenizer", model_dir)
    else:
        eos_id = copy_tokenizer(tok_dir, out)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config.update(bos_token_id=eos_id, eos_token_id=eos_id)  # where generate stops
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    log.info("exported %s to %s", start.source, out)
    return out


def copy_tokenizer(tok_dir: Path, out: Path) -> int:
    """Copy the run's tokenizer files into ``out``; return its EOS id."""
    from wsjax.trainer.tokenizer import TOKENIZER_FILES, load_run_tokenizer

    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, out / name)
    return load_run_tokenizer(tok_dir)[1]

"""``wsjax-convert``: HuggingFace checkpoints to wsjax (orbax) and back.

    wsjax-convert --from_orbax model_dir --to_hf OUT_DIR
        a training run's model_dir (its newest good checkpoint) or one model-ckpt-<step> folder
        -> OUT_DIR: config.json + safetensors + the run's tokenizer (wsjax.interop.export); the
        model config comes from model_dir/train/params_train.yaml unless --params is given
    wsjax-convert --from_hf HF_DIR --to_orbax DIR [--allow_pickle]
        -> DIR/checkpoint (orbax, tree {"params": ...}) + DIR/params.yaml (the model config)
    wsjax-convert --from_orbax DIR --to_hf OUT_DIR
        DIR: a folder written by --to_orbax (--params defaults to DIR/params.yaml)

Errors a user can cause print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

import orbax.checkpoint as ocp
import yaml
from safetensors import SafetensorError

from wsjax.config.schema import Config, OptimizerConfig, RunConfig, StreamingConfig
from wsjax.errors import EXIT_PREEMPTED, CheckpointError, WsjaxError
from wsjax.fileio import write_error
from wsjax.interop.export import PLACEHOLDER_OPTIMIZER, export_run, load_model_config
from wsjax.interop.hf import DEFAULT_MAX_SHARD_SIZE, export_hf, import_hf
from wsjax.logs import setup_logging

CHECKPOINT_DIR = "checkpoint"
PARAMS_YAML = "params.yaml"


def hf_to_orbax(hf_dir: str, out_dir: str, allow_pickle: bool = False) -> Path:
    try:
        model_cfg, params = import_hf(hf_dir, allow_pickle=allow_pickle)
    except SafetensorError as e:  # e.g. a truncated file, found when a tensor is read
        raise CheckpointError(f"{hf_dir}: unreadable safetensors weights ({e})") from None
    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: output folder exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(out / CHECKPOINT_DIR, {"params": params})
    ckpt.wait_until_finished()
    cfg = Config(
        model=model_cfg,
        optimizer=OptimizerConfig(**PLACEHOLDER_OPTIMIZER),
        runconfig=RunConfig(),
        streaming=StreamingConfig(),
        train_input=None,
        eval_input=None,
        source=str(Path(hf_dir) / "config.json"),
    )
    header = f"# model converted from {hf_dir}; the optimizer section is a placeholder\n"
    (out / PARAMS_YAML).write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out


def orbax_to_hf(
    orbax_dir: str,
    params_yaml: str | None,
    out_dir: str,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """A training run (model_dir or model-ckpt-<step>) via wsjax.interop.export, or a folder that
    --to_orbax wrote (checkpoint/ + params.yaml)."""
    src = Path(orbax_dir).absolute()
    if not (src / CHECKPOINT_DIR).is_dir():
        return export_run(src, out_dir, params_yaml=params_yaml, max_shard_size=max_shard_size)
    ckpt_dir = src / CHECKPOINT_DIR
    model_cfg = load_model_config(params_yaml or src / PARAMS_YAML)
    try:
        tree = ocp.StandardCheckpointer().restore(ckpt_dir)
    except (OSError, ValueError, FileNotFoundError) as e:
        raise CheckpointError(f"{ckpt_dir}: cannot restore orbax checkpoint ({e})") from None
    if not isinstance(tree, dict) or "params" not in tree:
        raise CheckpointError(f"{ckpt_dir}: checkpoint tree has no 'params' entry")
    return export_hf(model_cfg, tree["params"], out_dir, max_shard_size=max_shard_size)


def _convert(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """The conversion the flags ask for; the folder written."""
    if args.from_hf:
        if not args.to_orbax:
            ap.error("--from_hf needs --to_orbax DIR")
        out = hf_to_orbax(args.from_hf, args.to_orbax, args.allow_pickle)
    else:
        if not args.to_hf:
            ap.error("--from_orbax needs --to_hf OUT_DIR")
        out = orbax_to_hf(args.from_orbax, args.params, args.to_hf, args.max_shard_size)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="wsjax-convert", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--from_hf", metavar="HF_DIR")
    src.add_argument("--from_orbax", metavar="DIR")
    ap.add_argument("--to_orbax", metavar="DIR")
    ap.add_argument("--to_hf", metavar="OUT_DIR")
    ap.add_argument(
        "--params",
        metavar="PARAMS_YAML",
        help="model config for --from_orbax (default: the run's train/params_train.yaml)",
    )
    ap.add_argument("--allow_pickle", action="store_true", help="load pytorch_model.bin (trusted)")
    ap.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE)
    args = ap.parse_args(argv)
    setup_logging()  # the export's progress and warning lines
    try:
        with _stopping_on_signals():
            out = _convert(ap, args)
    except OSError as e:  # a full or read-only disk, a path under a file: one line
        err = write_error(e, args.to_hf or args.to_orbax)
        if not isinstance(err, WsjaxError):
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except WsjaxError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, always
        return e.exit_code
    print(f"wrote {out}")
    return 0


@contextlib.contextmanager
def _stopping_on_signals():
    """SIGTERM / SIGINT end the conversion at once with one line and exit 5: what it wrote is
    staged beside the output (``.<name>.partial-<pid>``), which the next run removes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame) -> None:
        name = signal.Signals(signum).name
        line = f"error: {name}: the conversion stopped; rerun it (a partial export is staged "
        os.write(2, (line + "beside the output and removed then)\n").encode())
        os._exit(EXIT_PREEMPTED)

    before = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def cli() -> None:
    """The ``wsjax-convert`` entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()

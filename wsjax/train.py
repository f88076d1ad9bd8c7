"""``python -m wsjax.train``: a Cerebras ``run.py``-compatible run on the streaming engine.

    python -m wsjax.train                              # the built-in tiny GPT-J, ./model_dir
    python -m wsjax.train -p configs/params_gptj_6B.yaml -m train -o model_dir --max_steps 100
    python -m wsjax.train -p params.yaml --validate_only model.num_hidden_layers=4

``main`` only parses and calls :func:`run`, which tests and notebooks call directly. The run's
artifacts (compile cache, checkpoints, events, performance.json, plan) are laid out in
:mod:`wsjax.run_dir`; the run itself is :mod:`wsjax.runner`; checkpoints in
:mod:`wsjax.checkpoint`; reporting in :mod:`wsjax.metrics`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from wsjax.errors import ConfigError, WsjaxError
from wsjax.runner import RunResult

log = logging.getLogger("wsjax.train")

MODES = ("train", "eval", "train_and_eval", "eval_all")
DEFAULT_PARAMS = "configs/params_gptj_tiny.yaml"


def default_params_path() -> Path:
    """The built-in default params file (in the source tree, else the current directory)."""
    here = Path(__file__).resolve().parent.parent / DEFAULT_PARAMS
    return here if here.is_file() else Path(DEFAULT_PARAMS)


def run(
    config,
    mode: str = "train",
    model_dir: str | Path | None = None,
    *,
    max_steps: int | None = None,
    eval_steps: int | None = None,
    checkpoint_path: str | Path | None = None,
    is_pretrained_checkpoint: bool = False,
    validate_only: bool = False,
    compile_only: bool = False,
    progress: bool | None = None,
) -> RunResult:
    """Run ``mode`` for ``config`` (a :class:`wsjax.config.Config`) into ``model_dir``."""
    from wsjax.metrics import setup_logging
    from wsjax.run_dir import DEFAULT_MODEL_DIR, ModelDir
    from wsjax.runner import Runner

    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    rc = config.runconfig
    changes = {k: v for k, v in (("max_steps", max_steps), ("eval_steps", eval_steps)) if v}
    config = dataclasses.replace(config, runconfig=dataclasses.replace(rc, **changes))
    md = ModelDir(model_dir or config.runconfig.model_dir or DEFAULT_MODEL_DIR)
    setup_logging()
    with md:
        split = "train" if mode.startswith("train") else "eval"
        handler = setup_logging(md.path / split / "run.log")
        try:
            return Runner(config, mode, md, progress).go(
                checkpoint_path, is_pretrained_checkpoint, validate_only, compile_only
            )
        finally:
            logging.getLogger("wsjax").removeHandler(handler)
            handler.close()


# ---- command line --------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own code)
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m wsjax.train",
        description="Train or evaluate a GPT-J / GPT-2 model by weight streaming "
        "(Cerebras run.py-compatible). With no arguments: the built-in tiny GPT-J on the "
        "built-in corpus into ./model_dir.",
    )
    p.add_argument("-p", "--params", help=f"params YAML (default: {DEFAULT_PARAMS})")
    p.add_argument(
        "-m",
        "--mode",
        choices=MODES,
        help="what to run (default: train; train_and_eval for the built-in default, so its "
        "eval loss can be compared with the corpus' unigram entropy)",
    )
    p.add_argument(
        "-o", "--model_dir", help="run folder: checkpoints, events, compile cache (./model_dir)"
    )
    p.add_argument("--max_steps", type=int, help="train until this global step")
    p.add_argument("--eval_steps", type=int, help="batches of eval_input per evaluation")
    p.add_argument(
        "--checkpoint_path",
        help="start from this orbax checkpoint (model-ckpt-<step>) or HuggingFace GPT-J/GPT-2 "
        "folder instead of the latest checkpoint in model_dir",
    )
    p.add_argument(
        "--is_pretrained_checkpoint",
        action="store_true",
        help="take only the weights of --checkpoint_path: step 0, fresh optimizer and data",
    )
    p.add_argument(
        "--validate_only",
        action="store_true",
        help="check config and shapes, print and write the memory plan; compile nothing",
    )
    p.add_argument(
        "--compile_only",
        action="store_true",
        help="compile every executable into the compile dir, write plan and estimate; no weights",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, e.g. model.num_hidden_layers=4 runconfig.log_steps=1",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from wsjax.config import load_config
        from wsjax.metrics import setup_logging

        setup_logging()
        config = load_config(args.params or default_params_path(), args.overrides)
        mode = args.mode or ("train" if args.params else "train_and_eval")
        result = run(
            config,
            mode,
            args.model_dir,
            max_steps=args.max_steps,
            eval_steps=args.eval_steps,
            checkpoint_path=args.checkpoint_path,
            is_pretrained_checkpoint=args.is_pretrained_checkpoint,
            validate_only=args.validate_only,
            compile_only=args.compile_only,
        )
    except WsjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; the latest complete checkpoint is kept", file=sys.stderr)
        return 130
    return 0 if result is not None else 1


if __name__ == "__main__":
    sys.exit(main())

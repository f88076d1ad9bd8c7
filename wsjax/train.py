"""``python -m wsjax.train``: a Cerebras ``run.py``-compatible run on the streaming engine.

    python -m wsjax.train                              # the built-in tiny GPT-J, ./model_dir
    python -m wsjax.train -p configs/params_gptj_6B.yaml -m train -o model_dir --max_steps 100
    python -m wsjax.train -p params.yaml --validate_only model.num_hidden_layers=4
    python -m wsjax.launch --nproc 2 -- -p params.yaml    # 2 processes (wsjax.launch)

``main`` only parses and calls :func:`run`, which tests and notebooks call directly. The run's
artifacts (compile cache, checkpoints, events, performance.json, plan) are laid out in
:mod:`wsjax.trainer.run_dir`; the run itself is :mod:`wsjax.trainer.run` (modes), :mod:`wsjax.trainer.train_loop` and
:mod:`wsjax.trainer.evaluation`; checkpoints in :mod:`wsjax.checkpoint`; reporting in :mod:`wsjax.trainer.metrics`.
Exit codes: :mod:`wsjax.errors`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from wsjax.errors import WsjaxError
from wsjax.trainer.run import MODES, RunResult, run

__all__ = ["MODES", "RunResult", "build_parser", "cli", "default_params_path", "main", "run"]

log = logging.getLogger("wsjax.train")

DEFAULT_PARAMS = "configs/params_gptj_tiny.yaml"
# Cerebras run.py flags that name hardware: accepted so a Cerebras command line runs unchanged.
IGNORED_FLAGS = ("cs_ip", "device")


def default_params_path() -> Path:
    """The built-in default params file (in the source tree, else the current directory)."""
    here = Path(__file__).resolve().parent.parent / DEFAULT_PARAMS
    return here if here.is_file() else Path(DEFAULT_PARAMS)


def params_of(args: argparse.Namespace) -> Path:
    """Without -p: the built-in default, except that --eval_text evaluates the model the run
    in --model_dir trained (its train/params_train.yaml), whatever its size."""
    from wsjax.trainer.run_dir import DEFAULT_MODEL_DIR

    saved = Path(args.model_dir or DEFAULT_MODEL_DIR) / "train" / "params_train.yaml"
    return saved if args.eval_text and saved.is_file() else default_params_path()


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
        "eval loss can be compared with the corpus' unigram entropy; eval with --eval_text)",
    )
    p.add_argument(
        "-o", "--model_dir", help="run folder: checkpoints, events, compile cache (./model_dir)"
    )
    p.add_argument("--max_steps", type=int, help="train until this global step (>= 1)")
    p.add_argument(
        "--steps", type=int, help="train this many more steps from where the run starts (>= 1)"
    )
    p.add_argument(
        "--eval_steps",
        type=int,
        help="batches of eval_input per evaluation; <= 0: one full pass over the eval set",
    )
    p.add_argument(
        "--save_checkpoints_steps",
        type=int,
        help="checkpoint every N steps (0: only at the end)",
    )
    p.add_argument("--save_summary_steps", type=int, help="TensorBoard scalars every N steps")
    p.add_argument("--keep_checkpoint_max", type=int, help="newest checkpoints kept (0: keep all)")
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
        "--allow_pickle",
        action="store_true",
        help="let --checkpoint_path load a pickled PyTorch HF checkpoint (pytorch_model.bin); "
        "only for a source you trust",
    )
    p.add_argument(
        "--eval_text",
        metavar="FILE",
        help="-m eval / eval_all: loss, perplexity, accuracy and bits per byte on this UTF-8 "
        "text or .jsonl file ('text' field), tokenised with the run's tokenizer; without -p "
        "the run's own train/params_train.yaml is used",
    )
    for flag in IGNORED_FLAGS:
        p.add_argument(f"--{flag}", help="Cerebras hardware flag: accepted and ignored")
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
    multi = p.add_argument_group(
        "several processes",
        "join a multi-process run (jax.distributed). Not needed under SLURM srun or Open MPI "
        "mpirun (detected) nor under python -m wsjax.launch (it sets WSJAX_COORDINATOR_ADDRESS, "
        "WSJAX_NUM_PROCESSES, WSJAX_PROCESS_ID); a flag wins over its variable",
    )
    multi.add_argument(
        "--coordinator_address", metavar="HOST:PORT", help="process 0's host and a free port"
    )
    multi.add_argument("--num_processes", type=int, help="processes in the run (>= 1)")
    multi.add_argument("--process_id", type=int, help="this process's id, 0 .. num_processes-1")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, e.g. model.num_hidden_layers=4 runconfig.log_steps=1",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    # intermixed: overrides may come before, between or after the options
    args = build_parser().parse_intermixed_args(argv)
    try:
        from wsjax import distributed
        from wsjax.config import load_config
        from wsjax.trainer.metrics import setup_logging

        # --validate_only --num_processes P alone: plan a P-process run from this one process
        planning = args.validate_only and args.num_processes and args.coordinator_address is None
        planning = planning and "WSJAX_COORDINATOR_ADDRESS" not in os.environ
        if not planning:  # first: joining must precede any use of a JAX backend
            distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        setup_logging()
        for flag in IGNORED_FLAGS:
            if (value := getattr(args, flag)) is not None:
                log.warning("--%s %s: a Cerebras hardware flag, ignored here", flag, value)
        config = load_config(args.params or params_of(args), args.overrides)
        mode = args.mode or (
            "eval" if args.eval_text else "train" if args.params else "train_and_eval"
        )
        run(
            config,
            mode,
            args.model_dir,
            max_steps=args.max_steps,
            steps=args.steps,
            eval_steps=args.eval_steps,
            save_checkpoints_steps=args.save_checkpoints_steps,
            save_summary_steps=args.save_summary_steps,
            keep_checkpoint_max=args.keep_checkpoint_max,
            checkpoint_path=args.checkpoint_path,
            is_pretrained_checkpoint=args.is_pretrained_checkpoint,
            allow_pickle=args.allow_pickle,
            validate_only=args.validate_only,
            compile_only=args.compile_only,
            eval_text=args.eval_text,
            plan_processes=args.num_processes if planning else None,
        )
    except WsjaxError as e:
        # one line whatever a library put into the text (the contract of every WsjaxError)
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; the latest complete checkpoint is kept", file=sys.stderr)
        return 130
    return 0


def cli() -> NoReturn:
    """The process entry point (``python -m wsjax.train``, ``wsjax-train``): :func:`main`, then
    exit with its code; a process of a multi-process run that fails exits at once
    (:func:`wsjax.distributed.exit_process`) instead of waiting for the others."""
    from wsjax.distributed import exit_process

    try:
        code = main()
    except Exception:  # a bug: its traceback, then exit 1
        traceback.print_exc()
        code = 1
    exit_process(code)


if __name__ == "__main__":
    cli()

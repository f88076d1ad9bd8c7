"""``python -m wsjax.train``: a Cerebras ``run.py``-compatible run on the streaming engine.

    python -m wsjax.train                              # the built-in tiny GPT-J, ./model_dir
    python -m wsjax.train -p configs/params_gptj_6B.yaml -m train -o model_dir --max_steps 100
    python -m wsjax.train -p params.yaml --validate_only model.num_hidden_layers=4
    wsjax-launch --nproc 2 -- -p params.yaml              # 2 processes (wsjax.launch)

``main`` only parses and runs a :class:`wsjax.trainer.Trainer`, which tests and notebooks use
directly (or :func:`run`, the same in one call). The flags are derived from
:class:`wsjax.trainer.RunOptions`, where each is declared once. Exit codes: :mod:`wsjax.errors`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from wsjax import distributed, peers
from wsjax.config import load_config
from wsjax.distributed import exit_process
from wsjax.errors import EXIT_BUG, EXIT_USER, ArgumentParser, WsjaxError
from wsjax.logs import setup_logging
from wsjax.trainer import MODES, RunResult, Trainer, run
from wsjax.trainer.faults import exit_on_signal
from wsjax.trainer.options import add_arguments, options_from_args
from wsjax.trainer.run_dir import DEFAULT_MODEL_DIR

__all__ = ["MODES", "RunResult", "build_parser", "cli", "default_params_path", "main", "run"]

log = logging.getLogger("wsjax.train")

DEFAULT_PARAMS = "configs/params_gptj_tiny.yaml"
# Cerebras run.py flags that name hardware: accepted so a Cerebras command line runs unchanged.
IGNORED_FLAGS = ("cs_ip", "device")
# A process that fails before joining joins only to tell the others: a short wait for process 0.
JOIN_TO_REPORT_S = 30


def default_params_path() -> Path:
    """The built-in default params file (in the source tree, else the current directory)."""
    here = Path(__file__).resolve().parent.parent / DEFAULT_PARAMS
    return here if here.is_file() else Path(DEFAULT_PARAMS)


def params_of(args: argparse.Namespace) -> Path:
    """Without -p: the built-in default, except that --eval_text evaluates the model the run
    in --model_dir trained (its train/params_train.yaml), whatever its size."""
    saved = Path(args.model_dir or DEFAULT_MODEL_DIR) / "train" / "params_train.yaml"
    return saved if args.eval_text and saved.is_file() else default_params_path()


# ---- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """``-p`` and the overrides, then one flag per :class:`RunOptions` field."""
    p = ArgumentParser(
        prog="wsjax-train",
        description="Train or evaluate a GPT-J / GPT-2 / GPT-NeoX / Llama-family model by weight "
        "streaming (Cerebras run.py-compatible). With no arguments: the built-in tiny GPT-J on "
        "the built-in corpus into ./model_dir.",
    )
    p.add_argument("-p", "--params", help=f"params YAML (default: {DEFAULT_PARAMS})")
    add_arguments(p)
    for flag in IGNORED_FLAGS:
        p.add_argument(f"--{flag}", help="Cerebras hardware flag: accepted and ignored")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, e.g. model.num_hidden_layers=4 runconfig.log_steps=1",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    try:  # intermixed: overrides may come before, between or after the options
        args = build_parser().parse_intermixed_args(argv)
    except SystemExit as e:  # --help (0), or a bad flag: its one line is printed already
        if e.code:
            _join_to_tell_the_others()
            peers.post(EXIT_USER, "its command line is invalid")
        raise
    before_join = True
    try:
        mode = args.mode or (
            "eval" if args.eval_text else "train" if args.params else "train_and_eval"
        )
        options = options_from_args(args, mode=mode)
        before_join = False
        if options.planning_processes is None:  # first: joining precedes any use of a backend
            distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        setup_logging()
        for flag in IGNORED_FLAGS:
            if (value := getattr(args, flag)) is not None:
                log.warning("--%s %s: a Cerebras hardware flag, ignored here", flag, value)
        config = load_config(args.params or params_of(args), args.overrides)
        with exit_on_signal():  # one line and exit 5 outside the loop's preemption guard
            Trainer(config, options).run()
    except WsjaxError as e:
        if before_join:  # the others wait for this process to join: join, to tell them
            _join_to_tell_the_others(args)
        # one line whatever a library put into the text (the contract of every WsjaxError)
        line = " ".join(str(e).split())
        rank = peers.rank()
        print(f"error: {f'process {rank}: ' if rank is not None else ''}{line}", file=sys.stderr)
        peers.post(e.exit_code, line)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; the latest complete checkpoint is kept", file=sys.stderr)
        return 130
    return 0


def _join_to_tell_the_others(args: argparse.Namespace | None = None) -> None:
    """A process of a multi-process run that fails before joining it still joins (briefly), so
    that :func:`wsjax.peers.post` reaches the others waiting for it; nothing in a
    single-process run or when joining fails."""
    flags = (args.coordinator_address, args.num_processes, args.process_id) if args else ()
    with contextlib.suppress(WsjaxError, RuntimeError):
        distributed.initialize(*flags, initialization_timeout_s=JOIN_TO_REPORT_S)


def cli() -> NoReturn:
    """The process entry point (``python -m wsjax.train``, ``wsjax-train``): :func:`main`, then
    exit with its code; a process of a multi-process run that fails exits at once
    (:func:`wsjax.distributed.exit_process`) instead of waiting for the others."""
    try:
        code = main()
    except SystemExit as e:  # --help, or a bad flag (its line is printed)
        code = e.code if isinstance(e.code, int) else EXIT_USER
    except Exception as e:  # a bug: its traceback, then exit 1
        traceback.print_exc()
        code = EXIT_BUG
        peers.post(code, f"{type(e).__name__}: {' '.join(str(e).split())}")
    exit_process(code)


if __name__ == "__main__":
    cli()

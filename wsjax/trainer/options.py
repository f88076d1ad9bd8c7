"""The options of one run: every run flag declared once, in :class:`RunOptions`.

The command line (``wsjax-train``, ``python -m wsjax.train``) is derived from the fields below:
each field's metadata holds its help text (and a short flag or a group), so argparse, the
keyword arguments of :func:`wsjax.trainer.run` and the :class:`~wsjax.trainer.Trainer` all read
the same declaration. Flags that override ``runconfig`` (``max_steps`` ...) follow Cerebras
``run.py``: 0 is a value, None is "not given".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from wsjax.errors import ConfigError

MODES = ("train", "eval", "train_and_eval", "eval_all")
# runconfig keys a flag overrides, with the smallest valid value (Cerebras run.py semantics:
# keep_checkpoint_max 0 keeps all, save_checkpoints_steps 0 saves only at the end)
RUNCONFIG_FLAGS = {
    "max_steps": 1,
    "save_checkpoints_steps": 0,
    "save_summary_steps": 1,
    "keep_checkpoint_max": 0,
    "eval_steps": None,  # <= 0: a full pass over the eval set
}
MULTI = "several processes"
# other spellings of a flag that Cerebras command lines use
ALIASES = {"validate_only": ["--validation_only", "--validation-only"]}


def _opt(help_: str, *, short: str | None = None, cli: bool = True, group: str | None = None,
         metavar: str | None = None, default=None):  # fmt: skip
    meta = {"help": help_, "short": short, "cli": cli, "group": group, "metavar": metavar}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunOptions:
    """Per-invocation options that are not part of the params file."""

    mode: str | None = _opt(
        "what to run (default: train; train_and_eval for the built-in default, so its eval loss "
        "can be compared with the corpus' unigram entropy; eval with --eval_text)",
        short="-m",
    )
    model_dir: Path | None = _opt(
        "run folder: checkpoints, events, compile cache (default: runconfig.model_dir, else "
        "./model_dir)",
        short="-o",
    )
    max_steps: int | None = _opt("train until this global step (>= 1)")
    steps: int | None = _opt("train this many more steps from where the run starts (>= 1)")
    eval_steps: int | None = _opt(
        "batches of eval_input per evaluation; <= 0: one full pass over the eval set"
    )
    save_checkpoints_steps: int | None = _opt("checkpoint every N steps (0: only at the end)")
    save_summary_steps: int | None = _opt("TensorBoard scalars every N steps")
    keep_checkpoint_max: int | None = _opt("newest checkpoints kept (0: keep all)")
    compile_dir: Path | None = _opt(
        "root of the compile cache, shared by runs in other model_dirs: each config's "
        "executables in DIR/compile_<checksum> (default: runconfig.compile_dir, else "
        "$WSJAX_COMPILE_DIR, else the model_dir)",
        metavar="DIR",
    )
    checkpoint_path: Path | None = _opt(
        "start from this orbax checkpoint (model-ckpt-<step>), model_dir or HuggingFace folder "
        "instead of the latest checkpoint in model_dir"
    )
    is_pretrained_checkpoint: bool = _opt(
        "take only the weights of --checkpoint_path: step 0, fresh optimizer and data",
        default=False,
    )
    allow_pickle: bool = _opt(
        "let --checkpoint_path load a pickled PyTorch HF checkpoint (pytorch_model.bin); only "
        "for a source you trust",
        default=False,
    )
    allow_unverified_checkpoint: bool = _opt(
        "load a checkpoint of the layout before digests (no crc32c digest, no format marker) "
        "without verifying it; a checkpoint this version wrote is always verified",
        default=False,
    )
    allow_data_position_change: bool = _opt(
        "resume although the batch size, sequence length or data changed since the checkpoint, "
        "so its data position cannot be honoured exactly (the loader restarts its epoch)",
        default=False,
    )
    eval_text: Path | None = _opt(
        "-m eval / eval_all: loss, perplexity, accuracy and bits per byte on this UTF-8 text or "
        ".jsonl file ('text' field), tokenised with the run's tokenizer; without -p the run's "
        "own train/params_train.yaml is used",
        metavar="FILE",
    )
    validate_only: bool = _opt(
        "check config and shapes, print and write the memory plan; compile nothing",
        default=False,
    )
    compile_only: bool = _opt(
        "compile every executable into the compile dir, write plan and estimate; no weights",
        default=False,
    )
    disk_path: Path | None = _opt(
        "the disk tier (streaming.disk_path): keep the fp32 master weights and optimizer state "
        "in files under this folder, read ahead of and written behind each update, when host "
        "memory cannot hold them",
        metavar="DIR",
    )
    progress: bool | None = _opt("a progress bar (None: when the output is a terminal)", cli=False)
    coordinator_address: str | None = _opt(
        "process 0's host and a free port", group=MULTI, metavar="HOST:PORT"
    )
    num_processes: int | None = _opt(
        "processes in the run (>= 1); with --validate_only alone: plan a run of this many",
        group=MULTI,
    )
    process_id: int | None = _opt("this process's id, 0 .. num_processes-1", group=MULTI)

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; valid modes: {', '.join(MODES)}")
        for name in ("model_dir", "compile_dir", "checkpoint_path", "eval_text", "disk_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps {self.steps} is invalid: must be >= 1")
        if self.steps is not None and self.max_steps is not None:
            raise ConfigError("--steps and --max_steps exclude each other; give one")
        for name, low in RUNCONFIG_FLAGS.items():
            value = getattr(self, name)
            if value is not None and low is not None and value < low:
                raise ConfigError(f"--{name} {value} is invalid: must be >= {low}")
        if self.is_pretrained_checkpoint and self.checkpoint_path is None:
            raise ConfigError(
                "--is_pretrained_checkpoint takes the weights of --checkpoint_path: give "
                "--checkpoint_path too (a model-ckpt-<step>, model_dir or HuggingFace folder)"
            )
        if self.eval_text is not None and self.mode not in (None, "eval", "eval_all"):
            raise ConfigError(f"--eval_text needs -m eval or eval_all, not {self.mode}")

    @property
    def planning_processes(self) -> int | None:
        """``--validate_only --num_processes P`` with no run to join: plan a P-process run from
        this one process (None otherwise)."""
        joining = self.coordinator_address is not None or "WSJAX_COORDINATOR_ADDRESS" in os.environ
        if self.validate_only and self.num_processes and not joining:
            return self.num_processes
        return None

    @property
    def runconfig_overrides(self) -> dict:
        """The runconfig keys these options set (0 is a value; None is not given)."""
        names = RUNCONFIG_FLAGS
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def with_runconfig(self, config):
        """``config`` with this run's runconfig flags applied (and --disk_path, which sets
        streaming.disk_path)."""
        rc = dataclasses.replace(config.runconfig, **self.runconfig_overrides)
        config = dataclasses.replace(config, runconfig=rc)
        if self.disk_path is not None:
            streaming = dataclasses.replace(config.streaming, disk_path=str(self.disk_path))
            config = dataclasses.replace(config, streaming=streaming)
        return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One argparse flag per :class:`RunOptions` field (``--<name>``, its short form, its help):
    booleans are switches, the rest take one value of the field's type."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(RunOptions):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        target = parser
        if meta.get("group"):
            target = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flags = [meta["short"]] if meta.get("short") else []
        flags.append(f"--{f.name}")
        if "_" in f.name:  # the seed's hyphenated spellings (--compile-only) too
            flags.append(f"--{f.name.replace('_', '-')}")
        flags += ALIASES.get(f.name, [])
        kw: dict = {"help": meta["help"], "dest": f.name, "default": None}
        if f.type in ("bool", bool):
            kw["action"] = "store_true"
        elif "int" in str(f.type):
            kw["type"] = int
        if f.name == "mode":
            kw["choices"] = MODES
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        target.add_argument(*flags, **kw)


def options_from_args(args: argparse.Namespace, **changes) -> RunOptions:
    """The :class:`RunOptions` of parsed arguments (flags not given keep their defaults)."""
    given = {}
    for f in dataclasses.fields(RunOptions):
        value = getattr(args, f.name, None)
        if value is not None and value is not False:
            given[f.name] = value
    return RunOptions(**{**given, **changes})

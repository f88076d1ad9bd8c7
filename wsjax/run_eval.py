"""Evaluation: ``eval`` (the latest good checkpoint), ``eval_all`` (every checkpoint, corrupt ones
skipped with a warning), and the evaluation pass train_and_eval runs after each checkpoint.

One pass is ``runconfig.eval_steps`` batches of eval_input, or with ``eval_steps <= 0`` the
whole eval set once (Cerebras semantics); ``eval_input.repeat: false`` never wraps around, so
a pass stops at the end of the set. Scalars go to ``<model_dir>/eval`` under our tags (loss,
perplexity, accuracy) and under the ones Cerebras writes (``eval/lm_perplexity``,
``eval/accuracy``; the loss tag is ``loss`` on both).
"""

from __future__ import annotations

import logging
from pathlib import Path

from wsjax.errors import CheckpointError, ConfigError
from wsjax.run import Run, RunResult, build_engine

log = logging.getLogger("wsjax.train")

CEREBRAS_EVAL_TAGS = {"perplexity": "eval/lm_perplexity", "accuracy": "eval/accuracy"}


def eval_batches(config, batches_per_epoch: int) -> int:
    """Batches in one evaluation pass: eval_steps, or the whole set when it is <= 0; never more
    than one pass over the set when eval_input.repeat is false."""
    steps = config.runconfig.eval_steps
    if steps <= 0 or not config.eval_input.repeat:
        return batches_per_epoch if steps <= 0 else min(steps, batches_per_epoch)
    return steps


def open_eval_loader(r: Run):
    from wsjax.data import make_loader

    return make_loader(
        r.config.eval_input,
        split="eval",
        model_vocab_size=r.config.model.vocab_size,
        seed=r.config.runconfig.seed,
    )


def check_eval_input(r: Run) -> None:
    """The eval data opens and holds a batch (before any weights exist or anything compiles)."""
    from wsjax.data.synthetic import NUM_EXAMPLES

    if r.config.runconfig.eval_steps <= 0 and (
        r.config.eval_input.data_processor == "SyntheticDataProcessor"
    ):
        raise ConfigError(
            f"{r.config.source}: runconfig.eval_steps <= 0 asks for a full pass over the eval "
            f"set, but SyntheticDataProcessor is endless ({NUM_EXAMPLES} examples); give "
            "eval_steps >= 1"
        )
    open_eval_loader(r).close()


def evaluate(r: Run, engine, step: int, tb) -> dict:
    """One evaluation pass with ``engine``'s weights; scalars to TensorBoard and the log."""
    from wsjax.metrics import eval_scalars

    total = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
    with open_eval_loader(r) as loader:
        n = eval_batches(r.config, loader.batches_per_epoch)
        for _ in range(n):
            for k, v in engine.eval_step(next(loader)).items():
                total[k] += float(v)
    out = eval_scalars(total["loss_sum"], total["count"], total["correct"])
    tb.scalars("eval", {**out, **{CEREBRAS_EVAL_TAGS[k]: out[k] for k in CEREBRAS_EVAL_TAGS}}, step)
    log.info(
        "Eval at global step %d (%d batches): loss = %.5f, perplexity = %.3f, accuracy = %.4f",
        step,
        n,
        out["loss"],
        out["perplexity"],
        out["accuracy"],
    )
    return {"step": step, "batches": n, **out}


def eval_mode(r: Run) -> RunResult:
    """``eval``: the newest good checkpoint (or --checkpoint_path); ``eval_all``: every
    checkpoint in model_dir, skipping corrupt ones with a warning."""
    from wsjax.checkpoint import Checkpoints, CorruptCheckpoint, load_start
    from wsjax.metrics import Summaries

    check_eval_input(r)
    result = r.result()
    if r.options.checkpoint_path is not None:
        targets = [Path(r.options.checkpoint_path)]
    else:
        steps = Checkpoints(r.md.path, read_only=True).steps()
        if not steps:
            raise CheckpointError(
                f"model_dir {r.md.path} has no checkpoint to evaluate; train first or give "
                "--checkpoint_path"
            )
        # eval: the model_dir itself, so load_start falls back past a corrupt latest one
        targets = (
            [r.md.path / f"model-ckpt-{s}" for s in steps] if r.mode == "eval_all" else [r.md.path]
        )
    tb = Summaries(r.md.path)
    try:
        for path in targets:
            try:
                start = load_start(
                    path,
                    r.model,
                    r.optimizer,
                    weights_only=True,
                    allow_pickle=r.options.allow_pickle,
                )
            except CorruptCheckpoint as e:
                if len(targets) == 1:
                    raise
                log.warning("%s; skipped", e)
                continue
            step = _step_of(Path(start.source))
            engine, _, _ = build_engine(r, start)
            result.evals.append(evaluate(r, engine, step, tb))
            result.global_step = step
    finally:
        tb.close()
    return result


def _step_of(path: Path) -> int:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0

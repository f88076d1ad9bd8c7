"""Evaluation: ``eval`` (the latest good checkpoint), ``eval_all`` (every checkpoint, corrupt ones
skipped with a warning), and the evaluation pass train_and_eval runs after each checkpoint.

One pass is ``runconfig.eval_steps`` batches of eval_input, or with ``eval_steps <= 0`` the
whole eval set once (Cerebras semantics); ``eval_input.repeat: false`` never wraps around, so
a pass stops at the end of the set. Scalars go to ``<model_dir>/eval`` under our tags (loss,
perplexity, accuracy) and under the ones Cerebras writes (``eval/lm_perplexity``,
``eval/accuracy``; the loss tag is ``loss`` on both).

``--eval_text FILE`` evaluates a text or jsonl file instead (wsjax.trainer.eval_text: tokenised with
the run's tokenizer, every token once) and adds bits per byte; its scalars go to
``<model_dir>/eval_text`` under ``eval/loss``, ``eval/perplexity``, ``eval/accuracy`` and
``eval/bits_per_byte``.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import jax

from wsjax.checkpoint import Checkpoints, CorruptCheckpoint, run_model_dir
from wsjax.data import make_loader
from wsjax.data.synthetic import NUM_EXAMPLES
from wsjax.data.tokenizer import load_run_tokenizer
from wsjax.errors import CheckpointError, ConfigError, Preempted
from wsjax.interop.load import load_start
from wsjax.trainer.eval_text import bits_per_byte, text_batches, tokenize_text
from wsjax.trainer.faults import stop_requested, stoppable
from wsjax.trainer.metrics import Summaries, eval_scalars, eval_tags
from wsjax.trainer.setup import RunResult, RunSpec, build_engine, process_rows_of

log = logging.getLogger("wsjax.train")


def eval_batches(config, batches_per_epoch: int) -> int:
    """Batches in one evaluation pass: eval_steps, or the whole set when it is <= 0; never more
    than one pass over the set when eval_input.repeat is false."""
    steps = config.runconfig.eval_steps
    if steps <= 0 or not config.eval_input.repeat:
        return batches_per_epoch if steps <= 0 else min(steps, batches_per_epoch)
    return steps


def open_eval_loader(r: RunSpec):
    return make_loader(
        r.config.eval_input,
        split="eval",
        model_vocab_size=r.config.model.vocab_size,
        seed=r.config.runconfig.seed,
        rows=process_rows_of(r.config, r.config.eval_input.batch_size, train=False),
    )


def check_eval_input(r: RunSpec) -> None:
    """The eval data opens and holds a batch (before any weights exist or anything compiles)."""
    if r.config.runconfig.eval_steps <= 0 and (
        r.config.eval_input.data_processor == "SyntheticDataProcessor"
    ):
        raise ConfigError(
            f"{r.config.source}: runconfig.eval_steps <= 0 asks for a full pass over the eval "
            f"set, but SyntheticDataProcessor is endless ({NUM_EXAMPLES} examples); give "
            "eval_steps >= 1"
        )
    open_eval_loader(r).close()


def evaluate(r: RunSpec, engine, step: int) -> dict:
    """One evaluation pass with ``engine``'s weights, logged: step, batches, loss, perplexity,
    accuracy."""
    total = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
    with open_eval_loader(r) as loader, stoppable():
        n = eval_batches(r.config, loader.batches_per_epoch)
        log.info("Evaluating global step %d: %d batches", step, n)
        for done in range(n):
            stop_if_signalled(r, step, done, n)
            for k, v in engine.eval_step(next(loader)).items():
                total[k] += float(v)
    out = eval_scalars(total["loss_sum"], total["count"], total["correct"])
    log.info(
        "Eval at global step %d (%d batches): loss = %.5f, perplexity = %.3f, accuracy = %.4f",
        step,
        n,
        out["loss"],
        out["perplexity"],
        out["accuracy"],
    )
    return {"step": step, "batches": n, **out}


def stop_if_signalled(r: RunSpec, step: int, done: int, n: int) -> None:
    """Preempted (one line, exit 5) when SIGTERM / SIGINT came during the pass: it stops at
    the next batch. In train_and_eval the pass follows the checkpoint of ``step``, saved."""
    signum = stop_requested()
    if signum is None:
        return
    name = signal.Signals(signum).name
    where = f"the evaluation at global step {step} stopped after {done} of {n} batches"
    if r.training:
        saved = r.md.path / f"model-ckpt-{step}"
        raise Preempted(
            f"preempted by {name}: finished global step {step} and saved {saved}; {where}; "
            "rerun the same command to resume exactly"
        )
    raise Preempted(f"preempted by {name}: {where}; nothing of it was written")


def eval_mode(r: RunSpec) -> RunResult:
    """``eval``: the newest good checkpoint (or --checkpoint_path); ``eval_all``: every
    checkpoint in model_dir, skipping corrupt ones with a warning."""
    text = read_eval_text(r)
    if text is None:
        check_eval_input(r)
    result = r.result()
    if r.options.checkpoint_path is not None:
        targets = [Path(r.options.checkpoint_path)]
    else:
        steps = Checkpoints(r.md.path, read_only=True).steps()  # committed ones only
        if not steps:
            raise CheckpointError(
                f"model_dir {r.md.path} has no checkpoint to evaluate; train first or give "
                "--checkpoint_path"
            )
        # eval: the model_dir itself, so load_start falls back past a corrupt latest one
        targets = (
            [r.md.path / f"model-ckpt-{s}" for s in steps] if r.mode == "eval_all" else [r.md.path]
        )
    tb, skipped = Summaries(r.md.path), []
    try:
        for path in targets:
            try:
                start = load_start(
                    path,
                    r.model,
                    r.optimizer,
                    weights_only=True,
                    allow_pickle=r.options.allow_pickle,
                    allow_unverified=r.options.allow_unverified_checkpoint,
                )
            except CorruptCheckpoint as e:
                if len(targets) == 1:
                    raise
                log.warning("%s; skipped", e)
                skipped.append(path.name)
                continue
            step = _step_of(Path(start.source))
            engine, _, _ = build_engine(r, start)
            if text is None:
                row = evaluate(r, engine, step)
                tb.scalars("eval", eval_tags(row, r.config.runconfig.cerebras_eval_tags), step)
                result.evals.append(row)
            else:
                result.evals.append(evaluate_text(r, engine, step, tb, text))
            result.global_step = step
    finally:
        tb.close()
    if not result.evals:  # every checkpoint asked for was unreadable: nothing done is a failure
        raise CheckpointError(
            f"{r.md.path}: no checkpoint could be evaluated ({', '.join(skipped)} unreadable); "
            "train again or give a readable --checkpoint_path"
        )
    return result


def read_eval_text(r: RunSpec):
    """--eval_text tokenised with the run's tokenizer (of --checkpoint_path's run, else of
    model_dir), or None without the flag; read before any weights exist."""

    if r.options.eval_text is None:
        return None
    if jax.process_count() > 1:
        raise ConfigError(
            f"--eval_text runs in one process, not {jax.process_count()}: evaluate the text "
            "without the launcher (a checkpoint restores with any process count)"
        )
    source = r.options.checkpoint_path
    tokenizer, eos_id = load_run_tokenizer(run_model_dir(source) if source else r.md.path)
    text = tokenize_text(r.options.eval_text, tokenizer, eos_id)
    log.info(
        "Eval text %s: %d document(s), %d UTF-8 bytes, %d tokens to predict",
        text.path,
        text.documents,
        text.num_bytes,
        text.predicted_tokens,
    )
    return text


def evaluate_text(r: RunSpec, engine, step: int, tb, text) -> dict:
    """Every token of ``text`` once: loss, perplexity, accuracy, bits per byte."""
    total = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
    B, T = r.shape
    n = -(-max(1, -(-text.predicted_tokens // T)) // B)  # ceil(ceil(tokens / T) / B) batches
    with stoppable():
        for done, batch in enumerate(text_batches(text, B, T)):
            stop_if_signalled(r, step, done, n)
            for k, v in engine.eval_step(batch).items():
                total[k] += float(v)
    out = eval_scalars(total["loss_sum"], total["count"], total["correct"])
    out["bits_per_byte"] = bits_per_byte(total["loss_sum"], text.num_bytes)
    tb.scalars("eval_text", {f"eval/{k}": v for k, v in out.items()}, step)
    log.info(
        "Eval of %s at global step %d (%d tokens, %d bytes): loss = %.5f, perplexity = %.3f, "
        "accuracy = %.4f, bits per byte = %.4f",
        text.path,
        step,
        int(total["count"]),
        text.num_bytes,
        out["loss"],
        out["perplexity"],
        out["accuracy"],
        out["bits_per_byte"],
    )
    return {"step": step, "tokens": int(total["count"]), "bytes": text.num_bytes, **out}


def _step_of(path: Path) -> int:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0

"""The body of a run (``wsjax.train.run``): plan, compile, start state, train loop, evaluation.

``Runner(config, mode, model_dir).go(...)`` does one mode top to bottom and fills a
:class:`RunResult`. Everything user-visible goes through the ``wsjax.train`` logger in the
Cerebras run.py wording (``global_step = N, loss = L``, ``Saving checkpoint at global step N``,
``Training finished with N samples in S seconds, X samples/second.``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from wsjax.errors import CheckpointError, ConfigError, WsjaxError

log = logging.getLogger("wsjax.train")


@dataclass
class RunResult:
    mode: str
    model_dir: Path
    global_step: int = 0
    final_loss: float | None = None
    samples_per_sec: float = 0.0
    total_samples: int = 0
    total_time: float = 0.0
    compile_time: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) every step
    evals: list[dict] = field(default_factory=list)  # {"step", "loss", "perplexity", "accuracy"}
    checkpoints: list[Path] = field(default_factory=list)
    compile_dir: Path | None = None
    performance_path: Path | None = None
    plan_path: Path | None = None
    message: str = ""


class Runner:
    """One run's state; ``go`` is the whole run, top to bottom."""

    def __init__(self, config, mode: str, md, progress: bool | None):
        from wsjax.models import get_model
        from wsjax.optim import make_optimizer

        self.config, self.mode, self.md, self.progress = config, mode, md, progress
        self.rc = config.runconfig
        self.model = get_model(config.model)
        self.optimizer = make_optimizer(config.optimizer)
        self.result = RunResult(mode, md.path)
        self.training = mode in ("train", "train_and_eval")
        self.input = self._input_cfg("train_input" if self.training else "eval_input")
        if mode == "train_and_eval":
            self._input_cfg("eval_input")
        self.shape = (int(self.input.batch_size), int(self.input.max_sequence_length))

    def _input_cfg(self, section: str):
        cfg = getattr(self.config, section)
        if cfg is None:
            raise ConfigError(f"{self.config.source}: mode {self.mode} needs a {section} section")
        return cfg

    # ---- the run ---------------------------------------------------------------------------
    def go(self, checkpoint_path, pretrained, validate_only, compile_only) -> RunResult:
        import jax

        from wsjax.run_dir import compile_checksum, use_compile_dir

        split_dir = self.md.train_dir if self.training else self.md.eval_dir
        split_dir.mkdir(parents=True, exist_ok=True)
        name = "params_train.yaml" if self.training else "params_eval.yaml"
        (split_dir / name).write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        log.info(
            "%s: %s %s, %.2fM parameters, batch %d x %d, on %d %s device(s)",
            self.config.source,
            self.mode,
            self.config.model.family,
            self.model.num_params() / 1e6,
            *self.shape,
            jax.device_count(),
            jax.devices()[0].platform,
        )
        # validate_only: a plan that does not fit is the verdict (PlanError, exit 3)
        plan = self._plan(None, strict=not compile_only)
        if validate_only:
            self.result.message = "validate_only: config and shapes valid, the plan fits"
            log.info("%s", self.result.message)
            return self.result
        shapes = {"train" if self.training else "eval": self.shape}
        self.compile_dir = self.md.compile_dir(compile_checksum(self.config, shapes))
        self.result.compile_dir = self.compile_dir
        with use_compile_dir(self.compile_dir):
            return self._execute(checkpoint_path, pretrained, compile_only, plan)

    def _execute(self, checkpoint_path, pretrained, compile_only, plan) -> RunResult:
        from wsjax.checkpoint import Checkpoints

        if compile_only:
            return self._compile_only(plan)

        self.ckpts = Checkpoints(self.md.path, keep=self.rc.keep_checkpoint_max)
        if self.mode in ("eval", "eval_all"):
            return self._eval_mode(checkpoint_path)
        start = self._start_state(checkpoint_path, pretrained)
        if start.step >= self.rc.max_steps:
            self.result.global_step = start.step
            self.result.message = (
                f"max_steps {self.rc.max_steps} already reached: {start.source} is at step "
                f"{start.step}; nothing to do (raise --max_steps to train further)"
            )
            log.info("%s", self.result.message)
            return self.result
        return self._train(start)

    def _plan(self, records, *, strict: bool):
        """The memory plan of this run's step, against ``streaming.device_memory_gb`` /
        ``host_memory_gb`` when given (a GPU target: separate device and host memory), else
        against this machine. ``strict``: raise PlanError (exit 3) when it does not fit."""
        import jax

        from wsjax.streaming import make_plan
        from wsjax.streaming.plan import GiB, available_device_bytes, available_host_bytes

        s, dev = self.config.streaming, jax.devices()[0]
        target = s.device_memory_gb is not None or s.host_memory_gb is not None
        if target:  # one accelerator of the target, whatever this machine is
            platform, n_devices = "gpu", (jax.device_count() if dev.platform != "cpu" else 1)
            device_avail = int(s.device_memory_gb * GiB) if s.device_memory_gb else None
            host_avail = int(s.host_memory_gb * GiB) if s.host_memory_gb else None
        else:
            platform, n_devices = dev.platform, jax.device_count()
            device_avail, host_avail = available_device_bytes(dev), available_host_bytes()
        batch = self.shape[0]
        n_micro = self.config.micro_batches(batch, train=self.training)
        plan = make_plan(
            self.model,
            self.config,
            self.optimizer,
            batch_size=self.shape[0],
            seq=self.shape[1],
            n_micro=n_micro,
            n_devices=n_devices,
            platform=platform,
            compile_records=records,
            host_available=host_avail,
            device_available=device_avail,
            train=self.training,
            input_prefetch=int(self.input.prefetch_factor) * int(self.input.num_workers),
        )
        if target:
            plan.notes.append("planned against streaming.device_memory_gb / host_memory_gb")
        plan.write(self.md.plan_json)
        self.result.plan_path = self.md.plan_json
        if records is None:
            log.info("%s", plan.summary())
        try:
            plan.check()
        except WsjaxError as e:
            if strict:
                raise
            log.warning("%s: %s", "on the target" if target else "on this machine", e)
        return plan

    def _compile(self, engine) -> list[dict]:
        from wsjax.run_dir import backend_signature, write_compile_log

        t0 = time.perf_counter()
        records = engine.compile(self.shape, train=self.training)
        self.result.compile_time = time.perf_counter() - t0
        extra = {"compile_time": self.result.compile_time, "batch_shape": list(self.shape)}
        write_compile_log(self.compile_dir, records, {**extra, **backend_signature()})
        log.info(
            "Compiled %d executables in %.2f seconds (cache: %s)",
            len(records),
            self.result.compile_time,
            self.compile_dir,
        )
        return records

    def _compile_only(self, plan) -> RunResult:
        from wsjax.metrics import Performance
        from wsjax.streaming import StreamingEngine

        engine = StreamingEngine(self.model, self.config, allocate=False)
        records = self._compile(engine)
        self._plan(records, strict=False)
        perf = Performance(compile_time=self.result.compile_time)
        self._estimate(perf, engine, records)
        perf.write(self.md.performance_json)
        self.result.performance_path = self.md.performance_json
        self.result.message = f"compile_only: executables compiled into {self.compile_dir}"
        log.info("%s", self.result.message)
        return self.result

    def _estimate(self, perf, engine, records) -> None:
        from wsjax.metrics import device_peaks, estimate_step_seconds

        peaks = device_peaks()
        prog = engine.program(self.shape, train=True)
        step_s = estimate_step_seconds(
            records,
            num_layers=self.model.num_layers,
            n_micro=prog.n_micro,
            seg_bytes=prog.seg_bytes,
            peaks=peaks,
        )
        perf.est_samples_per_sec = self.shape[0] / step_s if step_s > 0 else 0.0
        perf.peak_flops, perf.h2d_bandwidth = peaks.flops, peaks.h2d_bandwidth
        perf.peaks_source = peaks.source
        self.peaks = peaks

    def _start_state(self, checkpoint_path, pretrained):
        from wsjax.checkpoint import StartState, load_start

        latest = self.ckpts.latest()
        if checkpoint_path is not None:
            if latest is not None:
                log.warning(
                    "model_dir has checkpoints up to step %d; starting from --checkpoint_path "
                    "%s as asked",
                    latest,
                    checkpoint_path,
                )
            return load_start(checkpoint_path, self.model, self.optimizer, weights_only=pretrained)
        if latest is not None and latest >= self.rc.max_steps:
            return StartState(step=latest, source=str(self.ckpts.path(latest)))
        if latest is not None:
            log.info("Found checkpoint %s: resuming from it", self.ckpts.path(latest))
            return load_start(
                self.ckpts.path(latest), self.model, self.optimizer, weights_only=False
            )
        return StartState()

    def _engine(self, start):
        import jax

        from wsjax.streaming import StreamingEngine

        t0 = time.perf_counter()
        engine = StreamingEngine(
            self.model, self.config, params=start.params, opt_state=start.opt_state, step=start.step
        )
        init_s = time.perf_counter() - t0
        w = jax.device_put(engine.store.stream["embed"], engine.replicated)  # first weights in
        jax.block_until_ready(w)
        self.programming_time = time.perf_counter() - t0
        where = jax.devices()[0].platform.upper()
        if start.source is None:
            log.info("Completed weight initialization on %s in: %.3f seconds", where, init_s)
        else:
            log.info("Restored weights from %s in: %.3f seconds", start.source, init_s)
        self.init_time = init_s
        return engine

    # ---- training --------------------------------------------------------------------------
    def _train(self, start) -> RunResult:
        from wsjax.data import make_loader
        from wsjax.metrics import Performance, Progress, Summaries, model_flops_per_token

        engine = self._engine(start)
        records = self._compile(engine)
        self._plan(records, strict=False)
        perf = Performance(compile_time=self.result.compile_time)
        self._estimate(perf, engine, records)
        perf.programming_time, perf.weight_init_time = self.programming_time, self.init_time
        loader = make_loader(
            self.input,
            split="train",
            model_vocab_size=self.config.model.vocab_size,
            seed=self.rc.seed,
            start_state=start.loader_state,
        )
        tb = Summaries(self.md.path)
        B, T = self.shape
        flops_tok = model_flops_per_token(self.config.model, self.model.num_params(), T)
        bar = Progress(engine.step, self.rc.max_steps, self.progress)
        steps_done, wait, t_start, last_save = 0, 0.0, time.perf_counter(), None
        try:
            while engine.step < self.rc.max_steps:
                batch = next(loader)
                m = engine.train_step(batch)
                m["input/wait_seconds"] = loader.wait_seconds_last
                wait += loader.wait_seconds_last
                steps_done += 1
                step, loss = engine.step, m["train/loss"]
                self.result.losses.append((step, loss))
                step_s = m["step_seconds"] + loader.wait_seconds_last
                sps = B / step_s if step_s > 0 else 0.0
                bar.update(loss, sps)
                if not math.isfinite(loss):
                    log.warning("global_step = %d: loss is %s", step, loss)
                if step % self.rc.log_steps == 0 or step == self.rc.max_steps:
                    log.info("global_step = %d, loss = %.5f", step, loss)
                if step % self.rc.save_summary_steps == 0 or step == self.rc.max_steps:
                    mfu = flops_tok * B * T / step_s / self.peaks.flops if step_s > 0 else 0.0
                    tb.scalars("train", _train_tags(m, sps, sps * T, mfu), step)
                if step % self.rc.save_checkpoints_steps == 0 or step == self.rc.max_steps:
                    last_save = self._save(engine, loader, step)
                    if self.mode == "train_and_eval":
                        self._evaluate(engine, step, tb)
        finally:
            bar.close()
            loader.close()
        total = time.perf_counter() - t_start
        samples = steps_done * B
        r = self.result
        r.global_step, r.final_loss = engine.step, self.result.losses[-1][1]
        r.total_samples, r.total_time = samples, total
        r.samples_per_sec = samples / total if total > 0 else 0.0
        if last_save is not None:
            r.checkpoints = [self.ckpts.path(s) for s in self.ckpts.steps()]
        perf.samples_per_sec, perf.total_samples, perf.total_time = (
            r.samples_per_sec,
            samples,
            total,
        )
        perf.tokens_per_sec = r.samples_per_sec * T
        perf.mfu = flops_tok * perf.tokens_per_sec / self.peaks.flops
        perf.input_wait_fraction = wait / total if total > 0 else 0.0
        perf.suspected_input_bottleneck = perf.input_wait_fraction > perf.input_wait_threshold
        perf.write(self.md.performance_json)
        r.performance_path = self.md.performance_json
        tb.close()
        log.info(
            "Training finished with %d samples in %.3f seconds, %.2f samples/second.",
            samples,
            total,
            r.samples_per_sec,
        )
        log.info("Loss for final step: %.5f.", r.final_loss)
        if perf.suspected_input_bottleneck:
            log.warning(
                "suspected input bottleneck: waited for data %.0f%% of the time",
                100 * perf.input_wait_fraction,
            )
        return r

    def _save(self, engine, loader, step: int) -> int:
        log.info("Saving checkpoint at global step %d", step)
        meta = {
            "step": step,
            "loader": loader.state(),
            "seed": self.rc.seed,
            "rng": "dropout keys = fold_in(PRNGKey(seed), step); nothing else is random",
            "config": self.config.to_dict(),
        }
        self.ckpts.save(step, engine.params_tree(), engine.opt_state_tree(), meta)
        return step

    # ---- evaluation ------------------------------------------------------------------------
    def _evaluate(self, engine, step: int, tb) -> dict:
        from wsjax.data import make_loader
        from wsjax.metrics import eval_scalars

        eval_cfg = self.config.eval_input
        shape = (int(eval_cfg.batch_size), int(eval_cfg.max_sequence_length))
        loader = make_loader(
            eval_cfg, split="eval", model_vocab_size=self.config.model.vocab_size, seed=self.rc.seed
        )
        total = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
        n = 0
        try:
            for batch in loader:
                if n >= self.rc.eval_steps:
                    break
                if batch["input_ids"].shape != shape:
                    break
                for k, v in engine.eval_step(batch).items():
                    total[k] += float(v)
                n += 1
        finally:
            loader.close()
        out = eval_scalars(total["loss_sum"], total["count"], total["correct"])
        tb.scalars("eval", out, step)
        log.info(
            "Eval at global step %d (%d batches): loss = %.5f, perplexity = %.3f, accuracy = %.4f",
            step,
            n,
            out["loss"],
            out["perplexity"],
            out["accuracy"],
        )
        self.result.evals.append({"step": step, **out})
        return out

    def _eval_mode(self, checkpoint_path) -> RunResult:
        from wsjax.checkpoint import load_start
        from wsjax.metrics import Summaries

        if checkpoint_path is not None:
            targets = [Path(checkpoint_path)]
        else:
            steps = self.ckpts.steps()
            if not steps:
                raise CheckpointError(
                    f"model_dir {self.md.path} has no checkpoint to evaluate; train first or "
                    "give --checkpoint_path"
                )
            steps = steps if self.mode == "eval_all" else steps[-1:]
            targets = [self.ckpts.path(s) for s in steps]
        tb = Summaries(self.md.path)
        for path in targets:
            start = load_start(path, self.model, self.optimizer, weights_only=True)
            step = _step_of(path)
            self._evaluate(self._engine(start), step, tb)
            self.result.global_step = step
        tb.close()
        return self.result


def _step_of(path: Path) -> int:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _train_tags(m: dict, sps: float, tps: float, mfu: float) -> dict:
    from wsjax.metrics import train_scalars

    return train_scalars(m, samples_per_sec=sps, tokens_per_sec=tps, mfu=mfu)

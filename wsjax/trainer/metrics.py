"""What a run reports: FLOPs and MFU, performance.json, TensorBoard events and the log lines /
progress bar. The device peaks MFU is measured against, and the step-time estimate, are the
engine's (wsjax.engine.estimate).

MFU uses the standard model-FLOPs count (PaLM, appendix B): per token,
``6 * N + 12 * L * hidden * seq`` where N counts the parameters that take part in matmuls
(every parameter except the embedding tables wte/wpe; with tied embeddings the head matmul's
``hidden * vocab`` is counted) and the second term is attention's QK^T and AV, forward and
backward. Recomputation in the backward is not counted (that is what makes it *model* FLOPs).
N comes from the model's own parameter shapes, so grouped-query attention (smaller k / v
projections) and SwiGLU (three MLP matrices) are counted as built; the attention term counts
every query head (GQA shares keys, not queries), over at most the sliding window's keys.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from tensorboardX import SummaryWriter
from tensorboardX.summary import hparams as hparams_summaries
from tqdm.contrib.logging import logging_redirect_tqdm

with warnings.catch_warnings():  # a notebook without ipywidgets: the text bar, not a warning
    warnings.filterwarnings("ignore", "IProgress not found")
    from tqdm.auto import tqdm

from wsjax.distributed import is_main_process
from wsjax.fileio import atomic_write_text

log = logging.getLogger("wsjax.train")

INPUT_BOTTLENECK_SHARE = 0.10  # loader wait above this share of step time is reported


def model_flops_per_token(model_cfg, num_params: int, seq: int) -> float:
    """Model FLOPs per trained token (forward + backward), PaLM's formula; see module doc."""
    d, v, L = model_cfg.hidden_size, model_cfg.vocab_size, model_cfg.num_hidden_layers
    n = num_params - v * d  # wte is a lookup
    if model_cfg.position_embedding_type == "learned":
        n -= model_cfg.max_position_embeddings * d
    if model_cfg.share_embedding_weights:
        n += v * d  # the head multiplies by wte.T
    window = getattr(model_cfg, "attention_sliding_window_length", None)
    keys = seq if window is None else min(seq, window)  # keys a query attends (Mistral: window)
    return 6.0 * n + 12.0 * L * d * keys


@dataclass
class Performance:
    """``performance/performance.json`` (Cerebras keys first, then wsjax's details)."""

    compile_time: float = 0.0
    est_samples_per_sec: float = 0.0
    programming_time: float = 0.0
    samples_per_sec: float = 0.0
    suspected_input_bottleneck: bool = False
    total_samples: int = 0
    total_time: float = 0.0
    input_wait_fraction: float = 0.0
    input_wait_threshold: float = INPUT_BOTTLENECK_SHARE
    tokens_per_sec: float = 0.0
    mfu: float = 0.0
    peak_flops: float = 0.0
    h2d_bandwidth: float = 0.0
    peaks_source: str = ""
    weight_init_time: float = 0.0

    def write(self, path: Path) -> None:
        if not is_main_process():  # process 0 writes the run's files
            return
        atomic_write_text(path, json.dumps(asdict(self), indent=2) + "\n")


class Summaries:
    """tensorboardX writers under ``<model_dir>/train`` and ``<model_dir>/eval``."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self._writers: dict = {}

    def _writer(self, split: str):
        if split not in self._writers:
            self._writers[split] = SummaryWriter(str(self.model_dir / split))
        return self._writers[split]

    def describe(self, hparams: dict, text: str) -> None:
        """The run's hyperparameters (TensorBoard's HPARAMS tab) and its config as Markdown
        text (the TEXT tab), into the train events."""
        if not is_main_process():
            return
        w = self._writer("train")
        metrics = {"loss": 0.0, "eval/loss": 0.0}  # the tags the HPARAMS table shows
        for summary in hparams_summaries(hparams, metrics):
            w._get_file_writer().add_summary(summary)
        w.add_text("config", text, 0)
        w.flush()

    def scalars(self, split: str, values: dict, step: int) -> None:
        if not is_main_process():  # process 0 writes the events
            return
        w = self._writer(split)
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                w.add_scalar(tag, float(value), step)
        with _naming(w):
            w.flush()

    def close(self) -> None:
        writers = list(self._writers.values())
        self._writers.clear()
        with contextlib.ExitStack() as stack:  # every writer closed, the first failure raised
            for w in writers:
                stack.enter_context(_naming(w))
                stack.callback(w.close)


@contextlib.contextmanager
def _naming(writer):
    """An OSError of an events write (a full disk: tensorboardX's own has no file name) names
    the events folder, as every write error of a run does."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror, writer.logdir) from None


def train_scalars(m: dict, *, samples_per_sec: float, tokens_per_sec: float, mfu: float) -> dict:
    """TensorBoard tags of one training step's metrics."""
    out = {
        "loss": m.get("train/loss"),
        "lr": m.get("train/lr"),
        "grad_norm": m.get("train/grad_norm"),
        "throughput/samples_per_sec": samples_per_sec,
        "throughput/tokens_per_sec": tokens_per_sec,
        "throughput/mfu": mfu,
        "input/wait_seconds": m.get("input/wait_seconds"),
    }
    for k, v in m.items():
        if k.startswith(("stream/", "memory/")):
            out[k] = v
    return out


def eval_scalars(loss_sum: float, count: float, correct: float) -> dict:
    loss = loss_sum / max(count, 1.0)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": correct / max(count, 1.0),
    }


# ---- log output ---------------------------------------------------------------------------------
CEREBRAS_EVAL_TAGS = {"perplexity": "eval/lm_perplexity", "accuracy": "eval/accuracy"}


def eval_tags(scalars: dict, cerebras: bool = True) -> dict:
    """TensorBoard tags of an evaluation: wsjax's (loss, perplexity, accuracy) and, with
    ``cerebras`` (runconfig.cerebras_eval_tags), the ones Cerebras writes (the loss tag is
    ``loss`` on both)."""
    out = {k: scalars[k] for k in ("loss", "perplexity", "accuracy")}
    if not cerebras:
        return out
    return {**out, **{tag: out[k] for k, tag in CEREBRAS_EVAL_TAGS.items()}}


PLAIN_EVERY_S = 30.0  # a plain progress line this often when the output is not a terminal


def interactive() -> bool:
    """Whether the output is a terminal or a Jupyter notebook (where tqdm.auto draws a bar)."""
    if sys.stdout.isatty():
        return True
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return type(ip).__name__ == "ZMQInteractiveShell"


class Progress:
    """Where the run is (steps, loss, samples/s, ETA): a tqdm.auto bar in a terminal or a
    notebook; elsewhere (a log file, a batch job) a plain line every ``every_s`` seconds.
    ``enabled``: None decides by the output, True a bar, False nothing."""

    def __init__(
        self, start: int, total: int, enabled: bool | None = None, every_s: float = PLAIN_EVERY_S
    ):
        bar = interactive() if enabled is None else enabled
        self.plain = enabled is None and not bar and total > start
        self.step, self.total, self.every_s = start, total, every_s
        self._t0 = self._last = time.monotonic()
        self._start = start
        self._bar = None
        self._redirect = None
        if bar and total > start:
            self._redirect = logging_redirect_tqdm([logging.getLogger("wsjax")])
            self._redirect.__enter__()
            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, loss: float, samples_per_sec: float) -> None:
        self.step += 1
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_sec:.1f}")
            self._bar.update(1)
        elif self.plain and time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            done = self.step - self._start
            left = (self._last - self._t0) / done * (self.total - self.step) if done else 0.0
            log.info(
                "progress: step %d/%d (%.0f%%), loss %.4f, %.1f samples/s, %d s left",
                self.step,
                self.total,
                100.0 * self.step / self.total,
                loss,
                samples_per_sec,
                round(left),
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._redirect.__exit__(None, None, None)
            self._bar = None

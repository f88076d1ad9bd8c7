"""Text generation from a trained model: ``wsjax-generate`` and :func:`generate`.

    wsjax-generate --checkpoint_path model_dir --prompt "def main(" \\
        --max_new_tokens 40 [--prompts_file F] [--temperature T --top_k K --top_p P --seed S] \\
        [--kv_cache auto|device|host] [-p params.yaml]

``--checkpoint_path`` is a model_dir (its newest good checkpoint), a ``model-ckpt-<step>``
folder or a HuggingFace folder, read by the loaders training uses (:func:`wsjax.checkpoint.
load_start`). Without ``-p`` the config is the checkpoint's own: a model_dir's (or a
model-ckpt-<step> folder's parent's) ``train/params_train.yaml``, a HuggingFace folder's
``config.json``. Only the prompt and its continuation go to stdout; every other line goes to
stderr. The weights are streamed layer by layer from host memory
(:class:`~wsjax.inference.decode.StreamingDecoder`). The tokenizer is the run's: a
``tokenizer.json`` in the checkpoint folder or in ``model_dir/tokenizer``, else the one of the
config's training data (the built-in corpus' BPE, or a shards folder's).

Before any weight is loaded, the generation plan (:mod:`wsjax.inference.decode_plan`) is logged:
the device bytes with the KV caches on the device and offloaded to host memory, against
``streaming.device_memory_gb`` or the device's own limit. ``--kv_cache auto`` (the default)
keeps them on the device when that fits and offloads them when only that fits; ``device`` and
``host`` force a place. A call that does not fit either way is one line, exit 3.

In a notebook::

    result = generate(config, "model_dir", ["import os"], max_new_tokens=20)
    result.texts, result.token_ids
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsjax.checkpoint import run_model_dir
from wsjax.config import load_config
from wsjax.config.schema import Config, OptimizerConfig, RunConfig, StreamingConfig
from wsjax.data.builtin import ensure_builtin_corpus
from wsjax.data.textio import DEFAULT_EOS, load_tokenizer
from wsjax.errors import ArgumentParser, ConfigError, DataError, WsjaxError
from wsjax.inference.decode import Sampling, StreamingDecoder, generation_plan
from wsjax.inference.decode_plan import KV_CACHE_MODES, GenerationPlan
from wsjax.interop.export import PARAMS_TRAIN, PLACEHOLDER_OPTIMIZER
from wsjax.interop.hf_config import CONFIG_FILE, config_from_hf
from wsjax.interop.load import load_start
from wsjax.models import get_model

TOKENIZER_FILE = "tokenizer.json"
log = logging.getLogger("wsjax.inference.generate")


@dataclass
class GenerationResult:
    prompts: list[str]
    texts: list[str]  # the generated continuations (prompt not included)
    token_ids: np.ndarray  # (B, N) generated ids
    seconds: float  # prefill + decode wall time
    compile_count: int  # executables compiled for this call's shape bucket
    plan: GenerationPlan | None = None  # device bytes, and where the KV caches lived

    @property
    def tokens_per_second(self) -> float:
        return self.token_ids.size / self.seconds


# ---- what to load ------------------------------------------------------------------------------
def find_tokenizer(config, checkpoint_path: str | Path | None):
    """The run's tokenizer (see the module docstring), or DataError naming where it looked."""
    looked = []
    if checkpoint_path is not None:
        path = Path(checkpoint_path)
        for folder in (path, run_model_dir(path) / "tokenizer", run_model_dir(path)):
            looked.append(str(folder / TOKENIZER_FILE))
            if (folder / TOKENIZER_FILE).is_file():
                return load_tokenizer(folder / TOKENIZER_FILE)
    data = config.train_input or config.eval_input
    shards = data is not None and data.data_processor == "GptTokenShardsProcessor"
    dirs = (
        [] if not shards else [data.data_dir] if isinstance(data.data_dir, str) else data.data_dir
    )
    for d in dirs:
        if d == "builtin:stdlib":  # the run tokenised with the built-in corpus' BPE
            vocab = config.model.vocab_size
            return load_tokenizer(ensure_builtin_corpus(vocab, log=lambda _: None))
        looked.append(str(Path(d) / TOKENIZER_FILE))
        if (Path(d) / TOKENIZER_FILE).is_file():
            return load_tokenizer(Path(d) / TOKENIZER_FILE)
    raise DataError(
        f"no tokenizer found (looked for {', '.join(looked) or 'a training data_dir'}); give "
        "--tokenizer FILE (a HuggingFace tokenizer.json)"
    )


def checkpoint_config(checkpoint_path: str | Path) -> Config:
    """The config of what ``checkpoint_path`` holds (see the module docstring), or a one-line
    ConfigError naming the path and what it should hold."""
    path = Path(checkpoint_path)
    saved = run_model_dir(path) / PARAMS_TRAIN
    if saved.is_file():
        return load_config(saved)
    hf = path / CONFIG_FILE
    if hf.is_file():
        try:
            model = config_from_hf(json.loads(hf.read_text()), str(hf))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{hf}: cannot read ({e})") from None
        optimizer = OptimizerConfig(**PLACEHOLDER_OPTIMIZER)  # generation updates nothing
        return Config(model, optimizer, RunConfig(), StreamingConfig(), None, None, str(hf))
    raise ConfigError(
        f"--checkpoint_path {path}: neither {saved} (a model_dir or model-ckpt-<step> folder) "
        f"nor {hf} (a HuggingFace folder) exists; give -p PARAMS_YAML"
    )


def load_params(config, checkpoint_path: str | Path) -> dict:
    """fp32 weights from a model_dir, a model-ckpt-<step> folder or a HuggingFace folder."""
    start = load_start(checkpoint_path, get_model(config.model), None, weights_only=True)
    return start.params


def _eos_id(tokenizer) -> int | None:
    return tokenizer.token_to_id(DEFAULT_EOS)


# ---- the function notebooks call ----------------------------------------------------------------
def generate(
    config,
    params_or_path: dict | str | Path,
    prompts: list[str],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    tokenizer=None,
    stop_at_eos: bool = True,
    on_step: Callable[[int, np.ndarray], None] | None = None,
    kv_cache: str = "auto",
) -> GenerationResult:
    """Continue each of ``prompts`` by up to ``max_new_tokens`` tokens (one batch).

    ``params_or_path``: a parameter tree, or a checkpoint path as ``--checkpoint_path`` takes.
    ``temperature`` 0 is greedy; ``tokenizer`` defaults to the run's (:func:`find_tokenizer`).
    ``kv_cache``: auto (the plan decides), device or host (see the module docstring).
    """

    path = None if isinstance(params_or_path, dict) else Path(params_or_path)
    tok = tokenizer if tokenizer is not None else find_tokenizer(config, path)
    sampling = Sampling(temperature, top_k, top_p, seed)
    model = get_model(config.model)
    ids = [tok.encode(p).ids for p in prompts]
    plan = generation_plan(model, config.streaming, ids, max_new_tokens, kv_cache)
    log.info("%s", plan.summary())  # before loading: a call that cannot fit has stopped
    params = params_or_path if path is None else load_params(config, path)
    decoder = StreamingDecoder(model, params, config.streaming)
    t0 = time.perf_counter()
    eos = _eos_id(tok) if stop_at_eos else None
    new = decoder.generate(
        ids, max_new_tokens, sampling, eos_id=eos, on_step=on_step, kv_cache=plan.kv_cache
    )
    seconds = time.perf_counter() - t0
    texts = [tok.decode(_until(row, eos)) for row in new.tolist()]
    return GenerationResult(list(prompts), texts, new, seconds, decoder.compile_count, decoder.plan)


def _until(row: list[int], eos: int | None) -> list[int]:
    return row[: row.index(eos)] if eos is not None and eos in row else row


# ---- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="wsjax-generate",
        description="Generate text from a trained model, its weights streamed layer by layer.",
    )
    p.add_argument(
        "-p",
        "--params",
        help="the run's params YAML (default: the checkpoint's own: the model_dir's "
        "train/params_train.yaml or the HuggingFace folder's config.json)",
    )
    p.add_argument(
        "--checkpoint_path",
        required=True,
        help="model_dir (newest checkpoint), a model-ckpt-<step> folder or a HuggingFace folder",
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts_file", help="a text file: one prompt per line (one batch)")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top_k", type=int, default=0, help="0: off")
    p.add_argument("--top_p", type=float, default=1.0, help="1.0: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="a tokenizer.json (default: the run's)")
    p.add_argument(
        "--kv_cache",
        choices=KV_CACHE_MODES,
        default="auto",
        help="where each layer's KV cache lives: auto (default: the generation plan decides), "
        "device, or host (offloaded, streamed with its layer's weights)",
    )
    return p


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise DataError(f"--prompts_file {path}: no such file")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise DataError("no prompt: give --prompt TEXT or --prompts_file FILE")
    return prompts


class _Printer:
    """Prints the continuation of a single prompt as its tokens arrive (whole texts decode
    correctly where a token ends mid-character)."""

    def __init__(self, tokenizer, eos: int | None):
        self.tokenizer, self.eos = tokenizer, eos
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, step: int, tokens: np.ndarray) -> None:
        if self.eos is not None and int(tokens[0]) == self.eos:
            return
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            self._show(text)

    def finish(self) -> None:
        """Print what an incomplete character held back, then end the line."""
        self._show(self.tokenizer.decode(self.ids))
        print()

    def _show(self, text: str) -> None:
        sys.stdout.write(text[len(self.shown) :])
        sys.stdout.flush()
        self.shown = text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the plan's lines go to stderr (stdout carries only the generated text), for this call
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(to_stderr)
    log.setLevel(logging.INFO)
    propagate, log.propagate = log.propagate, False  # not also on a notebook's stdout handler
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's restore chatter
    try:
        path = args.checkpoint_path
        config = load_config(args.params) if args.params else checkpoint_config(path)
        prompts = _prompts(args)
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
        tok = tok or find_tokenizer(config, args.checkpoint_path)
        printer = _Printer(tok, _eos_id(tok)) if len(prompts) == 1 else None
        if printer:
            sys.stdout.write(prompts[0])
            sys.stdout.flush()
        result = generate(
            config,
            args.checkpoint_path,
            prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            tokenizer=tok,
            on_step=printer,
            kv_cache=args.kv_cache,
        )
        if printer:
            printer.finish()
        else:
            for prompt, text in zip(prompts, result.texts, strict=True):
                print(f"{prompt}{text}\n---")
        print(
            f"{result.token_ids.size} tokens in {result.seconds:.2f} s "
            f"({result.tokens_per_second:.1f} tokens/s, batch {len(prompts)})",
            file=sys.stderr,
        )
    except WsjaxError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    finally:
        log.removeHandler(to_stderr)
        log.propagate = propagate
    return 0


def cli() -> None:
    """The ``wsjax-generate`` entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()

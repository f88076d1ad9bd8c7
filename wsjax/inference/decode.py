"""Text generation with streamed weights (the ZeRO-Inference way).

The compute-dtype weights stay in host memory (the accelerator's ``pinned_host`` memory kind
where it has one), exactly as the training engine keeps its stream copy. Every forward pass,
the prefill of the prompts and then each decode step, streams the segments through the device
one at a time with :class:`~wsjax.engine.transfer.WeightStream` (``prefetch_depth`` ahead),
so the device holds ``prefetch_depth + 1`` segments, the activations and the KV caches, never the
model. The prefill is layer-major (every prompt of the batch through layer i, then layer i+1);
each decode step runs the whole batch through each layer.

Each layer's KV cache (:class:`~wsjax.models.kv_cache.KVCache`) stays on the device, or, when the
generation plan (:mod:`~wsjax.inference.decode_plan`) says all L do not fit, lives in host memory
(the stream copy's memory kind, else the host CPU device) and streams in with its layer's weights
in the same fetch, so it is prefetched ``prefetch_depth`` ahead; the updated cache goes back to
host memory before the layer's weights are released, so at most ``prefetch_depth + 1`` layers'
caches are ever on the device. The executables are the same in both modes, and so are the tokens.

Cost: a decode step moves the whole model across the link once, for the whole batch, so the link
carries model bytes / batch per generated token; batch is the knob, as tokens per step in
training. Offloaded, every step also moves each layer's cache in and back out: (model bytes +
2 x KV cache bytes) / batch per token.

Executables compile once per shape bucket: prompts are left-padded to a power-of-two length and
the cache length is fixed per call, so embed / block / head compile once for the prefill and once
for the decode step, whatever the depth and the number of new tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from wsjax.engine.engine import default_mesh
from wsjax.engine.placement import Placement
from wsjax.engine.store import segment_names, split_blocks, tree_bytes
from wsjax.engine.transfer import Fetch, Residency, StepStats, WeightStream
from wsjax.errors import ConfigError
from wsjax.inference.decode_plan import GenerationPlan, plan_generation
from wsjax.models import Model, cast_params
from wsjax.models.kv_cache import KVCache

MIN_BUCKET = 8  # shortest padded prompt length: tiny prompts share one executable


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(
                f"sampling temperature={self.temperature}, top_k={self.top_k}, "
                f"top_p={self.top_p}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1"
            )


def sample_next(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """(B, V) fp32 logits -> (B,) int32 next tokens (``sampling`` is static)."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:  # keep the smallest set of tokens whose mass reaches top_p
        ranked = jnp.sort(logits, axis=-1)[:, ::-1]  # (B, V) descending
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # the first token always stays
        kept = jnp.where(mass_before < sampling.top_p, ranked, jnp.inf)
        logits = jnp.where(logits < kept.min(axis=-1, keepdims=True), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def prompt_bucket(longest: int) -> int:
    """The padded prompt length: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(0, longest - 1).bit_length())


class StreamingDecoder:
    """Generates from ``params`` (fp32 tree, blocks stacked) streamed layer by layer."""

    def __init__(self, model: Model, params: dict, streaming_cfg, *, device=None):
        self.model = model
        self.device = device or jax.local_devices()[0]
        self.placement = Placement.create(default_mesh([self.device]), streaming_cfg)
        self.streaming_cfg = streaming_cfg
        self.depth = int(streaming_cfg.prefetch_depth)
        self.plan: GenerationPlan | None = None  # the last call's plan
        params = cast_params(params, model.compute_dtype)
        host = {"embed": params["embed"], "head": params["head"]}
        for i, layer in enumerate(split_blocks(params["blocks"], model.num_layers)):
            host[f"block/{i}"] = layer
        if model.tied:  # the tied head streams the embedding table with its own weights
            host["head"] = {"head": params["head"], "wte": params["embed"]["wte"]}
        self.host = {n: jax.device_put(t, self.placement.stream) for n, t in host.items()}
        self.stats = StepStats()
        self.residency = Residency()  # the ledger of streamed bytes (peak: weights in flight)
        self._compiled: dict[tuple, object] = {}

    # ---- executables ---------------------------------------------------------------------------
    @property
    def compile_count(self) -> int:
        return len(self._compiled)

    def _run(self, name: str, fn: Callable, *args, donate: tuple[int, ...] = ()):
        """Run ``fn`` compiled once per (name, argument shapes); ``donate`` buffers in place."""
        shapes = tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args))
        key = (name, shapes)
        if key not in self._compiled:
            out = self.placement.replicated
            jitted = jax.jit(fn, donate_argnums=donate, out_shardings=out)
            self._compiled[key] = jitted.lower(*args).compile()
        return self._compiled[key](*args)

    def _embed(self, w, tokens, positions):
        return self.model.embed_decode(w, tokens, positions)

    def _block(self, w, x, k, v, index, start):
        y, cache = self.model.block_decode(w, x, KVCache(k, v, index, start))
        return y, cache.k, cache.v

    def _head(self, w, x):
        x_last = x[:, -1:]  # (B, 1, D): left padding puts every row's newest token last
        if self.model.tied:
            return self.model.head_apply(w["head"], x_last, w["wte"])[:, 0]  # (B, V)
        return self.model.head_apply(w, x_last)[:, 0]

    # ---- one pass over the streamed segments ----------------------------------------------------
    def _pass(
        self, tokens: np.ndarray, index: int, start: np.ndarray, caches: list, offload: bool
    ) -> jax.Array:
        """tokens (B, T) at cache slot ``index`` through every segment -> last logits (B, V).
        ``caches[i]`` is layer i's (k, v), replaced by its update; ``offload``: they live in
        host memory and travel with their layer's weights."""
        put = lambda a: jax.device_put(a, self.placement.replicated)
        slots = index + np.arange(tokens.shape[1], dtype=np.int32)
        positions = np.maximum(slots[None, :] - start[:, None], 0).astype(np.int32)
        index_dev, start_dev = put(np.int32(index)), put(start)
        cache_bytes = tree_bytes(caches[0]) if offload else 0
        fetches = [
            self._fetch(name, caches, offload) for name in segment_names(self.model.num_layers)
        ]
        stream = WeightStream(fetches, self.depth, self.stats, self.residency)
        x = self._run("embed", self._embed, stream.take()[0], put(tokens), put(positions))
        jax.block_until_ready(x)  # the computation is done: its weights may leave
        stream.release()
        for i in range(self.model.num_layers):
            w, fetched = stream.take()
            k, v = fetched if offload else caches[i]
            del fetched  # donated below: no reference may outlive the step
            args = (w, x, k, v, index_dev, start_dev)
            x, k, v = self._run("block", self._block, *args, donate=(2, 3))  # cache in place
            if offload:  # back to host memory before this layer's window slot frees
                k, v = jax.device_put((k, v), self.cache_home(True))
                self.stats.d2h_bytes += cache_bytes
            caches[i] = (k, v)
            jax.block_until_ready((x, k, v))
            stream.release()
        logits = self._run("head", self._head, stream.take()[0], x)
        jax.block_until_ready(logits)
        stream.release()
        return logits

    def _fetch(self, name: str, caches: list, offload: bool) -> Fetch:
        """A segment's weights; a block's also brings its KV cache when ``offload``: one fetch,
        so the cache is prefetched with the weights. The cache is read when the fetch is
        issued, after the previous pass wrote it back."""
        put = lambda a: jax.device_put(a, self.placement.replicated)
        nbytes = tree_bytes(self.host[name])
        if not (offload and name.startswith("block/")):
            return Fetch(name, nbytes, lambda: (put(self.host[name]), None))
        layer = int(name.split("/")[1])
        issue = lambda: (put(self.host[name]), put(caches[layer]))  # noqa: E731
        return Fetch(name, nbytes + tree_bytes(caches[layer]), issue)

    def cache_home(self, offload: bool):
        """Where the KV caches live: the device, or host memory (the stream copy's memory kind
        where the accelerator has one, as activation offload does; else the host CPU device)."""
        if not offload:
            return self.placement.replicated
        if self.placement.activation_memory_kind is None:
            return self.placement.host
        return self.placement.offloaded(self.placement.replicated)

    def _empty_caches(self, batch: int, length: int, offload: bool) -> list:
        cfg = self.model.cfg
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)  # (B, S, G, K): G = H but GQA
        dtype, where = self.model.compute_dtype, self.cache_home(offload)
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=where)
        return [(zeros(), zeros()) for _ in range(self.model.num_layers)]

    # ---- generation -----------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        *,
        eos_id: int | None = None,
        on_step: Callable[[int, np.ndarray], None] | None = None,
        kv_cache: str = "auto",
    ) -> np.ndarray:
        """(B, N) new token ids for the token-id ``prompts`` (N <= max_new_tokens: all rows
        stopped at ``eos_id``; a stopped row repeats ``eos_id``). ``on_step(step, tokens (B,))``
        sees each step's tokens as they come. ``kv_cache``: auto (the plan decides), device or
        host; the call's plan is ``self.plan`` (PlanError, before allocating, if it fits not)."""
        self.plan = generation_plan(
            self.model, self.streaming_cfg, prompts, max_new_tokens, kv_cache, self.device
        )
        offload = self.plan.kv_cache == "host"
        batch, width = len(prompts), prompt_bucket(max(len(p) for p in prompts))
        tokens = np.zeros((batch, width), np.int32)  # left-padded: pad slots are never attended
        start = np.asarray([width - len(p) for p in prompts], np.int32)
        for row, p in enumerate(prompts):
            tokens[row, start[row] :] = p
        caches = self._empty_caches(batch, width + max_new_tokens, offload)
        if not offload:
            self.residency.add("kv_cache", self.plan.kv_cache_bytes)
        pick = jax.jit(sample_next, static_argnums=2)
        root = jax.random.PRNGKey(sampling.seed)
        done = np.zeros(batch, bool)
        out = []
        logits = self._pass(tokens, 0, start, caches, offload)  # the prefill, layer-major
        for step in range(max_new_tokens):
            new = np.asarray(pick(logits, jax.random.fold_in(root, step), sampling))
            if eos_id is not None:
                new = np.where(done, eos_id, new)
                done |= new == eos_id
            out.append(new)
            if on_step is not None:
                on_step(step, new)
            if step + 1 == max_new_tokens or done.all():
                break
            logits = self._pass(new[:, None], width + step, start, caches, offload)
        self.residency.drop("kv_cache")
        return np.stack(out, axis=1).astype(np.int32)

    def model_bytes(self) -> int:
        return sum(tree_bytes(t) for t in self.host.values())


def check_request(model_cfg, prompts: list[list[int]], max_new_tokens: int) -> None:
    """ConfigError (one line) for a request the model cannot serve."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("generate: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens {max_new_tokens}: must be at least 1")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model_cfg.max_position_embeddings:
        raise ConfigError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the "
            f"model's max_position_embeddings {model_cfg.max_position_embeddings}"
        )
    vocab = model_cfg.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise ConfigError(f"prompt token id {bad[0]} is outside the vocabulary 0..{vocab - 1}")


def generation_plan(
    model: Model,
    streaming_cfg,
    prompts: list[list[int]],
    max_new_tokens: int,
    kv_cache: str = "auto",
    device=None,
) -> GenerationPlan:
    """The plan of generating for these token-id ``prompts`` (checked first), before any weight
    is loaded: the caller can refuse early (PlanError) and log where the KV caches will live."""
    check_request(model.cfg, prompts, max_new_tokens)
    return plan_generation(
        model,
        streaming_cfg,
        batch=len(prompts),
        width=prompt_bucket(max(len(p) for p in prompts)),
        max_new_tokens=max_new_tokens,
        kv_cache=kv_cache,
        device=device or jax.local_devices()[0],
    )


def link_bytes_per_token(model_bytes: int, batch: int) -> float:
    """Bytes crossing the link per generated token: every decode step streams the model once."""
    return model_bytes / batch if batch else math.inf

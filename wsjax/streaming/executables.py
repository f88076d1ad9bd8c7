"""The per-segment compiled functions of a streamed step, compiled once (AOT) and reused.

Distinct executables, whatever the depth: ``embed_fwd``, ``block_fwd``, ``head_train``
(forward + loss + backward), ``block_bwd`` (recompute + VJP), ``embed_bwd``, ``head_eval``,
and one ``update/<segment kind>`` per distinct segment shape (embed, block, head). Each is
lowered from abstract shapes, so everything can be compiled with no weights allocated
(``--compile_only``); the compile log keeps seconds, FLOPs, bytes and memory analysis of each.
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from jax.experimental.serialize_executable import deserialize_and_load, serialize

from wsjax.losses import token_correct_sum, token_loss_sum
from wsjax.models import segment_rng

F32 = jnp.float32

# With ``streaming.recompute: false`` the block forward keeps every residual its backward needs
# (no recompute at all). Measured on CPU (width 256, 1024 tokens): backward 47 ms from all
# residuals vs 60 ms keeping only the weight matmuls' outputs (dots policy) vs 62 ms recomputing
# from the block input; the price is ~45x the kept bytes of recompute. Set a policy here (e.g.
# jax.checkpoint_policies.dots_with_no_batch_dims_saveable) to trade between the two.
SAVE_POLICY = None


def _sqnorm(tree) -> jax.Array:
    return sum((jnp.sum(jnp.square(g.astype(F32))) for g in jax.tree.leaves(tree)), F32(0))


def _accumulate(acc, grads):
    return jax.tree.map(lambda a, g: a + g.astype(F32), acc, grads)


def _key(step_key, idx):
    """Dropout key of (micro-batch, segment) = idx[0], idx[1] under this step's key."""
    return segment_rng(jax.random.fold_in(step_key, idx[0]), idx[1])


class SegmentFunctions:
    """The pure functions of one streamed step, built from a model and an optimizer."""

    def __init__(self, model, optimizer: optax.GradientTransformation, compute_dtype):
        self.model = model
        self.optimizer = optimizer
        self.compute_dtype = compute_dtype
        self.dropout = any(
            getattr(model.cfg, k) > 0
            for k in ("embedding_dropout_rate", "attention_dropout_rate", "residual_dropout_rate")
        )

    def _rng(self, step_key, idx, train: bool):
        return _key(step_key, idx) if (train and self.dropout) else None

    def embed_fwd(self, w, tokens, step_key, idx, train=True):
        return self.model.embed_apply(w, tokens, self._rng(step_key, idx, train))

    def block_fwd(self, w, x, step_key, idx, train=True):
        return self.model.block_apply(w, x, self._rng(step_key, idx, train))

    def block_fwd_save(self, w, x, step_key, idx):
        """Block forward that also returns the residuals its backward needs (weights excluded).

        The VJP closure's leaves are split into the block's own weights (supplied again by the
        backward, so no weight copy is kept per layer) and the rest, which are returned.
        """
        rng = self._rng(step_key, idx, True)
        fn = lambda w, x: self.model.block_apply(w, x, rng)
        if SAVE_POLICY is not None:
            fn = jax.checkpoint(fn, policy=SAVE_POLICY)
        y, vjp = jax.vjp(fn, w, x)
        leaves, treedef = jax.tree.flatten(vjp)
        weight_pos = {id(t): i for i, t in enumerate(jax.tree.leaves(w))}
        layout = [weight_pos.get(id(leaf), -1) for leaf in leaves]
        self._vjp_layout = (treedef, layout)
        return y, [leaf for leaf, pos in zip(leaves, layout) if pos < 0]

    def block_bwd_saved(self, w, residuals, dy, g_acc):
        """Backward from the residuals of :meth:`block_fwd_save` (traced after it)."""
        treedef, layout = self._vjp_layout
        weights, rest = jax.tree.leaves(w), iter(residuals)
        vjp = jax.tree.unflatten(treedef, [weights[p] if p >= 0 else next(rest) for p in layout])
        dw, dx = vjp(dy)
        g_acc = _accumulate(g_acc, dw)
        return dx, g_acc, _sqnorm(g_acc)

    def head_train(self, w, wte, x, labels, mask, denom, g_acc, g_wte):
        """Loss of one micro-batch (as a share of the global batch) and its gradients."""

        def loss_fn(w, wte, x):
            logits = self.model.head_apply(w, x, wte)  # (b, T, V) fp32
            loss_sum, _ = token_loss_sum(logits, labels, mask)
            return loss_sum / denom, loss_sum

        (_, loss_sum), (dw, dwte, dx) = jax.value_and_grad(
            loss_fn, argnums=(0, 1, 2), has_aux=True
        )(w, wte, x)
        g_acc = _accumulate(g_acc, dw)
        if g_wte is not None:
            g_wte = g_wte + dwte.astype(F32)
        return loss_sum, dx, g_acc, g_wte, _sqnorm(g_acc)

    def head_eval(self, w, wte, x, labels, mask):
        logits = self.model.head_apply(w, x, wte)
        loss_sum, count = token_loss_sum(logits, labels, mask)
        return loss_sum, count, token_correct_sum(logits, labels, mask)

    def block_bwd(self, w, x, dy, step_key, idx, g_acc):
        """Recompute the block forward from its kept input (same dropout key), then VJP."""
        rng = self._rng(step_key, idx, True)
        _, vjp = jax.vjp(lambda w, x: self.model.block_apply(w, x, rng), w, x)
        dw, dx = vjp(dy)
        g_acc = _accumulate(g_acc, dw)
        return dx, g_acc, _sqnorm(g_acc)

    def embed_bwd(self, w, tokens, dx, step_key, idx, g_acc):
        rng = self._rng(step_key, idx, True)
        _, vjp = jax.vjp(lambda w: self.model.embed_apply(w, tokens, rng), w)
        (dw,) = vjp(dx)
        g_acc = _accumulate(g_acc, dw)
        return g_acc, _sqnorm(g_acc)

    def update(self, master, opt_state, grads, scale):
        """Clip-scale the gradients, apply the optax update; also emit the streaming copy."""
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = self.optimizer.update(grads, opt_state, master)
        master = optax.apply_updates(master, updates)
        stream = jax.tree.map(lambda a: a.astype(self.compute_dtype), master)
        return master, opt_state, stream


@dataclass
class CompileRecord:
    name: str
    seconds: float
    flops: float
    bytes_accessed: float
    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    generated_code_bytes: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _cost(compiled) -> tuple[float, float]:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return 0.0, 0.0
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    cost = cost or {}
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _memory(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:
        m = None
    get = lambda k: int(getattr(m, k, 0) or 0) if m is not None else 0
    return {
        "temp_bytes": get("temp_size_in_bytes"),
        "argument_bytes": get("argument_size_in_bytes"),
        "output_bytes": get("output_size_in_bytes"),
        "generated_code_bytes": get("generated_code_size_in_bytes"),
    }


class ExecutableCache:
    """Compiles each (name, abstract signature) once and keeps the compile log.

    When JAX's persistent compilation cache is on (the run's ``compile_<checksum>/``), compiled
    executables are also serialized there (``wsjax-executables/``) and a later process loads
    them without tracing or lowering, which is what remains of a cached compile otherwise
    (~0.1 s an executable). The key covers ``context`` (model, optimizer and streaming config,
    the wsjax sources, JAX version, devices), the name, the abstract signature, the output
    shardings and the donation; an executable whose output structure cannot be rebuilt from
    ``out_tree`` is never serialized, and a file that fails to load is compiled again.
    """

    def __init__(self, context: str = ""):
        self._compiled: dict = {}
        self.records: list[CompileRecord] = []
        self.context = context

    def get(self, name: str, fn, abstract_args: tuple, *, out_shardings, donate=(), out_tree=None):
        """``out_tree(num_output_leaves) -> PyTreeDef`` enables the on-disk executable cache."""
        sig = _signature(abstract_args)
        key = (name, sig)
        hit = self._compiled.get(key)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        path = self._path(name, sig, out_shardings, donate) if out_tree else None
        compiled, info = self._load(path, abstract_args, out_tree) if path else (None, None)
        if compiled is None:
            jitted = jax.jit(fn, out_shardings=out_shardings, donate_argnums=donate)
            before = dict(_CACHE_EVENTS)
            compiled = jitted.lower(*abstract_args).compile()
            flops, nbytes = _cost(compiled)
            info = {"flops": flops, "bytes_accessed": nbytes, **_memory(compiled)}
            if path and _freshly_compiled(before):
                self._save(path, compiled, out_tree, info)
            info["_compiled"] = True
        seconds = time.perf_counter() - t0
        source = {"source": "compiled" if path is None or info.get("_compiled") else "disk"}
        info.pop("_compiled", None)
        self.records.append(CompileRecord(name, seconds, **info, extra=source))
        self._compiled[key] = compiled
        return compiled

    def _path(self, name, sig, out_shardings, donate) -> Path | None:
        root = jax.config.jax_compilation_cache_dir
        if not root:
            return None
        text = repr((self.context, name, sig, str(out_shardings), tuple(donate)))
        digest = hashlib.sha256(text.encode()).hexdigest()[:32]
        return Path(root) / "wsjax-executables" / f"{name.replace('/', '_')}-{digest}"

    @staticmethod
    def _load(path: Path, abstract_args, out_tree):
        meta = path.with_suffix(".json")
        if not meta.is_file():
            return None, None
        try:
            info = json.loads(meta.read_text())
            in_tree = jax.tree.structure((tuple(abstract_args), {}))
            payload = path.with_suffix(".bin").read_bytes()
            compiled = deserialize_and_load(payload, in_tree, out_tree(info.pop("num_outputs")))
        except Exception:  # stale, truncated or from another runtime: compile instead
            return None, None
        return compiled, info

    @staticmethod
    def _save(path: Path, compiled, out_tree, info: dict) -> None:
        n_out = len(jax.tree.leaves(compiled.out_info))
        if out_tree(n_out) != jax.tree.structure(compiled.out_info):
            return  # the rebuilt structure would not match: leave it to the XLA cache
        try:
            payload, _, _ = serialize(compiled)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".bin.tmp")
            tmp.write_bytes(payload)
            tmp.replace(path.with_suffix(".bin"))
            # written last: a .json names a complete .bin
            meta = json.dumps({**info, "num_outputs": n_out})
            path.with_suffix(".json.tmp").write_text(meta)
            path.with_suffix(".json.tmp").replace(path.with_suffix(".json"))
        except Exception:  # a backend that cannot serialize: the XLA cache still serves
            return

    def record(self, name: str) -> CompileRecord | None:
        for r in reversed(self.records):
            if r.name == name:
                return r
        return None

    @property
    def count(self) -> int:
        return len(self._compiled)

    @property
    def compile_seconds(self) -> float:
        return sum(r.seconds for r in self.records)


# JAX's persistent-cache events. An executable that XLA CPU restored from that cache serializes
# incompletely (it fails at run time: "Function ... not found"), so only an executable that JAX
# says it really compiled (the cache was asked and missed) is written to disk.
_ASKED, _HIT = (
    "/jax/compilation_cache/compile_requests_use_cache",
    "/jax/compilation_cache/cache_hits",
)
_CACHE_EVENTS: collections.Counter = collections.Counter()


def _count_cache_event(event: str, **_) -> None:
    if event in (_ASKED, _HIT):
        _CACHE_EVENTS[event] += 1


jax.monitoring.register_event_listener(_count_cache_event)


def _freshly_compiled(before: dict) -> bool:
    asked = _CACHE_EVENTS[_ASKED] > before.get(_ASKED, 0)
    hit = _CACHE_EVENTS[_HIT] > before.get(_HIT, 0)
    return asked and not hit


def _signature(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    sig = tuple(
        (tuple(a.shape), str(a.dtype), str(getattr(a, "sharding", None)))
        if hasattr(a, "shape")
        else repr(a)
        for a in leaves
    )
    return (str(treedef), sig)


def abstract(tree, sharding, dtype=None):
    """ShapeDtypeStructs of ``tree`` (arrays or structs) with ``sharding`` (and ``dtype``)."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=sharding), tree
    )

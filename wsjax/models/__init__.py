"""GPT model families as lists of segments: ``embed``, ``block`` x L (stacked), ``head``.

``get_model(model_cfg)`` returns a :class:`Model`. Parameters are plain nested dicts
``{"embed": ..., "blocks": ..., "head": ...}``; block parameters carry a leading layer axis so
layer ``i`` is ``tree_map(lambda a: a[i], params["blocks"])`` — the unit the engine streams.
"""

from __future__ import annotations

import math
from types import ModuleType

import jax
import jax.numpy as jnp

from wsjax.models import gpt2, gptj
from wsjax.models.head import head_apply, head_spec
from wsjax.models.init import make_initializer
from wsjax.models.spec import ParamSpec

FAMILIES: dict[str, ModuleType] = {"gptj": gptj, "gpt2": gpt2}
SEGMENTS = ("embed", "blocks", "head")


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


class Model:
    """A GPT model of one family: parameter shapes, init and the per-segment pure functions."""

    def __init__(self, cfg):
        if cfg.family not in FAMILIES:
            raise ValueError(f"unknown model family {cfg.family!r}; valid: {sorted(FAMILIES)}")
        self.cfg = cfg
        self._fam = FAMILIES[cfg.family]
        self.num_layers: int = cfg.num_hidden_layers
        self.tied: bool = bool(cfg.share_embedding_weights)
        self.compute_dtype = jnp.bfloat16 if cfg.mixed_precision else jnp.float32

    # ---- shapes and init -------------------------------------------------------------------
    def specs(self) -> dict:
        return {
            "embed": self._fam.embed_spec(self.cfg),
            "blocks": self._fam.block_spec(self.cfg),
            "head": head_spec(self.cfg),
        }

    def param_shapes(self, dtype=jnp.float32) -> dict:
        """``jax.ShapeDtypeStruct`` pytree (blocks with the leading layer axis); no allocation."""
        specs = self.specs()
        lead = {"embed": (), "blocks": (self.num_layers,), "head": ()}
        return {
            seg: jax.tree.map(
                lambda s, lead=lead[seg]: jax.ShapeDtypeStruct(lead + s.shape, dtype),
                specs[seg],
                is_leaf=_is_spec,
            )
            for seg in SEGMENTS
        }

    def num_params(self) -> int:
        return sum(math.prod(s.shape) for s in jax.tree.leaves(self.param_shapes()))

    def init(self, rng: jax.Array) -> dict:
        """fp32 parameters, initialised per the config's initializer specs."""
        cfg = self.cfg
        shapes = self.param_shapes()
        specs = self.specs()
        flat, treedef = jax.tree.flatten_with_path(specs, is_leaf=_is_spec)
        keys = jax.random.split(rng, len(flat))
        leaves = []
        for (path, spec), key in zip(flat, keys, strict=True):
            shape = _get(shapes, path).shape
            leaves.append(self._init_leaf(cfg, spec, key, shape))
        return jax.tree.unflatten(treedef, leaves)

    @staticmethod
    def _init_leaf(cfg, spec: ParamSpec, key, shape):
        if spec.init == "ones":
            return jnp.ones(shape, jnp.float32)
        if spec.init == "zeros":
            return jnp.zeros(shape, jnp.float32)
        init_spec = {
            "embedding": cfg.embedding_initializer,
            "kernel": cfg.initializer,
            "output": cfg.output_layer_initializer,
        }[spec.init]
        fan_in = spec.fan_in or shape[-1]
        fan_out = spec.fan_out or shape[-1]
        fn = make_initializer(
            init_spec,
            fan_in=fan_in,
            fan_out=fan_out,
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
        )
        return fn(key, shape, jnp.float32)

    # ---- segments (what the engine streams) ----------------------------------------------
    def embed_apply(self, p: dict, tokens: jax.Array, rng=None) -> jax.Array:
        """tokens (B, T) int -> x (B, T, D) in the compute dtype."""
        return self._fam.embed_apply(self.cfg, p, tokens, rng, self.compute_dtype)

    def block_apply(self, p: dict, x: jax.Array, rng=None) -> jax.Array:
        """One layer: (B, T, D) -> (B, T, D); ``p`` is one layer's slice of ``params["blocks"]``."""
        return self._fam.block_apply(self.cfg, p, x, rng)

    def head_apply(self, p: dict, x: jax.Array, wte=None) -> jax.Array:
        """(B, T, D) -> fp32 logits (B, T, V); ``wte`` is the embedding table when tied."""
        return head_apply(self.cfg, p, x, wte)

    # ---- whole model (resident) ------------------------------------------------------------
    def logits(self, params: dict, tokens: jax.Array, *, rng=None) -> jax.Array:
        """Resident forward over all layers with ``lax.scan`` over the stacked blocks.

        ``rng`` (dropout) is folded per segment exactly as the engine does: see ``segment_rng``.
        """
        dt = self.compute_dtype
        params = cast_params(params, dt)
        x = self.embed_apply(params["embed"], tokens, segment_rng(rng, 0))

        def body(x, layer):
            p, i = layer
            return self.block_apply(p, x, segment_rng(rng, i + 1)), None

        x, _ = jax.lax.scan(body, x, (params["blocks"], jnp.arange(self.num_layers)))
        wte = params["embed"]["wte"] if self.tied else None
        return self.head_apply(params["head"], x, wte)


def segment_rng(rng: jax.Array | None, segment: int | jax.Array) -> jax.Array | None:
    """The dropout key of segment ``segment`` (embed 0, block i -> i+1, head L+1)."""
    return None if rng is None else jax.random.fold_in(rng, segment)


def cast_params(params, dtype):
    """The compute-dtype copy of a parameter tree (the copy that is streamed)."""
    return jax.tree.map(lambda a: a.astype(dtype), params)


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def get_model(model_cfg) -> Model:
    return Model(model_cfg)

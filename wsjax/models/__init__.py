"""GPT model families as lists of segments: ``embed``, ``block`` x L (stacked), ``head``.

Families: gptj, gpt2, neox, and llama (Llama 1-3.2, Code Llama) with its variants mistral
(sliding window) and qwen2 (q / k / v biases), which share llama.py's modules.

A family is one file ``wsjax/models/<family>.py`` defining three flax NNX modules, each built as
``Module(cfg, rngs)``: ``Embed`` (tokens (B, T) -> x (B, T, D)), ``Block`` ((B, T, D) ->
(B, T, D)) and ``Head`` ((B, T, D) -> fp32 logits (B, T, V)). :class:`Model` splits each module
once into a graph definition and its parameter shapes; a segment is then the pure function
``merge(graphdef, params)(x)``, so the engine streams parameter trees and never sees a module.

Parameters are plain nested dicts ``{"embed": ..., "blocks": ..., "head": ...}`` named as the
modules' attributes (HF-like: ``wte``, ``ln_1``, ``attn.q_proj.kernel``, ``ln_f``; Llama:
``input_layernorm``, ``self_attn.k_proj``, ``mlp.gate_proj``, ``norm``, ``lm_head``); block
parameters carry a leading layer axis so layer ``i`` is ``tree_map(lambda a: a[i], blocks)``,
the unit the engine streams.
"""

from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp
from flax import nnx

from wsjax.config.schema import FAMILIES

SEGMENTS = ("embed", "blocks", "head")


def _params(module: nnx.Module) -> dict:
    """A module's parameters as the plain nested dict the engine and checkpoints hold."""
    return nnx.state(module, nnx.Param).to_pure_dict()


class Model:
    """A GPT model of one family: parameter shapes, init and the per-segment pure functions."""

    def __init__(self, cfg):
        if cfg.family not in FAMILIES:
            raise ValueError(f"unknown model family {cfg.family!r}; valid: {sorted(FAMILIES)}")
        family = importlib.import_module(f"wsjax.models.{cfg.family}")
        self.cfg = cfg
        self.num_layers: int = cfg.num_hidden_layers
        self.tied: bool = bool(cfg.share_embedding_weights)
        self.compute_dtype = jnp.bfloat16 if cfg.mixed_precision else jnp.float32
        self._modules = {"embed": family.Embed, "blocks": family.Block, "head": family.Head}
        self._graphdefs, self._shapes = {}, {}
        for seg, module in self._modules.items():  # shapes only: nothing is allocated
            abstract = nnx.eval_shape(lambda module=module: module(cfg, nnx.Rngs(0)))
            self._graphdefs[seg] = nnx.graphdef(abstract)
            self._shapes[seg] = _params(abstract)

    # ---- shapes and init -------------------------------------------------------------------
    def param_shapes(self, dtype=jnp.float32) -> dict:
        """``jax.ShapeDtypeStruct`` pytree (blocks with the leading layer axis); no allocation."""
        lead = {"embed": (), "blocks": (self.num_layers,), "head": ()}
        return {
            seg: jax.tree.map(
                lambda s, lead=lead[seg]: jax.ShapeDtypeStruct(lead + s.shape, dtype),
                self._shapes[seg],
            )
            for seg in SEGMENTS
        }

    def num_params(self) -> int:
        return sum(math.prod(s.shape) for s in jax.tree.leaves(self.param_shapes()))

    def init(self, rng: jax.Array, take=None) -> dict:
        """fp32 parameters from the config's initializers (jit it to build them in place).

        ``take`` (optional) maps a segment's parameters (one layer's for the blocks) to the
        part to keep, e.g. one process's slices: then the layers are built one at a time
        (``lax.map``), so the whole model never exists at once, and the values are those of
        the whole init's (each layer from its own key either way)."""
        keys = dict(zip(SEGMENTS, jax.random.split(rng, 3), strict=True))

        def build(seg: str, key: jax.Array) -> dict:
            return _params(self._modules[seg](self.cfg, nnx.Rngs(key)))

        layer_keys = jax.random.split(keys["blocks"], self.num_layers)
        if take is None:
            return {
                "embed": build("embed", keys["embed"]),
                "blocks": jax.vmap(lambda k: build("blocks", k))(layer_keys),  # (L, ...) leaves
                "head": build("head", keys["head"]),
            }
        return {
            "embed": take(build("embed", keys["embed"])),
            "blocks": jax.lax.map(lambda k: take(build("blocks", k)), layer_keys),
            "head": take(build("head", keys["head"])),
        }

    def init_segment(self, rng: jax.Array, seg: str, layer=0) -> dict:
        """One segment's fp32 parameters, bitwise those :meth:`init` gives it: ``seg`` is
        "embed", "head" or "blocks" (then layer ``layer``, which may be traced), so a disk-tier
        engine builds the model one segment at a time."""
        keys = dict(zip(SEGMENTS, jax.random.split(rng, 3), strict=True))
        key = keys[seg]
        if seg == "blocks":
            key = jax.random.split(key, self.num_layers)[layer]
        return _params(self._modules[seg](self.cfg, nnx.Rngs(key)))

    # ---- segments (what the engine streams) ----------------------------------------------
    def embed_apply(self, p: dict, tokens: jax.Array, rng=None) -> jax.Array:
        """tokens (B, T) int -> x (B, T, D) in the compute dtype."""
        x = nnx.merge(self._graphdefs["embed"], p)(tokens, rng)
        return x.astype(self.compute_dtype)

    def block_apply(self, p: dict, x: jax.Array, rng=None) -> jax.Array:
        """One layer: (B, T, D) -> (B, T, D); ``p`` is one layer's slice of ``params["blocks"]``."""
        return nnx.merge(self._graphdefs["blocks"], p)(x, rng)

    def embed_decode(self, p: dict, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """tokens (B, T) at ``positions`` (B, T) -> x (B, T, D): the decode path's embed."""
        x = nnx.merge(self._graphdefs["embed"], p)(tokens, None, positions)
        return x.astype(self.compute_dtype)

    def block_decode(self, p: dict, x: jax.Array, cache):
        """One layer over a ``KVCache``: (B, T, D) -> ((B, T, D), the cache with T more)."""
        return nnx.merge(self._graphdefs["blocks"], p)(x, None, cache)

    def head_apply(self, p: dict, x: jax.Array, wte=None) -> jax.Array:
        """(B, T, D) -> fp32 logits (B, T, V); ``wte`` is the embedding table when tied."""
        return nnx.merge(self._graphdefs["head"], p)(x, wte)

    # ---- whole model (resident) ------------------------------------------------------------
    def logits(self, params: dict, tokens: jax.Array, *, rng=None) -> jax.Array:
        """Resident forward over all layers with ``lax.scan`` over the stacked blocks.

        ``rng`` (dropout) is folded per segment exactly as the engine does: see ``segment_rng``.
        """
        params = cast_params(params, self.compute_dtype)
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


def get_model(model_cfg) -> Model:
    return Model(model_cfg)

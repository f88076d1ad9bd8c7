"""Qwen2: the Llama block (wsjax.models.llama) with biases on the q, k and v projections (not
on o_proj), as HF's Qwen2Attention; its defaults are in wsjax.config.schema.FAMILY_DEFAULTS."""

from __future__ import annotations

from wsjax.models.llama import Block, Embed, Head

__all__ = ["Embed", "Block", "Head"]

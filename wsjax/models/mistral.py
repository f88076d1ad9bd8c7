"""Mistral: the Llama block (wsjax.models.llama) with grouped-query attention and, when the
config sets ``attention_sliding_window_length``, a sliding window: each query attends to itself
and the window - 1 tokens before it, in training and in the KV-cache decode alike."""

from __future__ import annotations

from wsjax.models.llama import Block, Embed, Head

__all__ = ["Embed", "Block", "Head"]

"""The pure functions of one streamed step, built from a model and an optimizer: a segment's
forward, its backward (recomputed from the kept input, or from kept residuals), the head's loss
and gradients, and the optimizer update. :mod:`wsjax.engine.executables` compiles each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import optax

from wsjax.losses import token_correct_sum, token_loss_sum
from wsjax.models import segment_rng
from wsjax.optim import sq_norm

# With ``streaming.recompute: false`` the block forward keeps every residual its backward needs
# (no recompute at all), at many times the kept bytes of recompute. A policy
# (``streaming.recompute_policy``) trades between the two: the forward keeps what it saves
# (e.g. the matmul outputs), the backward recomputes the rest (the cheap elementwise ops).
SAVE_POLICIES = {
    "none": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def dropout_key(step_key: jax.Array, index: jax.Array) -> jax.Array:
    """Dropout key of (micro-batch, segment) = index[0], index[1] under this step's key."""
    return segment_rng(jax.random.fold_in(step_key, index[0]), index[1])


def _accumulate(acc, grads):
    return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads)


@dataclass(frozen=True)
class ResidualLayout:
    """How a block's VJP closure is rebuilt: its tree structure and, per leaf, the index of the
    block weight it is (supplied again by the backward) or -1 (a kept residual)."""

    treedef: Any
    weight_positions: tuple[int, ...]


class SegmentFunctions:
    """The pure functions of one streamed step, built from a model and an optimizer."""

    def __init__(
        self,
        model,
        optimizer: optax.GradientTransformation | None,
        compute_dtype,
        recompute_policy: str = "none",
    ):
        self.model = model
        self.save_policy = SAVE_POLICIES[recompute_policy]
        self.optimizer = optimizer
        self.compute_dtype = compute_dtype
        self.dropout = any(
            getattr(model.cfg, k) > 0
            for k in ("embedding_dropout_rate", "attention_dropout_rate", "residual_dropout_rate")
        )

    def _rng(self, step_key, index, train: bool):
        return dropout_key(step_key, index) if (train and self.dropout) else None

    def embed_fwd(self, w, tokens, step_key, index, train=True):
        return self.model.embed_apply(w, tokens, self._rng(step_key, index, train))

    def block_fwd(self, w, x, step_key, index, train=True):
        return self.model.block_apply(w, x, self._rng(step_key, index, train))

    def _block_vjp(self, w, x, step_key, index):
        """(y, VJP leaves, their ResidualLayout) of one block's forward."""
        rng = self._rng(step_key, index, True)
        fn = lambda w, x: self.model.block_apply(w, x, rng)
        if self.save_policy is not None:
            fn = jax.checkpoint(fn, policy=self.save_policy)
        y, vjp = jax.vjp(fn, w, x)
        leaves, treedef = jax.tree.flatten(vjp)
        weight_pos = {id(t): i for i, t in enumerate(jax.tree.leaves(w))}
        positions = tuple(weight_pos.get(id(leaf), -1) for leaf in leaves)
        return y, leaves, ResidualLayout(treedef, positions)

    def block_fwd_save(self, w, x, step_key, index):
        """Block forward that also returns the residuals its backward needs (weights excluded:
        the backward gets them again, so no weight copy is kept per layer)."""
        y, leaves, layout = self._block_vjp(w, x, step_key, index)
        return y, [leaf for leaf, pos in zip(leaves, layout.weight_positions) if pos < 0]

    def residual_layout(self, w, x, step_key, index) -> ResidualLayout:
        """The layout of :meth:`block_fwd_save`'s residuals, from one abstract trace."""
        layouts = []

        def trace(w, x, step_key, index):
            y, _, layout = self._block_vjp(w, x, step_key, index)
            layouts.append(layout)  # static data of this trace, returned below
            return y

        jax.eval_shape(trace, w, x, step_key, index)
        return layouts[0]

    def block_bwd_saved(self, layout: ResidualLayout, w, residuals, dy, g_acc):
        """Backward from the residuals of :meth:`block_fwd_save`."""
        weights, rest = jax.tree.leaves(w), iter(residuals)
        leaves = [weights[p] if p >= 0 else next(rest) for p in layout.weight_positions]
        dw, dx = jax.tree.unflatten(layout.treedef, leaves)(dy)
        g_acc = _accumulate(g_acc, dw)
        return dx, g_acc, sq_norm(g_acc)

    def block_bwd(self, w, x, dy, step_key, index, g_acc):
        """Recompute the block forward from its kept input (same dropout key), then VJP."""
        rng = self._rng(step_key, index, True)
        _, vjp = jax.vjp(lambda w, x: self.model.block_apply(w, x, rng), w, x)
        dw, dx = vjp(dy)
        g_acc = _accumulate(g_acc, dw)
        return dx, g_acc, sq_norm(g_acc)

    def head_train(self, w, wte, x, labels, mask, denom, g_acc, g_wte):
        """Loss of one micro-batch (as a share of the global batch) and its gradients."""

        def loss_fn(w, wte, x):
            logits = self.model.head_apply(w, x, wte)  # (b, T, V)
            loss_sum, _ = token_loss_sum(logits, labels, mask)
            return loss_sum / denom, loss_sum

        (_, loss_sum), (dw, dwte, dx) = jax.value_and_grad(
            loss_fn, argnums=(0, 1, 2), has_aux=True
        )(w, wte, x)
        g_acc = _accumulate(g_acc, dw)
        if g_wte is not None:
            g_wte = g_wte + dwte.astype(g_wte.dtype)
        return loss_sum, dx, g_acc, g_wte, sq_norm(g_acc)

    def head_eval(self, w, wte, x, labels, mask):
        logits = self.model.head_apply(w, x, wte)
        loss_sum, count = token_loss_sum(logits, labels, mask)
        return loss_sum, count, token_correct_sum(logits, labels, mask)

    def embed_bwd(self, w, tokens, dx, step_key, index, g_acc):
        rng = self._rng(step_key, index, True)
        _, vjp = jax.vjp(lambda w: self.model.embed_apply(w, tokens, rng), w)
        (dw,) = vjp(dx)
        g_acc = _accumulate(g_acc, dw)
        return g_acc, sq_norm(g_acc)

    def update(self, master, opt_state, grads, scale):
        """Clip-scale the gradients, apply the optax update; also emit the streaming copy."""
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        updates, opt_state = self.optimizer.update(grads, opt_state, master)
        master = optax.apply_updates(master, updates)
        stream = jax.tree.map(lambda a: a.astype(self.compute_dtype), master)
        return master, opt_state, stream

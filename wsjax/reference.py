"""The plain resident training step: the yardstick the streaming engine is measured against.

All parameters and optimizer state live on the device; one ``jax.value_and_grad`` over the
whole tree, then the optax chain (global-norm clipping + the configured optimizer). It is kept
deliberately obvious: no streaming, no micro-batching, no tricks.

Dropout keys follow the engine's scheme: ``fold_in(fold_in(step_key, micro_batch), segment)``;
the reference always runs the whole batch as micro-batch 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from wsjax.losses import loss_normalizer, token_correct_sum, token_loss_sum
from wsjax.optim import make_optimizer_with_clipping


class ReferenceState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    step: jax.Array


def step_key(seed: int, step: int | jax.Array) -> jax.Array:
    """The dropout key of training step ``step``: the one function reference and engine share."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)


class ResidentTrainer:
    """Resident train/eval steps for ``model`` with the optimizer of ``opt_cfg``."""

    def __init__(self, model, opt_cfg, *, seed: int = 0, dropout: bool = True):
        self.model = model
        self.optimizer = make_optimizer_with_clipping(opt_cfg)
        self.seed = seed
        self.dropout = dropout
        self.train_step = jax.jit(self._train_step, donate_argnums=(0,))
        self.eval_step = jax.jit(self._eval_step)
        self.grad_fn = jax.jit(jax.value_and_grad(self._loss))

    def init_state(self, params: dict) -> ReferenceState:
        return ReferenceState(params, self.optimizer.init(params), jnp.zeros((), jnp.int32))

    def _loss(self, params: dict, batch: dict, rng) -> jax.Array:
        logits = self.model.logits(params, batch["input_ids"], rng=rng)  # (B, T, V)
        loss_sum, _ = token_loss_sum(logits, batch["labels"], batch["loss_mask"])
        return loss_sum / loss_normalizer(self.model.cfg, batch["loss_mask"])

    def _train_step(self, state: ReferenceState, batch: dict):
        rng = jax.random.fold_in(step_key(self.seed, state.step), 0) if self.dropout else None
        loss, grads = jax.value_and_grad(self._loss)(state.params, batch, rng)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        return ReferenceState(params, opt_state, state.step + 1), metrics

    def _eval_step(self, params: dict, batch: dict) -> dict:
        logits = self.model.logits(params, batch["input_ids"])
        loss_sum, count = token_loss_sum(logits, batch["labels"], batch["loss_mask"])
        correct = token_correct_sum(logits, batch["labels"], batch["loss_mask"])
        return {"loss_sum": loss_sum, "count": count, "correct": correct}

"""Seeded random tokens (``SyntheticDataProcessor``): for benchmarks, no files needed.

Example i is ``default_rng([seed, i]).integers(0, vocab_size, T + 1)`` shifted into
input_ids / labels, so any batch is reproducible on its own, in any order, on any machine.
"""

from __future__ import annotations

import numpy as np

NUM_EXAMPLES = 1 << 40  # effectively endless; the loader never shuffles a synthetic source


class SyntheticSource:
    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.num_examples = NUM_EXAMPLES
        self.name = f"synthetic tokens (vocab {vocab_size}, seed {seed})"

    def too_small(self, batch_size: int) -> str:  # pragma: no cover - never too small
        return f"{self.name}: fewer than {batch_size} examples"

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        T = self.seq_len
        w = np.empty((len(indices), T + 1), dtype=np.int32)  # (B, T+1)
        for row, i in enumerate(indices):
            w[row] = np.random.default_rng([self.seed, int(i)]).integers(0, self.vocab_size, T + 1)
        return {
            "input_ids": w[:, :-1],
            "labels": w[:, 1:],
            "loss_mask": np.ones((len(indices), T), dtype=np.float32),
        }

    def close(self) -> None:
        pass

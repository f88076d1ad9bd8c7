"""Run by tests/integration/test_scaleout.py, once per process (``python -m wsjax.launch
--module``) or alone: a few engine steps on fixed batches; writes what each process measured
as JSON.

    python tests/integration/scaleout_probe.py OUT_DIR STEPS [f64]

``f64``: jax_enable_x64 and a float64 model, as the engine's exactness tests compare.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import jax
import numpy as np

from wsjax import distributed


def main(out: Path, steps: int, f64: bool) -> None:
    distributed.initialize()  # from the launcher's environment; nothing with one process
    if f64:
        jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: tests.helpers
    from jax.experimental import multihost_utils

    from tests.helpers import small_config
    from wsjax.engine import StreamingEngine
    from wsjax.models import get_model
    from wsjax.trainer.setup import process_rows_of

    # micro-batching on, so the rows of a process are spread over two micro-batches
    config = small_config("streaming.micro_batch_size=4", "train_input.batch_size=8")
    model = get_model(config.model)
    params = None
    if f64:
        import jax.numpy as jnp

        model.compute_dtype = jnp.float64  # the segment protocol's compute dtype
        params = jax.tree.map(lambda a: np.asarray(a, np.float64), model.init(jax.random.key(0)))
    engine = StreamingEngine(model, config, params=params)
    rows = process_rows_of(config, 8, train=True)
    rng = np.random.default_rng(0)
    losses, norms = [], []
    for _ in range(steps):
        ids = rng.integers(0, 512, (8, 33)).astype(np.int32)
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": np.ones((8, 32))}
        batch["loss_mask"][0, :5] = 0.0  # an uneven mask: the denominator sums over processes
        if rows is not None:
            batch = {k: v[rows] for k, v in batch.items()}
        m = engine.train_step(batch)
        losses.append(m["train/loss"])
        norms.append(m["train/grad_norm"])
    gc.collect()
    host_bytes = sum(a.nbytes for a in jax.live_arrays())  # what this process really holds
    params = engine.params_tree()
    if jax.process_count() > 1:  # whole arrays, gathered (a tiny model)
        params = multihost_utils.process_allgather(params, tiled=True)
    index = jax.process_index()
    if index == 0:
        flat = {
            jax.tree_util.keystr(p): np.asarray(a)
            for p, a in jax.tree_util.tree_flatten_with_path(params)[0]
        }
        np.savez(out / "params.npz", **flat)
    record = {"losses": losses, "grad_norms": norms, "host_bytes": host_bytes}
    (out / f"process{index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] == ["f64"])

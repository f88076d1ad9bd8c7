"""How far a training run goes: ``runconfig.max_steps``, or ``runconfig.num_epochs`` of the
train data.

``num_epochs`` (Cerebras runconfig) counts passes over train_input: an epoch is the loader's
batches per epoch, ``num_examples // batch_size`` (the last partial batch is dropped), so it
sets ``max_steps = num_epochs x batches per epoch``; with ``max_steps`` given as well, the
smaller of the two, as on Cerebras. The step is global and counted from 0, like ``max_steps``:
a run resumed from its model_dir trains to the same step. (Cerebras counts the epochs from the
step the run starts at; ``--steps N`` is that here.) The size comes from the data itself (token
shards, HDF5 and TFRecord files all count their examples when opened); the endless synthetic
source has none, and is refused in one line.
"""

from __future__ import annotations

import dataclasses
import logging

from wsjax.data.loader import make_source
from wsjax.errors import ConfigError, DataError

log = logging.getLogger("wsjax.train")


def replace_max_steps(config, max_steps: int):
    rc = dataclasses.replace(config.runconfig, max_steps=max_steps)
    return dataclasses.replace(config, runconfig=rc)


def batches_per_epoch(config) -> int:
    """Global batches in one pass over train_input (its examples // batch_size)."""
    inp = config.train_input
    if inp.data_processor == "SyntheticDataProcessor":
        raise ConfigError(
            f"{config.source}: runconfig.num_epochs={config.runconfig.num_epochs} needs data of "
            "a known size, but SyntheticDataProcessor is endless; give runconfig.max_steps "
            "instead (the steps to train)"
        )
    source = make_source(
        inp, split="train", model_vocab_size=config.model.vocab_size, seed=config.runconfig.seed
    )
    try:
        batches = source.num_examples // int(inp.batch_size)
        if batches == 0:
            raise DataError(source.too_small(int(inp.batch_size)))
        return batches
    finally:
        source.close()


def with_epochs(config):
    """``config`` with ``max_steps`` set from ``runconfig.num_epochs`` (unchanged without it)."""
    rc = config.runconfig
    if rc.num_epochs is None:
        return config
    per_epoch = batches_per_epoch(config)
    steps = rc.num_epochs * per_epoch
    capped = rc.max_steps is not None and rc.max_steps < steps
    log.info(
        "runconfig.num_epochs=%d of %d steps each (train_input.batch_size %d): max_steps %d%s",
        rc.num_epochs,
        per_epoch,
        config.train_input.batch_size,
        rc.max_steps if capped else steps,
        f" (runconfig.max_steps; the epochs end at step {steps})" if capped else "",
    )
    return replace_max_steps(config, rc.max_steps if capped else steps)

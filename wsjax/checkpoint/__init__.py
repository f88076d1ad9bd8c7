"""Checkpoints: orbax ``model-ckpt-<step>`` folders with crc32c digests, written by one process or
several, and where a run starts (a checkpoint, a model_dir or a HuggingFace folder).

    checkpoints   the Checkpoints of one model_dir: save, prune, restore, newest good
    digest        crc32c digests of every array (one process, or each process's blocks)
    shards        what several processes share: barriers and restore targets
    start         StartState: a run's start from an orbax checkpoint or model_dir
"""

from wsjax.checkpoint.checkpoints import PREFIX, Checkpoints, check_shapes
from wsjax.checkpoint.digest import CorruptCheckpoint
from wsjax.checkpoint.start import StartState, restore_newest_good, run_model_dir

__all__ = [
    "PREFIX",
    "Checkpoints",
    "CorruptCheckpoint",
    "StartState",
    "check_shapes",
    "restore_newest_good",
    "run_model_dir",
]

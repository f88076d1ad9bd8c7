"""The weight-streaming engine (model-agnostic: it streams segments).

Public API: :class:`StreamingEngine` (``train=False``: eval only), :func:`default_mesh`,
:func:`make_plan`. Read a training step in three files:
``engine.py`` (builds the parts), ``step.py`` (the stream order and driver),
``executables.py`` (the compiled functions); ``placement.py`` says where things live.
"""

from wsjax.engine.engine import StreamingEngine, default_mesh
from wsjax.engine.plan import MemoryPlan, make_plan

__all__ = ["MemoryPlan", "StreamingEngine", "default_mesh", "make_plan"]

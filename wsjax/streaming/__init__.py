"""The weight-streaming engine (model-agnostic: it streams segments).

Public API: :class:`StreamingEngine`, :func:`default_mesh`, :func:`make_plan`.
"""

from wsjax.streaming.engine import StreamingEngine, default_mesh, num_micro_batches
from wsjax.streaming.plan import MemoryPlan, make_plan

__all__ = ["MemoryPlan", "StreamingEngine", "default_mesh", "make_plan", "num_micro_batches"]

"""Runtime: optimizer hooks, plan-owned geometry state, backend dispatch."""
from .backends import BACKENDS, EagerBackend, select_backend
from .fastpath import Backend, WorkItem
from .hooks import Installation

__all__ = ["BACKENDS", "Backend", "EagerBackend", "WorkItem", "select_backend", "Installation"]

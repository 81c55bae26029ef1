"""Runtime: optimizer hooks, geometry state in the optimizer, backend dispatch."""
from .backends import BACKENDS, Backend, EagerBackend, select_backend
from .hooks import Installation

__all__ = ["BACKENDS", "Backend", "EagerBackend", "select_backend", "Installation"]

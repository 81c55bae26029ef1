"""Geometries: one module per paper, registered by name in REGISTRY (drives policies and tests)."""
from .base import REGISTRY, STAGES, Geometry, Option, StepContext, Unit, register
from . import channel_directed, gspace, pom, psi, spectral  # noqa: F401  (registration)

__all__ = ["REGISTRY", "STAGES", "Geometry", "Option", "StepContext", "Unit", "register", "get"]


def get(name: str) -> type[Geometry]:
    from difflib import get_close_matches
    from ..errors import GeomCompileError
    try:
        return REGISTRY[name]
    except KeyError:
        close = get_close_matches(name, list(REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise GeomCompileError(f"unknown geometry {name!r}{hint} (known: {', '.join(sorted(REGISTRY))})") from None

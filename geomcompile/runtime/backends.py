"""Backend dispatch: the one place where fast implementations plug in.

A backend runs a list of *work items* — (geometry, unit) pairs in stage order — before and after
the base optimizer's step. The eager backend calls each geometry's reference program. A later
Triton / torch.compile backend registers itself in BACKENDS and receives the same work list, so
the analysis, policy and plan code never change when kernels are added.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import GeomCompileError
from ..geometries.base import Geometry, StepContext, Unit


@dataclass(frozen=True)
class WorkItem:
    geometry: Geometry
    unit: Unit


class Backend:
    name = "base"

    def pre_step(self, items: list[WorkItem], states: Callable[[WorkItem], dict], ctx: StepContext) -> None:
        raise NotImplementedError

    def post_step(self, items: list[WorkItem], states: Callable[[WorkItem], dict], ctx: StepContext) -> None:
        raise NotImplementedError


class EagerBackend(Backend):
    """The reference: each geometry's own pre_step/post_step, one unit at a time."""

    name = "eager"

    def pre_step(self, items, states, ctx):
        for item in items:
            grads = [ctx.params[n].grad for n in item.unit.names]
            if all(g is None for g in grads):
                continue
            item.geometry.pre_step(item.unit, grads, states(item), ctx)

    def post_step(self, items, states, ctx):
        with torch.no_grad():
            for item in items:
                item.geometry.post_step(item.unit, states(item), ctx)


BACKENDS: dict[str, type[Backend]] = {"eager": EagerBackend}
KNOWN = ("auto", "eager", "triton", "compile")


def select_backend(name: str, params: list[torch.Tensor]) -> tuple[Backend, list[str]]:
    """Resolve a backend name to an instance, with report lines for every fallback taken."""
    if name not in KNOWN:
        raise GeomCompileError(f"unknown backend {name!r}; use one of {', '.join(KNOWN)}")
    if name == "auto":
        on_cuda = any(p.is_cuda for p in params)
        note = ("backend auto -> eager (no fused kernels available yet for CUDA parameters)" if on_cuda
                else "backend auto -> eager (parameters on CPU)")
        return EagerBackend(), [note]
    if name not in BACKENDS:
        raise GeomCompileError(f"backend {name!r} is not available yet in this version of geomcompile; "
                               f"use backend='eager' (or 'auto')")
    return BACKENDS[name](), []

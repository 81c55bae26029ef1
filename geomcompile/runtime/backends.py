"""Backend dispatch: the one place where fast implementations plug in.

A backend runs a list of *work items* — (geometry, unit) pairs in stage order — before and after
the base optimizer's step. The eager backend calls each geometry's reference program. The Triton
backend (triton_backend.py, docs/triton.md) and the torch.compile backend register themselves in
BACKENDS and receive the same work list, so the analysis, policy and plan code never change when
kernels are added. "auto" picks Triton for CUDA parameters when it works there, eager otherwise, and
says why in a note.
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

    def describe(self, items: list[WorkItem], ctx: StepContext) -> list[str]:
        """Report lines for plan.summary(): what runs how, and every fallback taken."""
        return []


def stage_items(items: list[WorkItem], stage: str):
    """The items of one stage (penalty, metric or manifold), in order."""
    return (item for item in items if item.geometry.stage == stage)


def stage_items_with_grads(items: list[WorkItem], stage: str, ctx: StepContext):
    """(item, grads) for the items of one stage where at least one parameter has a gradient."""
    for item in stage_items(items, stage):
        grads = [ctx.params[n].grad for n in item.unit.names]
        if any(g is not None for g in grads):
            yield item, grads


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

# Registered at import; triton itself and the kernels are imported only when the backend is used.
from .triton_backend import TritonBackend  # noqa: E402  (needs Backend and WorkItem above)
BACKENDS["triton"] = TritonBackend
from .compile_backend import CompileBackend  # noqa: E402  (torch.compile runs only when the backend steps)
BACKENDS["compile"] = CompileBackend
KNOWN = ("auto", "eager", "triton", "compile")


def select_backend(name: str, params: list[torch.Tensor]) -> tuple[Backend, list[str]]:
    """Resolve a backend name to an instance, with report lines for every fallback taken."""
    if name not in KNOWN:
        raise GeomCompileError(f"unknown backend {name!r}; use one of {', '.join(KNOWN)}")
    if name == "auto":
        cuda = [p for p in params if p.is_cuda]
        if not cuda:
            return EagerBackend(), ["backend auto -> eager (parameters on CPU)"]
        from .triton_backend import self_test, triton_problem
        problem = triton_problem(cuda)
        if problem is None and (failure := self_test(str(cuda[0].device))):
            problem = f"the Triton self-test failed on {cuda[0].device}: {failure}"
        if problem is None:
            return BACKENDS["triton"](), ["backend auto -> triton (CUDA parameters)"]
        return EagerBackend(), [f"backend auto -> eager for CUDA parameters: {problem}"]
    if name == "triton":
        from .triton_backend import triton_problem
        problem = triton_problem(params)
        if problem:
            raise GeomCompileError(f"backend 'triton' cannot run here: {problem}")
    if name not in BACKENDS:
        raise GeomCompileError(f"backend {name!r} is not available yet in this version of geomcompile; "
                               f"use backend='eager' (or 'auto')")
    return BACKENDS[name](), []

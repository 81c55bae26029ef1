"""The one interface between backends and the geometries' fast paths.

A backend runs a list of *work items* — (geometry, unit) pairs in stage order — before and after
the base optimizer's step. It never asks which geometry it runs: a geometry declares its fast
paths next to itself (``Geometry.fast_paths``: backend name -> "module:attribute", imported only
when that backend runs), and ``fast_path(geometry, backend)`` finds them. A geometry without one
runs its eager program (``pre_step`` / ``post_step``) in its stage's turn.

What a fast path provides depends on the backend (each backend's module documents its protocol:
``compile_backend.Program``, ``triton_backend.KernelFamily``). Every fast path is tested against
the geometry's eager program by the registry in ``tests/registry.py``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from ..geometries.base import Geometry, Rescale, StepContext, Unit


@dataclass(frozen=True)
class WorkItem:
    geometry: Geometry
    unit: Unit


class Backend:
    name = "base"

    def pre_step(self, items: list[WorkItem], states: Callable[[WorkItem], dict], ctx: StepContext) -> None:
        raise NotImplementedError

    def post_step(self, items: list[WorkItem], states: Callable[[WorkItem], dict],
                  ctx: StepContext) -> list[Rescale]:
        """Retractions; returns the Rescale events of those that preserve the function."""
        raise NotImplementedError

    def describe(self, items: list[WorkItem], ctx: StepContext) -> list[str]:
        """Report lines for plan.summary(): what runs how, and every fallback taken."""
        return []


@lru_cache(maxsize=None)
def _load(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)()


def fast_path(geometry: Geometry, backend: str):
    """The geometry's fast path for a backend (an instance, shared), or None. A fast path with a
    ``for_geometry(geometry)`` method hands each configuration of its geometry to the object that
    runs it (pom's kernels hand Stiefel components and feature_std to a batched torch program)."""
    path = type(geometry).fast_paths.get(backend)
    if not path:
        return None
    found = _load(path)
    choose = getattr(found, "for_geometry", None)
    return found if choose is None else choose(geometry)


def stage_items(items: list[WorkItem], stage: str):
    """The items of one stage (penalty, metric or manifold), in order."""
    return (item for item in items if item.geometry.stage == stage)


def unit_grads(item: WorkItem, ctx: StepContext) -> list[torch.Tensor | None]:
    return [ctx.params[n].grad for n in item.unit.names]


def stage_items_with_grads(items: list[WorkItem], stage: str, ctx: StepContext):
    """(item, grads) for the items of one stage where at least one parameter has a gradient."""
    for item in stage_items(items, stage):
        grads = unit_grads(item, ctx)
        if any(g is not None for g in grads):
            yield item, grads


def runs_on_local_shards(item: WorkItem, ctx: StepContext) -> bool:
    """Whether a fast path may run this unit: no parameter of it is sharded, or every sharded one is in
    a layout whose update needs no other rank's rows (Geometry.shard_local); else the geometry's eager
    sharded program runs it (runtime/distributed.py)."""
    return all(ctx.shard(name) is None or item.geometry.shard_local(facts)
               for name, facts in zip(item.unit.names, item.unit.facts))


def eager_post_step(item: WorkItem, states, ctx: StepContext) -> list[Rescale]:
    """The geometry's reference post_step for a unit that took part in the step."""
    if not any(ctx.has_grad(n) for n in item.unit.names):
        return []
    return list(item.geometry.post_step(item.unit, states(item), ctx) or [])

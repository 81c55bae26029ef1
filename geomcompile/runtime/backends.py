"""Backend dispatch: eager (the reference), triton and compile, and the choice behind "auto".

"auto" picks Triton for CUDA parameters when it works there, eager otherwise, and says why in a
note. The fast backends find each geometry's fast path through ``fastpath.fast_path``; the
analysis, policy and plan code never change when kernels are added.
"""
from __future__ import annotations

import torch

from ..errors import GeomCompileError
from .compile_backend import CompileBackend
from .fastpath import Backend, WorkItem, eager_post_step, unit_grads
from .triton_backend import TritonBackend


class EagerBackend(Backend):
    """The reference: each geometry's own pre_step/post_step, one unit at a time.

    Sharded programs (FSDP2 parameters, runtime/distributed.py) that the units queue run together at
    the end of each stage (the items come sorted by stage), their collectives batched; a stage sees
    the gradients the earlier stages left, as unsharded."""

    name = "eager"

    def pre_step(self, items, states, ctx):
        for item in _flushing_at_stage_ends(items, ctx):
            grads = unit_grads(item, ctx)
            if any(g is not None for g in grads):
                item.geometry.pre_step(item.unit, grads, states(item), ctx)
        ctx.run_queued()

    def post_step(self, items, states, ctx):
        rescales = []
        for item in _flushing_at_stage_ends(items, ctx, rescales):
            rescales += eager_post_step(item, states, ctx)
        return rescales + ctx.run_queued()


def _flushing_at_stage_ends(items, ctx, events: list | None = None):
    """The items in order; before the first item of a new stage, the queued sharded programs of the
    previous one run (their Rescale events appended to `events`)."""
    stage = None
    for item in items:
        if item.geometry.stage != stage:
            done = ctx.run_queued()
            if events is not None:
                events += done
            stage = item.geometry.stage
        yield item


BACKENDS: dict[str, type[Backend]] = {"eager": EagerBackend, "triton": TritonBackend, "compile": CompileBackend}
KNOWN = ("auto", *BACKENDS)


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
            return TritonBackend(), ["backend auto -> triton (CUDA parameters)"]
        return EagerBackend(), [f"backend auto -> eager for CUDA parameters: {problem}"]
    if name == "triton":
        from .triton_backend import triton_problem
        problem = triton_problem(params)
        if problem:
            raise GeomCompileError(f"backend 'triton' cannot run here: {problem}")
    return BACKENDS[name](), []

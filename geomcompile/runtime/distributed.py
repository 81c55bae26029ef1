"""Sharded parameters: what a geometry's program needs to compute the full-tensor update on a shard.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps every parameter as a ``DTensor`` sharded on
dim 0 (``Shard(0)``, torch.chunk's split: ranks get ceil(n/world) rows until the rows run out, so
a rank may hold zero rows). A geometry's math often couples rows (a mean over output channels, a
norm of a group of rows, a convolution's operator), so its program on a shard needs a few
collectives. ``ShardInfo`` is the one object that offers them, geometry-agnostic: the runtime
builds one per sharded parameter at install (``StepContext.shards``) and never asks which
geometry runs; each geometry's program calls ``ctx.shard(name)`` and, when it is not None, hands
the runtime a *sharded program* for the local shard (``local(tensor)``): a generator that yields
a ``Collective`` request wherever it needs one and receives the answer,

    sums = yield shard.sum(partial_sums)            # the elementwise sum over ranks
    pieces = yield shard.gather(block)              # every rank's block, stacked in rank order
    before, total = yield from shard.exclusive_scan(block)

and queues it with ``ctx.run_sharded(program)``. The runtime runs all programs queued in one
stage of a step together, in lock-step rounds (``run_together``): each round, every waiting
program's request is answered at once, with ONE all-reduce for all the sums and ONE all-gather for
all the gathers (per process group, dtype and device), not one per parameter. Outside a step
(install) ``run_now`` answers a program's requests one by one.

Every rank runs the same programs in the same order and yields the same requests (same shapes) in
the same rounds: the decisions a program takes before a request (renormalise or not, stop
iterating) must come from replicated values, never from the local shard alone.

Only ``Shard(0)`` on a one-dimensional mesh is supported; any other placement (``Replicate``,
hybrid sharding's 2-d mesh, ``Shard(1)``) is refused at install with the parameter's name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import GeomCompileError


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:          # a torch built without distributed
        return None
    return DTensor


_DTENSOR = _dtensor_type()


def is_sharded(t) -> bool:
    """Whether `t` is a DTensor (FSDP2's parameters, their gradients and optimizer state)."""
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (same storage: writes go to the parameter), or `t` itself."""
    if not is_sharded(t):
        return t
    with torch.no_grad():
        return t.to_local()


@dataclass(frozen=True)
class Collective:
    """A sharded program's request (see the module docstring): kind "sum" (all-reduce) or "gather"
    (all-gather, answered stacked in rank order) of `tensor` over the ranks of `group`."""

    kind: str
    tensor: torch.Tensor
    group: object
    world: int


# The two collectives the runtime issues for sharded programs (module-level so a test can count them).
def _all_reduce(flat: torch.Tensor, group) -> None:
    import torch.distributed as dist
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)


def _all_gather(flat: torch.Tensor, group, world: int) -> torch.Tensor:
    import torch.distributed as dist
    pieces = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(pieces, flat, group=group)
    return torch.stack(pieces)


def _answer(requests: list[Collective]) -> list[torch.Tensor]:
    """The answers to one round's requests: per (kind, process group, dtype, device), in the order of
    first appearance (the same on every rank), the tensors flattened into one buffer and sent in one
    collective, then split back."""
    batches: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        batches.setdefault((r.kind, id(r.group), r.tensor.dtype, r.tensor.device), []).append(i)
    answers: list = [None] * len(requests)
    for (kind, _, _, _), members in batches.items():
        tensors = [requests[i].tensor for i in members]
        sizes = [t.numel() for t in tensors]
        flat = torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1).clone()
        first = requests[members[0]]
        if kind == "sum":
            _all_reduce(flat, first.group)
            for i, t, piece in zip(members, tensors, flat.split(sizes)):
                answers[i] = piece.reshape(t.shape)
        elif kind == "gather":
            stacked = _all_gather(flat, first.group, first.world)
            for i, t, piece in zip(members, tensors, stacked.split(sizes, dim=1)):
                answers[i] = piece.reshape(first.world, *t.shape)
        else:
            raise ValueError(f"unknown collective {kind!r}")
    return answers


def run_together(programs: list) -> list:
    """Run sharded programs (generators yielding Collective requests) in lock-step rounds, each
    round's requests answered by one collective per kind (``_answer``); the programs' return values,
    in order. A program that raises stops the run: the ranks' collectives may be out of step, so it
    is not caught."""
    results: list = [None] * len(programs)
    waiting: dict[int, Collective] = {}

    def advance(i: int, value) -> None:
        try:
            waiting[i] = programs[i].send(value)
        except StopIteration as stop:
            results[i] = stop.value
            waiting.pop(i, None)

    for i in range(len(programs)):
        advance(i, None)
    while waiting:
        order = sorted(waiting)
        for i, answer in zip(order, _answer([waiting[i] for i in order])):
            advance(i, answer)
    return results


def copy_result(target: torch.Tensor, program):
    """A sharded program that writes `program`'s result (e.g. the transformed local gradient) into
    `target` in place."""
    target.copy_((yield from program))


def run_now(program):
    """Run one sharded program alone (outside a step, e.g. at install); its return value."""
    return run_together([program])[0]


@dataclass(frozen=True)
class ShardInfo:
    """Where one parameter's local shard sits in the whole tensor, and the collectives over its ranks.

    global_shape: the full tensor's shape; start, stop: the rows of dim 0 this rank holds (stop ==
    start on a rank with no rows); group: the process group of the parameter's mesh."""

    name: str
    global_shape: tuple[int, ...]
    start: int
    stop: int
    rank: int
    world: int
    group: object

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def sum(self, t: torch.Tensor) -> "Collective":
        """Request: the elementwise sum of `t` over the ranks (every rank gets the same bits)."""
        return Collective("sum", t.detach(), self.group, self.world)

    def sum_now(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the ranks, at once (outside a step's batched rounds, e.g. at install)."""
        return run_now(_requesting(self.sum(t)))

    def gather(self, t: torch.Tensor) -> "Collective":
        """Request: every rank's `t`, stacked in rank order: shape (world, *t.shape)."""
        return Collective("gather", t.detach(), self.group, self.world)

    def exclusive_scan(self, t: torch.Tensor):
        """(Σ of `t` over the ranks before this one, Σ over all ranks), from one gather (a generator:
        ``before, total = yield from shard.exclusive_scan(t)``). Both sums run in rank order on every
        rank, so the total is the same bits everywhere."""
        stacked = yield self.gather(t)
        return stacked[: self.rank].sum(dim=0), stacked.sum(dim=0)

    def global_rows(self, device=None) -> torch.Tensor:
        """Indices of the local rows in the whole tensor (int64, shape (rows,))."""
        return torch.arange(self.start, self.stop, device=device)

    def local_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The local rows of a replicated tensor laid out along dim 0 like the parameter; a tensor of
        one row (a broadcast factor) is returned as it is."""
        return t if t.dim() == 0 or t.shape[0] == 1 else t[self.start:self.stop]


def shard_info(name: str, p: torch.Tensor) -> ShardInfo:
    """The ShardInfo of a DTensor parameter; GeomCompileError for a layout the runtime cannot serve."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise GeomCompileError(
            f"{name} is a DTensor with placements {placements} on a {mesh.ndim}-d mesh; geomcompile runs "
            f"geometries on FSDP2's layout only (Shard(0) on a 1-d mesh). Fix: shard it with "
            f"torch.distributed.fsdp.fully_shard on a 1-d mesh, or leave it out of the policy")
    shape = tuple(p.shape)
    local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    start = offset[0] if local_shape[0] else min(offset[0], shape[0])
    return ShardInfo(name, shape, start, start + local_shape[0], mesh.get_local_rank(), mesh.size(),
                     mesh.get_group())


def shards_for(items, params: dict) -> dict[str, ShardInfo]:
    """ShardInfo of every sharded parameter of the work items. A geometry without a sharded form
    (``Geometry.shard_check``) on a sharded parameter is refused with its reason: it is never run
    on a shard silently."""
    shards: dict[str, ShardInfo] = {}
    for item in items:
        for name, facts in zip(item.unit.names, item.unit.facts):
            p = params[name]
            if not is_sharded(p):
                continue
            problem = item.geometry.shard_check(facts)
            if problem is not None:
                raise GeomCompileError(
                    f"{name} is sharded (DTensor {tuple(p.placements)}), but {item.geometry.name} {problem}; "
                    f"geomcompile does not compute it on a shard. Fix: leave {name} out of the rule that "
                    f"assigns {item.geometry.name} (or out of fully_shard), or train it unsharded")
            if name not in shards:
                shards[name] = shard_info(name, p)
    return shards


def any_on_some_rank(flag: bool, shards: dict[str, ShardInfo]) -> bool:
    """`flag` or'ed over the ranks of the sharded parameters (a decision every rank must share)."""
    if not shards:
        return flag
    return any_on_each_rank([flag], next(iter(shards.values())))[0]


def any_on_each_rank(flags: list[bool], info: ShardInfo) -> list[bool]:
    """Each of `flags` or'ed over the ranks of `info`'s group (one all-reduce; every rank passes as many)."""
    return [bool(x) for x in (info.sum_now(torch.tensor([float(f) for f in flags])) > 0).tolist()]


def _requesting(request: Collective):
    """A sharded program of one request, returning its answer."""
    return (yield request)

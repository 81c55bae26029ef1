"""Sharded parameters: what a geometry's program needs to compute the full-tensor update on a shard.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps every parameter as a ``DTensor`` sharded on
dim 0 (``Shard(0)``, torch.chunk's split: ranks get ceil(n/world) rows until the rows run out, so
a rank may hold zero rows). A geometry's math often couples rows (a mean over output channels, a
norm of a group of rows, a convolution's operator), so its program on a shard needs a few
collectives. ``ShardInfo`` is the one object that offers them, geometry-agnostic: the runtime
builds one per sharded parameter at install (``StepContext.shards``) and never asks which
geometry runs; each geometry's program calls ``ctx.shard(name)`` and, when it is not None, runs
its sharded form on the local shard (``local(tensor)``) with these calls:

* ``all_reduce_sum(t)``: the sum over ranks (partial sums of norms, Mᵀy);
* ``exclusive_scan(t)``: (sum over the earlier ranks, sum over all ranks) in one collective, to
  continue prefix sums across shards;
* ``to_full_rows(t)`` / ``local_rows(t)``: a per-row vector of the whole tensor from per-rank
  pieces (zeros elsewhere, then a sum: exact), and the local piece of a replicated one.

Every rank calls the same collectives in the same order: the decisions a program takes before a
collective (renormalise or not, which units) must come from replicated values, never from the
local shard alone. The collectives run on the parameter's device mesh (its process group); one
call per sharded parameter and use (docs/distributed.md lists them and their bytes).

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

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of `t` over the ranks (a new tensor; every rank gets the same bits)."""
        import torch.distributed as dist
        out = t.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def exclusive_scan(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ of `t` over the ranks before this one, Σ over all ranks), from one all-gather.

        Both sums run in rank order on every rank, so the total is the same bits everywhere."""
        import torch.distributed as dist
        t = t.detach().contiguous()
        pieces = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(pieces, t, group=self.group)
        stacked = torch.stack(pieces)
        return stacked[: self.rank].sum(dim=0), stacked.sum(dim=0)

    def global_rows(self, device=None) -> torch.Tensor:
        """Indices of the local rows in the whole tensor (int64, shape (rows,))."""
        return torch.arange(self.start, self.stop, device=device)

    def to_full_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Per-row values of the local rows (rows, ...) -> those of every row (global rows, ...), on
        every rank: zeros outside the local rows, then a sum over ranks (exact)."""
        full = t.new_zeros((self.global_shape[0], *t.shape[1:]))
        full[self.start:self.stop] = t
        return self.all_reduce_sum(full)

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
    info = next(iter(shards.values()))
    return bool(info.all_reduce_sum(torch.tensor([float(flag)])).item() > 0)

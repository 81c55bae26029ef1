"""Bucketing for the Triton backend: which parameters one kernel launch serves, and with what.

A bucket is a list of parameters that share everything a launch fixes: the kernel family and the
geometry's options, the base optimizer's update and hyperparameters (when fused), dtype and
device. Buckets are formed from the current param groups whenever the Triton backend decides a
step from scratch (its step plan replays them otherwise, reading each launch's hyperparameters live,
so an lr changed by a scheduler simply lands in the update's scalars); the device tables of a bucket
are cached under its *slot* (the same parameters in the same roles), which does not contain
hyperparameters.

This module also decides whether a param group's step can be fused into the kernels, and says
why not in words for the plan report.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable

import torch

from ..analysis.facts import ParamFacts
from .fastpath import WorkItem

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Exact types: a subclass may override step(), so it is not fused.
_FUSED_KINDS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adam"}
_HYPER = {"sgd": ("lr", "momentum", "dampening", "weight_decay"), "adam": ("lr", "betas", "eps", "weight_decay")}


def fused_kind(optimizer: torch.optim.Optimizer, group: dict) -> tuple[str | None, str]:
    """("sgd" or "adam", "") when the kernels can do this group's step, else (None, why not)."""
    kind = _FUSED_KINDS.get(type(optimizer))
    name = type(optimizer).__name__
    if kind is None:
        return None, f"{name} has no fused kernel (SGD, Adam and AdamW do)"
    why = [f"{flag}=True" for flag in ("amsgrad", "capturable", "differentiable", "fused") if group.get(flag)]
    values = [group.get(k) for k in _HYPER[kind]]
    if kind == "adam":
        values += list(group.get("betas", ()))
    if any(isinstance(v, torch.Tensor) for v in values):
        why.append("a Tensor-valued hyperparameter")
    if why:
        return None, f"{name} with {' and '.join(why)} is not fused"
    return kind, ""


def update_of(kind: str, optimizer: torch.optim.Optimizer, group: dict):
    """The kernels' SGDUpdate / AdamUpdate for a group, read now (step 0 for Adam: set per launch)."""
    from ..kernels.optim_updates import AdamUpdate, SGDUpdate
    if kind == "sgd":
        return SGDUpdate(lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                         weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                         maximize=group.get("maximize", False))
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
    beta1, beta2 = group["betas"]
    return AdamUpdate(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                      weight_decay=group["weight_decay"], decoupled=bool(decoupled),
                      maximize=group.get("maximize", False), step=0)


@dataclass
class Entry:
    """One parameter of a bucket, with what its launch needs."""

    name: str
    param: torch.nn.Parameter
    facts: ParamFacts
    item: WorkItem
    grad: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # state tensors, flags, counters


@dataclass(frozen=True)
class BucketKey:
    family: str                      # kernel family: channel_directed, psi, psi_renorm
    geometry: Any                    # the Geometry (hashable by its options)
    update: Any                      # SGDUpdate / AdamUpdate (fused) or None (gradient transform)
    dtype: torch.dtype
    device: torch.device
    extra: tuple = ()                # family specifics, e.g. the state keys a renormalisation scales

    def slot(self, entries: Iterable[Entry]) -> Hashable:
        """Cache identity of the bucket's tables: everything but the hyperparameter values."""
        base = None if self.update is None else type(self.update).__name__
        return (self.family, self.geometry, base, self.dtype, self.device, self.extra,
                tuple(e.name for e in entries))


def bucketize(entries: Iterable[Entry], key_of: Callable[[Entry], BucketKey]) -> dict[BucketKey, list[Entry]]:
    """Group entries by key, keeping first-seen order of buckets and of entries within them."""
    buckets: dict[BucketKey, list[Entry]] = defaultdict(list)
    for entry in entries:
        buckets[key_of(entry)].append(entry)
    return dict(buckets)

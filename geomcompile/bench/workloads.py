"""What the benchmark runs: models (or a synthetic sweep), the policy per geometry, the optimizers.

``synthetic`` is a sweep of parameter sets: each entry ``COUNTxCHANNELS`` is a stack of COUNT
conv3x3(C, C) → BatchNorm → ReLU blocks, so every conv weight (C, C, 3, 3) is scale-invariant
(psi applies) and has an output-channel dimension (channel_directed applies), and the full
training step runs on C x 8 x 8 inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import models
from ..errors import GeomCompileError
from ..geometries import REGISTRY

MODEL_INPUTS = {   # per-sample input shape and number of classes of the package's models
    "resnet20": ((3, 32, 32), 10),
    "resnet56": ((3, 32, 32), 10),
    "vgg16": ((3, 32, 32), 10),
    "resnet50": ((3, 224, 224), 1000),
}
DEFAULT_SYNTHETIC = "16x64,64x64,8x256"
SYNTHETIC_SPATIAL = 8

# The policy that applies one geometry where the benchmark asks for it.
GEOMETRY_POLICIES = {
    "channel_directed": {"match": {"kind": ["conv", "linear"]},
                         "use": {"channel_directed": {"metric": "sobolev", "lam": 1.0}}},
    "psi": {"match": {"kind": "conv", "scale_invariant": True}, "use": {"psi": {}}},
}


@dataclass
class Workload:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]      # one sample
    num_classes: int


class SyntheticStack(nn.Sequential):
    """COUNT blocks of conv3x3(C, C, bias=False) → BatchNorm2d(C) → ReLU, then mean-pool and a Linear."""

    def __init__(self, count: int, channels: int, num_classes: int = 10):
        blocks = []
        for _ in range(count):
            blocks += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                       nn.ReLU(inplace=True)]
        super().__init__(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def parse_synthetic(spec: str) -> list[tuple[int, int]]:
    sizes = []
    for part in spec.split(","):
        count, sep, channels = part.strip().partition("x")
        if not (sep and count.isdigit() and channels.isdigit() and int(count) > 0 and int(channels) > 0):
            raise GeomCompileError(f"--synthetic expects COUNTxCHANNELS[,COUNTxCHANNELS...] such as "
                                   f"{DEFAULT_SYNTHETIC!r}, got {part.strip()!r}")
        sizes.append((int(count), int(channels)))
    return sizes


def workloads(model: str, synthetic: str = DEFAULT_SYNTHETIC) -> list[Workload]:
    if model == "synthetic":
        return [Workload(f"synthetic-{c}x{ch}", lambda c=c, ch=ch: SyntheticStack(c, ch),
                         (ch, SYNTHETIC_SPATIAL, SYNTHETIC_SPATIAL), 10)
                for c, ch in parse_synthetic(synthetic)]
    if model not in MODEL_INPUTS:
        raise GeomCompileError(f"unknown model {model!r}; use one of {', '.join([*MODEL_INPUTS, 'synthetic'])}")
    shape, classes = MODEL_INPUTS[model]
    return [Workload(model, models.MODELS[model], shape, classes)]


def geometry_policy(geometry: str) -> dict:
    """The benchmark policy for one geometry. A geometry without a tuned entry is applied with its
    default options to every conv and linear weight it accepts (validate: warn)."""
    if geometry in GEOMETRY_POLICIES:
        rule = GEOMETRY_POLICIES[geometry]
        return {"version": 1, "rules": [{"name": f"bench-{geometry}", **rule}]}
    if geometry not in REGISTRY:
        raise GeomCompileError(f"unknown geometry {geometry!r}; registered: {', '.join(sorted(REGISTRY))}")
    return {"version": 1, "validate": "warn",
            "rules": [{"name": f"bench-{geometry}", "match": {"kind": ["conv", "linear"]}, "use": {geometry: {}}}]}


OPTIMIZERS = ("sgd_momentum", "sgd", "adam", "adamw")


def make_optimizer(name: str, params, device: torch.device, implementation: str) -> torch.optim.Optimizer:
    """torch's own optimizer; implementation is "fused", "foreach" or "default" (torch picks)."""
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "default": {}}[implementation]
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, **flags)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01, **flags)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3, **flags)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, **flags)
    raise GeomCompileError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


def fastest_implementation(device: torch.device) -> str:
    """torch's fastest path: fused kernels on CUDA, the multi-tensor (foreach) path on CPU."""
    return "fused" if device.type == "cuda" else "foreach"


def describe_optimizer(opt: torch.optim.Optimizer) -> str:
    group = opt.param_groups[0]
    keys = [k for k in ("lr", "momentum", "betas", "weight_decay") if k in group and group[k]]
    flags = [k for k in ("fused", "foreach") if group.get(k)]
    return f"{type(opt).__name__}({', '.join([f'{k}={group[k]}' for k in keys] + [f'{k}=True' for k in flags])})"

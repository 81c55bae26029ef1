"""The one registry of geometry test cases (like torch's OptimizerInfo): every registered geometry
has at least one case here, and every backend that a geometry declares a fast path for is derived
from the declaration (``Geometry.fast_paths``), so adding a geometry or a fast path adds its whole
test matrix (tests/test_matrix.py) without test code of its own; a geometry without a case fails
``test_every_registered_geometry_and_fast_path_has_cases``.

A case: the policy rules (match, use) that apply the geometry, whether its post-step retraction can
move a weight (the frozen-parameter test then forces one), and whether it needs example inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from geomcompile.geometries import REGISTRY

from .models import GSmallNet

CONV_OR_LINEAR = {"kind": ["conv", "linear"]}
CONV = {"kind": "conv", "depthwise": False}


@dataclass(frozen=True)
class GeometryCase:
    geometry: str                 # registered name
    rules: tuple                  # ((match, use), ...)
    retracts: bool = False        # its post_step can change a weight
    # per dtype (rtol, atol) of fast paths against the eager reference after one step from the same
    # state. bf16 keeps 8 significant bits: neighbouring values are up to 2^-7 apart relative to the
    # value. The eager program rounds the transformed gradient to bf16 and torch's bf16 step rounds
    # after each of its operations; a fused kernel computes in fp32 and rounds once. Results may then
    # differ by two of those spacings, relative to the tensor's largest element: 2 * 2^-7
    # (tests/test_matrix.py::_close applies the bf16 bound normwise).
    tolerances: tuple = ((torch.float32, 1e-5, 1e-6), (torch.bfloat16, 2 * 2**-7, 2 * 2**-7))
    # The model of the registry-driven runtime tests (tests/test_matrix.py, tests/test_runtime.py): None
    # is their own Net / SmallNet (BN convolutions). A geometry whose unit couples layers needs a model
    # where they are coupled, with the same layout (tests/models.py::GSmallNet), so every test applies
    # unchanged.
    model: Callable | None = None
    # the fast paths this case's configuration has (None: every one its geometry declares); a
    # configuration a fast path refuses runs the eager program there, which the matrix need not repeat
    fast_paths: tuple[str, ...] | None = None

    def policy(self) -> dict:
        return {"version": 1, "validate": "warn",
                "rules": [{"name": f"r{i}", "match": m, "use": u} for i, (m, u) in enumerate(self.rules)]}

    def tolerance(self, dtype) -> dict:
        rtol, atol = next((r, a) for d, r, a in self.tolerances if d == dtype)
        return dict(rtol=rtol, atol=atol)

    @property
    def backends(self) -> list[str]:
        """eager (the reference) and every backend the geometry declares a fast path for."""
        declared = sorted(REGISTRY[self.geometry].fast_paths)
        return ["eager", *(declared if self.fast_paths is None else [b for b in declared if b in self.fast_paths])]


CASES = {
    "channel_directed": GeometryCase("channel_directed", (
        (CONV_OR_LINEAR, {"channel_directed": {"metric": "sobolev", "lam": 0.5, "mix": 0.5}}),)),
    "channel_directed_h0": GeometryCase("channel_directed", (
        (CONV_OR_LINEAR, {"channel_directed": {"metric": "h0", "lam": 0.5}}),)),
    "psi": GeometryCase("psi", (({"scale_invariant": True}, {"psi": {"max_norm": 1.5}}),), retracts=True),
    "spectral": GeometryCase("spectral", ((CONV, {"spectral": {"coef": 0.1, "power_iters": 1}}),)),
    # One unit couples four parameters (conv1 → ReLU → conv2 with biases). tangent: the matrix runs
    # momentum, Adam and RMSprop, which exact refuses. keep: the matrix resumes from checkpoints and
    # freezes conv2 (skeleton_init has tests of its own in tests/test_gspace.py).
    "gspace": GeometryCase("gspace", (({"g_coupled": True}, {"gspace": {"step": "tangent", "skeleton_init": "keep"}}),),
                           model=GSmallNet),
    "pom": GeometryCase("pom", ((CONV, {"pom": {"manifold": "sphere", "component": "kernel",
                                                "grouping": "PI"}}),), retracts=True),
    # Stiefel with the polar retraction (QR + Newton, pom.polar_factor), retracted in the compiled
    # graph; the Triton backend has no Stiefel kernel and runs the same batched program uncompiled
    # (kernels/pom.py POMTorchSteps)
    "pom_stiefel": GeometryCase("pom", ((CONV, {"pom": {"manifold": "stiefel", "component": "kernel",
                                                        "grouping": "PIO", "group_size": 4}}),),
                                retracts=True),
}


def matrix(kind: str = "all"):
    """(case name, backend) pairs: every backend that claims the case's geometry ("fast": not eager)."""
    return [(name, b) for name, case in CASES.items() for b in case.backends if kind == "all" or b != "eager"]

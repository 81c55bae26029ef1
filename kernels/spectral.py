"""spectral's Triton fast path: no Triton kernel of its own.

spectral's step is a block eigensolver on every layer's operator MᵀM: grouped convolutions, their
adjoints and small batched eigh / qr, i.e. matmul and convolution bound, where cuDNN / oneDNN and
cuSOLVER already run at the hardware's speed and an elementwise Triton kernel has nothing to fuse.
So ``SpectralFamily.transform`` runs the batched torch step (geometries/spectral.py:
``Spectral.step_layers``: one solve per group of layers sharing a convolution, weight shape, dtype and
device) and launches no Triton kernel. Spectral is a penalty-stage gradient transform: it is never
fused with the base optimizer's update (``fuses = False``), the base optimizer steps as usual.
"""
from __future__ import annotations

from geomcompile.runtime.triton_backend import KernelFamily


class TorchStep:
    """A recorded call of a family that runs torch ops instead of a kernel, in the shape of
    ``tables.Launch`` so the Triton backend's step plan can replay it: ``run`` calls ``step`` on the
    bucket's current gradients (read from the parameters when it runs, so none is kept alive)."""

    scalars: dict = {}
    grad_role = 0                    # it reads gradients: the plan checks (and "patches") them

    def __init__(self, step, params):
        self.step, self.params = step, params

    def run(self, scalars=None) -> None:
        self.step([p.grad for p in self.params])

    def patch_grads(self, grads) -> None:
        """Nothing to patch: run reads the gradients from the parameters."""


class SpectralFamily(KernelFamily):
    """The Triton fast path of geometries/spectral.py (protocol: runtime/triton_backend.KernelFamily),
    launching no Triton kernel (module docstring)."""

    name = "spectral"
    retracts = False
    fuses = False                    # a penalty-stage gradient transform: the base optimizer steps
    launches_kernels = False
    note = ("launches no Triton kernel: one batched torch step (grouped convolutions, batched eigh) per "
            "group of layers sharing a convolution, weight shape and dtype, matmul/conv bound; never fused "
            "with the base optimizer")

    def transform(self, geometry, entries, cache, slot, record=None) -> None:
        specs = [geometry.spec(e.facts) for e in entries]
        weights = [e.param.detach() for e in entries]
        states = [e.extra["state"] for e in entries]

        def step(grads):
            geometry.step_layers(specs, weights, grads, states)
        step([e.grad for e in entries])
        if record is not None:
            record.append(TorchStep(step, [e.param for e in entries]))

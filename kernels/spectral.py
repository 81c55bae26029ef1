"""spectral's Triton fast path, and a sync-free eigensolver for its small matrices.

spectral's step is a block eigensolver on every layer's operator MᵀM: grouped convolutions, their
adjoints and small batched eigh / qr, i.e. matmul and convolution bound, where cuDNN / oneDNN and
cuSOLVER already run at the hardware's speed and an elementwise Triton kernel has nothing to fuse.
So ``SpectralFamily.transform`` runs the batched torch step (geometries/spectral.py:
``Spectral.step_layers``: one solve per group of layers sharing a convolution, weight shape, dtype and
device) and launches no fused update kernel. Spectral is a penalty-stage gradient transform: it is
never fused with the base optimizer's update (``fuses = False``), the base optimizer steps as usual.

The one kernel here, ``_jacobi_eigh_kernel`` (launcher ``jacobi_eigh``), replaces
``torch.linalg.eigh`` for the solver's small symmetric matrices (k×k and 3k×3k, k = 2·block: 4 and 12
by default) on a GPU, where torch's eigh reads its solver's error code on the host after every call
(``at::_linalg_check_errors``: a sync, 4 per solver iteration). It is the cyclic parallel Jacobi
method (Golub & Van Loan, Matrix Computations, §8.5): one program per matrix, held in registers,
padded to NP = 16 (padding rows stay exactly decoupled: their entries are 0, so no rotation
touches them); each round rotates the ne/2 disjoint pairs of the circle (round-robin) ordering of
the first ne = n rounded up to even indices at once, A ← JᵀAJ, V ← VJ (two and one tl.dot in IEEE
precision, no TF32), and a sweep is ne − 1 rounds (3 for 4×4, 11 for 12×12), so every pair once.
A fixed SWEEPS = 10 (no test on the host; measured: random matrices converged by the 6th sweep, a
12×12 one with three 4-fold eigenvalues by the 8th, fp32 and fp64), then the eigenvalues are
sorted ascending as eigh returns them (torch.sort, sync-free). geometries/spectral.py
``symmetric_eigh`` decides where it runs (``jacobi_takes``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from geomcompile.runtime.triton_backend import KernelFamily

from .tables import TorchStep

# One 16×16 register tile (tl.dot's smallest): n ≤ 16 covers spectral's default block (2: matrices
# of 4 and 12) and block 1. A 32×32 tile compiles for sm_90 to 193 (fp32) / 174 (fp64) registers with
# 8 warps; with 16, fp64 fits (122) but fp32 spills 32 B: over kernels/report.py's limits, so larger
# blocks keep torch.linalg.eigh.
JACOBI_NP = 16
JACOBI_MAX_N = JACOBI_NP
JACOBI_SWEEPS = 10
JACOBI_WARPS = 8           # sm_90: 71 (fp32) / 110 (fp64) registers, no spill (4 warps: 110 / 80)


@triton.jit
def _jacobi_eigh_kernel(a_ptr, w_ptr, v_ptr, n, ne, NP: tl.constexpr, SWEEPS: tl.constexpr):
    """Eigenvalues (unsorted, w: (B, n)) and eigenvectors (columns of v: (B, n, n)) of the symmetric
    matrices a (B, n, n), one per program. The round-robin ordering runs over the first ne = n rounded
    up to even indices (ne − 1 rounds per sweep: 3 for the solver's 4×4 matrices, not NP − 1 = 15);
    the rest of the tile is zero padding, paired with itself and never rotated."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, NP)
    rows, cols = i[:, None], i[None, :]
    inside = (rows < n) & (cols < n)
    eye = rows == cols
    A = tl.load(a_ptr + b * n * n + rows * n + cols, mask=inside, other=0.0)
    V = tl.where(eye, 1.0, 0.0).to(A.dtype)
    for _sweep in range(SWEEPS):
        for r in range(ne - 1):
            # the circle ordering on 0..ne-1: ne - 1 meets r, every other x meets (2r - x) mod (ne - 1)
            m = tl.where(i == ne - 1, r, tl.where(i == r, ne - 1, (2 * r - i + (ne - 1)) % (ne - 1)))
            m = tl.where(i < ne, m, i)
            partner = (cols == m[:, None]) & (rows != cols)
            d = tl.sum(tl.where(eye, A, 0.0), axis=1)                          # A[i, i]
            # a_pq as both members of a pair read it: (A[i, m(i)] + A[m(i), i]) / 2, bit-identical for
            # p and q. Read from one side only, the rounding asymmetry of A would give p and q
            # rotations that differ by (asymmetry / a_pq): J not orthogonal, and the iteration stalls
            # at ~1e-8 (fp64) on repeated eigenvalues, where a_pq gets that small (measured).
            o = (tl.sum(tl.where(partner, A, 0.0), axis=1)
                 + tl.sum(tl.where((rows == m[None, :]) & (rows != cols), A, 0.0), axis=0)) * 0.5
            dm = tl.sum(tl.where(partner, d[None, :], 0.0), axis=1)            # A[m(i), m(i)]
            lo = i < m                                                          # i is p of (p, q)
            delta = tl.where(lo, dm - d, d - dm)                                # a_qq - a_pp
            # t = tan of the rotation that zeroes a_pq, the smaller root, without overflow:
            # t = 2 a_pq sgn(Δ) / (|Δ| + sqrt(Δ² + 4 a_pq²)); no rotation where a_pq = 0
            rotate = o != 0.0
            den = tl.abs(delta) + tl.sqrt(delta * delta + 4.0 * o * o)
            t = tl.where(rotate, 2.0 * o * tl.where(delta >= 0, 1.0, -1.0) / tl.where(rotate, den, 1.0), 0.0)
            c = 1.0 / tl.sqrt(t * t + 1.0)
            s = t * c
            # J[p, p] = J[q, q] = c, J[p, q] = s, J[q, p] = -s
            J = tl.where(eye, c[None, :], 0.0)
            J = tl.where(partner, tl.where(lo, s, -s)[:, None], J).to(A.dtype)
            A = tl.dot(tl.trans(J), tl.dot(A, J, input_precision="ieee"), input_precision="ieee")
            V = tl.dot(V, J, input_precision="ieee")
        A = (A + tl.trans(A)) * 0.5
    tl.store(w_ptr + b * n + i, tl.sum(tl.where(eye, A, 0.0), axis=1), mask=i < n)
    tl.store(v_ptr + b * n * n + rows * n + cols, V, mask=inside)


def jacobi_takes(H: torch.Tensor) -> bool:
    """Whether jacobi_eigh takes H: float32 or float64, n ≤ JACOBI_MAX_N."""
    return H.dtype in (torch.float32, torch.float64) and H.shape[-1] <= JACOBI_MAX_N


def jacobi_eigh(H: torch.Tensor, sweeps: int = JACOBI_SWEEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh(H) by _jacobi_eigh_kernel: H (..., n, n) symmetric, float32 or float64,
    n <= JACOBI_MAX_N. Eigenvalues ascending, eigenvectors as columns; one launch and a sort, no
    host sync. Signs of the eigenvectors are arbitrary, as eigh's."""
    n = H.shape[-1]
    if not jacobi_takes(H):
        raise ValueError(f"jacobi_eigh takes float32/float64 matrices up to {JACOBI_MAX_N}x{JACOBI_MAX_N}; "
                         f"got {H.dtype} {n}x{n} (use torch.linalg.eigh)")
    a = H.reshape(-1, n, n).contiguous()
    w = torch.empty(a.shape[:2], dtype=a.dtype, device=a.device)
    v = torch.empty_like(a)
    if a.shape[0]:
        _jacobi_eigh_kernel[(a.shape[0],)](a, w, v, n, n + n % 2, NP=JACOBI_NP, SWEEPS=sweeps,
                                           num_warps=JACOBI_WARPS)
    w, order = w.sort(dim=-1)
    v = v.gather(-1, order[:, None, :].expand_as(v))
    return w.reshape(H.shape[:-1]), v.reshape(H.shape)


def configurations():
    """Every configuration jacobi_eigh can launch, for kernels/report.py."""
    from .report import KernelConfig
    out = []
    for name in ("fp32", "fp64"):
        out.append(KernelConfig("spectral", _jacobi_eigh_kernel, dict(NP=JACOBI_NP, SWEEPS=JACOBI_SWEEPS),
                                JACOBI_WARPS, f"small matrices, NP={JACOBI_NP} {name}",
                                {"a_ptr": f"*{name}", "w_ptr": f"*{name}", "v_ptr": f"*{name}", "n": "i32", "ne": "i32"},
                                weight=1))
    return out


class SpectralFamily(KernelFamily):
    """The Triton fast path of geometries/spectral.py (protocol: runtime/triton_backend.KernelFamily),
    launching no fused update kernel (module docstring)."""

    name = "spectral"
    retracts = False
    fuses = False                    # a penalty-stage gradient transform: the base optimizer steps
    launches_kernels = False
    helper_kernels = ("_jacobi_eigh_kernel",)     # launched by the torch step, on a GPU
    note = ("launches no fused update kernel: one batched torch step (grouped convolutions, batched "
            "eigh: on a GPU this module's Jacobi kernel for blocks <= 2) per group of layers sharing a "
            "convolution, weight shape and dtype, matmul/conv bound; never fused with the base optimizer")

    def transform(self, geometry, entries, cache, slot, record=None) -> None:
        specs = [geometry.spec(e.facts) for e in entries]
        weights = [e.param.detach() for e in entries]
        states = [e.extra["state"] for e in entries]

        def step(grads):
            geometry.step_layers(specs, weights, grads, states)
        step([e.grad for e in entries])
        if record is not None:
            record.append(TorchStep(step, [e.param for e in entries]))

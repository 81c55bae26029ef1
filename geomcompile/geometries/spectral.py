"""Spectral penalty (seed 004_433ab1764c3faa0c.txt, Guo & Ye, "On regularization of convolutional kernels").

A convolution with kernel K is a linear map vec(Y) = M(K) vec(X) on one input X of the layer's
real size (a doubly block banded Toeplitz matrix for zero padding, eq. 2.1/2.4). The penalty is

    R_α(K) = σ_max(MᵀM − αI)                                              (Section 2)

and R_α(K) < tα bounds both ends of the spectrum: √((1−t)α) < σ_min(M) ≤ σ_max(M) < √((1+t)α)
(Theorem 2.1). With v the unit eigenvector of the eigenvalue λ of MᵀM − αI of largest magnitude
and s = sign(λ), Lemma 2.2 / Theorem 2.3 give ∇_K R = s·∇_K ‖M(K)v‖².

M is never formed: M x is the convolution of x (no bias, the layer's stride, padding, dilation,
groups and padding mode), Mᵀ y its vector-Jacobian product. λ can sit at either end: λ_max(MᵀM) − α
or λ_min(MᵀM) − α. Both ends are estimated at once by block LOBPCG on G = MᵀM (`block` Ritz
vectors per end), warm-started from the previous optimizer step, with the residual ‖Gx − θx‖ of
each Ritz pair kept as a convergence measure; when the two ends' |λ| are within their error of
each other the step is counted as ambiguous. The vectors are the geometry's state, so they live
in the optimizer's state_dict(). (The paper's Algorithm 2.1 keeps two vectors of power iteration
on MᵀM − αI, which follows only the end of largest |λ| and resolves the clustered bottom of a
convolution's spectrum slowly.)
"""
from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..analysis.facts import ParamFacts
from ..errors import GeomCompileError, GeomCompileWarning
from ..runtime.distributed import local
from . import base
from .base import (Geometry, Option, Range, StepContext, Unit, compute_dtype, count_nonfinite, finite_entries,
                   fit_dtype, register)

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
BLOCK = 2   # Ritz vectors kept at each end of the spectrum (the paper keeps the two largest)


# ---- the operator M ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvSpec:
    """Everything about the linear map M of one convolution except its kernel."""

    input_size: tuple[int, ...]              # spatial size of one input (H, W) / (L,) / (D, H, W)
    in_channels: int
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]      # (before, after) per spatial dimension
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str                         # zeros | reflect | replicate | circular

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.in_channels, *self.input_size)


def _tuple(value, n: int, what: str) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise GeomCompileError(f"{what} must be an integer or {n} integers, got {value!r}")
    return values


def conv_spec(weight_shape: Sequence[int], input_size, stride=1, padding=0, dilation=1, groups: int = 1,
              padding_mode: str = "zeros", boundary: str = "module") -> ConvSpec:
    """Normalise a convolution's arguments (nn.ConvNd semantics) into a ConvSpec, checking they fit.

    boundary="circular" replaces the padding by periodic padding of total size d·(k−1) per dimension,
    so M is the circular convolution on the torus of the input size (Sedghi, Gupta & Long 2019);
    the layer's own padding only sets the alignment, which does not change the singular values."""
    nd = len(weight_shape) - 2
    if nd not in _CONV:
        raise GeomCompileError(f"spectral supports 1-, 2- and 3-d convolutions; the weight has shape "
                               f"{tuple(weight_shape)}")
    kernel = tuple(weight_shape[2:])
    size = _tuple(input_size, nd, "input_size")
    stride, dilation = _tuple(stride, nd, "stride"), _tuple(dilation, nd, "dilation")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise GeomCompileError(f"padding must be integers, 'same' or 'valid', got {padding!r}")
        totals = [d * (k - 1) if padding == "same" else 0 for d, k in zip(dilation, kernel)]
        pads = tuple((t // 2, t - t // 2) for t in totals)
    else:
        pads = tuple((p, p) for p in _tuple(padding, nd, "padding"))
    if boundary == "circular":
        pads = tuple((min(b, d * (k - 1)), d * (k - 1) - min(b, d * (k - 1)))
                     for (b, _), d, k in zip(pads, dilation, kernel))
        padding_mode = "circular"
    elif boundary != "module":
        raise GeomCompileError(f"boundary must be 'module' or 'circular', got {boundary!r}")
    if padding_mode not in PADDING_MODES:
        raise GeomCompileError(f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}")
    if weight_shape[0] % groups:
        raise GeomCompileError(f"groups={groups} does not divide the {weight_shape[0]} output channels")
    for n, (b, a), d, k, s in zip(size, pads, dilation, kernel, stride):
        if n < 1 or s < 1 or d < 1:
            raise GeomCompileError(f"input_size, stride and dilation must be positive; got input_size {size}, "
                                   f"stride {stride}, dilation {dilation}")
        if (n + b + a - d * (k - 1) - 1) // s + 1 < 1:
            raise GeomCompileError(f"input size {size} is smaller than the kernel {kernel} (dilation "
                                   f"{dilation}, padding {pads}); the convolution has no output")
        if padding_mode != "zeros" and max(b, a) > (n - 1 if padding_mode == "reflect" else n):
            raise GeomCompileError(f"{padding_mode} padding {max(b, a)} is too large for input size {n}")
    if weight_shape[1] * groups * math.prod(size) < BLOCK:
        raise GeomCompileError(f"the input ({weight_shape[1] * groups} channel(s) of size {size}) has fewer "
                               f"than {BLOCK} entries; there is nothing to regularise")
    return ConvSpec(size, weight_shape[1] * groups, stride, pads, dilation, groups, padding_mode)


def conv_matvec(x: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """M x for a batch x of shape (B, C_in, *input_size): the convolution without bias."""
    conv = _CONV[weight.dim() - 2]
    if spec.padding_mode == "zeros" and all(b == a for b, a in spec.padding):
        return conv(x, weight, None, spec.stride, [b for b, _ in spec.padding], spec.dilation, spec.groups)
    flat = [p for pair in reversed(spec.padding) for p in pair]      # F.pad wants the last dim first
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
    return conv(F.pad(x, flat, mode=mode), weight, None, spec.stride, 0, spec.dilation, spec.groups)


def gram_matvec(x: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(M x, Mᵀ M x) with one convolution and one input-gradient."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = conv_matvec(x, weight.detach(), spec)
        (back,) = torch.autograd.grad(y, x, y.detach())
    return y.detach(), back


def conv_matrix(weight: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """The dense M (rows: flattened output, columns: flattened input), from the convolution of every
    basis input. O(n) convolutions and O(n·m) memory: for checks on small layers only."""
    n = math.prod(spec.input_shape)
    basis = torch.eye(n, dtype=weight.dtype, device=weight.device).reshape(n, *spec.input_shape)
    return conv_matvec(basis, weight, spec).reshape(n, -1).T


# ---- the small symmetric eigenproblems -----------------------------------------------------------
def _jacobi_kernel_for(H: torch.Tensor):
    """geomcompile.kernels.spectral.jacobi_eigh where it applies to H, else None: a CUDA tensor (or, for
    the sync detector, a CPU tensor standing in for one with the kernels built by the Triton
    interpreter), a matrix the kernel takes (kernels.spectral.jacobi_takes), not while torch.compile
    traces."""
    if torch.compiler.is_compiling():
        return None
    if not (H.is_cuda or (H.device.type == "cpu" and base._CPU_STANDS_IN_FOR_DEVICE[0])):
        return None
    try:
        from ..kernels import spectral as kernels
    except ImportError:              # no Triton: torch's eigh (a sync per call on a GPU)
        return None
    if not kernels.jacobi_takes(H):
        return None
    if not H.is_cuda:                # built for a GPU, it cannot read CPU memory (a stub can stand in)
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
        kernel = kernels._jacobi_eigh_kernel
        if isinstance(kernel, JITFunction) and not isinstance(kernel, InterpretedFunction):
            return None
    return kernels.jacobi_eigh


_JACOBI_FAILED: list[str] = []      # why the kernel could not run in this process (then torch's eigh)


def symmetric_eigh(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh(H) for the solver's small symmetric matrices (…, n, n): eigenvalues ascending,
    eigenvectors as columns (signs arbitrary; callers fix them with _fixed_signs). On a GPU, for
    n ≤ 16 (the default block gives 4 and 12), the Jacobi kernel of geomcompile.kernels.spectral,
    because torch's eigh reads its solver's error code on the host after every call (a sync); on
    CPU, and for larger n, torch.linalg.eigh. A kernel that cannot be built or launched here (a GPU
    Triton does not support) is said once, as a warning, and torch's eigh runs from then on."""
    jacobi = None if _JACOBI_FAILED else _jacobi_kernel_for(H)
    if jacobi is not None:
        try:
            return jacobi(H)
        except Exception as error:   # compile or launch failure: the correct result still comes from eigh
            _JACOBI_FAILED.append(f"{type(error).__name__}: {error}")
            warnings.warn(f"spectral: the Jacobi eigensolver kernel failed on {H.device} ({_JACOBI_FAILED[0]}); "
                          f"torch.linalg.eigh runs instead for the rest of this process, which syncs the host "
                          f"4 times per solver iteration on a GPU", GeomCompileWarning, stacklevel=2)
    return torch.linalg.eigh(H)


# ---- both ends of the spectrum: block LOBPCG on G = MᵀM -----------------------------------------
def initial_block(spec: ConvSpec, dtype: torch.dtype, device=None, seed: int = 0, block: int = BLOCK) -> torch.Tensor:
    """A random start block (2·block, C_in, *input_size) from a private generator (global RNG untouched):
    `block` vectors for each end of the spectrum (fewer when the input has fewer than 2·block entries)."""
    k = 2 * max(1, min(block, math.prod(spec.input_shape) // 2))
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn((k, *spec.input_shape), generator=gen, dtype=torch.float64)
    return (V / V.flatten(1).norm(dim=1).reshape(-1, *[1] * len(spec.input_shape))).to(dtype).to(device)


def _orthonormal_rows(V: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning those of V (b, n). A block that collapsed (non-generic) is instead
    nudged by a fixed random perturbation first, so it keeps b independent vectors. Both are
    computed and torch.where picks one: no host sync (the block is small)."""
    tiny = torch.finfo(V.dtype).tiny
    Q, Rf = torch.linalg.qr(V.T)
    d = Rf.diagonal().abs()
    collapsed = (d <= 1e3 * torch.finfo(V.dtype).eps * d.max().clamp_min(tiny)).any()
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(V.shape, generator=gen, dtype=torch.float64).to(V)
    nudged, _ = torch.linalg.qr((V / V.norm().clamp_min(tiny) + 1e-3 * noise).T)
    return torch.where(collapsed, nudged, Q).T


def _independent_rows(D: torch.Tensor, GD: torch.Tensor | None, drop: float):
    """Orthonormalise the rows of D (and map G·D along), dropping directions whose Gram eigenvalue is
    below `drop` (relative): rows of D are unit vectors, so the kept map is well conditioned.
    Fixed shapes: a dropped direction becomes a zero row, and `kept` (bool, one per row) says which
    rows are real; the caller keeps zero rows out of the Rayleigh–Ritz picks."""
    C = D @ D.T
    d, U = symmetric_eigh((C + C.T) / 2)
    kept = d > drop * d.max().clamp_min(torch.finfo(D.dtype).tiny)
    T = (U * torch.where(kept, d.clamp_min(torch.finfo(D.dtype).tiny).rsqrt(), 0.0)).T
    return T @ D, (None if GD is None else T @ GD), kept


def _signs_by_largest_entry(X: torch.Tensor) -> torch.Tensor:
    """The rows of X (…, k, N) with the sign that makes each one's largest entry positive. On the
    solver's returned vectors: the Ritz vectors' own sign, whatever basis they were combined from
    (_fixed_signs fixes the coefficients in a basis whose own signs, and within a cluster of Gram
    eigenvalues rotation, depend on the eigensolver: torch's eigh and the Jacobi kernel of
    symmetric_eigh agree on the vectors' span, not on their signs)."""
    idx = X.abs().argmax(dim=-1, keepdim=True)
    return X * torch.where(X.gather(-1, idx) < 0, -1.0, 1.0).to(X.dtype)


def _fixed_signs(U: torch.Tensor) -> torch.Tensor:
    """Eigenvector columns of U (…, m, c) with the sign that makes each one's largest coefficient
    positive: eigh's signs are arbitrary, and a flip under a rounding-size change of the weights would
    flip the state. Batched over leading dims (per layer in the batched solve)."""
    return _signs_by_largest_entry(U.mT).mT


@dataclass
class TwoEnds:
    """Result of `two_end_solve`. Ritz pairs of G = MᵀM, largest first: `theta` (k,), `vectors`
    (k, *shape) orthonormal, `residual` (k,) = ‖G x − θ x‖. The first half approximates the top of the
    spectrum, the second half its bottom. Ritz values lie inside the spectrum: θ[0] ≤ λ_max(G) and
    θ[-1] ≥ λ_min(G), and there is an eigenvalue of G within residual[i] of theta[i]."""

    theta: torch.Tensor
    vectors: torch.Tensor
    residual: torch.Tensor
    iters: int


def two_end_solve(apply_G: Callable[[torch.Tensor], torch.Tensor], V: torch.Tensor, iters: int,
                  tol: float = 0.0) -> TwoEnds:
    """two_end_solve_program with G applied by `apply_G` (a block (n, *shape) -> G of each row)."""
    program = two_end_solve_program(V, iters, tol)
    try:
        block = next(program)
        while True:
            block = program.send(apply_G(block))
    except StopIteration as stop:
        return stop.value


def two_end_solve_program(V: torch.Tensor, iters: int, tol: float = 0.0):
    """Block LOBPCG for the largest and the smallest eigenvalues of a symmetric G at once.

    V: (k, *shape), k even: a start block (warm start: the previous call's vectors). Each iteration
    applies G once to a block of k residual directions (the first also once to V itself): the
    Rayleigh–Ritz step on span{X, W, P} (Ritz vectors, residuals orthogonalised against them, the
    previous step's direction) keeps the k/2 largest and the k/2 smallest Ritz pairs. Unlike power
    iteration on G − αI, which follows only the end of largest |λ − α| and converges at the bottom
    of a clustered spectrum at the rate of the ratio of the clustered values, this converges at both
    ends with the square root of the relative gap. With tol > 0 it stops early once every residual is
    ≤ tol·θ_max, a decision taken on the host (a sync per iteration) on CPU tensors; on a device
    (base.host_reads_are_free_for is False) it runs all `iters` iterations instead and returns the
    pairs of the first iteration that met tol, chosen by torch.where: the same values, no sync, the
    cost of the remaining iterations (only a layer's first evaluation has tol > 0). With tol = 0 it
    runs exactly `iters` iterations on fixed shapes and makes no data-dependent decision on the host:
    a dropped direction is a zero row kept out of the picks, a collapsed start block is nudged by
    torch.where.

    A generator: it yields each block (n, *shape) that G must be applied to and is sent G of it (the
    same shape); its return value is the TwoEnds. two_end_solve drives it with a function; a sharded
    kernel drives it with collectives (spectral_penalty_step_sharded)."""
    if iters < 1:
        raise GeomCompileError(f"solver iterations must be >= 1, got {iters}")
    shape, k = V.shape, V.shape[0]
    half = k // 2
    drop = 1e3 * torch.finfo(V.dtype).eps
    X = _orthonormal_rows(V.reshape(k, -1))
    GX = (yield X.reshape(-1, *shape[1:])).reshape(k, -1)
    P = GP = None
    done = 0
    # tol > 0 where reading the residual costs a sync (a device): all `iters` iterations run, and the
    # pairs of the first iteration that met tol are kept (torch.where), the same values as the early stop
    freeze, stopped, kept = not base.host_reads_are_free_for([X]), None, None
    while True:
        H = X @ GX.T
        theta, U = symmetric_eigh((H + H.T) / 2)
        theta, U = theta.flip(0), _fixed_signs(U.flip(1))
        X, GX = U.T @ X, U.T @ GX
        W = GX - theta[:, None] * X
        residual = W.norm(dim=1)
        if tol > 0 and freeze:          # on a device: the early stop as a tensor op (no host read)
            converged = residual.max() <= tol * theta[0].abs()
            kept = (theta, X, residual) if stopped is None else tuple(
                torch.where(stopped, old, new) for old, new in zip(kept, (theta, X, residual)))
            stopped = converged if stopped is None else stopped | converged
            if done == iters:
                theta, X, residual = kept
                break
        elif done == iters or (tol > 0 and float(residual.max()) <= tol * float(theta[0].abs())):
            break
        done += 1
        # directions: residuals and the previous step, orthogonal to X and to each other, rows unit
        for _ in range(2):          # twice: a converged residual is tiny, one pass leaves rounding along X
            W = W - (W @ X.T) @ X
            W = W / W.norm(dim=1, keepdim=True).clamp_min(torch.finfo(W.dtype).tiny)
        W, _, kept_W = _independent_rows(W, None, drop)
        GW = (yield W.reshape(-1, *shape[1:])).reshape(W.shape[0], -1)
        basis, images, real = [X, W], [GX, GW], [torch.ones_like(kept_W), kept_W]
        if P is not None:
            # G·P is carried by recombination, not recomputed: a step shorter than ~√eps would turn its
            # rounding error into a wrong direction once normalised, so such rows are zeroed (dropped)
            long_enough = (P.norm(dim=1, keepdim=True) > 10 * math.sqrt(torch.finfo(P.dtype).eps)).to(P.dtype)
            P, GP = P * long_enough, GP * long_enough
            for _ in range(2):
                cx, cw = P @ X.T, P @ W.T
                P, GP = P - cx @ X - cw @ W, GP - cx @ GX - cw @ GW
                norms = P.norm(dim=1, keepdim=True).clamp_min(torch.finfo(P.dtype).tiny)
                P, GP = P / norms, GP / norms
            P, GP, kept_P = _independent_rows(P, GP, 1e-2)
            basis.append(P)
            images.append(GP)
            real.append(kept_P)
        B, GB, real = torch.cat(basis), torch.cat(images), torch.cat(real)   # orthonormal or zero rows
        H = B @ GB.T
        H = (H + H.T) / 2
        # A dropped direction is a zero row of B, so a zero row and column of H: eigh would return it
        # as a Ritz value 0, which is the bottom of the spectrum of a PSD G and would be picked. Its
        # diagonal is moved below every real Ritz value (|θ| ≤ ‖H‖_F) instead; the zero rows then
        # are the n_dropped lowest pairs, skipped by the picks (X's k rows are always real, so at
        # least k pairs remain).
        H = H + torch.diag(torch.where(real, 0.0, -(1 + 2 * H.norm())))
        _, U = symmetric_eigh(H)
        n = B.shape[0]
        n_dropped = (~real).sum()
        top = torch.arange(n - 1, n - 1 - half, -1, device=U.device)
        bottom = n_dropped + torch.arange(half - 1, -1, -1, device=U.device)
        C = _fixed_signs(U.index_select(1, torch.cat([top, bottom]))).T   # (k, n): coefficients in the basis
        X_new, GX_new = C @ B, C @ GB
        P, GP = C[:, k:] @ B[k:], C[:, k:] @ GB[k:]               # the step taken outside the old X
        X, GX = X_new, GX_new
    return TwoEnds(theta, _signs_by_largest_entry(X).reshape(shape), residual, done)


# ---- the penalty and its gradient ----------------------------------------------------------------
def penalty_grad(weight: torch.Tensor, v: torch.Tensor, sign: float | torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """∇_K R = s·∇_K ‖M(K) v‖² (Lemma 2.2 with u = s·v): one convolution and one weight-gradient.
    sign: ±1, a number or a 0-d tensor (the step's, chosen on the device)."""
    with torch.enable_grad():
        w = weight.detach().requires_grad_(True)
        y = conv_matvec(v.unsqueeze(0), w, spec)
        (grad,) = torch.autograd.grad(y, w, (2.0 * sign) * y.detach())
    return grad


@dataclass
class PenaltyStep:
    """One penalty evaluation. `value` = R = |lam|, `lam` the chosen eigenvalue of MᵀM − αI (its sign
    says which end: + the top, − the bottom), `grad` ∇_K R in the weight's dtype, `solve` the two-end
    Ritz pairs of MᵀM, `ambiguous` True when the two ends' |λ − α| are within their error of each
    other (then the end with the larger certified |λ| is used and the step is counted)."""

    value: torch.Tensor
    lam: torch.Tensor
    residual: torch.Tensor
    grad: torch.Tensor
    solve: TwoEnds
    ambiguous: torch.Tensor      # 0-d bool


def choose_end(theta: torch.Tensor, residual: torch.Tensor, alpha: float,
               tie_tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Which Ritz pair gives R = max |λ(MᵀM) − α|: index 0 (top of the spectrum) or k−1 (bottom), as a
    0-d int64 tensor, and whether the choice is ambiguous (0-d bool): tensors, so the step never waits
    for the device. Ritz values lie inside the spectrum, so α − θ_min and θ_max − α are certified lower
    bounds of α − λ_min and λ_max − α when positive; each is within its residual of an eigenvalue.
    Ambiguous: |a_top − a_bottom| ≤ r_top + r_bottom + tie_tol·max(a_top, a_bottom)."""
    a_top, a_bottom = (theta[0] - alpha).abs(), (theta[-1] - alpha).abs()
    err = residual[0] + residual[-1] + tie_tol * torch.maximum(a_top, a_bottom)
    end = torch.where(a_top >= a_bottom, 0, theta.shape[0] - 1).to(torch.int64)
    return end, (a_top - a_bottom).abs() <= err


def spectral_penalty_step(weight: torch.Tensor, spec: ConvSpec, alpha: float, block: torch.Tensor,
                          iters: int, tol: float = 1e-6, tie_tol: float = 1e-3) -> PenaltyStep:
    """One penalty evaluation from the start block `block` (warm start)."""
    dtype = compute_dtype(weight.dtype)
    w = weight.detach().to(dtype)
    solve = two_end_solve(lambda X: gram_matvec(X, w, spec)[1], block.to(device=w.device, dtype=dtype), iters, tol)
    return _penalty_from(solve, weight, w, spec, alpha, tie_tol)


def spectral_penalty_step_sharded(weight: torch.Tensor, spec: ConvSpec, alpha: float, block: torch.Tensor,
                                  iters: int, tol: float, tie_tol: float, shard):
    """spectral_penalty_step when `weight` is the local shard (output channels, dim 0) of a sharded
    kernel: a sharded program (runtime/distributed.py) returning the PenaltyStep, whose gradient is
    that of the local shard (∇ of ‖M v‖² with respect to a row of the kernel needs only that row's
    outputs: local).

    M x restricted to the local output channels is the local convolution, so MᵀM x = Σ over ranks
    of M_localᵀ (M_local x): one all-reduce of x's size per application. Every rank gets the same
    bits, so the solver's vectors and its stopping decisions stay replicated. A rank without output
    channels adds zeros."""
    dtype = compute_dtype(weight.dtype)
    w = weight.detach().to(dtype)
    solver = two_end_solve_program(block.to(device=w.device, dtype=dtype), iters, tol)
    try:
        X = next(solver)
        while True:
            back = torch.zeros_like(X) if w.shape[0] == 0 else gram_matvec(X, w, spec)[1]
            X = solver.send((yield shard.sum(back)))
    except StopIteration as stop:
        solve = stop.value
    return _penalty_from(solve, weight, w, spec, alpha, tie_tol)


def _penalty_from(solve: TwoEnds, weight: torch.Tensor, w: torch.Tensor, spec: ConvSpec, alpha: float,
                  tie_tol: float) -> PenaltyStep:
    """The PenaltyStep of a solve: the end, R, and ∇_K R in the weight's dtype (w: the kernel in the
    compute dtype)."""
    end, ambiguous = choose_end(solve.theta, solve.residual, alpha, tie_tol)
    at_end = end.reshape(1)                 # index_select, not [end]: a tensor index would sync
    lam = solve.theta.index_select(0, at_end)[0] - alpha
    sign = torch.where(lam >= 0, 1.0, -1.0).to(w.dtype)
    if w.shape[0] == 0:                     # a rank without output channels of a sharded kernel
        grad = torch.zeros_like(weight)
    else:
        grad = penalty_grad(w, solve.vectors.index_select(0, at_end)[0], sign, spec).to(weight.dtype)
    return PenaltyStep(lam.abs(), lam, solve.residual.index_select(0, at_end)[0], grad, solve, ambiguous)


def spectral_penalty(weight: torch.Tensor, input_size, alpha: float = 1.0, stride=1, padding=0, dilation=1,
                     groups: int = 1, state: dict | None = None, iters: int = 100, *, padding_mode: str = "zeros",
                     boundary: str = "module", block: int = BLOCK, tol: float = 1e-6,
                     tie_tol: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """R_α(K) = σ_max(MᵀM − αI) of the convolution with kernel `weight` on one input of `input_size`
    (nn.ConvNd arguments), matrix-free. Returns (R, ∇_K R, state); pass the state back to warm-start
    the next call. state: V (the Ritz vectors, `block` per end), theta (Ritz values of MᵀM, largest
    first), residual (‖MᵀM x − θ x‖ of each), lam (the chosen λ of MᵀM − αI), ambiguous (bool).
    R is a certified lower bound (a Rayleigh quotient), exact at convergence. Pure: `state` is not modified."""
    if alpha <= 0:
        raise GeomCompileError(f"alpha must be > 0, got {alpha}")
    spec = conv_spec(weight.shape, input_size, stride, padding, dilation, groups, padding_mode, boundary)
    V = state["V"] if state else initial_block(spec, compute_dtype(weight.dtype), weight.device, block=block)
    if tuple(V.shape[1:]) != spec.input_shape:
        raise GeomCompileError(f"the state's vectors have shape {tuple(V.shape[1:])}, but this convolution "
                               f"acts on inputs of shape {spec.input_shape}; start again with state=None")
    step = spectral_penalty_step(weight, spec, alpha, V, iters, tol, tie_tol)
    return step.value, step.grad, {"V": step.solve.vectors, "theta": step.solve.theta,
                                   "residual": step.solve.residual, "lam": step.lam, "ambiguous": step.ambiguous}


def spectral_estimates(theta: torch.Tensor, residual: torch.Tensor, alpha: float) -> dict[str, float]:
    """What the two-end Ritz pairs (θ of MᵀM, largest first, and their residuals r) say about M.

    sigma_max = √θ_max ≤ σ_max(M) and sigma_min = √θ_min ≥ σ_min(M) are estimates (Rayleigh
    quotients, exact at convergence); sigma_*_residual = r/(2σ) is the first-order error in σ of a
    residual r in σ² (an eigenvalue of MᵀM lies within r of θ). R, lambda_top: the end of larger
    |λ − α| and its residual. sigma_*_bound are Theorem 2.1's bounds √(α ± R). σ_min(M) here is
    √λ_min(MᵀM): 0 when M has fewer rows than columns (stride > 1, fewer output channels)."""
    t, r = [float(x) for x in theta], [float(x) for x in residual]
    top, bottom = t[0] - alpha, t[-1] - alpha
    end = 0 if abs(top) >= abs(bottom) else -1
    R = abs(t[end] - alpha)
    s_max, s_min = math.sqrt(max(t[0], 0.0)), math.sqrt(max(t[-1], 0.0))
    tiny = 1e-300
    return {"R": R, "R_residual": r[end], "lambda_top": t[end] - alpha,
            "sigma_max": s_max, "sigma_max_residual": r[0] / max(2 * s_max, tiny),
            "sigma_min": s_min, "sigma_min_residual": r[-1] / max(2 * s_min, tiny) if s_min > 0 else math.sqrt(r[-1]),
            "sigma_max_bound": math.sqrt(alpha + R), "sigma_min_bound": math.sqrt(max(alpha - R, 0.0))}


# ---- batched over layers: one solve for L layers that share a ConvSpec and a weight shape ----------
# The same algebra as the per-layer code above, with a leading layer axis: (L, k, n) blocks, batched
# eigh / qr, per-layer picks by gather. M of all L layers at once is one grouped convolution (input
# (k, L·C, *size), weight (L·O, I/g, *k), groups L·g) and Mᵀ its explicit adjoint (the input-gradient
# of that convolution, then the adjoint of the padding), so a step has no autograd call and traces
# under torch.compile. The per-layer code stays the reference (tests/test_spectral_batched.py).
_CONV_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
# reflect / replicate: the adjoint of F.pad is the padding's own backward op, the one autograd runs in
# the per-layer program (gram_matvec), so the two agree bit for bit on every element.
_PAD_BACKWARD = {(mode, d): getattr(torch.ops.aten, f"{name}_pad{d}d_backward")
                 for mode, name in (("reflect", "reflection"), ("replicate", "replication")) for d in (1, 2, 3)}


def _symmetric_zeros(spec: ConvSpec) -> bool:
    return spec.padding_mode == "zeros" and all(b == a for b, a in spec.padding)


def _pad(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """The input padded as conv_matvec pads it (nothing for symmetric zeros: the convolution pads)."""
    if _symmetric_zeros(spec):
        return x
    flat = [p for pair in reversed(spec.padding) for p in pair]
    return F.pad(x, flat, mode="constant" if spec.padding_mode == "zeros" else spec.padding_mode)


def pad_adjoint(z: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """The adjoint of `_pad` (zeros: the crop; circular: each padded entry added back onto the entry it
    copies; reflect / replicate: F.pad's backward op, which adds each padded entry back onto the entry
    it mirrors / repeats), on (B, C, *padded size) -> (B, C, *input_size)."""
    if _symmetric_zeros(spec):
        return z
    if spec.padding_mode in ("reflect", "replicate"):
        backward = _PAD_BACKWARD[(spec.padding_mode, len(spec.input_size))]
        like = z.new_empty(()).expand(*z.shape[:2], *spec.input_size)     # read for its shape only
        return backward(z, like, [p for pair in reversed(spec.padding) for p in pair])
    for dim, (n, (b, a)) in enumerate(zip(spec.input_size, spec.padding), start=2):
        core = z.narrow(dim, b, n)
        if spec.padding_mode == "circular":
            # z[j] = x[(j − b) mod n]: the b entries before the core copy x's last b, the a after it x's first a
            if b:
                core = core + F.pad(z.narrow(dim, 0, b), _one_dim(z.dim(), dim, n - b, 0))
            if a:
                core = core + F.pad(z.narrow(dim, b + n, a), _one_dim(z.dim(), dim, 0, n - a))
        z = core
    return z


def _one_dim(ndim: int, dim: int, before: int, after: int) -> list[int]:
    """F.pad's argument that pads only `dim` (F.pad lists the last dimension first)."""
    flat = [0] * (2 * (ndim - 2))
    i = 2 * (ndim - 1 - dim)
    flat[i], flat[i + 1] = before, after
    return flat


def _conv_args(spec: ConvSpec) -> tuple[list[int], list[int], list[int]]:
    padding = [b for b, _ in spec.padding] if _symmetric_zeros(spec) else [0] * len(spec.input_size)
    return list(spec.stride), padding, list(spec.dilation)


def _stack_input(X: torch.Tensor) -> torch.Tensor:
    """(L, k, C, *size) -> (k, L·C, *size): the L layers' blocks as the channels of one input."""
    L, k, C = X.shape[:3]
    return X.transpose(0, 1).reshape(k, L * C, *X.shape[3:])


def conv_layers(X: torch.Tensor, weights: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """M_l x for the blocks X (L, k, C, *size) of L layers with kernels `weights` (L, O, I/g, *k):
    one grouped convolution. Returns (L, k, O, *output size)."""
    L, k = X.shape[:2]
    stride, padding, dilation = _conv_args(spec)
    w = weights.reshape(-1, *weights.shape[2:])                   # (L·O, I/g, *k)
    y = _CONV[w.dim() - 2](_pad(_stack_input(X), spec), w, None, stride, padding, dilation, L * spec.groups)
    return y.reshape(k, L, -1, *y.shape[2:]).transpose(0, 1)


def conv_adjoint_layers(Y: torch.Tensor, weights: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """M_lᵀ y for the blocks Y (L, k, O, *output size) of conv_layers' outputs: the explicit
    input-gradient of the grouped convolution (a transposed convolution with the output padding
    that reaches the padded input size), then the adjoint of the padding. Returns (L, k, C, *size)."""
    L, k = Y.shape[:2]
    stride, padding, dilation = _conv_args(spec)
    w = weights.reshape(-1, *weights.shape[2:])
    padded = [n if _symmetric_zeros(spec) else n + b + a for n, (b, a) in zip(spec.input_size, spec.padding)]
    y = Y.transpose(0, 1).reshape(k, -1, *Y.shape[3:])
    back = _CONV_INPUT[w.dim() - 2]((k, L * spec.in_channels, *padded), w, y, stride, padding, dilation,
                                    L * spec.groups)
    return pad_adjoint(back, spec).reshape(k, L, spec.in_channels, *spec.input_size).transpose(0, 1)


def gram_matvec_layers(X: torch.Tensor, weights: torch.Tensor, spec: ConvSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_l x, M_lᵀ M_l x) for the blocks X (L, k, C, *size) of L layers (gram_matvec per layer):
    one grouped convolution and its explicit adjoint, no autograd."""
    y = conv_layers(X, weights, spec)
    return y, conv_adjoint_layers(y, weights, spec)


def penalty_grad_layers(weights: torch.Tensor, v: torch.Tensor, sign: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """penalty_grad of L layers: weights (L, O, I/g, *k), v (L, C, *size), sign (L,); per layer one
    convolution and one explicit weight-gradient (no autograd). Per layer, not grouped: oneDNN's
    grouped weight-gradient rounds differently from a layer's own (1 ulp, measured), and the next
    step's warm-started solve amplified that 1e4-fold in the bottom Ritz vectors of a layer with a
    clustered spectrum (tests/test_spectral_batched.py); these are 2 of the step's ~50 operator calls
    per layer, so the batching is not lost where it counts (the solve)."""
    stride, padding, dilation = _conv_args(spec)
    conv, conv_weight = _CONV[weights.dim() - 3], _CONV_WEIGHT[weights.dim() - 3]
    grads = []
    for w, x, s in zip(weights.unbind(0), _pad(v, spec).unbind(0), sign.unbind(0)):
        x = x.unsqueeze(0)
        y = conv(x, w, None, stride, padding, dilation, spec.groups)
        grads.append(conv_weight(x, tuple(w.shape), (2.0 * s).to(y.dtype) * y, stride, padding, dilation, spec.groups))
    return torch.stack(grads)


def _orthonormal_rows_layers(V: torch.Tensor, nudge: torch.Tensor) -> torch.Tensor:
    """_orthonormal_rows per layer of V (L, b, n); `nudge` (b, n) is its fixed perturbation
    (nudge_noise), made outside so that a compiled step holds no generator."""
    tiny = torch.finfo(V.dtype).tiny
    Q, Rf = torch.linalg.qr(V.mT)
    d = Rf.diagonal(dim1=-2, dim2=-1).abs()
    collapsed = (d <= 1e3 * torch.finfo(V.dtype).eps * d.amax(dim=-1, keepdim=True).clamp_min(tiny)).any(dim=-1)
    norms = torch.linalg.vector_norm(V, dim=(-2, -1)).clamp_min(tiny)[:, None, None]
    nudged, _ = torch.linalg.qr((V / norms + 1e-3 * nudge.to(V)).mT)
    return torch.where(collapsed[:, None, None], nudged, Q).mT


def nudge_noise(shape: tuple[int, int], dtype: torch.dtype, device=None) -> torch.Tensor:
    """The fixed perturbation _orthonormal_rows adds to a collapsed block of `shape` (b, n)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


@lru_cache(maxsize=64)
def nudge_of(spec: ConvSpec, block: int, dtype: torch.dtype, device) -> torch.Tensor:
    """nudge_noise for the start blocks of `spec` (shared, never written; made on the host, outside
    any compiled function: a torch.Generator cannot be traced)."""
    k = 2 * max(1, min(block, math.prod(spec.input_shape) // 2))
    return nudge_noise((k, math.prod(spec.input_shape)), compute_dtype(dtype), device)


def _independent_rows_layers(D: torch.Tensor, GD: torch.Tensor | None, drop: float):
    """_independent_rows per layer of D (L, m, n): `kept` is (L, m)."""
    tiny = torch.finfo(D.dtype).tiny
    C = D @ D.mT
    d, U = symmetric_eigh((C + C.mT) / 2)
    kept = d > drop * d.amax(dim=-1, keepdim=True).clamp_min(tiny)
    T = (U * torch.where(kept, d.clamp_min(tiny).rsqrt(), 0.0)[:, None, :]).mT
    return T @ D, (None if GD is None else T @ GD), kept


def two_end_solve_layers(apply_G: Callable[[torch.Tensor], torch.Tensor], V: torch.Tensor, iters: int,
                         nudge: torch.Tensor) -> TwoEnds:
    """two_end_solve_program for L layers at once, with tol = 0 (exactly `iters` iterations, no host
    decision): V (L, k, *shape), apply_G maps such a block of every layer to G_l of it. The TwoEnds
    has a leading layer axis (theta, residual (L, k); vectors (L, k, *shape)). Step for step the
    per-layer algebra: the same dropped-row sentinels, picks and sign rule, per layer."""
    if iters < 1:
        raise GeomCompileError(f"solver iterations must be >= 1, got {iters}")
    shape, (L, k) = V.shape, V.shape[:2]
    half = k // 2
    drop = 1e3 * torch.finfo(V.dtype).eps
    tiny = torch.finfo(V.dtype).tiny
    X = _orthonormal_rows_layers(V.reshape(L, k, -1), nudge)
    GX = apply_G(X.reshape(shape)).reshape(L, k, -1)
    P = GP = None
    done = 0
    while True:
        H = X @ GX.mT
        theta, U = symmetric_eigh((H + H.mT) / 2)
        theta, U = theta.flip(-1), _fixed_signs(U.flip(-1))
        X, GX = U.mT @ X, U.mT @ GX
        W = GX - theta[..., None] * X
        residual = W.norm(dim=-1)
        if done == iters:
            break
        done += 1
        for _ in range(2):
            W = W - (W @ X.mT) @ X
            W = W / W.norm(dim=-1, keepdim=True).clamp_min(tiny)
        W, _, kept_W = _independent_rows_layers(W, None, drop)
        GW = apply_G(W.reshape(L, -1, *shape[2:])).reshape(L, W.shape[1], -1)
        basis, images, real = [X, W], [GX, GW], [torch.ones_like(kept_W), kept_W]
        if P is not None:
            long_enough = (P.norm(dim=-1, keepdim=True) > 10 * math.sqrt(torch.finfo(P.dtype).eps)).to(P.dtype)
            P, GP = P * long_enough, GP * long_enough
            for _ in range(2):
                cx, cw = P @ X.mT, P @ W.mT
                P, GP = P - cx @ X - cw @ W, GP - cx @ GX - cw @ GW
                norms = P.norm(dim=-1, keepdim=True).clamp_min(tiny)
                P, GP = P / norms, GP / norms
            P, GP, kept_P = _independent_rows_layers(P, GP, 1e-2)
            basis.append(P)
            images.append(GP)
            real.append(kept_P)
        B, GB, real = torch.cat(basis, dim=1), torch.cat(images, dim=1), torch.cat(real, dim=1)
        H = B @ GB.mT
        H = (H + H.mT) / 2
        # the per-layer code's sentinel: a dropped row's diagonal below every real Ritz value of its layer
        sentinel = -(1 + 2 * torch.linalg.matrix_norm(H))[:, None]
        H = H + torch.diag_embed(torch.where(real, 0.0, sentinel))
        _, U = symmetric_eigh(H)
        n = B.shape[1]
        n_dropped = (~real).sum(dim=-1, keepdim=True)                       # (L, 1)
        top = torch.arange(n - 1, n - 1 - half, -1, device=U.device).expand(L, half)
        bottom = n_dropped + torch.arange(half - 1, -1, -1, device=U.device)
        picks = torch.cat([top, bottom], dim=1)                              # (L, k)
        C = _fixed_signs(U.gather(2, picks[:, None, :].expand(L, n, k))).mT   # (L, k, n)
        X_new, GX_new = C @ B, C @ GB
        P, GP = C[:, :, k:] @ B[:, k:], C[:, :, k:] @ GB[:, k:]
        X, GX = X_new, GX_new
    return TwoEnds(theta, _signs_by_largest_entry(X).reshape(shape), residual, done)


# The solve is one opaque operator (torch.library.custom_op) inside a compiled step: inductor's own
# reductions (the residual norms, the Gram products' fusions) round differently from eager's by an ulp,
# and the block eigensolver amplifies that (measured: one compiled step of a 6x3x3x3 layer from the
# eager step's inputs, V off by 1.4e-6 with the solve traced; bit-identical as one operator; over a
# few training steps such differences grow past the registry's 1e-5). Inside the operator every
# op is eager's; the convolutions stay batched, and the graph around it (the end, the gradient, the
# state and gradient update) is still compiled. It holds no host read: on a GPU its small
# eigenproblems run the Jacobi kernel (symmetric_eigh) up to block 2; a larger block's eigh calls read
# their error info on the host (torch's _linalg_check_errors: docs/spectral.md).
@torch.library.custom_op("geomcompile::spectral_two_end_solve_layers", mutates_args=())
def _solve_layers_op(weights: torch.Tensor, V: torch.Tensor, nudge: torch.Tensor, input_size: list[int],
                     in_channels: int, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                     padding_mode: str, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = ConvSpec(tuple(input_size), in_channels, tuple(stride), tuple(zip(padding[::2], padding[1::2])),
                    tuple(dilation), groups, padding_mode)
    solve = two_end_solve_layers(lambda X: gram_matvec_layers(X, weights, spec)[1], V, iters, nudge)
    return solve.theta.contiguous(), solve.vectors.contiguous(), solve.residual.contiguous()


@_solve_layers_op.register_fake
def _(weights, V, nudge, input_size, in_channels, stride, padding, dilation, groups, padding_mode, iters):
    L, k = V.shape[:2]
    return V.new_empty(L, k), V.new_empty(V.shape), V.new_empty(L, k)


def solve_layers(weights: torch.Tensor, spec: ConvSpec, V: torch.Tensor, iters: int, nudge: torch.Tensor) -> TwoEnds:
    """two_end_solve_layers on the layers' operators MᵀM (gram_matvec_layers), as one operator."""
    if iters < 1:
        raise GeomCompileError(f"solver iterations must be >= 1, got {iters}")
    theta, vectors, residual = _solve_layers_op(weights, V, nudge, list(spec.input_size), spec.in_channels,
                                                list(spec.stride), [p for pair in spec.padding for p in pair],
                                                list(spec.dilation), spec.groups, spec.padding_mode, iters)
    return TwoEnds(theta, vectors, residual, iters)


def spectral_penalty_step_layers(weights: torch.Tensor, spec: ConvSpec, alpha: float, V: torch.Tensor,
                                 iters: int, tie_tol: float, nudge: torch.Tensor) -> PenaltyStep:
    """spectral_penalty_step for L layers at once (weights (L, O, I/g, *k), V (L, k, C, *size)), with
    no early stop (a warm-started step). Every field of the PenaltyStep has a leading layer axis; the
    gradient is in the weights' dtype."""
    dtype = compute_dtype(weights.dtype)
    w = weights.detach().to(dtype)
    solve = solve_layers(w, spec, V.to(device=w.device, dtype=dtype).contiguous(), iters, nudge.to(dtype))
    theta, residual = solve.theta, solve.residual
    a_top, a_bottom = (theta[:, 0] - alpha).abs(), (theta[:, -1] - alpha).abs()
    err = residual[:, 0] + residual[:, -1] + tie_tol * torch.maximum(a_top, a_bottom)
    end = torch.where(a_top >= a_bottom, 0, theta.shape[1] - 1).to(torch.int64)[:, None]     # (L, 1)
    ambiguous = (a_top - a_bottom).abs() <= err
    lam = theta.gather(1, end)[:, 0] - alpha
    sign = torch.where(lam >= 0, 1.0, -1.0).to(dtype)
    L = V.shape[0]
    v = solve.vectors.reshape(L, V.shape[1], -1).gather(1, end[:, :, None].expand(L, 1, math.prod(spec.input_shape)))
    grad = penalty_grad_layers(w, v.reshape(L, *spec.input_shape), sign, spec).to(weights.dtype)
    return PenaltyStep(lam.abs(), lam, residual.gather(1, end)[:, 0], grad, solve, ambiguous)


def add_penalty(grad: torch.Tensor, penalty: torch.Tensor, coef: float) -> torch.Tensor:
    """grad + coef·penalty, summed in float32 and stored in grad's dtype (saturating, base.fit_dtype).
    An explicit product, not add(alpha=coef): ATen's add with alpha is a fused multiply-add on CPU
    and inductor's is not, so only the explicit form rounds alike eager and compiled (measured)."""
    work = compute_dtype(grad.dtype)
    return fit_dtype(grad.to(work) + penalty.to(work) * coef, grad.dtype)


def take_layers(step: PenaltyStep, grads: Sequence[torch.Tensor], weights: torch.Tensor, states: Sequence[dict],
                coef: float) -> tuple[list[torch.Tensor], list[dict]]:
    """Spectral._take for L layers, pure: (the new gradients, per layer the state entries to set:
    V, theta, residual, ambiguous, nonfinite_steps). `weights` (L, …) are the raw weights (their
    non-finite entries are counted); steps and calls are the host's (Spectral.host_step)."""
    L = weights.shape[0]
    vectors = step.solve.vectors.reshape(L, -1)
    solved = torch.isfinite(vectors).all(dim=1) & torch.isfinite(step.solve.theta).all(dim=1)
    bad = ~(torch.isfinite(weights.reshape(L, -1)).all(dim=1) & solved)
    new_grads, updates = [], []
    for i, (grad, state) in enumerate(zip(grads, states)):
        keep = lambda new, old: torch.where(solved[i], new, old.to(new))
        updates.append({"V": keep(step.solve.vectors[i], state["V"]), "theta": keep(step.solve.theta[i], state["theta"]),
                        "residual": keep(step.solve.residual[i], state["residual"]),
                        "ambiguous": state["ambiguous"] + step.ambiguous[i].to(torch.int64),
                        "nonfinite_steps": state["nonfinite_steps"] + bad[i].to(state["nonfinite_steps"])})
        if coef:
            grad = add_penalty(grad, torch.where(solved[i] & torch.isfinite(step.grad[i]), step.grad[i], 0.0), coef)
        new_grads.append(grad)
    return new_grads, updates


# ---- the geometry --------------------------------------------------------------------------------
def _input_size_check(value) -> str | None:
    if value in ("auto", "largest") or (isinstance(value, list) and value and
                                        all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return None
    return f"expected 'largest', 'auto' or a list of positive integers like [32, 32], got {value!r}"


def _sizes(facts: ParamFacts) -> list[tuple[int, ...]]:
    """The spatial input sizes the layer runs at in the example inputs (several for a shared head)."""
    shapes = facts.input_shapes or ((facts.input_shape,) if facts.input_shape is not None else ())
    return list(dict.fromkeys(tuple(s[2:]) for s in shapes))


# Documented maxima of the solver's iteration counts: each iteration applies MᵀM to 2·block vectors of
# every layer at every step, so a larger count stalls training rather than helping it.
MAX_ITERS = Range(1, 1000, why_high="each iteration applies MᵀM to 2·block vectors per layer per step")
MAX_INIT_ITERS = Range(1, 10_000, why_high="the first step would stall training")
MAX_BLOCK = Range(1, 64, why_high="the Rayleigh-Ritz solve is cubic in the block")


@register
class Spectral(Geometry):
    name = "spectral"
    stage = "penalty"
    paper = "004_433ab1764c3faa0c.txt"
    match_hint = "add `kind: conv` to match"
    shard_refusal = None      # sharded form: sharded_gram_matvec (groups=1; shard_check refines it)
    # batched over the layers of a bucket (CompiledSpectral, kernels/spectral.SpectralFamily: no Triton kernel)
    fast_paths = {"compile": "geomcompile.geometries.spectral:CompiledSpectral",
                  "triton": "geomcompile.kernels.spectral:SpectralFamily"}
    options = {
        "alpha": Option(float, 1.0, "α > 0: the penalty σ_max(MᵀM − αI) pulls the squared singular values "
                                    "of M towards α", check=Range(0, 1e6, low_open=True, why_high="beyond it αI swamps MᵀM and float32 cannot resolve its spectrum")),
        "coef": Option(float, 1.0e-4, "weight of the penalty gradient added to the loss gradient",
                       check=Range(0, 1e6, why_high="the penalty would outweigh any loss gradient by a million")),
        "input_size": Option((str, list), "auto", "'auto' (the layer's input size from example_inputs; a "
                                                  "layer run at several sizes needs a choice), 'largest' (the "
                                                  "largest of those sizes) or the spatial size, e.g. [32, 32]",
                             check=_input_size_check,
                             schema={"anyOf": [{"enum": ["auto", "largest"]},
                                               {"type": "array", "minItems": 1,
                                                "items": {"type": "integer", "exclusiveMinimum": 0}}]}),
        "boundary": Option(str, "module", "module (the conv's own padding) or circular (periodic)",
                           choices=("module", "circular")),
        "power_iters": Option(int, 1, "solver iterations per step, warm-started (each applies MᵀM once to "
                                      "2·block vectors; the first of a step twice)", check=MAX_ITERS),
        "init_iters": Option(int, 100, "solver iterations at most at a layer's first penalty step (nothing to "
                                       "warm-start from), stopped early at tol",
                             check=MAX_INIT_ITERS),
        "block": Option(int, BLOCK, "Ritz vectors kept at each end of the spectrum", check=MAX_BLOCK),
        "tol": Option(float, 1.0e-6, "stop the first evaluation's iterations (init_iters) once every residual is "
                                     "<= tol·σ_max² (0: never); later steps run exactly power_iters",
                      check=Range(0, 1)),
        "tie_tol": Option(float, 1.0e-3, "the ends' |λ − α| closer than their residuals plus tie_tol·R count "
                                         "as an ambiguous step", check=Range(0, 1)),
        "every": Option(int, 1, "apply the penalty every k optimizer steps", check=Range(1, 10**9)),
    }

    def check(self, facts: ParamFacts) -> str | None:
        if facts.kind != "conv":
            return f"spectral needs a convolution weight; {facts.name} is kind {facts.kind!r}"
        if len(facts.shape) - 2 not in _CONV:
            return f"spectral supports 1-, 2- and 3-d convolutions; {facts.name} has shape {tuple(facts.shape)}"
        if "kernel_size" not in facts.layer:
            return (f"{facts.name} is used by a functional convolution ({facts.module}); its stride and padding "
                    f"are not known to the analysis. Use an nn.Conv module")
        return None

    def shard_check(self, facts: ParamFacts) -> str | None:
        if facts.layer.get("groups", 1) != 1:
            return (f"has a sharded form for groups=1 only ({facts.name} has groups={facts.layer['groups']}: the "
                    f"local output channels would cut through its groups)")
        return None

    def input_size(self, facts: ParamFacts) -> tuple[tuple[int, ...], str]:
        """(spatial size of M's input, how it was chosen) from the `input_size` option.

        A layer run at several input sizes (a head shared over FPN levels) has one operator per
        size. `largest` takes the largest (by number of positions): with zero padding the operator at a
        smaller size is a block of it (embed the input with zeros, restrict the output), so its σ_max
        bounds theirs; σ_min has no such bound. `auto` refuses to choose and says so."""
        size = self.opts["input_size"]
        if isinstance(size, list):
            return tuple(size), "given"
        sizes = _sizes(facts)
        if not sizes:
            raise GeomCompileError(
                f"spectral on {facts.name}: input_size is {size!r} but the input size of {facts.module} is "
                f"unknown. Fix: pass example_inputs=(x,) to gc.plan / gc.apply, or set `input_size: "
                f"[H, W]` in the policy")
        if len(sizes) == 1:
            return sizes[0], "from example_inputs"
        listed = ", ".join("x".join(map(str, s)) for s in sizes)
        if size == "auto":
            raise GeomCompileError(
                f"spectral on {facts.name}: {facts.module} runs at {len(sizes)} input sizes ({listed}) in "
                f"example_inputs, so input_size 'auto' has no single size. Fix: set `input_size: largest` "
                f"(the operator at the largest size; its sigma_max bounds the others') or `input_size: "
                f"[H, W]` in the policy")
        largest = max(sizes, key=lambda s: (math.prod(s), s))
        return largest, f"largest of the {len(sizes)} sizes it runs at: {listed}"

    def spec(self, facts: ParamFacts) -> ConvSpec:
        size, _ = self.input_size(facts)
        layer = facts.layer
        try:
            return conv_spec(facts.shape, list(size), layer["stride"], layer["padding"], layer["dilation"],
                             layer["groups"], layer.get("padding_mode", "zeros"), self.opts["boundary"])
        except GeomCompileError as e:
            raise GeomCompileError(f"spectral on {facts.name}: {e}. Fix: check `input_size` "
                                   f"(now {self.opts['input_size']!r}) or the layer") from None

    def units(self, facts: Sequence[ParamFacts], structure=None) -> list[Unit]:
        for f in facts:
            self.spec(f)             # fail at install, with the fix, rather than at the first step
        return super().units(facts, structure)

    def on_install(self, unit: Unit, state: dict, ctx: StepContext) -> list[str]:
        facts = unit.single(self.name)
        size, how = self.input_size(facts)
        return [f"spectral {facts.name}: operator on inputs of size {'x'.join(map(str, size))} ({how})"]

    def init_state(self, unit: Unit, ctx: StepContext) -> dict:
        facts = unit.single(self.name)
        weight = ctx.params[facts.name]
        seed = zlib.crc32(unit.key.encode())       # reproducible per layer, global RNG untouched
        block = initial_block(self.spec(facts), compute_dtype(weight.dtype), weight.device, seed, self.opts["block"])
        zeros = torch.zeros(block.shape[0], dtype=block.dtype)
        # calls: optimizer steps this unit took part in (for `every`); steps: penalty evaluations;
        # ambiguous: steps whose two ends were within their error of each other.
        # nonfinite_steps: evaluations whose weight had a NaN/Inf entry or whose solve overflowed.
        counter = torch.zeros((), dtype=torch.int64, device=weight.device)     # device counters: no sync
        return {"V": block, "theta": zeros, "residual": zeros.clone(), "steps": 0, "calls": 0,
                "ambiguous": counter, "nonfinite_steps": counter.clone()}

    def pre_step(self, unit: Unit, grads, state, ctx: StepContext) -> None:
        facts, (grad,) = unit.single(self.name), grads
        if grad is None:
            return
        shard = ctx.shard(facts.name)
        if shard is None:
            self.step_layer(self.spec(facts), ctx.params[facts.name].detach(), grad, state)
            return
        due, iters, tol = self._schedule(state)
        if not due:
            return
        weight = local(ctx.params[facts.name]).detach()       # sharded: the local output channels
        ctx.run_sharded(self._sharded(spectral_penalty_step_sharded(
            finite_entries(weight), self.spec(facts), self.opts["alpha"], state["V"], iters,
            tol, self.opts["tie_tol"], shard), local(grad), state, weight))

    def _schedule(self, state: dict) -> tuple[bool, int, float]:
        """Host side (Python ints, no sync): count the call, and say whether the penalty is evaluated
        at this step (`every`) and with how many iterations and which early-stop tolerance.

        The first evaluation has nothing to warm-start from: up to init_iters iterations, stopped early
        at tol (on CPU tensors a host decision per iteration; on a device all init_iters run and the
        early stop is a torch.where: two_end_solve_program). Every later one runs exactly power_iters
        iterations with no early stop."""
        calls = state.get("calls", 0)
        state["calls"] = calls + 1
        if calls % self.opts["every"]:
            return False, 0, 0.0
        if not state["steps"]:
            return True, max(self.opts["init_iters"], self.opts["power_iters"]), self.opts["tol"]
        return True, self.opts["power_iters"], 0.0

    def step_layer(self, spec: ConvSpec, weight: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        """The per-layer program of an unsharded layer (the reference): pre_step's work on `grad`, in place.

        A NaN/Inf entry of the weight (left by an earlier non-finite step) would turn the warm-started
        vectors NaN for good: the solve sees it as 0, and a solve that still comes out non-finite
        (overflow) keeps the previous vectors and adds no penalty. The entry itself stays as the
        base optimizer leaves it, as in plain torch. Branch free (torch.where): no host sync."""
        due, iters, tol = self._schedule(state)
        if due:
            self._take(spectral_penalty_step(finite_entries(weight), spec, self.opts["alpha"], state["V"],
                                             iters, tol, self.opts["tie_tol"]), grad, state, weight)

    # -- batched over layers (the compile and triton fast paths) ---------------------------------
    def joins_batch(self, state: dict) -> bool:
        """Whether this step of a unit can be part of a batched step (host side, Python ints only): it
        is due (`every`) and it is not the layer's first evaluation (init_iters with the early stop at
        tol, once per layer: the per-layer program runs it). When True,
        host_step_of_batch must follow; when False, step_layer (or pre_step) runs the unit."""
        return not state.get("calls", 0) % self.opts["every"] and bool(state["steps"])

    @staticmethod
    def host_step_of_batch(state: dict) -> None:
        """The host part of a batched step of a unit (what _schedule and _take do to Python ints)."""
        state["calls"] = state.get("calls", 0) + 1
        state["steps"] += 1

    def transform_layers(self, spec: ConvSpec, weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                         states: Sequence[dict], nudge: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
        """The tensor part of one warm-started step of L layers sharing `spec`, a weight shape, dtype and
        device, pure: (the new gradients, per layer the state entries to set). One solve over all L
        (spectral_penalty_step_layers), then _take per layer (take_layers). `nudge`: nudge_of(...)."""
        raw = torch.stack([w.detach() for w in weights])
        V = torch.stack([s["V"] for s in states])
        step = spectral_penalty_step_layers(finite_entries(raw), spec, self.opts["alpha"], V,
                                            self.opts["power_iters"], self.opts["tie_tol"], nudge)
        return take_layers(step, grads, raw, states, self.opts["coef"])

    def step_layers(self, specs: Sequence[ConvSpec], weights: Sequence[torch.Tensor],
                    grads: Sequence[torch.Tensor | None], states: Sequence[dict]) -> None:
        """pre_step for a bucket of unsharded layers, in place and uncompiled: the layers that join a
        batched step (joins_batch) are solved together per (spec, weight shape, dtype, device), the
        others run the per-layer program. The same results as pre_step per layer."""
        batches: dict[tuple, list[int]] = {}
        for i, (spec, weight, grad, state) in enumerate(zip(specs, weights, grads, states)):
            if grad is None:
                continue
            if not self.joins_batch(state):
                self.step_layer(spec, weight.detach(), grad, state)
                continue
            self.host_step_of_batch(state)
            batches.setdefault((spec, tuple(weight.shape), weight.dtype, weight.device), []).append(i)
        for (spec, _, dtype, device), index in batches.items():
            nudge = nudge_of(spec, self.opts["block"], dtype, device)
            new, updates = self.transform_layers(spec, [weights[i] for i in index], [grads[i] for i in index],
                                                 [states[i] for i in index], nudge)
            for i, grad, update in zip(index, new, updates):
                grads[i].copy_(grad)
                states[i].update(update)

    def _sharded(self, program, grad: torch.Tensor, state: dict, weight: torch.Tensor):
        self._take((yield from program), grad, state, weight)

    def _take(self, step: PenaltyStep, grad: torch.Tensor, state: dict, weight: torch.Tensor) -> None:
        """Keep the solve (warm start, diagnostics) unless it came out non-finite, and add coef·∇R
        to the gradient. Sharded, the vectors and θ are replicated, so every rank decides alike."""
        solved = torch.isfinite(step.solve.vectors).all() & torch.isfinite(step.solve.theta).all()
        count_nonfinite(state, "nonfinite_steps", weight, step.solve.vectors, step.solve.theta)
        keep = lambda new, old: torch.where(solved, new, old.to(new))
        state.update(V=keep(step.solve.vectors, state["V"]), theta=keep(step.solve.theta, state["theta"]),
                     residual=keep(step.solve.residual, state["residual"]),
                     steps=state["steps"] + 1, ambiguous=state.get("ambiguous", 0) + step.ambiguous.to(torch.int64))
        if self.opts["coef"]:
            penalty = torch.where(solved & torch.isfinite(step.grad), step.grad, 0.0)
            # the sum in float32, stored in grad's dtype (saturating, base.fit_dtype)
            grad.copy_(add_penalty(grad, penalty, self.opts["coef"]))

    def diagnostics(self, unit: Unit, state) -> dict[str, float]:
        if not state.get("steps"):
            return {}
        return {**spectral_estimates(state["theta"], state["residual"], self.opts["alpha"]),
                "steps": float(state["steps"]), "ambiguous_steps": float(state.get("ambiguous", 0)),
                "nonfinite_steps": float(state.get("nonfinite_steps", 0))}


# ---- fast paths -----------------------------------------------------------------------------------
class CompiledSpectral:
    """The compile fast path (protocol: runtime/compile_backend.Program): a warm-started step of every
    layer of a bucket that shares (ConvSpec, weight shape, dtype, device) as one batched solve
    (Spectral.transform_layers: grouped convolutions, batched eigh), compiled per bucket.

    What stays on the host, per unit and step (host_step, Python ints: no sync, and nothing that
    makes dynamo specialise on a changing int): the `every` schedule and the counters calls / steps.
    A unit that is not due this step (it only counts the call) and a layer's first evaluation (init_iters
    with the early stop at tol: host decisions) run Spectral.pre_step, the per-layer program. Every
    padding mode is batched (pad_adjoint)."""

    name = "spectral"
    uses_weights = True
    retracts = False
    # inductor's layout optimisation runs a conv-heavy graph channels-last, which on CPU rounds the
    # adjoint's transposed convolution differently from eager (1e-6 relative, measured); the block
    # eigensolver amplifies that tenfold in its bottom Ritz vectors, beyond the registry's parity
    # tolerance. Without it the graph's convolutions are eager's own calls.
    inductor_config = {"layout_optimization": False}
    state_keys = ("V", "theta", "residual", "ambiguous", "nonfinite_steps")

    def layout(self, geometry, facts):
        return geometry.spec(facts)

    def host_step(self, geometry, unit, state):
        spec = geometry.spec(unit.single(geometry.name))
        if not geometry.joins_batch(state):
            return None
        geometry.host_step_of_batch(state)
        return {"nudge": nudge_of(spec, geometry.opts["block"], state["V"].dtype, state["V"].device)}

    def transform_with_state(self, geometry, layouts, grads, weights, states):
        out: list = [None] * len(grads)
        updates: list = [None] * len(grads)
        batches: dict[tuple, list[int]] = {}
        for i, (spec, weight) in enumerate(zip(layouts, weights)):
            batches.setdefault((spec, tuple(weight.shape), weight.dtype), []).append(i)
        for (spec, _, _), index in batches.items():
            new, update = geometry.transform_layers(spec, [weights[i] for i in index], [grads[i] for i in index],
                                                    [states[i] for i in index], states[index[0]]["nudge"])
            for i, grad, u in zip(index, new, update):
                out[i], updates[i] = grad, u
        return out, updates

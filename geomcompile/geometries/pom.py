"""Products of weight manifolds, FG-SGD (seed 001_a492d199b2994eaf.txt, Ozay, "Fine-grained
Optimization of Deep Neural Networks").

A conv weight W ∈ R^{O×I×kh×kw} is cut into *components*: the kernels W_{o,i} ∈ R^{kh×kw} (the
paper's W_{c,d,l}), or whole filters w[o]. Every component lives on its own manifold of radius r
(Table 2): the sphere ‖W‖_F = r, the oblique manifold (every column has norm r), or the Stiefel
manifold WᵀW = r²·I. Components are grouped (PI: one output channel across input channels; PO:
one input channel across output channels; PIO: blocks of both) and each group ω_g is a point of
the product manifold M_g = ×_ι M_ι (Definition 1). One FG-SGD step (Algorithm 1):

    line 5   grad L(ω_ι) = Π_{ω_ι}(grad_E L(ω_ι))            tangent projection per component
             R_g = (Σ_{ι∈g} ‖grad L(ω_ι)‖²)^{1/2}            Theorem 1, eq. 6
    line 6   v = −lr/ζ_g · grad L(ω_g),  ζ_g = max{1, R_g²(2 + R_g)²}^{1/2}     eqs. 3, 7
    line 7   ω^{t+1} = φ(v, 𝔑)                                retraction onto the manifold of radius 𝔑

The radius 𝔑 = γ/λ (section 4): γ = 1, a number, or the geometric scale γ = (b + b̂)^{-1/2} of
eq. 2 (b = fan-in of one output unit, b̂ = C_out·H_out·W_out), optionally divided by λ, the running
standard deviation of the layer's input features.

The pure functions below are the reference; ``POM`` is a thin shell: the base optimizer makes line
6's step with the ζ-normalised tangent gradient that ``pre_step`` writes, ``post_step`` retracts.

A component that is exactly zero has no direction to rescale. Retraction maps it to a fixed
point: ``ones/√n`` for a sphere or an oblique column, the first k columns of the identity for a
Stiefel n×k component (all times r), so zero-initialised weights start on the manifold too.
"""
from __future__ import annotations

import math
import weakref
import zlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..analysis.facts import ParamFacts
from ..errors import GeomCompileError
from ..findings import Finding
from ..names import get_canonical_submodule
from ..runtime.distributed import local
from .base import (Geometry, Option, Range, StepContext, Unit, compute_dtype, count_nonfinite, finite_entries,
                   fit_dtype, pass_nonfinite, pass_nonfinite_sharded, register, unless_skipped)

def _r(r, like: torch.Tensor) -> torch.Tensor | float:
    """A radius as a float, or as a tensor shaped to broadcast over (…, n, k) components."""
    if isinstance(r, torch.Tensor):
        r = r.to(like.dtype)
        return r.reshape(r.shape + (1, 1)) if r.dim() else r
    return float(r)


def _sq_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x‖²_F per component, shape (…, 1, 1)."""
    return (x * x).sum(dim=(-2, -1), keepdim=True)


# ---- manifolds: the tangent projection Π_ω(g) and the retraction φ(x) onto radius r ----------------
def proj_sphere(w: torch.Tensor, g: torch.Tensor, r=1.0) -> torch.Tensor:
    """Sphere ‖w‖_F = r:  Π_w(g) = g − ⟨g, w⟩·w/r²."""
    return g - (g * w).sum(dim=(-2, -1), keepdim=True) * w / _r(r, w) ** 2


def proj_oblique(w: torch.Tensor, g: torch.Tensor, r=1.0) -> torch.Tensor:
    """Oblique (every column w_j has norm r):  Π_w(g)_j = g_j − ⟨g_j, w_j⟩·w_j/r²."""
    return g - (g * w).sum(dim=-2, keepdim=True) * w / _r(r, w) ** 2


def proj_stiefel(w: torch.Tensor, g: torch.Tensor, r=1.0) -> torch.Tensor:
    """Stiefel WᵀW = r²·I:  Π_W(G) = G − W·sym(WᵀG)/r²,  sym(A) = (A + Aᵀ)/2."""
    wtg = w.mT @ g
    return g - w @ ((wtg + wtg.mT) / 2) / _r(r, w) ** 2


def _canonical_sphere(x: torch.Tensor) -> torch.Tensor:
    """The fixed point for a zero component: every entry 1/√(n·k)."""
    return torch.full_like(x, 1.0 / math.sqrt(x.shape[-2] * x.shape[-1]))


def retract_sphere(x: torch.Tensor, r=1.0) -> torch.Tensor:
    """φ(x) = r·x/‖x‖_F (the metric projection onto the sphere); a zero component -> r·ones/√(nk)."""
    norm = _sq_norm(x).sqrt()
    safe = torch.where(norm == 0, _canonical_sphere(x), x / norm.clamp_min(torch.finfo(x.dtype).tiny))
    return safe * _r(r, x)


def retract_oblique(x: torch.Tensor, r=1.0) -> torch.Tensor:
    """φ(x)_j = r·x_j/‖x_j‖ per column; a zero column -> r·ones/√n."""
    norm = (x * x).sum(dim=-2, keepdim=True).sqrt()
    fixed = torch.full_like(x, 1.0 / math.sqrt(x.shape[-2]))
    safe = torch.where(norm == 0, fixed, x / norm.clamp_min(torch.finfo(x.dtype).tiny))
    return safe * _r(r, x)


def _canonical_frame(x: torch.Tensor) -> torch.Tensor:
    """The first k columns of the n×n identity, broadcast like x."""
    eye = torch.eye(x.shape[-2], x.shape[-1], dtype=x.dtype, device=x.device)
    return eye.expand_as(x)


# Newton iterations of polar_factor: measured (fp64 and fp32, n×k from 3×3 to 64×32, condition
# numbers 1 to 1e15) every iterate had stopped changing by the 8th; an orthogonal Z is the
# iteration's fixed point, so the extra ones only cost time.
POLAR_ITERATIONS = 10


def _positive_qr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = QR (reduced, Householder) with the signs making diag(R) ≥ 0: Q is unique where x has full rank."""
    q, rr = torch.linalg.qr(x)
    sign = torch.where(torch.diagonal(rr, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
    return q * sign.unsqueeze(-2), rr * sign.unsqueeze(-1)


def polar_factor(x: torch.Tensor, iters: int = POLAR_ITERATIONS) -> torch.Tensor:
    """U Vᵀ of x = U Σ Vᵀ (…, n, k with n ≥ k): the orthonormal polar factor, the closest point of the
    Stiefel manifold to x, without an SVD (torch's SVD reads its solver's error code on the host on a
    GPU: a sync per call). x = Q R (Householder QR, sync-free), so polar(x) = Q · polar(R), and the
    polar factor of the square R is Newton's iteration with Frobenius-norm scaling (Higham, Functions
    of Matrices, 2008, §8.6):

        Z₀ = R,   Z ← (ζ Z + ζ⁻¹ Z⁻ᵀ) / 2,   ζ = (‖Z⁻¹‖_F / ‖Z‖_F)^{1/2},

    run a fixed `iters` times (no convergence test on the host), the inverse by torch.linalg.inv_ex
    without its error check. Where R is singular in the working precision (x of lower rank, whose
    polar factor is not unique) the iterate overflows or is not orthonormal; such components take Q
    itself (diag(R) ≥ 0), which is on the manifold too. Batched over the leading dims."""
    q, rr = _positive_qr(x)
    z = rr
    for _ in range(iters):
        z_inv, _ = torch.linalg.inv_ex(z)
        zeta = (z_inv.flatten(-2).norm(dim=-1) / z.flatten(-2).norm(dim=-1)).sqrt()[..., None, None]
        z = (zeta * z + z_inv.mT / zeta) / 2
    eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    off = (z.mT @ z - eye).flatten(-2).norm(dim=-1)[..., None, None]
    good = torch.isfinite(z).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True) & \
        (off <= math.sqrt(torch.finfo(z.dtype).eps))        # NaN compares False: not good either
    return torch.where(good, q @ z, q)


def retract_stiefel(x: torch.Tensor, r=1.0, method: str = "polar") -> torch.Tensor:
    """φ(X) = r·Q with Q the orthonormal factor of X: polar (Q = UVᵀ from X = UΣVᵀ, the closest point
    of the Stiefel manifold, by polar_factor) or qr (Q of X = QR with the signs making diag(R) ≥ 0).
    Batched over the leading dims. A zero component -> r·I_{n×k}; a rank-deficient one still lands on
    the manifold. Both are sync-free on a GPU."""
    zero = _sq_norm(x) == 0
    x = torch.where(zero, _canonical_frame(x), x)
    if method == "polar":
        q = polar_factor(x)
    elif method == "qr":
        q, _ = _positive_qr(x)
    else:
        raise ValueError(f"unknown Stiefel retraction {method!r}; expected polar or qr")
    return q * _r(r, x)


def distance_sphere(w: torch.Tensor, r=1.0) -> torch.Tensor:
    """Relative distance to the sphere per component: |‖w‖ − r|/r."""
    rr = _r(r, w)
    return ((_sq_norm(w).sqrt() - rr).abs() / rr).flatten(-2).amax(-1)


def distance_oblique(w: torch.Tensor, r=1.0) -> torch.Tensor:
    """max_j |‖w_j‖ − r|/r per component."""
    rr = _r(r, w)
    return (((w * w).sum(dim=-2, keepdim=True).sqrt() - rr).abs() / rr).flatten(-2).amax(-1)


def distance_stiefel(w: torch.Tensor, r=1.0) -> torch.Tensor:
    """‖WᵀW/r² − I‖_F per component (0 exactly on the manifold)."""
    gram = w.mT @ w / _r(r, w) ** 2
    return (gram - torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)).flatten(-2).norm(dim=-1)


@dataclass(frozen=True)
class Manifold:
    """One component manifold: the table that drives the geometry and its tests."""

    name: str
    proj: Callable[..., torch.Tensor]            # (w, g, r) -> tangent vector at w
    retract: Callable[..., torch.Tensor]         # (x, r) -> point on the manifold
    distance: Callable[..., torch.Tensor]        # (w, r) -> relative distance per component
    needs_tall: bool = False                     # components must have rows >= columns


MANIFOLDS: dict[str, Manifold] = {
    "sphere": Manifold("sphere", proj_sphere, retract_sphere, distance_sphere),
    "oblique": Manifold("oblique", proj_oblique, retract_oblique, distance_oblique),
    "stiefel": Manifold("stiefel", proj_stiefel, retract_stiefel, distance_stiefel, needs_tall=True),
}


def _manifold(name: str) -> Manifold:
    try:
        return MANIFOLDS[name]
    except KeyError:
        raise ValueError(f"unknown manifold {name!r}; expected one of {', '.join(MANIFOLDS)}") from None


def pom_proj(w: torch.Tensor, g: torch.Tensor, manifold: str, r=1.0) -> torch.Tensor:
    """Π_ω(grad_E): the tangent projection of every component (Algorithm 1, line 5)."""
    return _manifold(manifold).proj(w, g, r)


def pom_retract(x: torch.Tensor, manifold: str, r=1.0, method: str = "polar") -> torch.Tensor:
    """φ(x, 𝔑): every component onto its manifold of radius r (Algorithm 1, line 7).

    float16/bfloat16 components are retracted in float32 (torch has no half-precision QR or inverse on
    CPU, and their norms lose digits) and the result is returned in x's dtype.

    A component with a non-finite entry (NaN, ±Inf) has no point to project to: it is returned
    unchanged, so the bad entries stay where a plain optimizer step put them and do not spread over
    the component. Branch free, and no host sync on a GPU (polar_factor: no SVD)."""
    work = compute_dtype(x.dtype)
    xw = x.to(work)
    rw = r.to(work) if isinstance(r, torch.Tensor) else r
    bad = nonfinite_components(xw)
    safe = torch.where(bad, torch.zeros((), dtype=work, device=xw.device), xw)
    y = retract_stiefel(safe, rw, method) if manifold == "stiefel" else _manifold(manifold).retract(safe, rw)
    return torch.where(bad, xw, y).to(x.dtype)


def nonfinite_components(x: torch.Tensor) -> torch.Tensor:
    """(…, 1, 1) bool: True for the components of x (…, n, k) with a NaN or ±Inf entry."""
    return ~torch.isfinite(x).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)


def pom_distance(w: torch.Tensor, manifold: str, r=1.0) -> torch.Tensor:
    """Relative distance of every component to its manifold (0 on it)."""
    return _manifold(manifold).distance(w, r)


# ---- groups: Theorem 1 and the step normaliser ζ -----------------------------------------------
def pom_group_norms(tangent: torch.Tensor, group_id: torch.Tensor, n_groups: int) -> torch.Tensor:
    """R_g = (Σ_{ι∈g} ‖grad L(ω_ι)‖²_F)^{1/2} for every group g (Theorem 1, eq. 6).

    tangent: (N, n, k) projected gradients of the N components; group_id: (N,) group of each."""
    sq = (tangent * tangent).sum(dim=(-2, -1))
    return torch.zeros(n_groups, dtype=sq.dtype, device=sq.device).index_add_(0, group_id, sq).sqrt()


def pom_zeta(R: torch.Tensor) -> torch.Tensor:
    """ζ = max{1, R²(2 + R)²}^{1/2} (eq. 7: eq. 5 for spheres, ρ = 1 and curvature bound ≤ 1).

    For R ≥ 0 that is max{1, R(2 + R)}, computed so because R⁴ overflows fp32 for R > 1e9."""
    return (R * (2 + R)).clamp_min(1.0)


def pom_direction(w: torch.Tensor, g: torch.Tensor, manifold: str, r, group_id: torch.Tensor,
                  n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The FG-SGD direction grad L(ω_g)/ζ_g of every component, and R_g of every group.

    w, g: (N, n, k) components and their Euclidean gradients; group_id: (N,) long."""
    tangent = pom_proj(w, g, manifold, r)
    R = pom_group_norms(tangent, group_id, n_groups)
    return tangent / pom_zeta(R)[group_id].reshape(-1, 1, 1), R


def pom_direction_sharded(w: torch.Tensor, g: torch.Tensor, manifold: str, r, group_id: torch.Tensor,
                          n_groups: int, shard, groups_local: bool):
    """pom_direction on the components of a parameter's local rows (dim 0 sharded): components never
    straddle rows, so the projection is local; R_g² of groups that span ranks are summed over ranks
    (one all-reduce of n_groups numbers). ``groups_local``: every group lies in one row (PI, none),
    so no collective is needed; R then holds the local groups only. A sharded program (a generator,
    runtime/distributed.py) returning (direction, R)."""
    tangent = pom_proj(w, g, manifold, r)
    sq = (tangent * tangent).sum(dim=(-2, -1))
    R_sq = torch.zeros(n_groups, dtype=sq.dtype, device=sq.device).index_add_(0, group_id, sq)
    if not groups_local:
        R_sq = yield shard.sum(R_sq)
    R = R_sq.sqrt()
    return tangent / pom_zeta(R)[group_id].reshape(-1, 1, 1), R


# ---- layout: components and groups ------------------------------------------------------------
COMPONENTS = ("kernel", "filter")
GROUPINGS = ("PI", "PO", "PIO", "none")


def component_grid(shape: tuple[int, ...], component: str) -> tuple[tuple[int, ...], int, int]:
    """(grid, n, k): components are indexed by grid ((O, I) for kernels, (O,) for filters) and
    each one is an n×k matrix: a kh×kw kernel (kd·kh×kw in 3-d, k×1 in 1-d), or a filter as a column."""
    if component == "filter":
        return (shape[0],), math.prod(shape[1:]), 1
    if component != "kernel":
        raise ValueError(f"unknown component {component!r}; expected kernel or filter")
    if len(shape) < 3:
        raise ValueError(f"component=kernel needs a conv weight (O, I, k...), got shape {tuple(shape)}")
    spatial = shape[2:]
    n, k = (spatial[0], 1) if len(spatial) == 1 else (math.prod(spatial[:-1]), spatial[-1])
    return (shape[0], shape[1]), n, k


def as_components(t: torch.Tensor, component: str) -> torch.Tensor:
    """The (N, n, k) components of a weight (or its gradient) in fp32 (fp64 stays fp64)."""
    _, n, k = component_grid(tuple(t.shape), component)
    return t.detach().to(compute_dtype(t.dtype)).reshape(-1, n, k)


def pom_membership(grid: tuple[int, ...], grouping: str, group_size: int = 0,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Group of every component, drawn without replacement (a random permutation of each grouping
    axis cut into consecutive pieces of ``group_size``; 0 = the whole axis; the last piece may be
    smaller). Returns (group_id shaped like grid, number of groups).

    kernel grid (O, I):  PI   groups of kernels W_{o,·} of one output channel (a permutation of the
                              inputs drawn per output channel);
                         PO   groups of kernels W_{·,i} of one input channel (drawn per input);
                         PIO  blocks: a piece of the outputs × a piece of the inputs;
                         none every kernel alone.
    filter grid (O,):    a filter already spans all inputs, so PI = none (every filter alone) and
                         PO = PIO (pieces of the output axis).
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; expected one of {', '.join(GROUPINGS)}")

    def pieces(n: int) -> tuple[int, int]:
        size = group_size if 0 < group_size < n else max(n, 1)     # an empty axis (a zero-size layer): no groups
        return size, -(-n // size)

    n_all = math.prod(grid)
    if grouping == "none" or (len(grid) == 1 and grouping == "PI"):
        return torch.arange(n_all).reshape(grid), n_all
    if len(grid) == 1:                                   # filters, PO or PIO
        size, count = pieces(grid[0])
        position = torch.randperm(grid[0], generator=generator).argsort()
        return position // size, count
    O, I = grid
    if grouping == "PI":
        size, count = pieces(I)
        position = torch.rand(O, I, generator=generator).argsort(dim=1).argsort(dim=1)
        return torch.arange(O).unsqueeze(1) * count + position // size, O * count
    if grouping == "PO":
        size, count = pieces(O)
        position = torch.rand(O, I, generator=generator).argsort(dim=0).argsort(dim=0)
        return torch.arange(I).unsqueeze(0) * count + position // size, I * count
    size_o, count_o = pieces(O)
    size_i, count_i = pieces(I)
    pos_o = torch.randperm(O, generator=generator).argsort()
    pos_i = torch.randperm(I, generator=generator).argsort()
    return (pos_o // size_o).unsqueeze(1) * count_i + (pos_i // size_i).unsqueeze(0), count_o * count_i


def pom_max_group(grid: tuple[int, ...], grouping: str, group_size: int = 0) -> int:
    """The number of components in the largest group ``pom_membership`` draws for these options
    (1: every component is its own group). The Triton kernels pick their tiles by it."""
    def piece(n: int) -> int:
        return group_size if 0 < group_size < n else n

    if grouping == "none" or (len(grid) == 1 and grouping == "PI"):
        return 1
    if len(grid) == 1:
        return piece(grid[0])
    O, I = grid
    return {"PI": piece(I), "PO": piece(O)}.get(grouping, piece(O) * piece(I))


def _rms_norm(components: torch.Tensor) -> float:
    """(mean over components of ‖ω_ι‖²)^{1/2}: one radius that keeps the layer's overall scale."""
    return float(_sq_norm(components).mean().sqrt()) if components.numel() else 0.0


def _rms_norm_of(components: torch.Tensor, shard=None) -> float:
    """_rms_norm of the whole parameter; sharded: from the sum and count of all ranks' components."""
    if shard is None:
        return _rms_norm(components)
    total = shard.sum_now(torch.stack([_sq_norm(components).sum().to(torch.float64),
                                       torch.tensor(float(components.shape[0]), dtype=torch.float64)]))
    return float((total[0] / total[1]).sqrt()) if total[1] > 0 else 0.0


def geometric_radius(fan_in: int, out_numel: int) -> float:
    """γ = (b + b̂)^{-1/2} (eq. 2): b = input channels × receptive field of one unit, b̂ = output
    channels × output feature-map size."""
    return 1.0 / math.sqrt(fan_in + out_numel)


def feature_std_distributed_problem() -> str | None:
    """Why feature_std cannot run in this process, or None. Each rank would measure only its own
    inputs, so the replicas' radii (and weights) would drift apart under DDP; refused rather than
    all-reduced at every forward of every layer."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    return (f"feature_std measures the input std of each rank's own batches, so under data parallelism "
            f"(world size {dist.get_world_size()}) the replicas' radii would differ and their weights drift "
            f"apart. Fix: set `feature_std: false` (or a numeric radius) for distributed training")


# ---- the compile fast path ----------------------------------------------------------------------
def _component_radii(radii: list, counts: list[int], like: torch.Tensor):
    """The radii of several parameters' concatenated components: the one float when all are the same
    float (what each parameter's pre_step uses), else one radius per component, in like's dtype (a
    tensor radius, as feature_std makes it, is cast so in pom_proj too)."""
    if not any(isinstance(r, torch.Tensor) for r in radii) and len({float(r) for r in radii}) == 1:
        return float(radii[0])
    return torch.cat([torch.as_tensor(r, dtype=like.dtype, device=like.device).reshape(1).expand(count)
                      for r, count in zip(radii, counts)])


def pom_direction_of_layers(weights: list[torch.Tensor], grads: list[torch.Tensor], component: str, manifold: str,
                            states: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """POM.pre_step's new gradient of several parameters whose components have the same n×k shape, in
    one call of pom_direction, and R_g of each parameter's groups.

    The components are concatenated along the component axis and every parameter's group ids are
    offset by the groups before it, so groups never mix layers. Non-finite gradient entries pass
    through and non-finite weight entries read as 0, as in pre_step (pass_nonfinite is elementwise,
    so applying it to the concatenation applies it to every parameter)."""
    w = torch.cat([finite_entries(as_components(weight, component)) for weight in weights])
    n, k = w.shape[-2:]
    counts = [grad.numel() // (n * k) for grad in grads]
    n_groups = [state["n_groups"] for state in states]
    offsets = [sum(n_groups[:i]) for i in range(len(n_groups))]
    group_id = torch.cat([state["group_id"].to(w.device).reshape(-1) + offset
                          for state, offset in zip(states, offsets)])
    radius = _component_radii([state["radius"] for state in states], counts, w)
    # One spare group that no component belongs to (its R is 0 and unused): torch 2.13 inductor on
    # CPU fails to compile an index_add_ into a one-element tensor (one layer whose components form
    # one group, e.g. filters grouped PO), tests/test_pom_compile.py::test_compiled_single_group.
    spare = 1
    R = None

    def direction_of(g: torch.Tensor) -> torch.Tensor:
        nonlocal R
        direction, R = pom_direction(w, g.to(compute_dtype(g.dtype)), manifold, radius, group_id,
                                     sum(n_groups) + spare)
        return fit_dtype(direction, g.dtype)

    new = pass_nonfinite(direction_of, torch.cat([grad.reshape(-1, n, k) for grad in grads]))
    pieces = [piece.reshape(grad.shape) for piece, grad in zip(new.split(counts), grads)]
    return pieces, list(R[:-spare].split(n_groups))


def pom_retract_layers(weights: list[torch.Tensor], component: str, manifold: str, radii: list,
                       method: str = "polar") -> list[torch.Tensor]:
    """POM.post_step's retraction of several parameters whose components have the same n×k shape, in
    one call of pom_retract (every component is retracted on its own, so concatenating is exact up
    to the radius: see _component_radii). Returns the new weights in their own dtype."""
    x = torch.cat([as_components(weight, component) for weight in weights])
    counts = [weight.numel() // (x.shape[-2] * x.shape[-1]) for weight in weights]
    y = pom_retract(x, manifold, _component_radii(radii, counts, x), method)
    return [piece.reshape(weight.shape).to(weight.dtype) for piece, weight in zip(y.split(counts), weights)]


def _same_components(layouts, *tensor_lists) -> list[list[int]]:
    """The parameters, by index, whose components have the same n×k shape (layout), dtypes and device:
    those one call concatenates."""
    families: dict[tuple, list[int]] = {}
    for i, nk in enumerate(layouts):
        of_i = [tensors[i] for tensors in tensor_lists]
        families.setdefault((nk, *(t.dtype for t in of_i), of_i[0].device), []).append(i)
    return list(families.values())


class CompiledPOM:
    """The compile fast path (protocol: runtime/compile_backend.Program): POM.pre_step's FG-SGD
    direction (tangent projection, R_g, division by ζ_g) over a whole bucket, with the state pre_step
    records, and POM.post_step's retraction.

    Parameters with the same component shape n×k, dtype and device are transformed by one call
    of pom_direction_of_layers (one projection, one index_add_ of R_g² over all their groups).
    always_retracts: the step moves every component off its manifold and post_step also updates the
    radius (feature_std), so every parameter is retracted, with no compiled check, by one compiled
    pom_retract_layers per component shape (every manifold: Stiefel's polar retraction is QR and
    Newton's iteration, polar_factor, which compiles; it was an SVD, left to the eager post_step).
    """

    name = "pom"
    uses_weights = True
    retracts = True
    always_retracts = True
    state_keys = ("group_id", "n_groups", "radius", "nonfinite_steps", "base_radius", "feature_std")
    # At a step skipped on the device the backend also passes "skip" (StepContext.skip) and these, the
    # entries the programs replace, so they can keep them (POM.honours_device_skip)
    skip_keys = ("last_max_group_norm", "normalised_groups")

    def layout(self, geometry, facts):
        return component_grid(tuple(facts.shape), geometry.opts["component"])[1:]      # (n, k)

    def transform_with_state(self, geometry, layouts, grads, weights, states):
        out: list = [None] * len(grads)
        updates: list = [None] * len(grads)
        for index in _same_components(layouts, grads, weights):
            new, R = pom_direction_of_layers([weights[i] for i in index], [grads[i] for i in index],
                                             geometry.opts["component"], geometry.opts["manifold"],
                                             [states[i] for i in index])
            for i, new_grad, R_i in zip(index, new, R):
                skip = states[i].get("skip")
                counter = {"nonfinite_steps": states[i]["nonfinite_steps"]}
                count_nonfinite(counter, "nonfinite_steps", grads[i], weights[i], skip=skip)   # before the transform
                out[i] = new_grad
                updates[i] = {**counter, "last_max_group_norm": R_i.max(),
                              "normalised_groups": (pom_zeta(R_i) > 1).sum()}
                if skip is not None:
                    for key in self.skip_keys:
                        updates[i][key] = unless_skipped(skip, states[i][key], updates[i][key])
        return out, updates

    def retracts_in_graph(self, geometry):
        return True

    def retract_with_state(self, geometry, layouts, weights, states):
        o = geometry.opts
        # the radius as POM.post_step sets it: λ (feature_std) floored at min_std
        radii = [state["base_radius"] / state["feature_std"].clamp_min(o["min_std"]) if o["feature_std"]
                 else state["base_radius"] for state in states]
        out: list = [None] * len(weights)
        for index in _same_components(layouts, weights):
            new = pom_retract_layers([weights[i] for i in index], o["component"], o["manifold"],
                                     [radii[i] for i in index], o["stiefel_retraction"])
            for i, weight in zip(index, new):
                out[i] = unless_skipped(states[i].get("skip"), weights[i], weight)
        return out, [{"radius": unless_skipped(state.get("skip"), state["radius"], r)} if o["feature_std"] else {}
                     for r, state in zip(radii, states)]


# ---- the geometry -----------------------------------------------------------------------------
RADIUS = Range(0, 65504, low_open=True, why_high="float16's largest value: a larger radius overflows a "
                                                "half-precision weight, and its square float32 soon after")


def _radius_check(v) -> str | None:
    if isinstance(v, str):
        return None if v in ("unit", "geometric", "init") else \
            f"expected unit, geometric, init or a number > 0, got {v!r}"
    problem = RADIUS(v)
    return None if problem is None else f"a numeric radius {problem}"


def _momentum_check(v) -> str | None:
    return None if 0 <= v < 1 else f"must be in [0, 1), got {v}"


@register
class POM(Geometry):
    name = "pom"
    stage = "manifold"
    paper = "001_a492d199b2994eaf.txt"
    incompatible = ("psi",)
    hurt_by_weight_decay = True
    # pre_step's records and nonfinite_steps, post_step's radius and retraction keep their values where
    # StepContext.skip is true, in the eager, compiled (CompiledPOM) and Triton programs (the kernels
    # read it through the backend's flag; POMTorchSteps run CompiledPOM's)
    honours_device_skip = True
    match_hint = "match only conv and linear weights whose components fit these options"
    shard_refusal = None      # sharded form: pom_direction_sharded; the retraction is local
    fast_paths = {"compile": "geomcompile.geometries.pom:CompiledPOM",
                  "triton": "geomcompile.kernels.pom:POMKernels"}
    options = {
        "manifold": Option(str, "sphere", "component manifold: sphere (‖W‖=r), oblique (every column "
                                          "norm r) or stiefel (WᵀW = r²I)", choices=tuple(MANIFOLDS)),
        "component": Option(str, "kernel", "kernel (each kh×kw kernel W[o,i]) or filter (each row w[o]; "
                                           "the only choice for linear weights)", choices=COMPONENTS),
        "grouping": Option(str, "PI", "PI (one output channel across inputs), PO (one input across "
                                      "outputs), PIO (blocks of both) or none", choices=GROUPINGS),
        "group_size": Option(int, 0, "split each grouping axis into random groups of this size; "
                                     "0 = the whole axis", check=Range(0, 2**31 - 1)),
        "seed": Option(int, 0, "seed of the random group membership (drawn once at install)",
                       check=Range(0, 2**63 - 1)),
        "radius": Option((str, float), "unit", "unit, geometric (eq. 2, needs example_inputs), init (the "
                                               "RMS component norm of the weight at install: keeps the "
                                               "layer's scale) or a number > 0", check=_radius_check,
                         schema={"anyOf": [{"enum": ["unit", "geometric", "init"]},
                                           {"type": "number", **RADIUS.schema}]}),
        "feature_std": Option(bool, False, "divide the radius by the running std of the layer's input"),
        "std_momentum": Option(float, 0.9, "EMA momentum of the input std in [0, 1)", check=_momentum_check,
                               schema={"minimum": 0, "exclusiveMaximum": 1}),
        "min_std": Option(float, 1.0, "the input std is floored at this (> 0) before dividing: the paper "
                                      "assumes λ ≥ 1, so r ≤ γ",
                          check=Range(0, 1e6, low_open=True)),
        "stiefel_retraction": Option(str, "polar", "polar (closest point) or qr", choices=("polar", "qr")),
    }

    # -- planning -------------------------------------------------------------------------------
    def check(self, facts: ParamFacts) -> str | None:
        o = self.opts
        if facts.kind not in ("conv", "linear") or len(facts.shape) < 2:
            return (f"pom needs a conv or linear weight, but {facts.name} is kind {facts.kind!r} with shape "
                    f"{tuple(facts.shape)}")
        if o["component"] == "kernel" and facts.kind == "linear":
            return (f"component=kernel needs a conv weight; {facts.name} is a linear weight. "
                    f"Use `component: filter` for linear weights")
        _, n, k = component_grid(tuple(facts.shape), o["component"])
        if n * k == 1:
            return (f"the {o['component']} components of {facts.name} are single numbers (1x1 kernels): each "
                    f"would be fixed at ±r and could not be trained. Use `component: filter` for it")
        if MANIFOLDS[o["manifold"]].needs_tall and n < k:
            return (f"manifold=stiefel needs components with at least as many rows as columns; the "
                    f"{o['component']} components of {facts.name} are {n}x{k}. Use sphere or oblique")
        if o["feature_std"] and (not facts.module or "functional" in facts.layer):
            return (f"feature_std needs the layer module of {facts.name} to measure its input, but it is "
                    f"used by a functional op ({facts.module}); wrap it in an nn.Module or set feature_std: false")
        if o["radius"] == "geometric" and facts.output_shape is None:
            raise GeomCompileError(
                f"pom radius=geometric on {facts.name} needs the layer's output shape (b̂ = C_out·H_out·W_out "
                f"in eq. 2), which the analysis only has with example inputs. Fix: pass example_inputs, "
                f"e.g. gc.apply(model, policy, optimizer, example_inputs=(x,)), or use radius: unit or a number")
        return None

    def check_install(self, unit: Unit, ctx: StepContext) -> str | None:
        return feature_std_distributed_problem() if self.opts["feature_std"] else None

    def warnings(self, unit: Unit, ctx: StepContext) -> list[str]:
        out = []
        for facts in unit.facts:
            scale = self._rescaling(facts, ctx.params.get(facts.name))
            if scale is not None and facts.scale_invariant is None and not 0.5 <= scale <= 2:
                out.append(f"pom on {facts.name}: radius {self.opts['radius']} scales its {self.opts['component']} "
                           f"components by about {scale:.3g}x at install, and no normalisation absorbs that "
                           f"({facts.invariance_reason or 'not scale-invariant'}); stacked layers multiply such "
                           f"factors and training can diverge. Fix: `radius: init` keeps the layer's scale")
            wd = ctx.group_of.get(facts.name, {}).get("weight_decay", 0)
            if wd:
                why = "only shrinks the weight before the retraction rescales it (a larger effective step)"
                out.append(Finding(f"pom on {facts.name}: weight_decay={wd} {why}; use weight_decay=0 for it",
                                   name=facts.name, key=("pom", "weight_decay", wd), head="pom on ",
                                   tail=f" whose param group has weight_decay={wd}, which {why}. Fix: put them "
                                   f"in their own param group with weight_decay=0 (plan.assignments names them)"))
        return out

    def _rescaling(self, facts: ParamFacts, p: torch.Tensor | None) -> float | None:
        """radius / RMS component norm of p now: how much the install-time retraction scales the layer."""
        if p is None or p.numel() == 0 or self.opts["radius"] == "init" or \
                (self.opts["radius"] == "geometric" and facts.output_shape is None):
            return None
        rms = _rms_norm(self._components(local(p)))     # sharded: this rank's components
        return self._base_radius(facts)[0] / rms if rms > 0 else None

    # -- state ----------------------------------------------------------------------------------
    def _base_radius(self, facts: ParamFacts, p: torch.Tensor | None = None, shard=None) -> tuple[float, str]:
        radius = self.opts["radius"]
        if radius == "unit":
            return 1.0, "unit"
        if radius == "init":
            if p is None:
                raise GeomCompileError(f"pom radius=init on {facts.name} needs the weight itself")
            rms = _rms_norm_of(self._components(local(p)), shard)
            if not rms > 0 or not math.isfinite(rms):
                raise GeomCompileError(f"pom radius=init on {facts.name}: the weight's RMS component norm at "
                                       f"install is {rms}, not a usable radius. Fix: initialise the weight "
                                       f"first, or use radius: unit or a number")
            return rms, "init: the RMS component norm at install"
        if radius != "geometric":
            return float(radius), "given"
        b = math.prod(facts.shape[1:])                 # fan-in of one output unit (C_in/groups · kh · kw)
        out = facts.output_shape
        spatial = len(facts.shape) - 2
        per_sample = out[-(spatial + 1):] if facts.kind == "conv" else (out[1:] if len(out) > 1 else out)
        b_hat = math.prod(per_sample)
        return geometric_radius(b, b_hat), f"geometric: b={b}, b̂={b_hat}"

    def init_state(self, unit: Unit, ctx: StepContext) -> dict:
        facts = unit.single(self.name)
        p = ctx.params[facts.name]
        grid, _, _ = component_grid(tuple(facts.shape), self.opts["component"])
        # One stream per parameter, stable across runs: the seed mixed with the parameter's name.
        gen = torch.Generator().manual_seed((self.opts["seed"] * 1_000_003 + zlib.crc32(facts.name.encode())) % 2**63)
        group_id, n_groups = pom_membership(grid, self.opts["grouping"], self.opts["group_size"], gen)
        base, _ = self._base_radius(facts, p, ctx.shard(facts.name))
        radius = base / max(1.0, self.opts["min_std"]) if self.opts["feature_std"] else base
        if self.opts["feature_std"]:    # post_step makes it a tensor: one from the start (see below)
            radius = torch.tensor(radius, dtype=torch.float64, device=p.device)
        # nonfinite_steps: steps whose gradient or weight had a NaN/Inf entry (passed through as plain
        # torch would, without spreading over components and groups; docs/pom.md).
        # The per-step records are 0-d device tensors from the start: a step skipped on the device keeps
        # them by torch.where, which must not turn a Python number into a tensor (honours_device_skip).
        state = {"group_id": group_id.to(p.device), "n_groups": n_groups, "base_radius": base,
                 "radius": radius,
                 "last_max_group_norm": torch.zeros((), dtype=torch.float32, device=p.device),
                 "normalised_groups": torch.zeros((), dtype=torch.int64, device=p.device),
                 "nonfinite_steps": torch.zeros((), dtype=torch.int64, device=p.device)}
        if self.opts["feature_std"]:
            # λ = 1 until the first measurement (the paper's t = 1); the hook keeps an EMA after that.
            state["feature_std"] = torch.ones((), dtype=torch.float64, device=p.device)
            state["feature_std_measured"] = False
        return state

    def on_install(self, unit: Unit, state: dict, ctx: StepContext) -> list[str]:
        facts, o = unit.single(self.name), self.opts
        if o["feature_std"]:
            self._install_std_hook(unit, state, ctx)
        p = ctx.params[facts.name]
        if not p.requires_grad:     # frozen: no geometry touches it, the install-time retraction neither
            return [f"pom {facts.name}: frozen (requires_grad=False), not retracted onto the manifold"]
        moved, before = self._retract_off_manifold(local(p), state["radius"])   # sharded: the local rows
        how = self._base_radius(facts, p, ctx.shard(facts.name))[1] if o["radius"] != "init" else "init: the RMS component norm at install"
        grid, n, k = component_grid(tuple(facts.shape), o["component"])
        same = " (one column: the same as a sphere)" if k == 1 and o["manifold"] != "sphere" else ""
        return [f"pom {facts.name}: {'x'.join(map(str, grid))} {o['component']} components {n}x{k} on "
                f"{o['manifold']}{same}, {state['n_groups']} group(s) ({o['grouping']}), radius "
                f"{state['radius']:.4g} ({how}{', / input std' if o['feature_std'] else ''}); retracted "
                f"{moved} of {math.prod(grid)} components onto the manifold at install (max relative "
                f"distance was {before:.3g})"]

    def _retract_off_manifold(self, p: torch.Tensor, r: float) -> tuple[int, float]:
        """The install-time retraction. Components already on the manifold to within what a retraction
        in p's dtype achieves are left bit-identical, so a resumed run (weights loaded from a
        checkpoint, then the plan installed) continues exactly. Returns (moved, max distance before)."""
        if p.numel() == 0:
            return 0, 0.0
        with torch.no_grad():
            w = self._components(p)
            distance = pom_distance(w, self.opts["manifold"], r)
            tol = 8 * torch.finfo(p.dtype).eps * math.sqrt(w.shape[-2] * w.shape[-1])
            off = ~(distance <= tol)          # NaN distances count as off
            if off.any():
                x = pom_retract(w, self.opts["manifold"], r, self.opts["stiefel_retraction"])
                p.copy_(torch.where(off.reshape(-1, 1, 1), x, w).reshape(p.shape).to(p.dtype))
        return int(off.sum()), float(distance.max())

    def _install_std_hook(self, unit: Unit, state: dict, ctx: StepContext) -> None:
        facts, momentum = unit.single(self.name), self.opts["std_momentum"]
        if ctx.model is None:
            raise GeomCompileError(f"pom feature_std on {facts.name} needs the model to hook its layer; "
                                   f"install the plan through gc.apply / plan.install")
        module = get_canonical_submodule(ctx.model, facts.module)   # facts name modules canonically
        live = weakref.ref(module)

        def measure(mod, args):
            # `state` is the plan's live dict for this unit: a loaded checkpoint is copied into it.
            # copy.deepcopy / AveragedModel copy a module's hooks as they are (the same function):
            # only the live layer measures, so update_bn on a copy cannot move the live radius.
            if mod is not live():
                return
            if not mod.training or not args or not isinstance(args[0], torch.Tensor) or args[0].numel() < 2:
                return
            with torch.no_grad():
                std = args[0].detach().to(torch.float64).std()
                # A new tensor, not an in-place update: a loaded state may share it with a checkpoint.
                if state["feature_std_measured"]:
                    std = momentum * state["feature_std"].to(std.device) + (1 - momentum) * std
                state["feature_std"], state["feature_std_measured"] = std, True

        ctx.handles.append(module.register_forward_pre_hook(measure))

    # -- runtime --------------------------------------------------------------------------------
    def _components(self, t: torch.Tensor) -> torch.Tensor:
        return as_components(t, self.opts["component"])

    def _retract(self, p: torch.Tensor, r: float, skip: "torch.Tensor | None" = None) -> None:
        if p.numel() == 0:
            return
        with torch.no_grad():
            x = pom_retract(self._components(p), self.opts["manifold"], r, self.opts["stiefel_retraction"])
            p.copy_(unless_skipped(skip, p, x.reshape(p.shape).to(p.dtype)))

    def pre_step(self, unit: Unit, grads, state, ctx: StepContext) -> None:
        facts, (grad,) = unit.single(self.name), grads
        if grad is None or grad.numel() == 0:
            return
        shard = ctx.shard(facts.name)
        if shard is not None:
            ctx.run_sharded(self._pre_step_sharded(facts, local(grad), state, ctx, shard))
            return
        # Non-finite entries of the gradient pass through (the projection and ζ would spread one
        # over its component and its group); those of the weight read as 0 (a component left
        # non-finite by an earlier step is not retracted, see pom_retract).
        weight = ctx.params[facts.name].detach()
        skip = ctx.skip_on(weight.device)          # a step skipped on the device changes no state
        count_nonfinite(state, "nonfinite_steps", grad, weight, skip=skip)
        w = finite_entries(self._components(weight))
        group_id = state["group_id"].to(w.device).reshape(-1)   # a loaded state keeps its checkpoint's device
        R = None

        def direction_of(g: torch.Tensor) -> torch.Tensor:
            nonlocal R
            direction, R = pom_direction(w, self._components(g), self.opts["manifold"], state["radius"],
                                         group_id, state["n_groups"])
            return fit_dtype(direction.reshape(grad.shape), grad.dtype)

        grad.copy_(pass_nonfinite(direction_of, grad))
        state["last_max_group_norm"] = unless_skipped(skip, state["last_max_group_norm"], R.max())
        state["normalised_groups"] = unless_skipped(skip, state["normalised_groups"], (pom_zeta(R) > 1).sum())

    def _pre_step_sharded(self, facts: ParamFacts, grad: torch.Tensor, state, ctx: StepContext, shard):
        """The FG-SGD direction on the local rows: the membership (drawn from the same seed on every
        rank) is cut to the local rows of the component grid. A sharded program; non-finite entries
        as in pre_step."""
        weight = local(ctx.params[facts.name]).detach()
        skip = ctx.skip_on(weight.device)
        count_nonfinite(state, "nonfinite_steps", grad, weight, skip=skip)
        w = finite_entries(self._components(weight))
        group_id = state["group_id"].to(w.device)[shard.start:shard.stop].reshape(-1)
        groups_local = self.opts["grouping"] in ("PI", "none")   # a PI group lies in one output channel
        R = None

        def direction_of(g: torch.Tensor):
            nonlocal R
            direction, R = yield from pom_direction_sharded(w, self._components(g), self.opts["manifold"],
                                                            state["radius"], group_id, state["n_groups"], shard,
                                                            groups_local)
            return fit_dtype(direction.reshape(grad.shape), grad.dtype)

        grad.copy_((yield from pass_nonfinite_sharded(direction_of, grad)))
        state["last_max_group_norm"] = unless_skipped(skip, state["last_max_group_norm"],
                                                      R.max() if R.numel() else R.new_zeros(()))
        state["normalised_groups"] = unless_skipped(skip, state["normalised_groups"], (pom_zeta(R) > 1).sum())

    def post_step(self, unit: Unit, state, ctx: StepContext) -> None:
        name = unit.single(self.name).name
        p = ctx.params[name]
        if not ctx.has_grad(name):   # the optimizer skipped it (frozen, unused): leave it bit-identical
            return
        radius = state["base_radius"]
        if self.opts["feature_std"]:
            # λ ≥ min_std: a layer whose input dies (std -> 0) would otherwise get r -> ∞, which feeds
            # back (measured on digits, unit radius, no floor: r grew to 6e5 once the ReLUs had died).
            # A 0-d tensor on the device (float() here would be a host sync per layer and step).
            radius = radius / state["feature_std"].clamp_min(self.opts["min_std"])
        skip = ctx.skip_on(local(p).device)       # a step skipped on the device: weight and radius stay
        state["radius"] = unless_skipped(skip, state["radius"], radius) if self.opts["feature_std"] else radius
        self._retract(local(p), radius, skip)    # components never straddle dim 0's rows: local

    def diagnostics(self, unit: Unit, state) -> dict[str, float]:
        out = {"radius": float(state["radius"]), "max_group_grad_norm": float(state["last_max_group_norm"]),
               "normalised_groups": float(state["normalised_groups"]),
               "nonfinite_steps": float(state.get("nonfinite_steps", 0))}
        if "feature_std" in state:
            out["feature_std"] = float(state["feature_std"])
        return out

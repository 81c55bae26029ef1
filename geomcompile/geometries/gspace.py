"""G-SGD's closed forms (seed 002_3ba745487f6ecdff.txt, Meng et al., "G-SGD: Optimizing ReLU Neural
Networks in its Positively Scale-Invariant Space"; the spec is ../shared/designs/gspace.md, §2-§5).

A *G-chain* of L layers (Linear or Conv2d, groups 1) joined by positively homogeneous per-channel
ops is given as its edge tensors ``E[l] = W[l].reshape(h[l+1], h[l], T[l])`` (torch layout out, in,
taps; a Linear fed by a flatten of (C, Hs, Ws) has T = Hs·Ws), its optional biases ``b[l]`` of
shape (h[l+1]) and its skeleton taps ``c[l]``. Levels 1..L-1 are the hidden units.

The skeleton for any widths (design §2, the authors' "mod rule" stated per unit):

    designated in-edge  of unit (lv, o):  E[lv-1][o, o % h[lv-1], c]
    designated out-edge of unit (lv, i):  E[lv][i % h[lv+1], i, c]
    free skeleton F   = the designated out-edges (held fixed; their signs are the gauge)
    updated skeleton U = the in-edges that are nobody's out-edge (layer 0's, and the width increases)

Every edge outside F (biases included) carries one basis path, back(tail)·e·fwd(head). A step
(design §5) is SGD on those path values followed by weight allocation in quotient form, which
divides only by skeleton products, so zero weights and zero biases are fine.

Everything is O(m): one elementwise pass per layer, a reduction and a scatter-add per level and
gathers of the O(H) skeleton entries; the only Python loops run over the L layers. Math runs in
float32 for float16/bfloat16/float32 inputs and in float64 for float64.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .base import compute_dtype


class GSpaceGrad(NamedTuple):
    """The inverse chain rule's result (design §4).

    dv: per layer, shaped like E[l]: ∂l/∂v of the basis path of each edge (a U entry holds its
        class's ∂l/∂v_C); 0 at F entries, which carry no basis path.
    dv_bias: per layer, ∂l/∂v of each bias's basis path (None where the layer has no bias).
    lam: per level 0..L, λ of the class of each unit (∂l/∂v_C / v_C); 0 at the input and output."""

    dv: list
    dv_bias: list
    lam: list


class GSpaceStep(NamedTuple):
    """One exact G-SGD step (design §5): the new edge tensors and biases, and per level the class
    ratios ρ = 1 − η·λ (1 at the input and output). A ρ of 0 puts a class value outside 𝒢-space."""

    weights: list
    biases: list
    rho: list


def chain_widths(E: Sequence[torch.Tensor]) -> list[int]:
    """h[0..L] of a chain of edge tensors; raises ValueError when consecutive layers do not fit."""
    if not E:
        raise ValueError("a G-chain needs at least one layer")
    h = [E[0].shape[1]]
    for l, e in enumerate(E):
        if e.dim() != 3:
            raise ValueError(f"edge tensor {l} must be (out, in, taps), got shape {tuple(e.shape)}")
        if e.shape[1] != h[-1]:
            raise ValueError(f"edge tensor {l} has {e.shape[1]} inputs but level {l} has {h[-1]} units")
        h.append(e.shape[0])
    return h


def _in_edges(h: Sequence[int], l: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) in layer l of the designated in-edges of units (l+1, 0..h[l+1]-1)."""
    rows = torch.arange(h[l + 1], device=device)
    return rows, rows % h[l]


def _out_edges(h: Sequence[int], l: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) in layer l of the designated out-edges of units (l, 0..h[l]-1); l >= 1."""
    cols = torch.arange(h[l], device=device)
    return cols % h[l + 1], cols


def _class_first(h: Sequence[int], lv: int, device) -> torch.Tensor:
    """Units of hidden level lv whose in-edge is in U: every unit of level 1, and the units a width
    increase adds (o >= h[lv-1])."""
    if lv == 1:
        return torch.ones(h[1], dtype=torch.bool, device=device)
    return torch.arange(h[lv], device=device) >= h[lv - 1]


def gspace_masks(h: Sequence[int], T: Sequence[int], c: Sequence[int],
                 device=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer l, the boolean masks (free, updated) of shape (h[l+1], h[l], T[l]): F (the
    designated out-edges, fixed) and U (the in-edges that are nobody's out-edge). Every other entry,
    and every bias, is in N (one basis path each): |N| = m − H."""
    L = len(h) - 1
    if len(T) != L or len(c) != L:
        raise ValueError(f"{L} layers need {L} tap counts and {L} centres, got {len(T)} and {len(c)}")
    masks = []
    for l in range(L):
        if not 0 <= c[l] < T[l]:
            raise ValueError(f"layer {l}: skeleton tap {c[l]} is not one of its {T[l]} taps")
        free = torch.zeros(h[l + 1], h[l], T[l], dtype=torch.bool, device=device)
        updated = torch.zeros_like(free)
        if l >= 1:
            rows, cols = _out_edges(h, l, device)
            free[rows, cols, c[l]] = True
        if l + 1 <= L - 1:
            rows, cols = _in_edges(h, l, device)
            first = _class_first(h, l + 1, device)
            updated[rows[first], cols[first], c[l]] = True
        masks.append((free, updated))
    return masks


def _as_compute(ts: Sequence[torch.Tensor | None]) -> list:
    return [None if t is None else t.to(compute_dtype(t.dtype)) for t in ts]


def skeleton_products(E: Sequence[torch.Tensor], c: Sequence[int]):
    """(B, Phi, V) per level 0..L (design §3): B[lv] the product along the designated in-edges back
    to the input, Phi[lv] the product along the designated out-edges to the output, V = B·Phi the
    value of each unit's class chain path. B[0] = 1, Phi[L] = 1; Phi[0], V[0] and V[L] are None."""
    h = chain_widths(E)
    L, dev = len(E), E[0].device
    B = [torch.ones(h[0], dtype=E[0].dtype, device=dev)]
    for lv in range(1, L):
        rows, cols = _in_edges(h, lv - 1, dev)
        B.append(E[lv - 1][rows, cols, c[lv - 1]] * B[lv - 1][cols])
    Phi: list = [None] * (L + 1)
    Phi[L] = torch.ones(h[L], dtype=E[-1].dtype, device=dev)
    for lv in range(L - 1, 0, -1):
        rows, cols = _out_edges(h, lv, dev)
        Phi[lv] = E[lv][rows, cols, c[lv]] * Phi[lv + 1][rows]
    V = [None] + [B[lv] * Phi[lv] for lv in range(1, L)] + [None]
    B.append(None)
    return B, Phi, V


def _kappa(B, Phi, l: int) -> torch.Tensor:
    """κ of layer l's edges, broadcastable against E[l]: the product of the other weights of p(e)."""
    return Phi[l + 1][:, None, None] * B[l][None, :, None]


def _icr(E, gE, c, masks, V):
    """Γ (log-gradients γ of every edge's basis path, design §4) and λ per level."""
    h = chain_widths(E)
    L, dev = len(E), E[0].device
    G = [e * g for e, g in zip(E, gE)]
    Gam = [g.masked_fill(free, 0) for g, (free, _) in zip(G, masks)]
    A: list = [None] * (L + 1)
    for lv in range(L - 1, 0, -1):                        # bottom-up: per-unit sums of the subtree
        a = Gam[lv].sum(dim=(0, 2))                       # N-edges leaving (lv, i); its U entries are final
        if lv + 1 <= L - 1:                               # in-tree children (lv+1, o), o % h[lv] == i
            a = a.index_add(0, torch.arange(h[lv + 1], device=dev) % h[lv], A[lv + 1])
        A[lv] = a
        rows, cols = _in_edges(h, lv - 1, dev)
        first = _class_first(h, lv, dev)
        r, k = rows[first], cols[first]
        Gam[lv - 1][r, k, c[lv - 1]] = G[lv - 1][r, k, c[lv - 1]] - a[r]
    lam = [torch.zeros(h[0], dtype=E[0].dtype, device=dev)]
    for lv in range(1, L):
        rows, cols = _in_edges(h, lv - 1, dev)
        gam_u = Gam[lv - 1][rows, cols, c[lv - 1]]
        first = _class_first(h, lv, dev)
        lam.append(torch.where(first, gam_u / V[lv] ** 2, lam[lv - 1][cols]))
    lam.append(torch.zeros(h[L], dtype=E[-1].dtype, device=dev))
    return Gam, lam


def _prepare(E, gE, c):
    if len(E) != len(gE) or len(E) != len(c):
        raise ValueError(f"{len(E)} edge tensors need as many gradients and centres, got {len(gE)} and {len(c)}")
    for l, (e, g) in enumerate(zip(E, gE)):
        if e.shape != g.shape:
            raise ValueError(f"layer {l}: edge tensor {tuple(e.shape)} and gradient {tuple(g.shape)} differ")
    E, gE = _as_compute(E), _as_compute(gE)
    h = chain_widths(E)
    masks = gspace_masks(h, [e.shape[2] for e in E], c, device=E[0].device)
    B, Phi, V = skeleton_products(E, c)
    return E, gE, h, masks, B, Phi, V


def gspace_icr(E: Sequence[torch.Tensor], gE: Sequence[torch.Tensor], c: Sequence[int],
               gb: Sequence[torch.Tensor | None] | None = None) -> GSpaceGrad:
    """The inverse chain rule (design §4, eq. (3) solved in closed form): ∂l/∂v of every basis path
    from the weight gradients gE (= ∂l/∂E) and the bias gradients gb. Pure; compute dtype out."""
    E, gE, h, masks, B, Phi, V = _prepare(E, gE, c)
    Gam, lam = _icr(E, gE, c, masks, V)
    L = len(E)
    dv = []
    for l in range(L):
        free, updated = masks[l]
        value_u = V[l + 1][:, None, None] if l + 1 <= L - 1 else torch.ones_like(Phi[L])[:, None, None]
        dv_l = torch.where(updated, Gam[l] / value_u, gE[l] / _kappa(B, Phi, l))
        dv.append(dv_l.masked_fill(free, 0))
    gb = _as_compute(gb if gb is not None else [None] * L)
    dv_bias = [None if g is None else g / Phi[l + 1] for l, g in enumerate(gb)]
    return GSpaceGrad(dv, dv_bias, lam)


def gspace_step(E: Sequence[torch.Tensor], b: Sequence[torch.Tensor | None], gE: Sequence[torch.Tensor],
                gb: Sequence[torch.Tensor | None], lr: float, c: Sequence[int]) -> GSpaceStep:
    """One exact G-SGD step (design §5): v' = v − η·∂l/∂v on the basis-path values, then weight
    allocation with F fixed, in quotient form:

        non-skeleton e = E[l][o,i,t]:   (w − η·g/κ²) / ρ[l][i]
        u ∈ U = E[l][o, o % h[l], c]:   w · ρ[l+1][o] / ρ[l][o % h[l]]
        f ∈ F:                          unchanged
        bias of unit (l+1, o):          b − η·g_b / Φ[l+1][o]²   (output biases: plain SGD)

    with ρ = 1 − η·λ per class. Pure: returns new tensors in the compute dtype. A ρ of 0 (or a
    non-finite result) is the caller's to refuse: see ``GSpaceStep.rho``."""
    E, gE, h, masks, B, Phi, V = _prepare(E, gE, c)
    _, lam = _icr(E, gE, c, masks, V)
    rho = [1 - lr * x for x in lam]
    weights = []
    for l, (e, g) in enumerate(zip(E, gE)):
        free, updated = masks[l]
        rho_in, rho_out = rho[l][None, :, None], rho[l + 1][:, None, None]
        kappa = _kappa(B, Phi, l)
        new = torch.where(updated, e * rho_out / rho_in, (e - lr * g / kappa ** 2) / rho_in)
        weights.append(torch.where(free, e, new))
    biases = [None if bb is None else bb.to(compute_dtype(bb.dtype)) - lr * g.to(compute_dtype(g.dtype)) / Phi[l + 1] ** 2
              for l, (bb, g) in enumerate(zip(b, gb))]
    return GSpaceStep(weights, biases, rho)


def gspace_direction(E: Sequence[torch.Tensor], b: Sequence[torch.Tensor | None], gE: Sequence[torch.Tensor],
                     gb: Sequence[torch.Tensor | None], c: Sequence[int]) -> tuple[list, list]:
    """The first-order (tangent) direction d of the exact step, w'(η) = w − η·d + O(η²) (design §5):

        non-skeleton: g/κ² − w·λ[l][i];   U: w·(λ[l+1][o] − λ[l][o % h[l]]);   F: 0;   bias: g_b/Φ²

    the Riemannian gradient on the slice {w_F fixed} for the Euclidean metric in basis-path
    coordinates. Pure; returns (weight directions, bias directions) in the compute dtype."""
    E, gE, h, masks, B, Phi, V = _prepare(E, gE, c)
    _, lam = _icr(E, gE, c, masks, V)
    dirs = []
    for l, (e, g) in enumerate(zip(E, gE)):
        free, updated = masks[l]
        lam_in, lam_out = lam[l][None, :, None], lam[l + 1][:, None, None]
        d = torch.where(updated, e * (lam_out - lam_in), g / _kappa(B, Phi, l) ** 2 - e * lam_in)
        dirs.append(d.masked_fill(free, 0))
    bias_dirs = [None if g is None else g.to(compute_dtype(g.dtype)) / Phi[l + 1] ** 2 for l, g in enumerate(gb)]
    return dirs, bias_dirs


def gspace_normalize(E: Sequence[torch.Tensor], b: Sequence[torch.Tensor | None],
                     c: Sequence[int]) -> tuple[list, list]:
    """The 𝒢-action c_x = |Φ(x)| on every hidden unit (row x of E[lv-1] and its bias times c_x,
    column x of E[lv] divided by it): the function is unchanged, |w_F| becomes 1 with signs kept, and
    a second application changes nothing. Needs every skeleton entry ≠ 0. Pure; compute dtype out."""
    E, b = _as_compute(E), _as_compute(b)
    _, Phi, _ = skeleton_products(E, c)
    L = len(E)
    scale = [None] + [Phi[lv].abs() for lv in range(1, L)] + [None]
    out_w, out_b = [], []
    for l, e in enumerate(E):
        row = scale[l + 1] if l + 1 <= L - 1 else None
        col = scale[l] if l >= 1 else None
        if row is not None:
            e = e * row[:, None, None]
        if col is not None:
            e = e / col[None, :, None]
        out_w.append(e)
        out_b.append(None if b[l] is None else (b[l] * row if row is not None else b[l]))
    return out_w, out_b

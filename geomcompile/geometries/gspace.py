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

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from ..errors import GeomCompileError, GeomCompileWarning
from ..findings import Finding
from .base import (Geometry, Option, StepContext, Unit, compute_dtype, count_nonfinite, finite_entries,
                   fit_dtype, register)


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


def _class_start(h: Sequence[int], lv: int) -> int:
    """The first unit of _class_first(h, lv): those units are o = start..h[lv]-1, so selecting them
    is a slice (a boolean-mask index has a data-dependent shape: a host sync on a GPU)."""
    return 0 if lv == 1 else min(h[lv - 1], h[lv])


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
            start = _class_start(h, l + 1)
            updated[rows[start:], cols[start:], c[l]] = True
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
        start = _class_start(h, lv)
        r, k = rows[start:], cols[start:]
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


# ---- the geometry: one unit per 𝒢-chain -------------------------------------------------------------
# min |V_C| below which the plan warns: steps scale as 1/κ², so a class value this small makes the
# first steps orders of magnitude larger than plain SGD's (design §9, warnings()).
SMALL_CLASS_VALUE = 1e-3
SMALL_KAPPA_SQ = 1e-6


@dataclass(frozen=True)
class ChainLayer:
    """One layer of a unit's chain: its weight, its bias (None: the layer has none) and its edge layout."""

    weight: str
    bias: str | None
    out: int
    inputs: int
    taps: int
    centre: int


def chain_layers(unit: Unit) -> list[ChainLayer]:
    """The layers of a gspace unit in chain order (its names are W¹, b¹, …, W^L, b^L)."""
    facts = dict(zip(unit.names, unit.facts))
    layers = []
    for f in unit.facts:
        if f.kind == "bias":
            continue
        taps = int(f.g_taps or 1)
        out = f.shape[0]
        layers.append(ChainLayer(f.name, f.g_bias if f.g_bias in facts else None, out,
                                 f.numel // max(out * taps, 1), taps, int(f.g_centre or 0)))
    return layers


def _edges(layers: list[ChainLayer], tensors: dict) -> list[torch.Tensor]:
    return [tensors[la.weight].reshape(la.out, la.inputs, la.taps) for la in layers]


def _invariant_counts(layers: list[ChainLayer]) -> tuple[int, int, int]:
    """(H, m, classes) of a chain."""
    h = [layers[0].inputs] + [la.out for la in layers]
    H = sum(h[1:-1])
    m = sum(la.out * la.inputs * la.taps + (la.out if la.bias else 0) for la in layers)
    classes = h[1] + sum(max(0, h[lv] - h[lv - 1]) for lv in range(2, len(h) - 1)) if len(h) > 2 else 0
    return H, m, classes


def _skeleton_entries(E: list[torch.Tensor], c: list[int]) -> list[torch.Tensor]:
    """Per layer, the boolean mask of the skeleton S = F ∪ U."""
    masks = gspace_masks(chain_widths(E), [e.shape[2] for e in E], c, device=E[0].device)
    return [free | updated for free, updated in masks]


@register
class GSpace(Geometry):
    """G-SGD (design §9): SGD on the basis-path values of a 𝒢-chain, with the free skeleton fixed."""

    name = "gspace"
    stage = "metric"
    paper = "002_3ba745487f6ecdff.txt"
    match_hint = "add `g_coupled: true` to match"
    # pom retracts each layer onto its own manifold after the step: that moves the free skeleton
    # and leaves path space, so the two cannot share a weight.
    incompatible = ("pom",)
    shard_refusal = "the skeleton gathers need the full tensors of every chain layer"
    # Weight decay pulls the free skeleton off its fixed values and breaks the rescaling invariance
    # (the paper pairs G-SGD with basis-path regularisation instead): plan.param_groups leaves it out.
    hurt_by_weight_decay = True
    options = {
        "step": Option(str, "exact", "exact: the G-SGD step of the paper, needs plain torch.optim.SGD "
                                     "(momentum 0, no weight decay); tangent: its first-order direction "
                                     "written into .grad, for any optimizer", choices=("exact", "tangent")),
        "skeleton_init": Option(str, "normalize", "at install: normalize rescales the hidden units so "
                                                  "|free skeleton| = 1 (function unchanged); paper sets every "
                                                  "skeleton weight to +1 (changes the function; fresh models "
                                                  "only); keep touches nothing",
                                choices=("normalize", "paper", "keep")),
    }

    # ---- planning -------------------------------------------------------------------------
    def check(self, facts) -> str | None:
        if facts.kind == "bias":
            if getattr(facts, "g_weight", None) is None:
                return (f"gspace on a bias needs the bias of a 𝒢-chain layer, but {facts.name} is not the bias "
                        f"of a coupled conv or linear layer")
            return None
        if facts.kind not in ("conv", "linear"):
            return f"gspace acts on the conv and linear weights of a 𝒢-chain and their biases, not on a {facts.kind}"
        if facts.g_next is None and facts.g_prev is None:
            why = facts.g_reason or "no positively homogeneous link to a neighbouring layer"
            return f"gspace needs a weight coupled to a neighbouring layer (a 𝒢-link), but {facts.name} has none: {why}"
        return None

    def units(self, facts, structure=None) -> list[Unit]:
        """Maximal runs of coupled layers among the assigned weights, each with its layers' assigned
        biases: names (W¹, b¹, …, W^L, b^L). A run of one layer, a layer whose bias is not assigned
        and an assigned bias whose weight is not are formed too, so that check_unit refuses them
        with the rule's position."""
        weights = {f.name: f for f in facts if f.kind != "bias"}
        biases = {f.name: f for f in facts if f.kind == "bias"}
        used, units = set(), []
        for f in facts:
            if f.kind == "bias" or (f.g_prev in weights):
                continue                                  # not the first layer of a run
            run, cur = [], f
            while cur is not None and cur.name not in used:
                used.add(cur.name)
                run.append(cur)
                if cur.g_bias is not None and cur.g_bias in biases:
                    run.append(biases[cur.g_bias])
                    used.add(cur.g_bias)
                cur = weights.get(cur.g_next)
            units.append(Unit(tuple(x.name for x in run), tuple(run)))
        for name, f in biases.items():
            if name not in used:
                units.append(Unit((name,), (f,)))
        for name, f in weights.items():                    # a cycle of links (never from the analysis)
            if name not in used:
                units.append(Unit((name,), (f,)))
        return units

    def check_unit(self, unit: Unit) -> str | None:
        weights = [f for f in unit.facts if f.kind != "bias"]
        if not weights:
            f = unit.facts[0]
            return (f"the bias {f.name} is assigned to gspace but its weight {f.g_weight} is not: a chain's "
                    f"biases move with its weights. Fix: match {f.g_weight} in the same rule, or exclude the bias")
        names = set(unit.names)
        missing = [f.g_bias for f in weights if f.g_bias is not None and f.g_bias not in names]
        if missing:
            return (f"the chain's bias(es) {', '.join(missing)} are not assigned: G-SGD must move a hidden unit's "
                    f"bias with its incoming weights, or the step is neither exact nor invariant. Fix: add "
                    f"`kind: bias` to the gspace rule (e.g. match {{g_coupled: true}} covers both)")
        if len(weights) < 2:
            f = weights[0]
            return (f"gspace needs ≥ 2 coupled layers, but the rule assigns only {f.name} of its chain "
                    f"(next layer: {f.g_next or 'none'}, previous: {f.g_prev or 'none'}; "
                    f"{f.g_reason or 'the other layers are not matched'}). Fix: match the neighbouring layer too")
        layers = chain_layers(unit)
        for a, b in zip(layers, layers[1:]):
            if b.inputs != a.out:
                return (f"{b.weight} reads {b.inputs} channels per tap but {a.weight} has {a.out} outputs: "
                        f"the analysis' taps do not fit these shapes; gspace refuses the chain")
        for la in layers:
            if not 0 <= la.centre < la.taps:
                return f"{la.weight}: skeleton tap {la.centre} is not one of its {la.taps} taps"
        return None

    # ---- install --------------------------------------------------------------------------
    def check_install(self, unit: Unit, ctx: StepContext) -> str | None:
        problem = self._lr_problem(unit, ctx) or self._optimizer_problem(unit, ctx)
        if problem:
            return problem
        if self.opts["skeleton_init"] == "paper":
            return None
        layers = chain_layers(unit)
        E = _edges(layers, {la.weight: ctx.params[la.weight].detach() for la in layers})
        skeleton = _skeleton_entries(E, [la.centre for la in layers])
        zeros = [la.weight for la, e, s in zip(layers, E, skeleton) if bool((e[s] == 0).any())]
        if zeros:
            return (f"skeleton_init: {self.opts['skeleton_init']} needs every skeleton weight ≠ 0 (the path "
                    f"values divide by them), but {', '.join(zeros)} has a zero skeleton entry. Fix: use "
                    f"skeleton_init: paper (sets the skeleton to +1), or initialise those weights")
        return None

    def _lr_problem(self, unit: Unit, ctx: StepContext) -> str | None:
        lrs = {name: _lr(ctx.group_of[name]) for name in unit.names if name in ctx.group_of}
        if len(set(lrs.values())) > 1:
            listing = ", ".join(f"{n}: {v:g}" for n, v in lrs.items())
            return (f"the chain's parameters are in param groups with different learning rates ({listing}); a "
                    f"G-SGD step is one step in path space with one lr. Fix: give them the same lr (one group, "
                    f"or the same lr in every group that holds them)")
        return None

    def _optimizer_problem(self, unit: Unit, ctx: StepContext) -> str | None:
        if self.opts["step"] != "exact":
            return None
        opt = ctx.optimizer
        if not isinstance(opt, torch.optim.SGD):
            return (f"step: exact is plain G-SGD and needs torch.optim.SGD, got {type(opt).__name__}. Fix: use "
                    f"step: tangent (the first-order G-SGD direction, for any optimizer)")
        plain = {"momentum": 0, "dampening": 0, "nesterov": False, "weight_decay": 0, "maximize": False}
        for name in unit.names:
            group = ctx.group_of.get(name)
            if group is None:
                continue
            bad = [f"{k}={group.get(k)}" for k, want in plain.items() if group.get(k, want) != want]
            if bad:
                return (f"step: exact needs plain SGD, but {name}'s param group has {', '.join(bad)}. Fix: use "
                        f"step: tangent, or momentum=0, dampening=0, nesterov=False, weight_decay=0, "
                        f"maximize=False for the chain's group")
        return None

    def warnings(self, unit: Unit, ctx: StepContext) -> list[str]:
        out = []
        for name in unit.names:
            wd = ctx.group_of[name].get("weight_decay", 0) if name in ctx.group_of else 0
            if wd:
                why = ("which breaks the rescaling invariance and moves the free skeleton that G-SGD holds "
                       "fixed (the paper regularises basis-path values instead, §11.5)")
                out.append(Finding(f"gspace on {name}: its param group has weight_decay={wd}, {why}; put it in "
                                   f"a group with weight_decay=0", name=name, key=("gspace", "weight_decay", wd),
                                   head="gspace on ", tail=f" whose param group has weight_decay={wd}, {why}. Fix: "
                                   f"put them in their own param group with weight_decay=0"))
        if self.opts["skeleton_init"] == "paper":
            return out
        layers = chain_layers(unit)
        centres = [la.centre for la in layers]
        with torch.no_grad():
            E = [e.to(compute_dtype(e.dtype)) for e in _edges(layers, {la.weight: ctx.params[la.weight] for la in layers})]
            if any(bool((e[s] == 0).any()) for e, s in zip(E, _skeleton_entries(E, centres))):
                return out                                # check_install refuses it
            if self.opts["skeleton_init"] == "normalize":    # the values the first step will see
                E, _ = gspace_normalize(E, [None] * len(E), centres)
            min_v, min_k = _small_values(E, centres)
        if min_v < SMALL_CLASS_VALUE or min_k ** 2 < SMALL_KAPPA_SQ:
            out.append(f"gspace on the chain {unit.key}: min |V_C| = {min_v:.2g}, min |κ|² = {min_k ** 2:.2g} "
                       f"after skeleton_init: {self.opts['skeleton_init']}; G-SGD's steps scale as 1/κ², so the "
                       f"first steps can be orders of magnitude larger than plain SGD's. Fix: skeleton_init: paper "
                       f"(V = κ = 1 at the start, the paper's setting) on a fresh model, or a smaller lr")
        return out

    def init_state(self, unit: Unit, ctx: StepContext) -> dict:
        device = ctx.params[unit.names[0]].device
        # nonfinite_steps: steps whose gradients or weights had a NaN/Inf entry (passed through as
        # plain torch would; the chain's step is computed without them).
        return {"skipped_steps": torch.zeros((), dtype=torch.int64, device=device),
                "nonfinite_steps": torch.zeros((), dtype=torch.int64, device=device),
                "chain_sign_flips": torch.zeros((), dtype=torch.int64, device=device),
                "max_lr_lambda": torch.zeros((), dtype=torch.float64, device=device),
                "min_abs_V": torch.full((), math.inf, dtype=torch.float64, device=device),
                "min_abs_kappa": torch.full((), math.inf, dtype=torch.float64, device=device)}

    def on_install(self, unit: Unit, state, ctx: StepContext) -> list[str]:
        layers = chain_layers(unit)
        H, m, classes = _invariant_counts(layers)
        widths = "-".join(str(x) for x in [layers[0].inputs] + [la.out for la in layers])
        lines = [f"gspace chain {' → '.join(la.weight for la in layers)}: widths {widths}, H = {H}, m = {m}, "
                 f"H/m = {H / m:.4f}, {classes} classes, step: {self.opts['step']}"]
        mode, centres = self.opts["skeleton_init"], [la.centre for la in layers]
        frozen = [n for n in unit.names if not ctx.params[n].requires_grad]
        if frozen and mode != "keep":
            # Both modes rewrite every layer of the chain; a frozen weight is never written.
            return lines + [f"gspace skeleton_init: {mode} not applied to the chain: {', '.join(frozen)} "
                            f"is frozen (requires_grad=False); the weights are kept as they are"]
        with torch.no_grad():
            weights = [ctx.params[la.weight] for la in layers]
            biases = [ctx.params[la.bias] if la.bias else None for la in layers]
            E = [w.detach().reshape(la.out, la.inputs, la.taps) for w, la in zip(weights, layers)]
            if mode == "paper" and _paper_initialised(E, centres):
                # G-SGD never moves F, so a free skeleton that is exactly +1 everywhere is a run that
                # paper already initialised (a fresh init never is): resetting U would undo training.
                lines.append("gspace skeleton_init: paper left the chain as it is: its free skeleton is already "
                             "+1 everywhere (a resumed run; the trained skeleton weights are kept)")
            elif mode == "paper":
                skeleton = _skeleton_entries(E, centres)
                count = sum(int(s.sum()) for s in skeleton)
                for w, e, s in zip(weights, E, skeleton):
                    new = torch.where(s, torch.ones_like(e), e)
                    w.detach().copy_(new.reshape(w.shape))
                lines.append(f"gspace skeleton_init: paper set {count} skeleton entries to +1 (the function "
                             f"changed; use it on a fresh model only)")
            elif mode == "normalize":
                new_E, new_b = gspace_normalize(E, [None if b is None else b.detach() for b in biases], centres)
                for w, e in zip(weights, new_E):
                    w.detach().copy_(e.reshape(w.shape).to(w.dtype))
                for b, nb in zip(biases, new_b):
                    if b is not None:
                        b.detach().copy_(nb.to(b.dtype))
                lines.append("gspace skeleton_init: normalize rescaled the hidden units so that |free skeleton| = 1 "
                             "(function unchanged)")
            else:
                lines.append("gspace skeleton_init: keep (weights untouched)")
        return lines

    # ---- the step -------------------------------------------------------------------------
    def pre_step(self, unit: Unit, grads, state, ctx: StepContext) -> None:
        if any(g is None for g in grads):
            # A G-SGD step moves every layer of the chain together: a layer without a gradient
            # (frozen, unused) stops the whole chain for this step.
            self._skip(unit, state, ctx)
            return
        problem = self._lr_problem(unit, ctx) or self._optimizer_problem(unit, ctx)
        if problem:
            raise GeomCompileError(f"gspace on the chain {unit.key}: {problem}")
        layers = chain_layers(unit)
        grad_of = dict(zip(unit.names, grads))
        lr = _lr(ctx.group_of[unit.names[0]])
        centres = [la.centre for la in layers]
        # One NaN/Inf entry would spread over the whole chain (skeleton products, class ratios): the
        # step is computed with the non-finite entries of weights and gradients read as 0, and _write
        # passes the gradient's own non-finite entries through, as plain torch would (no host sync).
        count_nonfinite(state, "nonfinite_steps", *grads, *(ctx.params[n].detach() for n in unit.names))
        E = [finite_entries(ctx.params[la.weight].detach()).reshape(la.out, la.inputs, la.taps) for la in layers]
        b = [finite_entries(ctx.params[la.bias].detach()) if la.bias else None for la in layers]
        gE = [finite_entries(grad_of[la.weight]).reshape(la.out, la.inputs, la.taps) for la in layers]
        gb = [finite_entries(grad_of[la.bias]) if la.bias else None for la in layers]
        self._record_skeleton(E, centres, state)
        if self.opts["step"] == "tangent":
            dE, db = gspace_direction(E, b, gE, gb, centres)
            self._write(layers, grad_of, dE, db, unit, state, ctx)
            return
        if lr == 0:
            for g in grads:
                g.zero_()
            return
        step = gspace_step(E, b, gE, gb, lr, centres)
        rho = torch.cat([r.reshape(-1) for r in step.rho[1:-1]])
        dE = [(e.to(n.dtype) - n) / lr for e, n in zip(E, step.weights)]
        db = [None if bb is None else (bb.to(n.dtype) - n) / lr for bb, n in zip(b, step.biases)]
        # The chain's one host read per step: whether to drop its step (a GPU sync; both checks at once)
        zero_ratio, finite = torch.stack([(rho == 0).any(), _all_finite(dE + db)]).tolist()
        if zero_ratio:
            self._skip(unit, state, ctx, "a class ratio 1 − η·λ_C is exactly 0 (the chain value would be 0, "
                                         "outside 𝒢-space)")
            return
        lr_lambda = (1 - rho).max()                       # max η·λ_C; above 1 a chain value changes sign
        state["max_lr_lambda"].copy_(torch.maximum(state["max_lr_lambda"], lr_lambda.to(torch.float64)))
        state["chain_sign_flips"] += (rho < 0).sum().to(state["chain_sign_flips"].device)
        self._write(layers, grad_of, dE, db, unit, state, ctx, finite)

    def _write(self, layers, grad_of, dE, db, unit, state, ctx, finite: bool | None = None) -> None:
        """The chain's new gradients; a step that is not finite is dropped (``finite``: already read)."""
        new = {la.weight: d for la, d in zip(layers, dE)}
        new.update({la.bias: d for la, d in zip(layers, db) if la.bias})
        if not (bool(_all_finite(list(new.values()))) if finite is None else finite):   # one read
            self._skip(unit, state, ctx, "the step is not finite")
            return
        for name, d in new.items():
            g = grad_of[name]
            g.copy_(torch.where(torch.isfinite(g), fit_dtype(d.reshape(g.shape), g.dtype), g))

    def _skip(self, unit: Unit, state, ctx: StepContext, why: str | None = None) -> None:
        """The chain takes no step: its gradients are dropped (the base optimizer skips them)."""
        state["skipped_steps"] += 1
        for name in unit.names:
            ctx.params[name].grad = None
        if why:
            warnings.warn(f"gspace skipped a step of the chain {unit.key}: {why}; the weights are unchanged "
                          f"(plan.diagnostics() counts skipped_steps)", GeomCompileWarning, stacklevel=2)

    @staticmethod
    def _record_skeleton(E, centres, state) -> None:
        min_v, min_k = _small_value_tensors([e.to(compute_dtype(e.dtype)) for e in E], centres)
        state["min_abs_V"].copy_(min_v)            # on the device: no host read
        state["min_abs_kappa"].copy_(min_k)

    def diagnostics(self, unit: Unit, state) -> dict[str, float]:
        layers = chain_layers(unit)
        if len(layers) < 2:
            return {}
        H, m, classes = _invariant_counts(layers)
        return {"invariant_ratio": H / m, "classes": float(classes),
                "min_abs_V": float(state["min_abs_V"]), "min_abs_kappa": float(state["min_abs_kappa"]),
                "max_lr_lambda": float(state["max_lr_lambda"]), "chain_sign_flips": float(state["chain_sign_flips"]),
                "skipped_steps": float(state["skipped_steps"]),
                "nonfinite_steps": float(state.get("nonfinite_steps", 0))}


def _paper_initialised(E, centres) -> bool:
    """Every free skeleton entry is exactly +1."""
    masks = gspace_masks(chain_widths(E), [e.shape[2] for e in E], centres, device=E[0].device)
    return all(bool((e[free] == 1).all()) for e, (free, _) in zip(E, masks))


def _small_value_tensors(E, centres) -> tuple[torch.Tensor, torch.Tensor]:
    """(min |V_C| over the hidden units, min |κ| over the chain's edges), float64 0-d tensors on E's
    device; the products of the two minima in float64, as Python floats would multiply them."""
    B, Phi, V = skeleton_products(E, centres)
    L = len(E)
    min_v = (torch.stack([V[lv].abs().min().double() for lv in range(1, L)]).min() if L > 1
             else torch.full((), math.inf, dtype=torch.float64, device=E[0].device))
    min_k = torch.stack([B[l].abs().min().double() * Phi[l + 1].abs().min().double() for l in range(L)]).min()
    return min_v, min_k


def _small_values(E, centres) -> tuple[float, float]:
    """_small_value_tensors as Python floats (at install)."""
    min_v, min_k = _small_value_tensors(E, centres)
    return float(min_v), float(min_k)


def _all_finite(tensors) -> torch.Tensor:
    """A 0-d bool tensor: every entry of every tensor (None skipped) is finite."""
    return torch.stack([torch.isfinite(t).all() for t in tensors if t is not None]).all()


def _lr(group: dict) -> float:
    return float(group.get("lr", 0.0))

"""PSI manifold (``geometries/psi.py``: ``psi_grad``, ``psi_renorm_factors`` and the state rescale of
``PSI.post_step``) as multi-tensor Triton kernels.

A *unit* is GS consecutive rows along the output dimension (row: GS = 1, group: GS = group size,
tensor: GS = O), read as A·GS·B elements. A program owns whole units, so its norms need no
cross-program reduction: BLOCK_U small units as one (BLOCK_U, BLOCK) tile, or one large unit.

``_psi_kernel``: g_u = ‖w_u‖²·∇_u, then either
  * UPDATE none: g is written into the gradient (the base optimizer steps afterwards), or
  * UPDATE SGD/Adam: the base update of weight and state, then the renormalisation: if the new
    ‖w_u‖ > max_norm, the unit and its state are rescaled by 1/‖w_u‖ (first moments by the
    factor, second moments by its square: ``psi.STATE_POWERS``) and the unit's counter is bumped.

``_psi_renorm_kernel``: the renormalisation alone, after a base optimizer that is not fused
(RMSprop, ...) or for units that had no gradient this step, with up to three state tensors.

ONE_TILE (a unit fits in BLOCK elements): every tensor is read once and written once. Otherwise a
program owns one unit and makes passes over BLOCK-sized chunks: norm of w, then the update (accumulating the new
norm), then — only when the unit is renormalised, which is rare — a rescale pass.

Bytes moved per element (e = element size; k = state tensors, 1 for SGD with momentum, 2 for Adam):

    ==============================  =====================  ===========================================
    kernel                          ONE_TILE               multi-pass (+ rescale pass if renormalised)
    ==============================  =====================  ===========================================
    psi, UPDATE none                3e                     3e  (w in pass 1; g read and written in pass 2)
    psi fused with SGD / Adam       (3 + 2k)e              (4 + 2k)e   (+ (2 + 2k)e)
    psi_renorm                      e (+ (1 + 2k)e)        e           (+ (2 + 2k)e)
    ==============================  =====================  ===========================================
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch
import triton
import triton.language as tl

from .optim_updates import NONE, base_update, kernel_args, tl_dtype
from .tables import (Operand, Staged, TableCache, bucket_dtype, device_guard, load_states, next_power_of_2, prepare,
                     role_ptrs, store_states)

UNITS = ("row", "group", "tensor")
_TINY = tl.constexpr(1.1754943508222875e-38)   # torch.finfo(torch.float32).tiny, as psi_renorm_factors


@triton.jit
def _unit_elements(idx, u, GS, B):
    """Element idx of unit u (rows u·GS .. u·GS+GS−1) -> its (a, o, b) indices."""
    per_a = GS * B
    a = idx // per_a
    rest = idx - a * per_a
    oo = rest // B
    return a, u * GS + oo, rest - oo * B


@triton.jit
def _renorm_scale(sum_sq, max_norm):
    norm = tl.sqrt(sum_sq)
    renorm = norm > max_norm
    return renorm, tl.where(renorm, 1.0 / tl.maximum(norm, _TINY), 1.0)


@triton.jit
def _rescale(row, ROLE: tl.constexpr, POWER: tl.constexpr, a, o, b, mask, scale, DT: tl.constexpr):
    """x <- x·scale^POWER for one role of the unit's elements."""
    p = role_ptrs(row, ROLE, DT, a, o, b)
    x = tl.load(p, mask=mask, other=0.0).to(tl.float32)
    if POWER == 2:
        x = x * (scale * scale)
    else:
        x = x * scale
    tl.store(p, x.to(DT), mask=mask)


@triton.jit
def _program_units(tab, prog, NF: tl.constexpr, BLOCK_U: tl.constexpr):
    """This program's table row and first unit: (row, u0, O, B, GS, U elements per unit, counter)."""
    pid = tl.program_id(0)
    t = tl.load(prog + 2 * pid).to(tl.int64)
    u0 = tl.load(prog + 2 * pid + 1).to(tl.int64) * BLOCK_U
    row = tab + t * NF
    A = tl.load(row)
    O = tl.load(row + 1)
    B = tl.load(row + 2)
    GS = tl.load(row + 3)
    counter = tl.load(row + 5).to(tl.pointer_type(tl.int64))
    return row, u0, O, B, GS, A * GS * B, counter


@triton.jit
def _unit_tile(u0, O, B, GS, U, e, BLOCK_U: tl.constexpr):
    """BLOCK_U whole units from u0 in one tile: (live units, element mask, index grids a, o, b)."""
    units = u0 + tl.arange(0, BLOCK_U).to(tl.int64)
    live = units < O // GS
    mask = live[:, None] & (e[None, :] < U)
    a, o, b = _unit_elements(e[None, :], units[:, None], GS, B)
    return live, mask, a, o, b


@triton.jit
def _chunked_norm_sq(row, ROLE: tl.constexpr, u0, B, GS, U, e, DT: tl.constexpr, BLOCK: tl.constexpr):
    """‖x_u‖² of one unit that does not fit a tile, read in chunks of BLOCK elements."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, U, BLOCK):
        idx = start + e
        a, o, b = _unit_elements(idx, u0, GS, B)
        x = tl.load(role_ptrs(row, ROLE, DT, a, o, b), mask=idx < U, other=0.0).to(tl.float32)
        acc += x * x
    return tl.sum(acc, axis=0)


@triton.jit
def _psi_kernel(tab, prog, max_norm,
                lr, momentum, one_minus_dampening, weight_decay, lerp_w, beta2, one_minus_beta2, eps,
                neg_step_size, bc2_sqrt, decay,
                NF: tl.constexpr, DT: tl.constexpr, UPDATE: tl.constexpr, N_STATE: tl.constexpr,
                MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr,
                HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                ONE_TILE: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK: tl.constexpr):
    """One program: BLOCK_U whole units (ONE_TILE) or one unit in chunks. Roles: 0 grad, 1 weight,
    2 and 3 optimizer state."""
    row, u0, O, B, GS, U, counter = _program_units(tab, prog, NF, BLOCK_U)
    first = tl.load(row + 4) != 0
    e = tl.arange(0, BLOCK).to(tl.int64)
    if ONE_TILE:
        live, mask, a, o, b = _unit_tile(u0, O, B, GS, U, e, BLOCK_U)
        w_p = role_ptrs(row, 1, DT, a, o, b)
        g_p = role_ptrs(row, 0, DT, a, o, b)
        w = tl.load(w_p, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_p, mask=mask, other=0.0).to(tl.float32) * tl.sum(w * w, axis=1)[:, None]
        if UPDATE == 0:
            tl.store(g_p, g.to(DT), mask=mask)
        else:
            s1, s2, s1_p, s2_p = load_states(row, a, o, b, mask, w, w_p, DT, N_STATE)
            w, s1, s2 = base_update(g, w, s1, s2, first, lr, momentum, one_minus_dampening, weight_decay, lerp_w,
                                    beta2, one_minus_beta2, eps, neg_step_size, bc2_sqrt, decay,
                                    UPDATE, MAXIMIZE, HAS_WD, DECOUPLED, HAS_MOMENTUM, NESTEROV)
            # renormalise what eager would read back: the values rounded to the parameter dtype
            w = w.to(DT).to(tl.float32)
            s1 = s1.to(DT).to(tl.float32)
            s2 = s2.to(DT).to(tl.float32)
            renorm, scale = _renorm_scale(tl.sum(tl.where(mask, w * w, 0.0), axis=1), max_norm)
            scale = scale[:, None]
            tl.store(w_p, (w * scale).to(DT), mask=mask)
            store_states(s1 * scale, s2 * (scale * scale), s1_p, s2_p, mask, DT, N_STATE)
            tl.atomic_add(counter, tl.sum((renorm & live).to(tl.int64), axis=0))
    else:
        norm_sq = _chunked_norm_sq(row, 1, u0, B, GS, U, e, DT, BLOCK)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, U, BLOCK):
            idx = start + e
            mask = idx < U
            a, o, b = _unit_elements(idx, u0, GS, B)
            g_p = role_ptrs(row, 0, DT, a, o, b)
            g = tl.load(g_p, mask=mask, other=0.0).to(tl.float32) * norm_sq
            if UPDATE == 0:
                tl.store(g_p, g.to(DT), mask=mask)
            else:
                w_p = role_ptrs(row, 1, DT, a, o, b)
                w = tl.load(w_p, mask=mask, other=0.0).to(tl.float32)
                s1, s2, s1_p, s2_p = load_states(row, a, o, b, mask, w, w_p, DT, N_STATE)
                w, s1, s2 = base_update(g, w, s1, s2, first, lr, momentum, one_minus_dampening, weight_decay,
                                        lerp_w, beta2, one_minus_beta2, eps, neg_step_size, bc2_sqrt, decay,
                                        UPDATE, MAXIMIZE, HAS_WD, DECOUPLED, HAS_MOMENTUM, NESTEROV)
                w = w.to(DT)
                tl.store(w_p, w, mask=mask)
                store_states(s1, s2, s1_p, s2_p, mask, DT, N_STATE)
                w = w.to(tl.float32)
                acc += tl.where(mask, w * w, 0.0)
        if UPDATE != 0:
            renorm, scale = _renorm_scale(tl.sum(acc, axis=0), max_norm)
            if renorm:
                for start in range(0, U, BLOCK):
                    idx = start + e
                    mask = idx < U
                    a, o, b = _unit_elements(idx, u0, GS, B)
                    _rescale(row, 1, 1, a, o, b, mask, scale, DT)
                    if N_STATE >= 1:
                        _rescale(row, 2, 1, a, o, b, mask, scale, DT)
                    if N_STATE >= 2:
                        _rescale(row, 3, 2, a, o, b, mask, scale, DT)
                tl.atomic_add(counter, 1)


@triton.jit
def _psi_renorm_kernel(tab, prog, max_norm, NF: tl.constexpr, DT: tl.constexpr, N_STATE: tl.constexpr,
                       POW1: tl.constexpr, POW2: tl.constexpr, POW3: tl.constexpr,
                       ONE_TILE: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK: tl.constexpr):
    """One program: BLOCK_U whole units (ONE_TILE) or one unit in chunks. Roles: 0 weight,
    1..N_STATE optimizer state scaled by the factor to the powers POW1..POW3."""
    row, u0, O, B, GS, U, counter = _program_units(tab, prog, NF, BLOCK_U)
    e = tl.arange(0, BLOCK).to(tl.int64)
    if ONE_TILE:
        live, mask, a, o, b = _unit_tile(u0, O, B, GS, U, e, BLOCK_U)
        w_p = role_ptrs(row, 0, DT, a, o, b)
        w = tl.load(w_p, mask=mask, other=0.0).to(tl.float32)
        renorm, scale = _renorm_scale(tl.sum(w * w, axis=1), max_norm)
        renorm = renorm & live
        mask = mask & renorm[:, None]            # only renormalised units are read again and written
        scale = scale[:, None]
        tl.store(w_p, (w * scale).to(DT), mask=mask)
        if N_STATE >= 1:
            _rescale(row, 1, POW1, a, o, b, mask, scale, DT)
        if N_STATE >= 2:
            _rescale(row, 2, POW2, a, o, b, mask, scale, DT)
        if N_STATE >= 3:
            _rescale(row, 3, POW3, a, o, b, mask, scale, DT)
        tl.atomic_add(counter, tl.sum(renorm.to(tl.int64), axis=0))
    else:
        renorm, scale = _renorm_scale(_chunked_norm_sq(row, 0, u0, B, GS, U, e, DT, BLOCK), max_norm)
        if renorm:
            for start in range(0, U, BLOCK):
                idx = start + e
                mask = idx < U
                a, o, b = _unit_elements(idx, u0, GS, B)
                _rescale(row, 0, 1, a, o, b, mask, scale, DT)
                if N_STATE >= 1:
                    _rescale(row, 1, POW1, a, o, b, mask, scale, DT)
                if N_STATE >= 2:
                    _rescale(row, 2, POW2, a, o, b, mask, scale, DT)
                if N_STATE >= 3:
                    _rescale(row, 3, POW3, a, o, b, mask, scale, DT)
            tl.atomic_add(counter, 1)


# ---- launchers ----------------------------------------------------------------------------------
def unit_rows(shape: Sequence[int], unit: str, dim: int, group_size: int | None) -> int:
    """GS, the rows per unit along `dim`, checked like geometries.psi._unit_view."""
    if unit not in UNITS:
        raise ValueError(f"unknown PSI unit {unit!r}; expected row, group or tensor")
    if len(shape) == 0:
        return 1
    rows = shape[dim]
    if unit == "row":
        return 1
    if unit == "group":
        if not group_size or rows % group_size:
            raise ValueError(f"group unit needs group_size dividing {rows}, got {group_size}")
        return group_size
    return max(rows, 1)                      # tensor: one unit of all rows (none when rows == 0)


def _operands(weights, layouts, extra, counters, first=None, grads=None):
    ops = []
    for i, (w, (unit, dim, gs)) in enumerate(zip(weights, layouts)):
        dim = dim if unit != "tensor" else 0
        tensors = ([grads[i]] if grads is not None else []) + [w] + list(extra[i])
        if any(t.shape != w.shape for t in tensors):
            raise ValueError(f"tensor {i}: shapes differ: {[tuple(t.shape) for t in tensors]}")
        ops.append(Operand(tensors, dim, unit_rows(w.shape, unit, dim, gs),
                           int(bool(first[i])) if first is not None else 0, counters[i]))
    return ops, tl_dtype(bucket_dtype(ops))


def _blocks(ops, block: int | None, block_u: int | None) -> tuple[bool, int, int]:
    """(ONE_TILE, BLOCK_U, BLOCK): whole units of up to 4096 elements, several per program (a tile
    of at most 4096 elements), else one unit per program in chunks of 2048."""
    max_unit = max(op.shape[0] * op.gs * op.shape[2] for op in ops)
    max_units = max(op.shape[1] // op.gs for op in ops)
    if block is None:
        block = max(16, next_power_of_2(max_unit)) if max_unit <= 4096 else 2048
    one_tile = max_unit <= block
    if not one_tile:
        return False, 1, block
    if block_u is None:
        block_u = max(1, min(next_power_of_2(max_units), 4096 // block))
    return True, block_u, block


def _counters(counters, weights, needed: bool):
    """The caller's counters, or scratch ones when the kernel counts but nobody asked."""
    if counters is not None:
        return list(counters)
    if not needed:
        return [None] * len(weights)
    return list(torch.zeros(len(weights), dtype=torch.int64, device=weights[0].device).unbind())


def psi(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], layouts: Sequence[tuple], *,
        update=None, states: Sequence[Sequence[torch.Tensor]] | None = None, first: Sequence[bool] | None = None,
        max_norm: float = float("inf"), counters: Sequence[torch.Tensor] | None = None,
        cache: TableCache | None = None, slot: Hashable = None, block: int | None = None,
        block_u: int | None = None) -> None:
    """PSI on a bucket in one launch. layouts[i] = (unit, dim, group_size) as ``psi_grad``.

    update None: ``grads[i] <- psi_grad(weights[i], grads[i])`` in place. update ``SGDUpdate`` /
    ``AdamUpdate``: weights and states updated in place, then units whose norm exceeds ``max_norm``
    renormalised (``counters[i]``, an int64 0-d tensor, counts them); grads are only read."""
    if not weights:
        return
    scalars, flags = kernel_args(update)
    fused = flags["UPDATE"] != NONE
    n_state = flags["N_STATE"]
    extra = [list(states[i])[:n_state] if fused else [] for i in range(len(weights))] if states is not None \
        else [[] for _ in weights]
    if fused and any(len(x) < n_state for x in extra):
        raise ValueError(f"the update needs {n_state} state tensor(s) per weight")
    ops, dt = _operands(weights, layouts, extra, _counters(counters, weights, fused), first, grads)
    n_roles = 2 + (n_state if fused else 0)
    one_tile, bu, blk = _blocks(ops, block, block_u)
    staged = Staged(ops, written_roles=range(1, n_roles) if fused else (0,))
    kept, table, pmap, n = prepare(staged.operands, lambda op: triton.cdiv(op.shape[1] // op.gs, bu), n_roles,
                                   cache, (slot, "psi", n_roles, bu))
    if n:
        with device_guard(table.device):
            _psi_kernel[(n,)](table, pmap, float(max_norm), **scalars, NF=table.shape[1], DT=dt, **flags,
                              ONE_TILE=one_tile, BLOCK_U=bu, BLOCK=blk)
    staged.finish()


def psi_renorm(weights: Sequence[torch.Tensor], layouts: Sequence[tuple], max_norm: float, *,
               states: Sequence[Sequence[torch.Tensor]] | None = None, powers: Sequence[int] = (),
               counters: Sequence[torch.Tensor] | None = None, cache: TableCache | None = None,
               slot: Hashable = None, block: int | None = None, block_u: int | None = None) -> None:
    """Renormalise every unit whose norm exceeds ``max_norm`` to norm 1, scaling ``states[i][k]`` by
    the factor to the power ``powers[k]`` (1 or 2), in one launch."""
    if not weights:
        return
    if len(powers) > 3 or any(p not in (1, 2) for p in powers):
        raise ValueError(f"powers must be up to three values of 1 or 2, got {tuple(powers)}")
    extra = [list(s) for s in states] if states is not None else [[] for _ in weights]
    if any(len(x) != len(powers) for x in extra):
        raise ValueError("every weight needs one state tensor per power")
    ops, dt = _operands(weights, layouts, extra, _counters(counters, weights, True))
    n_roles = 1 + len(powers)
    one_tile, bu, blk = _blocks(ops, block, block_u)
    staged = Staged(ops, written_roles=range(n_roles))
    kept, table, pmap, n = prepare(staged.operands, lambda op: triton.cdiv(op.shape[1] // op.gs, bu), n_roles,
                                   cache, (slot, "psi_renorm", n_roles, bu))
    if n:
        pw = list(powers) + [1] * (3 - len(powers))
        with device_guard(table.device):
            _psi_renorm_kernel[(n,)](table, pmap, float(max_norm), NF=table.shape[1], DT=dt, N_STATE=len(powers),
                                     POW1=pw[0], POW2=pw[1], POW3=pw[2], ONE_TILE=one_tile, BLOCK_U=bu, BLOCK=blk)
    staged.finish()


# ---- the fast path the geometry declares ------------------------------------------------------
class PSIKernels:
    """The Triton fast path of geometries/psi.py (protocol: runtime/triton_backend.KernelFamily)."""

    name = "psi"
    retracts = True          # renormalisation after the step

    @staticmethod
    def _layouts(geometry, entries):
        from geomcompile.geometries.psi import psi_layout
        return [psi_layout(e.facts) for e in entries]

    def transform(self, geometry, entries, cache, slot) -> None:
        psi([e.param.detach() for e in entries], [e.grad for e in entries],
            self._layouts(geometry, entries), cache=cache, slot=slot)

    def fused(self, geometry, entries, update, cache, slot, retract: bool = True) -> None:
        # Without retract the kernel renormalises nothing (max_norm = inf); psi's eager post_step does it.
        psi([e.param.detach() for e in entries], [e.grad for e in entries],
            self._layouts(geometry, entries), update=update,
            states=[e.extra["states"] for e in entries], first=[e.extra["first"] for e in entries],
            max_norm=geometry.opts["max_norm"] if retract else float("inf"),
            counters=[e.extra["counter"] for e in entries] if retract else None,
            cache=cache, slot=slot)

    def retract(self, geometry, entries, powers, cache, slot) -> None:
        psi_renorm([e.param.detach() for e in entries], self._layouts(geometry, entries),
                   geometry.opts["max_norm"], states=[e.extra["states"] for e in entries],
                   powers=powers, counters=[e.extra["counter"] for e in entries], cache=cache, slot=slot)

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

import sys
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch
import triton
import triton.language as tl

from geomcompile.runtime.triton_backend import KernelFamily

from .optim_updates import NONE, base_update, kernel_args, tl_dtype
from .tables import (Operand, Staged, TableCache, bucket_dtype, launch_all, launches, load_states, never_skipped, recorder,
                     role_ptrs, store_states, vector_width, warps_for)

UNITS = ("row", "group", "tensor")
_TINY = tl.constexpr(1.1754943508222875e-38)   # torch.finfo(torch.float32).tiny, as psi_renorm_factors


@triton.jit
def _unit_elements(idx, u, GS, B):
    """Element idx of unit u (rows u·GS .. u·GS+GS−1) -> its (a, o, b) indices (strided path; int32)."""
    per_a = GS * B
    a = idx // per_a
    rest = idx - a * per_a
    oo = rest // B
    return a, u * GS + oo, rest - oo * B


@triton.jit
def _renorm_scale(sum_sq, max_norm):
    norm = tl.sqrt(sum_sq)
    renorm = (norm > max_norm) & (norm <= 3.4028234663852886e38)   # a NaN/Inf norm: unit left as it is
    return renorm, tl.where(renorm, 1.0 / tl.maximum(norm, _TINY), 1.0)


@triton.jit
def _rescale(p, POWER: tl.constexpr, mask, scale, DT: tl.constexpr):
    """x <- x·scale^POWER at pointers p."""
    x = tl.load(p, mask=mask, other=0.0).to(tl.float32)
    if POWER == 2:
        x = x * (scale * scale)
    else:
        x = x * scale
    tl.store(p, x.to(DT), mask=mask)


@triton.jit
def _program_units(tab, prog, NF: tl.constexpr, BLOCK_U: tl.constexpr, DENSE: tl.constexpr, VEC: tl.constexpr):
    """This program's table row and units: (row, u0, units, B, GS, U elements per unit, start,
    counter). start = u0·U, the int64 offset of unit u0 in a dense tensor's memory."""
    pid = tl.program_id(0)
    t = tl.load(prog + 2 * pid)
    u0 = tl.load(prog + 2 * pid + 1) * BLOCK_U
    row = tab + t.to(tl.int64) * NF
    A = tl.load(row).to(tl.int32)
    O = tl.load(row + 1).to(tl.int32)
    B = tl.load(row + 2).to(tl.int32)
    GS = tl.load(row + 3).to(tl.int32)
    U = A * GS * B
    if DENSE:
        U = tl.multiple_of(U, VEC)           # units start on 16-byte boundaries (checked by the launcher)
    counter = tl.load(row + 5).to(tl.pointer_type(tl.int64))
    return row, u0, O // GS, B, GS, U, u0.to(tl.int64) * U, counter


@triton.jit
def _unit_tile(u0, n_units, B, GS, U, e, BLOCK_U: tl.constexpr):
    """BLOCK_U whole units from u0 in one tile: (live units, element mask, offsets from unit u0 in a
    dense tensor, index grids a, o, b of the strided path)."""
    i = tl.arange(0, BLOCK_U)
    live = u0 + i < n_units
    mask = live[:, None] & (e[None, :] < U)
    offs = i[:, None] * U + e[None, :]
    a, o, b = _unit_elements(e[None, :], (u0 + i)[:, None], GS, B)
    return live, mask, offs, a, o, b


@triton.jit
def _chunked_norm_sq(row, ROLE: tl.constexpr, u0, B, GS, U, start, e, DT: tl.constexpr, BLOCK: tl.constexpr,
                     DENSE: tl.constexpr):
    """‖x_u‖² of one unit that does not fit a tile, read in chunks of BLOCK elements."""
    acc = tl.zeros([BLOCK], tl.float32)
    for c in range(0, U, BLOCK):
        idx = c + e
        a, o, b = _unit_elements(idx, u0, GS, B)
        x = tl.load(role_ptrs(row, ROLE, DT, start, idx, a, o, b, DENSE), mask=idx < U, other=0.0).to(tl.float32)
        acc += x * x
    return tl.sum(acc, axis=0)


@triton.jit
def _psi_kernel(tab, prog, max_norm,
                lr, momentum, one_minus_dampening, weight_decay, lerp_w, beta2, one_minus_beta2, eps,
                neg_step_size, bc2_sqrt, decay,
                NF: tl.constexpr, DT: tl.constexpr, UPDATE: tl.constexpr, N_STATE: tl.constexpr,
                MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr,
                HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                DENSE: tl.constexpr, VEC: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_U: tl.constexpr,
                BLOCK: tl.constexpr):
    """One program: BLOCK_U whole units (ONE_TILE) or one unit in chunks. Roles: 0 grad, 1 weight,
    2 and 3 optimizer state. DENSE: units are contiguous blocks of memory (no index division)."""
    row, u0, n_units, B, GS, U, start, counter = _program_units(tab, prog, NF, BLOCK_U, DENSE, VEC)
    first = tl.load(row + 4) != 0
    e = tl.arange(0, BLOCK)
    if ONE_TILE:
        live, mask, offs, a, o, b = _unit_tile(u0, n_units, B, GS, U, e, BLOCK_U)
        w_p = role_ptrs(row, 1, DT, start, offs, a, o, b, DENSE)
        g_p = role_ptrs(row, 0, DT, start, offs, a, o, b, DENSE)
        w = tl.load(w_p, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_p, mask=mask, other=0.0).to(tl.float32) * tl.sum(w * w, axis=1)[:, None]
        if UPDATE == 0:
            tl.store(g_p, g.to(DT), mask=mask)
        else:
            s1, s2, s1_p, s2_p = load_states(row, start, offs, a, o, b, mask, w, w_p, DT, N_STATE, DENSE)
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
        norm_sq = _chunked_norm_sq(row, 1, u0, B, GS, U, start, e, DT, BLOCK, DENSE)
        acc = tl.zeros([BLOCK], tl.float32)
        for c in range(0, U, BLOCK):
            idx = c + e
            mask = idx < U
            a, o, b = _unit_elements(idx, u0, GS, B)
            g_p = role_ptrs(row, 0, DT, start, idx, a, o, b, DENSE)
            g = tl.load(g_p, mask=mask, other=0.0).to(tl.float32) * norm_sq
            if UPDATE == 0:
                tl.store(g_p, g.to(DT), mask=mask)
            else:
                w_p = role_ptrs(row, 1, DT, start, idx, a, o, b, DENSE)
                w = tl.load(w_p, mask=mask, other=0.0).to(tl.float32)
                s1, s2, s1_p, s2_p = load_states(row, start, idx, a, o, b, mask, w, w_p, DT, N_STATE, DENSE)
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
                for c in range(0, U, BLOCK):
                    idx = c + e
                    mask = idx < U
                    a, o, b = _unit_elements(idx, u0, GS, B)
                    _rescale(role_ptrs(row, 1, DT, start, idx, a, o, b, DENSE), 1, mask, scale, DT)
                    if N_STATE >= 1:
                        _rescale(role_ptrs(row, 2, DT, start, idx, a, o, b, DENSE), 1, mask, scale, DT)
                    if N_STATE >= 2:
                        _rescale(role_ptrs(row, 3, DT, start, idx, a, o, b, DENSE), 2, mask, scale, DT)
                tl.atomic_add(counter, 1)


@triton.jit
def _psi_renorm_kernel(tab, prog, max_norm, skip, NF: tl.constexpr, DT: tl.constexpr, N_STATE: tl.constexpr,
                       POW1: tl.constexpr, POW2: tl.constexpr, POW3: tl.constexpr,
                       DENSE: tl.constexpr, VEC: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_U: tl.constexpr,
                       BLOCK: tl.constexpr):
    """One program: BLOCK_U whole units (ONE_TILE) or one unit in chunks. Roles: 0 weight,
    1..N_STATE optimizer state scaled by the factor to the powers POW1..POW3. ``skip``: an int32 on the
    device; not 0 (GradScaler skipped the step, StepContext.skip): nothing is renormalised or counted."""
    row, u0, n_units, B, GS, U, start, counter = _program_units(tab, prog, NF, BLOCK_U, DENSE, VEC)
    go = tl.load(skip) == 0
    e = tl.arange(0, BLOCK)
    if ONE_TILE:
        live, mask, offs, a, o, b = _unit_tile(u0, n_units, B, GS, U, e, BLOCK_U)
        w_p = role_ptrs(row, 0, DT, start, offs, a, o, b, DENSE)
        w = tl.load(w_p, mask=mask, other=0.0).to(tl.float32)
        renorm, scale = _renorm_scale(tl.sum(w * w, axis=1), max_norm)
        renorm = tl.where(go, renorm & live, False)      # (block & scalar bool: a bad mask dtype in the interpreter)
        mask = mask & renorm[:, None]            # only renormalised units are read again and written
        scale = scale[:, None]
        tl.store(w_p, (w * scale).to(DT), mask=mask)
        if N_STATE >= 1:
            _rescale(role_ptrs(row, 1, DT, start, offs, a, o, b, DENSE), POW1, mask, scale, DT)
        if N_STATE >= 2:
            _rescale(role_ptrs(row, 2, DT, start, offs, a, o, b, DENSE), POW2, mask, scale, DT)
        if N_STATE >= 3:
            _rescale(role_ptrs(row, 3, DT, start, offs, a, o, b, DENSE), POW3, mask, scale, DT)
        tl.atomic_add(counter, tl.sum(renorm.to(tl.int64), axis=0))
    else:
        renorm, scale = _renorm_scale(_chunked_norm_sq(row, 0, u0, B, GS, U, start, e, DT, BLOCK, DENSE), max_norm)
        if renorm & go:
            for c in range(0, U, BLOCK):
                idx = c + e
                mask = idx < U
                a, o, b = _unit_elements(idx, u0, GS, B)
                _rescale(role_ptrs(row, 0, DT, start, idx, a, o, b, DENSE), 1, mask, scale, DT)
                if N_STATE >= 1:
                    _rescale(role_ptrs(row, 1, DT, start, idx, a, o, b, DENSE), POW1, mask, scale, DT)
                if N_STATE >= 2:
                    _rescale(role_ptrs(row, 2, DT, start, idx, a, o, b, DENSE), POW2, mask, scale, DT)
                if N_STATE >= 3:
                    _rescale(role_ptrs(row, 3, DT, start, idx, a, o, b, DENSE), POW3, mask, scale, DT)
            tl.atomic_add(counter, 1)


# ---- schedule: size classes ---------------------------------------------------------------------
# A tensor's class depends on its own unit size U and layout only. Units of up to the largest
# class are whole in one tile (BLOCK the next class size, BLOCK_U units per program so that a tile
# holds TILE elements, STRIDED_TILE on the strided path); larger units get one program each, in
# chunks of TILE (STRIDED_TILE) elements. Warps: ``tables.warps_for`` (two 128-bit vectors per
# thread and array on the aligned path, one for the smallest class). kernels/report.py checks every class: <= 128 registers,
# no spills.
UNIT_CLASSES = (32, 128, 512, 2048)
TILE = 2048
STRIDED_TILE = 1024


@dataclass(frozen=True)
class Schedule:
    dense: bool
    one_tile: bool
    block_u: int
    block: int
    num_warps: int

    @property
    def words(self) -> str:
        return (f"{'aligned' if self.dense else 'strided'}, "
                f"{f'units<={self.block} x{self.block_u}' if self.one_tile else f'one unit in chunks of {self.block}'}")


def schedule_of(unit: int, dense: bool, vec: int, block: int | None = None, block_u: int | None = None) -> Schedule:
    """The size class of a tensor whose units have `unit` elements (block sizes forced by tests only)."""
    tile = TILE if dense else STRIDED_TILE
    if block is None:
        block = next((c for c in UNIT_CLASSES if unit <= c), tile)
    one_tile = unit <= block
    if block_u is None or not one_tile:
        block_u = max(1, tile // block) if one_tile else 1
    # units <= 32: one 128-bit vector per thread and array (with two, ptxas spills 4 bytes in the
    # bf16 SGD-momentum configuration, 40 registers; kernels/report.py)
    # whole units of the largest class, 16-bit dtypes: one vector too (with two, the bf16 AdamW
    # configuration spilled 4 bytes once the renormalisation skipped non-finite norms)
    vectors = 1 if one_tile and (block <= UNIT_CLASSES[0] or (block >= UNIT_CLASSES[-1] and vec > 4)) else 2
    return Schedule(dense, one_tile, block_u, block, warps_for(block_u * block, dense, vec, vectors))


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
    return ops, bucket_dtype(ops)


def _counters(counters, weights, needed: bool):
    """The caller's counters, or scratch ones when the kernel counts but nobody asked."""
    if counters is not None:
        return list(counters)
    if not needed:
        return [None] * len(weights)
    return list(torch.zeros(len(weights), dtype=torch.int64, device=weights[0].device).unbind())


def _launches(staged, n_roles, cache, slot, family, block, block_u, vec):
    for op in staged.operands:
        op.set_layout()

    def schedule(op):
        a, o, b = op.shape
        return schedule_of(a * op.gs * b, op.dense, vec, block, block_u)

    def programs(op, s):
        return triton.cdiv(op.shape[1] // op.gs, s.block_u)

    return launches(staged.operands, schedule, programs, n_roles, cache, (slot, family, n_roles))


def psi(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], layouts: Sequence[tuple], *,
        update=None, states: Sequence[Sequence[torch.Tensor]] | None = None, first: Sequence[bool] | None = None,
        max_norm: float = float("inf"), counters: Sequence[torch.Tensor] | None = None,
        cache: TableCache | None = None, slot: Hashable = None, block: int | None = None,
        block_u: int | None = None, record: list | None = None) -> None:
    """PSI on a bucket, one launch per size class. layouts[i] = (unit, dim, group_size) as ``psi_grad``.

    update None: ``grads[i] <- psi_grad(weights[i], grads[i])`` in place. update ``SGDUpdate`` /
    ``AdamUpdate``: weights and states updated in place, then units whose norm exceeds ``max_norm``
    renormalised (``counters[i]``, an int64 0-d tensor, counts them); grads are only read.
    record: a list that gets each launch (``tables.Launch``), or None when a staged copy makes
    the launches unrepeatable."""
    if not weights:
        return
    scalars, flags = kernel_args(update)
    fused = flags["UPDATE"] != NONE
    n_state = flags["N_STATE"]
    extra = [list(states[i])[:n_state] if fused else [] for i in range(len(weights))] if states is not None \
        else [[] for _ in weights]
    if fused and any(len(x) < n_state for x in extra):
        raise ValueError(f"the update needs {n_state} state tensor(s) per weight")
    ops, dtype = _operands(weights, layouts, extra, _counters(counters, weights, fused), first, grads)
    n_roles = 2 + (n_state if fused else 0)
    staged = Staged(ops, written_roles=range(1, n_roles) if fused else (0,))

    def constexprs(s, table):
        return dict(NF=table.shape[1], DT=tl_dtype(dtype), **flags, DENSE=s.dense, VEC=vector_width(dtype),
                    ONE_TILE=s.one_tile, BLOCK_U=s.block_u, BLOCK=s.block, num_warps=s.num_warps)
    classes = _launches(staged, n_roles, cache, slot, "psi", block, block_u, vector_width(dtype))
    launch_all(sys.modules[__name__], "_psi_kernel", classes, (float(max_norm),), scalars, constexprs,
               staged.operands, 0, cache, recorder(record, staged))
    staged.finish()



def psi_renorm(weights: Sequence[torch.Tensor], layouts: Sequence[tuple], max_norm: float, *,
               states: Sequence[Sequence[torch.Tensor]] | None = None, powers: Sequence[int] = (),
               counters: Sequence[torch.Tensor] | None = None, cache: TableCache | None = None,
               slot: Hashable = None, block: int | None = None, block_u: int | None = None,
               record: list | None = None, skip: torch.Tensor | None = None) -> None:
    """Renormalise every unit whose norm exceeds ``max_norm`` to norm 1, scaling ``states[i][k]`` by
    the factor to the power ``powers[k]`` (1 or 2), one launch per size class (recorded as ``psi``).
    ``skip``: a 0-d int32 tensor on the weights' device (kept alive and at its address while launches
    recorded with it are replayed); where not 0, nothing is renormalised or counted."""
    if not weights:
        return
    if len(powers) > 3 or any(p not in (1, 2) for p in powers):
        raise ValueError(f"powers must be up to three values of 1 or 2, got {tuple(powers)}")
    extra = [list(s) for s in states] if states is not None else [[] for _ in weights]
    if any(len(x) != len(powers) for x in extra):
        raise ValueError("every weight needs one state tensor per power")
    ops, dtype = _operands(weights, layouts, extra, _counters(counters, weights, True))
    n_roles = 1 + len(powers)
    staged = Staged(ops, written_roles=range(n_roles))
    pw = list(powers) + [1] * (3 - len(powers))

    def constexprs(s, table):
        return dict(NF=table.shape[1], DT=tl_dtype(dtype), N_STATE=len(powers), POW1=pw[0], POW2=pw[1],
                    POW3=pw[2], DENSE=s.dense, VEC=vector_width(dtype), ONE_TILE=s.one_tile,
                    BLOCK_U=s.block_u, BLOCK=s.block, num_warps=s.num_warps)
    classes = _launches(staged, n_roles, cache, slot, "psi_renorm", block, block_u, vector_width(dtype))
    flag = never_skipped(weights[0].device) if skip is None else skip
    launch_all(sys.modules[__name__], "_psi_renorm_kernel", classes, (float(max_norm), flag), {}, constexprs,
               staged.operands, None, cache, recorder(record, staged))
    staged.finish()


def configurations():
    """Every (schedule, update kind, dtype) the launchers can pick, for kernels/report.py."""
    from .report import KernelConfig, update_kinds
    types = {"tab": "*i64", "prog": "*i32", "skip": "*i32"}
    out = []
    for dense in (True, False):
        for unit in (*UNIT_CLASSES, UNIT_CLASSES[-1] + 1):
            for dtype in (torch.float32, torch.bfloat16):
                s = schedule_of(unit, dense, vector_width(dtype))
                common = dict(DT=tl_dtype(dtype), DENSE=s.dense, VEC=vector_width(dtype), ONE_TILE=s.one_tile,
                              BLOCK_U=s.block_u, BLOCK=s.block)
                for kind, flags in update_kinds().items():
                    n_roles = 2 + (flags["N_STATE"] if flags["UPDATE"] != NONE else 0)
                    out.append(KernelConfig("psi", _psi_kernel, dict(NF=6 + 4 * n_roles, **flags, **common),
                                            s.num_warps, s.words, types, weight=n_roles))
                for n_state in range(4):
                    out.append(KernelConfig("psi", _psi_renorm_kernel,
                                            dict(NF=10 + 4 * n_state, N_STATE=n_state, POW1=1, POW2=2, POW3=1,
                                                 **common), s.num_warps, s.words, types, weight=1 + n_state))
    return out


# ---- the fast path the geometry declares ------------------------------------------------------
class PSIKernels(KernelFamily):
    """The Triton fast path of geometries/psi.py (protocol: runtime/triton_backend.KernelFamily)."""

    name = "psi"
    retracts = True          # renormalisation after the step
    counter_key = "renormalised"     # units renormalised, counted by the kernels
    takes_skip = True        # the renormalisation kernel reads StepContext.skip on the device

    @staticmethod
    def _layouts(geometry, entries):
        from geomcompile.geometries.psi import psi_layout
        return [psi_layout(e.facts) for e in entries]

    def transform(self, geometry, entries, cache, slot, record=None) -> None:
        psi([e.param.detach() for e in entries], [e.grad for e in entries],
            self._layouts(geometry, entries), cache=cache, slot=slot, record=record)

    def fused(self, geometry, entries, update, cache, slot, retract: bool = True, record=None) -> None:
        # Without retract the kernel renormalises nothing (max_norm = inf); psi's eager post_step does it.
        psi([e.param.detach() for e in entries], [e.grad for e in entries],
            self._layouts(geometry, entries), update=update,
            states=[e.extra["states"] for e in entries], first=[e.extra["first"] for e in entries],
            max_norm=geometry.opts["max_norm"] if retract else float("inf"),
            counters=[e.extra["counter"] for e in entries],      # the units' own: the cached table stays valid
            cache=cache, slot=slot, record=record)

    def retract(self, geometry, entries, powers, cache, slot, record=None) -> None:
        psi_renorm([e.param.detach() for e in entries], self._layouts(geometry, entries),
                   geometry.opts["max_norm"], states=[e.extra["states"] for e in entries],
                   powers=powers, counters=[e.extra["counter"] for e in entries], cache=cache, slot=slot,
                   record=record, skip=entries[0].extra.get("skip"))

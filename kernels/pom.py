"""pom (``geometries/pom.py``, FG-SGD on products of spheres / oblique manifolds) as multi-tensor Triton
kernels: the direction ``pom_direction`` writes into the gradient, the retraction ``pom_retract``, and
the state ``POM.pre_step`` records, all on the device (no host sync).

A weight is read as a grid of *components* (kernels W[o, i] or filters w[o]), each an n×k matrix
(``component_grid``); every role (gradient, weight) keeps its own strides over (G1, G2, n, k), so
channels_last weights are read in place. Components are grouped by ``pom_membership``; the launcher
turns the group ids into a CSR list (members sorted by group, group starts) once per membership.

``_pom_kernel``, one program per group (or BLOCK_M single-component groups):

    tangent = g − ⟨g, w⟩·w/r²          per component (sphere) or per column (oblique)
    R_g = (Σ_{ι∈g} ‖tangent_ι‖²)^{1/2}, ζ_g = max(1, R_g(2 + R_g)), grad <- tangent/ζ_g

non-finite gradient entries read as 0 and pass through unchanged, non-finite weight entries read
as 0 (as ``pass_nonfinite`` / ``finite_entries`` in ``POM.pre_step``). A program owns whole groups,
so R_g needs no cross-program reduction, for every grouping (PI, PO, PIO, none): members of a
group may lie anywhere in the tensor. Per group it writes R_g and a "had a non-finite entry" flag
into scratch arrays; ``_pom_stats_kernel`` (one program per tensor) then writes the state:
``last_max_group_norm`` = max R_g, ``normalised_groups`` = #{ζ_g > 1}, ``nonfinite_steps`` += 1 when
any group had a non-finite entry.

Schedules: ONE_TILE (the group's members and the component fit one (BLOCK_M, BLOCK_N, BLOCK_K) tile:
every tensor read once, the gradient written once), SINGLE (every group is one component: BLOCK_M
groups per program, one tile), or loops (a large group or a large component: the members in chunks
of BLOCK_M, the rows in chunks of BLOCK_N; ⟨g, w⟩, ‖tangent‖² and the write are three passes, so
w and g are read four times, from cache for small components).

``_pom_retract_kernel``: φ(x) = r·x/‖x‖ per component (sphere) or per column (oblique); a zero
component / column -> r·ones/√count; a component with a non-finite entry is left as it is
(``pom_retract``). It rescales no optimizer state: ``POM.post_step`` does not either.

Fused (UPDATE SGD / Adam, ``optim_updates.base_update``): the direction, rounded to the parameter
dtype as eager's base step reads it, steps weight and state; the new weight is retracted in the
same tile (WHOLE: a component fits one row chunk) or by a third pass over what the second stored.

Bytes per element (e = element size, k state tensors): transform ONE_TILE / SINGLE 3e (g, w read;
g written), fused (3 + 2k)e; loops up to 9e / (10 + 2k)e (mostly cache hits); retraction 2e. The
tiles pad n and k to powers of two (a 3×3 kernel uses 16 lanes): SINGLE and small-kernel schedules
waste up to ~45% of the lanes.

Stiefel components (QR / Newton) and ``feature_std`` (a radius that is a device tensor changing every
step) have no kernel: ``POMKernels.for_geometry`` hands those configurations to ``POMTorchSteps``,
which runs the compile backend's batched programs (``geometries/pom.py: CompiledPOM``) uncompiled,
as torch ops over the whole bucket, replayed by the step plan like a launch.
"""
from __future__ import annotations

import math
import struct
import sys
import weakref
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch
import triton
import triton.language as tl

from geomcompile.runtime.compile_backend import _state_inputs
from geomcompile.runtime.triton_backend import KernelFamily

from .optim_updates import NONE, base_update, kernel_args, tl_dtype
from .tables import Launch, TableCache, TorchStep, dense_rows, device_guard, never_skipped, next_power_of_2

_TINY = tl.constexpr(1.1754943508222875e-38)      # torch.finfo(torch.float32).tiny, as retract_sphere
_FP16_MAX = tl.constexpr(65504.0)

# transform table, one int64 row per tensor: the grad role's address sits at column 6 like every
# other kernel table's role 0 (tables.FIXED), so Launch.patch_grads patches it.
T_G2, T_N, T_K, T_GROUPS, T_MEMBERS, T_STARTS = range(6)
T_GRAD, T_WEIGHT = 6, 10                           # address, stride of G1, of G2, of n
T_GRAD_SK, T_WEIGHT_SK, T_R, T_BAD, T_R2 = 14, 15, 16, 17, 18
T_FLAG, T_RADIUS, T_FIXED = 19, 20, 21             # momentum buffer is new; base_radius; 1/√count (fused)
T_STATE1, T_STATE2 = 22, 27                        # address, strides of G1, G2, n, k (fused update)
T_NF = 32
# retraction table: G2, n, k, components, 1/√count (of a zero component or column), the skip flag's
# address (an int32; not 0: a step skipped on the device, nothing is written), weight address, strides
# G1, G2, n, k, radius
R_NF = 12
# statistics table: groups, R, bad, last_max_group_norm, normalised_groups, nonfinite_steps, the skip
# flag's address (as the retraction's)
S_NF = 7


# ---- device side --------------------------------------------------------------------------------
@triton.jit
def _finite(x):
    return tl.abs(x) <= 3.4028234663852886e38


@triton.jit
def _role_base(row, ADDR: tl.constexpr, DT: tl.constexpr, comp, G2):
    """(pointer to element (0, 0) of each component in `comp`, shaped (BLOCK_M, 1, 1), n stride)."""
    ptr = tl.load(row + ADDR).to(tl.pointer_type(DT))
    c1 = comp // G2                        # int32: the kernels take fewer than 2^31 elements
    c2 = comp - c1 * G2
    off = c1.to(tl.int64) * tl.load(row + ADDR + 1) + c2.to(tl.int64) * tl.load(row + ADDR + 2)
    return ptr + off[:, None, None], tl.load(row + ADDR + 3)


@triton.jit
def _load_pair(g_base, w_base, gsn, gsk, wsn, wsk, rr, kk, mask):
    """(raw g, g with non-finite entries as 0, w likewise, non-finite flag per element) in fp32."""
    graw = tl.load(g_base + rr * gsn + kk * gsk, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_base + rr * wsn + kk * wsk, mask=mask, other=0.0).to(tl.float32)
    g_ok = _finite(graw)
    w_ok = _finite(w)
    return graw, tl.where(g_ok, graw, 0.0), tl.where(w_ok, w, 0.0), (~g_ok) | (~w_ok)


@triton.jit
def _dots(gf, wf, OBLIQUE: tl.constexpr):
    """⟨g, w⟩ per column (oblique) or per component (sphere), shaped (BLOCK_M, 1, BLOCK_K or 1)."""
    d = tl.sum(gf * wf, axis=1)
    if not OBLIQUE:
        d = tl.sum(d, axis=1)[:, None]
    return d[:, None, :]


@triton.jit
def _zeta(R):
    return tl.maximum(R * (2.0 + R), 1.0)


@triton.jit
def _rescaled(x, norm, fixed, r):
    """x / |x| * r, the component's fixed point 1/sqrt(count) * r where its norm is 0 (as eager)."""
    return tl.where(norm == 0.0, fixed, x / tl.maximum(norm, _TINY)) * r


@triton.jit
def _store_rescaled_chunks(base, wsn, wsk, live, N, K, rows, kk, sq, bad, fixed, r, DT: tl.constexpr,
                           OBLIQUE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rescale components held in chunks of BLOCK_N rows to radius r from their squared norms `sq`
    (per column when OBLIQUE) and store them; a component with a non-finite value (`bad`) is left."""
    if not OBLIQUE:
        sq = tl.sum(sq, axis=1)[:, None]
    norm = tl.sqrt(sq)[:, None, :]
    good = (bad == 0)[:, None, None]
    for n0 in range(0, N, BLOCK_N):
        rr = n0 + rows
        mask = live[:, None, None] & (rr < N) & (kk < K)
        p = base + rr * wsn + kk * wsk
        x = tl.load(p, mask=mask, other=0.0).to(tl.float32)
        tl.store(p, _rescaled(x, norm, fixed, r).to(DT), mask=mask & good)


@triton.jit
def _retract_tile(x, r, fixed, OBLIQUE: tl.constexpr):
    """pom_retract of whole components x (BLOCK_M, BLOCK_N, BLOCK_K; padding 0): r·x/‖x‖ per component
    or column, r·fixed for a zero one; a component with a non-finite entry stays as it is."""
    bad = tl.max(tl.max((~_finite(x)).to(tl.int32), axis=2), axis=1)
    sq = tl.sum(x * x, axis=1)
    if not OBLIQUE:
        sq = tl.sum(sq, axis=1)[:, None]
    norm = tl.sqrt(sq)[:, None, :]
    return tl.where((bad == 0)[:, None, None], _rescaled(x, norm, fixed, r), x)


@triton.jit
def _write(direction, graw, g_p, w_p, s1_p, s2_p, mask, first, r, fixed,
           lr, momentum, one_minus_dampening, weight_decay, lerp_w, beta2, one_minus_beta2, eps,
           neg_step_size, bc2_sqrt, decay,
           DT: tl.constexpr, SATURATE: tl.constexpr, OBLIQUE: tl.constexpr, UPDATE: tl.constexpr,
           N_STATE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr,
           HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, RETRACT: tl.constexpr):
    """The direction as pre_step leaves it in the gradient (fit_dtype: fp16 saturates at ±65504; then
    pass_nonfinite: raw non-finite entries), and either stored there (UPDATE 0) or stepped by the base
    update (weight and state written; RETRACT: the components retracted). Returns the new weight (fp32)."""
    if SATURATE:
        direction = tl.where(_finite(direction), tl.minimum(tl.maximum(direction, -_FP16_MAX), _FP16_MAX),
                             direction)
    direction = tl.where(_finite(graw), direction, graw)
    w = direction
    if UPDATE == 0:
        tl.store(g_p, direction.to(DT), mask=mask)
    else:
        d = direction.to(DT).to(tl.float32)           # the gradient eager's base step reads
        w = tl.load(w_p, mask=mask, other=0.0).to(tl.float32)
        s1 = w
        s2 = w
        if N_STATE >= 1:
            s1 = tl.load(s1_p, mask=mask, other=0.0).to(tl.float32)
        if N_STATE >= 2:
            s2 = tl.load(s2_p, mask=mask, other=0.0).to(tl.float32)
        w, s1, s2 = base_update(d, w, s1, s2, first, lr, momentum, one_minus_dampening, weight_decay, lerp_w,
                                beta2, one_minus_beta2, eps, neg_step_size, bc2_sqrt, decay,
                                UPDATE, MAXIMIZE, HAS_WD, DECOUPLED, HAS_MOMENTUM, NESTEROV)
        if N_STATE >= 1:
            tl.store(s1_p, s1.to(DT), mask=mask)
        if N_STATE >= 2:
            tl.store(s2_p, s2.to(DT), mask=mask)
        w = w.to(DT).to(tl.float32)                    # retract what eager's post_step reads back
        if RETRACT:
            w = _retract_tile(w, r, fixed, OBLIQUE)
        tl.store(w_p, w.to(DT), mask=mask)
    return w


@triton.jit
def _pom_kernel(tab, prog,
                lr, momentum, one_minus_dampening, weight_decay, lerp_w, beta2, one_minus_beta2, eps,
                neg_step_size, bc2_sqrt, decay,
                NF: tl.constexpr, DT: tl.constexpr, OBLIQUE: tl.constexpr, SINGLE: tl.constexpr,
                ONE_TILE: tl.constexpr, WHOLE: tl.constexpr, SATURATE: tl.constexpr,
                UPDATE: tl.constexpr, N_STATE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
                DECOUPLED: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                RETRACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: one group (SINGLE: BLOCK_M single-component groups). Roles: grad, weight, and for a
    fused update (UPDATE != 0) the optimizer state. WHOLE: a component fits one row chunk."""
    pid = tl.program_id(0)
    t = tl.load(prog + 2 * pid)
    j = tl.load(prog + 2 * pid + 1)
    row = tab + t.to(tl.int64) * NF
    G2 = tl.load(row + 0).to(tl.int32)
    N = tl.load(row + 1).to(tl.int32)
    K = tl.load(row + 2).to(tl.int32)
    n_groups = tl.load(row + 3).to(tl.int32)
    members = tl.load(row + 4).to(tl.pointer_type(tl.int32))
    starts = tl.load(row + 5).to(tl.pointer_type(tl.int32))
    gsk = tl.load(row + 14)
    wsk = tl.load(row + 15)
    r_out = tl.load(row + 16).to(tl.pointer_type(tl.float32))
    bad_out = tl.load(row + 17).to(tl.pointer_type(tl.int32))
    r2 = tl.load(row + 18).to(tl.float64, bitcast=True).to(tl.float32)
    first = tl.load(row + 19) != 0
    r = tl.load(row + 20).to(tl.float64, bitcast=True).to(tl.float32)          # base_radius (retraction)
    fixed = tl.load(row + 21).to(tl.float64, bitcast=True).to(tl.float32)
    s1sk = tl.load(row + 26)
    s2sk = tl.load(row + 31)
    m = tl.arange(0, BLOCK_M)
    rows = tl.arange(0, BLOCK_N)[None, :, None]
    kk = tl.arange(0, BLOCK_K)[None, None, :]
    if SINGLE:
        g = j * BLOCK_M + m
        live = g < n_groups
    else:
        start = tl.load(starts + j)
        end = tl.load(starts + j + 1)
        g = start + m
        live = g < end
    if SINGLE or ONE_TILE:
        comp = tl.load(members + g, mask=live, other=0)
        mask = live[:, None, None] & (rows < N) & (kk < K)
        g_base, gsn = _role_base(row, 6, DT, comp, G2)
        w_base, wsn = _role_base(row, 10, DT, comp, G2)
        s1_base, s1sn = w_base, wsn                 # placeholders for absent state, never read
        s2_base, s2sn = w_base, wsn
        if N_STATE >= 1:
            s1_base, s1sn = _role_base(row, 22, DT, comp, G2)
        if N_STATE >= 2:
            s2_base, s2sn = _role_base(row, 27, DT, comp, G2)
        graw, gf, wf, bad = _load_pair(g_base, w_base, gsn, gsk, wsn, wsk, rows, kk, mask)
        tangent = gf - _dots(gf, wf, OBLIQUE) * wf / r2
        sq = tl.sum(tl.sum(tangent * tangent, axis=2), axis=1)
        bad = tl.max(tl.max(bad.to(tl.int32), axis=2), axis=1)
        if SINGLE:
            R = tl.sqrt(sq)
            zeta = _zeta(R)[:, None, None]
            tl.store(r_out + g, R, mask=live)
            tl.store(bad_out + g, bad, mask=live)
        else:
            R = tl.sqrt(tl.sum(sq, axis=0))
            zeta = _zeta(R)
            tl.store(r_out + j, R)
            tl.store(bad_out + j, tl.max(bad, axis=0))
        _write(tangent / zeta, graw, g_base + rows * gsn + kk * gsk, w_base + rows * wsn + kk * wsk,
               s1_base + rows * s1sn + kk * s1sk, s2_base + rows * s2sn + kk * s2sk, mask, first, r, fixed,
               lr, momentum, one_minus_dampening, weight_decay, lerp_w, beta2, one_minus_beta2, eps,
               neg_step_size, bc2_sqrt, decay, DT, SATURATE, OBLIQUE, UPDATE, N_STATE, MAXIMIZE, HAS_WD,
               DECOUPLED, HAS_MOMENTUM, NESTEROV, RETRACT)
    else:
        # pass 1: ‖tangent‖² of every member, ⟨g, w⟩ first (it needs all rows of a column)
        acc = tl.zeros([BLOCK_M], tl.float32)
        any_bad = tl.zeros([BLOCK_M], tl.int32)
        for m0 in range(start, end, BLOCK_M):
            idx = m0 + m
            live = idx < end
            comp = tl.load(members + idx, mask=live, other=0)
            g_base, gsn = _role_base(row, 6, DT, comp, G2)
            w_base, wsn = _role_base(row, 10, DT, comp, G2)
            d = tl.zeros([BLOCK_M, 1, BLOCK_K], tl.float32)
            for n0 in range(0, N, BLOCK_N):
                rr = n0 + rows
                mask = live[:, None, None] & (rr < N) & (kk < K)
                graw, gf, wf, bad = _load_pair(g_base, w_base, gsn, gsk, wsn, wsk, rr, kk, mask)
                d += tl.sum(gf * wf, axis=1)[:, None, :]
                any_bad = tl.maximum(any_bad, tl.max(tl.max(bad.to(tl.int32), axis=2), axis=1))
            if not OBLIQUE:
                d = tl.sum(d, axis=2)[:, :, None]
            for n0 in range(0, N, BLOCK_N):
                rr = n0 + rows
                mask = live[:, None, None] & (rr < N) & (kk < K)
                graw, gf, wf, bad = _load_pair(g_base, w_base, gsn, gsk, wsn, wsk, rr, kk, mask)
                tangent = gf - d * wf / r2
                acc += tl.sum(tl.sum(tangent * tangent, axis=2), axis=1)
        R = tl.sqrt(tl.sum(acc, axis=0))
        zeta = _zeta(R)
        tl.store(r_out + j, R)
        tl.store(bad_out + j, tl.max(any_bad, axis=0))
        # pass 2: the direction (and the update: whole components retracted in the same tile)
        for m0 in range(start, end, BLOCK_M):
            idx = m0 + m
            live = idx < end
            comp = tl.load(members + idx, mask=live, other=0)
            g_base, gsn = _role_base(row, 6, DT, comp, G2)
            w_base, wsn = _role_base(row, 10, DT, comp, G2)
            s1_base, s1sn = w_base, wsn
            s2_base, s2sn = w_base, wsn
            if N_STATE >= 1:
                s1_base, s1sn = _role_base(row, 22, DT, comp, G2)
            if N_STATE >= 2:
                s2_base, s2sn = _role_base(row, 27, DT, comp, G2)
            d = tl.zeros([BLOCK_M, 1, BLOCK_K], tl.float32)
            for n0 in range(0, N, BLOCK_N):
                rr = n0 + rows
                mask = live[:, None, None] & (rr < N) & (kk < K)
                graw, gf, wf, bad = _load_pair(g_base, w_base, gsn, gsk, wsn, wsk, rr, kk, mask)
                d += tl.sum(gf * wf, axis=1)[:, None, :]
            if not OBLIQUE:
                d = tl.sum(d, axis=2)[:, :, None]
            new_sq = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
            new_bad = tl.zeros([BLOCK_M], tl.int32)
            for n0 in range(0, N, BLOCK_N):
                rr = n0 + rows
                mask = live[:, None, None] & (rr < N) & (kk < K)
                graw, gf, wf, bad = _load_pair(g_base, w_base, gsn, gsk, wsn, wsk, rr, kk, mask)
                tangent = gf - d * wf / r2
                w = _write(tangent / zeta, graw, g_base + rr * gsn + kk * gsk, w_base + rr * wsn + kk * wsk,
                           s1_base + rr * s1sn + kk * s1sk, s2_base + rr * s2sn + kk * s2sk, mask, first, r,
                           fixed, lr, momentum, one_minus_dampening, weight_decay, lerp_w, beta2,
                           one_minus_beta2, eps, neg_step_size, bc2_sqrt, decay, DT, SATURATE, OBLIQUE, UPDATE,
                           N_STATE, MAXIMIZE, HAS_WD, DECOUPLED, HAS_MOMENTUM, NESTEROV, RETRACT and WHOLE)
                if UPDATE != 0 and RETRACT and not WHOLE:
                    new_sq += tl.sum(w * w, axis=1)
                    new_bad = tl.maximum(new_bad, tl.max(tl.max((~_finite(w)).to(tl.int32), axis=2), axis=1))
            if UPDATE != 0 and RETRACT and not WHOLE:
                # pass 3: components larger than a chunk, retracted from what pass 2 stored
                tl.debug_barrier()
                _store_rescaled_chunks(w_base, wsn, wsk, live, N, K, rows, kk, new_sq, new_bad, fixed, r, DT,
                                       OBLIQUE, BLOCK_N)


@triton.jit
def _pom_stats_kernel(tab, prog, NF: tl.constexpr, BLOCK: tl.constexpr):
    """One program per tensor: its groups' R and non-finite flags -> the geometry state (left as it is
    at a step skipped on the device)."""
    pid = tl.program_id(0)
    t = tl.load(prog + 2 * pid)
    row = tab + t.to(tl.int64) * NF
    go = tl.load(tl.load(row + 6).to(tl.pointer_type(tl.int32))) == 0
    n_groups = tl.load(row + 0).to(tl.int32)
    r_in = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    bad_in = tl.load(row + 2).to(tl.pointer_type(tl.int32))
    e = tl.arange(0, BLOCK)
    top = tl.zeros([BLOCK], tl.float32)
    count = tl.zeros([BLOCK], tl.int32)
    bad = tl.zeros([BLOCK], tl.int32)
    for g0 in range(0, n_groups, BLOCK):
        mask = g0 + e < n_groups
        R = tl.load(r_in + g0 + e, mask=mask, other=0.0)
        top = tl.maximum(top, R)
        count += (_zeta(R) > 1.0).to(tl.int32)
        bad = tl.maximum(bad, tl.load(bad_in + g0 + e, mask=mask, other=0))
    top_p = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    tl.store(top_p, tl.where(go, tl.max(top, axis=0), tl.load(top_p)))
    count_p = tl.load(row + 4).to(tl.pointer_type(tl.int64))
    tl.store(count_p, tl.where(go, tl.sum(count, axis=0).to(tl.int64), tl.load(count_p)))
    counter = tl.load(row + 5).to(tl.pointer_type(tl.int64))
    tl.store(counter, tl.load(counter) + tl.where(go, (tl.max(bad, axis=0) > 0).to(tl.int64), 0))


@triton.jit
def _pom_retract_kernel(tab, prog, NF: tl.constexpr, DT: tl.constexpr, OBLIQUE: tl.constexpr,
                        ONE_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """One program: BLOCK_M components (ONE_TILE) or one component in row chunks. Role: weight. At a
    step skipped on the device (the flag at row + 5) nothing is read or written."""
    pid = tl.program_id(0)
    t = tl.load(prog + 2 * pid)
    j = tl.load(prog + 2 * pid + 1)
    row = tab + t.to(tl.int64) * NF
    go = tl.load(tl.load(row + 5).to(tl.pointer_type(tl.int32))) == 0
    G2 = tl.load(row + 0).to(tl.int32)
    N = tl.load(row + 1).to(tl.int32)
    K = tl.load(row + 2).to(tl.int32)
    C = tl.load(row + 3).to(tl.int32)
    wsk = tl.load(row + 10)
    r = tl.load(row + 11).to(tl.float64, bitcast=True).to(tl.float32)
    fixed = tl.load(row + 4).to(tl.float64, bitcast=True).to(tl.float32)   # 1/√count, as eager: a double, then fp32
    m = tl.arange(0, BLOCK_M)
    rows = tl.arange(0, BLOCK_N)[None, :, None]
    kk = tl.arange(0, BLOCK_K)[None, None, :]
    comp = j * BLOCK_M + m
    live = tl.where(go, comp < C, False)         # (block & scalar bool: a bad mask dtype in the interpreter)
    base, wsn = _role_base(row, 6, DT, comp, G2)
    if ONE_TILE:
        mask = live[:, None, None] & (rows < N) & (kk < K)
        p = base + rows * wsn + kk * wsk
        x = tl.load(p, mask=mask, other=0.0).to(tl.float32)
        tl.store(p, _retract_tile(x, r, fixed, OBLIQUE).to(DT), mask=mask)   # a non-finite component: itself
    else:
        sq = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        bad = tl.zeros([BLOCK_M], tl.int32)
        for n0 in range(0, N, BLOCK_N):
            rr = n0 + rows
            mask = live[:, None, None] & (rr < N) & (kk < K)
            x = tl.load(base + rr * wsn + kk * wsk, mask=mask, other=0.0).to(tl.float32)
            bad = tl.maximum(bad, tl.max(tl.max((~_finite(x)).to(tl.int32), axis=2), axis=1))
            sq += tl.sum(x * x, axis=1)
        _store_rescaled_chunks(base, wsn, wsk, live, N, K, rows, kk, sq, bad, fixed, r, DT, OBLIQUE, BLOCK_N)


# ---- schedules ---------------------------------------------------------------------------------
# A tile holds at most TILE elements (n and k padded to powers of two). A component of more than
# TILE elements is read in chunks of rows. kernels/report.py checks every schedule: <= 128
# registers, no spills.
TILE = 1024
LOOP_TILE = 512
STATS_BLOCK = 256


@dataclass(frozen=True)
class Schedule:
    single: bool          # every group is one component: BLOCK_M groups per program
    one_tile: bool        # the whole group (or BLOCK_M components) in one tile
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    retraction: bool = False

    @property
    def words(self) -> str:
        if self.retraction:
            how = f"{self.block_m} components per program" if self.one_tile else "one component in row chunks"
            return f"strided, retraction, {how}, components<={self.block_n}x{self.block_k}"
        if self.single:
            how = f"single-component groups x{self.block_m}"
        elif self.one_tile:
            how = f"one tile, groups<={self.block_m}"
        else:
            how = f"loops of {self.block_m} members x {self.block_n} rows"
        return f"strided, {how}, components<={self.block_n}x{self.block_k}"


def _warps(elements: int) -> int:
    return max(1, min(8, elements // 128))


def schedule_of(n: int, k: int, max_members: int, single: bool, block_m: int | None = None,
                block_n: int | None = None) -> Schedule:
    """The transform schedule of a tensor whose components are n×k and whose largest group has
    `max_members` components (block sizes forced by tests only)."""
    bk = next_power_of_2(k)
    fits = next_power_of_2(n) * bk <= TILE and block_n is None
    bn = next_power_of_2(n) if fits else (block_n or max(1, TILE // bk))
    per_component = bn * bk
    if fits and single and block_m is None:
        bm = max(1, TILE // per_component)
        return Schedule(True, True, bm, bn, bk, _warps(bm * per_component))
    if fits and block_m is None and next_power_of_2(max_members) * per_component <= TILE:
        bm = next_power_of_2(max_members)
        return Schedule(False, True, bm, bn, bk, _warps(bm * per_component))
    if block_m is None and bn * bk <= TILE // 2:
        # member loops: half a tile, 2 elements per thread (with 4, the transform spilled 16 bytes at
        # 64 registers and fused Adam took 128; kernels/report.py)
        bm = max(1, LOOP_TILE // per_component)
        return Schedule(False, False, bm, bn, bk, max(1, min(8, bm * per_component // 64)))
    bm = block_m or max(1, TILE // per_component)
    return Schedule(False, False, bm, bn, bk, _warps(bm * per_component))


def retract_schedule_of(n: int, k: int, block_n: int | None = None) -> Schedule:
    bk = next_power_of_2(k)
    if next_power_of_2(n) * bk <= TILE and block_n is None:
        bn = next_power_of_2(n)
        bm = max(1, TILE // (bn * bk))
        return Schedule(False, True, bm, bn, bk, _warps(bm * bn * bk), retraction=True)
    bn = block_n or max(1, TILE // bk)
    return Schedule(False, False, 1, bn, bk, _warps(bn * bk), retraction=True)


# ---- host side --------------------------------------------------------------------------------
def _bits(x: float) -> int:
    """A float64 as the int64 with its bits (the kernels bitcast it back)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@dataclass
class Groups:
    """A membership as the kernels read it: members sorted by group (int32), each group's first
    member (int32, n_groups + 1), and the per-group scratch the transform writes (R, non-finite)."""

    members: torch.Tensor
    starts: torch.Tensor
    n_groups: int
    max_members: int
    single: bool
    R: torch.Tensor
    bad: torch.Tensor


def groups_of(group_id: torch.Tensor, n_groups: int, max_members: int, device: torch.device) -> Groups:
    """The CSR form of a membership (``pom_membership``'s group ids), on `device`, without a host sync.
    ``max_members``: the largest group's size as the membership's options make it (it picks the schedule)."""
    gid = group_id.to(device).reshape(-1).to(torch.int64)
    members = torch.argsort(gid, stable=True).to(torch.int32)
    counts = torch.zeros(n_groups + 1, dtype=torch.int64, device=device)
    counts.index_add_(0, gid + 1, torch.ones_like(gid))
    starts = counts.cumsum(0).to(torch.int32)
    return Groups(members, starts, n_groups, max_members, max_members == 1 and n_groups == gid.numel(),
                  torch.zeros(n_groups, dtype=torch.float32, device=device),
                  torch.zeros(n_groups, dtype=torch.int32, device=device))


def _grid(shape: Sequence[int], component: str) -> tuple[int, int, int, int]:
    from geomcompile.geometries.pom import component_grid
    grid, n, k = component_grid(tuple(shape), component)
    return (grid[0], grid[1] if len(grid) > 1 else 1, n, k)


def _strides(tensors: Sequence[torch.Tensor], component: str):
    """Per tensor, its strides over (G1, G2, n, k), or None where it cannot be read so in place (it is
    then staged). A filter's element order does not matter (k = 1: sphere and oblique are the same,
    the norm is over all elements), so filters whose roles share one dense layout with the output
    channel outermost (channels_last) are read in memory order."""
    g1, g2, n, k = _grid(tensors[0].shape, component)
    out = []
    for t in tensors:
        try:
            out.append(tuple(t.view(g1, g2, n, k).stride()))
        except RuntimeError:
            out.append(None)
    if component == "filter" and None in out and dense_rows(list(tensors), 0):
        return [(n, 0, 1, 0)] * len(tensors)
    return out


class _Staging:
    """Tensors that cannot be read in place, replaced by contiguous copies; written ones copied back."""

    def __init__(self):
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.copied = False

    def place(self, tensors, strides, written: Sequence[bool], component: str):
        out, out_strides = [], []
        for t, s, w in zip(tensors, strides, written):
            if s is None:
                tmp = t.contiguous()
                self.copied = True
                if w:
                    self.copies.append((t, tmp))
                t, s = tmp, _strides([tmp], component)[0]
            out.append(t)
            out_strides.append(s)
        return out, out_strides

    def finish(self):
        for original, tmp in self.copies:
            original.copy_(tmp)


def _recorder(record: list | None, staging: _Staging) -> list | None:
    """As ``tables.recorder``: launches that read a staged copy (made anew at every call) cannot be
    repeated; they are marked by a None in ``record``."""
    if record is not None and staging.copied:
        record.append(None)
        return None
    return record


class _StatsLaunch(Launch):
    """The statistics launch of a fused call: a replay hands every launch of the call the update's
    scalars; this kernel takes none."""

    def run(self, scalars: dict | None = None) -> None:
        super().run(None)


def _launch(kernel: str, schedule_rows: dict, nf: int, device, cache, slot, constexprs, scalars,
            grad_role, record, keep, launch_type=Launch) -> None:
    """One launch per schedule: build (or reuse) the table of its tensors' rows and run it."""
    for schedule, (indices, rows, programs, sig) in schedule_rows.items():
        if sum(programs) == 0:
            continue

        def build(rows=rows, programs=programs):
            table = torch.tensor(rows, dtype=torch.int64).reshape(-1, nf)
            pmap = torch.tensor([(i, p) for i, n in enumerate(programs) for p in range(n)],
                                dtype=torch.int32).reshape(-1, 2)
            if device.type != "cpu":
                table = table.pin_memory().to(device, non_blocking=True)
                pmap = pmap.pin_memory().to(device, non_blocking=True)
            return table, pmap, sum(programs)

        key = (slot, kernel, schedule)
        table, pmap, n = cache.get(key, sig, build) if cache is not None else build()
        launch = launch_type(sys.modules[__name__], kernel, n, table, pmap, (), constexprs(schedule), scalars,
                             indices, grad_role, [False] * len(indices), cache, key)
        launch.keep = keep                       # the tensors the table points into stay alive with it
        launch.run()
        if record is not None:
            record.append(launch)


def pom_transform(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], component: str,
                  manifold: str, radii: Sequence[float], groups: Sequence[Groups],
                  stats: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *,
                  update=None, states: Sequence[Sequence[torch.Tensor]] | None = None,
                  first: Sequence[bool] | None = None, retract_radii: Sequence[float] | None = None,
                  cache: TableCache | None = None, slot: Hashable = None, block_m: int | None = None,
                  block_n: int | None = None, record: list | None = None, skip: torch.Tensor | None = None) -> None:
    """``POM.pre_step`` on a bucket, and stats[i] = (nonfinite_steps int64, last_max_group_norm fp32,
    normalised_groups int64), 0-d tensors on the device, written as ``POM.pre_step`` writes them.
    radii[i]: ``state["radius"]`` (a float). ``skip``: a 0-d int32 on the device (at a fixed address
    while recorded launches replay); not 0: the statistics are left as they are (StepContext.skip).

    update None: ``grads[i] <- pom_direction(weights[i], grads[i])`` in place. update ``SGDUpdate`` /
    ``AdamUpdate``: the base update steps ``weights[i]`` and ``states[i]`` (momentum_buffer, or exp_avg
    and exp_avg_sq; ``first[i]``: the momentum buffer is new) with that direction, grads are only read;
    with ``retract_radii`` the components are then retracted onto radius ``retract_radii[i]``
    (``POM.post_step``). record: as ``psi.psi`` (None appended when a staged copy makes the launches
    unrepeatable)."""
    if manifold not in ("sphere", "oblique"):
        raise ValueError(f"the pom kernels take sphere and oblique components, got {manifold!r}")
    scalars, flags = kernel_args(update)
    fused = flags["UPDATE"] != NONE
    n_state = flags["N_STATE"] if fused else 0
    live = [i for i, g in enumerate(grads) if g.numel()]
    if not live:
        return
    if fused and states is not None and any(len(states[i]) < n_state for i in live):
        raise ValueError(f"the update needs {n_state} state tensor(s) per weight")
    if fused and n_state and states is None:
        raise ValueError(f"the update needs {n_state} state tensor(s) per weight")
    extra = [list(states[i])[:n_state] if n_state else [] for i in range(len(grads))]
    tensors_of = [[weights[i], grads[i], *extra[i]] for i in live]
    dtypes = {t.dtype for ts in tensors_of for t in ts}
    devices = {t.device for ts in tensors_of for t in ts}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(f"a bucket shares one dtype and device, got {sorted(map(str, dtypes))} on "
                         f"{sorted(map(str, devices))}")
    dtype, device = dtypes.pop(), devices.pop()
    retract = fused and retract_radii is not None
    staging = _Staging()
    per_schedule: dict[Schedule, tuple] = {}
    stat_rows = []
    flag = never_skipped(device) if skip is None else skip
    keep = [flag]
    for i in live:
        grp = groups[i]
        roles = [grads[i], weights[i], *extra[i]]
        if any(t.shape != roles[0].shape for t in roles):
            raise ValueError(f"tensor {i}: gradient, weight and state shapes differ: {[tuple(t.shape) for t in roles]}")
        g1, g2, n, k = _grid(roles[0].shape, component)
        roles, strides = staging.place(roles, _strides(roles, component), [not fused] + [fused] * (len(roles) - 1),
                                       component)
        (g, w), (gs, ws) = roles[:2], strides[:2]
        s = schedule_of(n, k, grp.max_members, grp.single, block_m, block_n)
        programs = triton.cdiv(grp.n_groups, s.block_m) if s.single else grp.n_groups
        fixed = 1.0 / math.sqrt(n if manifold == "oblique" else n * k)
        row = [g2, n, k, grp.n_groups, grp.members.data_ptr(), grp.starts.data_ptr(),
               g.data_ptr(), gs[0], gs[1], gs[2], w.data_ptr(), ws[0], ws[1], ws[2], gs[3], ws[3],
               grp.R.data_ptr(), grp.bad.data_ptr(), _bits(float(radii[i]) ** 2),
               int(bool(first[i])) if first is not None else 0,
               _bits(retract_radii[i] if retract else 1.0), _bits(fixed)]
        for t, st in zip(roles[2:] + [None] * (2 - len(roles[2:])), strides[2:] + [None] * (2 - len(strides[2:]))):
            row += [0] * 5 if t is None else [t.data_ptr(), *st]
        indices, rows, progs, sig = per_schedule.setdefault((s, s.block_n >= n), ([], [], [], []))
        indices.append(i)
        rows.append(row)
        progs.append(programs)
        sig.append(tuple(row) + (programs,))
        stat_rows.append([grp.n_groups, grp.R.data_ptr(), grp.bad.data_ptr(), *(x.data_ptr() for x in
                          (stats[i][1], stats[i][2], stats[i][0])), flag.data_ptr()])
        keep += [grp, *stats[i]]          # not the gradient: a plan must not keep it alive (triton_backend._Call)
    for key, (indices, rows, progs, sig) in list(per_schedule.items()):
        per_schedule[key] = (indices, rows, progs, tuple(sig))
    record = _recorder(record, staging)
    dt = tl_dtype(dtype)

    def constexprs(key):
        s, whole = key
        return dict(NF=T_NF, DT=dt, OBLIQUE=manifold == "oblique", SINGLE=s.single, ONE_TILE=s.one_tile,
                    WHOLE=whole, SATURATE=dtype == torch.float16, **flags, RETRACT=retract, BLOCK_M=s.block_m,
                    BLOCK_N=s.block_n, BLOCK_K=s.block_k, num_warps=s.num_warps)
    with device_guard(device):
        _launch("_pom_kernel", per_schedule, T_NF, device, cache, slot, constexprs, scalars, 0, record, keep)
        staging.finish()
        stats_rows = {"stats": (live, stat_rows, [1] * len(live), tuple(map(tuple, stat_rows)))}
        _launch("_pom_stats_kernel", stats_rows, S_NF, device, cache, slot,
                lambda s: dict(NF=S_NF, BLOCK=STATS_BLOCK, num_warps=4), {}, None, record, keep, _StatsLaunch)


def pom_retract_kernel(weights: Sequence[torch.Tensor], component: str, manifold: str, radii: Sequence[float], *,
                       cache: TableCache | None = None, slot: Hashable = None, block_n: int | None = None,
                       record: list | None = None, skip: torch.Tensor | None = None) -> None:
    """``POM.post_step``'s retraction on a bucket: every component of ``weights[i]`` onto its manifold of
    radius ``radii[i]``, in place (``pom_retract``); no optimizer state is touched. ``skip``: as
    ``pom_transform``'s; not 0: no weight is written."""
    if manifold not in ("sphere", "oblique"):
        raise ValueError(f"the pom kernels retract sphere and oblique components, got {manifold!r}")
    live = [i for i, w in enumerate(weights) if w.numel()]
    if not live:
        return
    if len({weights[i].dtype for i in live}) > 1 or len({weights[i].device for i in live}) > 1:
        raise ValueError("a bucket shares one dtype and device")
    dtype, device = weights[live[0]].dtype, weights[live[0]].device
    staging = _Staging()
    per_schedule: dict[Schedule, tuple] = {}
    flag = never_skipped(device) if skip is None else skip
    keep: list = [flag]
    for i in live:
        (w,), (ws,) = staging.place([weights[i]], _strides([weights[i]], component), [True], component)
        g1, g2, n, k = _grid(w.shape, component)
        s = retract_schedule_of(n, k, block_n)
        programs = triton.cdiv(g1 * g2, s.block_m)
        fixed = 1.0 / math.sqrt(n if manifold == "oblique" else n * k)      # eager's canonical point
        row = [g2, n, k, g1 * g2, _bits(fixed), flag.data_ptr(), w.data_ptr(), *ws, _bits(radii[i])]
        indices, rows, progs, sig = per_schedule.setdefault(s, ([], [], [], []))
        indices.append(i)
        rows.append(row)
        progs.append(programs)
        sig.append(tuple(row) + (programs,))
    for s, (indices, rows, progs, sig) in list(per_schedule.items()):
        per_schedule[s] = (indices, rows, progs, tuple(sig))
    record = _recorder(record, staging)
    dt = tl_dtype(dtype)

    def constexprs(s):
        return dict(NF=R_NF, DT=dt, OBLIQUE=manifold == "oblique", ONE_TILE=s.one_tile, BLOCK_M=s.block_m,
                    BLOCK_N=s.block_n, BLOCK_K=s.block_k, num_warps=s.num_warps)
    with device_guard(device):
        _launch("_pom_retract_kernel", per_schedule, R_NF, device, cache, slot, constexprs, {}, None, record, keep)
        staging.finish()


def configurations():
    """The schedules the launchers pick for typical components (3×3 kernels in groups of 1, 64 and 512;
    filters of 576 and 4608 elements), fp32 and bf16, for kernels/report.py: the transform on both
    manifolds, the fused updates (SGD with momentum, Adam; the retraction included) on the oblique
    one (per-column norms: the heavier). Every tile holds at most TILE elements with at most 4 per
    thread (``_warps``), so other component shapes compile to the same register budget."""
    from .report import KernelConfig, update_kinds
    types = {"tab": "*i64", "prog": "*i32"}
    out = []
    shapes = {"3x3 kernels, PI groups of 64": (3, 3, 64, False), "3x3 kernels, groups of 1": (3, 3, 1, True),
              "3x3 kernels, PO groups of 512": (3, 3, 512, False), "filters of 4608, PO groups of 64": (4608, 1, 64, False),
              "filters of 576, groups of 1": (576, 1, 1, True), "filters of 576, PO groups of 64": (576, 1, 64, False)}
    kinds = update_kinds()
    for dtype in (torch.float32, torch.bfloat16):
        for n, k, members, single in shapes.values():
            s = schedule_of(n, k, members, single)
            runs = [(False, "transform"), (True, "transform"), (True, "sgd_momentum"), (True, "adam")]
            for oblique, kind in runs:
                flags = kinds[kind]
                fused = flags["UPDATE"] != NONE
                out.append(KernelConfig("pom", _pom_kernel, dict(
                    NF=T_NF, DT=tl_dtype(dtype), OBLIQUE=oblique, SINGLE=s.single, ONE_TILE=s.one_tile,
                    WHOLE=s.block_n >= n, SATURATE=False, **flags, RETRACT=fused, BLOCK_M=s.block_m,
                    BLOCK_N=s.block_n, BLOCK_K=s.block_k), s.num_warps, s.words, types,
                    weight=2 + flags["N_STATE"] if fused else 2))
        for oblique in (False, True):
            for n, k in ((3, 3), (4608, 1)):
                s = retract_schedule_of(n, k)
                out.append(KernelConfig("pom", _pom_retract_kernel, dict(
                    NF=R_NF, DT=tl_dtype(dtype), OBLIQUE=oblique, ONE_TILE=s.one_tile, BLOCK_M=s.block_m,
                    BLOCK_N=s.block_n, BLOCK_K=s.block_k), s.num_warps, s.words, types, weight=1))
    out.append(KernelConfig("pom", _pom_stats_kernel, dict(NF=S_NF, BLOCK=STATS_BLOCK), 4, "strided, stats", types))
    return out


# ---- the fast path the geometry declares ------------------------------------------------------
class POMKernels(KernelFamily):
    """The Triton fast path of geometries/pom.py (protocol: runtime/triton_backend.KernelFamily)."""

    name = "pom"
    retracts = True
    retraction_rescales = False       # POM.post_step moves weights onto the manifold: no Rescale, no state
    state_outputs = ("nonfinite_steps", "last_max_group_norm", "normalised_groups")

    def __init__(self):
        # membership (a group_id tensor, by identity) -> its CSR form on a device
        self._groups: dict[tuple[int, torch.device], tuple[weakref.ref, Groups]] = {}

    def for_geometry(self, geometry) -> KernelFamily:
        """The kernels for sphere and oblique components with a fixed radius; POMTorchSteps for the
        rest (runtime/fastpath.fast_path asks)."""
        return POM_TORCH_STEPS if _kernel_refusal(geometry) else self

    def problem(self, geometry) -> str | None:
        return _kernel_refusal(geometry)

    def groups(self, geometry, state: dict, p: torch.Tensor) -> Groups:
        from geomcompile.geometries.pom import component_grid, pom_max_group
        gid = state["group_id"]
        key = (id(gid), p.device)
        hit = self._groups.get(key)
        if hit is not None and hit[0]() is gid and hit[1].n_groups == state["n_groups"]:
            return hit[1]
        o = geometry.opts
        grid, _, _ = component_grid(tuple(p.shape), o["component"])
        grp = groups_of(gid, state["n_groups"], pom_max_group(grid, o["grouping"], o["group_size"]), p.device)
        self._groups = {k: v for k, v in self._groups.items() if v[0]() is not None}
        self._groups[key] = (weakref.ref(gid), grp)
        return grp

    @staticmethod
    def _stats(state: dict, device: torch.device):
        """The state tensors the kernels write, as 0-d device tensors (kept while they already are)."""
        out = []
        for key, dtype in (("nonfinite_steps", torch.int64), ("last_max_group_norm", torch.float32),
                           ("normalised_groups", torch.int64)):
            v = state.get(key, 0)
            if not (isinstance(v, torch.Tensor) and v.device == device and v.dtype == dtype and v.dim() == 0):
                # a copy (no host read): a loaded value may live on another device or share storage
                v = state[key] = torch.as_tensor(v).to(device=device, dtype=dtype).reshape(()).clone()
            out.append(v)
        return tuple(out)

    takes_skip = True        # the statistics and retraction kernels read StepContext.skip on the device

    def transform(self, geometry, entries, cache, slot, record=None) -> None:
        o = geometry.opts
        states = [e.extra["state"] for e in entries]
        pom_transform([e.param.detach() for e in entries], [e.grad for e in entries], o["component"],
                      o["manifold"], [float(s["radius"]) for s in states],
                      [self.groups(geometry, s, e.param) for s, e in zip(states, entries)],
                      [self._stats(s, e.param.device) for s, e in zip(states, entries)],
                      cache=cache, slot=slot, record=record, skip=entries[0].extra.get("skip"))

    def fused(self, geometry, entries, update, cache, slot, retract: bool = True, record=None) -> None:
        o = geometry.opts
        states = [e.extra["state"] for e in entries]
        pom_transform([e.param.detach() for e in entries], [e.grad for e in entries], o["component"],
                      o["manifold"], [float(s["radius"]) for s in states],
                      [self.groups(geometry, s, e.param) for s, e in zip(states, entries)],
                      [self._stats(s, e.param.device) for s, e in zip(states, entries)],
                      update=update, states=[e.extra["states"] for e in entries],
                      first=[e.extra["first"] for e in entries],
                      retract_radii=[float(s["base_radius"]) for s in states] if retract else None,
                      cache=cache, slot=slot, record=record)

    def retract(self, geometry, entries, powers, cache, slot, record=None) -> None:
        if powers:
            raise ValueError(f"pom's retraction rescales no optimizer state, got powers {tuple(powers)}")
        o = geometry.opts
        pom_retract_kernel([e.param.detach() for e in entries], o["component"], o["manifold"],
                           [float(e.extra["state"]["base_radius"]) for e in entries],
                           cache=cache, slot=slot, record=record, skip=entries[0].extra.get("skip"))


def _kernel_refusal(geometry) -> str | None:
    """Why pom's kernels cannot run this configuration (POMTorchSteps then does), or None."""
    o = geometry.opts
    if o["manifold"] not in ("sphere", "oblique"):
        return f"manifold={o['manifold']} has no Triton kernel (its QR / Newton retraction runs as torch ops)"
    if o["feature_std"]:
        return "feature_std=True has no Triton kernel (its radius is a device tensor that moves every step)"
    return None


class POMTorchSteps(KernelFamily):
    """pom on the Triton backend where its kernels cannot run (_kernel_refusal: Stiefel components,
    feature_std): the compile backend's batched programs (CompiledPOM: the direction as one projection
    and one index_add_ per component shape over the bucket, the retraction as one pom_retract_layers
    per component shape), run uncompiled. The direction writes the gradients and the state pre_step
    records, torch's step follows (never fused), the retraction writes the weights and the radius.
    Recorded as TorchStep objects, so the step plan replays them."""

    name = "pom"
    retracts = True
    retraction_rescales = False       # onto the manifold: no Rescale, no optimizer state scaled
    fuses = False
    launches_kernels = False
    note = ("launches no fused update kernel for Stiefel components or feature_std: pom's batched torch program "
            "(the compile backend's, uncompiled: one direction and one retraction per component shape and bucket)")

    @staticmethod
    def _program():
        from geomcompile.geometries.pom import CompiledPOM      # late: the geometry imports this module lazily
        return CompiledPOM()

    takes_skip = True        # CompiledPOM's programs keep weights and state where StepContext.skip is set

    @staticmethod
    def _inputs(program, state: dict, skip) -> dict:
        """The entries the compile backend hands the program (its _state_inputs)."""
        return _state_inputs(program.state_keys, state, None, program, skip)

    def transform(self, geometry, entries, cache, slot, record=None) -> None:
        program = self._program()
        layouts = [program.layout(geometry, e.facts) for e in entries]
        weights = [e.param.detach() for e in entries]
        states = [e.extra["state"] for e in entries]
        skip = entries[0].extra.get("skip")

        def step(grads):
            with torch.no_grad():
                new, updates = program.transform_with_state(geometry, layouts, grads, weights,
                                                            [self._inputs(program, st, skip) for st in states])
                for grad, value in zip(grads, new):
                    grad.copy_(value)
                for state, update in zip(states, updates):
                    state.update(update)
        step([e.grad for e in entries])
        if record is not None:
            record.append(TorchStep(step, [e.param for e in entries]))

    def retract(self, geometry, entries, powers, cache, slot, record=None) -> None:
        if powers:
            raise ValueError(f"pom's retraction rescales no optimizer state, got powers {tuple(powers)}")
        program = self._program()
        layouts = [program.layout(geometry, e.facts) for e in entries]
        weights = [e.param.detach() for e in entries]
        states = [e.extra["state"] for e in entries]
        skip = entries[0].extra.get("skip")

        def step(_grads=None):
            with torch.no_grad():
                new, updates = program.retract_with_state(geometry, layouts, weights,
                                                          [self._inputs(program, st, skip) for st in states])
                for weight, value in zip(weights, new):
                    weight.copy_(value)
                for state, update in zip(states, updates):
                    state.update(update)
        step()
        if record is not None:
            record.append(TorchStep(step, [e.param for e in entries], reads_grads=False))


POM_TORCH_STEPS = POMTorchSteps()

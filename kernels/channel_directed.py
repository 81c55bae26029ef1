"""Channel-directed metrics (``geometries/channel_directed.py``: ``reweighted_h0``, ``sobolev``) as one
multi-tensor Triton kernel, alone (gradient transform) or fused with the SGD / Adam update.

Each gradient f is read as O rows (output channels) by R = A·B columns. Both metrics need
column statistics over *all* O rows before row o can be written:

    h0:       S0 = Σ_o f_o                      g_o = S0/O + (f_o − S0/O)/lam + mix·f_o
    sobolev:  S0, S1 = Σ o·f_o, S2 = Σ o²·f_o   g_o = S0/O + [(o²S0 − 2oS1 + S2)/O² + (oS0 − S1)/O
              and the inclusive prefix sums          − 2(o·C0(o) − C1(o))/O + c·S0] / (2·lam·O) + mix·f_o
              C0(o) = Σ_{o'≤o} f_o', C1(o) = Σ_{o'≤o} o'·f_o'

so one program owns a tile of BLOCK_R columns of one tensor, over all its rows: the stats live in
registers (3 fp32 per column) and no cross-program synchronisation is needed.

* ONE_TILE (O ≤ BLOCK_O): the (O, BLOCK_R) tile is loaded once; stats, prefix sums (tl.cumsum)
  and the result come from registers.
* otherwise, two passes over row chunks: pass 1 accumulates S0, S1, S2; pass 2 re-reads f,
  keeps running prefix sums C0, C1 across chunks (tl.cumsum inside a chunk plus the carry) and
  writes.

Bytes moved per element (e = element size of the parameter dtype; tables and stats are O(R)):

    ================================  ==========  ===========
    UPDATE                            ONE_TILE    two passes
    ================================  ==========  ===========
    none (g written into p.grad)      2e          3e
    SGD (no momentum)                 3e          4e
    SGD with momentum                 5e          6e
    Adam / AdamW                      7e          8e
    ================================  ==========  ===========

(read f once or twice, read and write the weight and each state tensor once.)

Non-finite entries of f (NaN, ±Inf) are read as 0 by the column statistics and passed through to the
result unchanged, as ``geometries.base.pass_nonfinite`` does for the eager metric: the weight becomes
non-finite exactly where plain torch's step would make it so, and nowhere else in its column. The eager path
moves several times that: each metric alone runs ~10 elementwise/reduction ops over (O, R), then
the base optimizer reads and writes everything again.
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
from .tables import (FIXED_FIELDS, Operand, Staged, TableCache, bucket_dtype, launch_all, launches, recorder,
                     vector_width, warps_for)

METRICS = ("h0", "sobolev")


@triton.jit
def _metric_rows(f, o, S0, S1, S2, C0, C1, Of, lam, sob_c, sob_den, mix,
                 SOBOLEV: tl.constexpr, HAS_MIX: tl.constexpr):
    """g for a tile f (rows o, fp32), given column sums S* and inclusive prefix sums C* (as eager)."""
    if SOBOLEV:
        oc = o[:, None]
        bracket = ((oc * oc * S0[None, :] - 2.0 * oc * S1[None, :] + S2[None, :]) / (Of * Of)
                   + (oc * S0[None, :] - S1[None, :]) / Of
                   - 2.0 * (oc * C0 - C1) / Of + sob_c * S0[None, :])
        g = S0[None, :] / Of + bracket / sob_den
    else:
        mean = S0[None, :] / Of
        g = mean + (f - mean) / lam
    if HAS_MIX:
        g = g + mix * f
    return g


@triton.jit
def _finite(x):
    """x with NaN and ±Inf read as 0, as geometries.base.pass_nonfinite: the metric mixes only finite
    entries; the caller passes the non-finite ones through (where raw != _finite(raw))."""
    return tl.where(tl.abs(x) <= 3.4028234663852886e38, x, 0.0)


@triton.jit
def _role_columns(row, ROLE: tl.constexpr, DT: tl.constexpr, cols, a, b, B, DENSE: tl.constexpr):
    """Pointers to row 0 of this program's columns of role ROLE, and the role's row stride.
    DENSE: row o is the contiguous block [o·B, (o+1)·B) of the memory, columns are offsets in it."""
    field = row + FIXED_FIELDS + 4 * ROLE
    ptr = tl.load(field).to(tl.pointer_type(DT))
    if DENSE:
        col = tl.multiple_of(ptr, 16) + cols
        so = B
    else:
        col = ptr + a * tl.load(field + 1) + b * tl.load(field + 3)
        so = tl.load(field + 2)
    return col, so


@triton.jit
def _write_rows(g, r, mask, g_col, g_so, w_col, w_so, s1_col, s1_so, s2_col, s2_so, first,
                lr, momentum, one_minus_dampening, weight_decay, lerp_w, beta2, one_minus_beta2, eps,
                neg_step_size, bc2_sqrt, decay,
                DT: tl.constexpr, UPDATE: tl.constexpr, N_STATE: tl.constexpr, MAXIMIZE: tl.constexpr,
                HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                NESTEROV: tl.constexpr):
    """Rows r of the tile: store g into the gradient (UPDATE == 0) or apply the base update."""
    if UPDATE == 0:
        tl.store(g_col + r * g_so, g.to(DT), mask=mask)
    else:
        w = tl.load(w_col + r * w_so, mask=mask, other=0.0).to(tl.float32)
        s1 = w
        s2 = w
        if N_STATE >= 1:
            s1 = tl.load(s1_col + r * s1_so, mask=mask, other=0.0).to(tl.float32)
        if N_STATE >= 2:
            s2 = tl.load(s2_col + r * s2_so, mask=mask, other=0.0).to(tl.float32)
        w, s1, s2 = base_update(g, w, s1, s2, first, lr, momentum, one_minus_dampening, weight_decay, lerp_w,
                                beta2, one_minus_beta2, eps, neg_step_size, bc2_sqrt, decay,
                                UPDATE, MAXIMIZE, HAS_WD, DECOUPLED, HAS_MOMENTUM, NESTEROV)
        tl.store(w_col + r * w_so, w.to(DT), mask=mask)
        if N_STATE >= 1:
            tl.store(s1_col + r * s1_so, s1.to(DT), mask=mask)
        if N_STATE >= 2:
            tl.store(s2_col + r * s2_so, s2.to(DT), mask=mask)


@triton.jit
def _channel_directed_kernel(
        tab, prog, lam, mix,
        lr, momentum, one_minus_dampening, weight_decay, lerp_w, beta2, one_minus_beta2, eps,
        neg_step_size, bc2_sqrt, decay,
        NF: tl.constexpr, DT: tl.constexpr, SOBOLEV: tl.constexpr, HAS_MIX: tl.constexpr,
        UPDATE: tl.constexpr, N_STATE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
        DECOUPLED: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
        DENSE: tl.constexpr, VEC: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_O: tl.constexpr,
        BLOCK_R: tl.constexpr):
    """One program: BLOCK_R columns of one tensor of the bucket, all of its O rows.
    Roles: 0 grad, 1 weight, 2 and 3 optimizer state. Indices are int32 (the launcher takes
    tensors of fewer than 2^31 elements); the only divisions are one per column, strided path only."""
    pid = tl.program_id(0)
    t = tl.load(prog + 2 * pid)
    tile = tl.load(prog + 2 * pid + 1)
    row = tab + t.to(tl.int64) * NF
    A = tl.load(row).to(tl.int32)
    O = tl.load(row + 1).to(tl.int32)
    B = tl.load(row + 2).to(tl.int32)
    if DENSE:
        B = tl.multiple_of(B, VEC)            # rows start on 16-byte boundaries (checked by the launcher)
    first = tl.load(row + 4) != 0
    cols = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    cmask = cols < A * B
    a = cols // B                             # strided path only (A = 1 when dense)
    b = cols - a * B
    g_col, g_so = _role_columns(row, 0, DT, cols, a, b, B, DENSE)
    w_col, w_so = g_col, g_so                     # placeholders for absent roles, never used
    s1_col, s1_so = g_col, g_so
    s2_col, s2_so = g_col, g_so
    if UPDATE != 0:
        w_col, w_so = _role_columns(row, 1, DT, cols, a, b, B, DENSE)
    if N_STATE >= 1:
        s1_col, s1_so = _role_columns(row, 2, DT, cols, a, b, B, DENSE)
    if N_STATE >= 2:
        s2_col, s2_so = _role_columns(row, 3, DT, cols, a, b, B, DENSE)
    g_col = g_col[None, :]
    w_col = w_col[None, :]
    s1_col = s1_col[None, :]
    s2_col = s2_col[None, :]
    Of = O.to(tl.float32)
    Od = O.to(tl.float64)
    sob_c = ((1.0 - 1.0 / (Od * Od)) / 6.0).to(tl.float32)   # eager: Python double, then fp32
    sob_den = (2.0 * Od * lam).to(tl.float32)                # fp64 product, as eager
    rows = tl.arange(0, BLOCK_O)
    if ONE_TILE:
        r = rows[:, None]
        mask = (r < O) & cmask[None, :]
        raw = tl.load(g_col + r * g_so, mask=mask, other=0.0).to(tl.float32)
        f = _finite(raw)
        o = rows.to(tl.float32)
        of = o[:, None] * f
        S0 = tl.sum(f, axis=0)
        S1 = tl.sum(of, axis=0)
        S2 = tl.sum(o[:, None] * of, axis=0)
        g = _metric_rows(f, o, S0, S1, S2, tl.cumsum(f, axis=0), tl.cumsum(of, axis=0), Of, lam, sob_c,
                         sob_den, mix, SOBOLEV, HAS_MIX)
        g = tl.where(raw == f, g, raw)
        _write_rows(g, r, mask, g_col, g_so, w_col, w_so, s1_col, s1_so, s2_col, s2_so, first,
                    lr, momentum, one_minus_dampening, weight_decay, lerp_w, beta2, one_minus_beta2, eps,
                    neg_step_size, bc2_sqrt, decay,
                    DT, UPDATE, N_STATE, MAXIMIZE, HAS_WD, DECOUPLED, HAS_MOMENTUM, NESTEROV)
    else:
        # pass 1: column statistics over all rows
        S0 = tl.zeros([BLOCK_R], tl.float32)
        S1 = tl.zeros([BLOCK_R], tl.float32)
        S2 = tl.zeros([BLOCK_R], tl.float32)
        for o0 in range(0, O, BLOCK_O):
            r = o0 + rows[:, None]
            f = _finite(tl.load(g_col + r * g_so, mask=(r < O) & cmask[None, :], other=0.0).to(tl.float32))
            o = (o0 + rows).to(tl.float32)
            of = o[:, None] * f
            S0 += tl.sum(f, axis=0)
            S1 += tl.sum(of, axis=0)
            S2 += tl.sum(o[:, None] * of, axis=0)
        # pass 2: running prefix sums across row chunks, then write
        C0 = tl.zeros([BLOCK_R], tl.float32)
        C1 = tl.zeros([BLOCK_R], tl.float32)
        for o0 in range(0, O, BLOCK_O):
            r = o0 + rows[:, None]
            mask = (r < O) & cmask[None, :]
            raw = tl.load(g_col + r * g_so, mask=mask, other=0.0).to(tl.float32)
            f = _finite(raw)
            o = (o0 + rows).to(tl.float32)
            of = o[:, None] * f
            P0 = tl.cumsum(f, axis=0) + C0[None, :]
            P1 = tl.cumsum(of, axis=0) + C1[None, :]
            C0 += tl.sum(f, axis=0)
            C1 += tl.sum(of, axis=0)
            g = _metric_rows(f, o, S0, S1, S2, P0, P1, Of, lam, sob_c, sob_den, mix, SOBOLEV, HAS_MIX)
            g = tl.where(raw == f, g, raw)
            _write_rows(g, r, mask, g_col, g_so, w_col, w_so, s1_col, s1_so, s2_col, s2_so, first,
                        lr, momentum, one_minus_dampening, weight_decay, lerp_w, beta2, one_minus_beta2, eps,
                        neg_step_size, bc2_sqrt, decay,
                        DT, UPDATE, N_STATE, MAXIMIZE, HAS_WD, DECOUPLED, HAS_MOMENTUM, NESTEROV)


# ---- schedule: size classes ---------------------------------------------------------------------
# A tensor's class depends on its own O and layout only. One tile holds all O rows when O <= 64
# (BLOCK_O the next class size, BLOCK_R = TILE / BLOCK_O columns); larger O runs two passes over
# chunks of TWO_PASS_ROWS rows by TWO_PASS_COLUMNS columns (the two passes also carry five column
# statistics, hence the smaller tile). Warps: ``tables.warps_for`` (two 128-bit vectors per thread
# and array on the aligned path), four elements per thread in two-pass mode. kernels/report.py checks every class:
# <= 128 registers, no spills.
O_CLASSES = (4, 16, 32, 64)
TILE = 2048
TWO_PASS_ROWS = 16
TWO_PASS_COLUMNS = 64


@dataclass(frozen=True)
class Schedule:
    dense: bool          # the contiguous, 16-byte aligned path
    one_tile: bool
    block_o: int
    block_r: int
    num_warps: int

    @property
    def words(self) -> str:
        return (f"{'aligned' if self.dense else 'strided'}, "
                f"{f'one tile O<={self.block_o}' if self.one_tile else f'two passes of {self.block_o} rows'}")


def schedule_of(o: int, dense: bool, vec: int, block_o: int | None = None, block_r: int | None = None) -> Schedule:
    """The size class of a tensor with O rows (block sizes forced by tests only)."""
    if block_o is None:
        block_o = next((c for c in O_CLASSES if o <= c), TWO_PASS_ROWS)
    one_tile = o <= block_o
    if block_r is None:
        block_r = TILE // block_o if one_tile else TWO_PASS_COLUMNS
    tile = block_o * block_r
    # Elements per thread and array, checked by kernels/report.py (<= 128 registers, no spills):
    # * one tile: two 128-bit vectors for fp32, one for 16-bit dtypes (with two, the non-finite
    #   pass-through's raw gradient kept beside its finite copy took bf16 AdamW to 155 registers);
    # * two passes (five column statistics): 4 for fp32 (a 128-bit vector), 2 for 16-bit dtypes (8 bf16
    #   elements exceed 128 registers; 4 spilled 8 bytes in the h0 AdamW configuration at 40).
    vectors = 1 if vec > 4 else 2
    per_thread = 2 if vec > 4 else 4
    warps = warps_for(tile, dense, vec, vectors) if one_tile else max(4, min(16, tile // (32 * per_thread)))
    return Schedule(dense, one_tile, block_o, block_r, warps)


def channel_directed(grads: Sequence[torch.Tensor], dims: Sequence[int], metric: str, lam: float,
                     mix: float = 0.0, *, weights: Sequence[torch.Tensor] | None = None,
                     states: Sequence[Sequence[torch.Tensor]] | None = None, first: Sequence[bool] | None = None,
                     update=None, cache: TableCache | None = None, slot: Hashable = None,
                     block_o: int | None = None, block_r: int | None = None, record: list | None = None) -> None:
    """Apply the channel-directed metric to a bucket of gradients, one launch per size class.

    update None: ``grads[i]`` is overwritten with ``sobolev`` / ``reweighted_h0`` of itself along
    ``dims[i]``. update an ``SGDUpdate`` / ``AdamUpdate``: the metric's result feeds the base update,
    ``weights[i]`` and ``states[i]`` (momentum_buffer, or exp_avg and exp_avg_sq) are updated in
    place and ``grads`` are left as they are; ``first[i]`` marks a momentum buffer to initialise.
    All tensors share one dtype (fp32, fp16 or bf16; math in fp32) and one device, and have fewer
    than 2^31 elements. record: as ``psi.psi``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    scalars, flags = kernel_args(update)
    fused = flags["UPDATE"] != NONE
    if fused and weights is None:
        raise ValueError("a fused update needs the weights")
    n_state = flags["N_STATE"]
    operands = []
    for i, (g, dim) in enumerate(zip(grads, dims)):
        tensors = [g]
        if fused:
            st = list(states[i]) if states is not None else []
            if len(st) < n_state:
                raise ValueError(f"tensor {i}: the update needs {n_state} state tensor(s), got {len(st)}")
            tensors += [weights[i], *st[:n_state]]
        if any(t.shape != g.shape for t in tensors):
            raise ValueError(f"tensor {i}: gradient, weight and state shapes differ: "
                             f"{[tuple(t.shape) for t in tensors]}")
        operands.append(Operand(tensors, dim, flag=int(bool(first[i])) if first is not None else 0))
    if not operands:
        return
    dtype = bucket_dtype(operands)
    dt = tl_dtype(dtype)
    n_roles = 2 + n_state if fused else 1
    staged = Staged(operands, written_roles=range(1, n_roles) if fused else (0,))
    for op in staged.operands:
        op.set_layout()

    def schedule(op):
        return schedule_of(op.shape[1], op.dense, vector_width(dtype), block_o, block_r)

    def programs(op, s):
        return triton.cdiv(op.shape[0] * op.shape[2], s.block_r)

    def constexprs(s, table):
        return dict(NF=table.shape[1], DT=dt, SOBOLEV=metric == "sobolev", HAS_MIX=mix != 0, **flags,
                    DENSE=s.dense, VEC=vector_width(dtype), ONE_TILE=s.one_tile, BLOCK_O=s.block_o,
                    BLOCK_R=s.block_r, num_warps=s.num_warps)
    classes = launches(staged.operands, schedule, programs, n_roles, cache, (slot, "channel_directed", n_roles))
    launch_all(sys.modules[__name__], "_channel_directed_kernel", classes, (float(lam), float(mix)), scalars,
               constexprs, staged.operands, 0, cache, recorder(record, staged))
    staged.finish()


def configurations():
    """Every (schedule, update kind, dtype) the launcher can pick, for kernels/report.py."""
    from .report import KernelConfig, update_kinds
    out = []
    for dense in (True, False):
        for o in (*O_CLASSES, O_CLASSES[-1] + 1):
            for kind, flags in update_kinds().items():
                n_roles = 2 + flags["N_STATE"] if flags["UPDATE"] != NONE else 1
                for dtype in (torch.float32, torch.bfloat16):
                    s = schedule_of(o, dense, vector_width(dtype))
                    for sobolev in (True, False):
                        out.append(KernelConfig(
                            "channel_directed", _channel_directed_kernel,
                            dict(NF=6 + 4 * n_roles, DT=tl_dtype(dtype), SOBOLEV=sobolev, HAS_MIX=True, **flags,
                                 DENSE=s.dense, VEC=vector_width(dtype), ONE_TILE=s.one_tile,
                                 BLOCK_O=s.block_o, BLOCK_R=s.block_r),
                            s.num_warps, s.words, {"tab": "*i64", "prog": "*i32"},
                            weight=n_roles * 2 + sobolev))
    return out


# ---- the fast path the geometry declares ------------------------------------------------------
class ChannelDirectedKernels(KernelFamily):
    """The Triton fast path of geometries/channel_directed.py (protocol: runtime/triton_backend.KernelFamily)."""

    name = "channel_directed"
    retracts = False

    def transform(self, geometry, entries, cache, slot, record=None) -> None:
        o = geometry.opts
        channel_directed([e.grad for e in entries], [e.facts.out_dim for e in entries],
                         o["metric"], o["lam"], o["mix"], cache=cache, slot=slot, record=record)

    def fused(self, geometry, entries, update, cache, slot, retract: bool = False, record=None) -> None:
        o = geometry.opts
        channel_directed([e.grad for e in entries], [e.facts.out_dim for e in entries],
                         o["metric"], o["lam"], o["mix"], update=update,
                         weights=[e.param.detach() for e in entries],
                         states=[e.extra["states"] for e in entries],
                         first=[e.extra["first"] for e in entries], cache=cache, slot=slot, record=record)

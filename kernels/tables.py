"""Device-side tables that let one launch serve a whole bucket of tensors: layout, builder, cache,
and the @triton.jit accessors kernels read them with.

Every tensor a kernel touches is read as a 3-d array (A, O, B) with the output-channel dimension in
the middle: A = prod(shape[:dim]), O = shape[dim], B = prod(shape[dim + 1:]). Row o is the set of
A·B elements with that channel index, in any fixed order: all kernels here only need rows (or
groups of consecutive rows), and use the same column order for a parameter's gradient, weight and
optimizer state, so each *role* keeps its own strides (a transposed gradient next to a contiguous
weight is fine).

Table layout, one int64 row of NF = FIXED + 4·roles fields per tensor::

    A, O, B, GS (rows per unit), FLAG (per-tensor 0/1, e.g. "momentum buffer is new"),
    COUNTER (address of an int64 counter, 0 if none),
    then per role: address, stride of A, stride of O, stride of B

and a program map, int32 (programs, 2): (tensor index, tile or unit index within the tensor).

Tables are cached per *slot* (the identity of a bucket) and rebuilt only when the signature (the
tensors' addresses, shapes, strides and flags) changes, e.g. a gradient reallocated by
``zero_grad(set_to_none=True)`` or state replaced by ``load_state_dict``. Hyperparameters are not
in the table: they are kernel scalar arguments read at every step.

Under the Triton interpreter the addresses are host addresses of CPU tensors; on a GPU, device
addresses (the interpreter cannot follow device addresses, so it refuses CUDA tensors).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch
import triton
import triton.language as tl

FIXED = 6            # A, O, B, GS, FLAG, COUNTER
FIXED_FIELDS = tl.constexpr(FIXED)   # the same, for use inside @triton.jit code


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def rows_shape(shape: Sequence[int], dim: int) -> tuple[int, int, int]:
    """(A, O, B) of a tensor of `shape` read along `dim`; a 0-d tensor is (1, 1, 1)."""
    if len(shape) == 0:
        return 1, 1, 1
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])


def rows_strides(t: torch.Tensor, dim: int) -> tuple[int, int, int] | None:
    """Strides of `t` viewed as (A, O, B), or None when its memory layout cannot be viewed so
    (e.g. a channels_last weight read along dim 0); the caller then works on a contiguous copy."""
    a, o, b = rows_shape(t.shape, dim)
    try:
        return tuple(t.view(a, o, b).stride())
    except RuntimeError:
        return None


@dataclass
class Operand:
    """One tensor of a bucket: its role tensors (all of the same shape), read along `dim`.

    tensors: one per role, in the kernel's role order (None where a role is absent, e.g. no
    momentum buffer yet; the slot then points at a scratch tensor and the kernel never reads it).
    gs: rows per unit (psi); flag: per-tensor 0/1 flag; counter: int64 0-d tensor or None.
    """

    tensors: list[torch.Tensor | None]
    dim: int = 0
    gs: int = 1
    flag: int = 0
    counter: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        ref = next(t for t in self.tensors if t is not None)
        return rows_shape(ref.shape, self.dim)


class Staged:
    """Operands with non-viewable layouts replaced by contiguous copies, copied back by `finish`."""

    def __init__(self, operands: Sequence[Operand], written_roles: Sequence[int]):
        self.operands: list[Operand] = []
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for op in operands:
            tensors = []
            for role, t in enumerate(op.tensors):
                if t is not None and rows_strides(t, op.dim) is None:
                    tmp = t.contiguous()
                    if role in written_roles:
                        self._copies.append((t, tmp))
                    t = tmp
                tensors.append(t)
            self.operands.append(Operand(tensors, op.dim, op.gs, op.flag, op.counter))

    def finish(self) -> None:
        for original, tmp in self._copies:
            original.copy_(tmp)


def signature(operands: Sequence[Operand], programs: Sequence[int]) -> tuple:
    sig = []
    for op, n in zip(operands, programs):
        sig.append((op.dim, op.gs, op.flag, n, None if op.counter is None else op.counter.data_ptr()))
        for t in op.tensors:
            sig.append(None if t is None else (t.data_ptr(), tuple(t.shape), tuple(t.stride())))
    return tuple(sig)


def build_tables(operands: Sequence[Operand], programs: Sequence[int], n_roles: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(descriptor table int64 (n, NF), program map int32 (P, 2), P) on `device`."""
    nf = FIXED + 4 * n_roles
    rows, prog = [], []
    for index, (op, n) in enumerate(zip(operands, programs)):
        a, o, b = op.shape
        row = [a, o, b, op.gs, op.flag, 0 if op.counter is None else op.counter.data_ptr()]
        for t in op.tensors:
            if t is None:
                row += [0, 0, 0, 0]
            else:
                row += [t.data_ptr(), *rows_strides(t, op.dim)]
        rows.append(row)
        prog += [(index, j) for j in range(n)]
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, nf)
    pmap = torch.tensor(prog, dtype=torch.int32).reshape(-1, 2)
    if device.type != "cpu":
        table = table.pin_memory().to(device, non_blocking=True)
        pmap = pmap.pin_memory().to(device, non_blocking=True)
    return table, pmap, len(prog)


class TableCache:
    """The last table built for each slot, reused while its signature holds."""

    def __init__(self):
        self._entries: dict[Hashable, tuple[tuple, tuple]] = {}
        self.builds = 0

    def get(self, slot: Hashable, sig: tuple, build: Callable[[], tuple]) -> tuple:
        hit = self._entries.get(slot)
        if hit is not None and hit[0] == sig:
            return hit[1]
        value = build()
        self.builds += 1
        self._entries[slot] = (sig, value)
        return value

    def __len__(self) -> int:
        """Slots with a cached table."""
        return len(self._entries)


def bucket_dtype(operands: Sequence[Operand]) -> torch.dtype:
    """The one dtype and device all tensors of a bucket must share (a ValueError otherwise)."""
    tensors = [t for op in operands for t in op.tensors if t is not None]
    if len({t.dtype for t in tensors}) > 1:
        raise ValueError(f"all tensors of a bucket must share one dtype, got {sorted({str(t.dtype) for t in tensors})}")
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"all tensors of a bucket must be on one device, got {sorted({str(t.device) for t in tensors})}")
    return tensors[0].dtype


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the bucket's."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def prepare(operands: Sequence[Operand], programs_of: Callable[[Operand], int], n_roles: int,
            cache: TableCache | None, slot: Hashable) -> tuple[list[Operand], torch.Tensor, torch.Tensor, int]:
    """Drop zero-size operands, count programs, and fetch (or build) the tables.

    Returns (operands kept, table, program map, number of programs)."""
    kept = [op for op in operands if math.prod(op.shape) > 0]
    programs = [programs_of(op) for op in kept]
    if not kept or sum(programs) == 0:
        return kept, None, None, 0
    device = next(t for t in kept[0].tensors if t is not None).device

    def build():
        return build_tables(kept, programs, n_roles, device)

    if cache is None:
        table, pmap, n = build()
    else:
        table, pmap, n = cache.get(slot, signature(kept, programs), build)
    return kept, table, pmap, n


# ---- device side: a tile of a tensor's roles (0 grad, 1 weight, 2 and 3 optimizer state) ------------
@triton.jit
def role_ptrs(row, ROLE: tl.constexpr, DT: tl.constexpr, a, o, b):
    """Pointers to elements (a, o, b) of role ROLE of the tensor described by table row `row`."""
    field = row + FIXED_FIELDS + 4 * ROLE
    ptr = tl.load(field).to(tl.pointer_type(DT))
    return ptr + a * tl.load(field + 1) + o * tl.load(field + 2) + b * tl.load(field + 3)


@triton.jit
def load_states(row, a, o, b, mask, w, w_p, DT: tl.constexpr, N_STATE: tl.constexpr):
    """The optimizer state tiles (roles 2, 3) in fp32 and their pointers; absent ones are (w, w_p),
    placeholders that are never stored through."""
    s1 = w
    s2 = w
    s1_p = w_p
    s2_p = w_p
    if N_STATE >= 1:
        s1_p = role_ptrs(row, 2, DT, a, o, b)
        s1 = tl.load(s1_p, mask=mask, other=0.0).to(tl.float32)
    if N_STATE >= 2:
        s2_p = role_ptrs(row, 3, DT, a, o, b)
        s2 = tl.load(s2_p, mask=mask, other=0.0).to(tl.float32)
    return s1, s2, s1_p, s2_p


@triton.jit
def store_states(s1, s2, s1_p, s2_p, mask, DT: tl.constexpr, N_STATE: tl.constexpr):
    if N_STATE >= 1:
        tl.store(s1_p, s1.to(DT), mask=mask)
    if N_STATE >= 2:
        tl.store(s2_p, s2.to(DT), mask=mask)

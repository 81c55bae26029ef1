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
tensors' addresses, shapes, strides and flags) changes, e.g. state replaced by ``load_state_dict``.
Each launch is a ``Launch``, which the Triton backend's step plan keeps and runs again; a gradient
reallocated by ``zero_grad(set_to_none=True)`` then only has its address patched into the table
(``Launch.patch_grads``). Hyperparameters are not in the table: they are kernel scalar arguments
read at every step.

Under the Triton interpreter the addresses are host addresses of CPU tensors; on a GPU, device
addresses (the interpreter cannot follow device addresses, so it refuses CUDA tensors).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from types import ModuleType
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
    dense: bool = False              # set_layout: read through the kernels' contiguous, aligned path
    rows_dense: bool = False         # set_layout: described as (1, O, numel/O) (``dense_rows``)
    layout_known: bool = False       # set_layout already ran on these tensors (Staged knows it)

    def set_layout(self) -> None:
        """Choose how the kernels read this operand (``dense_rows``, ``aligned``)."""
        if self.layout_known:
            return
        self.layout_known = True
        tensors = [t for t in self.tensors if t is not None]
        a, o, b = self.shape
        self.rows_dense = dense_rows(tensors, self.dim)
        self.dense = self.rows_dense and aligned(tensors, a * b)

    @property
    def shape(self) -> tuple[int, int, int]:
        ref = next(t for t in self.tensors if t is not None)
        return rows_shape(ref.shape, self.dim)


class Staged:
    """Operands with non-viewable layouts replaced by contiguous copies, copied back by `finish`.

    Only a tensor that is neither in dense rows shared by all its roles (``dense_rows``) nor
    viewable as (A, O, B) is copied, e.g. a channels_last gradient next to a contiguous weight."""

    def __init__(self, operands: Sequence[Operand], written_roles: Sequence[int]):
        self.operands: list[Operand] = []
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.copied = False              # some tensor was staged: a recorded launch reads the copies
        for op in operands:
            tensors = []
            present = [t for t in op.tensors if t is not None]
            in_rows = dense_rows(present, op.dim)      # once per operand: it is the per-step hot spot
            for role, t in enumerate(op.tensors):
                if t is not None and not in_rows and rows_strides(t, op.dim) is None:
                    tmp = t.contiguous()
                    self.copied = True
                    if role in written_roles:
                        self._copies.append((t, tmp))
                    t = tmp
                tensors.append(t)
            staged = Operand(tensors, op.dim, op.gs, op.flag, op.counter)
            if in_rows:                                # nothing copied: the layout is known
                a, o, b = staged.shape
                staged.rows_dense, staged.dense = True, aligned(present, a * b)
                staged.layout_known = True
            self.operands.append(staged)

    def finish(self) -> None:
        for original, tmp in self._copies:
            original.copy_(tmp)


INDEX_LIMIT = 2 ** 31   # tensors the kernels take have fewer elements: every in-tensor index is int32


def dense_rows(tensors: Sequence[torch.Tensor], dim: int) -> bool:
    """True when all `tensors` share one memory layout that is dense, non-overlapping, with `dim` the
    outermost dimension: row o of every tensor is then the contiguous block [o·R, (o+1)·R) of its
    memory (R = numel / O), with the same element order in every role. Contiguous tensors read
    along dim 0 are, and so are channels_last weights (whose rows are permuted, identically in all
    roles): the kernels read them in place, without a staging copy."""
    ref = tensors[0]
    if any(tuple(t.stride()) != tuple(ref.stride()) or t.shape != ref.shape for t in tensors[1:]):
        return False
    if ref.dim() == 0:
        return ref.numel() == 1
    dims = sorted((d for d in range(ref.dim()) if ref.shape[d] > 1), key=lambda d: ref.stride(d))
    expected = 1
    for d in dims:
        if ref.stride(d) != expected:
            return False
        expected *= ref.shape[d]
    return ref.shape[dim] <= 1 or dims[-1] == dim


def aligned(tensors: Sequence[torch.Tensor], row: int) -> bool:
    """Every tensor's address is 16-byte aligned and `row` elements are a multiple of 16 bytes: a
    row (or unit) of `row` elements then starts on a 16-byte boundary, for 128-bit loads."""
    vec = 16 // tensors[0].element_size()
    return row % vec == 0 and all(t.data_ptr() % 16 == 0 for t in tensors)


def vector_width(dtype: torch.dtype) -> int:
    """Elements per 128-bit access."""
    return 16 // dtype.itemsize


def warps_for(tile: int, dense: bool, vec: int, vectors: int = 2) -> int:
    """Warps for a tile of `tile` elements: on the aligned path each thread holds `vectors` 128-bit
    vectors (vectors·vec elements) of every live array, on the strided path (one 64-bit pointer per
    element and role) 2·vectors elements; 4 to 16 warps."""
    per_thread = vectors * vec if dense else 2 * vectors
    return max(4, min(16, tile // (32 * per_thread)))


def signature(operands: Sequence[Operand], programs: Sequence[int]) -> tuple:
    sig = []
    for op, n in zip(operands, programs):
        sig.append((op.dim, op.gs, op.flag, n, op.dense, op.rows_dense, None if op.counter is None else op.counter.data_ptr()))
        for t in op.tensors:
            sig.append(None if t is None else (t.data_ptr(), tuple(t.shape), tuple(t.stride())))
    return tuple(sig)


def build_tables(operands: Sequence[Operand], programs: Sequence[int], n_roles: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(descriptor table int64 (n, NF), program map int32 (P, 2), P) on `device`.

    An operand in dense rows is described as (1, O, numel/O) with strides (0, numel/O, 1) in every
    role (whether or not it takes the aligned path)."""
    nf = FIXED + 4 * n_roles
    rows, prog = [], []
    for index, (op, n) in enumerate(zip(operands, programs)):
        a, o, b = op.shape
        if op.rows_dense:
            a, b = 1, a * b
        row = [a, o, b, op.gs, op.flag, 0 if op.counter is None else op.counter.data_ptr()]
        for t in op.tensors:
            if t is None:
                row += [0, 0, 0, 0]
            elif op.rows_dense:
                row += [t.data_ptr(), 0, b, 1]
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


_PATCHED = ("patched",)     # the signature of a patched table: equal to no real one


class TableCache:
    """The last table built for each slot, reused while its signature holds."""

    def __init__(self):
        self._entries: dict[Hashable, tuple[tuple, tuple]] = {}
        self.builds = 0
        self.patches = 0     # tables whose gradient addresses were patched in place (Launch.patch_grads)

    def get(self, slot: Hashable, sig: tuple, build: Callable[[], tuple]) -> tuple:
        hit = self._entries.get(slot)
        if hit is not None and hit[0] == sig:
            return hit[1]
        value = build()
        self.builds += 1
        self._entries[slot] = (sig, value)
        return value

    def invalidate(self, slot: Hashable) -> None:
        """A slot's table was patched by its owner (``Launch.patch_grads``): its signature no longer
        describes it, so the next ``get`` builds anew. The slot stays counted."""
        hit = self._entries.get(slot)
        if hit is not None:
            self._entries[slot] = (_PATCHED, hit[1])

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
    too_big = [tuple(t.shape) for t in tensors if t.numel() >= INDEX_LIMIT]
    if too_big:
        raise ValueError(f"the kernels index tensors with int32 and take fewer than 2^31 elements, got {too_big}")
    return tensors[0].dtype


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the bucket's."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launches(operands: Sequence[Operand], schedule_of: Callable[[Operand], Hashable],
             programs_of: Callable[[Operand, Hashable], int], n_roles: int, cache: TableCache | None,
             slot: Hashable) -> list[tuple[Hashable, torch.Tensor, torch.Tensor, int, list[int], Hashable]]:
    """Split a bucket into size classes and fetch (or build) each class's tables.

    Zero-size operands are dropped; the others are grouped by ``schedule_of(op)`` (layout and size
    class: what the launch's constexprs fix), so that one tensor's shape never decides another's
    block sizes. Returns [(schedule, table, program map, number of programs, the operands' indices
    in table row order, the cache key)], one per launch."""
    classes: dict[Hashable, list[int]] = {}
    for index, op in enumerate(operands):
        if math.prod(op.shape) > 0:
            classes.setdefault(schedule_of(op), []).append(index)
    out = []
    for schedule, indices in classes.items():
        ops = [operands[i] for i in indices]
        programs = [programs_of(op, schedule) for op in ops]
        if sum(programs) == 0:
            continue
        device = next(t for t in ops[0].tensors if t is not None).device

        def build(ops=ops, programs=programs):
            return build_tables(ops, programs, n_roles, device)

        if cache is None:
            table, pmap, n = build()
        else:
            table, pmap, n = cache.get((slot, schedule), signature(ops, programs), build)
        out.append((schedule, table, pmap, n, indices, (slot, schedule)))
    return out


@dataclass
class Launch:
    """One kernel launch of a bucket's size class, kept so that a later step can run it again.

    The kernel is looked up by name in its module at every run (so a stub swapped in there is
    honoured); ``scalars`` are the hyperparameter arguments (``optim_updates.kernel_args``), which
    a replay may replace; ``rows`` are the indices, in the launcher's argument lists, of the
    tensors the table's rows describe, and ``grad_role`` the role holding their gradients (None
    when the launch reads none). ``patch_grads`` writes new gradient addresses into the table."""

    module: ModuleType
    kernel: str
    n: int
    table: torch.Tensor
    pmap: torch.Tensor
    args: tuple
    kwargs: dict
    scalars: dict
    rows: list[int]
    grad_role: int | None = None
    dense: list[bool] = field(default_factory=list)   # per row: read through the aligned path
    cache: TableCache | None = None
    cache_key: Hashable = None
    shared: bool = True              # the table is (still) the cache's entry for cache_key

    def run(self, scalars: dict | None = None) -> None:
        kernel = getattr(self.module, self.kernel)
        with device_guard(self.table.device):
            kernel[(self.n,)](self.table, self.pmap, *self.args, **(self.scalars if scalars is None else scalars),
                              **self.kwargs)

    def patch_grads(self, grads: Sequence[torch.Tensor]) -> None:
        """New gradient addresses (``grads`` indexed like the launcher's lists) into the table,
        one host-to-device copy, no Python loop over elements. The caller checked that every new
        gradient has the old one's strides (and alignment where ``dense``)."""
        column = torch.tensor([grads[i].data_ptr() for i in self.rows], dtype=torch.int64)
        if self.table.device.type != "cpu":
            column = column.pin_memory().to(self.table.device, non_blocking=True)
        self.table[:, FIXED + 4 * self.grad_role] = column
        if self.cache is not None:
            self.cache.patches += 1
            if self.shared:                 # the cache's entry still is this table: mark it patched, once
                self.cache.invalidate(self.cache_key)
                self.shared = False


def launch_all(module: ModuleType, kernel: str, classes, args: tuple, scalars: dict, kwargs_of: Callable,
               operands: Sequence[Operand], grad_role: int | None, cache: TableCache | None,
               record: list | None) -> None:
    """Run one launch per size class (``classes``: what ``launches`` returns), each kernel called
    with ``kwargs_of(schedule, table)`` as its constexprs; append each Launch to ``record`` when given."""
    for s, table, pmap, n, rows, cache_key in classes:
        launch = Launch(module, kernel, n, table, pmap, args, kwargs_of(s, table), scalars, rows, grad_role,
                        [operands[i].dense for i in rows], cache, cache_key)
        launch.run()
        if record is not None:
            record.append(launch)


def recorder(record: list | None, staged: Staged) -> list | None:
    """Where the launches are recorded: a staged copy is made anew at every call, so launches that
    read one cannot be repeated; they are marked by a None in ``record``."""
    if record is not None and staged.copied:
        record.append(None)
        return None
    return record

# ---- device side: a tile of a tensor's roles (0 grad, 1 weight, 2 and 3 optimizer state) ------------
@triton.jit
def role_ptrs(row, ROLE: tl.constexpr, DT: tl.constexpr, start, offs, a, o, b, DENSE: tl.constexpr):
    """Pointers to a tile of role ROLE of the tensor described by table row `row`.

    DENSE: elements start + offs of the tensor's memory (start int64 scalar, offs int32; the base
    is 16-byte aligned, which the launcher checked: 128-bit loads where offs is contiguous).
    Otherwise the elements (a, o, b) of its (A, O, B) view, through the role's strides."""
    field = row + FIXED_FIELDS + 4 * ROLE
    ptr = tl.load(field).to(tl.pointer_type(DT))
    if DENSE:
        p = tl.multiple_of(ptr, 16) + start + offs
    else:
        p = ptr + a * tl.load(field + 1) + o * tl.load(field + 2) + b * tl.load(field + 3)
    return p


@triton.jit
def load_states(row, start, offs, a, o, b, mask, w, w_p, DT: tl.constexpr, N_STATE: tl.constexpr,
                DENSE: tl.constexpr):
    """The optimizer state tiles (roles 2, 3) in fp32 and their pointers; absent ones are (w, w_p),
    placeholders that are never stored through."""
    s1 = w
    s2 = w
    s1_p = w_p
    s2_p = w_p
    if N_STATE >= 1:
        s1_p = role_ptrs(row, 2, DT, start, offs, a, o, b, DENSE)
        s1 = tl.load(s1_p, mask=mask, other=0.0).to(tl.float32)
    if N_STATE >= 2:
        s2_p = role_ptrs(row, 3, DT, start, offs, a, o, b, DENSE)
        s2 = tl.load(s2_p, mask=mask, other=0.0).to(tl.float32)
    return s1, s2, s1_p, s2_p


@triton.jit
def store_states(s1, s2, s1_p, s2_p, mask, DT: tl.constexpr, N_STATE: tl.constexpr):
    if N_STATE >= 1:
        tl.store(s1_p, s1.to(DT), mask=mask)
    if N_STATE >= 2:
        tl.store(s2_p, s2.to(DT), mask=mask)


class TorchStep:
    """A recorded call of a family that runs torch ops instead of a kernel, in the shape of ``Launch``
    so the Triton backend's step plan can replay it: ``run`` calls ``step`` on the bucket's current
    gradients (read from the parameters when it runs, so none is kept alive). ``reads_grads=False``
    for a step that needs none (a retraction): the plan then does not check them."""

    scalars: dict = {}

    def __init__(self, step, params, reads_grads: bool = True):
        self.step, self.params = step, params
        self.grad_role = 0 if reads_grads else None   # 0: it reads gradients; the plan checks ("patches") them

    def run(self, scalars=None) -> None:
        self.step([p.grad for p in self.params])

    def patch_grads(self, grads) -> None:
        """Nothing to patch: run reads the gradients from the parameters."""


_NEVER_SKIPPED: dict = {}


def never_skipped(device: torch.device) -> torch.Tensor:
    """A 0-d int32 0 on `device`, never written: the skip flag kernels read (psi's renormalisation,
    pom's statistics and retraction) when no step is skipped on the device (StepContext.skip)."""
    flag = _NEVER_SKIPPED.get(device)
    if flag is None:
        flag = _NEVER_SKIPPED[device] = torch.zeros((), dtype=torch.int32, device=device)
    return flag

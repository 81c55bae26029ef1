"""A host-sync detector that needs no GPU: what in a step would make the host wait for the device.

On a GPU the host waits for the device whenever it needs a value the device computed: ``.item()``,
``float(t)``, ``bool(t)`` / ``if t:``, ``.tolist()``, ``.cpu()`` / ``.numpy()``, and ops whose
*output shape* depends on the data (``nonzero``, boolean-mask indexing ``x[mask]``, ``masked_select``,
``unique``). On CPU none of these costs anything, so a CPU run hides them. ``count_host_syncs`` runs a
step on CPU tensors under two torch modes that see exactly those calls:

* a ``TorchFunctionMode`` for the Python-level ones (``Tensor.item``, ``__bool__``, ``__float__``,
  ``tolist``, ``cpu``, ``numpy``, ...), which never reach the dispatcher as such;
* a ``TorchDispatchMode`` for the aten ops that sync inside C++ (``_local_scalar_dense``,
  ``is_nonzero``, ``equal``, ``nonzero``, boolean-mask ``index`` / ``index_put_``, ...), among them
  the linear-algebra ops that read their solver's error code on the host on a GPU
  (``_linalg_check_errors``, which does ``infos.any().item()``: ``torch.linalg.eigh`` / ``eigvalsh``,
  ``svd`` / ``svdvals``, ``eig``, ``cholesky``, ``inv``, ``solve``, ``lu_factor``, ``pinv``
  and the ``_ex`` forms called with ``check_errors=True``; torch's documentation says of these
  "When inputs are on a CUDA device, this function synchronizes that device with the CPU").
  ``torch.linalg.qr`` and the ``_ex`` forms with ``check_errors=False`` do not.

A custom operator (``torch.library.custom_op``) is opaque to a dispatch mode: the ops inside its
kernel run below it. The detector runs geomcompile's own operators (namespace ``geomcompile``) as
their Python functions under both modes, so what they call is seen; any other custom operator
counts as a possible sync (the detector cannot look inside).

``host`` names tensors that live on the host even in a GPU run (Adam's ``step`` is a CPU tensor for
CUDA parameters, as torch keeps it): reading those is not a sync and is not counted.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Tensor methods that hand a device value to Python.
_FUNCTION_SYNCS = {
    torch.Tensor.item: "Tensor.item()",
    torch.Tensor.__bool__: "bool(tensor)",
    torch.Tensor.__float__: "float(tensor)",
    torch.Tensor.__int__: "int(tensor)",
    torch.Tensor.__index__: "tensor used as a Python index",
    torch.Tensor.tolist: "Tensor.tolist()",
    torch.Tensor.numpy: "Tensor.numpy()",
    torch.Tensor.cpu: "Tensor.cpu()",
}
# aten ops that synchronise, or whose output shape depends on the values.
_DISPATCH_SYNCS = {
    "aten::_local_scalar_dense": "a scalar read (_local_scalar_dense)",
    "aten::is_nonzero": "bool(tensor) (is_nonzero)",
    "aten::equal": "torch.equal",
    "aten::nonzero": "nonzero (data-dependent shape)",
    "aten::nonzero_static": None,          # fixed shape: no sync
    "aten::masked_select": "masked_select (data-dependent shape)",
    "aten::_unique2": "unique (data-dependent shape)",
    "aten::unique_dim": "unique (data-dependent shape)",
    "aten::unique_consecutive": "unique_consecutive (data-dependent shape)",
    "aten::repeat_interleave": None,       # only with a tensor of repeats and no output_size; see below
    # Solvers whose CUDA kernels check their info on the host (at::_linalg_check_errors inside the op,
    # or called after it by the public function: then it is dispatched on its own).
    "aten::_linalg_check_errors": "a linear-algebra error check (_linalg_check_errors reads the info on the host)",
    "aten::_linalg_eigh": "torch.linalg.eigh / eigvalsh (reads the solver's info on the host on a GPU)",
    "aten::_linalg_svd": "torch.linalg.svd / svdvals (reads the solver's info on the host on a GPU)",
    "aten::linalg_eig": "torch.linalg.eig / eigvals (computed on the host for CUDA inputs)",
    "aten::linalg_pinv": "torch.linalg.pinv (an SVD / eigh, which read their info on the host on a GPU)",
}
# The public composites of those solvers, as a dispatch mode sees them when it is entered below
# autograd (inside a custom operator's function, see _custom_op_function): one entry each, so the
# op they decompose into is not counted twice.
_DISPATCH_SYNCS.update({f"aten::linalg_{op}": f"torch.linalg.{op} (reads the solver's info on the host on a GPU)"
                        for op in ("eigh", "eigvalsh", "svd", "svdvals", "cholesky", "inv", "solve", "lu_factor",
                                   "eigvals", "matrix_rank")})
# The _ex forms check (and sync) only when asked to: check_errors=True.
_EX_SOLVERS = ("aten::linalg_cholesky_ex", "aten::linalg_inv_ex", "aten::_linalg_solve_ex",
               "aten::linalg_lu_factor_ex", "aten::linalg_ldl_factor_ex")
_MASK_DTYPES = (torch.bool, torch.uint8)


@dataclass
class SyncLog:
    """What synchronised: one (what, where) per event, where = the innermost frame of our package."""

    events: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.events)

    def summary(self) -> str:
        from collections import Counter
        counts = Counter(self.events)
        return "; ".join(f"{n}x {what} at {where}" for (what, where), n in counts.most_common())


def _where() -> str:
    """file:line of the innermost frame outside torch and this module (the code that asked)."""
    import traceback
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename
        if "/torch/" in f or f.endswith("bench/syncs.py") or "/contextlib.py" in f:
            continue
        return f"{f.rsplit('/geomcompile/', 1)[-1]}:{frame.lineno} ({frame.name})"
    return "?"


class _Host:
    """Identity set of host-resident tensors (tensors are not hashable by value)."""

    def __init__(self, tensors: Iterable[torch.Tensor]):
        self.ids = {id(t) for t in tensors}

    def __contains__(self, t) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self.ids


class _FunctionDetector(TorchFunctionMode):
    def __init__(self, log: SyncLog, host: _Host, muted: list):
        super().__init__()
        self.log, self.host, self.muted = log, host, muted

    def __torch_function__(self, func, types, args=(), kwargs=None):
        what = _FUNCTION_SYNCS.get(func)
        if what is None:
            return func(*args, **(kwargs or {}))
        if not (args and args[0] in self.host) and _on_device(args[0] if args else None):
            self.log.events.append((what, _where()))
        # float(t) also reaches the dispatcher (_local_scalar_dense): count it once, at the level
        # that names what the code wrote.
        self.muted[0] += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.muted[0] -= 1


class _DispatchDetector(TorchDispatchMode):
    def __init__(self, log: SyncLog, host: _Host, muted: list):
        super().__init__()
        self.log, self.host, self.muted = log, host, muted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inside = _custom_op_function(func)
        if inside is not None:           # run what the operator runs, seen by this mode
            with self:
                return inside(*args, **kwargs)
        if not self.muted[0]:
            what = _dispatch_sync(func, args, kwargs)
            if what is not None and not (args and args[0] in self.host):
                self.log.events.append((what, _where()))
        return func(*args, **kwargs)


_ATEN_LIKE = {"aten", "prim", "prims", "_c10d_functional", "c10d", "profiler", "debugprims"}


def _custom_op_function(func):
    """The Python function of one of geomcompile's custom operators, or None for any other op."""
    if getattr(func, "namespace", "aten") != "geomcompile":
        return None
    from torch._library import custom_ops
    opdef = custom_ops.OPDEFS.get(func._schema.name)
    return getattr(opdef, "_init_fn", None)


def _on_device(t) -> bool:
    return isinstance(t, torch.Tensor) and not t.is_meta


def _dispatch_sync(func, args, kwargs) -> str | None:
    name = func._schema.name
    if name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in _MASK_DTYPES for i in indices or ()):
            return f"boolean-mask indexing ({name[6:]}: data-dependent shape)"
        return None
    if name in _EX_SOLVERS:
        if kwargs.get("check_errors", False):
            return f"{name[6:]}(check_errors=True) (reads the solver's info on the host on a GPU)"
        return None
    if func.namespace not in _ATEN_LIKE:
        return f"custom operator {name} (the detector cannot see inside it)"
    if name == "aten::repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
            return "repeat_interleave with tensor repeats (data-dependent shape)"
        return None
    return _DISPATCH_SYNCS.get(name)


@contextlib.contextmanager
def detect_host_syncs(host: Iterable[torch.Tensor] = ()):
    """Context manager yielding a SyncLog of every host sync inside it (see the module docstring)."""
    from ..geometries import base
    log, known, muted = SyncLog(), _Host(host), [0]
    saved, base._CPU_STANDS_IN_FOR_DEVICE[0] = base._CPU_STANDS_IN_FOR_DEVICE[0], True   # the GPU's path
    try:
        with _FunctionDetector(log, known, muted), _DispatchDetector(log, known, muted):
            yield log
    finally:
        base._CPU_STANDS_IN_FOR_DEVICE[0] = saved


def count_host_syncs(step: Callable[[], object], host: Iterable[torch.Tensor] = ()) -> SyncLog:
    """Run step() once under the detector; the log of its host syncs."""
    with detect_host_syncs(host) as log:
        step()
    return log


def host_resident_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Optimizer state that torch keeps on the host for device parameters: the CPU ``step`` counters
    of Adam/AdamW/... (not capturable, not fused). Reading them is not a device sync."""
    out = []
    for group in optimizer.param_groups:
        if group.get("capturable") or group.get("fused"):
            continue
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                out.append(step)
    return out

"""Kernel launches replaced by no-ops: what is left of a Triton-backend step is its host path.

``stub_kernel_launches()`` swaps every ``@triton.jit`` kernel of ``geomcompile.kernels`` for an
object whose launch (``kernel[grid](...)``) only records the kernel's name and grid. The backend's
Python work (bucketing, tables, state, hiding gradients) runs exactly as it would on a GPU; the
device work does not. Used by ``geomcompile bench --host-overhead`` and by tests/test_host_sync.py.
"""
from __future__ import annotations

import contextlib


class _NoLaunch:
    """Stands in for a kernel: ``stub[grid](*args, **kwargs)`` records (name, grid) and returns None."""

    def __init__(self, name: str, record: list):
        self.name, self.record = name, record

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.record.append((self.name, grid))
        return launch


def _kernel_types() -> tuple[type, ...]:
    from triton.runtime.jit import JITFunction
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:          # a Triton without the interpreter
        return (JITFunction,)
    return (JITFunction, InterpretedFunction)


@contextlib.contextmanager
def stub_kernel_launches():
    """Within the block every geomcompile kernel launch is a no-op; yields the list of (kernel, grid)
    launches that would have run. The kernels are restored afterwards."""
    from ..runtime.triton_backend import _kernels
    types, launched, patched = _kernel_types(), [], []
    for module in _kernels():
        for name, value in list(vars(module).items()):
            if isinstance(value, types):
                patched.append((module, name, value))
                setattr(module, name, _NoLaunch(name, launched))
    try:
        yield launched
    finally:
        for module, name, value in patched:
            setattr(module, name, value)

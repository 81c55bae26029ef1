"""Optimizer wrappers: find the optimizer that owns the state and the step.

Hooks go on the *owner*: the torch.optim.Optimizer whose ``step`` updates the parameters and whose
``state`` holds their buffers. Known wrappers delegate to it:

==========================================  ====================  =====================================
wrapper                                     owner                 notes
==========================================  ====================  =====================================
torch ``ZeroRedundancyOptimizer``           ``.optim``            its load writes ``.optim.state`` itself
timm ``Lookahead``                          ``._base_optimizer``  never calls ``Optimizer.__init__``; its
                                                                  slow weights live in the owner's state
                                                                  (``lookahead_slow_buff``)
accelerate ``AcceleratedOptimizer``         ``.optimizer``
Lightning ``LightningOptimizer``            ``._optimizer``
==========================================  ====================  =====================================
"""
from __future__ import annotations

import torch

from ..errors import GeomCompileError

# Optimizer-state keys that hold a copy of the weight (they scale like the weight, whatever the
# geometry): timm Lookahead's slow weights.
WEIGHT_LIKE_STATE = frozenset({"lookahead_slow_buff"})

# (class name, attribute of the wrapped optimizer). Matched by name so none of these packages is imported.
_KNOWN = (("ZeroRedundancyOptimizer", "optim"), ("Lookahead", "_base_optimizer"),
          ("AcceleratedOptimizer", "optimizer"), ("LightningOptimizer", "_optimizer"))

# Optimizers that call the closure several times per step: the geometry would act on one of them only.
_MULTI_CLOSURE = ("LBFGS",)


def unwrap_optimizer(optimizer) -> tuple[torch.optim.Optimizer, list]:
    """(owner, wrappers from the outermost in). Raises GeomCompileError with the fix when the object
    is not an optimizer geomcompile can hook."""
    wrappers = []
    current = optimizer
    while True:
        inner = None
        for cls in type(current).__mro__:
            for name, attr in _KNOWN:
                if cls.__name__ == name and hasattr(current, attr):
                    inner = getattr(current, attr)
                    break
            if inner is not None:
                break
        if inner is None:
            break
        wrappers.append(current)
        current = inner
    if not isinstance(current, torch.optim.Optimizer):
        raise GeomCompileError(f"plan.install expects a torch.optim.Optimizer (or a known wrapper of one: "
                               f"{', '.join(n for n, _ in _KNOWN)}), got {type(current).__name__}")
    if not hasattr(current, "_optimizer_step_pre_hooks"):
        raise GeomCompileError(
            f"{type(current).__name__} is a torch.optim.Optimizer subclass whose __init__ never called "
            f"torch.optim.Optimizer.__init__, so it has no hook tables and geomcompile cannot install on it. "
            f"Fix: call super().__init__(params, defaults) in its __init__, or install on the optimizer it wraps")
    if type(current).__name__ in _MULTI_CLOSURE:
        raise GeomCompileError(
            f"{type(current).__name__} evaluates the closure several times per step; a geometry would act on "
            f"the first gradient only. geomcompile does not support it: use a first-order optimizer "
            f"(SGD, Adam, AdamW, RMSprop, ...)")
    return current, wrappers

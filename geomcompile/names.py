"""Canonical parameter names: the names of the user's own module, whatever wraps it.

``torch.compile(model)`` names its parameters ``_orig_mod.*``, DDP / DataParallel ``module.*``,
FSDP1 ``_fsdp_wrapped_module.*`` and activation checkpointing ``_checkpoint_wrapped_module.*``.
Policies, reports and saved geometry state use the names without them (as
torch.distributed.checkpoint does), so compiled, DDP and eager runs share one layout.
"""
from __future__ import annotations

from torch import nn

# (wrapper class name, attribute holding the wrapped module); matched by name, nothing is imported.
_WRAPPERS = (("OptimizedModule", "_orig_mod"), ("DistributedDataParallel", "module"),
             ("DataParallel", "module"), ("FullyShardedDataParallel", "_fsdp_wrapped_module"),
             ("CheckpointWrapper", "_checkpoint_wrapped_module"))
# Components that only wrappers insert anywhere in a name ("module" alone may be a user's own name).
_INNER = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def unwrap_model(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """(the innermost user module, the wrapper class names peeled, outermost first)."""
    peeled = []
    while True:
        for cls_name, attr in _WRAPPERS:
            if any(c.__name__ == cls_name for c in type(model).__mro__) and isinstance(getattr(model, attr, None), nn.Module):
                peeled.append(type(model).__name__)
                model = getattr(model, attr)
                break
        else:
            return model, peeled


def canonical_name(name: str, wrapped_by_ddp: bool = False) -> str:
    """A parameter name from outside (a state-dict key, a glob) without wrapper components. A leading
    ``module.`` is stripped only when the caller knows a DDP/DataParallel wrapper put it there."""
    parts = [p for p in name.split(".") if p not in _INNER]
    if wrapped_by_ddp and parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def canonical_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its canonical name, from the unwrapped module (exact, not string-stripped)."""
    inner, _ = unwrap_model(model)
    return {id(p): canonical_name(n) for n, p in inner.named_parameters()}

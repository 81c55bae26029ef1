"""Canonical parameter names: the names a model's parameters have without its wrappers.

torch.compile, DDP/DataParallel, FSDP1 and activation checkpointing wrap a module and put a
component into every name below them (``_orig_mod.``, ``module.``, ``_fsdp_wrapped_module.``,
``_checkpoint_wrapped_module.``). geomcompile analyses, plans and reports in the names of the
user's own module, so a plan, a policy and a checkpoint mean the same parameter whether the model
was wrapped or not.

Names computed from a model are exact: a component is dropped only when its parent module *is* a
wrapper and the component is the attribute that wrapper keeps the wrapped module in (the way
``torch.distributed.checkpoint``'s ``_get_fqns`` walks the model). A user submodule called
``module`` is left alone. ``canonical_name(str)`` is for names that come from outside, without the
model (policy globs, state-dict keys), and has to guess; see its docstring.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

# Components that only wrappers put into names; safe to strip wherever they appear in a string.
WRAPPER_COMPONENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
# DDP / DataParallel's component: also a plausible user name, so stripped from strings only in front.
DDP_COMPONENT = "module"


def _wrapper_types() -> list[tuple[type, str, str]]:
    """(wrapper type, attribute holding the wrapped module, description), for what this torch has."""
    found: list[tuple[type, str, str]] = []
    try:
        from torch._dynamo.eval_frame import OptimizedModule
        found.append((OptimizedModule, "_orig_mod", "torch.compile"))
    except ImportError:       # a torch without dynamo
        pass
    found.append((nn.parallel.DistributedDataParallel, "module", "DistributedDataParallel"))
    found.append((nn.DataParallel, "module", "DataParallel"))
    if torch.distributed.is_available():
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel
            found.append((FullyShardedDataParallel, "_fsdp_wrapped_module", "FullyShardedDataParallel"))
        except ImportError:
            pass
        try:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper
            found.append((ActivationWrapper, "_checkpoint_wrapped_module", "checkpoint_wrapper"))
        except ImportError:
            pass
    return found


_WRAPPERS = _wrapper_types()


def wrapped_attr(module: nn.Module) -> str | None:
    """The attribute a wrapper keeps its wrapped module in, or None when `module` is no wrapper."""
    for cls, attr, _ in _WRAPPERS:
        if isinstance(module, cls) and isinstance(module._modules.get(attr), nn.Module):
            return attr
    return None


def is_compiled(module: nn.Module) -> bool:
    """Whether `module` is the wrapper torch.compile returns (an OptimizedModule)."""
    return any(desc == "torch.compile" and isinstance(module, cls) for cls, _, desc in _WRAPPERS)


def unwrap_one(module: nn.Module) -> nn.Module | None:
    """The module directly inside a wrapper, or None when `module` is no wrapper."""
    attr = wrapped_attr(module)
    return module._modules[attr] if attr is not None else None


def unwrap_model(model: nn.Module) -> tuple[nn.Module, str]:
    """Peel torch.compile, DDP/DataParallel, FSDP1 and checkpoint wrappers off the root, repeatedly.

    Returns the innermost user module and a description of what was peeled, outermost first
    (e.g. "torch.compile > DistributedDataParallel"), or "" when `model` was not wrapped."""
    peeled = []
    while True:
        inner = unwrap_one(model)
        if inner is None:
            return model, " > ".join(peeled)
        peeled.append(next(desc for cls, _, desc in _WRAPPERS if isinstance(model, cls)))
        model = inner


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def canonical_module_names(model: nn.Module) -> dict[str, str]:
    """Every module path of `model` (as ``named_modules(remove_duplicate=False)`` spells it) ->
    its canonical path. A wrapper and the module it wraps get the same canonical path."""
    out: dict[str, str] = {}

    def walk(module: nn.Module, raw: str, canon: str) -> None:
        out[raw] = canon
        attr = wrapped_attr(module)
        for name, child in module._modules.items():
            if child is not None:
                walk(child, _join(raw, name), canon if name == attr else _join(canon, name))

    walk(model, "", "")
    return out


def canonical_named_parameters(model: nn.Module, remove_duplicate: bool = True
                               ) -> Iterator[tuple[str, nn.Parameter]]:
    """``named_parameters()`` of the unwrapped model, in the same order, with canonical names."""
    model, _ = unwrap_model(model)
    modules = canonical_module_names(model)
    seen: set[int] = set()
    for raw, p in nn.Module.named_parameters(model, remove_duplicate=False):  # not a wrapper's renaming
        if remove_duplicate:
            if id(p) in seen:
                continue
            seen.add(id(p))
        owner, _, local = raw.rpartition(".")
        yield _join(modules[owner], local), p


def canonical_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> canonical name (the first name of a shared parameter)."""
    return {id(p): name for name, p in canonical_named_parameters(model)}


def canonical_name(name: str) -> str:
    """A name from outside (state-dict key, policy glob) without wrapper components.

    ``_orig_mod``, ``_fsdp_wrapped_module`` and ``_checkpoint_wrapped_module`` are dropped wherever
    they appear: only wrappers use them. ``module`` is dropped only as a leading component, where
    DDP/DataParallel put it (``module.head.weight`` -> ``head.weight``); deeper down it is taken
    as the user's own name. Without the model this is a guess for a model whose own top-level
    submodule is called ``module``; names computed from a model (``canonical_names``) are exact.
    """
    parts = name.split(".")
    out: list[str] = []
    for i, part in enumerate(parts):
        if part in WRAPPER_COMPONENTS:
            continue
        if part == DDP_COMPONENT and not out and i < len(parts) - 1:   # never the last component
            continue
        out.append(part)
    return ".".join(out)


def starts_with_wrapper(name: str) -> bool:
    """Whether the first component of `name` is one a wrapper puts there."""
    first = name.split(".", 1)[0]
    return "." in name and (first in WRAPPER_COMPONENTS or first == DDP_COMPONENT)


def get_canonical_submodule(model: nn.Module, canonical: str) -> nn.Module:
    """The user module at a canonical path (the innermost one when wrappers share the path)."""
    model, _ = unwrap_model(model)
    names = canonical_module_names(model)
    found = None
    for raw, module in model.named_modules(remove_duplicate=False):
        if names[raw] == canonical:
            found = module            # later = deeper: the wrapped module wins over its wrapper
    if found is None:
        raise AttributeError(f"the model has no submodule {canonical!r}")
    return found


def short_list(names: list[str], n: int = 5) -> str:
    """The first n names, comma-separated, and how many more there are: for messages and notes."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")

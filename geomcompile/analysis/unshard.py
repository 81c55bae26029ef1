"""The analysis sees a model sharded by FSDP2 (``fully_shard``) as the unsharded model it is.

``fully_shard`` replaces every parameter by a ``DTensor`` sharded on dim 0. The module tree, the
names and the global shapes are unchanged, but running the model's ops on the captured graph
outside FSDP's own forward hooks mixes plain tensors and DTensors (``aten.convolution.default: got
mixed torch.Tensor and DTensor``). ``full_parameters`` asks FSDP to unshard every FSDP module for
the duration of the analysis (its own all-gather: every rank must call ``gc.plan`` at the same
point, as it does in an SPMD program), so the capture runs on plain full tensors, and reshards
them afterwards. Memory: the whole model is materialised on every rank while the analysis runs.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from ..errors import GeomCompileError
from ..runtime.distributed import is_sharded


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:          # a torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _hook_ids(fsdp: list[nn.Module]) -> set[int]:
    """Ids of FSDP's own forward hooks (its state keeps their handles; a group of modules sharded
    together has one handle per module)."""
    ids: set[int] = set()
    for module in fsdp:
        state = module._get_fsdp_state()
        for handle in (getattr(state, "_pre_forward_hook_handle", None), getattr(state, "_post_forward_hook_handle", None)):
            for h in getattr(handle, "handles", (handle,)):
                if h is not None and hasattr(h, "id"):
                    ids.add(h.id)
    return ids


@contextmanager
def _without_fsdp_hooks(model: nn.Module, fsdp: list[nn.Module]):
    """FSDP's forward hooks must not run while the capture calls submodules on their own: the first
    module to run forward becomes FSDP's root (a later forward through the real root then fails),
    and a child's post-forward would reshard its parameters mid-capture."""
    ids = _hook_ids(fsdp)
    saved = []
    for module in model.modules():
        for attr in ("_forward_pre_hooks", "_forward_hooks"):
            hooks = getattr(module, attr)
            if any(k in ids for k in hooks):
                saved.append((module, attr, hooks))
                setattr(module, attr, type(hooks)((k, v) for k, v in hooks.items() if k not in ids))
    try:
        yield
    finally:
        for module, attr, hooks in saved:
            setattr(module, attr, hooks)


@contextmanager
def full_parameters(model: nn.Module):
    """Within the block, FSDP2 modules hold their unsharded parameters (plain tensors of full shape)
    and FSDP's forward hooks are set aside."""
    fsdp = _fsdp_modules(model)
    if not fsdp:
        yield
        return
    for module in fsdp:
        module.unshard()
    try:
        left = [n for n, p in model.named_parameters() if is_sharded(p)]
        if left:
            raise GeomCompileError(
                f"{len(left)} parameter(s) are DTensors that fully_shard does not manage (e.g. tensor "
                f"parallel): {', '.join(left[:3])}{' ...' if len(left) > 3 else ''}; geomcompile analyses "
                f"and runs geometries on FSDP2 (fully_shard) and DDP models only. Fix: plan the model before "
                f"parallelising it, with gc.plan(model, ...) then plan.install(optimizer) afterwards")
        with _without_fsdp_hooks(model, fsdp):
            yield
    finally:
        for module in reversed(fsdp):
            module.reshard()

"""Keep averaged copies of a model consistent with function-preserving rescales.

psi renormalises a unit (w_u -> c·w_u) when its norm passes ``max_norm``; the network's function
is unchanged, but an exponential moving average of the weights (``torch.optim.swa_utils.AveragedModel``,
timm's ``ModelEmaV2/V3``, any module holding a copy) would average c·w_u with the old, unscaled
w_u and drift off the orbit (norm 1.00 vs 2.41 measured before this helper existed). ``follow``
rescales the copy's units by the same factors, right after each retraction:

    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    plan = gc.apply(model, "resnet", optimizer)
    gc.ema.follow(plan, ema)          # before training; returns a handle with .remove()

The averaged model's BatchNorm running statistics (AveragedModel with ``use_buffers=True``) are
rescaled with their channels as well, like the model's own.
"""
from __future__ import annotations

from torch import nn

from .errors import GeomCompileError
from .names import canonical_names
from .runtime import absorb


def _inner(averaged: nn.Module) -> nn.Module:
    """The module holding the averaged weights: AveragedModel.module, timm ModelEma*.module, or itself."""
    return averaged.module if isinstance(getattr(averaged, "module", None), nn.Module) else averaged


def follow(plan, averaged: nn.Module):
    """Rescale ``averaged``'s copies of the plan's parameters whenever the plan retracts them."""
    module = _inner(averaged)
    by_name = {name: p for p, name in ((p, n) for n, p in _named(module))}
    missing = [n for n in plan.assignments if plan.assignments[n] and n not in by_name]
    if missing:
        raise GeomCompileError(
            f"gc.ema.follow: the averaged model has no parameter named {missing[0]!r} (and {len(missing) - 1} "
            f"more); pass the averaged copy of the same model the plan was made for")

    def rescale(event) -> None:
        copy = by_name[event.name]
        copy.detach().mul_(event.scale.to(device=copy.device, dtype=copy.dtype))
        absorb.rescale_running_stats(module, event.facts, event.channel_factors.to(copy.device),
                                     dict(_named(module)))

    return plan.on_retract(rescale)


def _named(module: nn.Module):
    ids = canonical_names(module)
    return [(ids[id(p)], p) for _, p in module.named_parameters()]

"""Keep the eval-mode function when a retraction rescales a scale-invariant weight's channels.

A BatchNorm (or InstanceNorm with ``track_running_stats``) in training mode normalises with batch
statistics, so scaling the channels that reach it by c > 0 changes nothing. In eval mode it uses
``running_mean`` / ``running_var``, accumulated for the old scale: they must follow. The layer's
bias b rides unscaled into the normalisation (only through offset-preserving ops, or the analysis
would not have claimed invariance), so the channel that reached the norm as z = u + b becomes
c·u + b:

    mean' = c·(mean − b) + b,      var' = c²·var

The eval output (x − mean)/sqrt(var + eps) is then unchanged up to eps: with var' = c²·var the
relative effect of eps changes, as it does for batch statistics in training mode.

Which normalisations absorb a weight is read from the analysis (``facts.scale_invariant.normalizer``).
The rescale is applied only when it is provable: every absorbing normalisation with running
statistics must read exactly the layer's channels (its ``num_features`` equals the layer's output
channels, so the channels arrive at offset 0 — channel permutations, slices and partial ``cat``\\ s
break invariance in the analysis). Otherwise ``rescale_problem`` says why, and psi does not
renormalise that weight (the plan reports it).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..analysis.facts import ParamFacts

_RUNNING = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def absorbers(facts: ParamFacts) -> list[str]:
    """Qualified names of the normalisations that absorb the weight's scaling (from the analysis)."""
    inv = facts.scale_invariant
    if inv is None or not inv.normalizer:
        return []
    return [n.strip() for n in inv.normalizer.split(",") if n.strip()]


def _with_running_stats(model: nn.Module, facts: ParamFacts) -> list[tuple[str, nn.Module | None]]:
    out = []
    for name in absorbers(facts):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            out.append((name, None))
            continue
        if isinstance(module, _RUNNING) and module.track_running_stats and module.running_mean is not None:
            out.append((name, module))
    return out


def rescale_problem(facts: ParamFacts, model: nn.Module | None = None) -> str | None:
    """Why the running statistics behind this weight cannot be rescaled provably, or None."""
    if model is None or facts.scale_invariant is None:
        return None
    channels = facts.shape[facts.out_dim or 0] if facts.shape else 1
    for name, module in _with_running_stats(model, facts):
        if module is None:
            return f"its normalisation {name!r} is not a submodule of the model, so its running statistics cannot be found"
        if module.num_features != channels:
            return (f"{name} has {module.num_features} channels and the layer {channels}: where the layer's channels "
                    f"sit in it (behind a cat) is not known, so its running statistics could not follow a "
                    f"renormalisation and eval mode would change")
    return None


def has_running_stats(facts: ParamFacts, model: nn.Module | None = None) -> bool:
    return model is not None and bool(_with_running_stats(model, facts))


def rescale_running_stats(model: nn.Module, facts: ParamFacts, channel_factors: torch.Tensor,
                          params: Mapping[str, torch.Tensor] | None = None) -> None:
    """After the weight's output channels were multiplied by ``channel_factors`` (1.0 = unchanged),
    make the running statistics of every absorbing normalisation match. Tensor-only (no host sync)."""
    targets = [m for _, m in _with_running_stats(model, facts) if m is not None]
    if not targets:
        return
    bias = _bias_of(facts, params if params is not None else dict(model.named_parameters()))
    with torch.no_grad():
        for module in targets:
            mean, var = module.running_mean, module.running_var
            c = channel_factors.to(device=mean.device, dtype=torch.float32)
            b = bias.to(device=mean.device, dtype=torch.float32) if bias is not None else torch.zeros_like(c)
            mean.copy_((c * (mean.to(torch.float32) - b) + b).to(mean.dtype))
            var.copy_((c * c * var.to(torch.float32)).to(var.dtype))


def _bias_of(facts: ParamFacts, params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    if not facts.module:
        return None
    bias = params.get(f"{facts.module}.bias")
    return bias.detach() if bias is not None else None

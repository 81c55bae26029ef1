"""Keep the eval-mode function when a scale-invariant weight's output channels are rescaled.

Scaling output channel i of a layer by c_i > 0 (psi's renormalisation) leaves the training-mode
function unchanged, because the normalisations that absorb it use batch statistics. In eval mode
BatchNorm / InstanceNorm use running statistics, accumulated for the old scale. Write the
normaliser's input channel as z = u + b, with u the part that scales and b the layer bias that
reaches it unscaled (``Absorber.bias``; 0 without one). After the rescale z' = c·u + b, and running
statistics that describe z' are

    mean' = c·(mean − b) + b = mean + (c − 1)·(mean − b),      var' = c²·var.

Both are affine in every batch statistic that went into the average, with weights that sum to 1
(initial values included), so this holds for the exponential average (``momentum``) and the
cumulative average (``momentum=None``) alike; ``num_batches_tracked`` is left as it is.

eps: the eval output becomes (z' − mean')/sqrt(var' + eps) = (z − mean)/sqrt(var + eps/c²), so it is
unchanged up to eps, which is now weighed against a variance c² times smaller or larger. The
relative change is about (1/c² − 1)·eps/(2·var): the same inexactness the training-mode function
has with batch variances, and inherent to normalising with an eps.

Both functions are tensor-only (no Python branching on tensor values, no ``.item()``), so they can
run inside ``torch.compile(optimizer.step)``.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..analysis.facts import Absorber, ParamFacts
from ..errors import GeomCompileError
from ..geometries.base import compute_dtype
from .distributed import is_sharded


def rescale_problem(facts: ParamFacts) -> str | None:
    """Why the running statistics of this weight's absorbers cannot be rescaled (None when they can,
    including when there are none with running stats)."""
    if facts.absorbers is None:
        return facts.absorbers_reason or f"{facts.name}: the analysis recorded no absorbers"
    return None


def rescaled_running_stats(mean: torch.Tensor, var: torch.Tensor, factors: torch.Tensor,
                           bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure: running statistics of channels whose scaled part was multiplied by `factors`.

    mean' = mean + (c − 1)·(mean − b), var' = c²·var, exact where c == 1. Computed in float32
    (float64 for float64 buffers); returned in the buffers' dtypes.
    """
    dtype = compute_dtype(mean.dtype)
    c = factors.to(device=mean.device, dtype=dtype)
    m = mean.to(dtype)
    centred = m if bias is None else m - bias.detach().to(device=mean.device, dtype=dtype)
    new_mean = m + (c - 1) * centred
    new_var = var.to(dtype) * (c * c)
    return new_mean.to(mean.dtype), new_var.to(var.dtype)


def rescale_running_stats(model: nn.Module, facts: ParamFacts, channel_factors: torch.Tensor,
                          params: Mapping[str, torch.Tensor] | None = None) -> None:
    """Match the absorbers' running statistics to a weight whose output channels were rescaled.

    After the weight's output channels were multiplied by `channel_factors` (1-D, one per output
    channel of the layer, 1.0 where unchanged; a one-element tensor scales every channel), every
    absorbing normalisation with running statistics gets, on channels offset..offset+channels,
    mean' = c·(mean − b) + b and var' = c²·var (b: the layer bias entering that channel, 0 without
    bias), so the eval-mode function is unchanged up to eps (see the module docstring). Absorbers
    without running statistics (GroupNorm, LayerNorm, norms with ``track_running_stats=False``) are
    left alone. `params` maps names to parameters for reading the bias (default:
    ``dict(model.named_parameters())``; names it lacks, such as aliases, are looked up on the model).

    Raises GeomCompileError when ``rescale_problem(facts)`` names a problem, or when the factors
    do not have one entry per channel.
    """
    problem = rescale_problem(facts)
    if problem is not None:
        raise GeomCompileError(f"cannot rescale the running statistics behind {facts.name}: {problem}")
    running = [a for a in facts.absorbers if a.running_stats]
    if not running:
        return
    factors = channel_factors.reshape(-1)
    if params is None:
        params = dict(model.named_parameters())
    with torch.no_grad():
        for absorber in running:
            _rescale_one(model, absorber, _per_channel(factors, absorber, facts), params)


def _per_channel(factors: torch.Tensor, absorber: Absorber, facts: ParamFacts) -> torch.Tensor:
    if factors.numel() == 1:
        return factors.expand(absorber.channels)
    if factors.numel() != absorber.channels:
        raise GeomCompileError(
            f"rescale_running_stats for {facts.name}: channel_factors has {factors.numel()} entries, but the "
            f"layer has {absorber.channels} output channels; pass one factor per output channel (repeat a "
            f"group's factor over its channels) or a single factor for the whole tensor")
    return factors


def _rescale_one(model: nn.Module, absorber: Absorber, factors: torch.Tensor,
                 params: Mapping[str, torch.Tensor]) -> None:
    norm = model.get_submodule(absorber.module)
    mean, var = getattr(norm, "running_mean", None), getattr(norm, "running_var", None)
    if mean is None or var is None:
        return   # the module no longer keeps running statistics
    bias = None
    if absorber.bias is not None:
        bias = params[absorber.bias] if absorber.bias in params else model.get_parameter(absorber.bias)
        if is_sharded(bias):         # FSDP2: the statistics are replicated, the bias is sharded
            bias = bias.full_tensor()
    channels = slice(absorber.offset, absorber.offset + absorber.channels)
    new_mean, new_var = rescaled_running_stats(mean[channels], var[channels], factors, bias)
    mean[channels].copy_(new_mean)
    var[channels].copy_(new_var)


def has_running_stats(facts: ParamFacts) -> bool:
    """Whether a rescale of this weight has running statistics to follow (unknown absorbers count:
    the runtime must not let anything rescale such a weight behind their back)."""
    return facts.absorbers is None or any(a.running_stats for a in facts.absorbers)

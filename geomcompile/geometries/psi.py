"""PSI manifold (seed 003_e743018e4af99a60.txt, "Accelerating training of BatchNorm networks").

For a weight whose loss is invariant to positive rescaling of its units w_u (rows, groups of
rows, or the whole tensor, as the analysis found), the Riemannian gradient on the PSI manifold
is ‖w_u‖²·∇_{w_u} L (Proposition 2), and the retraction is R_W(Ξ) = W + Ξ (Proposition 3), so
PSI-SGD(M) is the base optimizer fed with ‖w_u‖²-scaled gradients (eqs. 9-11). Theorem 1: two
scale-equivalent starts (W, U) and (a·W, a·U) stay equivalent, W'_t = a·W_t.

Norms grow under these updates; a unit whose norm passes ``max_norm`` is rescaled to norm 1
after the step. That does not change the network's function, and the optimizer's state for the
unit is rescaled consistently (momentum-like buffers by the same factor, second moments by its
square), so the run continues as the same point of the PSI manifold.
"""
from __future__ import annotations

import math

import torch

from ..analysis.facts import ParamFacts
from ..findings import Finding
from ..runtime.distributed import copy_result, local
from .base import (Geometry, Option, Rescale, StepContext, Unit, compute_dtype, fit_dtype, host_reads_are_free,
                   positive, register, unless_skipped)


def _unit_view(t: torch.Tensor, unit: str, dim: int, group_size: int | None) -> torch.Tensor:
    """Reshape to (n_units, -1) in the compute dtype, units taken along `dim`."""
    t = t.movedim(dim, 0)
    t = t.to(compute_dtype(t.dtype))
    if unit == "row":
        return t.reshape(t.shape[0], -1)
    if unit == "group":
        if not group_size or t.shape[0] % group_size:
            raise ValueError(f"group unit needs group_size dividing {t.shape[0]}, got {group_size}")
        return t.reshape(t.shape[0] // group_size, -1)
    if unit == "tensor":
        return t.reshape(1, -1)
    raise ValueError(f"unknown PSI unit {unit!r}; expected row, group or tensor")


def _unit_norm_sq(weight: torch.Tensor, unit: str, dim: int, group_size: int | None) -> torch.Tensor:
    w = _unit_view(weight, unit, dim, group_size)
    return (w * w).sum(dim=1, keepdim=True)


def _expand_per_unit(values: torch.Tensor, like: torch.Tensor, unit: str, dim: int,
                     group_size: int | None) -> torch.Tensor:
    """Per-unit values (n_units, 1) -> a tensor broadcastable against `like` (original layout)."""
    moved = like.movedim(dim, 0)
    per_row = values.repeat_interleave(group_size, dim=0) if unit == "group" else values
    if unit == "tensor":
        return values.reshape([1] * like.dim())
    return per_row.reshape((moved.shape[0],) + (1,) * (like.dim() - 1)).movedim(0, dim)


def psi_grad(weight: torch.Tensor, grad: torch.Tensor, unit: str = "row", dim: int = 0,
             group_size: int | None = None) -> torch.Tensor:
    """Riemannian gradient on the PSI manifold: g_u = ‖w_u‖²·∇_u. Pure; fp32 math, grad's dtype out
    (a finite value beyond a float16 grad's range saturates, base.fit_dtype)."""
    if grad.numel() == 0:
        return grad.clone()
    if weight.shape != grad.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and grad {tuple(grad.shape)} differ in shape")
    norm_sq = _unit_norm_sq(weight, unit, dim, group_size)
    scale = _expand_per_unit(norm_sq, grad, unit, dim, group_size)
    return fit_dtype(grad.to(compute_dtype(grad.dtype)) * scale, grad.dtype)


def psi_renorm_factors(weight: torch.Tensor, max_norm: float, unit: str = "row", dim: int = 0,
                       group_size: int | None = None) -> torch.Tensor:
    """Per-unit factors (n_units, 1): 1/‖w_u‖ where ‖w_u‖ > max_norm (renormalise to 1), else 1.

    A unit with a NaN/Inf entry (its norm is not finite) keeps factor 1: rescaling it by 1/∞ = 0
    would zero its finite entries and its optimizer state; it stays as plain torch's step left it."""
    norm = _unit_norm_sq(weight, unit, dim, group_size).sqrt()
    renormalise = (norm > max_norm) & torch.isfinite(norm)
    return torch.where(renormalise, 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.ones_like(norm))


# ---- the sharded form (FSDP2: the parameter's local rows of dim 0, runtime/distributed.py) ---------
def sharded_unit_norm_sq(weight: torch.Tensor, unit: str, dim: int, group_size: int | None, shard,
                         complete: bool = True):
    """(‖w_u‖² of every unit (n_units,), the unit of every index along `dim` of the whole tensor) for
    the local shard `weight` of a parameter sharded on dim 0. A sharded program (a generator:
    ``sums, unit_of_all = yield from sharded_unit_norm_sq(...)``, runtime/distributed.py).

    Each rank sums its part of every unit into a vector of all units and the ranks add them up (one
    all-reduce of n_units numbers). Units of rows along the sharded dim 0 lie on one rank each, so
    ``complete=False`` skips the collective for them: the sums then hold for the local units only
    (what the gradient transform needs)."""
    n_all = shard.global_shape[dim]
    unit_of_all = torch.arange(n_all, device=weight.device)
    if unit == "row":
        n_units = n_all
    elif unit == "group":
        if not group_size or n_all % group_size:
            raise ValueError(f"group unit needs group_size dividing {n_all}, got {group_size}")
        unit_of_all, n_units = unit_of_all // group_size, n_all // group_size
    elif unit == "tensor":
        unit_of_all, n_units = torch.zeros_like(unit_of_all), 1
    else:
        raise ValueError(f"unknown PSI unit {unit!r}; expected row, group or tensor")
    unit_of = unit_of_all[shard.start:shard.stop] if dim == 0 else unit_of_all
    w = weight.movedim(dim, 0).to(compute_dtype(weight.dtype))
    w = w.reshape(unit_of.numel(), math.prod(w.shape[1:]))      # explicit: a rank may hold no rows
    sums = torch.zeros(n_units, dtype=w.dtype, device=w.device).index_add_(0, unit_of, (w * w).sum(dim=1))
    if complete or not units_are_rows(unit, dim, group_size):
        sums = yield shard.sum(sums)
    return sums, unit_of_all


def units_are_rows(unit: str, dim: int, group_size: int | None) -> bool:
    """Whether every PSI unit is one row along dim 0: then a dim-0 shard holds whole units."""
    return dim == 0 and (unit == "row" or (unit == "group" and group_size == 1))


def _local_along(values: torch.Tensor, like: torch.Tensor, dim: int, shard) -> torch.Tensor:
    """Values per index along `dim` of the whole tensor (n_all,) -> the local shard's, broadcastable
    against the local tensor `like`."""
    if dim == 0:
        values = values[shard.start:shard.stop]
    shape = [1] * like.dim()
    shape[dim] = -1
    return values.reshape(shape)


def psi_grad_sharded(weight: torch.Tensor, grad: torch.Tensor, unit: str, dim: int, group_size: int | None,
                     shard):
    """psi_grad on the local shards of a parameter sharded on dim 0: ‖w_u‖²·∇_u with the norms of
    whole units (all-reduced unless every unit is local). A sharded program returning the tensor."""
    sums, unit_of_all = yield from sharded_unit_norm_sq(weight, unit, dim, group_size, shard, complete=False)
    scale = _local_along(sums[unit_of_all], grad, dim, shard)
    return (grad.to(compute_dtype(grad.dtype)) * scale).to(grad.dtype)


# Optimizer state that scales like the gradient (power 1) or like its square (power 2) when a
# PSI unit is rescaled by c: the PSI gradient of c·w is c·(PSI gradient of w).
STATE_POWERS = {"momentum_buffer": 1, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2,
                "square_avg": 2, "grad_avg": 1, "acc_delta": 2, "sum": 2}

# Optimizers whose per-coordinate step normalisation cancels psi's ||w||^2 factor.
_ADAPTIVE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta,
             torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam)

RENORM_MARGIN = 1e-4   # compile fast path: flag units with norm > max_norm * (1 - margin) for the exact check


def psi_layout(facts: ParamFacts) -> tuple[str, int, int | None]:
    """(unit, dim, group_size) of a scale-invariant weight, as the psi functions take them."""
    inv = facts.scale_invariant
    return inv.unit, (facts.out_dim or 0), inv.group_size


def tensor_norm_values(tensors: list[torch.Tensor]) -> list[float]:
    """The 2-norm of every tensor, read as a Python float: one torch._foreach_norm per dtype, then a
    float() per tensor. For CPU tensors only, where reading a value costs nothing (a device tensor
    would make it a host sync per tensor). Half-precision tensors are summed in float32 (their own
    dtype would round the norm by up to 2^-8, far beyond RENORM_MARGIN)."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    norms: list = [None] * len(tensors)
    for dtype, index in by_dtype.items():
        wide = {"dtype": torch.float32} if dtype in (torch.float16, torch.bfloat16) else {}
        for i, n in zip(index, torch._foreach_norm([tensors[i] for i in index], 2, **wide)):
            norms[i] = float(n)
    return norms


def channel_factors(factors: torch.Tensor, like: torch.Tensor, unit: str, dim: int,
                    group_size: int | None) -> torch.Tensor:
    """Per-unit factors (n_units, 1) -> one factor per output channel (along `dim`) of `like`."""
    channels = like.shape[dim] if like.dim() else 1
    flat = factors.reshape(-1)
    if unit == "group":
        return flat.repeat_interleave(group_size)
    if unit == "tensor":
        return flat.expand(channels).clone()
    return flat


class CompiledPSI:
    """The compile fast path (protocol: runtime/compile_backend.Program): ‖w_u‖²·∇_u per unit; the
    renormalisation is flagged here and done, exactly, by psi's eager post_step."""

    name = "psi"
    uses_weights = True
    retracts = True

    def layout(self, geometry, facts):
        return psi_layout(facts)

    def transform(self, geometry, layouts, grads, weights):
        return [psi_grad(w, g, unit, dim, gs) for w, g, (unit, dim, gs) in zip(weights, grads, layouts)]

    def screen(self, geometry, layouts, weights):
        """needs_retraction's conservative screen: a unit's norm (row, group or the whole tensor) is at
        most its tensor's, so a tensor whose norm is at most the flagging threshold has no unit to
        renormalise. One multi-tensor norm instead of a per-unit pass, compared on the host (CPU
        tensors; on ResNet-20's 21 weights 0.105-0.110 ms against 0.133-0.154 ms when the norms were
        stacked and compared as tensors, medians of 300 interleaved calls); a non-finite tensor norm (NaN hides its units' norms, Inf may
        be overflow) is flagged."""
        near = geometry.opts["max_norm"] * (1.0 - RENORM_MARGIN)
        return [not norm <= near for norm in tensor_norm_values(weights)]

    def needs_retraction(self, geometry, layouts, weights):
        near = geometry.opts["max_norm"] * (1.0 - RENORM_MARGIN)
        return torch.stack([(psi_renorm_factors(w, near, unit, dim, gs) != 1).any()
                            for w, (unit, dim, gs) in zip(weights, layouts)])


@register
class PSI(Geometry):
    name = "psi"
    stage = "metric"
    shard_refusal = None      # sharded form: psi_grad_sharded, _post_step_sharded
    match_hint = "add `scale_invariant: true` to match"
    paper = "003_e743018e4af99a60.txt"
    incompatible = ("pom",)
    state_powers = STATE_POWERS
    hurt_by_weight_decay = True
    # the gradient transform touches only gradients; post_step's factors are 1 where ctx.skip is true,
    # so the branch-free rescale changes nothing and counts nothing (the Triton renormalisation kernel
    # reads the flag itself)
    honours_device_skip = True
    fast_paths = {"compile": "geomcompile.geometries.psi:CompiledPSI", "triton": "geomcompile.kernels.psi:PSIKernels"}
    options = {
        "max_norm": Option(float, 1.0e4, "units whose norm exceeds this are rescaled to norm 1 after "
                                         "the step (function unchanged)", check=positive),
    }

    def config_warnings(self) -> list[str]:
        # Renormalised units have norm 1. Below 1, that is already above max_norm. At exactly 1
        # the next step pushes it above too: the PSI gradient is orthogonal to w (scale
        # invariance), so a plain SGD step gives ||w - lr*g||^2 = 1 + lr^2 ||g||^2 > 1, and even
        # with g = 0 the renormalised norm may round to just above 1. Either way every unit is
        # renormalised at (nearly) every step, so both warn; any max_norm > 1 leaves room to grow.
        max_norm = self.opts["max_norm"]
        if max_norm < 1:
            return [f"max_norm = {max_norm}: units are renormalised to norm 1, which is above max_norm, so "
                    f"every unit is renormalised at every step; use max_norm > 1 (the default is 1e4)"]
        if max_norm == 1:
            return ["max_norm = 1: units are renormalised to norm 1 and a PSI step (orthogonal to the "
                    "weight) only grows the norm, so every unit is renormalised at nearly every step; use "
                    "max_norm > 1 (the default is 1e4)"]
        return []

    def check(self, facts: ParamFacts) -> str | None:
        if facts.scale_invariant is None:
            return (f"psi needs a scale-invariant weight, but the analysis found {facts.name} is not: "
                    f"{facts.invariance_reason or 'no normalisation absorbs its scale'}")
        return None

    def warnings(self, unit: Unit, ctx: StepContext) -> list[str]:
        out = []
        kind = type(ctx.optimizer).__name__
        if isinstance(ctx.optimizer, _ADAPTIVE):
            out.append(f"psi under {kind}: the optimizer's per-coordinate normalisation mostly cancels the "
                       f"||w||^2 scaling of the PSI gradient, so the update is close to plain {kind} and "
                       f"Theorem 1 of the paper (scale-equivalent runs stay equivalent) does not hold; PSI-SGD(M) "
                       f"is the paper's setting: use torch.optim.SGD (with momentum) for the psi parameters")
        for name in unit.names:
            wd = ctx.group_of[name].get("weight_decay", 0) if name in ctx.group_of else 0
            if wd:
                why = "which breaks the scale invariance PSI relies on"
                out.append(Finding(f"psi on {name}: its param group has weight_decay={wd}, {why}; put it "
                                   f"in a group with weight_decay=0", name=name, key=("psi", "weight_decay", wd),
                                   head="psi on ", tail=f" whose param group has weight_decay={wd}, {why}. Fix: "
                                   f"put them in their own param group with weight_decay=0 (plan.assignments "
                                   f"names them)"))
        return out

    def init_state(self, unit: Unit, ctx: StepContext) -> dict:
        device = ctx.params[unit.names[0]].device      # the counter counts the whole unit
        return {"renormalised": torch.zeros((), dtype=torch.int64, device=device)}

    def on_install(self, unit: Unit, state, ctx: StepContext) -> list[str]:
        from ..runtime.absorb import rescale_problem     # late: the runtime imports the geometries
        return [f"psi does not renormalise {f.name}: {why}" for f in unit.facts
                if (why := rescale_problem(f))]

    def shard_local(self, facts: ParamFacts) -> bool:
        return units_are_rows(*psi_layout(facts))

    def pre_step(self, unit: Unit, grads, state, ctx: StepContext) -> None:
        for facts, grad in zip(unit.facts, grads):
            if grad is None:
                continue
            u, dim, gs = psi_layout(facts)
            shard = ctx.shard(facts.name)
            if shard is not None:
                ctx.run_sharded(copy_result(local(grad), psi_grad_sharded(
                    local(ctx.params[facts.name]), local(grad), u, dim, gs, shard)))
                continue
            grad.copy_(psi_grad(ctx.params[facts.name].detach(), grad, u, dim, gs))

    def post_step(self, unit: Unit, state, ctx: StepContext) -> list[Rescale]:
        from ..runtime.absorb import rescale_problem
        events = []
        for facts in unit.facts:
            p = ctx.params[facts.name]
            if p.numel() == 0 or not ctx.has_grad(facts.name) or rescale_problem(facts):
                continue
            u, dim, gs = psi_layout(facts)
            if ctx.shard(facts.name) is not None:
                ctx.run_sharded(self._post_step_sharded(facts, p, state, ctx.shard(facts.name),
                                                        ctx.skip_on(local(p).device)))
                continue
            factors = unless_skipped(ctx.skip_on(p.device), 1.0,
                                     psi_renorm_factors(p.detach(), self.opts["max_norm"], u, dim, gs))
            if host_reads_are_free(p) and bool((factors == 1).all()):
                continue        # CPU: nothing to renormalise, and reading that costs nothing
            # On a device, branch-free, so no host sync: factors of 1 (the common case) change nothing,
            # bit for bit, in the weight, the optimizer state and the running statistics the event rescales.
            scale = _expand_per_unit(factors, p, u, dim, gs)
            p.detach().copy_((p.detach().to(scale.dtype) * scale).to(p.dtype))
            state["renormalised"] += (factors != 1).sum().to(state["renormalised"].device)
            events.append(Rescale(facts.name, p, facts, channel_factors(factors, p, u, dim, gs)))
        return events

    def _post_step_sharded(self, facts: ParamFacts, p, state, shard, skip=None) -> list[Rescale]:
        """The renormalisation on a shard: the norms of whole units (one all-reduce), so the decision
        and the factors of every output channel are the same on every rank; each rank rescales its
        rows, and the event carries the factors of all channels (running statistics are replicated).
        A sharded program returning the events."""
        u, dim, gs = psi_layout(facts)
        w = local(p)
        sums, unit_of_all = yield from sharded_unit_norm_sq(w, u, dim, gs, shard, complete=True)
        norm = sums.sqrt()
        factors = unless_skipped(skip, 1.0, torch.where(norm > self.opts["max_norm"],
                                                        1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny),
                                                        torch.ones_like(norm)))
        if host_reads_are_free(w) and bool((factors == 1).all()):
            return []           # CPU: as the unsharded post_step (the factors are replicated: ranks agree)
        # Branch-free like the unsharded post_step (no host sync): factors of 1 change nothing.
        channel = factors[unit_of_all]                # one factor per index along out_dim, every channel
        scale = _local_along(channel, w, dim, shard)
        w.copy_((w.to(scale.dtype) * scale).to(w.dtype))
        state["renormalised"] += (factors != 1).sum().to(state["renormalised"].device)
        return [Rescale(facts.name, p, facts, channel)]

    def diagnostics(self, unit: Unit, state) -> dict[str, float]:
        return {"renormalised_units": float(state.get("renormalised", 0))}

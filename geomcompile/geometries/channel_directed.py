"""Channel-directed gradients (seed 000_ce70f4ca5b877378.txt, Lao, Sundaramoorthi et al.).

The gradient f of a weight is read as an (O, R) matrix: O output channels (the weight's
``out_dim`` moved to the front), R everything else. The metric couples the O rows:

* re-weighted H0:  g = f̄ + (f − f̄)/lam               (f̄ = mean over the O rows, broadcast)
* Sobolev H1:      g = S f,  (S f)_o = (1/O) Σ_o' K(((o − o') mod O)/O) f_o'
                   K(d) = 1 + (d² − d + c)/(2·lam),  c = (1 − 1/O²)/6

The discrete c makes Σ_o K = O, so S preserves the mean over O exactly and O = 1 is the identity.
S is a circulant matrix; we never form it. With S0 = Σ f_o', S1 = Σ o' f_o', S2 = Σ o'² f_o' and
the prefix sums C0(o) = Σ_{o'≤o} f_o', C1(o) = Σ_{o'≤o} o' f_o' (derivation: for o' ≤ o,
d = e := (o − o')/O and d² − d = e² − e; for o' > o, d = e + 1 and d² − d = e² + e; so
d² − d = e² + e − 2e·[o' ≤ o]):

    (S f)_o = S0/O + [(o²S0 − 2o·S1 + S2)/O² + (o·S0 − S1)/O − 2(o·C0(o) − C1(o))/O + c·S0] / (2·lam·O)

which costs O(O·R) time and O(R) extra memory per moment. ``mix`` adds mix·f to either metric.
"""
from __future__ import annotations

import math

import torch

from ..analysis.facts import ParamFacts
from ..runtime.distributed import copy_result, local
from .base import (Geometry, Option, Range, Unit, StepContext, compute_dtype, fit_dtype, pass_nonfinite,
                   pass_nonfinite_sharded, register)


def _as_rows(grad: torch.Tensor, dim: int) -> torch.Tensor:
    """View the gradient as (O, R) in the compute dtype, output-channel dim first."""
    f = grad.movedim(dim, 0).to(compute_dtype(grad.dtype))
    return f.reshape(f.shape[0], -1)


def _from_rows(g: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    moved_shape = like.movedim(dim, 0).shape
    return fit_dtype(g.reshape(moved_shape).movedim(0, dim), like.dtype).contiguous()


def reweighted_h0(grad: torch.Tensor, lam: float, dim: int = 0, mix: float = 0.0) -> torch.Tensor:
    """g = f̄ + (f − f̄)/lam + mix·f. Pure: returns a new tensor of grad's shape and dtype."""
    if grad.numel() == 0:
        return grad.clone()
    f = _as_rows(grad, dim)
    mean = f.mean(dim=0, keepdim=True)
    g = mean + (f - mean) / lam
    if mix:
        g = g + mix * f
    return _from_rows(g, grad, dim)


def sobolev(grad: torch.Tensor, lam: float, dim: int = 0, mix: float = 0.0) -> torch.Tensor:
    """g = S f + mix·f with the circulant Sobolev kernel above, in O(O·R) via prefix sums."""
    if grad.numel() == 0:
        return grad.clone()
    f = _as_rows(grad, dim)
    O = f.shape[0]
    o = torch.arange(O, dtype=f.dtype, device=f.device).unsqueeze(1)   # (O, 1)
    of = o * f
    S0 = f.sum(dim=0, keepdim=True)                                     # (1, R)
    S1 = of.sum(dim=0, keepdim=True)
    S2 = (o * of).sum(dim=0, keepdim=True)
    C0 = f.cumsum(dim=0)                                                # (O, R)
    C1 = of.cumsum(dim=0)
    return _from_rows(_sobolev_rows(f, o, O, S0, S1, S2, C0, C1, lam, mix), grad, dim)


def _sobolev_rows(f, o, O: int, S0, S1, S2, C0, C1, lam: float, mix: float) -> torch.Tensor:
    """(S f)_o + mix·f_o for the rows o of f, from the sums over all O rows and the prefix sums."""
    c = (1.0 - 1.0 / O**2) / 6.0
    bracket = ((o * o * S0 - 2 * o * S1 + S2) / O**2 + (o * S0 - S1) / O
               - 2 * (o * C0 - C1) / O + c * S0)
    g = S0 / O + bracket / (2.0 * lam * O)
    if mix:
        g = g + mix * f
    return g


# ---- the sharded form (FSDP2: the gradient's local rows of dim 0, runtime/distributed.py) ----------
# With out_dim 0 the O rows are split over the ranks: the sums S0, S1, S2 are sums over ranks and
# the prefix sums C0, C1 continue from the earlier ranks' totals (both from one all-gather of three
# (1, R) rows per rank). With out_dim != 0 (conv-transpose) the shards split R, and both metrics act
# on every column alone: the transform is local.
def _local_rows(grad: torch.Tensor) -> torch.Tensor:
    """_as_rows for dim 0 with R explicit: a rank may hold no rows."""
    return grad.to(compute_dtype(grad.dtype)).reshape(grad.shape[0], math.prod(grad.shape[1:]))


def reweighted_h0_sharded(grad: torch.Tensor, lam: float, dim: int, mix: float, shard):
    """reweighted_h0 on the local shard of a gradient sharded on dim 0 (a sharded program returning
    the transformed shard, runtime/distributed.py)."""
    if dim != 0:
        return reweighted_h0(grad, lam, dim, mix)
    f = _local_rows(grad)
    mean = (yield shard.sum(f.sum(dim=0, keepdim=True))) / shard.global_shape[0]
    g = mean + (f - mean) / lam
    if mix:
        g = g + mix * f
    return _from_rows(g, grad, 0)


def sobolev_sharded(grad: torch.Tensor, lam: float, dim: int, mix: float, shard):
    """sobolev on the local shard of a gradient sharded on dim 0 (a rank may hold no rows); a sharded
    program returning the transformed shard."""
    if dim != 0:
        return sobolev(grad, lam, dim, mix)
    f = _local_rows(grad)
    O = shard.global_shape[0]
    o = shard.global_rows(f.device).to(f.dtype).unsqueeze(1)               # global row indices
    of = o * f
    mine = torch.stack([f.sum(dim=0), of.sum(dim=0), (o * of).sum(dim=0)])   # (3, R)
    before, total = yield from shard.exclusive_scan(mine)
    S0, S1, S2 = total[0:1], total[1:2], total[2:3]
    C0 = f.cumsum(dim=0) + before[0:1]
    C1 = of.cumsum(dim=0) + before[1:2]
    return _from_rows(_sobolev_rows(f, o, O, S0, S1, S2, C0, C1, lam, mix), grad, 0)


def sobolev_dense_reference(grad: torch.Tensor, lam: float, dim: int = 0, mix: float = 0.0) -> torch.Tensor:
    """The O(O²) definition with an explicit circulant matrix, in float64. For tests only."""
    f = grad.movedim(dim, 0).to(torch.float64)
    shape = f.shape
    f = f.reshape(shape[0], -1)
    O = f.shape[0]
    idx = torch.arange(O, dtype=torch.float64)
    d = torch.remainder(idx[:, None] - idx[None, :], O) / O
    c = (1.0 - 1.0 / O**2) / 6.0
    K = 1.0 + (d * d - d + c) / (2.0 * lam)
    g = K @ f / O + mix * f
    return g.reshape(shape).movedim(0, dim)


METRICS = {"h0": reweighted_h0, "sobolev": sobolev}
SHARDED_METRICS = {"h0": reweighted_h0_sharded, "sobolev": sobolev_sharded}


class CompiledChannelDirected:
    """The compile fast path (protocol: runtime/compile_backend.Program): reweighted_h0 / sobolev
    along each gradient's output-channel dim.

    Both metrics act on each column of the (O, R) matrix independently (means, sums and prefix
    sums run over O only), so gradients with the same O, dtype and device are concatenated along
    R and transformed by one call of the reference function. ResNet-20's 22 weights become 4
    groups: fewer, larger kernels, and about half the CPU compile time of one call per tensor.
    """

    name = "channel_directed"
    uses_weights = False
    retracts = False

    def layout(self, geometry, facts):
        return facts.out_dim

    def transform(self, geometry, layouts, grads, weights):
        metric, o = METRICS[geometry.opts["metric"]], geometry.opts
        groups: dict[tuple, list[int]] = {}
        for i, (g, dim) in enumerate(zip(grads, layouts)):
            groups.setdefault((g.shape[dim], g.dtype, g.device), []).append(i)
        out: list[torch.Tensor] = [None] * len(grads)  # type: ignore[list-item]
        for index in groups.values():
            rows = [grads[i].movedim(layouts[i], 0).reshape(grads[i].shape[layouts[i]], -1) for i in index]
            # non-finite entries pass through, the metric mixes only the finite ones (see ChannelDirected)
            new = pass_nonfinite(lambda f: metric(f, o["lam"], dim=0, mix=o["mix"]), torch.cat(rows, dim=1))
            for i, piece in zip(index, new.split([r.shape[1] for r in rows], dim=1)):
                moved = grads[i].movedim(layouts[i], 0)
                out[i] = piece.reshape(moved.shape).movedim(0, layouts[i])
        return out


@register
class ChannelDirected(Geometry):
    name = "channel_directed"
    stage = "metric"
    match_hint = "add `kind: [conv, conv_transpose, linear]` to match"
    shard_refusal = None      # sharded form: SHARDED_METRICS
    paper = "000_ce70f4ca5b877378.txt"
    honours_device_skip = True     # a gradient transform and nothing else: no post_step, no state
    fast_paths = {"compile": "geomcompile.geometries.channel_directed:CompiledChannelDirected",
                  "triton": "geomcompile.kernels.channel_directed:ChannelDirectedKernels"}
    options = {
        "metric": Option(str, "sobolev", "h0 (re-weighted H0) or sobolev (H1 along the output channel)",
                         choices=("h0", "sobolev")),
        "lam": Option(float, 1.0, "lambda > 0: smoothing strength (larger = closer to the channel mean)",
                      check=Range(0, 1e6, low_open=True, why_high="beyond it the metric is the channel mean to float32 precision")),
        "mix": Option(float, 0.0, "mix >= 0: adds mix * (Euclidean gradient)",
                      check=Range(0, 1e6, why_high="it would multiply the learning rate by more than a million")),
    }

    def config_warnings(self) -> list[str]:
        # g = f̄ + (f − f̄)/lam + mix·f is f itself when lam = 1 and mix = 0. (With mix > 0 it is
        # (1 + mix)·f, SGD with a larger learning rate; a choice a user may make on purpose.)
        o = self.opts
        if o["metric"] == "h0" and o["lam"] == 1.0 and o["mix"] == 0.0:
            return ["identical to plain SGD: re-weighted H0 with lam = 1 leaves the gradient unchanged; "
                    "set lam != 1 (e.g. 0.5) or use metric: sobolev"]
        return []

    def check(self, facts: ParamFacts) -> str | None:
        if facts.out_dim is None or len(facts.shape) < 2:
            return (f"channel_directed needs a weight with an output-channel dimension "
                    f"(conv, conv_transpose or linear); {facts.name} is kind {facts.kind!r} "
                    f"with shape {tuple(facts.shape)}")
        return None

    def shard_local(self, facts: ParamFacts) -> bool:
        return facts.out_dim != 0        # dim 0 then splits R: every column is transformed alone

    def pre_step(self, unit: Unit, grads, state, ctx: StepContext) -> None:
        # The metric mixes the rows of each column: a NaN/Inf entry would spread over its column. It
        # passes through instead (base.pass_nonfinite), so the weight becomes non-finite exactly where
        # plain torch's step would make it so.
        transform = METRICS[self.opts["metric"]]
        for facts, grad in zip(unit.facts, grads):
            if grad is None:
                continue
            shard = ctx.shard(facts.name)
            if shard is not None:
                g = local(grad)
                ctx.run_sharded(copy_result(g, pass_nonfinite_sharded(lambda f: SHARDED_METRICS[self.opts["metric"]](
                    f, self.opts["lam"], facts.out_dim, self.opts["mix"], shard), g)))
                continue
            grad.copy_(pass_nonfinite(
                lambda f: transform(f, self.opts["lam"], dim=facts.out_dim, mix=self.opts["mix"]), grad))

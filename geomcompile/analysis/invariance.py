"""Scale-invariance pass: a forward dataflow over the captured graph, in training mode.

Scaling output channel i of a layer by c_i > 0 is followed forward along EVERY path from the
layer's output. A path *absorbs* the scaling when it reaches a normalisation that removes it,
and *breaks* it anywhere else (see ``ops.py`` for which op is in which class and why). The
weight is invariant only if every path absorbs; the unit is the coarsest one over the paths:

* BatchNorm (batch statistics) / InstanceNorm normalise each channel on its own -> "row";
* GroupNorm normalises groups of consecutive channels together -> "group" (only when the
  layer's channels reach it unmixed: no cat or flatten in between);
* LayerNorm normalises a whole sample -> "tensor" (the layer's output must be all of its input);
* a layer that standardises its own weight per output filter (``standardize.py``) -> "row", with
  nothing to follow: its output does not see the scaling.

Permutes move the channel dim; flatten/reshape keep following it while it stays a dim of its own
(batch and token dims regrouped around it, ``_channel_kept``), and break where channels are split
or mixed with other dims.

The layer's bias is an unscaled per-channel constant (an *offset*). It survives linear
per-channel ops that keep per-channel constants constant, and is removed by BN/IN (they subtract
per-channel means). Anything else it meets first (ReLU, dropout, GroupNorm, LayerNorm) breaks
invariance. When unsure (unknown op, channel position unknown without shapes) the answer is
"not invariant" with the reason; the pass never claims an invariance it cannot show.

The same walk records, for an invariant weight, every normalisation that absorbs it
(``facts.absorbers``): where the layer's channel 0 lands in the normaliser's channel dimension
(behind ``cat``), whether the layer's bias reaches it, and whether it keeps running statistics,
which describe the old scale and must be rescaled with the weight (``runtime/absorb.py``). Where
a path does not show that record (a channel position that needs shapes, a channel spread over
several features by flatten, a bias scaled on the way, a normaliser whose running statistics
also see other tensors), ``absorbers`` is None and ``absorbers_reason`` says why; the invariance
claim itself does not depend on it.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..capture import Captured
from .facts import UNITS, Absorber, ParamFacts, ScaleInvariance
from .layout import Use, _get_attr
from .ops import RESHAPE_AS, _arg, classify


@dataclass(frozen=True)
class Signal:
    """How the scaled channels appear in a tensor on one path."""
    cdim: int                  # channel position: >= 0 from the front, < 0 from the back
    offset: bool               # an unscaled per-channel constant (the layer's bias) rides along
    whole: bool = True         # the tensor is all of the layer's output (no cat with others)
    plain: bool = True         # channels still one-to-one (no flatten / cat): GroupNorm may absorb
    path: str = ""             # for reasons: "conv1 -> relu -> add"
    at: int | None = 0         # index of the layer's channel 0 along the channel dim (None: unknown)
    bias: str | None = None    # the bias parameter riding along as the offset
    unproven: str = ""         # why this path's absorber record (at, bias) cannot be given


@dataclass(frozen=True)
class Absorbed:
    unit: str
    normalizer: str
    group_size: int | None = None
    node: fx.Node | None = None     # the normalisation op reached
    at: int | None = None
    bias: str | None = None
    running_stats: bool = False
    unproven: str = ""


class Broken(Exception):
    """Raised inside the walk with the reason a person reads."""


def analyze_invariance(facts: ParamFacts, uses: list[Use], cap: Captured) -> None:
    """Fill facts.scale_invariant / facts.invariance_reason for a conv / conv-transpose / linear weight."""
    facts.absorbers_reason = "not scale-invariant: absorbers are recorded only for scale-invariant weights"
    if facts.kind not in ("conv", "conv_transpose", "linear"):
        facts.invariance_reason = f"kind {facts.kind!r}: only conv, conv_transpose and linear weights are analysed"
        return
    walker = _Walker(cap)
    found: set[Absorbed] = set()
    try:
        for use in uses:
            if use.role != "weight":
                raise Broken(f"also used by {use.node.name} as {use.role}")
            if use.standardized:   # the layer normalises its own weight per filter: nothing to follow
                owner = facts.name.rpartition(".")[0] or use.node.name
                found.add(Absorbed("row", owner, node=use.node, at=0))
                continue
            has_bias, bias = _bias(use, cap)
            path = use.module or use.node.name
            sig = Signal(cdim=-1 if facts.kind == "linear" else 1, offset=has_bias, path=path, bias=bias,
                         unproven=f"the bias of {path} is not a parameter of the model" if has_bias and not bias
                         else "")
            found |= walker.follow_users(use.node, _resolve(sig, use.node))
    except Broken as why:
        facts.invariance_reason = f"not invariant: {why}"
        return
    if not found:
        facts.invariance_reason = "not invariant: its output does not reach the loss through any op we follow"
        return
    unit, group_size = _coarsest(found)
    if facts.kind == "conv_transpose" and facts.groups > 1 and unit != "tensor":
        unit, group_size = "tensor", None  # rows of a grouped conv-transpose are not slices along out_dim
    normalizer = ", ".join(sorted({a.normalizer for a in found}))
    reason = (f"every path from its output reaches {normalizer} "
              f"({'per channel' if unit == 'row' else 'per group' if unit == 'group' else 'per sample'}"
              f" normalisation) through positively homogeneous per-channel ops")
    if all(u.standardized for u in uses):
        reason = uses[0].standardized
    facts.scale_invariant = ScaleInvariance(unit, normalizer, reason, group_size)
    facts.invariance_reason = reason
    facts.absorbers, facts.absorbers_reason = _absorbers(found, _out_channels(facts), cap)


def _bias(use: Use, cap: Captured) -> tuple[bool, str | None]:
    """(the layer has a bias, its parameter name when it is a parameter)."""
    if use.module is not None:
        has = getattr(cap.modules[use.module], "bias", None) is not None
        return has, f"{use.module}.bias" if has else None
    args = list(use.node.args) + [None] * 3
    name = classify(use.node, cap.modules).name
    if name == "addmm":                  # torch.addmm(b, x, W): the bias comes first
        b = args[0]
    elif name in ("matmul", "mm"):       # x @ W: no bias
        b = None
    else:
        b = args[2] if args[2] is not None else use.node.kwargs.get("bias")
    if b is None:
        return False, None
    if isinstance(b, fx.Node) and b.op == "get_attr" and isinstance(_get_attr(cap, b.target), nn.Parameter):
        return True, b.target
    return True, None


def _out_channels(facts: ParamFacts) -> int:
    if facts.kind == "conv_transpose":   # weight (in, out / groups, *kernel)
        return facts.shape[1] * facts.groups
    return facts.shape[facts.out_dim]    # linear stored (in, out): out_dim 1


def _absorbers(found: set[Absorbed], channels: int, cap: Captured) -> tuple[tuple[Absorber, ...] | None, str]:
    """The absorber records of an invariant weight, or None and why they cannot be given."""
    problems = sorted({a.unproven for a in found if a.unproven})
    if problems:
        return None, "absorbers unknown: " + "; ".join(problems)
    records: dict[str, dict[fx.Node, set]] = {}
    for a in found:
        records.setdefault(a.normalizer, {}).setdefault(a.node, set()).add((a.at, a.bias))
    for module, per_call in records.items():
        running = [a for a in found if a.normalizer == module and a.running_stats]
        if not running:
            continue
        size = cap.modules[module].running_mean.shape[0]
        if any(a.at + channels > size for a in running):
            return None, (f"absorbers unknown: the layer's {channels} channels do not fit in the {size} "
                          f"channels of {module} where the analysis places them")
        calls = {n for n in cap.graph.nodes if n.op == "call_module" and n.target == module}
        first = next(iter(per_call.values()))
        if set(per_call) != calls or any(r != first for r in per_call.values()):
            return None, (f"absorbers unknown: {module} is called {len(calls)} times, not always on this "
                          f"layer's channels at the same place, and its running statistics mix those calls")
    out = {Absorber(a.normalizer, a.at, channels, a.bias, a.running_stats) for a in found}
    return tuple(sorted(out, key=lambda a: (a.module, a.offset))), ""


def _unprove(sig: Signal, why: str) -> Signal:
    """Keep following (the invariance does not depend on it) but mark the absorber record unknown."""
    return replace(sig, unproven=sig.unproven or why)


def _coarsest(found: set[Absorbed]) -> tuple[str, int | None]:
    unit = max((a.unit for a in found), key=UNITS.index)
    if unit != "group":
        return unit, None
    sizes = {a.group_size for a in found if a.unit == "group"}
    if len(sizes) != 1 or None in sizes:
        return "tensor", None  # different groupings: only a common factor for all rows is safe
    return "group", sizes.pop()


def _resolve(sig: Signal, node: fx.Node) -> Signal:
    """Use the node's shape (when known) to turn a from-the-back channel position into one from the front."""
    shape = node.meta.get("gc_shape")
    if shape is not None and sig.cdim < 0:
        return replace(sig, cdim=len(shape) + sig.cdim)
    return sig


class _Walker:
    def __init__(self, cap: Captured):
        self.cap = cap
        self.memo: dict[tuple[fx.Node, Signal], frozenset] = {}

    def follow_users(self, node: fx.Node, sig: Signal) -> frozenset:
        out: set[Absorbed] = set()
        for user in node.users:
            out |= self.step(node, user, sig)
        return frozenset(out)

    def step(self, src: fx.Node, node: fx.Node, sig: Signal) -> frozenset:
        key = (node, replace(sig, path=""))
        if key not in self.memo:
            self.memo[key] = self._step(src, node, sig)
        return self.memo[key]

    def _step(self, src: fx.Node, node: fx.Node, sig: Signal) -> frozenset:
        path = f"{sig.path} -> {node.target if node.op == 'call_module' else node.name}"
        if node.op == "output":
            raise Broken(f"{path}: reaches the model output")
        info = classify(node, self.cap.modules)
        if info.cls == "meta":
            return frozenset()  # x.size(), x.shape: no values flow
        if info.cls == "cat":
            return self._cat(src, node, sig, info, path)
        if info.cls == "unknown":
            raise Broken(f"{path}: {info.name} is not known to keep a per-channel scaling "
                         f"(residual add, product of tensors, non-homogeneous activation, slicing, "
                         f"permute, or an op the analyser does not know)")
        if info.name in RESHAPE_AS and info.data is not src:
            return frozenset()  # y.reshape_as(x): only the shape of x is read, no values flow
        if info.data is not src:
            raise Broken(f"{path}: enters {info.name} other than as its input tensor")
        if info.cls == "layer":
            raise Broken(f"{path}: feeds another layer ({info.name}) before any normalisation")
        if info.cls == "norm":
            return frozenset({self._absorb(node, sig, info, path)})
        if sig.offset and not info.keeps_offset:
            raise Broken(f"{path}: the layer's bias is not scaled with its weight and {info.name} does not "
                         f"keep it a per-channel constant (if a normalisation comes later, a layer without a bias "
                         f"would be scale-invariant there)")
        nxt = replace(sig, path=path)
        if sig.offset and info.name in ("mul", "div", "sum"):
            nxt = _unprove(nxt, f"at {_label(node)} the layer's bias is multiplied ({info.name}) before it reaches "
                                f"a normalisation, so the per-channel constant there is not the bias parameter")
        if info.cls == "flatten":
            nxt = self._flatten(node, nxt, info.extra["start"], info.extra["end"], path)
        elif info.cls == "reshape":
            nxt = self._reshape(src, node, nxt, info, path)
        elif info.cls == "permute":
            nxt = self._permute(node, nxt, info, path)
        elif info.cls == "reduce":
            nxt = self._reduce(node, nxt, info, path)
        return self.follow_users(node, _resolve(nxt, node))

    # -- channel bookkeeping --------------------------------------------------------------
    def _rank(self, node: fx.Node) -> int | None:
        shape = node.meta.get("gc_shape")
        return len(shape) if shape is not None else None

    def _front(self, sig: Signal, node: fx.Node, path: str) -> int:
        """Channel position from the front; raises when it needs a rank we do not know."""
        if sig.cdim >= 0:
            return sig.cdim
        rank = self._rank(node)
        if rank is None:
            raise Broken(f"{path}: the channel position needs tensor ranks; pass example_inputs")
        return rank + sig.cdim

    def _flatten(self, node, sig, start, end, path) -> Signal:
        c = self._front(sig, node.args[0], path)
        src_rank = self._rank(node.args[0])
        if start < 0 or end < 0:
            if src_rank is None and not (start >= 0 and end == -1):
                raise Broken(f"{path}: flatten with negative dims needs tensor ranks; pass example_inputs")
            start = start + src_rank if start < 0 else start
            end = end + src_rank if (end < 0 and src_rank is not None) else end
        if c < start:
            return replace(sig, cdim=c)
        if end >= 0 and c > end:   # batch / token dims before the channel merge: it stays a dim of its own
            return replace(sig, cdim=c - (end - start))
        nxt = replace(sig, cdim=start, plain=False)
        shape = node.args[0].meta.get("gc_shape")
        if start != c:
            return _unprove(nxt, f"at {_label(node)} flatten merges the channel dim with the dims before it")
        if shape is None or end < 0:
            return _unprove(nxt, f"at {_label(node)} how many features each channel becomes needs shapes; "
                                 f"pass example_inputs")
        return self._spread(nxt, node, shape[c + 1:end + 1])

    def _spread(self, sig: Signal, node: fx.Node, dims) -> Signal:
        """Channel c becomes features c*k .. c*k + k - 1, k = prod(dims): one-to-one only when k == 1."""
        k = 1
        for d in dims:
            k *= d
        if k == 1:
            return sig
        return _unprove(sig, f"at {_label(node)} each channel is spread over {k} features; running "
                             f"statistics are matched channel by channel only")

    def _reshape(self, src, node, sig, info, path) -> Signal:
        s_in, s_out = src.meta.get("gc_shape"), node.meta.get("gc_shape")
        if s_in is not None and s_out is not None:
            c = self._front(sig, src, path)
            if tuple(s_in) == tuple(s_out):
                return replace(sig, cdim=c)
            tail = 1
            for s in s_in[c:]:
                tail *= s
            if tuple(s_out[:c]) == tuple(s_in[:c]) and len(s_out) == c + 1 and s_out[c] == tail:
                return self._spread(replace(sig, cdim=c, plain=False), node, s_in[c + 1:])
            kept = _channel_kept(tuple(s_in), tuple(s_out), c)
            if kept is not None:
                return replace(sig, cdim=kept)
            raise Broken(f"{path}: {info.name} {tuple(s_in)} -> {tuple(s_out)} mixes or splits the channels")
        shape = info.extra["shape"]
        if sig.cdim == 1 and len(shape) == 2 and shape[1] == -1 and _is_batch_size(shape[0], src):
            return _unprove(replace(sig, plain=False),   # x.view(x.size(0), -1): flatten from dim 1
                            f"at {_label(node)} how many features each channel becomes needs shapes; "
                            f"pass example_inputs")
        raise Broken(f"{path}: {info.name} without known shapes; pass example_inputs")

    def _permute(self, node, sig, info, path) -> Signal:
        """A permute or transpose moves the channel dim and never mixes it with another."""
        c = self._front(sig, node.args[0], path)
        rank = self._rank(node.args[0])
        if "dims" in info.extra:
            dims = info.extra["dims"]
            if rank is None:
                rank = len(dims)
            if len(dims) != rank:
                raise Broken(f"{path}: {info.name} {dims} does not name every dim")
            dims = [d + rank if d < 0 else d for d in dims]
            return replace(sig, cdim=dims.index(c))
        if info.extra.get("rank2"):   # x.t(): a transpose of a matrix, a no-op below rank 2
            if rank is not None and rank < 2:
                return replace(sig, cdim=c)
            rank = 2
        if rank is None and any(d < 0 for d in info.extra["swap"]):
            raise Broken(f"{path}: {info.name} with negative dims needs tensor ranks; pass example_inputs")
        a, b = (d + rank if d < 0 else d for d in info.extra["swap"])
        return replace(sig, cdim=b if c == a else a if c == b else c)

    def _reduce(self, node, sig, info, path) -> Signal:
        src = node.args[0]
        c = self._front(sig, src, path)
        rank = self._rank(src)
        dims = [d + rank if d < 0 and rank is not None else d for d in info.extra["dims"]]
        if any(d < 0 for d in dims) or any(d == c for d in dims):
            raise Broken(f"{path}: {info.name} over the channel dim (or over dims we cannot place)")
        if any(d < c for d in dims) and not info.extra["keepdim"]:
            c -= sum(1 for d in dims if d < c)
        return replace(sig, cdim=c)

    def _cat(self, src, node, sig, info, path) -> frozenset:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        if not isinstance(tensors, (list, tuple)) or src not in tensors:
            raise Broken(f"{path}: enters cat other than as one of the tensors")
        dim = info.extra["dim"]
        c = self._front(sig, src, path)
        rank = self._rank(src)
        if dim < 0:
            if rank is None:
                raise Broken(f"{path}: cat along a negative dim needs tensor ranks; pass example_inputs")
            dim += rank
        if dim != c:
            raise Broken(f"{path}: cat along dim {dim}, not the channel dim {c}")
        whole = sig.whole and all(t is src for t in tensors)
        out: set[Absorbed] = set()
        for i in (i for i, t in enumerate(tensors) if t is src):
            nxt = replace(sig, cdim=c, whole=whole, plain=False, path=path)
            before = self._count(tensors[:i], dim)
            if before is None or sig.at is None:
                nxt = _unprove(replace(nxt, at=None),
                               f"at {_label(node)} where the layer's channels land needs the channel counts of "
                               f"the tensors before them in the cat; pass example_inputs")
            else:
                nxt = replace(nxt, at=sig.at + before)
            out |= self.follow_users(node, nxt)
        return frozenset(out)

    def _count(self, tensors, dim: int) -> int | None:
        """Total size of `tensors` along `dim`, when their shapes are known."""
        total = 0
        for t in tensors:
            shape = t.meta.get("gc_shape") if isinstance(t, fx.Node) else None
            if shape is None or len(shape) <= dim:
                return None
            total += shape[dim]
        return total

    def _absorb(self, node, sig, info, path) -> Absorbed:
        kind = info.extra["norm"]
        label = node.target if node.op == "call_module" else node.name
        if kind in ("batch", "instance"):
            if node.op == "call_module" and _frozen_stats(self.cap, node.target):
                raise Broken(f"{path}: {label} is in eval mode while the model is in training mode, so it "
                             f"normalises with its running statistics (frozen), which absorb no scaling")
            c = self._front(sig, node.args[0], path)
            rank = self._rank(node.args[0])
            expected = 1
            if kind == "instance" and rank is not None and info.extra.get("spatial") and \
                    rank == info.extra["spatial"] + 1:
                expected = 0  # unbatched input (C, *spatial)
            if c != expected:
                raise Broken(f"{path}: {label} normalises dim {expected}, but the channels are at dim {c}")
            return self._record(Absorbed("row", label), node, sig)
        if sig.offset:
            raise Broken(f"{path}: {label} ({kind} norm) does not subtract per-channel means, so the "
                         f"layer's unscaled bias breaks the invariance")
        if kind == "group":
            c = self._front(sig, node.args[0], path)
            groups = info.extra["num_groups"]
            channels = info.extra.get("num_channels") or self._channels(node.args[0], c)
            if not (sig.plain and sig.whole and c == 1 and isinstance(groups, int) and channels):
                raise Broken(f"{path}: {label} groups do not line up with the layer's channels")
            return self._record(Absorbed("group", label, channels // groups), node, sig)
        if kind == "layer":
            if not sig.whole:
                raise Broken(f"{path}: {label} normalises the layer's output together with other tensors")
            return self._record(Absorbed("tensor", label), node, sig)
        raise Broken(f"{path}: unknown normalisation {label}")

    def _record(self, absorbed: Absorbed, node: fx.Node, sig: Signal) -> Absorbed:
        """Add where the channels land, the bias and the running statistics to an absorption."""
        unproven, running = sig.unproven, False
        if node.op == "call_module":
            m = self.cap.modules[node.target]
            mean = getattr(m, "running_mean", None)
            running = bool(getattr(m, "track_running_stats", False)) and mean is not None
        elif node.target in (F.batch_norm, F.instance_norm):
            if _arg(node, 1, "running_mean") is not None:
                unproven = unproven or (f"{node.name} is a functional normalisation whose running statistics "
                                        f"belong to no normalisation module")
        elif absorbed.unit == "row":
            unproven = unproven or f"cannot tell whether {node.name} keeps running statistics"
        return replace(absorbed, node=node, at=sig.at, bias=sig.bias if sig.offset else None,
                       running_stats=running, unproven=unproven)

    def _channels(self, node, c):
        shape = node.meta.get("gc_shape")
        return shape[c] if shape is not None else None


def _frozen_stats(cap: Captured, name: str) -> bool:
    """A normalisation kept in eval mode (running statistics) inside a model in training mode.
    A model wholly in eval mode is analysed as in training mode (the plan's notes say so)."""
    m, root = cap.modules[name], cap.modules.get("")
    return (root is not None and root.training and not m.training and bool(getattr(m, "track_running_stats", False))
            and getattr(m, "running_mean", None) is not None)


def _channel_kept(s_in: tuple, s_out: tuple, c: int) -> int | None:
    """Where a reshape s_in -> s_out puts channel dim c when it only regroups the dims before it and
    the dims after it (batch and token dims: the channel stays a dim of its own, each channel index
    maps to itself); None when it mixes or splits the channels, or the position is ambiguous."""
    before, after = math.prod(s_in[:c]), math.prod(s_in[c + 1:])
    hits = [d for d in range(len(s_out)) if s_out[d] == s_in[c] and math.prod(s_out[:d]) == before
            and math.prod(s_out[d + 1:]) == after]
    return hits[0] if len(hits) == 1 else None


def _label(node: fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


def _is_batch_size(arg, src: fx.Node) -> bool:
    """True for the fx spellings of x.size(0) and x.shape[0] on the same tensor."""
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_method" and arg.target == "size":
        return arg.args == (src, 0) or (arg.args == (src,) and arg.kwargs.get("dim") == 0)
    if arg.op == "call_function" and arg.target is operator.getitem and arg.args[1:] == (0,):
        shape = arg.args[0]
        return (isinstance(shape, fx.Node) and shape.op == "call_function" and shape.target is getattr
                and shape.args == (src, "shape"))
    return False

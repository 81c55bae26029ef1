"""Scale-invariance pass: a forward dataflow over the captured graph, in training mode.

Scaling output channel i of a layer by c_i > 0 is followed forward along EVERY path from the
layer's output. A path *absorbs* the scaling when it reaches a normalisation that removes it,
and *breaks* it anywhere else (see ``ops.py`` for which op is in which class and why). The
weight is invariant only if every path absorbs; the unit is the coarsest one over the paths:

* BatchNorm (batch statistics) / InstanceNorm normalise each channel on its own -> "row";
* GroupNorm normalises groups of consecutive channels together -> "group" (only when the
  layer's channels reach it unmixed: no cat or flatten in between);
* LayerNorm normalises a whole sample -> "tensor" (the layer's output must be all of its input).

The layer's bias is an unscaled per-channel constant (an *offset*). It survives linear
per-channel ops that keep per-channel constants constant, and is removed by BN/IN (they subtract
per-channel means). Anything else it meets first (ReLU, dropout, GroupNorm, LayerNorm) breaks
invariance. When unsure (unknown op, channel position unknown without shapes) the answer is
"not invariant" with the reason; the pass never claims an invariance it cannot show.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import torch.fx as fx

from ..capture import Captured
from .facts import UNITS, ParamFacts, ScaleInvariance
from .layout import Use
from .ops import classify


@dataclass(frozen=True)
class Signal:
    """How the scaled channels appear in a tensor on one path."""
    cdim: int                  # channel position: >= 0 from the front, < 0 from the back
    offset: bool               # an unscaled per-channel constant (the layer's bias) rides along
    whole: bool = True         # the tensor is all of the layer's output (no cat with others)
    plain: bool = True         # channels still one-to-one (no flatten / cat): GroupNorm may absorb
    path: str = ""             # for reasons: "conv1 -> relu -> add"


@dataclass(frozen=True)
class Absorbed:
    unit: str
    normalizer: str
    group_size: int | None = None


class Broken(Exception):
    """Raised inside the walk with the reason a person reads."""


def analyze_invariance(facts: ParamFacts, uses: list[Use], cap: Captured) -> None:
    """Fill facts.scale_invariant / facts.invariance_reason for a conv / conv-transpose / linear weight."""
    if facts.kind not in ("conv", "conv_transpose", "linear"):
        facts.invariance_reason = f"kind {facts.kind!r}: only conv, conv_transpose and linear weights are analysed"
        return
    walker = _Walker(cap)
    found: set[Absorbed] = set()
    try:
        for use in uses:
            if use.role != "weight":
                raise Broken(f"also used by {use.node.name} as {use.role}")
            sig = Signal(cdim=-1 if facts.kind == "linear" else 1, offset=_has_bias(use, cap),
                         path=use.module or use.node.name)
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
    facts.scale_invariant = ScaleInvariance(unit, normalizer, reason, group_size)
    facts.invariance_reason = reason


def _has_bias(use: Use, cap: Captured) -> bool:
    if use.module is not None:
        return getattr(cap.modules[use.module], "bias", None) is not None
    args = list(use.node.args) + [None] * 3
    return args[2] is not None or use.node.kwargs.get("bias") is not None


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
        if info.data is not src:
            raise Broken(f"{path}: enters {info.name} other than as its input tensor")
        if info.cls == "layer":
            raise Broken(f"{path}: feeds another layer ({info.name}) before any normalisation")
        if info.cls == "norm":
            return frozenset({self._absorb(node, sig, info, path)})
        if sig.offset and not info.keeps_offset:
            raise Broken(f"{path}: the layer's bias is not scaled with its weight and {info.name} does not "
                         f"keep it a per-channel constant (remove the bias: a BatchNorm follows)")
        nxt = replace(sig, path=path)
        if info.cls == "flatten":
            nxt = self._flatten(node, nxt, info.extra["start"], info.extra["end"], path)
        elif info.cls == "reshape":
            nxt = self._reshape(src, node, nxt, info, path)
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
        if end >= 0 and c > end:
            raise Broken(f"{path}: flatten of dims after the channel dim is not followed (the analyser "
                         f"refuses rather than track the shifted channel position)")
        return replace(sig, cdim=start, plain=False)

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
                return replace(sig, cdim=c, plain=False)
            raise Broken(f"{path}: {info.name} {tuple(s_in)} -> {tuple(s_out)} moves the channels")
        shape = info.extra["shape"]
        if sig.cdim == 1 and len(shape) == 2 and shape[1] == -1 and _is_batch_size(shape[0], src):
            return replace(sig, plain=False)  # x.view(x.size(0), -1): flatten from dim 1
        raise Broken(f"{path}: {info.name} without known shapes; pass example_inputs")

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
        return self.follow_users(node, replace(sig, cdim=c, whole=whole, plain=False, path=path))

    def _absorb(self, node, sig, info, path) -> Absorbed:
        kind = info.extra["norm"]
        label = node.target if node.op == "call_module" else node.name
        if kind in ("batch", "instance"):
            c = self._front(sig, node.args[0], path)
            rank = self._rank(node.args[0])
            expected = 1
            if kind == "instance" and rank is not None and info.extra.get("spatial") and \
                    rank == info.extra["spatial"] + 1:
                expected = 0  # unbatched input (C, *spatial)
            if c != expected:
                raise Broken(f"{path}: {label} normalises dim {expected}, but the channels are at dim {c}")
            return Absorbed("row", label)
        if sig.offset:
            raise Broken(f"{path}: {label} ({kind} norm) does not subtract per-channel means, so the "
                         f"layer's unscaled bias breaks the invariance")
        if kind == "group":
            c = self._front(sig, node.args[0], path)
            groups = info.extra["num_groups"]
            channels = info.extra.get("num_channels") or self._channels(node.args[0], c)
            if not (sig.plain and sig.whole and c == 1 and isinstance(groups, int) and channels):
                raise Broken(f"{path}: {label} groups do not line up with the layer's channels")
            return Absorbed("group", label, channels // groups)
        if kind == "layer":
            if not sig.whole:
                raise Broken(f"{path}: {label} normalises the layer's output together with other tensors")
            return Absorbed("tensor", label)
        raise Broken(f"{path}: unknown normalisation {label}")

    def _channels(self, node, c):
        shape = node.meta.get("gc_shape")
        return shape[c] if shape is not None else None


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

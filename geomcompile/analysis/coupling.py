"""G-chain pass (design ``gspace.md`` §8): which conv / linear layers are joined by a 𝒢-link.

``W^l -> W^{l+1}`` is a 𝒢-link when scaling hidden unit i (row i of W^l and its bias by c > 0, the
input channel / column block i of W^{l+1} by 1/c) never changes the function. The pass proves it
by walking forward from W^l's output, as ``invariance.py`` does, and uses ``ops.py``'s op
classification. A link needs all of:

1. both layers conv (groups 1, not transposed) or linear, each weight used by exactly one op and
   not aliased, the layer in torch layout (out, in, ...), and its bias, if any, its own parameter
   that nothing else reads;
2. between them only unary per-channel positively homogeneous ops: relu / leaky_relu / prelu /
   rrelu, max / avg / adaptive pooling and upsampling over dims after the channel, dropout (any
   variant: its mask multiplies), identity / clone / contiguous / dtype casts, scaling by a nonzero
   constant, mean / sum over dims other than the channel, and at most one channel-major flatten /
   view(N, -1) / reshape(N, -1) of a conv's channels into a Linear (shapes from example_inputs);
3. no fan-out (every tensor on the way has one user that reads its values) and no model output;
4. no normalisation: it absorbs the incoming scale alone, so in×c / out×1/c is not a symmetry
   (§7; ``psi`` covers such a weight).

Anything else ends the chain, with the reason in ``g_reason`` quoting the op. The pass only writes
facts: ``g_next`` / ``g_prev`` (weight names), ``g_bias``, ``g_taps`` / ``g_centre`` (edge tensor
``W.reshape(out, in, T)`` and its skeleton tap), ``g_block`` ((C, S) for a flatten link) and, on a
coupled layer's bias, ``g_weight``.

Limitations: Conv1d / Conv3d are handled like Conv2d (T = the kernel's numel, the centre tap in
row-major order); a Linear fed by flatten but not linked gets T = 1; ops outside the list above
(permute, cat, slicing, padding, squeeze, ...) always end a chain, even where they would commute
with the scaling.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch.fx as fx

from ..capture import Captured
from ..findings import Finding, group
from .facts import ParamFacts
from .invariance import _bias, _channel_kept
from .layout import Use
from .ops import NORM_FUNCS, classify

LAYERS = ("conv", "linear")
NOT_HOMOGENEOUS = {"gelu", "silu", "swish", "elu", "selu", "celu", "softplus", "sigmoid", "tanh", "hardtanh",
                   "relu6", "hardswish", "hardsigmoid", "mish", "softsign", "tanhshrink", "logsigmoid",
                   "threshold", "glu", "softmax", "log_softmax", "softmin", "hardshrink", "softshrink",
                   "exp", "log", "abs", "pow", "sqrt", "square", "sin", "cos", "erf"}


@dataclass(frozen=True)
class _Signal:
    """Where the scaled units sit in a tensor on the path from W^l's output."""
    back: int                      # channel position from the back (-1: the last dim)
    conv_layout: bool              # (N,) C, spatial...: at most one dim before the channel, only spatial after
    block: tuple[int, ...] | None = None   # (C, *spatial) merged by the one channel-major flatten


class _End(Exception):
    """The chain ends after the layer; the message is the reason (it quotes the op)."""


def analyze_coupling(facts: dict[str, ParamFacts], uses: dict[str, list[Use]], cap: Captured) -> None:
    """Write the G-chain facts of every parameter (see the module docstring)."""
    own: dict[str, str] = {}                   # weight -> why it cannot be in any chain ("" if it can)
    weight_at: dict[fx.Node, str] = {}         # layer op -> the weight it consumes
    for name, f in facts.items():
        if f.kind in ("bias", "norm_weight", "norm_bias"):
            continue
        own[name], f.g_bias = _own_problem(f, uses[name], facts, cap)
        for use in uses[name]:
            if use.role == "weight":
                weight_at[use.node] = name
        if not own[name]:
            if f.kind == "conv":
                f.g_taps, f.g_centre = math.prod(f.shape[2:]), _centre(f.shape[2:])
            else:
                f.g_taps, f.g_centre = 1, 0
    for name in own:
        f = facts[name]
        if own[name]:
            f.g_reason = own[name]
            continue
        try:
            nxt, sig = _follow(f, uses[name][0], cap, weight_at, own, facts)
        except _End as end:
            f.g_reason = str(end)
            continue
        f.g_next, facts[nxt].g_prev = nxt, name
        if sig.block is not None:
            c, spatial = sig.block[0], sig.block[1:]
            n = facts[nxt]
            n.g_taps, n.g_centre, n.g_block = math.prod(spatial), _centre(spatial), (c, math.prod(spatial))
    for name in own:
        f = facts[name]
        if f.g_bias is not None and (f.g_next or f.g_prev):
            facts[f.g_bias].g_weight = name


def _own_problem(f: ParamFacts, fuses: list[Use], facts: dict[str, ParamFacts], cap: Captured):
    """(why this weight cannot be in any chain or "", its own bias parameter or None)."""
    if f.kind == "conv_transpose":
        return "conv_transpose: a transposed conv is not in G-chains (conv with groups 1 and linear only)", None
    if f.kind not in LAYERS:
        return f"kind {f.kind!r}: not a conv or linear layer weight, so it is in no G-chain", None
    if not fuses:
        return "not used by any op in the captured graph", None
    if f.aliases:
        return f"shared weight (also named {f.aliases[0]})", None
    if len(fuses) != 1:
        return f"shared weight: used by {len(fuses)} ops", None
    use = fuses[0]
    if f.groups > 1:
        return ("depthwise conv" if f.depthwise else f"grouped conv (groups={f.groups})"), None
    if use.transposed or f.out_dim != 0:
        return "transposed linear layer (weight stored (in, out)); G-chains need the torch layout (out, in)", None
    if use.standardized:
        return f"the layer standardises its own weight ({use.standardized}), so no row scaling reaches it", None
    has_bias, bias = _bias(use, cap)
    if has_bias and bias is None:
        return "its bias is not a parameter of the model, so it cannot be scaled with its unit", None
    if bias is not None:
        b = facts.get(bias)
        if b is None:
            return f"its bias {bias} is a shared parameter", None
        if b.aliases or b.uses != 1:
            return f"its bias {bias} is also read by another op (or shared)", None
    return "", bias


def _follow(f: ParamFacts, use: Use, cap: Captured, weight_at, own, facts) -> tuple[str, _Signal]:
    """Walk forward from the layer's output to the next layer; return (its weight, the signal there)."""
    label = use.module or use.node.name
    sig = _Signal(back=-(len(f.shape) - 1) if f.kind == "conv" else -1, conv_layout=f.kind == "conv")
    src = use.node
    while True:
        readers = [u for u in src.users if classify(u, cap.modules).cls != "meta"]   # x.size(0) reads no values
        at = f"`{label}`" if src is use.node else f"`{label}` → `{_label(src)}`"
        if len(readers) != 1:
            names = ", ".join(f"`{_label(u)}`" for u in readers)
            raise _End(f"{at}: output used by {len(readers)} ops ({names}); the chain ends here"
                       if readers else f"{at}: output not used")
        node = readers[0]
        if node.op == "output":
            raise _End(f"{at} → output: model output")
        info = classify(node, cap.modules)
        where = f"`{label}` → `{_label(node)}`"
        if info.data is not src or info.cls not in PASSING + ("layer",):
            raise _End(f"{where}: {_why_not(node, info, src, f)}")
        if info.cls == "layer":
            return _link(f, node, sig, weight_at, own, facts, where), sig
        sig = _through(node, info, src, sig, where)
        src = node


PASSING = ("homogeneous", "linear", "reduce", "flatten", "reshape")   # op classes that may keep a symmetry


def _through(node: fx.Node, info, src: fx.Node, sig: _Signal, where: str) -> _Signal:
    """The signal after one op of a PASSING class, or _End when the op is not a per-unit symmetry."""
    name, low = info.name, info.name.lower()
    spatial = "pool" in low or _is_upsample(low)
    if sig.block is not None and (spatial or info.cls == "reduce"):
        raise _End(f"{where}: after the flatten only elementwise ops may come before the Linear")
    if "pool" in low:
        k = _spatial_rank(name)
        if k is None or -sig.back <= k:
            raise _End(f"{where}: {name} pools over the dims that hold the units; the chain ends here")
        return sig
    if _is_upsample(low):
        shape = src.meta.get("gc_shape")
        front = len(shape) + sig.back if shape is not None else None
        if not sig.conv_layout or (front is not None and front > 1):
            raise _End(f"{where}: {name} resamples the dims that hold the units; the chain ends here")
        return sig
    if info.cls == "reduce":
        return _reduce(src, info, sig, where)
    if info.cls in ("flatten", "reshape"):
        return _reshape(src, node, sig, where)
    return sig   # relu / leaky_relu / prelu / rrelu, dropout, identity, scaling by a constant: elementwise


def _reduce(src: fx.Node, info, sig: _Signal, where: str) -> _Signal:
    shape = src.meta.get("gc_shape")
    dims = list(info.extra["dims"])
    if shape is None and any(d >= 0 for d in dims):
        raise _End(f"{where}: {info.name} over dims counted from the front needs shapes; pass example_inputs")
    back = [d - len(shape) if d >= 0 else d for d in dims] if shape is not None else dims
    if sig.back in back:
        raise _End(f"{where}: {info.name} over the units' dim; the chain ends here")
    after = sum(1 for d in back if d > sig.back)
    return replace(sig, back=sig.back if info.extra["keepdim"] else sig.back + after)


def _reshape(src: fx.Node, node: fx.Node, sig: _Signal, where: str) -> _Signal:
    s_in, s_out = src.meta.get("gc_shape"), node.meta.get("gc_shape")
    if s_in is None or s_out is None:
        raise _End(f"{where}: flatten needs example_inputs (the block of features per channel comes from shapes)")
    s_in, s_out = tuple(s_in), tuple(s_out)
    c = len(s_in) + sig.back
    if s_in == s_out:
        return sig
    if sig.block is None and sig.conv_layout and s_out == s_in[:c] + (math.prod(s_in[c:]),):
        return _Signal(back=-1, conv_layout=False, block=s_in[c:])     # channel-major: (C, *spatial)
    if sig.block is None:
        kept = _channel_kept(s_in, s_out, c)
        if kept is not None and kept == len(s_out) - 1 and c == len(s_in) - 1:
            return _Signal(back=-1, conv_layout=False)                 # leading dims regrouped only
    raise _End(f"{where}: {_label(node)} {s_in} -> {s_out} is not one channel-major flatten of the units; "
               f"the chain ends here")


def _link(f: ParamFacts, node: fx.Node, sig: _Signal, weight_at, own, facts, where: str) -> str:
    """The next layer's weight when the units reach it as its input channels / features, else _End."""
    nxt = weight_at.get(node)
    if nxt is None:
        raise _End(f"{where}: the next layer's weight is not a parameter of the model")
    if own[nxt]:
        raise _End(f"{where}: {own[nxt]}")
    n = facts[nxt]
    width = f.shape[0]
    if n.kind == "conv":
        if not sig.conv_layout or sig.back != -(len(n.shape) - 1):
            raise _End(f"{where}: the conv reads its channels where the units are not (a linear layer's "
                       f"features or a conv of another rank); the chain ends here")
        if n.shape[1] != width:
            raise _End(f"{where}: widths disagree ({width} units, {n.shape[1]} input channels)")
        return nxt
    if sig.back != -1:
        raise _End(f"{where}: the linear layer reads the last dim, not the conv's channels (flatten them "
                   f"first); the chain ends here")
    fan_in = width * math.prod(sig.block[1:]) if sig.block is not None else width
    if (sig.block is not None and sig.block[0] != width) or n.shape[1] != fan_in:
        raise _End(f"{where}: widths disagree ({width} units, {n.shape[1]} input features)")
    return nxt


def _why_not(node: fx.Node, info, src: fx.Node, f: ParamFacts) -> str:
    """The reason an op ends a chain, in words that quote it."""
    name = info.name
    raw = name.split(" ")[0]          # "batch_norm with running statistics" -> "batch_norm"
    if info.cls == "norm" or raw in NORM_FUNCS:
        tail = "; psi applies to this weight" if f.scale_invariant is not None else ""
        return f"a normalisation absorbs the unit's incoming scale, so in×c/out×1/c is not a symmetry{tail}"
    if raw == "add":
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        return ("residual add; the chain ends here" if len(tensors) > 1
                else "add of a constant shifts the units; the chain ends here")
    if raw.lower() in NOT_HOMOGENEOUS:
        return f"{name} is not positively homogeneous"
    if info.cls == "cat":
        return f"{name} joins the units with other tensors; the chain ends here"
    if info.cls == "permute":
        return f"{name} moves the units' dim; the chain ends here"
    if info.cls != "unknown" and info.data is not src:
        return f"enters {name} other than as its input tensor; the chain ends here"
    return f"{name} is not a unary per-channel positively homogeneous op; the chain ends here"


def _is_upsample(low: str) -> bool:
    return low == "interpolate" or "upsampl" in low


def _spatial_rank(name: str) -> int | None:
    """max_pool2d / AdaptiveAvgPool1d / ... -> 2 / 1; None when the name does not say."""
    m = re.search(r"([123])d", name.lower())
    return int(m.group(1)) if m else None


def _centre(dims) -> int:
    """The row-major index of the centre (d // 2 in each dim): (kh//2)*kw + kw//2 for a 2-d kernel."""
    index = 0
    for d in dims:
        index = index * d + d // 2
    return index


def _label(node: fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


# ---- reading the facts back ------------------------------------------------------------------
def g_chains(structure) -> list[list[str]]:
    """The G-chains the facts describe: weight names from a first layer (no g_prev) along g_next."""
    out = []
    for name, f in structure.items():
        if f.g_next is not None and f.g_prev is None:
            chain = [name]
            while structure[chain[-1]].g_next is not None:
                chain.append(structure[chain[-1]].g_next)
            out.append(chain)
    return out


def chain_report(structure) -> list[str]:
    """Report lines: every chain with its taps, flatten blocks and why it ends (unless at the model
    output), then why each conv / linear weight in no chain is not coupled, one line per reason
    (``findings.group``)."""
    chains = g_chains(structure)
    lines = [f"G-chains: {len(chains) or 'none'} (analysis/coupling.py; gspace trains each as one unit)"]
    for chain in chains:
        blocks = [f"flatten block {structure[n].g_block}" for n in chain if structure[n].g_block is not None]
        taps = ", ".join(str(structure[n].g_taps) for n in chain)
        end = structure[chain[-1]].g_reason
        lines.append(f"  {' → '.join(_layer_name(n) for n in chain)} (taps {taps}{''.join('; ' + b for b in blocks)})"
                     + ("" if end.endswith(": model output") else f"; ends: {end}"))
    alone = []
    for name, f in structure.items():
        if f.kind in ("conv", "linear", "conv_transpose") and not f.g_coupled:
            why = re.sub(r"`[^`]*`", "`…`", _WHERE.sub("", f.g_reason))   # names masked: one line per cause
            alone.append(Finding(f"{name}: {f.g_reason}", name=name, key=("g", why), head="", tail=f": {why}"))
    if alone:
        lines.append(f"not coupled: {len(alone)} conv/linear weight(s)")
        lines += [f"  {line}" for line in group(alone)]
    return lines


_WHERE = re.compile(r"^`[^`]*`(?: → (?:`[^`]*`|output))*: ")   # "`conv2` → `add`: " before the why


def _layer_name(weight: str) -> str:
    return weight[:-len(".weight")] if weight.endswith(".weight") else weight

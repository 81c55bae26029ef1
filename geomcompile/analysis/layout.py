"""Layout pass: kind, output-channel dimension, groups, depthwise and shapes of every parameter.

Facts come from the module type, or, for parameters used functionally (``F.conv2d(x, self.w)``),
from the op that consumes the parameter. A parameter consumed by several ops (a module called
twice, tied weights) gets its facts merged conservatively: if the uses disagree on the kind the
parameter becomes "other".

Reads of a weight's attributes (``x.to(self.proj.weight.dtype)``, ``w.shape``, ``w.device``) are not
uses: no values flow. A weight handed to an op the analysis does not look inside (a function
wrapped with ``torch.fx.wrap``, such as torchvision's ``shifted_window_attention``, or a leaf
module it does not know, such as ``nn.MultiheadAttention``) has no provable layout: it is kind
"other", and a note names the parameter and that op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ..capture import Captured, is_leaf_module
from .facts import ParamFacts
from .ops import LAYER_FUNCS, classify
from .standardize import standardized_uses

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class Use:
    """One op consuming a parameter. role: 'weight', 'bias' or 'other'.

    transposed: a linear layer whose weight is stored (in, out), as ``x @ W``, ``torch.addmm(b, x, W)``
    (Hugging Face ``Conv1D``) or ``F.linear(x, W.t())`` compute it: out_dim 1.
    standardized: the layer consumes a per-output-filter standardisation of the weight (see
    ``standardize.py``), the words saying how; the layer's output does not see a row scaling at all.
    """
    node: fx.Node
    kind: str
    role: str
    module: str | None
    transposed: bool = False
    standardized: str = ""


def param_uses(cap: Captured, param_names: dict[int, str], params: dict[str, torch.Tensor]) -> dict[str, list[Use]]:
    """For every parameter (by primary name), the ops that consume it."""
    uses: dict[str, list[Use]] = {name: [] for name in params}
    for node in cap.graph.nodes:
        if node.op == "call_module":
            mod = cap.modules[node.target]
            for local, p in mod.named_parameters():
                name = param_names.get(id(p))
                if name is not None:
                    uses[name].append(Use(node, *_module_role(mod, local), module=node.target))
        elif node.op == "get_attr":
            name = param_names.get(id(_get_attr(cap, node.target)))
            if name is None:
                continue
            standardized = standardized_uses(node, params[name], cap, lambda n, v: _layer_weight_use(n, v, cap))
            if standardized is not None:   # consumed only through a per-filter standardisation
                uses[name].extend(standardized)
                continue
            for user in node.users:
                if classify(user, cap.modules).cls != "meta":   # w.dtype, w.shape: not a use of its values
                    uses[name].append(_functional_use(user, node, cap))
    return uses


def _get_attr(cap: Captured, target: str):
    owner, _, attr = target.rpartition(".")
    mod = cap.modules.get(owner)
    return getattr(mod, attr, None) if mod is not None else None


def _module_role(mod: nn.Module, local: str) -> tuple[str, str]:
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        kind = "conv_transpose"
    elif isinstance(mod, nn.modules.conv._ConvNd):
        kind = "conv"
    elif isinstance(mod, nn.Linear):
        kind = "linear"
    elif isinstance(mod, _NORMS):
        return ("norm_weight" if local == "weight" else "norm_bias" if local == "bias" else "other"), "other"
    elif isinstance(mod, nn.Embedding):
        return "embedding", "other"
    else:
        return "other", "other"
    if local == "weight":
        return kind, "weight"
    if local == "bias":
        return "bias", "bias"
    return "other", "other"


def _functional_use(user: fx.Node, attr_node: fx.Node, cap: Captured) -> Use:
    info = classify(user, cap.modules)
    if info.cls == "layer" and info.name in LAYER_FUNCS:
        args = list(user.args) + [None] * 3
        if args[1] is attr_node or user.kwargs.get("weight") is attr_node:
            return Use(user, info.extra["kind"], "weight", None)
        if args[2] is attr_node or user.kwargs.get("bias") is attr_node:
            return Use(user, "bias", "bias", None)
    return _transposed_linear_use(user, attr_node, cap) or Use(user, "other", "other", None)


def _layer_weight_use(user: fx.Node, value: fx.Node, cap: Captured) -> Use | None:
    """The use of `value` by a conv / conv-transpose / linear op at its weight slot, else None."""
    use = _functional_use(user, value, cap)
    return use if use.role == "weight" and use.kind in ("conv", "conv_transpose", "linear") else None


def _transposed_linear_use(user: fx.Node, attr_node: fx.Node, cap: Captured) -> Use | None:
    """A linear layer computed from a weight stored (in, out), recognised from how it is consumed:
    ``torch.addmm(b, x, W)``, ``x @ W`` / ``torch.matmul(x, W)`` / ``torch.mm(x, W)``, and
    ``F.linear(x, W.t())`` (also ``W.T``-free spellings ``W.transpose(0, 1)``, ``W.permute(1, 0)``)."""
    value = _get_attr(cap, attr_node.target) if attr_node.op == "get_attr" else None
    if not isinstance(value, torch.Tensor):
        return None
    name, args = classify(user, cap.modules).name, user.args
    if name == "addmm" and len(args) == 3 and not user.kwargs:   # alpha/beta would scale the bias
        bias = _get_attr(cap, args[0].target) if isinstance(args[0], fx.Node) and args[0].op == "get_attr" else None
        if args[2] is attr_node and value.dim() == 2 and attr_node not in args[:2] and \
                isinstance(bias, torch.Tensor) and tuple(bias.shape) == (value.shape[1],):
            return Use(user, "linear", "weight", None, transposed=True)   # a per-channel bias, not data
        if args[0] is attr_node and value.dim() == 1 and attr_node not in args[1:]:
            return Use(user, "bias", "bias", None)
        return None
    if name in ("matmul", "mm") and len(args) == 2 and not user.kwargs and args[1] is attr_node \
            and args[0] is not attr_node and value.dim() == 2:
        return Use(user, "linear", "weight", None, transposed=True)
    info = classify(user, cap.modules)
    if info.cls != "permute" or value.dim() != 2 or len(user.users) != 1:
        return None
    swap = info.extra.get("swap", info.extra.get("dims"))
    if sorted(d % 2 for d in swap) != [0, 1]:   # t(), transpose(0, 1) / (-1, -2), permute(1, 0)
        return None
    (layer,) = user.users
    inner = _functional_use(layer, user, cap)
    if inner.kind == "linear" and inner.role == "weight" and layer.args and layer.args[0] is not user:
        return Use(layer, "linear", "weight", None, transposed=True)
    return None


def layer_input(node: fx.Node):
    """The data input of a layer op (``torch.addmm(b, x, W)`` has it second)."""
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "addmm":
        return node.args[1]
    return node.args[0] if node.args else None


def layout_facts(name: str, tensor: torch.Tensor, uses: list[Use], cap: Captured) -> ParamFacts:
    facts = ParamFacts(name=name, shape=tuple(tensor.shape), uses=len(uses))
    if not uses:  # not reached in the captured graph (e.g. a branch the run capture did not take)
        return _facts_from_owner(facts, cap)
    kinds = {(u.kind, u.transposed) for u in uses}
    opaque = _opaque_uses(uses, cap)
    if len(kinds) != 1:
        facts.kind = "other"
        if len(kinds) > 1:
            facts.notes.append(f"used as {sorted(k + ' (transposed)' * t for k, t in kinds)}: facts "
                               f"merged to 'other'" + (f"; {opaque}" if opaque else ""))
        return facts
    facts.kind, transposed = kinds.pop()
    if facts.kind == "other" and opaque:
        facts.notes.append(opaque)
    first = uses[0]
    facts.module = first.module or first.node.name   # a functional use: name the op
    if facts.kind in ("conv", "conv_transpose", "linear"):
        facts.out_dim = 1 if facts.kind == "conv_transpose" or transposed else 0
        if transposed:
            facts.notes.append("transposed linear layer: weight stored (in, out), so out_dim is 1")
        facts.groups = _groups(first, cap)
        facts.depthwise = _is_depthwise(facts, tensor)
        facts.layer = _layer_config(first, cap)
        ordered = [_shape(layer_input(u.node)) for u in uses]
        shapes_in, shapes_out = set(ordered), {u.node.meta.get("gc_shape") for u in uses}
        if None not in shapes_in:
            facts.input_shapes = tuple(dict.fromkeys(ordered))
        if len(shapes_in) == 1 and len(shapes_out) == 1:   # shapes are only facts when all uses agree
            facts.input_shape, facts.output_shape = shapes_in.pop(), shapes_out.pop()
    elif facts.kind == "bias":
        facts.out_dim = 0
    return facts


def _opaque_uses(uses: list[Use], cap: Captured) -> str:
    """Why a weight's layout cannot be proven from ops the analysis does not look inside, or ''."""
    ops = []
    for u in uses:
        if u.kind != "other":
            continue
        if u.node.op == "call_module":
            ops.append(f"module {u.module!r} ({type(cap.modules[u.module]).__name__}, a leaf module the "
                       f"analysis does not look inside)")
        elif u.node.op in ("call_function", "call_method"):
            target = u.node.target
            fn = target if isinstance(target, str) else getattr(target, "__name__", str(target))
            what = ("not a conv/linear op; the analysis does not look inside functions such as "
                    "torch.fx.wrap-ped ones") if u.node.op == "call_function" else "a tensor method"
            ops.append(f"op {u.node.name!r} ({fn}, {what})")
    if not ops:
        return ""
    return (f"layout not proven: it is consumed by {', '.join(dict.fromkeys(ops))}, so its kind and output "
            f"dimension are unknown (kind 'other') and no layer geometry applies to it")


def _facts_from_owner(facts: ParamFacts, cap: Captured) -> ParamFacts:
    """Layout facts from the module that owns the parameter; no shapes, no invariance."""
    owner_name, _, local = facts.name.rpartition(".")
    owner = cap.modules.get(owner_name)
    if owner is None or not is_leaf_module(owner):
        return facts
    facts.kind, role = _module_role(owner, local)
    facts.module = owner_name
    if role == "weight":
        facts.out_dim = 1 if facts.kind == "conv_transpose" else 0
        use = Use(node=None, kind=facts.kind, role=role, module=owner_name)
        facts.groups = _groups(use, cap)
        facts.depthwise = _is_depthwise(facts, cap.modules[owner_name].weight)
        facts.layer = _layer_config(use, cap)
    elif role == "bias":
        facts.out_dim = 0
    facts.notes.append("not reached in the captured graph: layout taken from its module")
    return facts


def _shape(arg):
    return arg.meta.get("gc_shape") if isinstance(arg, fx.Node) else None


def _groups(use: Use, cap: Captured) -> int:
    if use.module is not None:
        return int(getattr(cap.modules[use.module], "groups", 1))
    g = use.node.args[6] if len(use.node.args) > 6 else use.node.kwargs.get("groups", 1)
    return int(g) if isinstance(g, int) else 1


def _is_depthwise(facts: ParamFacts, w: torch.Tensor) -> bool:
    if facts.groups <= 1 or w.dim() < 3:
        return False
    if facts.kind == "conv":
        out_ch, in_ch = w.shape[0], w.shape[1] * facts.groups
    else:  # conv_transpose: weight (in, out/groups, k...)
        in_ch, out_ch = w.shape[0], w.shape[1] * facts.groups
    return facts.groups == in_ch == out_ch


def _layer_config(use: Use, cap: Captured) -> dict:
    if use.module is None:
        return {"functional": use.node.name}
    m = cap.modules[use.module]
    if isinstance(m, nn.modules.conv._ConvNd):
        cfg = {k: getattr(m, k) for k in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                                          "dilation", "groups", "padding_mode")}
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            cfg["output_padding"] = m.output_padding
        return cfg
    if isinstance(m, nn.Linear):
        return {"in_features": m.in_features, "out_features": m.out_features}
    return {}

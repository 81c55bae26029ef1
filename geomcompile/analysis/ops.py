"""Normalise the many spellings of an op to one description the passes can reason about.

``nn.ReLU`` / ``F.relu`` / ``torch.relu`` / ``x.relu()`` / ``relu_`` are one op ("relu"); ``+``,
``operator.add``, ``operator.iadd``, ``torch.add``, ``x.add(_)`` are one "add"; likewise cat,
flatten/view/reshape, pooling and dropout. Both capture paths (fx and run) are handled: fx gives
``call_method`` nodes with a method name, the run path gives ``call_function`` nodes whose
target is a ``torch.Tensor`` method.

Op classes for the scale-invariance dataflow (``OpInfo.cls``):

* ``layer``: conv / conv-transpose / linear; where a weight's signal starts. A signal entering
  one is broken (the layer mixes channels).
* ``homogeneous``: f(c·x) = c·f(x) for c > 0, elementwise or per channel (ReLU, LeakyReLU,
  PReLU, RReLU with the same slopes, max pooling). Not linear, so an unscaled bias (offset)
  does not pass, except through max pooling (max(c·x + b) = c·max(x) + b: monotone per channel).
* ``linear``: linear per channel (avg/adaptive-avg pooling, upsampling (weights sum to 1),
  identity, contiguous/clone, constant scaling, mean/sum over non-channel dims, dropout).
  ``keeps_offset`` says whether a per-channel constant stays a per-channel constant: not for
  dropout (its random mask multiplies the bias) nor avg pooling with zero padding counted in.
* ``norm``: normalisations (where a signal may be absorbed); ``flatten``/``reshape``/``permute``/
  ``cat``: change where the channel lives; ``meta``: size/shape/dim (no data flows); ``unknown``:
  everything else, which breaks invariance (adds, products of tensors, non-homogeneous
  activations such as ReLU6/GELU/SiLU/sigmoid/tanh/hardswish/ELU, slicing, ...).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

# --- names (after normalisation) -> class ------------------------------------------------------
HOMOGENEOUS = {"relu", "leaky_relu", "prelu", "rrelu"}
MAX_POOL = {"max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
            "adaptive_max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
            "max_pool3d_with_indices"}
AVG_POOL = {"avg_pool1d", "avg_pool2d", "avg_pool3d"}
ADAPTIVE_AVG_POOL = {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"}
DROPOUT = {"dropout", "dropout1d", "dropout2d", "dropout3d"}
IDENTITY = {"contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type_as", "identity"}
UPSAMPLE = {"interpolate", "upsample", "upsample_nearest", "upsample_bilinear"}
RESHAPE = {"view", "reshape"}
RESHAPE_AS = {"view_as", "reshape_as"}
PERMUTE = {"permute", "transpose", "swapaxes", "swapdims", "t"}
CAT = {"cat", "concat", "concatenate"}
META = {"size", "dim", "shape", "numel", "ndimension", "device", "dtype", "nelement", "get_device", "ndim",
        "is_cuda", "layout", "requires_grad", "is_floating_point"}
REDUCE = {"mean", "sum"}
SCALE = {"mul", "div", "truediv"}
LAYER_FUNCS = {"conv1d": ("conv", 1), "conv2d": ("conv", 2), "conv3d": ("conv", 3),
               "conv_transpose1d": ("conv_transpose", 1), "conv_transpose2d": ("conv_transpose", 2),
               "conv_transpose3d": ("conv_transpose", 3), "linear": ("linear", 0)}
NORM_FUNCS = {"batch_norm": "batch", "instance_norm": "instance", "group_norm": "group", "layer_norm": "layer"}

_OPERATOR_NAMES = {operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
                   operator.mul: "mul", operator.imul: "mul", operator.truediv: "div",
                   operator.itruediv: "div", operator.getitem: "getitem", operator.matmul: "matmul",
                   operator.neg: "neg"}


@dataclass
class OpInfo:
    cls: str                      # layer | homogeneous | linear | norm | flatten | reshape | cat | meta | unknown
    name: str                     # normalised op name, for reasons shown to users
    keeps_offset: bool = False    # a per-channel constant stays a per-channel constant
    data: Any = None              # the tensor argument the signal flows through (node)
    extra: dict = field(default_factory=dict)


def op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """One name per op whatever its spelling; modules give their class name."""
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_method":
        return _strip(node.target)
    if node.op == "call_function":
        if node.target in _OPERATOR_NAMES:
            return _OPERATOR_NAMES[node.target]
        if node.target is getattr and len(node.args) > 1 and isinstance(node.args[1], str):
            return node.args[1]        # fx's spelling of an attribute read (x.dtype, w.shape): name it
        name = getattr(node.target, "__name__", str(node.target))
        if name == "__get__":  # a Tensor property read in the run path (x.shape): name the property
            name = getattr(getattr(node.target, "__self__", None), "__name__", name)
        return _strip(name)
    return node.op


def _strip(name: str) -> str:
    """'__iadd__' -> 'add', '__rmul__' -> 'mul', 'relu_' -> 'relu', '__getitem__' -> 'getitem'."""
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name[:1] in "ir" and name[1:] in ("add", "sub", "mul", "truediv", "div", "matmul"):
            name = name[1:]
    elif name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return {"truediv": "div", "concatenate": "cat", "concat": "cat", "upsample_nearest2d": "upsample"}.get(name, name)


def _arg(node: fx.Node, i: int, key: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> OpInfo:
    name = op_name(node, modules)
    first = node.args[0] if node.args else None
    if node.op == "call_module":
        return _classify_module(modules[node.target], name, first)
    if node.op not in ("call_function", "call_method"):
        return OpInfo("unknown", name)
    if name in META:
        return OpInfo("meta", name)
    if name in LAYER_FUNCS:
        return OpInfo("layer", name, data=first, extra={"kind": LAYER_FUNCS[name][0]})
    if name in HOMOGENEOUS:
        return OpInfo("homogeneous", name, data=first)
    if name in MAX_POOL:
        return OpInfo("homogeneous", name, keeps_offset=True, data=first)
    if name in ADAPTIVE_AVG_POOL or name in UPSAMPLE or name in IDENTITY:
        return OpInfo("linear", name, keeps_offset=True, data=first)
    if name in AVG_POOL:
        padding = _arg(node, 3, "padding", 0)
        counts_pad = _arg(node, 5, "count_include_pad", True)
        return OpInfo("linear", name, keeps_offset=_no_padding(padding) or not counts_pad, data=first)
    if name in DROPOUT:
        return OpInfo("linear", name, keeps_offset=False, data=first)
    if name in SCALE:
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        others = [a for a in node.args[1:] if not isinstance(a, fx.Node)]
        if len(tensors) == 1 and node.args and isinstance(node.args[0], fx.Node) and others and \
                all(isinstance(a, (int, float)) and a != 0 for a in others) and not node.kwargs:
            return OpInfo("linear", name, keeps_offset=True, data=first)
        if name == "mul" and len(tensors) == 1 and isinstance(node.args[-1], fx.Node) and \
                isinstance(node.args[0], (int, float)) and node.args[0] != 0:
            return OpInfo("linear", name, keeps_offset=True, data=node.args[-1])
        return OpInfo("unknown", f"{name} by a tensor")
    if name in REDUCE:
        dims = _arg(node, 1, "dim", None)
        if dims is None:
            return OpInfo("unknown", f"{name} over all dims")
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        return OpInfo("reduce", name, keeps_offset=True, data=first,
                      extra={"dims": dims, "keepdim": bool(_arg(node, 2, "keepdim", False))})
    if name == "flatten":
        return OpInfo("flatten", name, keeps_offset=True, data=first,
                      extra={"start": _arg(node, 1, "start_dim", 0), "end": _arg(node, 2, "end_dim", -1)})
    if name in RESHAPE:
        shape = node.args[1:] if len(node.args) > 1 else (node.kwargs.get("shape"),)
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return OpInfo("reshape", name, keeps_offset=True, data=first, extra={"shape": tuple(shape)})
    if name in RESHAPE_AS:   # the target shape is the other tensor's: only known with shapes
        return OpInfo("reshape", name, keeps_offset=True, data=first, extra={"shape": ()})
    if name in PERMUTE:
        return _classify_permute(node, name, first)
    if name in CAT:
        return OpInfo("cat", name, keeps_offset=True, data=first, extra={"dim": _arg(node, 1, "dim", 0)})
    if name in NORM_FUNCS:
        return _classify_norm_func(node, name, first)
    return OpInfo("unknown", name)


def _classify_permute(node: fx.Node, name: str, first) -> OpInfo:
    """permute(dims) / transpose(d0, d1) / t(): moves dims, never mixes them (extra: the dims)."""
    if name == "permute":
        dims = node.args[1:] if len(node.args) > 1 else (node.kwargs.get("dims"),)
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        extra = {"dims": tuple(dims)}
    elif name == "t":
        extra = {"swap": (0, 1), "rank2": True}
    else:
        extra = {"swap": (_arg(node, 1, "dim0"), _arg(node, 2, "dim1"))}
    if not all(isinstance(d, int) for d in extra.get("dims", extra.get("swap"))):
        return OpInfo("unknown", f"{name} with dims not known at trace time")
    return OpInfo("permute", name, keeps_offset=True, data=first, extra=extra)


def _no_padding(padding) -> bool:
    return padding == 0 or (isinstance(padding, (tuple, list)) and all(p == 0 for p in padding))


def _classify_module(m: nn.Module, name: str, first) -> OpInfo:
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return OpInfo("layer", name, data=first, extra={"kind": "conv_transpose"})
    if isinstance(m, nn.modules.conv._ConvNd):
        return OpInfo("layer", name, data=first, extra={"kind": "conv"})
    if isinstance(m, nn.Linear):
        return OpInfo("layer", name, data=first, extra={"kind": "linear"})
    if isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU)):
        return OpInfo("homogeneous", name, data=first)
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                      nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        return OpInfo("homogeneous", name, keeps_offset=True, data=first)
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Identity,
                      nn.Upsample)):
        return OpInfo("linear", name, keeps_offset=True, data=first)
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        return OpInfo("linear", name, data=first,
                      keeps_offset=_no_padding(m.padding) or not m.count_include_pad)
    if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
        return OpInfo("linear", name, keeps_offset=False, data=first)
    if isinstance(m, nn.Flatten):
        return OpInfo("flatten", name, keeps_offset=True, data=first,
                      extra={"start": m.start_dim, "end": m.end_dim})
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return OpInfo("norm", name, data=first, extra={"norm": "batch"})
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return OpInfo("norm", name, data=first, extra={"norm": "instance", "spatial": _instance_ndim(m)})
    if isinstance(m, nn.GroupNorm):
        return OpInfo("norm", name, data=first, extra={"norm": "group", "num_groups": m.num_groups,
                                                       "num_channels": m.num_channels})
    if isinstance(m, nn.LayerNorm):
        return OpInfo("norm", name, data=first, extra={"norm": "layer",
                                                       "normalized_ndim": len(m.normalized_shape)})
    return OpInfo("unknown", name)


def _instance_ndim(m: nn.Module) -> int:
    return {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}.get(
        next((c for c in type(m).__mro__ if c in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)),
             None), 0)


def _classify_norm_func(node: fx.Node, name: str, first) -> OpInfo:
    kind = NORM_FUNCS[name]
    if kind == "batch":
        training = _arg(node, 5, "training", False)
        if training is not True:
            return OpInfo("unknown", "batch_norm with running statistics")
        return OpInfo("norm", name, data=first, extra={"norm": "batch"})
    if kind == "instance":
        return OpInfo("norm", name, data=first, extra={"norm": "instance", "spatial": 0})
    if kind == "group":
        groups = _arg(node, 1, "num_groups", None)
        return OpInfo("norm", name, data=first, extra={"norm": "group", "num_groups": groups,
                                                       "num_channels": None})
    shape = _arg(node, 1, "normalized_shape", None)
    ndim = len(shape) if isinstance(shape, (tuple, list)) else 1
    return OpInfo("norm", name, data=first, extra={"norm": "layer", "normalized_ndim": ndim})


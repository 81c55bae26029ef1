"""Weight standardisation: a layer that normalises its own weight per output filter before using it.

NFNets' ``ScaledStdConv2d`` / ``StdConv2d`` and BiT's ``StdConv2d`` compute, inside ``forward``,
``w' = gain * (w - mean(w)) / std(w)`` over every dim but the output one, and convolve with ``w'``.
Scaling filter i of ``w`` by c_i > 0 then leaves ``w'``, and so the whole model, unchanged.

The pass shows this from the graph, not from class names: starting at the weight's ``get_attr``,
every op computed from the weight alone gets a *degree* k and a *row dim*, meaning "this value is
c^k times its value at c = 1, with c varying along the row dim" (the weight itself: k = 1, row dim
0). Shapes come from evaluating those weight-only ops on the actual tensors. The rules:

* moving data (reshape/view/flatten/permute/contiguous) keeps k and moves the row dim, refused
  when it mixes the rows with other dims;
* mean/sum over dims other than the row dim keep k; var gives 2k, std k (``var_mean`` /
  ``std_mean`` both);
* ``a ± b`` needs equal degrees and row dims; ``a * b`` adds degrees, ``a / b`` subtracts them;
  sqrt halves, rsqrt negates and halves, ``pow(x, p)`` multiplies by p; numbers and tensors that
  do not depend on the weight (gains) keep k;
* ``F.batch_norm(..., training=True)`` with the rows at dim 1 and ``F.layer_norm`` over dims after
  the row dim give k = 0;
* any op whose weight-dependent inputs all have k = 0 gives k = 0.

Adding a small number (at most ``MAX_EPS``) keeps k: the standardisation is then invariant up to
that eps, as BatchNorm is up to its own. The weight is standardised when every layer (conv or
linear) that consumes a value computed from it gets that value with k = 0 at its weight slot and
no value with k != 0 reaches anything else. Any op outside these rules: not recognised, and the
weight is analysed as before.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..capture import Captured
from .ops import IDENTITY, META, RESHAPE, RESHAPE_AS, _arg, classify, op_name

MAX_EPS = 1e-3

_STATS = {"mean": 1, "sum": 1, "std": 1, "var": 2}


@dataclass(frozen=True)
class Degree:
    """value = c^k * value(c = 1), c broadcast along ``row`` (counted from the back, < 0)."""
    k: Fraction
    row: int | None = None


ZERO = Degree(Fraction(0))


class _NotStandardized(Exception):
    pass


class _Sink(Exception):
    """The node also depends on something other than the weight and constants (the layer's input)."""


def standardized_uses(attr: fx.Node, weight: torch.Tensor, cap: Captured, layer_use) -> list | None:
    """The layer uses of a weight that reaches them only through a per-output-filter
    standardisation, each carrying the reason in words (``Use.standardized``); None when that
    cannot be shown. ``layer_use(node, value)`` is the ``Use`` of a conv/linear op consuming
    ``value`` at its weight slot, or None."""
    if weight.dim() < 2 or not attr.users:
        return None
    values: dict[fx.Node, object] = {attr: weight.detach()}
    degrees: dict[fx.Node, object] = {attr: Degree(Fraction(1), -weight.dim())}
    order = {n: i for i, n in enumerate(attr.graph.nodes)}
    pending, ops, uses = set(attr.users), [], []
    try:
        while pending:
            node = min(pending, key=order.__getitem__)
            pending.remove(node)
            try:
                with torch.no_grad():
                    values[node] = _evaluate(node, values, cap)
            except _Sink:
                uses.extend(_sink(node, degrees, layer_use))
                continue
            degrees[node] = _degree(node, degrees, values, cap)
            if any(degrees.get(a, ZERO) != ZERO for a in node.all_input_nodes):
                ops.append(op_name(node, cap.modules))   # for the reason: the ops that see the scaling
            pending |= set(node.users)
    except (_NotStandardized, _Sink):
        return None
    except Exception:   # evaluating the weight's own ops failed: nothing is shown
        return None
    if not uses or any(u.kind not in ("conv", "linear") or u.transposed for u in uses):
        return None
    chain = " -> ".join(dict.fromkeys(o for o in ops if o not in META and o not in ("getitem", "getattr")))
    reason = (f"weight standardisation: {chain} normalises every output filter of the weight before "
              f"{', '.join(sorted({u.node.name for u in uses}))} uses it, so a filter's scale never reaches "
              f"the layer's output")
    return [replace(u, standardized=reason) for u in uses]


def _sink(node: fx.Node, degrees: dict, layer_use) -> list:
    """A node that depends on more than the weight: only k = 0 values may enter it; a layer's
    weight slot gives a use."""
    fed = [a for a in node.all_input_nodes if a in degrees]
    if any(degrees[a] != ZERO for a in fed):
        raise _NotStandardized()
    return [u for u in (layer_use(node, a) for a in fed) if u is not None]


def _evaluate(node: fx.Node, values: dict, cap: Captured):
    """The node's value from the weight and constants (get_attr, numbers); _Sink when it needs more."""
    if node in values:
        return values[node]
    if node.op == "get_attr":
        owner, _, name = node.target.rpartition(".")
        mod = cap.modules.get(owner)
        if mod is None or not hasattr(mod, name):
            raise _Sink()
        values[node] = getattr(mod, name)
        return values[node]
    if node.op not in ("call_function", "call_method"):
        raise _Sink()
    raw = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if (raw.endswith("_") and not raw.startswith("_")) or node.kwargs.get("inplace") or (
            op_name(node, cap.modules) in ("batch_norm", "instance_norm")
            and (_arg(node, 1, "running_mean") is not None or _arg(node, 2, "running_var") is not None)):
        raise _NotStandardized()   # evaluating it would write to a tensor of the model

    def val(a):
        if isinstance(a, fx.Node):
            return _evaluate(a, values, cap)
        if isinstance(a, (list, tuple)):
            return type(a)(val(x) for x in a)
        if isinstance(a, dict):
            return {k: val(x) for k, x in a.items()}
        return a
    args, kwargs = val(tuple(node.args)), val(dict(node.kwargs))
    if node.op == "call_method":
        out = getattr(args[0], node.target)(*args[1:], **kwargs)
    else:
        out = node.target(*args, **kwargs)
    values[node] = out
    return out


def _degree(node: fx.Node, degrees: dict, values: dict, cap: Captured):
    name = op_name(node, cap.modules)
    deps = [a for a in node.all_input_nodes if a in degrees]
    if name in RESHAPE_AS:
        deps = deps[:1] if node.args and node.args[0] in deps else []   # the other tensor gives a shape
    deps = [a for a in deps if degrees[a] != ZERO]                      # these see the scaling
    if not deps:
        return ZERO                       # a function of values that do not see the scaling
    if name in META or (name == "getattr" and node.args[1] in ("shape", "ndim", "dtype", "device")):
        return ZERO
    if name == "getitem":
        src, index = node.args
        d = degrees[src]
        if isinstance(d, tuple) and isinstance(index, int):
            return d[index]
        raise _NotStandardized()
    if any(isinstance(degrees[a], tuple) for a in deps):
        raise _NotStandardized()
    first = node.args[0] if node.args else None
    if name in _STATS or name in ("var_mean", "std_mean"):
        return _stat(node, name, first, degrees, values)
    info = classify(node, cap.modules)
    if name in RESHAPE or name in RESHAPE_AS or name == "flatten" or name in IDENTITY or info.cls == "permute":
        if deps != [first]:
            raise _NotStandardized()
        if name in IDENTITY:
            return degrees[first]
        if info.cls == "permute":
            return _permuted(degrees[first], info, values[first], values[node])
        return _moved(degrees[first], values[first], values[node])
    if name in ("add", "sub"):
        return _sum(node, degrees, values)
    if name in ("mul", "div"):
        return _product(node, name, degrees, values)
    if name in ("sqrt", "rsqrt", "pow", "reciprocal", "neg", "abs"):
        if deps != [first]:
            raise _NotStandardized()
        d = degrees[first]
        factor = {"sqrt": Fraction(1, 2), "rsqrt": Fraction(-1, 2), "reciprocal": Fraction(-1),
                  "neg": Fraction(1), "abs": Fraction(1)}.get(name)
        if name == "pow":
            p = _arg(node, 1, "exponent")
            if not isinstance(p, (int, float)):
                raise _NotStandardized()
            factor = Fraction(p)   # exact: exponents that only nearly cancel are not taken to cancel
        return _deg(d.k * factor, d.row, values[node])
    if node.target in (F.batch_norm, F.layer_norm) or name in ("batch_norm", "layer_norm"):
        return _normalised(node, name, first, deps, degrees, values)
    raise _NotStandardized()


def _deg(k: Fraction, row: int | None, value) -> Degree:
    return ZERO if k == 0 else Degree(k, row)


def _front(row: int, value: torch.Tensor) -> int:
    return value.dim() + row


def _stat(node, name, first, degrees, values):
    d, x = degrees[first], values[first]
    if set(node.all_input_nodes) != {first} or not isinstance(x, torch.Tensor):
        raise _NotStandardized()
    dims = _arg(node, 1, "dim", None)
    if dims is None:
        raise _NotStandardized()          # over all dims, the row dim too
    dims = {(dd + x.dim()) % x.dim() for dd in ((dims,) if isinstance(dims, int) else dims)}
    r = _front(d.row, x)
    if r in dims:
        raise _NotStandardized()
    keep = bool(_arg(node, 2 if name in ("mean", "sum") else 3, "keepdim", False))
    row = d.row if keep else -(x.dim() - len(dims) - (r - sum(1 for dd in dims if dd < r)))
    if name in ("var_mean", "std_mean"):
        spread = 2 if name == "var_mean" else 1
        return (Degree(d.k * spread, row), Degree(d.k, row))
    return Degree(d.k * _STATS[name], row)


def _moved(d: Degree, x, y) -> Degree:
    """reshape / view / flatten: the rows must stay a dim of their own (memory order kept)."""
    from .invariance import _channel_kept
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise _NotStandardized()
    kept = _channel_kept(tuple(x.shape), tuple(y.shape), _front(d.row, x))
    if kept is None:
        raise _NotStandardized()
    return Degree(d.k, kept - y.dim())


def _permuted(d: Degree, info, x, y) -> Degree:
    r = _front(d.row, x)
    if "dims" in info.extra:
        dims = [dd % x.dim() for dd in info.extra["dims"]]
        return Degree(d.k, dims.index(r) - y.dim())
    a, b = (dd % max(x.dim(), 1) for dd in info.extra["swap"])
    return Degree(d.k, (b if r == a else a if r == b else r) - y.dim())


def _sum(node, degrees, values):
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    numbers = [a for a in node.args if isinstance(a, (int, float))]
    if node.kwargs or len(node.args) != 2:
        raise _NotStandardized()
    dep = [degrees.get(a) for a in tensors if a in degrees]
    if len(tensors) == 2 and len(dep) == 2 and dep[0] == dep[1]:
        return dep[0]                      # c^k a ± c^k b, same rows
    if len(dep) == 1 and len(numbers) == 1 and 0 <= numbers[0] <= MAX_EPS and node.args[0] in degrees \
            and op_name(node, {}) == "add":
        return dep[0]                      # var + eps: invariant up to eps, as BatchNorm is
    raise _NotStandardized()


def _product(node, name, degrees, values):
    if node.kwargs or len(node.args) != 2:
        raise _NotStandardized()
    a, b = node.args
    da = degrees.get(a, ZERO) if isinstance(a, fx.Node) else ZERO
    db = degrees.get(b, ZERO) if isinstance(b, fx.Node) else ZERO
    if isinstance(b, (int, float)) and b == 0 and name == "div":
        raise _NotStandardized()
    if da != ZERO and db != ZERO and da.row != db.row:
        raise _NotStandardized()
    row = da.row if da != ZERO else db.row
    k = da.k + db.k if name == "mul" else da.k - db.k
    return _deg(k, row, values[node])


def _normalised(node, name, first, deps, degrees, values):
    if deps != [first]:
        raise _NotStandardized()          # gains or biases computed from the weight
    d, x = degrees[first], values[first]
    r = _front(d.row, x)
    if name == "batch_norm":
        if _arg(node, 5, "training", False) is not True or r != 1 or x.dim() < 2:
            raise _NotStandardized()
        return ZERO                        # per channel (dim 1) over every other dim
    shape = _arg(node, 1, "normalized_shape")
    n = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
    if r >= x.dim() - n:
        raise _NotStandardized()          # the rows are normalised together
    return ZERO

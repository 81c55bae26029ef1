"""Capture a model as a torch.fx graph whose nodes the analysis passes can read.

Two paths, recorded in ``Captured.path``:

* ``"fx"``: ``torch.fx`` symbolic tracing with standard ``torch.nn`` modules (and subclasses of
  the layers and normalisations the analysis knows) as leaves.
* ``"run"``: when symbolic tracing fails (data-dependent control flow, ...) and example inputs
  are given, the model is run once under a ``TorchFunctionMode`` plus forward hooks on leaf
  modules, and the ops that actually ran are written into an ``fx.Graph`` with the same node
  kinds (call_module / call_function / get_attr / placeholder / output). It describes the path
  taken for those inputs only; this is said in the plan report.

In-place ops: fx keeps later uses of a tensor pointing at the value before ``F.relu_(x)`` when its
result is not reassigned; the in-place node stays a user of that value. The invariance pass follows
every user, so such an op is still checked on the path (and the ops it knows in place keep the
signal as it was). The run path rebinds the tensor to the in-place op's node, as executed.

With example inputs, every tensor-valued node gets ``node.meta["gc_shape"]``. Running the model
for shapes leaves it as it was: training flag, buffers (BatchNorm running stats) and the global
RNG state are restored afterwards.
"""
from __future__ import annotations

import contextlib
import operator
import traceback
from dataclasses import dataclass, field
from typing import Mapping, Any

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import GeomCompileError

# Module types the analysis understands as a whole; user subclasses of these stay leaves too.
_KNOWN_LEAF_TYPES = (
    nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
    nn.Embedding,
)


def is_leaf_module(m: nn.Module) -> bool:
    """torch.fx's default rule (torch.nn modules except Sequential) plus subclasses of known layers."""
    if isinstance(m, _KNOWN_LEAF_TYPES):
        return True
    mod = type(m).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")) and not isinstance(
        m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf_module(m)


@dataclass
class Captured:
    graph: fx.Graph
    modules: dict[str, nn.Module]                # qualified name -> module (leaves and containers)
    path: str                                    # "fx" or "run"
    has_shapes: bool
    notes: list[str] = field(default_factory=list)


def split_inputs(example_inputs) -> tuple[tuple, dict]:
    """example_inputs as (positional, keyword) arguments of one forward call. Accepted: a tuple or list
    of positional inputs, a single tensor, or a Mapping of keyword arguments (a Hugging Face batch)."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def capture(model: nn.Module, example_inputs=None) -> Captured:
    modules = dict(model.named_modules())
    if example_inputs is not None:
        example_inputs = split_inputs(example_inputs)
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # symbolic tracing can fail in many ways; all mean "use the fallback"
        where = _module_where_tracing_stopped(model, exc)
        if example_inputs is None:
            raise GeomCompileError(
                f"torch.fx could not trace the model: it stopped in {where} with "
                f"{type(exc).__name__}: {_first_line(exc)}. Pass example_inputs=(a batch of inputs,) "
                f"to gc.analyze/gc.plan/gc.apply so geomcompile can capture the graph by running "
                f"the model once instead.") from exc
        graph = _record_run(model, *example_inputs)
        return Captured(graph, modules, "run", True,
                        [f"torch.fx tracing stopped in {where} ({type(exc).__name__}); the graph was "
                         f"captured by running the model once on example_inputs, so it shows the "
                         f"control-flow path taken for those inputs"])
    if example_inputs is not None:
        _propagate_shapes(model, graph, *example_inputs)
    return Captured(graph, modules, "fx", example_inputs is not None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def _module_where_tracing_stopped(model: nn.Module, exc: BaseException) -> str:
    """Innermost module whose forward was on the stack when tracing raised."""
    names = {id(m): n for n, m in model.named_modules()}
    where = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        code = frame.f_code
        obj = frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None  # `self`, however spelled
        if isinstance(obj, nn.Module) and id(obj) in names:
            name = names[id(obj)] or "<root>"
            where = f"module {name!r} ({type(obj).__name__}.{frame.f_code.co_name}, line {frame.f_lineno})"
    return where or f"the model's top level ({type(model).__name__})"


# ---------------------------------------------------------------------------------------------
# shapes, and running the model without changing it
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def preserved_state(model: nn.Module, train: bool = True):
    """Run the model in training mode, then restore its mode, buffers and the RNG state."""
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    rng = torch.get_rng_state()
    try:
        model.train(train)
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        torch.set_rng_state(rng)


def _shape_of(value: Any):
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


class _ShapeInterpreter(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        n.meta["gc_shape"] = _shape_of(out)
        return out


def _propagate_shapes(model: nn.Module, graph: fx.Graph, args: tuple, kwargs: dict) -> None:
    gm = fx.GraphModule(model, graph)
    if kwargs:       # placeholders are forward's parameters in order; fill them by name, else their default
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        args = tuple(args) + tuple(kwargs[n.target] if n.target in kwargs else (n.args[0] if n.args else None)
                                   for n in placeholders[len(args):])
    with preserved_state(model):
        _ShapeInterpreter(gm).run(*args)


# ---------------------------------------------------------------------------------------------
# run-based capture
# ---------------------------------------------------------------------------------------------
class _Recorder(TorchFunctionMode):
    """Writes every torch function / Tensor method called outside leaf modules into an fx.Graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.graph = fx.Graph()
        self.env: dict[int, fx.Node] = {}
        self.keep: list[Any] = []          # keep recorded tensors alive so ids stay unique
        self.depth = 0                      # > 0 while inside a leaf module's forward
        self.qualname = {id(m): n for n, m in model.named_modules()}
        self.attr_name = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.attr_name.setdefault(id(p), name)
        for name, b in model.named_buffers(remove_duplicate=False):
            self.attr_name.setdefault(id(b), name)

    def bind(self, value: Any, node: fx.Node) -> None:
        if isinstance(value, torch.Tensor):
            self.env[id(value)] = node
            self.keep.append(value)
            node.meta["gc_shape"] = tuple(value.shape)

    def lookup(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) in self.env:
                return self.env[id(value)]
            if id(value) in self.attr_name:
                node = self.graph.get_attr(self.attr_name[id(value)])
                self.bind(value, node)
                return node
            node = self.graph.call_function(_untracked_tensor, ())  # made outside what we saw
            self.bind(value, node)
            return node
        if isinstance(value, (list, tuple)):  # named tuples become plain tuples
            items = [self.lookup(v) for v in value]
            return items if isinstance(value, list) else tuple(items)
        if isinstance(value, dict):
            return {k: self.lookup(v) for k, v in value.items()}
        if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device, slice)):
            return value
        if isinstance(value, torch.Size):
            return tuple(value)
        return repr(value)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            node = self.graph.call_function(func, self.lookup(tuple(args)), self.lookup(dict(kwargs)))
            self._bind_output(out, node)
        return out

    def _bind_output(self, out: Any, node: fx.Node) -> None:
        if isinstance(out, torch.Tensor):
            self.bind(out, node)
        elif isinstance(out, (tuple, list)):
            for i, item in enumerate(out):
                if isinstance(item, torch.Tensor):
                    self.bind(item, self.graph.call_function(operator.getitem, (node, i)))


def _untracked_tensor():
    """Marker target for tensors the recorder saw only as inputs (created outside its view)."""


def _record_run(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> fx.Graph:
    example_kwargs = example_kwargs or {}
    rec = _Recorder(model)
    handles = []

    # Hooks run with the recording mode active: bookkeeping (x.shape, ...) happens at depth > 0
    # so that it is not recorded as part of the model.
    def pre(mod, args, kwargs):
        rec.depth += 1
        if rec.depth == 1:
            mod._gc_call_args = (rec.lookup(tuple(args)), rec.lookup(dict(kwargs)))

    def post(mod, args, kwargs, out):
        if rec.depth == 1:
            a, kw = mod._gc_call_args
            del mod._gc_call_args
            node = rec.graph.call_module(rec.qualname[id(mod)], a, kw)
            rec._bind_output(out, node)
        rec.depth -= 1

    for m in model.modules():
        if is_leaf_module(m) and m is not model:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        with preserved_state(model):
            placeholders = []
            for i, x in enumerate(example_inputs):
                node = rec.graph.placeholder(f"input_{i}")
                rec.bind(x, node)
                placeholders.append(node)
            for key, x in example_kwargs.items():
                node = rec.graph.placeholder(f"input_{key}")
                rec.bind(x, node)
                placeholders.append(node)
            with rec:
                out = model(*example_inputs, **example_kwargs)
            rec.graph.output(rec.lookup(out))
    except Exception as exc:
        raise GeomCompileError(
            f"geomcompile could not capture the model by running it on example_inputs: "
            f"{type(exc).__name__}: {_first_line(exc)}. Check that model(*example_inputs) (or model(**example_inputs) for a mapping) runs.") from exc
    finally:
        for h in handles:
            h.remove()
    return rec.graph

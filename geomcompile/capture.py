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

Example inputs (``normalize_example_inputs``): a tuple or list of positional inputs, one tensor, or
a ``Mapping`` of keyword arguments (``model(**batch)``, as for Hugging Face batches). A forward
argument that has a default and is not given is traced as that default (fx ``concrete_args``), so
``if attention_mask is not None:`` takes the branch the inputs take. With example inputs, every
tensor-valued node gets ``node.meta["gc_shape"]``. Running the model for shapes leaves it as it
was: training flag, buffers (BatchNorm running stats) and the global RNG state are restored
afterwards.

Wrappers (``geomcompile.names``): the root's torch.compile / DDP / DataParallel / FSDP1 /
checkpoint wrappers are peeled off, wrappers inside the model are traced through as if absent,
and every module target in the graph and every key of ``Captured.modules`` is a canonical name.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import traceback
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .errors import GeomCompileError
from .names import canonical_module_names, is_compiled, unwrap_model, unwrap_one

# Module types the analysis understands as a whole; user subclasses of these stay leaves too.
_KNOWN_LEAF_TYPES = (
    nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
    nn.Embedding,
)


def is_leaf_module(m: nn.Module) -> bool:
    """torch.fx's default rule (torch.nn modules except Sequential) plus subclasses of known layers.
    Wrappers (DDP, DataParallel, ...) are not leaves: what they wrap is analysed. A conv or linear
    subclass with a forward of its own is traced through, so that what it does to its weight (weight
    standardisation, ...) is seen."""
    if isinstance(m, _KNOWN_LEAF_TYPES):
        return not _own_layer_forward(m)
    if unwrap_one(m) is not None:
        return False
    mod = type(m).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")) and not isinstance(
        m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def _own_layer_forward(m: nn.Module) -> bool:
    """A conv / linear subclass from outside torch.nn that overrides forward (or _conv_forward)."""
    if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
        return False
    base = next(c for c in type(m).__mro__ if c.__module__.startswith(("torch.nn", "torch.ao.nn")))
    return any(getattr(type(m), a, None) is not getattr(base, a, None) for a in ("forward", "_conv_forward"))


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf_module(m)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        inner = unwrap_one(m)
        if inner is not None:     # a wrapper inside the model: trace the module it wraps instead
            return self.call_module(inner, inner.forward, args, kwargs)
        return super().call_module(m, forward, args, kwargs)


@dataclass
class Captured:
    graph: fx.Graph
    modules: dict[str, nn.Module]                # qualified name -> module (leaves and containers)
    path: str                                    # "fx" or "run"
    has_shapes: bool
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExampleInputs:
    """One forward call's inputs: ``model(*args, **kwargs)``."""

    args: tuple
    kwargs: dict

    def describe(self) -> str:
        return ", ".join(["*args"] * bool(self.args) + ["**kwargs"] * bool(self.kwargs)) or "no inputs"


def normalize_example_inputs(example_inputs) -> ExampleInputs | None:
    """None; a tuple or list of positional inputs; a Mapping of keyword inputs (``model(**batch)``);
    anything else (one tensor) is the single positional input. A model whose forward takes one dict
    positionally gets it as ``(batch,)``."""
    if example_inputs is None or isinstance(example_inputs, ExampleInputs):
        return example_inputs
    if isinstance(example_inputs, Mapping):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise GeomCompileError(f"example_inputs given as a mapping are keyword arguments, so its keys must "
                                   f"be strings; got {bad[0]!r}. Fix: pass (batch,) if forward takes the "
                                   f"mapping as one positional argument")
        return ExampleInputs((), dict(example_inputs))
    if isinstance(example_inputs, (tuple, list)):
        return ExampleInputs(tuple(example_inputs), {})
    return ExampleInputs((example_inputs,), {})


def capture(model: nn.Module, example_inputs=None) -> Captured:
    """Capture the model (wrappers peeled off) with the given example inputs (see the module docstring)."""
    model, peeled = unwrap_model(model)
    inputs = normalize_example_inputs(example_inputs)
    canon = canonical_module_names(model)
    modules = {canon[raw]: m for raw, m in model.named_modules(remove_duplicate=False)}  # inner wins
    notes = [f"analysed the model inside {peeled}; parameter names are given without the wrapper's "
             f"prefix"] if peeled else []
    concrete = _absent_defaults(model, inputs) if inputs is not None else None
    try:
        graph = _LeafTracer().trace(model, concrete_args=concrete or None)
    except Exception as exc:  # symbolic tracing can fail in many ways; all mean "use the fallback"
        where = _module_where_tracing_stopped(model, exc, canon)
        if inputs is None:
            raise GeomCompileError(
                f"torch.fx could not trace the model: it stopped in {where} with "
                f"{type(exc).__name__}: {_first_line(exc)}. Pass example_inputs=(a batch of inputs,) "
                f"(or a dict of keyword inputs) to gc.analyze/gc.plan/gc.apply so geomcompile can "
                f"capture the graph by running the model once instead.") from exc
        return _run_capture(model, inputs, canon, modules, notes,
                            f"torch.fx tracing stopped in {where} ({type(exc).__name__})")
    if inputs is not None:
        try:
            _propagate_shapes(model, graph, inputs)
        except GeomCompileError:
            raise
        except Exception as exc:  # the traced graph does not run on these inputs: record what does run
            return _run_capture(model, inputs, canon, modules, notes,
                                f"the traced graph did not run on example_inputs ({type(exc).__name__}: "
                                f"{_first_line(exc)})")
    _rename_targets(graph, canon)
    return Captured(graph, modules, "fx", inputs is not None, notes)


def _run_capture(model, inputs: ExampleInputs, canon, modules, notes, why: str) -> Captured:
    graph = _record_run(model, inputs, canon)
    return Captured(graph, modules, "run", True,
                    notes + [f"{why}; the graph was captured by running the model once on example_inputs, "
                             f"so it shows the control-flow path taken for those inputs"])


def _absent_defaults(model: nn.Module, inputs: ExampleInputs) -> dict[str, Any]:
    """Forward arguments with a default that the inputs leave out: traced as that default."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    positional = [n for n, p in params.items()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:len(inputs.args)]
    # Only defaults fx can check for (other values would only get a warning from fx).
    return {n: p.default for n, p in params.items()
            if n not in positional and n not in inputs.kwargs
            and (p.default is None or type(p.default) in (bool, int, float, str))}


def _rename_targets(graph: fx.Graph, canon: dict[str, str]) -> None:
    """Module and attribute targets in canonical names (wrappers inside the model dropped)."""
    for node in graph.nodes:
        if node.op == "call_module":
            node.target = canon.get(node.target, node.target)
        elif node.op == "get_attr":
            owner, _, attr = node.target.rpartition(".")
            if owner in canon:
                node.target = f"{canon[owner]}.{attr}" if canon[owner] else attr


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def _module_where_tracing_stopped(model: nn.Module, exc: BaseException, canon: dict[str, str]) -> str:
    """Innermost module whose forward was on the stack when tracing raised (canonical name)."""
    names = {id(m): canon[n] for n, m in model.named_modules()}
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
    """Run the model in training mode, then restore its mode, buffers and the RNG states (CPU and CUDA)."""
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    rng = torch.get_rng_state()
    # CUDA's generators too (dropout on CUDA inputs draws from them); only when CUDA is already
    # initialised, so that capturing a CPU model never creates a CUDA context
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
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
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _shape_of(value: Any):
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


class _ShapeInterpreter(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        n.meta["gc_shape"] = _shape_of(out)
        return out


def _placeholder_values(model: nn.Module, graph: fx.Graph, inputs: ExampleInputs) -> dict[fx.Node, Any]:
    """The value of every placeholder of a traced graph for one call model(*args, **kwargs)."""
    try:
        bound = inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs)
    except TypeError as exc:
        raise GeomCompileError(f"example_inputs ({inputs.describe()}) do not fit "
                               f"{type(model).__name__}.forward: {exc}") from None
    params = inspect.signature(model.forward).parameters
    env = {}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        name = node.target.lstrip("*")
        if name in bound.arguments:
            value = bound.arguments[name]
            env[node] = list(value) if params[name].kind is inspect.Parameter.VAR_POSITIONAL else value
        elif node.target.startswith("**"):
            env[node] = {}
        elif node.target.startswith("*"):
            env[node] = []
        elif node.args:                  # a default, or a value fx specialised the trace to
            env[node] = node.args[0]
        else:
            raise GeomCompileError(f"example_inputs ({inputs.describe()}) give no value for "
                                   f"{type(model).__name__}.forward's argument {node.target!r}")
    return env


def _propagate_shapes(model: nn.Module, graph: fx.Graph, inputs: ExampleInputs) -> None:
    env = _placeholder_values(model, graph, inputs)
    for node, value in env.items():
        node.meta["gc_shape"] = _shape_of(value)
    gm = fx.GraphModule(model, graph)
    with preserved_state(model):
        _ShapeInterpreter(gm).run(initial_env=dict(env))


# ---------------------------------------------------------------------------------------------
# run-based capture
# ---------------------------------------------------------------------------------------------
class _Recorder(TorchFunctionMode):
    """Writes every torch function / Tensor method called outside leaf modules into an fx.Graph."""

    def __init__(self, model: nn.Module, canon: dict[str, str]):
        super().__init__()
        self.graph = fx.Graph()
        self.env: dict[int, fx.Node] = {}
        self.keep: list[Any] = []          # keep recorded tensors alive so ids stay unique
        self.depth = 0                      # > 0 while inside a leaf module's forward
        self.qualname = {id(m): canon[n] for n, m in model.named_modules()}
        self.attr_name = {}
        for n, m in model.named_modules(remove_duplicate=False):
            for local, t in [*m._parameters.items(), *m._buffers.items()]:
                if t is not None:
                    self.attr_name.setdefault(id(t), f"{canon[n]}.{local}" if canon[n] else local)

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


def _eager_compiled_submodules(model: nn.Module):
    """torch.compile'd submodules run eagerly, so the recorder sees their ops."""
    if any(is_compiled(m) for m in model.modules()) and hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


def _record_run(model: nn.Module, inputs: ExampleInputs, canon: dict[str, str]) -> fx.Graph:
    rec = _Recorder(model, canon)
    handles = []
    call_args: dict[int, tuple] = {}     # per module call; nothing is stored on the user's modules

    # Hooks run with the recording mode active: bookkeeping (x.shape, ...) happens at depth > 0
    # so that it is not recorded as part of the model.
    def pre(mod, args, kwargs):
        rec.depth += 1
        if rec.depth == 1:
            call_args[id(mod)] = (rec.lookup(tuple(args)), rec.lookup(dict(kwargs)))

    def post(mod, args, kwargs, out):
        if rec.depth == 1:
            a, kw = call_args.pop(id(mod))
            node = rec.graph.call_module(rec.qualname[id(mod)], a, kw)
            rec._bind_output(out, node)
        rec.depth -= 1

    for m in model.modules():
        if is_leaf_module(m) and m is not model:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        with preserved_state(model), _eager_compiled_submodules(model):
            named = [(f"input_{i}", x) for i, x in enumerate(inputs.args)] + list(inputs.kwargs.items())
            for name, value in named:
                leaves = [value] if isinstance(value, torch.Tensor) else tree_leaves(value)
                tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
                for j, t in enumerate(tensors):
                    rec.bind(t, rec.graph.placeholder(name if len(tensors) == 1 else f"{name}_{j}"))
            with rec:
                out = model(*inputs.args, **inputs.kwargs)
            rec.graph.output(rec.lookup(out))
    except Exception as exc:
        call = {"*args": "model(*example_inputs)", "**kwargs": "model(**example_inputs)",
                "*args, **kwargs": "model(*args, **kwargs)", "no inputs": "model()"}[inputs.describe()]
        raise GeomCompileError(
            f"geomcompile could not capture the model by running it on example_inputs: "
            f"{type(exc).__name__}: {_first_line(exc)}. Check that {call} runs.") from exc
    finally:
        for h in handles:
            h.remove()
    return rec.graph

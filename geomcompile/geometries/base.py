"""The one interface every geometry implements, and the registry that drives policies and tests.

A geometry is a small class: a *stage* (penalty, metric or manifold), typed options, a check of
whether it can apply to a parameter, a grouping of parameters into *units*, and an update
program (pre-step gradient transform, post-step retraction) written as calls to pure functions.
The runtime never branches on which geometry it runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from ..analysis.facts import ParamFacts
from ..errors import GeomCompileError

STAGES = ("penalty", "metric", "manifold")  # order in which pre-step transforms run


@dataclass(frozen=True)
class Option:
    """One option of a geometry as written in YAML.

    type: python type(s) accepted (float accepts int); choices: allowed values;
    check: (value) -> error message or None, for range checks; doc: one line for docs/--help;
    schema: a JSON Schema fragment for the value (``geomcompile schema``). Its numeric bounds
    (minimum, exclusiveMinimum, maximum, exclusiveMaximum) are also enforced here, so the schema
    and strict validation agree; a check built by ``bounded`` carries its fragment itself.
    """

    type: type | tuple[type, ...]
    default: Any
    doc: str = ""
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None
    schema: dict | None = None

    def schema_fragment(self) -> dict:
        """The JSON Schema keywords this option adds to its type (the check's, then its own)."""
        return {**getattr(self.check, "schema", {}), **(self.schema or {})}

    def coerce(self, value: Any) -> Any:
        """An int written where a number is expected becomes a float (``lam: 1`` means 1.0)."""
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        if float in types and int not in types and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    def validate(self, value: Any) -> str | None:
        """Return None if `value` is acceptable, else a message saying what is expected."""
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in types:
            return f"expected {_type_names(types)}, got a boolean"
        if not isinstance(value, types):
            return f"expected {_type_names(types)}, got {type(value).__name__} {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if self.choices is not None and value not in self.choices:
            return f"expected one of {', '.join(map(str, self.choices))}, got {value!r}"
        if self.check is not None and (problem := self.check(value)):
            return problem
        return _bounds_problem(self.schema or {}, value)


def _type_names(types) -> str:
    return " or ".join({float: "a number", int: "an integer", str: "a string", bool: "a boolean",
                        list: "a list", dict: "a mapping"}.get(t, t.__name__) for t in types)


_BOUNDS = {"exclusiveMinimum": (lambda v, b: v > b, ">"), "minimum": (lambda v, b: v >= b, ">="),
           "exclusiveMaximum": (lambda v, b: v < b, "<"), "maximum": (lambda v, b: v <= b, "<=")}


def _bounds_problem(schema: dict, value) -> str | None:
    """The first JSON Schema numeric bound in `schema` that a number `value` breaks, in words."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    for key, (holds, sign) in _BOUNDS.items():
        if key in schema and not holds(value, schema[key]):
            return f"must be {sign} {schema[key]}, got {value}"
    return None


def bounded(**schema) -> Callable[[Any], str | None]:
    """A range check from JSON Schema bounds, carrying them for ``geomcompile schema``:
    ``bounded(exclusiveMinimum=0)`` says "must be > 0, got -1"."""
    def check(v) -> str | None:
        return _bounds_problem(schema, v)
    check.schema = dict(schema)
    return check


@dataclass(frozen=True)
class Range:
    """A numeric range an option's value must lie in, usable as ``Option(check=...)``; it also
    describes itself, so docs and schemas can state it. An upper bound is there because larger
    values overflow or stall training (a policy loader must never accept a value that produces NaN
    at step 1 or hangs a step); ``why_high`` says which."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False       # low itself is excluded
    high_open: bool = False
    why_high: str = ""

    def _low(self) -> str:
        return f"{'>' if self.low_open else '>='} {_number(self.low)}"

    def _high(self) -> str:
        return f"{'<' if self.high_open else '<='} {_number(self.high)}"

    def describe(self) -> str:
        if self.high is None or self.low is None:
            return self._low() if self.high is None else self._high()
        return (f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.high_open else ']'}")

    def __call__(self, v) -> str | None:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return f"must be {self._low()}, got {v}"
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            why = f" ({self.why_high})" if self.why_high else ""
            return f"must be {self._high()}, got {v}{why}"
        return None

    @property
    def schema(self) -> dict:
        """The same range as JSON Schema bounds (``geomcompile schema``)."""
        out = {}
        if self.low is not None:
            out["exclusiveMinimum" if self.low_open else "minimum"] = self.low
        if self.high is not None:
            out["exclusiveMaximum" if self.high_open else "maximum"] = self.high
        return out


def _number(x: float) -> str:
    """1000000.0 -> "1e6", 1000 -> "1000", 0.5 -> "0.5"."""
    if float(x).is_integer() and abs(x) < 1e5:
        return str(int(x))
    return f"{x:.6g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


positive = Range(0, low_open=True)
non_negative = Range(0)


@dataclass(frozen=True)
class Unit:
    """The parameters one geometry instance updates together: one tensor, or coupled tensors of
    several layers and param groups (G-SGD couples a hidden unit's incoming and outgoing weights).
    No backend ever splits a unit."""

    names: tuple[str, ...]
    facts: tuple[ParamFacts, ...]

    @property
    def key(self) -> str:
        return "+".join(self.names)

    def single(self, geometry: str) -> ParamFacts:
        """The one parameter of a unit, for geometries that act on one tensor at a time; a coupled unit
        is an error (such a geometry's units() never forms one)."""
        if len(self.facts) != 1:
            raise GeomCompileError(f"{geometry} acts on one parameter per unit, got the unit {self.key}")
        return self.facts[0]


@dataclass(frozen=True)
class Rescale:
    """A function-preserving rescale that a retraction has just applied to one parameter.

    Output channel ``i`` of ``param`` (along ``facts.out_dim``) was multiplied by
    ``channel_factors[i]`` (1.0 where unchanged). The runtime applies the generic consequences:
    the base optimizer's state is rescaled by the powers the geometry declares
    (``Geometry.state_powers``), weight-like state of known optimizer wrappers follows the
    weight, running statistics of the normalisations that absorb the channels are rescaled
    (eval mode keeps its function), and ``plan.on_retract`` callbacks are called with it.
    """

    name: str
    param: torch.nn.Parameter
    facts: ParamFacts
    channel_factors: torch.Tensor

    @property
    def scale(self) -> torch.Tensor:
        """The factors as a tensor broadcastable against the parameter."""
        dim = self.facts.out_dim or 0
        shape = [1] * self.param.dim()
        if shape:
            shape[dim] = -1
        return self.channel_factors.reshape(shape)


@dataclass
class StepContext:
    """What the runtime hands to a geometry's update program at one optimizer step."""

    optimizer: torch.optim.Optimizer    # the optimizer that owns the state and the step (wrappers unwrapped)
    params: dict[str, torch.nn.Parameter]
    group_of: dict[str, dict]           # parameter name -> its optimizer param_group
    model: torch.nn.Module | None = None
    handles: list = field(default_factory=list)   # hooks a geometry registers at install, removed with the plan
    stepped: frozenset = frozenset()     # names of the parameters that had a gradient at this step's start
    rescale_observed: Callable[[str], bool] = lambda name: False   # does anything follow its rescales?
    shards: dict = field(default_factory=dict)   # name -> runtime.distributed.ShardInfo (DTensor params)
    queued: list = field(default_factory=list)   # sharded programs waiting for this stage's collectives
    # A 0-d bool tensor on a device while GradScaler's verdict on this step (inf/NaN found: the fused
    # base optimizer skips it) is left on the device instead of read on the host; None otherwise. Only
    # set when every work item's geometry declares ``honours_device_skip``.
    skip: "torch.Tensor | None" = None

    def opt_state(self, name: str) -> dict:
        """The base optimizer's own state for a parameter (momentum_buffer, exp_avg, ...)."""
        return self.optimizer.state[self.params[name]]

    def shard(self, name: str):
        """The ShardInfo of a sharded (FSDP2 DTensor) parameter, or None: a geometry's program runs its
        sharded form on the local shard when it is not None (runtime/distributed.py)."""
        return self.shards.get(name)

    def run_sharded(self, program) -> None:
        """Queue a sharded program (a generator yielding runtime.distributed.Collective requests; what a
        post_step's program returns is its list of Rescale events). The runtime runs the programs queued
        in one stage together, with one collective per round for all of them (run_queued)."""
        self.queued.append(program)

    def run_queued(self) -> list:
        """Run the queued sharded programs together; the Rescale events they return (runtime only)."""
        if not self.queued:
            return []
        from ..runtime.distributed import run_together     # late: the runtime imports the geometries
        programs, self.queued = self.queued, []
        return [event for events in run_together(programs) for event in (events or [])]

    def skip_on(self, device: torch.device) -> "torch.Tensor | None":
        """``skip`` on `device` (None when the step is not skipped on the device)."""
        if self.skip is None or self.skip.device == device:
            return self.skip
        return self.skip.to(device)

    def has_grad(self, name: str) -> bool:
        """Whether the parameter takes part in this step (frozen or unused ones must not be touched)."""
        return name in self.stepped


class Geometry:
    """Base class. Subclasses set ``name``, ``stage``, ``options`` and override the hooks they need."""

    name: ClassVar[str]
    stage: ClassVar[str]
    options: ClassVar[dict[str, Option]] = {}
    paper: ClassVar[str] = ""            # seed file it implements
    needs_example_inputs: ClassVar[bool] = False
    incompatible: ClassVar[tuple[str, ...]] = ()   # geometries that must not share a parameter with it
    match_hint: ClassVar[str] = "narrow its match"  # what to add to a rule's match so check() passes
    # How the base optimizer's state of a parameter scales when a retraction multiplies a unit by c:
    # key -> power (state *= c**power). Only geometries whose retractions preserve the function
    # (they return Rescale events) need it.
    state_powers: ClassVar[dict[str, int]] = {}
    # Fast paths next to the geometry: backend name -> "module:attribute" of a FastPath class, imported
    # only when that backend runs. The registry-driven tests check each against the eager program.
    fast_paths: ClassVar[dict[str, str]] = {}
    # Weight decay works against this geometry (it breaks the scale invariance psi relies on, it pulls
    # pom's weights off their manifold): plan.param_groups() puts its parameters in a weight_decay=0 group.
    hurt_by_weight_decay: ClassVar[bool] = False
    # Its programs on every backend leave the weights, the base optimizer's state and the geometry's own
    # state bit for bit unchanged at a step whose ``StepContext.skip`` is true (the flag stays on the
    # device: no host sync). Where any installed geometry lacks it, the runtime reads GradScaler's
    # found_inf on the host and runs no geometry at a skipped step.
    honours_device_skip: ClassVar[bool] = False

    # Why the geometry cannot run on a sharded (FSDP2, Shard(0) DTensor) parameter, or None when its
    # programs compute the full-tensor update on a shard (runtime/distributed.py). A geometry that
    # does not say otherwise is refused at install on sharded parameters.
    shard_refusal: ClassVar[str | None] = "has no sharded form yet"

    def __init__(self, **opts: Any):
        unknown = set(opts) - set(self.options)
        if unknown:
            raise GeomCompileError(f"{self.name}: unknown option(s) {sorted(unknown)}; "
                                   f"known: {sorted(self.options)}")
        resolved = {}
        for key, spec in self.options.items():
            value = opts.get(key, spec.default)
            if key in opts:
                problem = spec.validate(value)
                if problem:
                    raise GeomCompileError(f"{self.name}.{key}: {problem}")
            resolved[key] = spec.coerce(value)
        self.opts = resolved

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.opts.items())})"

    def label(self) -> str:
        """Compact form for reports: the name and the options that differ from their defaults."""
        changed = [f"{k}={v}" for k, v in self.opts.items() if v != self.options[k].default]
        return f"{self.name}({', '.join(changed)})" if changed else self.name

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.opts == other.opts

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted((k, repr(v)) for k, v in self.opts.items()))))

    # ---- planning ---------------------------------------------------------------------------
    def config_warnings(self) -> list[str]:
        """Problems with this combination of options, whatever the parameter: it runs, but does not
        do what the options suggest. Each says how to fix it. The policy loader reports them at
        the `use` entry (file:line:column) and lists them in the plan's warnings."""
        return []

    def check(self, facts: ParamFacts) -> str | None:
        """Why this geometry cannot apply to the parameter (quoting the analysis), or None."""
        return None

    def units(self, facts: Sequence[ParamFacts], structure=None) -> list[Unit]:
        """Group the parameters assigned to this geometry into units. Default: one per parameter.

        ``structure`` is the analysis Structure of the whole model, for geometries whose units
        couple parameters across layers."""
        return [Unit((f.name,), (f,)) for f in facts]

    def check_unit(self, unit: Unit) -> str | None:
        """Why this unit cannot be formed (the policy adds the rule's file:line:column), or None."""
        return None

    def check_install(self, unit: Unit, ctx: StepContext) -> str | None:
        """Why this unit cannot run with this optimizer, its param groups and its current weights (the
        plan adds the rule's file:line:column), or None. Called for every unit before any on_install
        changes a weight, so a refusal leaves the model and the optimizer as they were."""
        return None

    def shard_local(self, facts: ParamFacts) -> bool:
        """Whether the update of this parameter, sharded on dim 0, needs no other rank's rows (so a
        fast path may run it on the local shard alone, without collectives). Default False: the
        runtime then runs the geometry's eager sharded program."""
        return False

    def shard_check(self, facts: ParamFacts) -> str | None:
        """Why this geometry cannot run on the parameter sharded on dim 0, or None. Default: the class's
        ``shard_refusal``; a geometry with a sharded form for some layouts only refines it."""
        return type(self).shard_refusal

    def warnings(self, unit: Unit, ctx: StepContext) -> list[str]:
        """Plan-time warnings (e.g. weight decay that breaks an invariance). A warning about one
        parameter should be a ``geomcompile.findings.Finding``, so that the plan reports one line
        per cause instead of one per parameter."""
        return []

    # ---- runtime (eager reference program) ----------------------------------------------------
    def init_state(self, unit: Unit, ctx: StepContext) -> dict:
        """Geometry state for a unit, created at install (a checkpoint loader needs its destination).
        Owned by the plan and carried inside optimizer.state_dict() (runtime/state.py); prefer tensors."""
        return {}

    def on_install(self, unit: Unit, state: dict, ctx: StepContext) -> list[str]:
        """Called once when the plan is installed. Returns report lines (e.g. 'retracted onto sphere')."""
        return []

    def pre_step(self, unit: Unit, grads: list[torch.Tensor], state: dict, ctx: StepContext) -> None:
        """Transform the gradients of the unit in place (penalty adds, metric rescales/mixes).

        ``grads`` are the parameters' ``.grad`` tensors (None where a parameter has no gradient)."""

    def post_step(self, unit: Unit, state: dict, ctx: StepContext) -> "list[Rescale] | None":
        """After the base optimizer's step: retraction / renormalisation, in place, under no_grad.

        Parameters without a gradient this step (``not ctx.has_grad(name)``) must be left untouched.
        A retraction that only rescales units (the function is unchanged) returns its Rescale
        events; the runtime then applies their consequences (see Rescale)."""

    def diagnostics(self, unit: Unit, state: dict) -> dict[str, float]:
        return {}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype geometry math runs in: float32 for float16/bfloat16/float32, float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fit_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A result computed in float32/float64 (``compute_dtype``) in the parameter's `dtype`. A finite
    value beyond that dtype's range (float16 above 65504) saturates at its largest finite value
    instead of overflowing to ±Inf inside optimizer.step, where GradScaler cannot see it; NaN and ±Inf
    stay as they are (README, precision). A plain cast for dtypes with float32's exponent range (bf16,
    float32, float64), where a finite float32 value cannot overflow."""
    if x.dtype == dtype or not dtype.is_floating_point or torch.finfo(dtype).max > 1e38:
        return x.to(dtype)
    big = torch.finfo(dtype).max
    return torch.where(torch.isfinite(x), x.clamp(-big, big), x).to(dtype)


# Set while the host-sync detector (bench/syncs.py) runs: CPU tensors then stand in for a GPU's.
_CPU_STANDS_IN_FOR_DEVICE = [False]


def host_reads_are_free(t: torch.Tensor) -> bool:
    """Whether reading `t`'s values on the host costs nothing: a CPU tensor, no device to wait for (and
    not while torch.compile traces). An eager program may then skip work that its branch-free path
    would do for nothing: psi's renormalisation when no unit needs it, with its optimizer-state and
    running-statistics rescales, is about 1 ms of the demo's 5 ms CPU step. On a GPU the program stays
    branch-free (no sync). Under the host-sync detector this is False, so the detector checks the path
    a GPU takes."""
    return host_reads_are_free_for((t,))


def host_reads_are_free_for(tensors) -> bool:
    """host_reads_are_free for every tensor of a list (the switches read once, then each tensor's device)."""
    if _CPU_STANDS_IN_FOR_DEVICE[0] or torch.compiler.is_compiling():
        return False
    return all(t.device.type == "cpu" for t in tensors)


def finite_entries(t: torch.Tensor) -> torch.Tensor:
    """`t` with its non-finite entries (NaN, ±Inf) read as 0: what a geometry's mixing transforms and
    iterative state see, so one bad entry cannot spread over its unit, its group or the next steps."""
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


def pass_nonfinite(transform: Callable[[torch.Tensor], torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
    """A gradient transform that treats non-finite entries as plain torch does: ``transform`` runs on
    the finite entries (the others read as 0) and the non-finite entries pass through unchanged, so
    the base optimizer makes exactly those entries of the weight non-finite, and no others. Branch
    free (no host sync): on a finite gradient it is ``transform(grad)``."""
    finite = torch.isfinite(grad)
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    return torch.where(finite, transform(torch.where(finite, grad, zero)), grad)


def pass_nonfinite_sharded(program_of, grad: torch.Tensor):
    """pass_nonfinite for a sharded program (runtime/distributed.py): ``program_of(finite grad)`` is the
    transform's program on the local shard; a sharded program returning the result."""
    finite = torch.isfinite(grad)
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    out = yield from program_of(torch.where(finite, grad, zero))
    return torch.where(finite, out, grad)


def skipped(skip: "torch.Tensor | None") -> "torch.Tensor | None":
    """StepContext.skip (or a Triton backend's int32 copy of it) as a 0-d bool tensor, or None."""
    if skip is None:
        return None
    return skip if skip.dtype == torch.bool else skip != 0


def unless_skipped(skip: "torch.Tensor | None", old, new: torch.Tensor) -> torch.Tensor:
    """`new`, except at a step skipped on the device (StepContext.skip true): `old` (a tensor or a
    Python number, which then comes back as a 0-d tensor of new's dtype and device)."""
    cond = skipped(skip)
    if cond is None:
        return new
    if not isinstance(old, torch.Tensor):
        old = torch.as_tensor(old, dtype=new.dtype, device=new.device)
    return torch.where(cond.to(new.device), old.to(new.device, new.dtype), new)


def count_nonfinite(state: dict, key: str, *tensors: torch.Tensor, skip: "torch.Tensor | None" = None) -> None:
    """state[key] += 1 when any of `tensors` has a non-finite entry (an int64 0-d tensor; no host sync);
    never at a step skipped on the device (`skip`: StepContext.skip)."""
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).any() if tensors else None
    if bad is None:
        return
    cond = skipped(skip)
    if cond is not None:
        bad = bad & ~cond.to(bad.device)
    counter = state.get(key)
    if not isinstance(counter, torch.Tensor):
        counter = state[key] = torch.tensor(int(counter or 0), dtype=torch.int64, device=bad.device)
    counter.add_(bad.to(counter.device, torch.int64))


REGISTRY: dict[str, type[Geometry]] = {}


def register(cls: type[Geometry]) -> type[Geometry]:
    if cls.stage not in STAGES:
        raise TypeError(f"{cls.__name__}.stage must be one of {STAGES}")
    REGISTRY[cls.name] = cls
    return cls

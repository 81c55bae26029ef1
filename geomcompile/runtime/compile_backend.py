"""The torch.compile backend: the geometries' eager programs, compiled once per bucket of parameters.

A *program* (a geometry's ``fast_paths["compile"]``, defined next to the geometry) restates its
pre-step gradient transform, and for a retracting geometry the test that decides whether a
post-step retraction is needed, as a pure function over lists
of tensors built from the same functions as the eager reference (``gc.functional``). At each
step, per stage (penalty → metric → manifold), the parameters of one geometry configuration (name
and options) whose gradients are present form a *bucket*. One compiled function transforms all
of a bucket's gradients and writes them back with ``copy_`` inside the graph, so inductor stores
the results straight into ``p.grad``.

* Compiled functions are cached for the whole process, keyed by everything they bake in: the
  geometry and its options, each parameter's static layout (``out_dim``, PSI unit) and each
  tensor's shape, stride, dtype and device. A second plan on the same shapes reuses them; a new
  bucket (a parameter whose grad was None now has one) compiles once.
* Each compiled function gets its own code object. Dynamo keeps its cache on the code object and
  runs eager, with only a logged warning, past 8 entries; one code object shared by every bucket
  would reach that on a large model zoo or a benchmark sweep.
* psi's renormalisation is rare (a unit's norm must pass ``max_norm``). On CPU tensors the compiled
  function flags the parameters with a unit within ``psi.RENORM_MARGIN`` of the limit (reading the
  flags costs nothing there), and those run psi's eager ``post_step``, which decides exactly and
  rescales the optimizer state. On a device the flags would be a host sync per bucket, so every
  psi unit runs the eager ``post_step``, branch-free there (base.host_reads_are_free). Results match
  eager whatever the norms.
* A program may read and set entries of its units' state (``Program.state_keys``: pom's group ids
  and radius in, the diagnostics its eager pre_step records out); they enter the compiled function
  as inputs and come back as outputs, written into the unit's state after the call. A program
  that always retracts (pom) skips the check: its retraction either runs compiled per bucket
  (``retracts_in_graph``: pom, every manifold) or is the geometry's eager post_step.
* Sharded (FSDP2) parameters: a program whose ``shard_local(geometry, facts)`` says the transform
  of that layout needs no other rank's rows (``Geometry.shard_local``: psi's one-row units along
  dim 0, channel_directed on a conv-transpose's independent columns) runs compiled on the local shards; any other sharded unit
  runs its geometry's eager sharded program, queued and run with the stage's collectives batched
  (runtime/distributed.py). The retraction flags of a bucket with sharded parameters are or'ed
  over the ranks (one all-reduce), so every rank runs the same eager post_steps.
* A program may leave units to the eager program: for good (``Program.refusal``; no shipped program
  refuses today, tests/test_compile_backend.py checks the path with a test refusal) or for one step
  (``Program.host_step``, decided on the host from Python ints: spectral's ``every`` schedule and
  each layer's first evaluation); ``describe()`` names the refusals with their reasons.
* The step's decisions (which units run eagerly, the buckets, their layouts and compiled functions)
  are recorded and replayed while the same work items have the same parameters with gradients
  (``_RecordedStep``); a replay reads the gradients, weights and state again and makes one compiled
  call per bucket. Steps with sharded parameters or a program's ``host_step`` are decided every time.
* A geometry without a program runs its eager ``pre_step`` / ``post_step`` in its stage's turn, and
  ``describe()`` says so for ``plan.summary()``. A bucket whose compilation fails runs the same
  list function uncompiled, with a GeomCompileWarning that quotes the error.
"""
from __future__ import annotations

import time
import warnings
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import torch

from ..analysis.facts import ParamFacts
from ..errors import GeomCompileWarning
from ..geometries.base import STAGES, Geometry, StepContext, host_reads_are_free_for
from .distributed import any_on_each_rank, local
from .fastpath import (Backend, WorkItem, eager_post_step, fast_path, runs_on_local_shards, stage_items,
                       stage_items_with_grads, unit_grads)

# dynamic=False. Measured on ResNet-20 (9 distinct weight shapes), 2 CPU cores, empty inductor
# cache: first step (compile) 12 s for channel_directed and 7 s for psi with static shapes, 24-27 s
# and 18-21 s with dynamic=True, and the static code also ran faster (docs/bench.md).
DEFAULT_DYNAMIC = False
# A CPU bucket whose tensors (gradients and weights) hold at most this many elements in all is compiled single-threaded (inductor's cpp.threads = 1).
# Inductor parallelises each per-tensor loop of a fused kernel with an OpenMP `for` of a few dozen
# rows and a barrier after it; on small tensors the barriers cost more than the second thread gains,
# and on a loaded machine a waiting thread spins. Measured on ResNet-20's 21 psi weights (272k
# elements), 2 CPU cores: the compiled psi transform took 0.75x of a foreach SGD-momentum step with
# the default threads and 0.43x with one (medians of 300 interleaved calls, docs/bench.md). Larger
# buckets keep inductor's default (all of torch's threads).
SINGLE_THREAD_ELEMENTS = 1 << 20
CACHE_SIZE = 256              # compiled functions kept per process (least recently used dropped)


# ---- programs: the geometries' update rules over lists of tensors ------------------------------
class Program:
    """The protocol of a geometry's compile fast path (declared as ``fast_paths["compile"]`` next to
    the geometry): its update program over lists of tensors, what torch.compile traces.

    layout(geometry, facts): hashable static facts about one parameter that the program bakes in.
    transform(geometry, layouts, grads, weights): the new gradients (pure; no in-place writes).
    needs_retraction(geometry, layouts, weights): a bool tensor with one entry per parameter, True
        where the geometry's eager post_step may change something. Only for ``retracts = True``,
        whose eager post_step must act on each parameter of a unit independently. Optionally
        ``screen`` (same arguments; a list of Python bools), run uncompiled before it on CPU tensors
        of unsharded buckets, where reading values costs nothing: a cheaper conservative test (a few
        multi-tensor ops), False only where the eager post_step certainly changes nothing; when it
        flags no parameter the compiled check is skipped. A program with
        ``always_retracts = True`` has none: its geometry's eager post_step runs for every unit
        that took part in the step, with no compiled check and no host sync; where its
        ``retracts_in_graph(geometry)`` is True, the retraction itself is compiled instead:
        retract_with_state(geometry, layouts, weights, states) returns (the new weights, per
        parameter a dict of state entries to set), with ``states`` as for transform_with_state.

    A program whose pre-step reads or writes the unit's state (per-unit tables, diagnostics the
    eager pre_step records) names those entries in ``state_keys`` and provides, instead of
    transform, transform_with_state(geometry, layouts, grads, weights, states): ``states`` holds,
    per parameter, a dict of its unit's entries ``state_keys`` (those the state has); it returns (the new gradients, per
    parameter a dict of state entries to set), written into the unit's state after the call.

    Optional, for programs that leave some units to the eager program (spectral):
    refusal(geometry, facts): why the program cannot run this parameter's unit at all (a
        configuration it does not batch), or None. Such a unit runs its geometry's eager pre_step and
        post_step, and ``describe()`` gives the reason.
    host_step(geometry, unit, state): called on the host for every unit with a gradient, before the
        bucket's call, with the unit's whole state. It may read and update the state's host values
        (Python ints: counters, schedules; no tensor read, so no sync) and returns None when this
        step of the unit runs its geometry's eager pre_step instead (then it has changed nothing),
        or a dict of tensors the call gets in the unit's ``states`` entry next to ``state_keys``
        (inputs of this step only, never stored). Python ints never enter the compiled function,
        whose guards would otherwise fail, and recompile it, whenever a counter changed.
    inductor_config: a dict of torch._inductor.config settings in force while the program's
        functions compile and run (spectral: no channels-last layout optimisation, whose different
        rounding its eigensolver would amplify beyond parity with eager).
    """

    name: str = ""
    uses_weights = False
    retracts = False
    always_retracts = False
    state_keys: tuple[str, ...] = ()
    # At a step skipped on the device (StepContext.skip, for geometries that honour it), each parameter's
    # ``states`` entry also holds "skip" and these: the entries the program replaces, so it can keep them.
    skip_keys: tuple[str, ...] = ()

    def layout(self, geometry: Geometry, facts: ParamFacts) -> Hashable:
        raise NotImplementedError

    def transform(self, geometry: Geometry, layouts: Sequence, grads: list[torch.Tensor],
                  weights: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def transform_with_state(self, geometry: Geometry, layouts: Sequence, grads: list[torch.Tensor],
                             weights: list[torch.Tensor], states: list[dict]) -> tuple[list[torch.Tensor], list[dict]]:
        raise NotImplementedError

    def needs_retraction(self, geometry: Geometry, layouts: Sequence,
                         weights: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def state_keys(program) -> tuple[str, ...]:
    """The unit-state entries a program reads and sets (programs need not subclass Program)."""
    return getattr(program, "state_keys", ())


def _state_inputs(keys: Sequence[str], state: dict, extra: dict | None = None, program=None,
                  skip: "torch.Tensor | None" = None) -> dict:
    """A compiled call's entry for one parameter: its unit's state entries ``keys`` (those it has),
    plus this step's host_step inputs; at a step skipped on the device (``skip``, StepContext.skip),
    also "skip" and the entries the program replaces (``Program.skip_keys``), so it can keep them."""
    inputs = {**{k: state[k] for k in keys if k in state}, **(extra or {})}
    if skip is not None:
        inputs.update({k: state[k] for k in getattr(program, "skip_keys", ()) if k in state}, skip=skip)
    return inputs


def refusal(program, item: WorkItem) -> str | None:
    """Why the program refuses a parameter of this unit (Program.refusal), or None."""
    refuse = getattr(program, "refusal", None)
    if refuse is None:
        return None
    return next((why for why in (refuse(item.geometry, f) for f in item.unit.facts) if why), None)


def compiled_program(item: WorkItem, ctx: StepContext) -> Program | None:
    """The item's compile program, or None when the item runs its geometry's eager program: the
    geometry has none, the program refuses the unit (Program.refusal), or a parameter of the unit
    is sharded in a layout whose update needs other ranks' rows (fastpath.runs_on_local_shards)."""
    program = fast_path(item.geometry, "compile")
    if program is None or refusal(program, item) is not None:
        return None
    return program if runs_on_local_shards(item, ctx) else None


# ---- compiled functions, cached for the process ------------------------------------------------
@dataclass(eq=False)
class _Compiled:
    run: Callable                    # the compiled function (or the plain one after a failure)
    plain: Callable                  # the same function, uncompiled
    calls: int = 0
    failure: str | None = None
    inductor: dict | None = None     # Program.inductor_config, set while it runs (and may compile)


_CACHE: OrderedDict[Hashable, _Compiled] = OrderedDict()


def _fresh_code(fn: Callable) -> Callable:
    """The same function with its own code object, so it gets its own dynamo cache (see module doc)."""
    fn.__code__ = fn.__code__.replace()
    return fn


def _signature(tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


def _inductor_options(tensors: Sequence[torch.Tensor]) -> dict:
    """Inductor settings of a bucket's compiled function: ``cpp.threads = 1`` for a small CPU bucket
    (SINGLE_THREAD_ELEMENTS), and no size/stride asserts on the inputs. Those repeat what dynamo's
    guards check before every call (static shapes: each input's sizes and strides; a mismatch
    recompiles), and cost about 1 µs per tensor: psi's transform over ResNet-20's 21 weights took
    96-102 µs per call without them against 120-124 µs with them (medians of 500 interleaved calls)."""
    options = {"size_asserts": False}
    if tensors and all(t.device.type == "cpu" for t in tensors) and \
            sum(t.numel() for t in tensors) <= SINGLE_THREAD_ELEMENTS:
        options["cpp.threads"] = 1
    return options


def _transform_function(program: Program, geometry: Geometry, layouts: tuple) -> Callable:
    def transform_in_place(grads: list[torch.Tensor], weights: list[torch.Tensor],
                           states: list[dict]) -> list[dict]:
        if state_keys(program):
            new_grads, updates = program.transform_with_state(geometry, layouts, grads, weights, states)
        else:
            new_grads, updates = program.transform(geometry, layouts, grads, weights), []
        # Per-tensor copy_, not torch._foreach_copy_: with torch 2.13 inductor on CPU,
        # _foreach_copy_(xs, [x * x.sum(0, keepdim=True) for x in xs]) writes wrong values into
        # the second tensor (tests/test_compile_backend.py::test_foreach_copy_miscompile_still_avoided).
        for grad, new in zip(grads, new_grads):
            grad.copy_(new)
        return updates
    return _fresh_code(transform_in_place)


def _retraction_function(program: Program, geometry: Geometry, layouts: tuple) -> Callable:
    def retract_in_place(weights: list[torch.Tensor], states: list[dict]) -> list[dict]:
        new_weights, updates = program.retract_with_state(geometry, layouts, weights, states)
        for weight, new in zip(weights, new_weights):       # per-tensor copy_: see _transform_function
            weight.copy_(new)
        return updates
    return _fresh_code(retract_in_place)


def _check_function(program: Program, geometry: Geometry, layouts: tuple) -> Callable:
    def needs_retraction(weights: list[torch.Tensor]) -> torch.Tensor:
        return program.needs_retraction(geometry, layouts, weights)
    return _fresh_code(needs_retraction)


# ---- the backend ---------------------------------------------------------------------------------
@dataclass
class _Slot:
    """One parameter of a bucket, as decided (no tensor: a recorded step keeps none alive)."""
    item: WorkItem
    name: str
    facts: ParamFacts
    inputs: dict | None = None       # this step's inputs from Program.host_step


class CompileBackend(Backend):
    """Buckets of parameters per geometry configuration, each run by one torch.compile'd function."""

    name = "compile"

    def __init__(self, dynamic: bool = DEFAULT_DYNAMIC, mode: str | None = None):
        self.dynamic = dynamic
        self.mode = mode
        self.failures: list[str] = []
        self.compile_seconds = 0.0      # spent in first calls (compile + one run) made by this backend
        self._pre_plan: _RecordedStep | None = None       # the last steps' decisions (replayed)
        self._post_plan: _RecordedStep | None = None
        self.plan_builds = 0            # pre-steps decided from scratch

    # -- report ---------------------------------------------------------------------------------
    def describe(self, items: list[WorkItem], ctx: StepContext) -> list[str]:
        compiled, eager, sharded, refused = Counter(), Counter(), Counter(), Counter()
        for item in items:
            program = fast_path(item.geometry, "compile")
            why = refusal(program, item) if program is not None else None
            if compiled_program(item, ctx) is not None:
                compiled[item.geometry.label()] += 1
            elif why is not None:
                refused[(item.geometry.label(), why)] += 1
            else:
                (sharded if program else eager)[item.geometry.label()] += 1
        lines = []
        if compiled:
            what = ", ".join(f"{g} ({n} unit(s))" for g, n in compiled.items())
            lines.append(f"backend compile: torch.compile (inductor, dynamic={self.dynamic}) runs {what}; "
                         f"one compiled function per geometry configuration, compiled at the first step "
                         f"(seconds to a minute on CPU, cached for the process)")
        lines += [f"backend compile: {g} has no compiled program; its eager program runs for {n} unit(s)"
                  for g, n in eager.items()]
        lines += [f"backend compile: {g} runs its eager program for {n} unit(s): {why}"
                  for (g, why), n in refused.items()]
        lines += [f"backend compile: {g} runs its eager sharded program for {n} sharded unit(s) whose update "
                  f"needs other ranks' rows (collectives batched per stage, docs/distributed.md)"
                  for g, n in sharded.items()]
        return lines + self.failures

    # -- compiled calls -------------------------------------------------------------------------
    def _function(self, phase: str, program: Program, geometry: Geometry, layouts: tuple,
                  tensors: Sequence[torch.Tensor], build: Callable) -> _Compiled:
        options = _inductor_options(tensors) if self.mode is None else None   # torch.compile takes one of the two
        key = (phase, program.name, geometry, layouts, _signature(tensors), self.dynamic, self.mode,
               tuple(sorted((options or {}).items())))
        entry = _CACHE.get(key)
        if entry is None:
            plain = build(program, geometry, layouts)
            compiled = torch.compile(plain, dynamic=self.dynamic, fullgraph=True, mode=self.mode, options=options)
            entry = _CACHE[key] = _Compiled(compiled, plain, inductor=getattr(program, "inductor_config", None))
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
        _CACHE.move_to_end(key)
        return entry

    def _call(self, entry: _Compiled, geometry: Geometry, *args):
        if entry.inductor and not entry.failure:
            import torch._inductor.config as inductor_config
            with inductor_config.patch(entry.inductor):     # a recompilation (a guard failed) sees it too
                return self._run(entry, geometry, *args)
        return self._run(entry, geometry, *args)

    def _run(self, entry: _Compiled, geometry: Geometry, *args):
        if entry.calls or entry.failure:
            entry.calls += 1
            return entry.run(*args)
        from torch._dynamo.exc import TorchDynamoException
        start = time.perf_counter()
        try:
            out = entry.run(*args)        # compiles; a failure raises before anything is written
        except TorchDynamoException as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            entry.failure = (f"backend compile: torch.compile failed for a {geometry.label()} bucket "
                             f"({type(exc).__name__}: {first_line}); it runs uncompiled")
            warnings.warn(entry.failure, GeomCompileWarning, stacklevel=4)
            self.failures.append(entry.failure)
            entry.run = entry.plain
            out = entry.run(*args)
        self.compile_seconds += time.perf_counter() - start
        entry.calls += 1
        return out

    # -- hooks ----------------------------------------------------------------------------------
    def pre_step(self, items, states: Callable[[WorkItem], dict], ctx: StepContext) -> None:
        """Each stage: the units without a compiled program run their eager pre_step, then one compiled
        call per bucket. The decisions (which unit runs how, the buckets, their compiled functions) are
        recorded and replayed while the same parameters have gradients (_RecordedStep.holds), so a
        steady step costs a few Python calls per bucket; a program with a host_step (decided per step)
        or sharded parameters are decided at every step."""
        plan = self._pre_plan
        if plan is not None and plan.holds(items, ctx):
            for stage in plan.stages:
                self._run_pre_stage(stage, states, ctx)
            return
        plan = _RecordedStep(items, ctx)
        for stage in STAGES:
            decided = self._decide_pre_stage(stage, items, states, ctx, plan)
            self._run_pre_stage(decided, states, ctx)
            plan.stages.append(decided)
        self._pre_plan = plan if plan.replayable else None
        self.plan_builds += 1

    def _decide_pre_stage(self, stage: str, items, states, ctx: StepContext, plan: "_RecordedStep") -> "_StagePlan":
        decided = _StagePlan()
        buckets: dict[Geometry, list[_Slot]] = defaultdict(list)
        for item, grads in stage_items_with_grads(items, stage, ctx):
            program = compiled_program(item, ctx)
            if program is None:
                decided.eager.append(item)
                continue
            inputs = None
            if getattr(program, "host_step", None) is not None:
                plan.replayable = False       # decided on the host at every step
                inputs = program.host_step(item.geometry, item.unit, states(item))
                if inputs is None:            # this step of the unit is the eager program's
                    decided.eager.append(item)
                    continue
            for name, facts, grad in zip(item.unit.names, item.unit.facts, grads):
                grad = local(grad) if grad is not None else None      # sharded: this rank's rows
                if grad is not None and grad.numel():      # the transforms are the identity on empty grads
                    # no tensor kept: a recorded step must not hold this step's gradients alive
                    buckets[item.geometry].append(_Slot(item, name, facts, inputs))
        decided.buckets = [_Bucket.of(geometry, slots, ctx) for geometry, slots in buckets.items()]
        return decided

    def _run_pre_stage(self, decided: "_StagePlan", states, ctx: StepContext) -> None:
        for item in decided.eager:
            item.geometry.pre_step(item.unit, unit_grads(item, ctx), states(item), ctx)
        for bucket in decided.buckets:
            self._transform(bucket, states, ctx)
        ctx.run_queued()            # the stage's sharded eager programs, collectives batched

    def _transform(self, bucket: "_Bucket", states, ctx: StepContext) -> None:
        program, geometry, slots = bucket.program, bucket.geometry, bucket.slots
        grads = bucket.tensors([p.grad for p in bucket.params], ctx)     # this step's gradient tensors
        weights = bucket.weights(ctx) if program.uses_weights else []
        keys = state_keys(program)
        unit_states = [states(s.item) for s in slots] if keys else []
        skip = ctx.skip_on(bucket.params[0].device) if keys else None
        inputs = [_state_inputs(keys, st, s.inputs, program, skip) for s, st in zip(slots, unit_states)]
        if bucket.entry is None:
            bucket.entry = self._function("transform", program, geometry, bucket.layouts, grads + weights,
                                          _transform_function)
        with torch.no_grad():
            updates = self._call(bucket.entry, geometry, grads, weights, inputs)
        for state, update in zip(unit_states, updates):
            state.update(update)

    def post_step(self, items, states: Callable[[WorkItem], dict], ctx: StepContext):
        plan = self._post_plan
        if plan is None or not plan.holds(items, ctx):
            plan = _RecordedStep(items, ctx)
            plan.stages = [self._decide_post_stage(stage, items, ctx) for stage in STAGES]
            self._post_plan = plan if plan.replayable else None
        rescales = []
        with torch.no_grad():
            for decided in plan.stages:
                for item in decided.eager:
                    rescales += eager_post_step(item, states, ctx)
                for bucket in decided.buckets:
                    rescales += self._retract(bucket, bucket.weights(ctx), states, ctx)
                rescales += ctx.run_queued()
        return rescales

    def _decide_post_stage(self, stage: str, items, ctx: StepContext) -> "_StagePlan":
        decided = _StagePlan()
        buckets: dict[Geometry, list[_Slot]] = defaultdict(list)
        for item in stage_items(items, stage):
            program = compiled_program(item, ctx)
            if program is None:
                decided.eager.append(item)
            elif program.retracts:
                for name, facts in zip(item.unit.names, item.unit.facts):
                    p = ctx.params[name]
                    if p.numel() and ctx.has_grad(name):     # the whole tensor's: alike on every rank
                        buckets[item.geometry].append(_Slot(item, name, facts))
        decided.buckets = [_Bucket.of(geometry, slots, ctx) for geometry, slots in buckets.items()]
        return decided

    def _retract(self, bucket: "_Bucket", weights: list[torch.Tensor], states, ctx: StepContext):
        """On CPU tensors the compiled check flags parameters near their limit and every unit with a
        flagged parameter runs the geometry's exact eager post_step, whole (a unit is never split). On
        a device (base.host_reads_are_free is False) the flags are not read, which would be a host
        sync: every unit runs the eager post_step. A program that always retracts needs no check:
        every unit runs it. ``weights``: this step's weight (local shard) of each of the bucket's slots."""
        program, geometry, slots = bucket.program, bucket.geometry, bucket.slots
        if getattr(program, "always_retracts", False) and program.retracts_in_graph(geometry):
            self._retract_in_graph(bucket, weights, states, ctx)
            return []
        # On a device, reading the flags would make the host wait for the GPU: every unit runs the
        # geometry's eager post_step, which is branch-free there (psi: factors of 1 rescale nothing)
        if getattr(program, "always_retracts", False) or not host_reads_are_free_for(weights):
            units = {id(slot.item): slot.item for slot in slots}
            return [rescale for item in units.values() for rescale in eager_post_step(item, states, ctx)]
        layouts = bucket.layouts
        live = [i for i, w in enumerate(weights) if w.numel()]     # a shard may hold no rows
        sharded = [ctx.shard(s.name) for s in slots if ctx.shard(s.name) is not None] if ctx.shards else []
        screen = getattr(program, "screen", None)
        if screen is not None and not sharded and live and not any(
                screen(geometry, tuple(layouts[i] for i in live), [weights[i] for i in live])):
            return []                    # certainly nothing to retract (CPU: a free read)
        flags = [False] * len(slots)
        if live:
            live_weights = [weights[i] for i in live]
            entry = self._function("retract", program, geometry, tuple(layouts[i] for i in live), live_weights,
                                   _check_function)
            for i, f in zip(live, self._call(entry, geometry, live_weights).tolist()):   # CPU: a free read
                flags[i] = f
        if sharded:                      # every rank must run the same (collective) eager post_steps
            flags = any_on_each_rank(flags, sharded[0])
        flagged = {id(slot.item): slot.item for slot, f in zip(slots, flags) if f}
        rescales = []
        for item in flagged.values():
            rescales += eager_post_step(item, states, ctx)
        return rescales

    def _retract_in_graph(self, bucket: "_Bucket", weights: list[torch.Tensor], states, ctx: StepContext) -> None:
        """The bucket's retraction as one compiled function writing the weights (no Rescale events:
        a program retracts in the graph only where its geometry's post_step returns none)."""
        program, geometry = bucket.program, bucket.geometry
        unit_states = [states(s.item) for s in bucket.slots]
        keys = state_keys(program)
        skip = ctx.skip_on(weights[0].device) if keys and weights else None
        inputs = [_state_inputs(keys, st, None, program, skip) for st in unit_states] if keys else []
        if bucket.entry is None:
            bucket.entry = self._function("retract in graph", program, geometry, bucket.layouts, weights,
                                          _retraction_function)
        for state, update in zip(unit_states, self._call(bucket.entry, geometry, weights, inputs)):
            state.update(update)


@dataclass(eq=False)
class _Bucket:
    """One compiled call of a stage: a geometry configuration's parameters (slots, their layouts) and,
    once looked up, its compiled function."""
    geometry: Geometry
    program: object
    slots: list[_Slot]
    layouts: tuple
    params: list            # the slots' parameters (ctx.params is fixed at install)
    entry: _Compiled | None = None

    @classmethod
    def of(cls, geometry: Geometry, slots: list[_Slot], ctx: StepContext) -> "_Bucket":
        program = fast_path(geometry, "compile")
        return cls(geometry, program, slots, tuple(program.layout(geometry, s.facts) for s in slots),
                   [ctx.params[s.name] for s in slots])

    @staticmethod
    def tensors(tensors: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
        """The tensors as the compiled call takes them: this rank's rows where parameters are sharded."""
        return [local(t) for t in tensors] if ctx.shards else tensors

    def weights(self, ctx: StepContext) -> list[torch.Tensor]:
        """This step's weights of the bucket's parameters (detached; local shards)."""
        return self.tensors([p.detach() for p in self.params], ctx)


@dataclass(eq=False)
class _StagePlan:
    eager: list[WorkItem] = field(default_factory=list)     # units that run their eager program
    buckets: list[_Bucket] = field(default_factory=list)


class _RecordedStep:
    """The decisions of one pre- or post-step, replayed while they still apply: the same work items
    (add_param_group replaces the list) and the same parameters with gradients (``ctx.stepped``).
    Everything else a decision depends on is fixed at install (programs, refusals, layouts); the
    tensors themselves (gradients, weights, state) are read again at every replay, and a gradient
    with new strides is a guard failure inside its compiled function (it recompiles, never runs
    stale code). Never replayed: a step with sharded parameters or with a program's host_step."""

    def __init__(self, items, ctx: StepContext):
        self.items, self.stepped = items, ctx.stepped
        self.stages: list[_StagePlan] = []
        self.replayable = not ctx.shards

    def holds(self, items, ctx: StepContext) -> bool:
        return items is self.items and ctx.stepped == self.stepped

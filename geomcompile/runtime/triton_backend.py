"""The Triton backend: bucketed multi-tensor kernels for the geometries that have them.

At each step, per stage (penalty → metric → manifold):

* a geometry with no kernel family (``fast_paths["triton"]``) runs its eager program;
* a parameter whose geometry has a kernel is *fused* when its base optimizer is SGD, Adam or
  AdamW (see ``buckets.fused_kind``) and no later-stage geometry needs its gradient: one launch per
  bucket reads grad, weight and optimizer state once, applies the geometry, the base update and
  the retraction, and writes weight and state. Its ``.grad`` is then hidden (set to None) so the
  base optimizer skips it, and restored in the post-step hook. Its ``optimizer.state[p]`` keeps
  torch's keys, dtypes and devices (Adam's ``step`` a CPU float tensor), so a state_dict moves
  between backends;
* otherwise the kernel only transforms ``p.grad`` in place and the base optimizer steps as usual;
  psi's renormalisation then runs as a kernel in the post-step hook;
* a unit with a parameter the kernels cannot take (float64, complex, sparse grad, a device the
  kernels do not run on) runs the geometry's eager program, for the whole unit (never split);
* a sharded (FSDP2) parameter: when its geometry's update needs no other rank's rows
  (``Geometry.shard_local``) the transform kernel runs on the local shards of weight and gradient
  and the base optimizer steps the DTensor (never fused: torch keeps DTensor optimizer state), and
  its retraction is the geometry's eager sharded post_step; any other sharded unit runs the eager
  sharded program, with the stage's collectives batched (runtime/distributed.py);
* a retraction inside a kernel emits no Rescale event, so a kernel retracts only parameters whose
  rescale has no consequence elsewhere (no running statistics to follow, no on_retract callback,
  no optimizer state the kernel does not rescale); the others are retracted by the eager
  post_step after the fused update.

All of this is decided once and then replayed: the step plan (``StepPlan``, at the end of this
module) records one step's decisions and launches and runs them again while a cheap key and the
recorded tensors hold; new gradients are patched into the launches' tables. docs/triton.md
("Host path") lists what makes a step decide anew.

``describe`` says all of this in words for ``plan.summary()``.
"""
from __future__ import annotations

import dataclasses
import importlib
import weakref
from collections import Counter, defaultdict
from operator import is_not
from typing import Callable

import torch

from ..errors import GeomCompileError
from ..names import short_list
from ..geometries.base import STAGES, StepContext
from .distributed import local
from .fastpath import (Backend, WorkItem, eager_post_step, fast_path, runs_on_local_shards, stage_items,
                       stage_items_with_grads, unit_grads)
from .buckets import KERNEL_DTYPES, BucketKey, Entry, bucketize, fused_kind, update_of


# ---- availability -----------------------------------------------------------------------------
def kernel_modules() -> list[str]:
    """The modules of every registered geometry's Triton kernel family (``fast_paths["triton"]``), in
    registration order: the declarations decide, the runtime names none."""
    from ..geometries import REGISTRY
    names = [cls.fast_paths["triton"].partition(":")[0] for cls in REGISTRY.values() if "triton" in cls.fast_paths]
    return list(dict.fromkeys(names))


def _kernels():
    """The kernel modules. @triton.jit runs at their first import: TRITON_INTERPRET must be set before."""
    return tuple(importlib.import_module(name) for name in kernel_modules())


def interpreted() -> bool:
    """True when the kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    kernels = [v for m in _kernels() for v in vars(m).values() if isinstance(v, (JITFunction, InterpretedFunction))]
    return bool(kernels) and all(isinstance(v, InterpretedFunction) for v in kernels)


def triton_problem(params: list[torch.Tensor]) -> str | None:
    """Why the Triton kernels cannot run these parameters, or None."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({e}); install it with `pip install triton`"
    try:
        _kernels()
    except Exception as e:  # a broken triton install: report it, never crash the plan
        return f"the Triton kernels failed to load ({type(e).__name__}: {e})"
    devices = {p.device.type for p in params}
    if interpreted():
        if devices - {"cpu"}:
            return ("TRITON_INTERPRET=1 is set, and the Triton interpreter runs kernels on CPU tensors only; "
                    "unset it to run the kernels on the GPU")
    elif "cpu" in devices:
        return ("the parameters are on CPU and Triton kernels need a CUDA GPU; to run them on CPU (tests, "
                "debugging) set TRITON_INTERPRET=1 before importing triton or geomcompile.kernels, or use "
                "backend='eager' or 'compile'")
    elif devices - {"cuda"}:
        return f"Triton kernels run on CUDA tensors, not {', '.join(sorted(devices - {'cuda'}))}"
    return None


_SELF_TEST_PASSED: set[str] = set()


def self_test(device: str) -> str | None:
    """Run the psi kernel once on `device` against the eager reference; None when it works.
    Deterministic inputs: the global RNG is not touched. Only a pass is remembered for the process:
    a failure (e.g. a transient CUDA error) is tried again at the next install."""
    if device in _SELF_TEST_PASSED:
        return None
    from ..geometries.psi import psi_grad
    try:
        _kernels()                       # every family's module loads
        from ..kernels import psi as psi_kernels     # the toolchain check: one known kernel
        w = torch.linspace(-1.0, 1.0, 15, device=device).reshape(3, 5)
        g = torch.linspace(0.5, -0.3, 15, device=device).reshape(3, 5)
        got = g.clone()
        psi_kernels.psi([w], [got], [("row", 0, None)])
        if not torch.allclose(got.cpu(), psi_grad(w, g).cpu(), rtol=1e-5, atol=1e-6):
            return "its result differs from the eager reference"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    _SELF_TEST_PASSED.add(device)
    return None


# ---- kernel families ----------------------------------------------------------------------------
class KernelFamily:
    """The protocol of a geometry's Triton fast path (declared as ``fast_paths["triton"]`` next to
    the geometry, defined in its kernel module). Entries are ``buckets.Entry``.

    transform(geometry, entries, cache, slot): the gradient transform, written into the grads.
    fused(geometry, entries, update, cache, slot, retract): transform and the base optimizer's
        update (``update``: SGDUpdate / AdamUpdate) in one launch; with ``retract`` the retraction too.
    retract(geometry, entries, powers, cache, slot): the retraction alone, rescaling the optimizer
        state tensors in ``entry.extra["states"]`` by ``powers``. Only for ``retracts = True``.
    A retraction inside a kernel emits no Rescale event, so the backend lets a kernel retract only
    parameters whose rescale has no consequence outside the kernel (ctx.rescale_observed).

    Attributes the backend reads (defaults here):
    retracts: the family has ``retract`` (the geometry's post_step as a kernel).
    retraction_rescales: the geometry's retraction is a function-preserving rescale (it emits Rescale
        events and scales optimizer state by ``state_powers``), so observers decide whether a kernel
        may do it; False: it emits none and touches no optimizer state (the kernel always may).
    counter_key: the geometry-state key of an int64 0-d counter the kernels add to (entry.extra["counter"]).
    state_outputs: geometry-state keys the kernels write in place (0-d device tensors); a recorded step
        replays only while the state still holds those very tensors.
    fuses: False when the family has no ``fused`` (a gradient transform the base optimizer must follow,
        e.g. a penalty stage).
    launches_kernels: False for a family whose transform runs torch ops, not a fused kernel of its own
        (it records objects with Launch's ``run`` / ``patch_grads`` / ``scalars`` / ``grad_role``, so the
        step plan replays it), said by its ``note`` in ``describe()``. Those ops may launch helper
        kernels (spectral's Jacobi eigensolver on a GPU), named in ``helper_kernels``.
    takes_skip: ``transform`` and ``retract`` honour a step skipped on the device (StepContext.skip):
        their entries carry ``extra["skip"]``, a 0-d int32 at a fixed address on their device that the
        backend sets at every such step (None at other steps), and they change no weight or state
        where it is not 0. A family without it runs its geometry's eager programs at such steps where
        it would write weights or geometry state.
    for_geometry(geometry) (optional): the family that runs this configuration of the geometry
        (runtime/fastpath.fast_path asks).
    problem(geometry): why this geometry's options have no kernel (the unit then runs its eager
        program, and describe() says why), or None.
    refusal(geometry, facts): why the family cannot take this parameter (its unit then runs the eager
        program, and ``describe()`` says why), or None.
    Every entry's ``extra["state"]`` is its unit's geometry state (the dict the eager pre_step gets).
    """

    retracts = False
    retraction_rescales = True
    counter_key: str | None = None
    state_outputs: tuple[str, ...] = ()
    fuses = True
    launches_kernels = True
    helper_kernels: tuple[str, ...] = ()
    note = ""
    takes_skip = False

    def problem(self, geometry) -> str | None:
        return None

    def refusal(self, geometry, facts) -> str | None:
        return None

    def written_state(self) -> tuple[str, ...]:
        """Every geometry-state key the kernels write in place."""
        return ((self.counter_key,) if self.counter_key else ()) + tuple(self.state_outputs)


# ---- helpers ----------------------------------------------------------------------------------
def _last_stage(items: list[WorkItem]) -> dict[str, int]:
    """Per parameter, the index of the last stage with a geometry on it."""
    last: dict[str, int] = {}
    for item in items:
        for name in item.unit.names:
            last[name] = max(last.get(name, -1), STAGES.index(item.geometry.stage))
    return last


def _counter(state: dict, device: torch.device, key: str) -> torch.Tensor:
    """A family's counter (``KernelFamily.counter_key``) as an int64 0-d tensor the kernels add to."""
    c = state.get(key, 0)
    if not (isinstance(c, torch.Tensor) and c.device == device and c.dtype == torch.int64 and c.dim() == 0):
        c = state[key] = torch.tensor(int(c), dtype=torch.int64, device=device)
    return c


def _written(family, entries) -> list[tuple[dict, str, object]]:
    """(geometry state, key, value) of every state entry the family's kernels write for these entries."""
    keys = family.written_state()
    return [(e.extra["state"], key, e.extra["state"].get(key)) for e in entries if "state" in e.extra for key in keys]


def _scalar_dtype() -> torch.dtype:
    try:
        from torch.optim.optimizer import _get_scalar_dtype
        return _get_scalar_dtype()
    except ImportError:  # older torch
        return torch.float32


def _state_keys(kind: str) -> tuple[str, ...]:
    """The optimizer state a fused kernel of `kind` ("sgd" with momentum, "adam") reads and writes,
    as the update classes of kernels/optim_updates define it."""
    from ..kernels.optim_updates import AdamUpdate, SGDUpdate
    return (SGDUpdate(lr=0.0, momentum=1.0) if kind == "sgd" else AdamUpdate(lr=0.0)).state_keys


class TritonBackend(Backend):
    name = "triton"

    def __init__(self):
        from ..kernels.tables import TableCache
        problem = triton_problem([])
        if problem:
            raise GeomCompileError(f"backend 'triton' is not available: {problem}")
        self.interpreted = interpreted()
        self.cache = TableCache()
        self._hidden: list[tuple[torch.Tensor, torch.Tensor]] = []   # grads hidden from the base optimizer
        self._retracted: set[str] = set()                            # renormalised inside a fused kernel
        self._plan: StepPlan | None = None                           # the last step's decisions (below)
        self._post_plan: _PostPlan | None = None                     # and its post-step's
        self._skip_flags: dict[torch.device, torch.Tensor] = {}      # StepContext.skip, at fixed addresses
        self.plan_builds = 0                                         # steps (or their later stages) decided from scratch

    @property
    def hidden_grads(self) -> int:
        """Gradients hidden from the base optimizer's step right now (0 outside optimizer.step)."""
        return len(self._hidden)

    # -- what runs where ------------------------------------------------------------------------
    def kernel_problem(self, p: torch.Tensor, grad: torch.Tensor | None = None) -> str | None:
        """Why the kernels cannot take this parameter, or None."""
        if p.dtype not in KERNEL_DTYPES:
            return f"{str(p.dtype).replace('torch.', '')} parameters have no kernel (float32, float16, bfloat16 do)"
        if grad is not None and grad.layout != torch.strided:
            return "sparse gradients have no kernel"
        if p.numel() >= 2 ** 31:
            return "tensors of 2^31 elements or more have no kernel (the kernels index with int32)"
        if p.device.type == "cuda" and self.interpreted:
            return "the Triton interpreter (TRITON_INTERPRET=1) runs CPU tensors only"
        if p.device.type == "cpu" and not self.interpreted:
            return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
        if p.device.type not in ("cpu", "cuda"):
            return f"no Triton kernels for {p.device.type} tensors"
        return None

    def unit_problem(self, item: WorkItem, ctx: StepContext, grads=None) -> str | None:
        """Why the kernels cannot take this unit (any of its parameters), or None."""
        grads = grads if grads is not None else [None] * len(item.unit.names)
        family = fast_path(item.geometry, "triton")
        refuse = getattr(family, "refusal", None)
        for name, facts, grad in zip(item.unit.names, item.unit.facts, grads):
            problem = self.kernel_problem(ctx.params[name], grad) or (refuse and refuse(item.geometry, facts))
            if problem:
                return problem
        return None

    def _fused_kind_of(self, family, name: str, p: torch.Tensor, ctx: StepContext,
                       last_stage: bool) -> tuple[str | None, str]:
        """fused_kind, for a family that may not fuse at all (KernelFamily.fuses)."""
        if not getattr(family, "fuses", True):
            return None, f"the {family.name} family is never fused with the base optimizer"
        return self.fused_kind(name, p, ctx, last_stage)

    def fused_kind(self, name: str, p: torch.Tensor, ctx: StepContext, last_stage: bool) -> tuple[str | None, str]:
        """("sgd"/"adam", "") when this parameter's whole step can run in the kernel, else (None, why)."""
        if not last_stage:
            return None, "a later-stage geometry needs the gradient (it transforms it after this one)"
        if ctx.skip is not None:       # GradScaler with a fused=True optimizer: never fused anyway
            return None, "GradScaler's skip verdict stays on the device and the fused kernels do not take it"
        kind, why = fused_kind(ctx.optimizer, ctx.group_of[name])
        if kind is None:
            return None, why
        state = ctx.optimizer.state.get(p, {})
        for key in _state_keys(kind):
            buf = state.get(key)
            if buf is not None and not (isinstance(buf, torch.Tensor) and buf.shape == p.shape
                                        and buf.dtype == p.dtype and buf.device == p.device):
                return None, f"its optimizer state {key!r} does not match the parameter's shape/dtype/device"
        if kind == "adam" and state and not all(k in state for k in ("step", "exp_avg", "exp_avg_sq")):
            return None, "its Adam state is incomplete"
        return kind, ""

    def describe(self, items: list[WorkItem], ctx: StepContext) -> list[str]:
        """Report lines: what is fused, what gets gradient-transform kernels only, what runs eager."""
        last = _last_stage(items)
        no_kernel, fused, transform, eager = Counter(), Counter(), defaultdict(list), defaultdict(list)
        torch_steps = defaultdict(list)
        for item in items:
            family = fast_path(item.geometry, "triton")
            if family is None:
                no_kernel[item.geometry.name] += 1
                continue
            index = STAGES.index(item.geometry.stage)
            family = fast_path(item.geometry, "triton")
            problem = family.problem(item.geometry) or self.unit_problem(item, ctx)
            if problem is None and not runs_on_local_shards(item, ctx):
                problem = ("sharded (FSDP2) in a layout whose update needs other ranks' rows: its eager sharded "
                           "program runs, collectives batched per stage")
            if problem:
                eager[problem] += list(item.unit.names)
                continue
            if not getattr(family, "launches_kernels", True):
                torch_steps[(item.geometry.name, family.note)] += list(item.unit.names)
                continue
            for name in item.unit.names:
                p = ctx.params[name]
                if ctx.shard(name) is not None:
                    transform["sharded (FSDP2): the kernel transforms the local shard, the base optimizer "
                              "steps the DTensor"].append(name)
                    continue
                kind, why = self._fused_kind_of(family, name, p, ctx, last[name] == index)
                if kind:
                    fused[type(ctx.optimizer).__name__] += 1
                else:
                    transform[why].append(name)
        lines = [f"backend triton: {n} parameter(s) fused: geometry, {opt} update and retraction in one "
                 f"kernel launch per bucket" for opt, n in fused.items()]
        lines += [f"backend triton: gradient-transform kernels only, then the base optimizer's own step, for "
                  f"{short_list(names, 4)}: {why}" for why, names in transform.items()]
        lines += [f"backend triton: {g}'s fast path {note}, for {short_list(names, 4)}"
                  for (g, note), names in torch_steps.items()]
        lines += [f"backend triton: {g} has no Triton kernel; its eager program runs for {n} unit(s)"
                  for g, n in no_kernel.items()]
        lines += [f"backend triton: eager program for {short_list(names, 4)}: {why}" for why, names in eager.items()]
        return lines

    # -- pre-step: gradient transforms and fused updates -----------------------------------------
    def pre_step(self, items, states: Callable[[WorkItem], dict], ctx: StepContext) -> None:
        self._hidden, self._retracted = [], set()   # a step that raised inside torch leaves no stale grads
        if ctx.skip is not None:
            for device, flag in self._skip_flags.items():     # the flags recorded launches point at
                flag.copy_(ctx.skip_on(device))               # (this step's post_step reads them too)
        plan, key = self._plan, _plan_key(items, ctx)
        if plan is not None and plan.holds(key, items, ctx) and self._replay(plan, items, states, ctx):
            return
        self._plan = StepPlan(key, items, ctx) if not ctx.shards else None
        self._decide(0, items, states, ctx)

    def _decide(self, start: int, items, states, ctx: StepContext) -> None:
        """The stages from `start` on, decided from scratch (and recorded when a plan is being built)."""
        last = _last_stage(items)
        for index in range(start, len(STAGES)):
            self._stage(index, STAGES[index], items, last, states, ctx, self._plan)
        if self._plan is not None:
            self._plan.finish(states, self._retracted)
        self.plan_builds += 1

    def _stage(self, index: int, stage: str, items, last: dict[str, int], states, ctx: StepContext,
               plan: "StepPlan | None") -> None:
        """One stage of the step, decided from scratch; with a plan, recorded into it."""
        record = _StagePlan() if plan is not None else None
        transform, fused = [], []
        for item, grads in stage_items_with_grads(items, stage, ctx):
            family = fast_path(item.geometry, "triton")
            if self._runs_eager(item, ctx, grads) or (
                    ctx.skip is not None and family.written_state() and not family.takes_skip):
                item.geometry.pre_step(item.unit, grads, states(item), ctx)   # eager honours the skip
                if record is not None:
                    record.eager.append(item)
                continue
            state = states(item)
            for name, facts, grad in zip(item.unit.names, item.unit.facts, grads):
                if grad is None:
                    continue
                p = ctx.params[name]
                if ctx.shard(name) is not None:      # the local shards, transform only
                    if local(grad).numel():
                        transform.append(Entry(name, local(p), facts, item, local(grad),
                                               {"kind": None, "retract": False, "state": state,
                                                "skip": self._skip_flag(ctx, local(p).device)}))
                    continue
                kind, _ = self._fused_kind_of(family, name, p, ctx, last[name] == index)
                retract = self.kernel_may_retract(item.geometry, name, p, kind, ctx)
                entry = Entry(name, p, facts, item, grad, {"kind": kind, "retract": retract, "state": state,
                                                           "skip": self._skip_flag(ctx, p.device)})
                (fused if kind else transform).append(entry)
        for key, entries in bucketize(transform, _transform_key).items():
            launches = [] if record is not None else None
            family = fast_path(key.geometry, "triton")
            family.transform(key.geometry, entries, self.cache, key.slot(entries), record=launches)
            if record is not None:
                record.calls.append(_Call(entries, launches, written=_written(family, entries)))
        for key, entries in bucketize(fused, lambda e: _fused_key(e, ctx)).items():
            calls = self._fused_step(key, entries, states, ctx, record is not None)
            if record is not None:
                record.calls += calls
        ctx.run_queued()            # the stage's sharded eager programs, collectives batched
        if plan is not None:
            plan.add(record)

    def _replay(self, plan: "StepPlan", items, states, ctx: StepContext) -> bool:
        """Run the step as the plan recorded it; False (nothing done) when it no longer applies. A
        later stage whose gradients no longer fit the tables (an eager program of an earlier stage
        replaced them) is decided from scratch, and so is the next step."""
        scalars = plan.scalars(ctx.optimizer)
        if (scalars is None or not plan.state_holds(ctx.optimizer)
                or not all(stage.grads_hold() for stage in plan.stages)):
            return False
        plan.replays += 1
        eager_ran = False
        for index, stage in enumerate(plan.stages):
            if eager_ran and not stage.grads_hold():     # checked again: an eager program ran before
                self._plan = None
                self._decide(index, items, states, ctx)
                return True
            eager_ran |= bool(stage.eager)
            for item in stage.eager:
                item.geometry.pre_step(item.unit, unit_grads(item, ctx), plan.states_of[id(item)], ctx)
            for call, new in zip(stage.calls, scalars[stage.first_call:]):
                call.run(new)
            if stage.hidden:
                self._hidden += [(p, p.grad) for p in stage.hidden]
                for p in stage.hidden:
                    p.grad = None
                self._retracted |= stage.retracted
        return True

    def _runs_eager(self, item: WorkItem, ctx: StepContext, grads=None) -> bool:
        """Whether the unit runs its geometry's eager program: no kernel family, a parameter the kernels
        cannot take, or a sharded parameter whose update needs other ranks' rows."""
        family = fast_path(item.geometry, "triton")
        return (family is None or family.problem(item.geometry) is not None
                or self.unit_problem(item, ctx, grads) is not None or not runs_on_local_shards(item, ctx))

    def kernel_may_retract(self, geometry, name: str, p: torch.Tensor, kind: str | None, ctx: StepContext) -> bool:
        """Whether a kernel may do this parameter's retraction itself: nothing outside the kernel must
        follow the rescale (see the module docstring). A family whose retraction is no rescale at all
        (``KernelFamily.retraction_rescales`` False) always may."""
        if not fast_path(geometry, "triton").retraction_rescales:
            return True
        if ctx.rescale_observed(name):
            return False
        state = ctx.optimizer.state.get(p, {})
        if kind:
            return not [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == p.shape
                        and k not in _state_keys(kind)]
        found = _retract_state(state, p)
        return found is not None and all(k in geometry.state_powers for k in found[0])

    def _fused_step(self, key: BucketKey, entries: list[Entry], states, ctx: StepContext,
                    recording: bool = False) -> list["_Call"]:
        """Prepare torch's own state for the bucket, launch, and hide the grads from the base step.
        Returns the launches as _Calls when `recording`."""
        opt, family = ctx.optimizer, fast_path(key.geometry, "triton")
        launches = []
        if entries[0].extra["kind"] == "sgd":
            for e in entries:
                e.extra.update(states=[], first=False)
                if key.update.momentum != 0:         # torch: state[p] only exists with momentum
                    state = opt.state[e.param]
                    buf = state.get("momentum_buffer")
                    if buf is None:                  # torch: buf = grad.clone() -> grad's dtype and strides
                        buf = state["momentum_buffer"] = torch.empty_like(e.grad, memory_format=torch.preserve_format)
                        e.extra["first"] = True
                    e.extra["states"] = [buf]
            launches.append((key.update, entries))
        else:
            by_step = defaultdict(list)
            for e in entries:
                state = opt.state[e.param]
                if len(state) == 0:                   # as Adam._init_group (capturable/fused are never fused here)
                    state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                    state["exp_avg"] = torch.zeros_like(e.param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(e.param, memory_format=torch.preserve_format)
                state["step"] += 1
                e.extra.update(states=[state["exp_avg"], state["exp_avg_sq"]], first=False)
                by_step[float(state["step"])].append(e)
            launches += [(dataclasses.replace(key.update, step=s), group) for s, group in by_step.items()]
        retract = family.retracts and key.extra == ("retract",)
        for e in entries:
            if family.counter_key:
                # Also without retract: the kernel then adds 0 to it, and a counter that stays the same
                # tensor keeps the bucket's cached table valid (a scratch one would change every step).
                e.extra["counter"] = _counter(states(e.item), e.param.device, family.counter_key)
        calls = []
        for update, group in launches:
            recorded = [] if recording else None
            family.fused(key.geometry, group, update, self.cache, key.slot(group), retract=retract, record=recorded)
            if recording:
                calls.append(_Call(group, recorded, update, [ctx.group_of[e.name] for e in group], opt,
                                   written=_written(family, group)))
        for e in entries:
            self._hidden.append((e.param, e.param.grad))
            e.param.grad = None
            if retract:
                self._retracted.add(e.name)
        return calls

    # -- post-step: restore grads, retractions ---------------------------------------------------
    def post_step(self, items, states: Callable[[WorkItem], dict], ctx: StepContext):
        for p, grad in self._hidden:
            p.grad = grad
        self._hidden = []
        post, key = self._post_plan, (self._plan, ctx.stepped, len(ctx.optimizer.state), ctx.skip is not None)
        if self._plan is not None and post is not None and post.holds(key, ctx):
            rescales = post.replay(states, ctx)
        else:
            self._post_plan = _PostPlan(key) if self._plan is not None else None
            rescales = self._post_stages(items, states, ctx, self._post_plan)
        self._retracted = set()
        return rescales

    def _post_stages(self, items, states, ctx: StepContext, plan: "_PostPlan | None") -> list:
        """The retractions decided from scratch; with a plan, recorded into it."""
        rescales = []
        with torch.no_grad():
            for stage in STAGES:
                record = _StagePlan()
                retract = []
                for item in stage_items(items, stage):
                    family = fast_path(item.geometry, "triton")
                    if self._runs_eager(item, ctx) or any(ctx.shard(n) is not None for n in item.unit.names):
                        rescales += eager_post_step(item, states, ctx)    # sharded: exact, with collectives
                        record.eager.append(item)
                        continue
                    if not family.retracts:
                        continue
                    if ctx.skip is not None and not family.takes_skip:
                        rescales += eager_post_step(item, states, ctx)     # it honours the skip
                        record.eager.append(item)
                        continue
                    names = [n for n in item.unit.names if ctx.has_grad(n) and ctx.params[n].numel()]
                    if any(n in self._retracted for n in names):
                        continue          # retracted inside its fused kernel (the whole unit was fused)
                    if not all(self.kernel_may_retract(item.geometry, n, ctx.params[n], None, ctx) for n in names):
                        rescales += eager_post_step(item, states, ctx)
                        record.eager.append(item)
                        continue
                    for name, facts in zip(item.unit.names, item.unit.facts):
                        if name not in names:
                            continue
                        p = ctx.params[name]
                        keys, tensors = (_retract_state(ctx.optimizer.state.get(p, {}), p)
                                         if family.retraction_rescales else ((), []))
                        extra = {"keys": keys, "states": tensors, "state": states(item),
                                 "skip": self._skip_flag(ctx, p.device)}
                        if family.counter_key:
                            extra["counter"] = _counter(states(item), p.device, family.counter_key)
                        retract.append(Entry(name, p, facts, item, None, extra))
                for key, entries in bucketize(retract, _retract_key).items():
                    geometry = key.geometry
                    powers = tuple(geometry.state_powers[k] for k in key.extra)
                    launches = []
                    family = fast_path(geometry, "triton")
                    family.retract(geometry, entries, powers, self.cache, key.slot(entries), record=launches)
                    record.calls.append(_Call(entries, launches, opt=ctx.optimizer, state_keys=key.extra,
                                              written=_written(family, entries)))
                rescales += ctx.run_queued()
                if plan is not None:
                    plan.stages.append(record)
        return rescales


    def _skip_flag(self, ctx: StepContext, device: torch.device) -> "torch.Tensor | None":
        """StepContext.skip copied to a tensor of this backend's at a fixed address on `device` (recorded
        launches keep pointing at it; pre_step sets it at every skipped-on-the-device step), or None."""
        if ctx.skip is None:
            return None
        flag = self._skip_flags.get(device)
        if flag is None:
            flag = self._skip_flags[device] = ctx.skip_on(device).to(torch.int32)
        return flag


def _transform_key(e: Entry) -> BucketKey:
    return BucketKey(e.item.geometry.name, e.item.geometry, None, e.param.dtype, e.param.device)


def _fused_key(e: Entry, ctx: StepContext) -> BucketKey:
    update = update_of(e.extra["kind"], ctx.optimizer, ctx.group_of[e.name])
    return BucketKey(e.item.geometry.name, e.item.geometry, update, e.param.dtype, e.param.device,
                     ("retract",) if e.extra["retract"] else ())


def _retract_key(e: Entry) -> BucketKey:
    return BucketKey(e.item.geometry.name, e.item.geometry, None, e.param.dtype, e.param.device, e.extra["keys"])


def _retract_state(state: dict, p: torch.Tensor):
    """(keys, tensors) of the optimizer state a retraction kernel rescales: every tensor of the
    parameter's shape. None when the kernel cannot take it (more than three buffers, one of another
    dtype/device, or a key whose power under the rescale is not known to the kernel's geometry)."""
    keys = tuple(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == p.shape)
    if len(keys) > 3 or any(state[k].dtype != p.dtype or state[k].device != p.device for k in keys):
        return None
    return keys, [state[k] for k in keys]


# ---- the step plan ------------------------------------------------------------------------------
# A step decided from scratch costs ~250 Python calls per parameter (fusion checks, entries, bucket
# keys, operands, layouts, table signatures). The decisions only change when one of these does, so
# they are recorded once and replayed while all hold:
# * which parameters have a gradient (ctx.stepped), the work items, each param group's fusion
#   switches (buckets.fused_kind), what observes rescales: the cheap key (_plan_key);
# * the identity of the items list, of optimizer.state and of every param group dict (load_state_dict
#   and add_param_group replace them), and the number of parameters with optimizer state (it grows
#   when momentum buffers / Adam state appear after a first step): StepPlan.holds;
# * per fused launch, each fused parameter's optimizer state tensors (the same objects) and the
#   launch's constexpr flags under the live hyperparameters (momentum turned on or off, weight decay
#   to or from 0, nesterov, maximize): StepPlan.scalars / state_holds;
# * per launch, the weights' addresses (``p.data = ...`` replaces them) and the gradients: a new
#   gradient with the old one's strides, dtype and (where the aligned path reads it) 16-byte
#   alignment has its address patched into the table (Launch.patch_grads); anything else decides
#   the step anew.
# Hyperparameter values (lr under a scheduler, momentum, betas...) are read live at every step,
# per launch, from its param groups (which must still agree on them). Adam's step counts are
# advanced with one torch._foreach_add_ per launch, as torch's foreach Adam does.
def _plan_key(items, ctx: StepContext) -> tuple:
    groups = ctx.optimizer.param_groups
    return (ctx.stepped, len(items), len(ctx.optimizer.state), len(groups),
            [fused_kind(ctx.optimizer, g) for g in groups], _observers(ctx), ctx.skip is not None)


def _observers(ctx: StepContext):
    """What decides ctx.rescale_observed beyond each parameter's facts: the hooks' on_retract
    callbacks (their number), or the function itself when it is not the hooks' method."""
    owner = getattr(ctx.rescale_observed, "__self__", None)
    callbacks = getattr(owner, "callbacks", None)
    return ctx.rescale_observed if callbacks is None else len(callbacks)


class _Call:
    """One recorded family call: its launches, the tensors they were recorded with, and for a
    fused call the param groups its hyperparameters come from."""

    def __init__(self, entries: list[Entry], launches: list | None, update=None, groups=(), opt=None,
                 state_keys: tuple = (), written: list | None = None):
        self.launches = launches or []
        self.replayable = launches is not None and None not in self.launches and not any(
            e.extra.get("first") for e in entries)           # a new momentum buffer is flagged in the table
        self.params = [e.param for e in entries]
        self.names = [e.name for e in entries]
        self.reads_grads = any(launch is not None and launch.grad_role is not None for launch in self.launches)
        # Weak references: a plan must not keep last step's gradients (or a replaced optimizer state)
        # alive after zero_grad(set_to_none=True) / load_state_dict; a dead one differs from any tensor.
        self.grads = [weakref.ref(e.grad) for e in entries] if self.reads_grads else []
        self.strides = [e.grad.stride() for e in entries] if self.reads_grads else []
        self.aligned = [e.grad.data_ptr() % 16 == 0 for e in entries] if self.reads_grads else []
        self.dtype = entries[0].param.dtype if entries else None
        self.device = entries[0].param.device if entries else None
        self.weights = [p.data_ptr() for p in self.params]
        self.update, self.kind = update, None if update is None else type(update).__name__
        self.groups = list({id(g): g for g in groups}.values())
        self.flags = None if update is None else kernel_flags(update)
        self.step = getattr(update, "step", 0)
        # torch creates no state for SGD without momentum: nothing to look up (state[p] would create it)
        if update is not None:
            state_keys = update.state_keys + (("step",) if self.kind == "AdamUpdate" else ())
        self.state_keys = state_keys
        dicts = [opt.state[p] for p in self.params] if self.state_keys else []
        self.state_dicts = list(map(id, dicts))
        self.steps = [weakref.ref(d["step"]) for d in dicts] if self.kind == "AdamUpdate" else []
        self.state_tensors = [weakref.ref(t) for t in self._state_tensors(dicts)]
        # the geometry state the kernels write in place: (state dict, key, the tensor the table points to)
        self.written = written or []

    def _state_tensors(self, dicts) -> list:
        return [d[k] for d in dicts for k in self.state_keys]

    def scalars(self, opt, replays: int):
        """The launch's scalar arguments under the live hyperparameters, or None when the recorded
        launch no longer fits them (another constexpr flag; its groups disagree)."""
        if self.update is None:
            return self.launches[0].scalars if self.launches else {}
        kind = "sgd" if self.kind == "SGDUpdate" else "adam"
        updates = [update_of(kind, opt, g) for g in self.groups]
        update = updates[0]
        if any(u != update for u in updates[1:]):
            return None
        if kind == "adam":
            update = dataclasses.replace(update, step=self.step + replays)
        scalars, flags = kernel_args_of(update)
        return scalars if flags == self.flags else None

    def state_holds(self, opt) -> bool:
        if any(d.get(key) is not value for d, key, value in self.written):
            return False
        if not self.state_keys:
            return True
        state = opt.state
        dicts = [state[p] for p in self.params]
        if list(map(id, dicts)) != self.state_dicts:
            return False
        try:
            tensors = self._state_tensors(dicts)
        except KeyError:
            return False
        return not any(map(is_not, tensors, [ref() for ref in self.state_tensors]))

    def grads_hold(self) -> bool:
        """The gradients are the recorded ones, or new ones the tables can take (then patched in)."""
        if [p.data_ptr() for p in self.params] != self.weights:
            return False
        if not self.reads_grads:
            return True
        grads = [p.grad for p in self.params]
        changed = [i for i, new in enumerate(map(is_not, grads, [ref() for ref in self.grads])) if new]
        if not changed:
            return True
        for i in changed:
            g = grads[i]
            if (g is None or g.layout != torch.strided or g.dtype != self.dtype or g.device != self.device
                    or g.stride() != self.strides[i] or (self.aligned[i] and g.data_ptr() % 16)):
                return False
        for launch in self.launches:
            if launch.grad_role is not None:
                launch.patch_grads(grads)
        self.grads = [weakref.ref(g) for g in grads]
        return True

    def run(self, scalars: dict) -> None:
        if self.steps:                            # Adam's state["step"] += 1, one op for the launch
            torch._foreach_add_([ref() for ref in self.steps], 1)      # alive: state_holds checked them
        for launch in self.launches:
            launch.run(scalars)


class _StagePlan:
    """One stage of a recorded step (penalty, metric or manifold; or of its post-step)."""

    def __init__(self):
        self.eager: list[WorkItem] = []
        self.calls: list[_Call] = []
        self.hidden: list[torch.Tensor] = []     # parameters whose grads a fused launch consumed
        self.retracted: set[str] = set()         # names a fused launch renormalised
        self.first_call = 0                      # index of this stage's first call in the plan

    def grads_hold(self) -> bool:
        return all(call.grads_hold() for call in self.calls)


class StepPlan:
    """The decisions of one step of the Triton backend, replayed while they hold (see above)."""

    def __init__(self, key: tuple, items, ctx: StepContext):
        self.key, self.items = key, items
        self.state, self.groups = id(ctx.optimizer.state), list(ctx.optimizer.param_groups)
        self.group_list = ctx.optimizer.param_groups
        self.stages: list[_StagePlan] = []
        self.calls: list[_Call] = []
        self.states_of: dict[int, dict] = {}
        self.replayable = True
        self.replays = 0

    def add(self, stage: _StagePlan) -> None:
        stage.first_call = len(self.calls)
        self.calls += stage.calls
        for call in stage.calls:
            self.replayable &= call.replayable
            if call.update is not None:
                stage.hidden += call.params
        self.stages.append(stage)

    def finish(self, states, retracted: set[str]) -> None:
        for stage in self.stages:
            for item in stage.eager:
                self.states_of[id(item)] = states(item)
            stage.retracted = {n for call in stage.calls if call.update is not None for n in call.names} & retracted

    def holds(self, key: tuple, items, ctx: StepContext) -> bool:
        opt = ctx.optimizer
        return (self.replayable and key == self.key and items is self.items and id(opt.state) == self.state
                and opt.param_groups is self.group_list and not any(map(is_not, opt.param_groups, self.groups)))

    def scalars(self, opt) -> list[dict] | None:
        """Per call, the scalars of this replay; None when a call no longer fits."""
        out = []
        for call in self.calls:
            scalars = call.scalars(opt, self.replays + 1)
            if scalars is None:
                return None
            out.append(scalars)
        return out

    def state_holds(self, opt) -> bool:
        return all(call.state_holds(opt) for call in self.calls)


def kernel_flags(update) -> dict:
    return kernel_args_of(update)[1]


def kernel_args_of(update):
    from ..kernels.optim_updates import kernel_args
    return kernel_args(update)


class _PostPlan:
    """The post-step (retraction) decisions recorded at a step of a pre-step plan, replayed while
    that plan is the backend's, the same parameters stepped and no parameter got new optimizer state."""

    def __init__(self, key: tuple):
        self.key = key
        self.stages: list[_StagePlan] = []

    def holds(self, key: tuple, ctx: StepContext) -> bool:
        return (key[0] is self.key[0] and key[1:] == self.key[1:]
                and all(call.replayable and call.state_holds(ctx.optimizer) and call.grads_hold()
                        for stage in self.stages for call in stage.calls))

    def replay(self, states, ctx: StepContext) -> list:
        rescales = []
        with torch.no_grad():
            for stage in self.stages:
                for item in stage.eager:
                    rescales += eager_post_step(item, states, ctx)
                for call in stage.calls:
                    call.run(None)
                rescales += ctx.run_queued()
        return rescales

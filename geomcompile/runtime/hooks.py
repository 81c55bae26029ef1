"""Install a plan's update programs as hooks on any torch.optim optimizer: the step protocol.

    optimizer.step(closure)                 # user, Lightning, accelerate, HF Trainer, GradScaler
     └─ step pre-hook (_pre)
         1. closure given: run it once under enable_grad, so the geometry acts on the gradients it
            produces; torch's step gets a closure that returns the cached loss (no second backward)
         2. no parameter of the plan has a gradient, or DCP's fake initialisation step (lr 0 in every
            group, all gradients zero): nothing runs, no counter moves
         3. parameters added by add_param_group since the last step get their geometries
         4. backend.pre_step: penalty, metric, manifold transforms of p.grad (or fused updates)
     └─ the base optimizer's step (torch's own, minus the parameters a fused kernel already stepped)
     └─ step post-hook (_post): backend.post_step (retractions), then the consequences of every
        function-preserving rescale (Rescale): optimizer state, wrapper state, running statistics
        of absorbing normalisations, plan.on_retract callbacks

Gradient accumulation needs nothing special: whatever number of backwards ran, the transform
sees their sum in p.grad once, at the step. Under ``torch.amp.GradScaler`` the hooks run inside
``optimizer.step``, after unscaling; a step the scaler skips runs no hook at all.

User step hooks run in registration order with ours: registered before install they see the loss
gradients, after it the transformed ones (on the triton backend a fused parameter's ``.grad`` is None
in between; docs/triton.md has the table, tests/test_reliability.py pins it).

State: ``runtime/state.py`` (owned by the plan, carried inside the optimizer's state dict).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable

import torch

from ..errors import GeomCompileError, GeomCompileWarning
from ..geometries.base import STAGES, Rescale, StepContext, host_reads_are_free, host_reads_are_free_for
from . import absorb
from .backends import Backend, WorkItem
from .distributed import any_on_some_rank, local
from .state import ENTRY_KEY, PlanState, extract_entries, pids_by_name, stray_entries
from .wrappers import WEIGHT_LIKE_STATE


# The installation on each optimizer (one plan per optimizer; weak, so an optimizer is still freed).
_INSTALLED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, Installation]" = weakref.WeakKeyDictionary()


class Installation:
    def __init__(self, optimizer: torch.optim.Optimizer, wrappers: list, items: list[WorkItem],
                 backend: Backend, ctx: StepContext, state: PlanState, name_of: dict[int, str],
                 state_mismatch: str = "error", on_new_params: Callable | None = None,
                 clip_grad_norm: float | None = None):
        self.optimizer = optimizer                 # the optimizer that owns the state and the step
        self.wrappers = wrappers                   # outermost first (ZeRO, Lookahead, accelerate, ...)
        self.items = sorted(items, key=lambda it: STAGES.index(it.geometry.stage))
        self.backend = backend
        self.ctx = ctx
        self.state = state
        self.name_of = name_of                     # id(parameter) -> canonical name
        self.state_mismatch = state_mismatch
        self.on_new_params = on_new_params         # (params) -> new work items, for add_param_group
        self.clip_grad_norm = clip_grad_norm
        self.handles = []
        self.callbacks: dict[int, Callable[[Rescale], None]] = {}
        self.report: list[str] = []      # notes for plan.summary(): backend choice, what on_install did
        self.warnings: list[str] = []
        self._groups_seen, self._group_dicts = None, []      # see _refresh_groups
        self._refresh_groups()      # the first step finds the steady state (a compiled step: no recompile)
        self._known_params = self._optimizer_param_ids()
        self._unscaled_keys_warned: set[tuple[str, str]] = set()
        self._facts_of = {n: f for it in self.items for n, f in zip(it.unit.names, it.unit.facts)}
        self._planned = self._planned_params()
        ctx.rescale_observed = self._rescale_observed

    @property
    def _all_honour_device_skip(self) -> bool:
        """Whether GradScaler's skip verdict may stay on the device (Geometry.honours_device_skip)."""
        return all(item.geometry.honours_device_skip for item in self.items)

    # -- state -----------------------------------------------------------------------------
    def state_of(self, item: WorkItem) -> dict:
        return self.state.of(item.unit.key, item.geometry.name)

    def _create_state(self, items: list[WorkItem]) -> None:
        for item in items:
            self.state.add(item.unit.key, item.geometry.name, item.unit.names[0],
                           item.geometry.init_state(item.unit, self.ctx))

    # -- hooks -----------------------------------------------------------------------------
    def install(self) -> None:
        if self.optimizer in _INSTALLED:
            raise GeomCompileError(
                f"this {type(self.optimizer).__name__} already has a geomcompile plan installed; two plans on "
                "one optimizer would both run at every step and share its state. Fix: call remove() on the "
                "installed plan first, or put every rule in one policy")
        stray = stray_entries(self.optimizer)
        if stray:
            raise GeomCompileError(
                "this optimizer already holds geomcompile state loaded before the plan was installed "
                f"({len(stray)} parameter entries; torch casts it to each parameter's dtype, so it cannot be "
                "taken over exactly). Fix: install the plan first (gc.apply / plan.install), then call "
                "optimizer.load_state_dict(...)")
        self._create_state(self.items)
        for item in self.items:
            self.report += item.geometry.on_install(item.unit, self.state_of(item), self.ctx)
        opt = self.optimizer
        self.handles.append(opt.register_step_pre_hook(self._pre))
        self.handles.append(opt.register_step_post_hook(self._post))
        self.handles.append(opt.register_state_dict_post_hook(self._embed_state))
        self.handles.append(opt.register_load_state_dict_pre_hook(self._take_loaded_state))
        self.handles.append(opt.register_load_state_dict_post_hook(self._take_stray_state))
        for wrapper in self.wrappers:
            # A wrapper that writes the owner's state itself (ZeroRedundancyOptimizer.load_state_dict)
            # leaves our entries in optimizer.state; take them when its own load runs.
            if hasattr(wrapper, "_optimizer_load_state_dict_pre_hooks"):
                self.handles.append(wrapper.register_load_state_dict_pre_hook(
                    lambda _w, sd: self._take_stray_state(self.optimizer) or None))
        _INSTALLED[opt] = self

    def _embed_state(self, optimizer, state_dict):
        return self.state.embed(state_dict, pids_by_name(optimizer, self.name_of))

    def _take_loaded_state(self, optimizer, state_dict):
        clean, entries = extract_entries(state_dict, optimizer, self.name_of)
        if entries:
            self.report += self.state.load_entries(entries, self.state_mismatch)
        return clean

    def _take_stray_state(self, optimizer) -> None:
        stray = stray_entries(self.optimizer)
        if not stray:
            return
        entries = {}
        for p, entry in stray.items():
            entries[entry.get("name")] = entry
            del self.optimizer.state[p][ENTRY_KEY]
            if not self.optimizer.state[p]:
                del self.optimizer.state[p]
        self.report += self.state.load_entries(entries, self.state_mismatch)

    # -- the step protocol -------------------------------------------------------------------
    def _pre(self, optimizer, args, kwargs):
        # torch passes the step's own (self, closure?) as args.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        replaced = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            replaced = (args[:1], {**{k: v for k, v in kwargs.items() if k != "closure"},
                                   "closure": _CachedClosure(loss)})
        self._adopt_new_params()
        self._refresh_groups()
        self.ctx.skip = None
        if self._amp_skipped_step():
            self.ctx.stepped = frozenset()
            return replaced
        stepped = frozenset(n for n, p in self._planned if p.grad is not None)
        self.ctx.stepped = stepped if stepped and not self._is_initialisation_step(stepped) else frozenset()
        if self.ctx.stepped:
            self.backend.pre_step(self.items, self.state_of, self.ctx)
            self.ctx.run_queued()          # sharded programs a backend left queued (eager runs its own)
            if self.clip_grad_norm is not None:
                grads = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(grads, self.clip_grad_norm)
        return replaced

    def _amp_skipped_step(self) -> bool:
        """GradScaler with an optimizer that unscales in its own step (``fused=True`` SGD/Adam/AdamW:
        ``_step_supports_amp_scaling``) does not unscale the gradients; it sets ``optimizer.grad_scale``
        and ``found_inf`` for the fused kernel. The geometries need true gradients, so unscale them
        here, as GradScaler.unscale_ would (times the float32 reciprocal of the scale), and clear
        ``grad_scale`` so the fused step does not unscale twice. A step GradScaler skips (inf/NaN
        found) changes no weight and no state, and is not counted.

        How it is skipped: when every installed geometry declares ``honours_device_skip`` and
        ``found_inf`` is on a device, the verdict stays there (``ctx.skip``; the geometries' programs
        leave everything unchanged where it is true, the step counter subtracts it on the device), so
        there is no host sync. Otherwise ``found_inf`` is read on the host (one sync per step on a
        GPU, only in this configuration) and a skipped step runs no geometry."""
        opt = self.optimizer
        found_inf = getattr(opt, "found_inf", None)
        if isinstance(found_inf, torch.Tensor):
            if host_reads_are_free(found_inf) or not self._all_honour_device_skip:
                if bool(found_inf.item()):
                    return True
            else:
                self.ctx.skip = found_inf.reshape(()) != 0
        scale = getattr(opt, "grad_scale", None)
        if isinstance(scale, torch.Tensor):
            inv = scale.double().reciprocal().float()
            with torch.no_grad():
                for group in opt.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.mul_(inv.to(p.grad.device))
            opt.grad_scale = None
        return False

    def _refresh_groups(self) -> None:
        """Hyperparameters are read from the live param_groups: load_state_dict replaces the group dicts."""
        groups = self.optimizer.param_groups
        if self._groups_seen is groups and all(
                a is b for a, b in zip(self._group_dicts, groups)) and len(self._group_dicts) == len(groups):
            return
        self._groups_seen, self._group_dicts = groups, list(groups)
        self.ctx.group_of = groups_by_name(self.optimizer, self.ctx.params)

    def _rescale_observed(self, name: str) -> bool:
        """Whether anything outside the optimizer's state follows a rescale of this parameter."""
        if self.callbacks:
            return True
        facts = self._facts_of.get(name)
        return facts is not None and absorb.has_running_stats(facts)

    def _post(self, optimizer, args, kwargs):
        if not self.ctx.stepped:
            return
        with torch.no_grad():
            rescales = list(self.backend.post_step(self.items, self.state_of, self.ctx) or [])
            rescales += self.ctx.run_queued()
            for event in rescales:
                self._apply_consequences(event)
        self.state.count_step(self.ctx.skip)
        self.ctx.stepped = frozenset()
        self.ctx.skip = None

    def _is_initialisation_step(self, stepped) -> bool:
        """DCP's get/set_state_dict initialise optimizer state with one step at lr 0 on zero gradients
        (torch.distributed.checkpoint.state_dict._init_optim_state): that step is not training.
        Whether every gradient is zero is read on the host (one read per device), except where every
        installed geometry honours a device-side skip and nothing is sharded: then the verdict joins
        ``ctx.skip`` and this returns False (the programs run and change nothing where it is true)."""
        if any(_lr(g) != 0 for g in self.optimizer.param_groups):
            return False
        per_device: dict = {}
        for n in stepped:
            grad = local(self.ctx.params[n].grad)
            per_device.setdefault(grad.device, []).append(grad.any())
        nonzero = [torch.stack(flags).any() for flags in per_device.values()]
        if (not self.ctx.shards and self._all_honour_device_skip
                and not host_reads_are_free_for(nonzero)):
            # the verdict stays on the device, as GradScaler's does (_amp_skipped_step): no host read
            first = nonzero[0].device
            zero = ~torch.stack([f.to(first) for f in nonzero]).any()
            self.ctx.skip = zero if self.ctx.skip is None else self.ctx.skip | zero.to(self.ctx.skip.device)
            return False
        # one host read per device (not one per parameter): on a GPU, one sync at such a step
        return not any_on_some_rank(any(bool(f) for f in nonzero), self.ctx.shards)   # sharded: ranks alike

    def _adopt_new_params(self) -> None:
        """add_param_group after install: the new parameters get the geometries their names match."""
        ids = self._optimizer_param_ids()
        if ids == self._known_params:
            return
        new = ids - self._known_params
        self._known_params = ids
        if not new or self.on_new_params is None:
            return
        items = self.on_new_params(new)
        if items:
            self._create_state(items)
            for item in items:
                self.report += item.geometry.on_install(item.unit, self.state_of(item), self.ctx)
            self.items = sorted(self.items + items, key=lambda it: STAGES.index(it.geometry.stage))
            self._facts_of.update({n: f for it in items for n, f in zip(it.unit.names, it.unit.facts)})
            self._planned = self._planned_params()

    def _planned_params(self) -> list[tuple[str, torch.Tensor]]:
        """(name, parameter) of every parameter of the work items, once each (read at every step)."""
        return [(n, self.ctx.params[n]) for n in dict.fromkeys(n for it in self.items for n in it.unit.names)]

    def _optimizer_param_ids(self) -> frozenset:
        # Cheap: a set of ids per step, compared with the last one.
        return frozenset(id(p) for g in self.optimizer.param_groups for p in g["params"])

    # -- consequences of a function-preserving rescale ----------------------------------------
    def _apply_consequences(self, event: Rescale) -> None:
        p, scale = event.param, event.scale
        shard = self.ctx.shard(event.name)
        if shard is not None:                # sharded: the state's local rows take the local factors
            scale = shard.local_rows(scale) if (event.facts.out_dim or 0) == 0 else scale
        geometry_powers = self._powers_of(event.name)
        state = self.optimizer.state.get(p, {})
        for key, buf in state.items():
            if not (isinstance(buf, torch.Tensor) and buf.shape == p.shape and buf.numel()):
                continue
            buf = local(buf)
            power = geometry_powers.get(key, 1 if key in WEIGHT_LIKE_STATE else None)
            if power is None:
                if (event.name, key) not in self._unscaled_keys_warned:
                    self._unscaled_keys_warned.add((event.name, key))
                    # Rescale events come at every step (factors of 1 where nothing was renormalised:
                    # deciding that on the host would be a sync), so this says "when".
                    warnings.warn(f"{event.name}: optimizer state {key!r} is not rescaled when its units are "
                                  f"renormalised (geomcompile does not know how it scales); the run may then no "
                                  f"longer be equivalent to the unrescaled one", GeomCompileWarning, stacklevel=3)
                continue
            buf.copy_((buf.to(scale.dtype) * scale**power).to(buf.dtype))
        if self.ctx.model is not None:
            absorb.rescale_running_stats(self.ctx.model, event.facts, event.channel_factors, self.ctx.params)
        for callback in list(self.callbacks.values()):
            callback(event)

    def _powers_of(self, name: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in self.items:
            if name in item.unit.names:
                out.update(item.geometry.state_powers)
        return out

    def add_callback(self, callback: Callable[[Rescale], None]) -> "_CallbackHandle":
        key = max(self.callbacks, default=-1) + 1
        self.callbacks[key] = callback
        return _CallbackHandle(self.callbacks, key)

    def remove(self) -> None:
        for h in self.handles + self.ctx.handles:
            h.remove()
        self.handles, self.ctx.handles = [], []
        self.callbacks.clear()
        if _INSTALLED.get(self.optimizer) is self:
            del _INSTALLED[self.optimizer]


def groups_by_name(optimizer: torch.optim.Optimizer, params: dict) -> dict[str, dict]:
    """Parameter name -> the param group (dict) that holds it now; names not in the optimizer are left out."""
    in_optimizer = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return {name: in_optimizer[id(p)] for name, p in params.items() if id(p) in in_optimizer}


class _CachedClosure:
    """What torch's step receives after the pre-hook ran the user's closure: the same loss, again."""

    def __init__(self, loss):
        self.loss = loss

    def __call__(self):
        return self.loss


class _CallbackHandle:
    def __init__(self, table: dict, key: int):
        self.table, self.key = table, key

    def remove(self) -> None:
        self.table.pop(self.key, None)


def _lr(group: dict) -> float:
    lr = group.get("lr", 1.0)
    return float(lr) if isinstance(lr, torch.Tensor) else lr

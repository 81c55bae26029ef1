"""Install a plan's update programs as hooks on any torch.optim optimizer.

* ``register_step_pre_hook``: penalty, then metric, then manifold gradient transforms, applied
  to ``p.grad`` in place. Under ``torch.amp.GradScaler`` the hooks run inside ``optimizer.step``,
  after unscaling; a step the scaler skips runs no hook at all.
* ``register_step_post_hook``: retractions (psi renormalisation, manifold projections).

Geometry state lives in ``optimizer.state["geomcompile"]`` (a string key: torch keeps it as is
in ``state_dict()`` / ``load_state_dict()``), keyed by unit and geometry name, so a resumed run
continues exactly. The base optimizer's per-parameter state is never touched by the hooks'
bookkeeping (Adam initialises itself on an empty ``state[p]``).
"""
from __future__ import annotations

import copy

import torch

from ..geometries.base import STAGES, StepContext
from .backends import Backend, WorkItem

STATE_KEY = "geomcompile"


class Installation:
    def __init__(self, optimizer: torch.optim.Optimizer, items: list[WorkItem], backend: Backend,
                 ctx: StepContext):
        self.optimizer = optimizer
        self.items = sorted(items, key=lambda it: STAGES.index(it.geometry.stage))
        self.backend = backend
        self.ctx = ctx
        self.handles = []
        self.report: list[str] = []      # notes for plan.summary(): backend choice, what on_install did
        self.warnings: list[str] = []

    # -- state -----------------------------------------------------------------------------
    def root(self) -> dict:
        root = self.optimizer.state.get(STATE_KEY)
        if not isinstance(root, dict):
            root = self.optimizer.state[STATE_KEY] = {"version": 1, "step": 0, "units": {}}
        return root

    def state_of(self, item: WorkItem) -> dict:
        per_unit = self.root()["units"].setdefault(item.unit.key, {})
        if item.geometry.name not in per_unit:
            per_unit[item.geometry.name] = item.geometry.init_state(item.unit, self.ctx)
        return per_unit[item.geometry.name]

    # -- hooks -----------------------------------------------------------------------------
    def install(self) -> None:
        self._own_loaded_state(self.optimizer)
        for item in self.items:
            self.report += item.geometry.on_install(item.unit, self.state_of(item), self.ctx)
        self.handles.append(self.optimizer.register_step_pre_hook(self._pre))
        self.handles.append(self.optimizer.register_step_post_hook(self._post))
        self.handles.append(self.optimizer.register_load_state_dict_post_hook(self._own_loaded_state))

    @staticmethod
    def _own_loaded_state(optimizer) -> None:
        """torch's load_state_dict keeps non-parameter entries as the very objects of the checkpoint;
        copy ours so that stepping never writes into the user's saved dict (or a second optimizer's)."""
        if isinstance(optimizer.state.get(STATE_KEY), dict):
            optimizer.state[STATE_KEY] = copy.deepcopy(optimizer.state[STATE_KEY])

    def _pre(self, optimizer, args, kwargs):
        self.ctx.step = self.root()["step"]
        self.backend.pre_step(self.items, self.state_of, self.ctx)

    def _post(self, optimizer, args, kwargs):
        self.backend.post_step(self.items, self.state_of, self.ctx)
        self.root()["step"] += 1

    def remove(self, keep_state: bool = False) -> None:
        for h in self.handles + self.ctx.handles:
            h.remove()
        self.handles, self.ctx.handles = [], []
        if not keep_state:
            self.optimizer.state.pop(STATE_KEY, None)

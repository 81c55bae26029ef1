"""Geometry state: owned by the installed plan, carried inside the optimizer's own state dict.

Layout (docs/state.md has the reasons):

* The live state is a ``PlanState`` held by the installation, never an entry of
  ``optimizer.state``: that dict stays keyed by parameters and holds only what the base optimizer
  put there, so torch.compile of ``optimizer.step``, ``ZeroRedundancyOptimizer`` and
  ``torch.distributed.checkpoint`` (which all walk ``optimizer.state``) see a plain optimizer.
* ``optimizer.state_dict()`` gets it through a state-dict post-hook, *per parameter*: each unit's
  state rides in the entry of the unit's first parameter, under ``state[pid]["geomcompile"]``::

      {"plan": <fingerprint digest>, "version": "0.1.0", "name": <canonical parameter name>,
       "geometries": {stage: label}, "units": {unit key: {geometry name: {key: tensor | number}}}}

  Per-parameter entries survive every system that re-keys or partitions the optimizer state by
  parameter (DCP turns ids into fully qualified names; ZeRO maps local ids to global ones) while
  top-level keys are dropped by DCP. Parameters without base state get an entry of their own.
* ``optimizer.load_state_dict()`` runs our load pre-hook first: it takes every ``"geomcompile"``
  entry out of a shallow copy (torch would otherwise cast our tensors to the parameter's dtype),
  checks the fingerprints against the installed plan and copies the values into ``PlanState``
  (so stepping never writes into the user's checkpoint).
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch

from ..errors import GeomCompileError

ENTRY_KEY = "geomcompile"


@dataclass(frozen=True)
class Fingerprint:
    """What made the state: geomcompile's version, the resolved policy, the per-parameter assignments."""

    version: str
    assignments: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]   # (canonical name, ((stage, label), ...))

    @property
    def digest(self) -> str:
        """Identity of the resolved plan (version and assignments; the policy's wording is not part of it)."""
        text = json.dumps([self.version, self.assignments], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def geometries_of(self, name: str) -> dict[str, str]:
        return dict(dict(self.assignments).get(name, ()))


def make_fingerprint(version: str, assignments: dict[str, dict[str, Any]]) -> Fingerprint:
    rows = tuple(sorted((name, tuple(sorted((stage, g.label()) for stage, g in stages.items())))
                        for name, stages in assignments.items() if stages))
    return Fingerprint(version, rows)


class PlanState:
    """Per unit and geometry, the state dict the geometry's programs read and write."""

    def __init__(self, fingerprint: Fingerprint):
        self.fingerprint = fingerprint
        self.units: dict[str, dict[str, dict]] = {}
        self.anchor: dict[str, str] = {}           # unit key -> canonical name of the parameter carrying it
        # Optimizer steps the geometries took (skipped ones not counted). A tensor, so that a compiled
        # optimizer.step adds to it in place instead of guarding on (and recompiling for) a Python int.
        self.steps = torch.zeros((), dtype=torch.int64)
        # Of those, the steps GradScaler skipped with its verdict left on a device (StepContext.skip):
        # a device tensor, subtracted when the count is read (counted_steps), so a step reads nothing.
        self.skipped_on_device: torch.Tensor | None = None

    def count_step(self, skip: torch.Tensor | None = None) -> None:
        """One more step; `skip` (a 0-d bool device tensor) true: a skipped step, not counted."""
        self.steps.add_(1)
        if skip is None:
            return
        if self.skipped_on_device is None:
            self.skipped_on_device = torch.zeros((), dtype=torch.int64, device=skip.device)
        self.skipped_on_device.add_(skip.to(self.skipped_on_device.device))

    def counted_steps(self) -> torch.Tensor:
        """The steps the geometries took, a CPU int64 0-d tensor (reads the device's skip count)."""
        if self.skipped_on_device is None:
            return self.steps.clone()
        return self.steps - self.skipped_on_device.cpu()

    def add(self, unit_key: str, geometry_name: str, anchor: str, state: dict) -> None:
        self.units.setdefault(unit_key, {})[geometry_name] = state
        self.anchor[unit_key] = anchor

    def of(self, unit_key: str, geometry_name: str) -> dict:
        return self.units[unit_key][geometry_name]

    # -- a DCP Stateful: dcp.save({"geomcompile": plan.state, ...}) also works -------------------
    def state_dict(self) -> dict:
        return {"entries": self.entries()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.load_entries(state_dict["entries"])

    # -- carried by the optimizer's state dict ---------------------------------------------------
    def entries(self) -> dict[str, dict]:
        """canonical parameter name -> the entry saved with that parameter."""
        out: dict[str, dict] = {}
        steps = self.counted_steps()         # once: it may read a device counter
        for key, per_geometry in self.units.items():
            name = self.anchor[key]
            entry = out.setdefault(name, {"plan": self.fingerprint.digest, "version": self.fingerprint.version,
                                          "name": name, "geometries": self.fingerprint.geometries_of(name),
                                          "steps": steps.clone(), "units": {}})
            entry["units"][key] = {g: dict(s) for g, s in per_geometry.items()}
        return out

    def embed(self, state_dict: dict, pid_of_name: dict[str, int]) -> dict:
        """Add our entries to an optimizer state dict (the post-hook). Returns it."""
        state = state_dict.setdefault("state", {})
        for name, entry in self.entries().items():
            pid = pid_of_name.get(name)
            if pid is None:
                continue
            state.setdefault(pid, {})
            state[pid] = {**state[pid], ENTRY_KEY: entry}
        return state_dict

    def load_entries(self, entries: dict[str, dict], on_mismatch: str = "error") -> list[str]:
        """Copy saved entries (canonical name -> entry) into the live state. Returns report lines.

        Raises GeomCompileError when the entries were made by another plan, unless on_mismatch is
        "reset" (the state of the differing parameters starts fresh) or "load" (the checkpoint's
        state is taken wherever a unit and geometry of the same name exist); both are reported."""
        problems = _differences(self.fingerprint, self.entries(), entries)
        if problems and on_mismatch == "error":
            texts = [text for _, text in problems]
            shown = "; ".join(texts[:4]) + (f"; and {len(texts) - 4} more" if len(texts) > 4 else "")
            raise GeomCompileError(
                f"the loaded optimizer state was made by a different geomcompile plan: {shown}. Fix: install "
                f"the same policy on the same model before loading, or pass state_mismatch='reset' (start the "
                f"differing geometry state fresh) or 'load' (take the checkpoint's state anyway) to "
                f"gc.apply / plan.install")
        differing = {name for name, _ in problems} if on_mismatch == "reset" else set()
        steps = [e.get("steps", 0) for name, e in entries.items() if name not in differing]
        if steps:
            self.steps.fill_(max(int(v) for v in steps))
            self.skipped_on_device = None
        how = "started fresh" if on_mismatch == "reset" else "loaded anyway (state_mismatch='load')"
        report = [f"geometry state in the checkpoint differs from this plan; {how}: "
                  f"{'; '.join(text for _, text in problems[:4])}"] if problems else []
        for name, entry in entries.items():
            if name in differing:
                continue
            for key, per_geometry in entry.get("units", {}).items():
                for geometry_name, saved in per_geometry.items():
                    live = self.units.get(key, {}).get(geometry_name)
                    if live is not None:
                        _copy_into(live, saved)
        return report


def _differences(fp: Fingerprint, mine: dict[str, dict], saved: dict[str, dict]) -> list[tuple[str, str]]:
    """(parameter name, what differs) for every parameter whose saved geometry state does not fit."""
    out = []
    for name in sorted(set(mine) | set(saved)):
        a, b = mine.get(name), saved.get(name)
        if b is None:
            out.append((name, f"{name}: has {_labels(a['geometries'])} here but no geometry state in the checkpoint"))
        elif a is None:
            out.append((name, f"{name}: the checkpoint has {_labels(b.get('geometries', {}))} but this plan "
                              f"assigns none"))
        elif a["geometries"] != b.get("geometries"):
            out.append((name, f"{name}: {_labels(b.get('geometries', {}))} in the checkpoint, "
                              f"{_labels(a['geometries'])} here"))
        elif b.get("version") != fp.version:
            out.append((name, f"{name}: saved by geomcompile {b.get('version')}, this is {fp.version}"))
    return out


def _labels(geometries: dict[str, str]) -> str:
    return ", ".join(f"{stage}={label}" for stage, label in sorted(geometries.items())) or "nothing"


def _copy_into(live: dict, saved: dict) -> None:
    """Values of a saved unit state into the live one: tensors copied onto the live tensor's device
    (a new tensor, so the checkpoint is never written through), other values as they are."""
    for k, v in saved.items():
        cur = live.get(k)
        if isinstance(v, torch.Tensor):
            device = cur.device if isinstance(cur, torch.Tensor) else v.device
            live[k] = v.detach().to(device=device, copy=True)
        else:
            live[k] = copy.deepcopy(v)


def pids_by_name(optimizer: torch.optim.Optimizer, name_of: dict[int, str]) -> dict[str, int]:
    """Canonical name -> the integer id torch's state_dict() gives that parameter."""
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    return {name_of[id(p)]: i for i, p in enumerate(params) if id(p) in name_of}


def extract_entries(state_dict: dict, optimizer: torch.optim.Optimizer,
                    name_of: dict[int, str]) -> tuple[dict, dict[str, dict]]:
    """(a copy of state_dict without our entries, canonical name -> entry).

    The saved entry carries its parameter's name; it is checked against the name of the parameter
    the id maps to here, so a reordered optimizer cannot silently attach state to the wrong layer."""
    state = state_dict.get("state", {})
    if not any(isinstance(v, dict) and ENTRY_KEY in v for v in state.values()):
        return state_dict, {}
    params = list(chain.from_iterable(g["params"] for g in optimizer.param_groups))
    clean_state, entries = {}, {}
    for pid, value in state.items():
        if isinstance(value, dict) and ENTRY_KEY in value:
            entry = value[ENTRY_KEY]
            here = name_of.get(id(params[pid])) if isinstance(pid, int) and pid < len(params) else None
            saved_name = entry.get("name")
            if here is not None and saved_name != here:
                raise GeomCompileError(
                    f"the loaded optimizer state puts the geometry state of {saved_name!r} on parameter {pid}, "
                    f"which is {here!r} here: the optimizer's parameters are in a different order than when the "
                    f"checkpoint was saved. Fix: build the optimizer with the same parameter order")
            entries[saved_name] = entry
            value = {k: v for k, v in value.items() if k != ENTRY_KEY}
            if not value:
                continue              # an entry only we made: torch must not see an empty state
        clean_state[pid] = value
    return {**state_dict, "state": clean_state}, entries


def stray_entries(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, dict]:
    """Our entries that reached optimizer.state directly (a load before install, or a wrapper such as
    ZeroRedundancyOptimizer that writes the inner optimizer's state itself)."""
    return {p: s[ENTRY_KEY] for p, s in optimizer.state.items() if isinstance(s, dict) and ENTRY_KEY in s}

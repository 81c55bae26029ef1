"""What the framework integrations share: one analysis installed on every optimizer, diagnostics as
flat scalars, and the check of a checkpoint's saved plan against the running one."""
from __future__ import annotations

import warnings
from typing import Iterable

import torch

from ..analysis import analyze
from ..errors import GeomCompileError, GeomCompileWarning
from ..names import canonical_named_parameters, short_list
from ..plan import Plan
from ..plan_io import differences, plan_record
from ..policy import Policy

# The lines Plan.install writes about parameters outside the optimizer it installs on. With several
# optimizers each holds a part of the model: these are decided over all of them together.
_COVERAGE = ("are not in the optimizer and get no update", "geometries not installed for parameters missing "
                                                           "from the optimizer")


def install_on_all(model: torch.nn.Module, policy: Policy, optimizers: list, example_inputs=None,
                   backend: str = "auto", **install_options) -> list[Plan]:
    """Analyse `model` once and install one plan per optimizer (each takes the parameters that
    optimizer holds). Warnings about parameters outside an optimizer are given once, for the
    parameters that no optimizer holds."""
    if not optimizers:
        raise GeomCompileError("there is no optimizer to install the plan on. Fix: return one from "
                               "configure_optimizers (Lightning) or let the Trainer create one (HF)")
    structure = analyze(model, example_inputs)
    resolution = policy.resolve(structure)
    plans = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for optimizer in optimizers:
                plans.append(Plan(model, structure, policy, resolution).install(optimizer, backend=backend,
                                                                               **install_options))
        except BaseException:
            for plan in plans:
                plan.remove()
            raise
    several = len(plans) > 1
    for w in caught:
        if not (several and any(text in str(w.message) for text in _COVERAGE)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if several:
        for plan in plans:
            inst = plan._installation
            inst.warnings = [w for w in inst.warnings if not any(text in str(w) for text in _COVERAGE)]
        held = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
        outside = [n for n, p in canonical_named_parameters(model) if id(p) not in held and p.requires_grad]
        if outside:
            message = (f"{len(outside)} model parameter(s) are in none of the {len(plans)} optimizers and get no "
                       f"update: {short_list(outside)}")
            plans[0]._installation.warnings.append(message)
            warnings.warn(message, GeomCompileWarning, stacklevel=3)
    return plans


def summary(plans: list[Plan]) -> str:
    text = plans[0].summary()
    if len(plans) > 1:
        counts = ", ".join(f"optimizer {i}: {len(p._installation.items)} unit(s)" for i, p in enumerate(plans))
        text += f"\ninstalled on {len(plans)} optimizers ({counts})"
    return text


def scalars(plans: Iterable[Plan], prefix: str = "geomcompile") -> dict[str, float]:
    """plan.diagnostics() of every plan as flat ``prefix/unit/geometry/key`` scalars."""
    out = {}
    for plan in plans:
        for unit, per_geometry in plan.diagnostics().items():
            for geometry, values in per_geometry.items():
                for key, value in values.items():
                    out[f"{prefix}/{unit}/{geometry}/{key}"] = float(value)
    return out


def check_saved(saved: dict | None, plan: Plan, where: str) -> list[str]:
    """Compare a checkpoint's saved plan record with the running plan. Raises GeomCompileError when
    the assignments (or the parameters) differ; returns notes for what may differ harmlessly."""
    if saved is None:
        return [f"{where} holds no geomcompile plan (saved without the integration); the geometry state "
                f"in its optimizer state, if any, is still checked when it loads"]
    current = plan_record(plan)
    problems = differences(saved, current)
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise GeomCompileError(
            f"{where} was trained under another geomcompile plan (policy {saved['policy'].get('source')}) than this "
            f"run's (policy {current['policy']['source']}):\n  {shown}\nFix: resume with the policy the checkpoint "
            f"was made with (its text is in the checkpoint's plan record and in {where}'s geomcompile_plan.json), or "
            f"start a new run instead of resuming")
    notes = []
    if saved["policy"].get("sha256") != current["policy"]["sha256"]:
        notes.append(f"the policy text differs from the one {where} was saved with, but it assigns the same "
                     f"geometries with the same options to the same parameters")
    return notes

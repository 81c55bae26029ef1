"""Optimizer param groups derived from a plan: weight decay off where a geometry needs it off.

    plan = gc.plan(model, "resnet", example_inputs=(x,))
    optimizer = torch.optim.SGD(plan.param_groups(lr=0.1, weight_decay=5e-4), momentum=0.9)
    plan.install(optimizer)

    # timm: create_optimizer_v2(model, "sgd", lr=0.1, param_group_fn=lambda m: plan.param_groups(weight_decay=5e-4))
    # HF:   Trainer(..., optimizers=(torch.optim.AdamW(plan.param_groups(lr=..., weight_decay=...)), None))

Weight decay pulls every weight towards zero. For a weight psi trains, that breaks the scale
invariance psi relies on; for one pom keeps on a manifold, each step's decay is undone by the
retraction and only distorts the update. Geometries say so with ``hurt_by_weight_decay``; their
parameters go into a ``weight_decay=0`` group whatever the caller asks. The caller's choices hold
for every other parameter: `weight_decay`, the names in `no_decay` (globs as in policies) and, by
default, no decay for 1-d parameters (biases, normalisation weights: timm's and HF's convention).
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import GeomCompileError


def hurt_by_weight_decay(plan) -> dict[str, str]:
    """Canonical name -> the geometry (by name) that weight decay would hurt, for the plan's parameters."""
    out = {}
    for name, stages in plan.assignments.items():
        hurt = [g.name for g in stages.values() if type(g).hurt_by_weight_decay]
        if hurt:
            out[name] = hurt[0]
    return out


def _patterns(no_decay) -> list[tuple[str, re.Pattern]]:
    from .policy import glob_to_regex
    if isinstance(no_decay, str):
        no_decay = [no_decay]
    if not isinstance(no_decay, Iterable) or not all(isinstance(p, str) and p for p in no_decay):
        raise GeomCompileError(f"no_decay must be a name pattern or a list of them (globs as in policies, "
                               f"e.g. \"**.bias\", or \"re:...\"), got {no_decay!r}")
    out = []
    for p in no_decay:
        try:
            out.append((p, re.compile(p[3:] if p.startswith("re:") else glob_to_regex(p))))
        except re.error as e:
            raise GeomCompileError(f"no_decay: invalid regular expression {p[3:]!r}: {e}") from None
    return out


def param_groups(plan, lr: float | None = None, weight_decay: float = 0.0, no_decay=(), decay_1d: bool = False,
                 **group_options) -> list[dict]:
    """Up to three torch param groups, in this order, each left out when empty:

    1. ``weight_decay=weight_decay``: every other trainable parameter;
    2. ``weight_decay=0``: the caller's exceptions (names matching `no_decay`, and 1-d parameters
       unless ``decay_1d=True``);
    3. ``weight_decay=0``: parameters whose geometry weight decay hurts (psi, pom), whatever else
       holds for them.

    Every group gets ``lr`` (when given) and ``group_options`` (e.g. ``momentum``). Frozen
    parameters (``requires_grad=False``) are left out, as timm and HF do. Parameter order within a
    group is the model's. A `no_decay` pattern that matches no parameter is an error (a typo would
    otherwise silently decay what it meant to spare)."""
    if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) or weight_decay < 0:
        raise GeomCompileError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    for key in ("params", "weight_decay"):
        if key in group_options:
            raise GeomCompileError(f"param_groups sets {key!r} itself; pass weight_decay=... as its own argument")
    patterns = _patterns(no_decay)
    hurt = hurt_by_weight_decay(plan)
    used = {p for p, _ in patterns}
    decay, spared, protected = [], [], []
    hit = set()
    for name, p in plan.params.items():
        names = [name, *plan.structure[name].aliases] if name in plan.structure else [name]
        matched = [glob for glob, regex in patterns if any(regex.fullmatch(n) for n in names)]
        hit.update(matched)
        if not p.requires_grad:
            continue
        if name in hurt:
            protected.append(p)
        elif matched or (p.dim() <= 1 and not decay_1d):
            spared.append(p)
        else:
            decay.append(p)
    unused = sorted(used - hit)
    if unused:
        raise GeomCompileError(f"no_decay pattern(s) {unused} match no parameter of the model (names are canonical, "
                               f"e.g. {', '.join(list(plan.params)[:3])}). Fix: correct the pattern or remove it")
    extra = dict(group_options, **({} if lr is None else {"lr": lr}))
    groups = [{"params": decay, "weight_decay": weight_decay, **extra},
              {"params": spared, "weight_decay": 0.0, **extra},
              {"params": protected, "weight_decay": 0.0, **extra}]
    return [g for g in groups if g["params"]]

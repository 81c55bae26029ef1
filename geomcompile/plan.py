"""Plan: which geometry runs on which parameter, the report, and install()/remove().

    plan = gc.plan(model, "resnet", example_inputs=(x,))   # analyse + match; nothing installed
    plan.install(optimizer)                                 # hooks on the optimizer
    print(plan.summary())
    plan.remove()                                           # the optimizer behaves as before
"""
from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from torch import nn

from .analysis import Structure, analyze
from .analysis.coupling import chain_report
from .errors import GeomCompileError, GeomCompileWarning
from .findings import Finding, group, name_list
from .geometries.base import STAGES, Geometry, StepContext
from .policy import Policy, load_policy
from .version import __version__
from .runtime.backends import select_backend
from .runtime.distributed import is_sharded, shards_for
from .runtime.fastpath import WorkItem
from .runtime.hooks import Installation, groups_by_name
from .runtime.state import PlanState, make_fingerprint
from .runtime.wrappers import unwrap_optimizer
from .names import canonical_named_parameters, unwrap_model
from .names import short_list as _short_list


class Plan:
    def __init__(self, model: nn.Module, structure: Structure, policy: Policy, resolution):
        self.model = model
        self.structure = structure
        self.policy = policy
        self.assignments: dict[str, dict[str, Geometry]] = resolution.assignments
        self.rule_of: dict[tuple[str, str], str] = resolution.rule_of
        self.rule_counts: dict[str, int] = resolution.rule_counts
        self._plan_warnings: list[str] = list(resolution.warnings)
        self._plan_notes: list[str] = list(structure.notes) + list(resolution.notes)
        self.backend_name: str | None = None
        self._installation: Installation | None = None
        # Canonical names (wrappers such as torch.compile or DDP peeled): the Structure's keys.
        self.model, _ = unwrap_model(model)
        self.params: dict[str, nn.Parameter] = dict(canonical_named_parameters(model))

    # -- binding -------------------------------------------------------------------------------
    def bind(self, model: nn.Module | None = None) -> "Plan":
        """Point the plan at `model`'s current parameters, by canonical name (default: the planned
        model). ``fully_shard`` replaces every parameter by a DTensor after a plan was made; install()
        re-binds by itself when it finds that, and says so in the notes. Returns the plan."""
        if self._installation is not None:
            raise GeomCompileError("plan.bind on an installed plan; call plan.remove() first")
        model = self.model if model is None else model
        current = dict(canonical_named_parameters(model))
        missing = [n for n in self.structure if n not in current]
        if missing:
            raise GeomCompileError(f"plan.bind: the model has no parameter(s) {_short_list(missing)} of the plan; "
                                   f"bind it to the model it was planned for (canonical names, wrappers peeled)")
        shapes = [f"{n} {tuple(current[n].shape)} (planned {tuple(self.structure[n].shape)})"
                  for n in self.structure if tuple(current[n].shape) != tuple(self.structure[n].shape)]
        if shapes:
            raise GeomCompileError(f"plan.bind: parameter shapes differ from the plan's: {_short_list(shapes)}; "
                                   f"plan the model again (gc.plan)")
        self.model, _ = unwrap_model(model)
        self.params = current
        return self

    def _rebind_if_replaced(self) -> list[str]:
        """fully_shard after plan() replaces every parameter by a DTensor of the same name and global
        shape: re-bind to those. Any other replacement (a layer swapped by hand) is left for install's
        parameter_changes to refuse; plan.bind(model) does it deliberately."""
        current = dict(canonical_named_parameters(self.model))
        replaced = [n for n, p in self.params.items() if current.get(n) is not p]
        if not replaced or not all(is_sharded(current.get(n)) for n in replaced):
            return []
        self.bind(self.model)
        return [f"re-bound {len(replaced)} parameter(s) to the model's current tensors by name (they were "
                f"replaced after planning, e.g. by fully_shard): {_short_list(replaced)}"]

    # -- work items ----------------------------------------------------------------------------
    def work_items(self, only: set[str] | None = None) -> list[WorkItem]:
        """(geometry, unit) pairs: parameters sharing one geometry configuration are grouped by it.

        A unit that its geometry refuses raises GeomCompileError at the rule's file:line:column."""
        by_geometry: dict[Geometry, list] = defaultdict(list)
        for name, stages in self.assignments.items():
            if only is not None and name not in only:
                continue
            for geometry in stages.values():
                by_geometry[geometry].append(self.structure[name])
        items = []
        for geometry, facts in by_geometry.items():
            for unit in geometry.units(facts, self.structure):
                problem = geometry.check_unit(unit)
                if problem:
                    where = self._where(unit.names[0], geometry)
                    raise GeomCompileError(f"{where}: {geometry.name} cannot form the unit {unit.key}: {problem}")
                items.append(WorkItem(geometry, unit))
        return items

    def _where(self, name: str, geometry: Geometry) -> str:
        rule_name = self.rule_of.get((name, geometry.stage))
        for rule in self.policy.rules:
            if rule.name == rule_name:
                return rule.use_where.get(geometry.name, rule.where)
        return str(self.policy.source)

    # -- install / remove ----------------------------------------------------------------------
    def install(self, optimizer, backend: str = "auto", state_mismatch: str = "error",
                clip_grad_norm: float | None = None) -> "Plan":
        """Install the plan's hooks on `optimizer` (any torch.optim optimizer, or a known wrapper:
        ZeroRedundancyOptimizer, timm Lookahead, accelerate's AcceleratedOptimizer, Lightning's
        LightningOptimizer; the hooks go on the optimizer that owns the state and the step).

        state_mismatch: "error" (default) raises when optimizer.load_state_dict brings geometry
            state made by a different plan; "reset" starts the differing geometry state fresh;
            "load" takes the checkpoint's state wherever the same unit and geometry exist.
        clip_grad_norm: clip the total gradient norm of the optimizer's parameters *after* the
            geometries' transforms (clipping in the training loop runs before them). Not with the
            triton backend, whose fused kernels step inside the transform."""
        if self._installation is not None:
            raise GeomCompileError("this plan is already installed; call plan.remove() before installing again")
        if state_mismatch not in ("error", "reset", "load"):
            raise GeomCompileError(f"state_mismatch must be 'error', 'reset' or 'load', got {state_mismatch!r}")
        rebound = self._rebind_if_replaced()         # fully_shard after plan(): the same names, new tensors
        changed = parameter_changes(self.params, self.model)
        if changed:
            raise GeomCompileError(
                f"the model's parameters changed since gc.plan(): {changed}. The plan's analysis and geometries "
                f"are for the model as it was, so these would get no geometry (or run it on a tensor that no "
                f"longer trains). Fix: build the plan after the model is final: gc.plan(model, policy) or "
                f"gc.apply(...) again")
        owner, wrappers = unwrap_optimizer(optimizer)
        group_of = groups_by_name(owner, self.params)
        missing = [n for n in self.params if n not in group_of]
        install_warnings = []
        if missing:
            install_warnings.append(f"{len(missing)} model parameter(s) are not in the optimizer and get no "
                                    f"update: {_short_list(missing)}")
        skipped = [n for n in self.assignments if self.assignments[n] and n not in group_of]
        if skipped:
            install_warnings.append(f"geometries not installed for parameters missing from the optimizer "
                                    f"(an add_param_group later gives them their geometries): {_short_list(skipped)}")
        items = self.work_items(only=set(group_of))
        shards = shards_for(items, self.params)       # refuses geometries without a sharded form
        chosen, notes = select_backend(backend, [self.params[n] for i in items for n in i.unit.names])
        if clip_grad_norm is not None and chosen.name == "triton":
            raise GeomCompileError("clip_grad_norm is not supported with the triton backend (its fused kernels "
                                   "step inside the transform). Fix: use backend='eager' or 'compile', or clip "
                                   "in your training loop (before the geometry)")
        ctx = StepContext(optimizer=owner, params=self.params, group_of=group_of, model=self.model, shards=shards)
        for item in items:
            problem = item.geometry.check_install(item.unit, ctx)
            if problem:
                where = self._where(item.unit.names[0], item.geometry)
                raise GeomCompileError(f"{where}: {item.geometry.name} cannot run on the unit {item.unit.key}: {problem}")
        for item in items:
            install_warnings += [self._in_rule(w, item.geometry) for w in item.geometry.warnings(item.unit, ctx)]
        notes = rebound + notes + _slow_eager_notes(chosen.name, items, self.params) + _amp_skip_notes(owner, items)
        if shards:
            notes.append(f"{len(shards)} parameter(s) sharded (FSDP2 Shard(0)): their geometries run their sharded "
                         f"forms on the local shards, with collectives (docs/distributed.md)")
        name_of = {id(p): n for n, p in self.params.items()}
        state = PlanState(make_fingerprint(__version__, self.assignments))
        installation = Installation(owner, wrappers, items, chosen, ctx, state, name_of, state_mismatch,
                                    on_new_params=self._items_for_new_params, clip_grad_norm=clip_grad_norm)
        installation.install()
        if wrappers:
            notes = notes + [f"optimizer {type(optimizer).__name__}: hooks on the {type(owner).__name__} it wraps"]
        installation.report[:0] = notes
        installation.warnings = list(dict.fromkeys(install_warnings))     # one line per cause
        self.backend_name = chosen.name
        self._installation = installation
        already = set(self.policy.config_warnings)        # emitted when the policy was loaded
        for w in self.warnings_by_cause:                   # one Python warning per cause
            if w not in already:
                warnings.warn(w, GeomCompileWarning, stacklevel=2)
        return self

    def _in_rule(self, warning: str, geometry: Geometry) -> str:
        """A geometry's finding about one parameter, keyed and prefixed by the rule that gave it."""
        if not isinstance(warning, Finding):
            return warning
        rule = self.rule_of.get((warning.name, geometry.stage), "?")
        return Finding(f"rule {rule!r}: {warning}", name=warning.name, key=(rule,) + warning.key,
                       head=f"rule {rule!r}: {warning.head}", tail=warning.tail)

    def _items_for_new_params(self, new_ids: set[int]) -> list[WorkItem]:
        """Work items for parameters that add_param_group brought in after install (policy re-applied)."""
        unplanned = new_ids - {id(p) for p in self.params.values()}
        if unplanned:
            names = {id(p): n for n, p in canonical_named_parameters(self.model)}
            listed = _short_list(sorted(names.get(i, "a tensor that is not a model parameter") for i in unplanned))
            warnings.warn(f"add_param_group brought {len(unplanned)} parameter(s) that were not in the model when "
                          f"the plan was made: {listed}; they get no geometry (the model changed since gc.plan()). "
                          f"Fix: build the plan after the model is final (gc.plan / gc.apply again)",
                          GeomCompileWarning, stacklevel=4)
        names = {n for n, p in self.params.items() if id(p) in new_ids and self.assignments.get(n)}
        items = self.work_items(only=names) if names else []
        if items:
            self._installation.report.append(f"add_param_group: {len(names)} new parameter(s) got their "
                                             f"geometries: {_short_list(sorted(names))}")
        return items

    def on_retract(self, callback) -> "object":
        """Call ``callback(event)`` after every function-preserving rescale a geometry applies (psi's
        renormalisation), with a ``gc.Rescale`` (name, param, facts, channel_factors, scale).
        On a GPU psi's eager renormalisation sends an event for every parameter it checked at every
        step, with factors of 1 where nothing changed (it does not read the factors on the host: no
        sync); on CPU only for the parameters it renormalised.
        Returns a handle whose ``remove()`` stops it. Use it to keep copies of the weights in step
        (``gc.ema.follow`` does this for AveragedModel / EMA models)."""
        if self._installation is None:
            raise GeomCompileError("plan.on_retract needs an installed plan; call plan.install(optimizer) first")
        return self._installation.add_callback(callback)

    def remove(self) -> None:
        """Uninstall the hooks; the optimizer behaves exactly as before. The geometry state goes with
        the plan (the optimizer's state dict no longer carries it)."""
        if self._installation is None:
            return
        self._installation.remove()
        self._installation = None

    @property
    def steps(self) -> int:
        """Optimizer steps the installed geometries have taken (a step skipped by GradScaler, DCP's
        initialisation step and steps without gradients do not count); restored from checkpoints."""
        return int(self._installation.state.counted_steps()) if self._installation is not None else 0

    @property
    def state(self):
        """The installed plan's geometry state (a DCP Stateful: state_dict() / load_state_dict())."""
        if self._installation is None:
            raise GeomCompileError("the plan is not installed; it has no state")
        return self._installation.state

    @property
    def warnings(self) -> list[str]:
        """Problems found when planning, plus those of the current installation: one entry per
        parameter and cause (``geomcompile.findings.Finding`` where it is about one parameter)."""
        inst = self._installation
        return self._plan_warnings + (inst.warnings if inst is not None else [])

    @property
    def warnings_by_cause(self) -> list[str]:
        """``warnings`` with one line per cause (rule and reason): the count and the first names.
        These are the lines the summary prints and install() emits as Python warnings."""
        return group(self.warnings)

    @property
    def notes(self) -> list[str]:
        """Facts of the analysis, plus what the current installation did (backend choice, retractions)."""
        inst = self._installation
        return self._plan_notes + (inst.report if inst is not None else [])

    @property
    def installed(self) -> bool:
        return self._installation is not None

    @property
    def backend(self):
        """The installed Backend instance (None before install)."""
        return self._installation.backend if self._installation is not None else None

    def backend_notes(self) -> list[str]:
        """What the backend runs how, and every fallback it took, as of now (a compile that failed
        at the first step shows up here after that step)."""
        inst = self._installation
        return inst.backend.describe(inst.items, inst.ctx) if inst is not None else []

    def diagnostics(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per unit and geometry, the numbers a geometry reports (estimates, counters) for logging."""
        if self._installation is None:
            return {}
        out: dict = {}
        for item in self._installation.items:
            values = item.geometry.diagnostics(item.unit, self._installation.state_of(item))
            if values:
                out.setdefault(item.unit.key, {})[item.geometry.name] = values
        return out

    # -- report --------------------------------------------------------------------------------
    def summary(self, name_width: int = 44, chains: bool | None = None) -> str:
        """The plan as a table, rules, capture, backend, notes and warnings. chains: also list the
        G-chains and why each other conv / linear weight is not coupled; None (default) lists
        them when a rule of the policy uses gspace."""
        header = ("parameter", "shape", "kind", "structure", *STAGES, "rule")
        rows = []
        for name, facts in self.structure.items():
            stages = self.assignments.get(name, {})
            rules = sorted({self.rule_of[(name, s)] for s in stages})
            rows.append((_shorten(name, name_width), "x".join(map(str, facts.shape)) or "scalar", facts.kind,
                         facts.roles(), *(stages[s].label() if s in stages else "-" for s in STAGES),
                         ",".join(rules) or "-"))
        widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
        lines = [_row(header, widths), _row(tuple("-" * w for w in widths), widths)]
        lines += [_row(r, widths) for r in rows]
        n_geom = sum(1 for n in self.structure if self.assignments.get(n))
        lines.append("")
        lines.append(f"{n_geom} of {len(self.structure)} parameters get a geometry; policy {self.policy.source}")
        assigned = defaultdict(int)
        for rule in self.rule_of.values():
            assigned[rule] += 1
        lines.append("rules: parameters matched / geometries assigned (an earlier rule wins a stage)")
        for rule, count in self.rule_counts.items():
            lines.append(f"  {rule}: {count} matched, {assigned[rule]} assigned")
        lines.append(f"capture: {self.structure.capture_path}"
                     + (" (torch.fx symbolic trace)" if self.structure.capture_path == "fx"
                        else " (ran the model once on example_inputs)"))
        lines.append(f"backend: {self.backend_name or 'not installed'}")
        if chains or (chains is None and any("gspace" in rule.use for rule in self.policy.rules)):
            lines += chain_report(self.structure)
        for note in self.notes + self.backend_notes():
            lines.append(f"note: {note}")
        for w in self.warnings_by_cause:
            lines.append(f"warning: {w}")
        return "\n".join(lines)

    # -- on disk and as param groups (plan_io.py, param_groups.py) -------------------------------
    def save(self, path):
        """Write ``geomcompile_plan.json`` into the folder `path` (to `path` itself if it ends in .json):
        version, policy text and hash, capture path, state fingerprint and every parameter's
        assignment. ``gc.load_plan(path, model)`` binds it to a model again. Returns the file's path."""
        from .plan_io import save_plan
        return save_plan(self, path)

    def param_groups(self, lr: float | None = None, weight_decay: float = 0.0, no_decay=(),
                     decay_1d: bool = False, **group_options) -> list[dict]:
        """torch param groups: the parameters whose geometry weight decay hurts (psi, pom) get
        weight_decay=0, the others keep `weight_decay` (see geomcompile.param_groups)."""
        from .param_groups import param_groups
        return param_groups(self, lr=lr, weight_decay=weight_decay, no_decay=no_decay, decay_1d=decay_1d,
                            **group_options)

    def __repr__(self) -> str:
        return (f"Plan({sum(1 for v in self.assignments.values() if v)} parameters with geometries, "
                f"installed={self.installed})")


def _row(cells, widths) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()


def _shorten(name: str, width: int) -> str:
    """Keep both ends of a long dotted name: 'layer3.2.....conv2.weight'."""
    if len(name) <= width:
        return name
    keep = width - 1
    return name[: keep // 2] + "…" + name[-(keep - keep // 2):]


# A weight this large makes the eager programs slow on CPU (measured: docs/bench.md, "Huge linear
# layers"); the compile backend runs the same math in one fused pass.
SLOW_EAGER_NUMEL = 1 << 24


def _amp_skip_notes(optimizer, items) -> list[str]:
    """With a fused=True optimizer, where GradScaler's verdict on a step is decided (docs/bench.md
    "GradScaler's verdict on the device")."""
    if not any(g.get("fused") for g in optimizer.param_groups):
        return []
    lacking = sorted({it.geometry.name for it in items if not it.geometry.honours_device_skip})
    if not lacking:
        return ["fused=True optimizer under GradScaler: a skipped step (inf/NaN gradients) is decided on the "
                "device, no host sync per step"]
    return [f"fused=True optimizer under GradScaler: found_inf is read on the host at every step (one sync "
            f"on a GPU) because {', '.join(lacking)} cannot take the skip on the device yet"]


def _slow_eager_notes(backend: str, items: list[WorkItem], params: dict) -> list[str]:
    if backend != "eager":
        return []
    huge = defaultdict(list)
    for item in items:
        if "compile" in type(item.geometry).fast_paths:
            huge[item.geometry.name] += [n for n in item.unit.names if params[n].numel() >= SLOW_EAGER_NUMEL]
    return [f"eager {geometry} on {len(names)} weight(s) of >= {SLOW_EAGER_NUMEL:,} elements "
            f"({name_list(names)}) is slow on CPU: seconds per step for a 4096x25088 weight, over 100x plain "
            f"SGD (docs/bench.md, benchmarks/huge_linear.py); backend='compile' runs it in one compiled pass, "
            f"about 3x faster" for geometry, names in huge.items() if names]


def plan(model: nn.Module, policy, example_inputs=None) -> Plan:
    """Analyse `model`, match `policy` (path, shipped name, YAML string, dict or Policy). Installs nothing."""
    structure = analyze(model, example_inputs)
    pol = load_policy(policy)
    return Plan(model, structure, pol, pol.resolve(structure))


def parameter_changes(planned: dict[str, nn.Parameter], model: nn.Module) -> str:
    """What differs between the parameters a plan was made for (canonical name -> parameter) and the
    model's now, in words naming them ("" when nothing did): layers added, removed or replaced since
    gc.plan(). Canonical names, so a model wrapped after planning (DDP's ``module.``, torch.compile)
    is the same model. A dict comparison: no tensor is read."""
    now = dict(canonical_named_parameters(model))
    added = [n for n in now if n not in planned]
    removed = [n for n in planned if n not in now]
    replaced = [n for n, p in now.items() if n in planned and planned[n] is not p]
    parts = [f"{what} {_short_list(names)}" for what, names in
             (("added", added), ("removed", removed), ("replaced", replaced)) if names]
    return "; ".join(parts)


def apply(model: nn.Module, policy, optimizer: torch.optim.Optimizer, example_inputs=None,
          backend: str = "auto", **install_options) -> Plan:
    """plan(model, policy, example_inputs).install(optimizer, backend, **install_options)."""
    return plan(model, policy, example_inputs).install(optimizer, backend=backend, **install_options)

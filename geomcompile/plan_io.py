"""A plan on disk: ``plan.save(path)`` writes ``geomcompile_plan.json``; ``gc.load_plan(path, model)``
binds it to a model again.

    plan.save("checkpoints/")                       # -> checkpoints/geomcompile_plan.json
    plan = gc.load_plan("checkpoints/", model, example_inputs=(x,))
    plan.install(optimizer)

The file records what made the plan: the geomcompile version, the policy's text and its SHA-256,
the capture path, the state fingerprint (runtime/state.py: the digest the optimizer state carries),
and for every parameter (canonical name, geomcompile.names) its shape, kind, structure and the
geometry of each stage with its options and the rule that gave it.

Loading re-analyses the model and binds the *recorded* assignments to it by canonical name, so the
loaded plan is the saved one even if the policy file or a shipped policy changed since. It refuses
(GeomCompileError, listing what differs) when the model no longer fits the record: a parameter
missing or new, another shape, another kind or structure under a geometry, or a geometry whose
check now fails.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import GeomCompileError
from .names import short_list
from .version import __version__

PLAN_FILE = "geomcompile_plan.json"
FORMAT = 1


def policy_digest(text: str | None) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest() if text is not None else None


def plan_record(plan) -> dict:
    """The JSON-ready record of a plan (what ``plan.save`` writes)."""
    from .runtime.state import make_fingerprint
    parameters = {}
    for name, facts in plan.structure.items():
        stages = plan.assignments.get(name, {})
        parameters[name] = {
            "shape": list(facts.shape), "kind": facts.kind, "structure": facts.roles(),
            "geometries": {stage: {"geometry": g.name, "options": dict(g.opts), "label": g.label(),
                                   "rule": plan.rule_of.get((name, stage))}
                           for stage, g in stages.items()},
        }
    text = getattr(plan.policy, "text", None)
    return {
        "format": FORMAT,
        "geomcompile_version": __version__,
        "policy": {"source": str(plan.policy.source), "text": text, "sha256": policy_digest(text),
                   "rule_counts": dict(plan.rule_counts)},
        "capture_path": plan.structure.capture_path,
        "fingerprint": make_fingerprint(__version__, plan.assignments).digest,
        "parameters": parameters,
    }


def plan_file(path) -> Path:
    """`path` itself when it names a ``.json`` file, else ``path/geomcompile_plan.json`` (a folder)."""
    path = Path(path)
    return path if path.suffix == ".json" and not path.is_dir() else path / PLAN_FILE


def save_plan(plan, path) -> Path:
    """Write the plan's record as JSON to `path` (a ``.json`` file, or a folder, created if needed, that
    gets ``geomcompile_plan.json``). Returns the file."""
    target = plan_file(path)
    record = plan_record(plan)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(target)          # a reader never sees half a file
    return target


def read_record(path) -> dict:
    """The record in a plan file, checked for format and for the policy text matching its hash."""
    target = plan_file(path)
    try:
        record = json.loads(target.read_text(encoding="utf-8"))
    except OSError as e:
        raise GeomCompileError(f"cannot read the plan file {str(target)!r}: {e}. Fix: give the path of a "
                               f"{PLAN_FILE} that plan.save wrote, or the folder holding it") from None
    except json.JSONDecodeError as e:
        raise GeomCompileError(f"{target}: not a geomcompile plan (invalid JSON: {e}). Fix: give a {PLAN_FILE} "
                               f"that plan.save wrote") from None
    check_record(record, str(target))
    return record


def check_record(record, where: str) -> None:
    if not isinstance(record, dict) or "parameters" not in record or "format" not in record:
        raise GeomCompileError(f"{where}: not a geomcompile plan record (no 'format' and 'parameters'). Fix: give "
                               f"a {PLAN_FILE} that plan.save wrote")
    if record["format"] != FORMAT:
        raise GeomCompileError(f"{where}: plan format {record['format']!r}; this geomcompile ({__version__}) reads "
                               f"format {FORMAT}. Fix: load it with the geomcompile version that saved it "
                               f"({record.get('geomcompile_version')})")
    policy = record.get("policy") or {}
    if policy.get("text") is not None and policy_digest(policy["text"]) != policy.get("sha256"):
        raise GeomCompileError(f"{where}: the policy text does not match its recorded sha256 (the file was "
                               f"edited by hand). Fix: save the plan again with plan.save")


def differences(saved: dict, current: dict) -> list[str]:
    """What differs between two plan records, one line per parameter (empty when they agree): the
    parameters, their shapes, and, for parameters with a geometry, their kind, structure and geometries."""
    out = []
    a, b = saved["parameters"], current["parameters"]
    missing = [n for n in a if n not in b]
    new = [n for n in b if n not in a]
    if missing:
        out.append(f"{len(missing)} saved parameter(s) are not in the model: {short_list(missing)}")
    if new:
        out.append(f"{len(new)} model parameter(s) are not in the saved plan: {short_list(new)}")
    for name in (n for n in a if n in b):
        was, now = a[name], b[name]
        if was["shape"] != now["shape"]:
            out.append(f"{name}: shape {_shape(was['shape'])} in the saved plan, {_shape(now['shape'])} here")
            continue
        if not (was["geometries"] or now["geometries"]):
            continue
        for key in ("kind", "structure"):
            if was[key] != now[key]:
                out.append(f"{name}: {key} {was[key]!r} in the saved plan, {now[key]!r} here")
        labels = lambda p: ", ".join(f"{s}={g['label']}" for s, g in sorted(p["geometries"].items())) or "nothing"
        if labels(was) != labels(now):
            out.append(f"{name}: {labels(was)} in the saved plan, {labels(now)} here")
    return out


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _listing(lines: list[str], n: int = 8) -> str:
    shown = "\n  ".join(lines[:n])
    return "\n  " + shown + (f"\n  ... and {len(lines) - n} more" if len(lines) > n else "")


def load_plan(path, model, example_inputs=None):
    """Bind a saved plan (``geomcompile_plan.json`` or its folder, or a record dict taken from a
    checkpoint) to `model`. Installs nothing: call ``plan.install(optimizer)``.

    The model is analysed again (give the same `example_inputs` as when the plan was made if its
    capture needed them) and every recorded geometry is re-bound by canonical parameter name.
    Raises GeomCompileError listing what differs when the model's structure no longer fits."""
    from .analysis import analyze
    from .geometries.base import REGISTRY, STAGES
    from .plan import Plan
    from .policy import Policy, Resolution, load_policy
    if isinstance(path, dict):
        record, where = path, "<plan record>"
        check_record(record, where)
    else:
        record, where = read_record(path), str(plan_file(path))
    structure = analyze(model, example_inputs)
    problems, assignments, rule_of = [], {}, {}
    for name, saved in record["parameters"].items():
        if not saved["geometries"] or name not in structure:
            continue
        facts = structure[name]
        stages = {}
        for stage, g in saved["geometries"].items():
            cls = REGISTRY.get(g["geometry"])
            if cls is None:
                problems.append(f"{name}: geometry {g['geometry']!r} is not known to this geomcompile "
                                f"({', '.join(sorted(REGISTRY))})")
                continue
            geometry = cls(**g["options"])
            reason = geometry.check(facts)
            if reason is not None and tuple(facts.shape) == tuple(saved["shape"]):
                problems.append(f"{name}: {g['geometry']} no longer applies: {reason}")
            stages[stage] = geometry
            rule_of[(name, stage)] = g["rule"]
        assignments[name] = {s: stages[s] for s in STAGES if s in stages}
    policy_info = record.get("policy") or {}
    policy = _policy_of(policy_info, where, load_policy, Policy)
    resolution = Resolution(assignments, rule_of, dict(policy_info.get("rule_counts") or {}), [], [])
    plan = Plan(model, structure, policy, resolution)
    problems = differences(record, plan_record(plan)) + problems
    if problems:
        raise GeomCompileError(f"{where}: the saved plan does not fit this model ({len(problems)} difference(s)):"
                               f"{_listing(problems)}\nFix: load it into the model it was saved from (same "
                               f"architecture and parameter names; same example_inputs if the capture needed "
                               f"them), or make a new plan with gc.plan(model, policy)")
    notes = [f"plan loaded from {where} (policy {policy_info.get('source')}, saved by geomcompile "
             f"{record.get('geomcompile_version')})"]
    if record.get("geomcompile_version") != __version__:
        notes.append(f"the plan was saved by geomcompile {record.get('geomcompile_version')}, this is {__version__}: "
                     f"optimizer state saved with it will not load without state_mismatch='load' or 'reset'")
    if record.get("capture_path") != structure.capture_path:
        notes.append(f"the saved plan was captured by {record.get('capture_path')}, this model by "
                     f"{structure.capture_path} (the assignments match)")
    plan._plan_notes[:0] = notes
    return plan


def _policy_of(info: dict, where: str, load_policy, Policy):
    """The saved policy (for the summary and error positions); a bare one when no text was recorded."""
    import warnings
    from .errors import GeomCompileWarning
    text = info.get("text")
    source = f"{info.get('source')} (saved in {where})"
    if text is not None:
        with warnings.catch_warnings():              # its option warnings were shown when it was made
            warnings.simplefilter("ignore", GeomCompileWarning)
            try:
                policy = load_policy(text if "\n" in text else text + "\n")
            except GeomCompileError:
                policy = None
        if policy is not None:
            policy.source = source
            return policy
    return Policy([], source=source, text=text)

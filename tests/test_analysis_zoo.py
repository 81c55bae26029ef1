"""gc.analyze on the zoo of tests/models.py: the facts match the hand-derived expectations."""
from __future__ import annotations

import pytest
import torch
import torch.fx

import geomcompile as gc
from geomcompile.models import MODELS
from tests.models import DATA_DEPENDENT, ZOO, ZooEntry, expected_facts

LAYER_KINDS = ("conv", "conv_transpose", "linear")


def _analyze(entry: ZooEntry, with_inputs: bool = True):
    model = entry.build().train()
    if with_inputs:
        return model, gc.analyze(model, example_inputs=entry.example_inputs)
    return model, gc.analyze(model)


def _invariant(facts) -> tuple | None:
    inv = facts.scale_invariant
    if inv is None:
        return None
    return (inv.unit, inv.normalizer, inv.group_size)


def mismatches(name: str, exp: dict, facts) -> list[str]:
    """Differences between one expectation and the analysis's facts, in words."""
    out = []
    for key in ("kind", "out_dim", "groups", "depthwise", "uses"):
        if key in exp and getattr(facts, key) != exp[key]:
            out.append(f"{name}: {key} expected {exp[key]!r}, got {getattr(facts, key)!r}")
    if "aliases" in exp and set(facts.aliases) != set(exp["aliases"]):
        out.append(f"{name}: aliases expected {exp['aliases']}, got {facts.aliases}")
    if "invariant" in exp:
        want, got = exp["invariant"], facts.scale_invariant
        if want is None and got is not None:
            out.append(f"{name}: expected not invariant, got {got} ({got.reason})")
        elif want is not None and got is None:
            out.append(f"{name}: expected invariant[{want[0]}] by {want[1]}, got None "
                       f"({facts.invariance_reason})")
        elif want is not None:
            if got.unit != want[0] or want[1] not in got.normalizer:
                out.append(f"{name}: expected invariant[{want[0]}] by {want[1]}, got {got}")
            if want[0] == "group" and got.group_size != want[2]:
                out.append(f"{name}: expected group_size {want[2]}, got {got.group_size}")
    return out


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_facts_match_expectations(entry: ZooEntry):
    model, structure = _analyze(entry)
    expected = expected_facts(entry, model)
    problems = [p for name, exp in expected.items() for p in mismatches(name, exp, structure[name])]
    assert not problems, f"{entry.name}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_every_parameter_listed_exactly_once(entry: ZooEntry):
    model, structure = _analyze(entry)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    keys = set(structure)   # not `name in structure`: Structure's lookup also answers for aliases
    for name in names:
        hits = (name in keys) + sum(name in f.aliases for f in structure.values())
        assert hits == 1, f"{entry.name}: {name} listed {hits} times (by name or alias)"
    assert len(structure) == len(list(model.parameters())), "one entry per distinct tensor"
    for name, facts in structure.items():
        assert tuple(model.get_parameter(name).shape) == tuple(facts.shape), name


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_every_parameter_has_an_expectation(entry: ZooEntry):
    """Keeps the zoo honest: a parameter without an expectation would go unchecked."""
    model = entry.build()
    expected = expected_facts(entry, model)
    names = dict(model.named_parameters())   # first name of shared tensors
    missing = [n for n in names if n not in expected]
    assert not missing, f"{entry.name}: no expectation for {missing}"


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_capture_path_and_reasons(entry: ZooEntry):
    _, structure = _analyze(entry)
    assert structure.capture_path == ("fx" if entry.traceable else "run")
    for name, facts in structure.items():
        if facts.kind in LAYER_KINDS and name.endswith("weight"):
            assert isinstance(facts.invariance_reason, str) and facts.invariance_reason.strip(), \
                f"{entry.name}: {name} has no invariance_reason"


def test_data_dependent_model_needs_example_inputs():
    model = DATA_DEPENDENT.build()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    with pytest.raises(gc.GeomCompileError) as info:
        gc.analyze(model)
    message = str(info.value)
    assert "router" in message.lower(), f"the message should name the module where tracing stopped: {message}"
    assert "example_inputs" in message, message


@pytest.mark.parametrize("entry", [e for e in ZOO if e.traceable], ids=lambda e: e.name)
def test_without_inputs_agrees_with_inputs(entry: ZooEntry):
    """Without example_inputs the answers are the same, except that shape-dependent ones
    (Linear -> BatchNorm1d: the rank of the output is unknown) may fall back to None. Never
    does the analysis claim more without inputs than with them."""
    _, with_inputs = _analyze(entry, with_inputs=True)
    _, without = _analyze(entry, with_inputs=False)
    assert without.capture_path == "fx"
    assert set(without) == set(with_inputs)
    problems = []
    for name, facts in with_inputs.items():
        a, b = _invariant(facts), _invariant(without[name])
        if a == b or (b is None and name in entry.shape_dependent):
            continue
        problems.append(f"{name}: with inputs {facts.scale_invariant}, without {without[name].scale_invariant}")
        for key in ("kind", "out_dim", "groups", "depthwise"):
            if getattr(facts, key) != getattr(without[name], key):
                problems.append(f"{name}: {key} {getattr(facts, key)!r} vs {getattr(without[name], key)!r}")
    assert not problems, f"{entry.name}:\n  " + "\n  ".join(problems)


def test_zoo_is_large_enough():
    assert len(ZOO) >= 16 and len({e.name for e in ZOO}) == len(ZOO)


# --- the package's models -----------------------------------------------------------------------
PACKAGE_INPUTS = {"resnet20": (2, 3, 32, 32), "resnet56": (2, 3, 16, 16), "resnet50": (2, 3, 64, 64),
                  "vgg16": (2, 3, 32, 32), "small_resnet": (2, 1, 8, 8)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_package_models_run_and_every_conv_is_row_invariant(name: str):
    torch.manual_seed(0)
    model = MODELS[name]()
    num_classes = model.fc.out_features if hasattr(model, "fc") else model.classifier.out_features
    with torch.no_grad():
        out = model(torch.randn(*PACKAGE_INPUTS[name]))
    assert out.shape == (PACKAGE_INPUTS[name][0], num_classes)
    structure = gc.analyze(model)   # all of them trace with fx, no inputs needed
    assert structure.capture_path == "fx"
    convs = [f for f in structure.values() if f.kind == "conv"]
    assert convs and all(f.scale_invariant is not None and f.scale_invariant.unit == "row" for f in convs), \
        [f"{f.name}: {f.invariance_reason}" for f in convs if f.scale_invariant is None]
    heads = [f for f in structure.values() if f.kind == "linear"]
    assert len(heads) == 1 and heads[0].scale_invariant is None

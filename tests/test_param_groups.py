"""`plan.param_groups(...)` (issue 13): weight decay off for the parameters of geometries it hurts
(psi, pom), the caller's choices for the rest; as timm's `param_group_fn` with the real
`create_optimizer_v2`."""
from __future__ import annotations

import warnings

import pytest
import torch

import geomcompile as gc
from geomcompile.geometries import REGISTRY

from .frameworks import CD_CONV, PSI, TinyBNNet, example_images
from .timm_optim import loaded

POM = {"version": 1, "rules": [{"name": "conv-kernels", "match": {"kind": "conv", "param": "conv2.weight"},
                                "use": {"pom": {"component": "kernel"}}}]}


def _members(groups) -> list[tuple[float, set[str]]]:
    """(weight_decay, names) per group, in order."""
    return [(g["weight_decay"], {_NAME[id(p)] for p in g["params"]}) for g in groups]


_MODEL = TinyBNNet()
_NAME = {id(p): n for n, p in _MODEL.named_parameters()}
NORMS_AND_BIASES = {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias", "head.bias"}


def test_the_geometries_weight_decay_hurts_are_psi_and_pom():
    assert {n for n, cls in REGISTRY.items() if cls.hurt_by_weight_decay} >= {"psi", "pom"}
    assert not REGISTRY["channel_directed"].hurt_by_weight_decay and not REGISTRY["spectral"].hurt_by_weight_decay


@pytest.mark.parametrize("policy, protected", [
    (PSI, {"conv1.weight", "conv2.weight"}),
    (POM, {"conv2.weight"}),
    (CD_CONV, set()),                       # control: channel_directed does not mind weight decay
], ids=["psi", "pom", "channel_directed"])
def test_exactly_the_parameters_weight_decay_hurts_get_none(policy, protected):
    plan = gc.plan(_MODEL, policy, example_inputs=example_images())
    groups = plan.param_groups(lr=0.1, weight_decay=5e-4, momentum=0.9)
    everything = {n for n, _ in _MODEL.named_parameters()}
    expected = [(5e-4, everything - NORMS_AND_BIASES - protected), (0.0, NORMS_AND_BIASES)]
    if protected:
        expected.append((0.0, protected))
    assert _members(groups) == expected
    assert all(g["lr"] == 0.1 and g["momentum"] == 0.9 for g in groups)


def test_the_callers_choices_hold_for_the_other_parameters():
    plan = gc.plan(_MODEL, PSI, example_inputs=example_images())
    groups = plan.param_groups(weight_decay=1e-2, decay_1d=True, no_decay=["head.**"])
    assert _members(groups) == [(1e-2, {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}),
                                (0.0, {"head.weight", "head.bias"}),
                                (0.0, {"conv1.weight", "conv2.weight"})]
    assert all("lr" not in g for g in groups)       # not given: the optimizer's default applies
    # a pattern that names a psi weight cannot put decay back on it
    groups = plan.param_groups(weight_decay=1e-2, decay_1d=True, no_decay="re:conv1\\..*")
    assert _members(groups)[-1] == (0.0, {"conv1.weight", "conv2.weight"})


def test_frozen_parameters_are_left_out():
    model = TinyBNNet()
    model.bn1.weight.requires_grad_(False)
    plan = gc.plan(model, PSI, example_inputs=example_images())
    members = {id(p) for g in plan.param_groups(weight_decay=1e-4) for p in g["params"]}
    assert id(model.bn1.weight) not in members and len(members) == len(list(model.parameters())) - 1


def test_installing_on_these_groups_removes_the_weight_decay_warning():
    model = TinyBNNet()
    plan = gc.plan(model, PSI, example_inputs=example_images())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.plan(model, PSI, example_inputs=example_images()).install(
            torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4))           # control
        plan.install(torch.optim.SGD(plan.param_groups(weight_decay=1e-4), lr=0.1))
    decay = [str(w.message) for w in caught if "weight_decay" in str(w.message)]
    assert len(decay) == 1 and "psi on 2 parameters" in decay[0], decay
    assert not [w for w in plan.warnings if "weight_decay" in str(w)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(no_decay=["heads.**"]), r"no_decay pattern\(s\) \['heads.\*\*'\] match no parameter"),
    (dict(no_decay=[3]), "no_decay must be a name pattern"),
    (dict(no_decay="re:("), "invalid regular expression"),
    (dict(weight_decay=-1.0), "weight_decay must be a number >= 0"),
    (dict(params=[]), "param_groups sets 'params' itself"),
])
def test_bad_arguments_are_errors(kwargs, message):
    plan = gc.plan(_MODEL, PSI, example_inputs=example_images())
    with pytest.raises(gc.GeomCompileError, match=message):
        plan.param_groups(**kwargs)


@pytest.fixture
def timm_optim():
    with loaded() as module:
        yield module


def _by_decay(optimizer) -> dict[float, set[str]]:
    out: dict[float, set[str]] = {}
    for g in optimizer.param_groups:
        out.setdefault(g["weight_decay"], set()).update(_NAME[id(p)] for p in g["params"])
    return out


def test_timm_create_optimizer_v2_with_param_group_fn(timm_optim):
    plan = gc.plan(_MODEL, PSI, example_inputs=example_images())
    # control: timm's own grouping decays the conv weights psi trains
    plain = timm_optim.create_optimizer_v2(_MODEL, "sgd", lr=0.1, weight_decay=5e-4)
    assert {"conv1.weight", "conv2.weight"} <= _by_decay(plain)[5e-4]
    optimizer = timm_optim.create_optimizer_v2(_MODEL, "sgd", lr=0.1, weight_decay=5e-4,
                                               param_group_fn=lambda model: plan.param_groups(weight_decay=5e-4))
    assert _by_decay(optimizer) == {5e-4: {"head.weight"}, 0.0: NORMS_AND_BIASES | {"conv1.weight", "conv2.weight"}}
    assert all(g["lr"] == 0.1 and g["momentum"] == 0.9 for g in optimizer.param_groups)   # timm's defaults
    plan.install(optimizer)
    assert not [w for w in plan.warnings if "weight_decay" in str(w)]
    plan.remove()

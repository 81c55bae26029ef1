"""Warnings a user can read (issue 18): one line per cause, hints that fit the policy, notes for
what a later rule handles by design, and the shipped policies strict-clean on the architectures
their headers name."""
from __future__ import annotations

import copy
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import geomcompile as gc
import importlib
from geomcompile.policy import load_policy, shipped_policies
from tests.models import (DECODER, DENSENET, GROUPNORM, MLP_BIAS, MLP_NOBIAS, MOBILENETV2, PLAIN_CNN, PREACT,
                          RESNET20, SMALL_RESNET, TRANSFORMER, VGG11, VGG11_BN, DenseNetStyle, FullyConvNet, GMLP,
                          GResidualToy, GTinyCNN, ResNet50Style, _randn, g_tiny_cnn_inputs)
from tests.policy_zoo import TinyConvNeXt, TinyEfficientNet, TinyGPT, TinyUNet, gpt_inputs

POLICIES = Path(__file__).resolve().parent.parent / "policies"


def shipped(name: str, strict: bool = False):
    """The worktree's shipped policy file, optionally switched to `validate: strict`."""
    text = (POLICIES / f"{name}.yaml").read_text()
    if strict:
        text, n = re.subn(r"(?m)^validate: warn\b", "validate: strict", text)
        assert n == 1
    return load_policy(text)


def apply_recording(model, policy, optimizer, inputs):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plan = gc.apply(model, policy, optimizer, example_inputs=inputs)
    return plan, [str(r.message) for r in record if issubclass(r.category, gc.GeomCompileWarning)]


def x16():
    return (_randn(2, 3, 16, 16),)


def conv_weights(model, kernel=None):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
            and (kernel is None or m.kernel_size == kernel)]


# ---- one line per cause -----------------------------------------------------------------------
@pytest.mark.parametrize("factory, n_convs", [(ResNet50Style, 53), (DenseNetStyle, 120)],
                         ids=["resnet50_style", "densenet121_style"])
def test_weight_decay_under_psi_is_one_warning_with_the_count(factory, n_convs):
    model = factory()
    assert len(conv_weights(model)) == n_convs
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    plan, emitted = apply_recording(model, shipped("resnet"), opt, x16())
    decay = [w for w in emitted if "weight_decay=0.01" in w]
    assert len(decay) == 1, emitted
    assert f"rule 'psi-scale-invariant-convs': psi on {n_convs} parameters (" in decay[0]
    assert "and 50 more" in decay[0] or "and 117 more" in decay[0]
    assert "Fix: put them in their own param group with weight_decay=0" in decay[0]
    # the adaptive-optimizer warning is a second cause; nothing else is emitted
    assert len(emitted) == 2 and any("psi under AdamW" in w for w in emitted)
    # programs still get one entry per parameter, each naming it
    from geomcompile.findings import Finding
    per_param = [w for w in plan.warnings if "weight_decay=0.01" in w]
    assert len(per_param) == n_convs and all(isinstance(w, Finding) for w in per_param)
    assert {w.name for w in per_param} == {f"{n}.weight" for n in conv_weights(model)}
    assert plan.warnings_by_cause == emitted
    assert sum(line.startswith("warning: ") for line in plan.summary().splitlines()) == 2


def test_pom_weight_decay_is_one_warning_per_rule_and_the_1x1_convs_are_a_note():
    model = ResNet50Style()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    plan, emitted = apply_recording(model, shipped("fgsgd"), opt, x16())
    assert not any("cannot apply" in w for w in emitted + plan.warnings)
    n_1x1 = len(conv_weights(model, (1, 1)))
    assert n_1x1 == 36
    assert sorted(re.search(r"pom on (\d+) parameters", w)[1] for w in emitted) == sorted(["17", str(n_1x1)])
    assert len(emitted) == 2
    note = [n for n in plan.notes if "leaves" in n]
    assert len(note) == 1 and f"rule 'pom-kernels' leaves {n_1x1} parameters (" in note[0]
    assert "to rule 'pom-filters' for the manifold stage" in note[0]


def test_group_keeps_single_causes_and_plain_strings_whole():
    from geomcompile.findings import Finding, group
    a = Finding("x on a: bad", name="a", key=("x", "bad"), head="x on ", tail=": bad")
    b = Finding("x on b: bad", name="b", key=("x", "bad"), head="x on ", tail=": bad")
    c = Finding("x on c: worse", name="c", key=("x", "worse"), head="x on ", tail=": worse")
    assert group([a, "plain", b, c, "plain"]) == ["x on 2 parameters (a, b): bad", "plain", "x on c: worse"]
    assert pickle.loads(pickle.dumps(a)).key == a.key and copy.deepcopy(b).name == "b"


def test_inapplicable_parameters_of_one_cause_are_one_warning():
    model = ResNet50Style()
    policy = load_policy("version: 1\nvalidate: warn\nrules:\n  - name: kernels\n    match: {kind: conv}\n"
                         "    use: {pom: {component: kernel}}\n")
    plan, emitted = apply_recording(model, policy, torch.optim.SGD(model.parameters(), lr=0.1), x16())
    cannot = [w for w in emitted if "cannot apply" in w]
    assert len(cannot) == 1 and "rule 'kernels' uses pom on 36 parameters (" in cannot[0]
    assert "1x1 kernels" in cannot[0] and "Fix:" in cannot[0]
    assert sum("cannot apply" in w for w in plan.warnings) == 36


# ---- a later rule covers it: a note, in strict mode too ----------------------------------------
KERNELS_THEN_FILTERS = """version: 1
validate: {mode}
rules:
  - name: kernels
    match: {{kind: conv}}
    use: {{pom: {{component: kernel}}}}
  - name: filters
    match: {{kind: conv}}
    use: {{pom: {{component: filter}}}}
"""


def test_a_geometry_a_later_rule_covers_is_a_note_even_in_strict_mode():
    model = ResNet50Style()
    plan = gc.plan(model, KERNELS_THEN_FILTERS.format(mode="strict"), example_inputs=x16())
    assert plan.warnings == []
    assert any("rule 'kernels' leaves 36 parameters" in n for n in plan.notes)
    assert plan.rule_of[("layer1.0.conv1.weight", "manifold")] == "filters"
    assert plan.rule_of[("layer1.0.conv2.weight", "manifold")] == "kernels"


def test_a_later_rule_that_cannot_apply_either_leaves_the_warning():
    text = KERNELS_THEN_FILTERS.format(mode="warn").replace("component: filter", "component: kernel")
    plan = gc.plan(ResNet50Style(), text, example_inputs=x16())
    assert sum("rule 'kernels' uses pom on" in w for w in plan.warnings) == 36
    assert not any("leaves" in n for n in plan.notes)
    with pytest.raises(gc.GeomCompileError, match="rule 'kernels' uses pom on 36 parameters"):
        gc.plan(ResNet50Style(), text.replace("validate: warn", "validate: strict"), example_inputs=x16())


# ---- hints that fit, and `optional` -----------------------------------------------------------
NO_LINEAR = """version: 1
validate: {mode}
rules:
  - name: convs
    match: {{kind: conv}}
    use: {{channel_directed: {{}}}}
  - name: heads
{optional}    match: {{kind: linear}}
    use: {{channel_directed: {{}}}}
"""


def test_a_rule_matching_nothing_in_warn_mode_does_not_say_set_validate_warn():
    plan = gc.plan(FullyConvNet(), NO_LINEAR.format(mode="warn", optional=""), example_inputs=x16())
    (warning,) = plan.warnings
    assert "rule 'heads' matches no parameter" in warning
    assert "validate: warn" not in warning and "optional: true" in warning


def test_a_rule_matching_nothing_in_strict_mode_offers_optional_and_warn():
    with pytest.raises(gc.GeomCompileError, match=r"optional: true.*validate: warn"):
        gc.plan(FullyConvNet(), NO_LINEAR.format(mode="strict", optional=""), example_inputs=x16())


def test_an_optional_rule_matching_nothing_is_a_note():
    text = NO_LINEAR.format(mode="strict", optional="    optional: true\n")
    plan = gc.plan(FullyConvNet(), text, example_inputs=x16())
    assert plan.warnings == []
    assert any("rule 'heads' (optional) matches no parameter" in n for n in plan.notes)
    assert load_policy(text).rules[1].optional and not load_policy(text).rules[0].optional


def test_optional_is_validated():
    text = NO_LINEAR.format(mode="strict", optional="    optional: yes please\n")
    with pytest.raises(gc.GeomCompileError, match=r"<string>:8:15: rule 'heads': `optional` must be true or false"):
        load_policy(text)


# ---- every shipped policy is strict-clean on the architectures its header names ----------------
def _toy(factory):
    return lambda: (factory(), x16())


def _zoo(entry):
    return lambda: (entry.build(), entry.example_inputs)


ARCHITECTURES = {
    "resnet": {"resnet20": _zoo(RESNET20), "small_resnet": _zoo(SMALL_RESNET), "resnet50_style": _toy(ResNet50Style),
               "preact_resnet": _zoo(PREACT), "vgg11_bn": _zoo(VGG11_BN), "densenet_block": _zoo(DENSENET),
               "densenet121_style": _toy(DenseNetStyle), "mobilenetv2": _zoo(MOBILENETV2),
               "groupnorm": _zoo(GROUPNORM), "fully_conv_bn": _toy(FullyConvNet)},
    "plain": {"plain_cnn": _zoo(PLAIN_CNN), "vgg11": _zoo(VGG11), "mlp_bias": _zoo(MLP_BIAS),
              "mlp_nobias": _zoo(MLP_NOBIAS)},
    "fgsgd": {"resnet20": _zoo(RESNET20), "resnet50_style": _toy(ResNet50Style),
              "densenet121_style": _toy(DenseNetStyle), "densenet_block": _zoo(DENSENET),
              "vgg11_bn": _zoo(VGG11_BN), "vgg11": _zoo(VGG11), "mobilenetv2": _zoo(MOBILENETV2),
              "plain_cnn": _zoo(PLAIN_CNN)},
    "gsgd": {"gmlp": lambda: (GMLP((3, 5, 4, 2)), (_randn(4, 3),)), "gtinycnn": lambda: (GTinyCNN(), g_tiny_cnn_inputs()),
             "residual_block_no_bn": lambda: (GResidualToy(), (_randn(2, 3, 6, 6),))},
    # the policies per architecture of issue 12 (their rule counts: tests/test_shipped_policies.py)
    "vgg": {"vgg11_bn": _zoo(VGG11_BN), "vgg11": _zoo(VGG11)},
    "densenet": {"densenet_block": _zoo(DENSENET), "densenet121_style": _toy(DenseNetStyle)},
    "mobilenet": {"mobilenetv2": _zoo(MOBILENETV2), "efficientnet": _toy(TinyEfficientNet)},
    "convnext": {"convnext": _toy(TinyConvNeXt)},
    "transformer": {"transformer_block": _zoo(TRANSFORMER), "gpt": lambda: (TinyGPT(), gpt_inputs())},
    "unet": {"unet": lambda: (TinyUNet(), (_randn(2, 3, 8, 8),)), "convtranspose_decoder": _zoo(DECODER)},
    "spectral": {"plain_cnn": _zoo(PLAIN_CNN), "vgg11": _zoo(VGG11), "small_resnet": _zoo(SMALL_RESNET)},
}


def test_every_shipped_policy_has_its_architectures_listed():
    names = sorted(p.name[:-5] for p in POLICIES.glob("*.yaml"))
    assert names == sorted(ARCHITECTURES) and set(shipped_policies()) <= set(names)
    for name in names:
        assert "# Architectures:" in (POLICIES / f"{name}.yaml").read_text()


@pytest.mark.parametrize("policy, arch", [(p, a) for p, archs in ARCHITECTURES.items() for a in archs],
                         ids=lambda v: v)
def test_shipped_policy_passes_strict(policy, arch):
    model, inputs = ARCHITECTURES[policy][arch]()
    plan = gc.plan(model, shipped(policy, strict=True), example_inputs=inputs)
    assert plan.warnings == []
    assert any(plan.assignments.values())


# ---- eager on huge weights says so ------------------------------------------------------------
class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_eager_on_a_huge_weight_points_to_the_compile_backend(monkeypatch):
    monkeypatch.setattr(importlib.import_module("geomcompile.plan"), "SLOW_EAGER_NUMEL", 64 * 32)
    model = Wide()
    policy = shipped("plain")
    plan = gc.apply(model, policy, torch.optim.SGD(model.parameters(), lr=0.1), backend="eager")
    (note,) = [n for n in plan.notes if "is slow on CPU" in n]
    assert "eager channel_directed on 1 weight(s)" in note and "(fc1.weight)" in note
    assert "backend='compile'" in note
    plan.remove()
    plan.install(torch.optim.SGD(model.parameters(), lr=0.1), backend="compile")
    assert not any("is slow on CPU" in n for n in plan.notes)

"""Every shipped policy on toy models of the architectures it names (issue 12): it applies in
`strict` mode, each rule matches and assigns the parameters counted by hand below, and 20
training steps with SGD-momentum and AdamW stay finite and reduce the loss.

The counts are derived from the models' code (tests/models.py, tests/policy_zoo.py, geomcompile/
models.py), not from a plan: (matched, assigned) per rule, where "matched" counts the parameters
the rule's selectors hold for and "assigned" those it gives a geometry (an earlier rule wins a
stage; the rules of the new policies match disjoint sets, so the two agree there)."""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import geomcompile as gc
from geomcompile.geometries.base import REGISTRY
from geomcompile.policy import load_policy, shipped_policies
from tests.models import (DenseBlockNet, DenseNetStyle, Decoder, GMLP, GTinyCNN, PlainCNN, TinyMobileNetV2,
                          TinyTransformer, TinyVGG11, _randn, g_tiny_cnn_inputs, resnet20, small_resnet)
from tests.policy_zoo import TinyConvNeXt, TinyEfficientNet, TinyGPT, TinyUNet, gpt_inputs

POLICIES = Path(__file__).resolve().parent.parent / "policies"


@pytest.fixture(autouse=True)
def one_thread():
    """The models are tiny: with several threads on a busy machine OpenMP hand-offs make the
    training tests 10-60x slower (measured: 21 s instead of 0.3 s for 20 spectral steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shipped(name: str, strict: bool = True, replace: tuple[str, str] | None = None):
    """The worktree's policy file, switched to `validate: strict` (the shipped ones say warn)."""
    text = (POLICIES / f"{name}.yaml").read_text()
    if strict:
        text, n = re.subn(r"(?m)^validate: warn\b", "validate: strict", text)
        assert n == 1
    if replace is not None:
        assert replace[0] in text
        text = text.replace(*replace)
    return load_policy(text)


def images(batch, channels, size):
    return lambda: (_randn(batch, channels, size, size),)


# (policy, model id): (factory, example inputs, {rule: (matched, assigned)})
CASES = {
    # small_resnet: stem conv1, layer1.0 (conv1, conv2), layer1.1 (conv1, conv2, downsample.0 1x1):
    # 6 convs, each feeding its BN -> all 6 scale-invariant; fc the only linear weight. Rule 2
    # (kind conv/conv_transpose, no invariance selector) matches the 6 again but psi won the stage.
    ("resnet", "small_resnet"): (small_resnet, images(4, 1, 8),
                                 {"psi-scale-invariant-convs": (6, 6), "channel-directed-convs": (6, 0),
                                  "channel-directed-linear": (1, 1)}),
    # TinyVGG11: VGG11_CFG has 8 convs; with BN each feeds its BN (its bias is removed by BN's mean);
    # classifier.0 and classifier.2 are the 2 linear weights.
    ("vgg", "vgg11_bn"): (lambda: TinyVGG11(True), images(2, 3, 32),
                          {"psi-bn-convs": (8, 8), "channel-directed-convs": (0, 0),
                           "channel-directed-classifier": (2, 2)}),
    # without BN: no conv is scale-invariant (conv -> ReLU -> maxpool -> conv), so rule 2 takes all 8
    ("vgg", "vgg11"): (lambda: TinyVGG11(False), images(2, 3, 32),
                       {"psi-bn-convs": (0, 0), "channel-directed-convs": (8, 8),
                        "channel-directed-classifier": (2, 2)}),
    # DenseBlockNet: conv0, conv1, conv2 all reach BNs through cat -> 3 invariant; fc 1 linear
    ("densenet", "densenet_block"): (DenseBlockNet, images(2, 3, 8),
                                     {"psi-convs": (3, 3), "channel-directed-convs": (0, 0),
                                      "channel-directed-classifier": (1, 1)}),
    # DenseNetStyle (DenseNet-121 layout): dense layers 6+12+24+16 = 58, 2 convs each = 116, plus
    # conv0 and 3 transitions = 120 convs, all reaching a BN; 1 classifier
    ("densenet", "densenet121_style"): (DenseNetStyle, images(2, 3, 16),
                                        {"psi-convs": (120, 120), "channel-directed-convs": (0, 0),
                                         "channel-directed-classifier": (1, 1)}),
    # TinyMobileNetV2: stem.0, block.conv.0 (expand), block.conv.6 (project), head.0 = 4 dense
    # convs feeding their BN; block.conv.3 is the one depthwise conv; no SE; 1 classifier
    ("mobilenet", "mobilenetv2"): (TinyMobileNetV2, images(2, 3, 8),
                                   {"psi-pointwise-convs": (4, 4), "channel-directed-depthwise": (1, 1),
                                    "channel-directed-se": (0, 0), "channel-directed-classifier": (1, 1)}),
    # TinyEfficientNet: stem, 2 blocks x (expand, project), head = 6 dense convs feeding BN;
    # 2 depthwise (one per block); 2 blocks x (se.reduce, se.expand) = 4 SE convs (SiLU /
    # hardswish / sigmoid / hardsigmoid and a product follow them); 1 classifier
    ("mobilenet", "efficientnet"): (TinyEfficientNet, images(2, 3, 16),
                                    {"psi-pointwise-convs": (6, 6), "channel-directed-depthwise": (2, 2),
                                     "channel-directed-se": (4, 4), "channel-directed-classifier": (1, 1)}),
    # TinyConvNeXt: convs stem.0, stage1.dwconv, downsample.1, stage2.dwconv = 4 (all with biases
    # before a LayerNorm or feeding a conv: none invariant); linears 2 stages x (pwconv1, pwconv2)
    # + head = 5; the gammas are kind other
    ("convnext", "convnext"): (TinyConvNeXt, images(2, 3, 16),
                               {"psi-scale-invariant": (0, 0), "channel-directed-convs": (4, 4),
                                "channel-directed-linear": (5, 5)}),
    # TinyTransformer: embed (bias-free -> ln_in) is tensor-invariant; q, k, v, proj, fc1, fc2,
    # pre, head = 8 other linears; no conv
    ("transformer", "transformer_block"): (TinyTransformer, lambda: (_randn(2, 5, 6),),
                                           {"psi-scale-invariant-linear": (1, 1),
                                            "channel-directed-projections": (8, 8),
                                            "channel-directed-patch-embedding": (0, 0)}),
    # TinyGPT: 2 blocks x (qkv, proj, fc1, fc2) + head = 9 linears, none invariant (pre-LN: the LN
    # comes before each layer); tokens is an embedding, positions kind other
    ("transformer", "gpt"): (TinyGPT, gpt_inputs,
                             {"psi-scale-invariant-linear": (0, 0), "channel-directed-projections": (9, 9),
                              "channel-directed-patch-embedding": (0, 0)}),
    # TinyUNet: 5 double convs (enc1, enc2, bottleneck, dec2, dec1) = 10 convs feeding their BN;
    # up2, up1 (transposed, feeding cat -> conv) and the 1x1 head = 3 others; no linear
    ("unet", "unet"): (TinyUNet, images(2, 3, 8),
                       {"psi-normalised-convs": (10, 10), "channel-directed-convs": (3, 3),
                        "channel-directed-linear": (0, 0)}),
    # Decoder: enc -> bn0, up1 -> bn1, up2 -> bn2 (2 transposed) = 3 invariant; out reaches the output
    ("unet", "convtranspose_decoder"): (Decoder, images(2, 3, 8),
                                        {"psi-normalised-convs": (3, 3), "channel-directed-convs": (1, 1),
                                         "channel-directed-linear": (0, 0)}),
    # TinyVGG11 without BN: 8 convs, 2 linears
    ("plain", "vgg11"): (lambda: TinyVGG11(False), images(2, 3, 32),
                         {"channel-directed-convs": (8, 8), "channel-directed-linear": (2, 2)}),
    # small_resnet: 5 of its 6 convs have 3x3 kernels (rule 1 takes them); the 1x1 downsample is
    # matched by rule 1 too but handed to rule 3 (filters), which matches all 6 convs
    ("fgsgd", "small_resnet"): (small_resnet, images(4, 1, 8),
                                {"pom-kernels": (6, 5), "pom-kernels-unnormalised": (0, 0), "pom-filters": (6, 1)}),
    # PlainCNN: conv1, conv2 (nn.Conv2d modules); fc1, fc2 are linear (not matched)
    ("spectral", "plain_cnn"): (PlainCNN, images(2, 3, 8), {"spectral-convs": (2, 2)}),
    # small_resnet: its 6 convs
    ("spectral", "small_resnet"): (small_resnet, images(4, 1, 8), {"spectral-convs": (6, 6)}),
    # GTinyCNN: one chain conv1 -> conv2 -> fc, 3 weights + 3 biases
    ("gsgd", "gtinycnn"): (GTinyCNN, g_tiny_cnn_inputs, {"gsgd-chains": (6, 6)}),
    # GMLP (3, 5, 4, 2): one chain of 3 linear layers, 3 weights + 3 biases
    ("gsgd", "gmlp"): (GMLP, lambda: (_randn(4, 3),), {"gsgd-chains": (6, 6)}),
}


@pytest.mark.parametrize("policy, model", list(CASES), ids=lambda v: v)
def test_rule_counts_in_strict_mode(policy, model):
    factory, inputs, expected = CASES[(policy, model)]
    torch.manual_seed(0)
    plan = gc.plan(factory(), shipped(policy), example_inputs=inputs())
    assert plan.warnings == []
    assigned = Counter(plan.rule_of.values())
    assert {rule: (plan.rule_counts[rule], assigned[rule]) for rule in plan.rule_counts} == expected


def test_every_shipped_policy_has_counted_models():
    assert sorted({policy for policy, _ in CASES}) == shipped_policies()


def test_every_registered_geometry_is_used_by_a_shipped_policy():
    used = {name for policy in shipped_policies() for rule in load_policy(policy).rules for name in rule.use}
    assert used == set(REGISTRY)


def test_no_shipped_policy_promises_geometries_for_later():
    for policy in shipped_policies():
        assert "later version" not in (POLICIES / f"{policy}.yaml").read_text(), policy


def test_every_shipped_policy_header_says_what_it_is_for_and_what_it_leaves_alone():
    for policy in shipped_policies():
        header = (POLICIES / f"{policy}.yaml").read_text().split("\nversion: 1")[0]
        assert "# Architectures:" in header and "# What it leaves alone" in header, policy


def _commented_rules(text: str) -> list[str]:
    """The commented-out example rules of a policy file ('  # - name: ...' and the lines under it)."""
    blocks, current = [], None
    for line in text.splitlines():
        if re.match(r"^  # - name:", line):
            current = [line.replace("  # ", "  ", 1)]
            blocks.append(current)
        elif current is not None and re.match(r"^  #   ", line):
            current.append(line.replace("  # ", "  ", 1))
        else:
            current = None
    return ["\n".join(b) for b in blocks]


@pytest.mark.parametrize("policy, factory, inputs", [
    ("resnet", resnet20, images(2, 3, 8)),
    ("plain", lambda: TinyVGG11(False), images(2, 3, 32)),
    ("fgsgd", lambda: TinyVGG11(True), images(2, 3, 32)),
], ids=["resnet", "plain", "fgsgd"])
def test_the_commented_examples_work_when_uncommented(policy, factory, inputs):
    """Each example rule a shipped policy shows in comments applies in strict mode on a model of
    its architectures (the old spectral examples targeted linear weights, which spectral refuses)."""
    examples = _commented_rules((POLICIES / f"{policy}.yaml").read_text())
    assert examples
    for example in examples:
        plan = gc.plan(factory(), f"version: 1\nvalidate: strict\nrules:\n{example}\n", example_inputs=inputs())
        assert plan.warnings == [] and plan.rule_of, example


# ---- 20 training steps ----------------------------------------------------------------------------
def _classes(n: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


def _images(n, c, size):
    return lambda: _randn(n, c, size, size, seed=2)


# policy: (model factory, batch, targets, loss); one model per policy, the one it is mainly for
TRAINING = {
    "resnet": (small_resnet, _images(8, 1, 8), lambda: _classes(8, 10), F.cross_entropy),
    "vgg": (lambda: TinyVGG11(True), _images(8, 3, 32), lambda: _classes(8, 3), F.cross_entropy),
    "densenet": (DenseBlockNet, _images(8, 3, 8), lambda: _classes(8, 3), F.cross_entropy),
    "mobilenet": (TinyEfficientNet, _images(8, 3, 16), lambda: _classes(8, 3), F.cross_entropy),
    "convnext": (TinyConvNeXt, _images(8, 3, 16), lambda: _classes(8, 3), F.cross_entropy),
    "transformer": (TinyGPT, lambda: gpt_inputs(8)[0], lambda: gpt_inputs(8, seed=3)[0],
                    lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())),
    "unet": (TinyUNet, _images(4, 3, 8), lambda: _classes(4 * 8 * 8, 2).reshape(4, 8, 8), F.cross_entropy),
    "plain": (lambda: TinyVGG11(False), _images(8, 3, 32), lambda: _classes(8, 3), F.cross_entropy),
    "fgsgd": (small_resnet, _images(8, 1, 8), lambda: _classes(8, 10), F.cross_entropy),
    "spectral": (PlainCNN, _images(8, 3, 8), lambda: _classes(8, 3), F.cross_entropy),
    "gsgd": (GTinyCNN, lambda: g_tiny_cnn_inputs(8)[0], lambda: _classes(8, 2), F.cross_entropy),
}

OPTIMIZERS = {
    # plan.param_groups keeps weight decay off the geometries it hurts (psi, pom, gspace)
    "sgd_momentum": lambda plan: torch.optim.SGD(plan.param_groups(lr=0.05, weight_decay=5e-4), momentum=0.9),
    "adamw": lambda plan: torch.optim.AdamW(plan.param_groups(lr=0.01, weight_decay=0.01)),
    "sgd": lambda plan: torch.optim.SGD(plan.param_groups(lr=0.05)),
}


def train(policy, factory, x, y, loss_fn, optimizer, steps=20) -> list[float]:
    torch.manual_seed(0)
    model = factory()
    plan = gc.plan(model, policy, example_inputs=(x[:2],))
    opt = OPTIMIZERS[optimizer](plan)
    plan.install(opt, backend="eager")
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(loss_fn(model(x), y).item())
    assert all(w.isfinite().all() for w in model.parameters())
    return losses


# G-SGD's exact step needs plain SGD (no momentum); under SGD-momentum and AdamW the policy's
# `step: tangent` alternative (the same direction to first order in the lr) is the one to use.
TANGENT = ("step: exact", "step: tangent")


@pytest.mark.filterwarnings("ignore::geomcompile.GeomCompileWarning")   # psi under AdamW says so
@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize("policy", sorted(TRAINING))
def test_twenty_steps_stay_finite_and_reduce_the_loss(policy, optimizer):
    factory, x, y, loss_fn = TRAINING[policy]
    pol = shipped(policy, replace=TANGENT if policy == "gsgd" else None)
    losses = train(pol, factory, x(), y(), loss_fn, optimizer)
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], losses


def test_gsgd_exact_step_with_plain_sgd_reduces_the_loss():
    factory, x, y, loss_fn = TRAINING["gsgd"]
    losses = train(shipped("gsgd"), factory, x(), y(), loss_fn, "sgd")
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses

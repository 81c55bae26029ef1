"""`gc.suggest_policy` / `geomcompile suggest` (issue 12): a policy written from the analysis that
validates in strict mode against its model, counts what each rule matches, and is deterministic."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import geomcompile as gc
from geomcompile.cli import main
from geomcompile.policy import load_policy
from tests.models import GMLP, TinyTransformer, TinyVGG11, _randn, resnet20
from tests.policy_zoo import TinyConvNeXt, TinyEfficientNet, TinyGPT, TinyUNet, gpt_inputs


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: several threads on a busy machine only add OpenMP hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(batch, channels, size):
    return lambda: (_randn(batch, channels, size, size),)


# model id: (factory, example inputs, {active rule: parameters it matches}, parameters of the
# commented gspace rule or None). Counted by hand from the models' code:
MODELS = {
    # CIFAR ResNet-20: conv1 + 3 stages x 3 blocks x 2 convs + 2 downsampling 1x1 convs = 21 convs, each
    # feeding its BatchNorm; fc reaches the logits. No G-chain: a BN sits after every conv.
    "resnet20": (resnet20, images(2, 3, 8), {"psi-scale-invariant": 21, "channel-directed": 1}, None),
    # TinyTransformer: embed (bias-free -> LayerNorm) is invariant as a tensor; q, k, v, proj, fc1,
    # fc2, pre, head are not (products, adds, GELU, a bias before LN, the output)
    "transformer": (TinyTransformer, lambda: (_randn(2, 5, 6),),
                    {"psi-scale-invariant": 1, "channel-directed": 8}, None),
    # TinyGPT: 2 blocks x (qkv, proj, fc1, fc2) + head = 9 linears, none invariant (pre-LN)
    "gpt": (TinyGPT, gpt_inputs, {"channel-directed": 9}, None),
    # TinyEfficientNet: stem, 2 x (expand, project), head = 6 convs feeding BN; 2 depthwise (BN
    # after them too); 2 x (SE reduce, SE expand) + classifier = 5 not invariant
    "efficientnet": (TinyEfficientNet, images(2, 3, 16),
                     {"psi-scale-invariant": 6, "channel-directed-depthwise": 2, "channel-directed": 5}, None),
    # TinyUNet: 10 convs feeding BN; up2, up1 (into cat -> conv) and the head are not invariant
    "unet": (TinyUNet, images(2, 3, 8), {"psi-scale-invariant": 10, "channel-directed": 3}, None),
    # TinyConvNeXt: 4 convs (biases before LayerNorm, or feeding a conv) + 5 linears, none invariant
    "convnext": (TinyConvNeXt, images(2, 3, 16), {"channel-directed": 9}, None),
    # TinyVGG11 without BN, no normalisation at all: 8 convs + 2 linears, none invariant; all 10
    # layers form one chain (ReLU, max pooling, a flatten of 1x1 maps, ReLU), 10 weights + 10 biases
    "vgg11_no_norm": (lambda: TinyVGG11(False), images(2, 3, 32), {"channel-directed": 10}, 20),
    # GMLP (3, 5, 4, 2): 3 linears joined by ReLU, one chain: 3 weights + 3 biases
    "mlp_no_norm": (GMLP, lambda: (_randn(4, 3),), {"channel-directed": 3}, 6),
}


def suggested(model_id):
    factory, inputs, _, _ = MODELS[model_id]
    torch.manual_seed(0)
    model = factory()
    return model, inputs(), gc.suggest_policy(model, inputs())


def counted_in_comments(text: str) -> dict[str, int]:
    """rule name -> N of the 'matches N parameter(s)' comment just above it."""
    return {m[2]: int(m[1]) for m in re.finditer(r"# matches (\d+) parameter\(s\):[^\n]*\n(?:  #     [^\n]*\n)*"
                                                 r"  (?:# )?- name: (\S+)", text)}


@pytest.mark.parametrize("model_id", list(MODELS))
def test_the_suggested_policy_applies_in_strict_mode_with_the_counts_it_states(model_id):
    model, inputs, text = suggested(model_id)
    _, _, expected, _ = MODELS[model_id]
    policy = load_policy(text)
    assert policy.validate == "strict" and [r.name for r in policy.rules] == list(expected)
    plan = gc.plan(model, policy, example_inputs=inputs)
    assert plan.warnings == []
    assert plan.rule_counts == expected
    assert {r: n for r, n in counted_in_comments(text).items() if r in expected} == expected
    assigned = {}
    for rule in plan.rule_of.values():
        assigned[rule] = assigned.get(rule, 0) + 1
    assert assigned == expected                         # disjoint rules: every match is assigned
    for name, facts in plan.structure.items():          # every conv / linear weight, the fitting metric
        geometry = plan.assignments.get(name, {}).get("metric")
        if facts.kind not in ("conv", "conv_transpose", "linear"):
            assert geometry is None, name
        elif facts.scale_invariant is not None and not facts.depthwise:
            assert geometry.name == "psi", name
        else:
            assert geometry.name == "channel_directed", name


@pytest.mark.parametrize("model_id, facts", [
    ("resnet20", ["scale-invariant through BatchNorm2d (21): 21 weight(s) (21 conv); units: row 21",
                  "fc.weight: reaches the model output"]),
    ("transformer", ["scale-invariant through LayerNorm (1): 1 weight(s) (1 linear); units: tensor 1",
                     "3 parameters (q.weight, k.weight, v.weight): matmul is not known to keep a per-channel"]),
    ("efficientnet", ["depthwise and scale-invariant through BatchNorm2d (2): 2 weight(s)",
                      "each unit holds only 9 numbers", "block1.se.expand.weight: Sigmoid is not known"]),
    ("mlp_no_norm", ["1 𝒢-chain(s) of layers", "layers.0 -> layers.1 -> layers.2",
                     "their 3 weight(s) and 3 bias(es)"]),
])
def test_the_comments_give_the_facts(model_id, facts):
    _, _, text = suggested(model_id)
    flat = re.sub(r"\n\s*#\s+", " ", text)               # comment lines joined again
    for fact in facts:
        assert fact in flat, fact


@pytest.mark.parametrize("model_id", ["resnet20", "gpt", "mlp_no_norm"])
def test_the_suggestion_is_deterministic(model_id):
    _, _, first = suggested(model_id)
    factory, inputs, _, _ = MODELS[model_id]
    torch.manual_seed(123)                              # other weights: the facts, and the text, are the same
    assert gc.suggest_policy(factory(), inputs()) == first


def uncommented(text: str) -> str:
    """The suggestion with its commented-out rule restored (each '  # ' rule line back to '  ')."""
    out, in_rule = [], False
    for line in text.splitlines():
        if line.startswith("  # - name:"):
            in_rule = True
        elif in_rule and not line.startswith("  #   "):
            in_rule = False
        out.append(line.replace("  # ", "  ", 1) if in_rule else line)
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("model_id", ["vgg11_no_norm", "mlp_no_norm"])
def test_the_commented_gspace_rule_takes_the_chains_when_uncommented(model_id):
    model, inputs, text = suggested(model_id)
    _, _, expected, chain_params = MODELS[model_id]
    assert "# - name: gspace-chains" in text and counted_in_comments(text)["gspace-chains"] == chain_params
    plan = gc.plan(model, uncommented(text), example_inputs=inputs)
    assert plan.warnings == []
    gspace = [n for n, stages in plan.assignments.items() if stages["metric"].name == "gspace"]
    assert len(gspace) == chain_params and plan.rule_counts["gspace-chains"] == chain_params
    # the channel-directed rule still matches its weights, but the gspace rule above won the stage
    assert plan.rule_counts["channel-directed"] == expected["channel-directed"]
    assert not any(stages["metric"].name == "channel_directed" for stages in plan.assignments.values())


def test_models_with_batchnorm_everywhere_get_no_gspace_rule():
    _, _, text = suggested("resnet20")
    assert "gspace" not in text


@pytest.mark.filterwarnings("ignore::geomcompile.GeomCompileWarning")
@pytest.mark.parametrize("model_id", ["efficientnet", "vgg11_no_norm"])
def test_the_suggested_policy_installs_and_trains(model_id):
    model, inputs, text = suggested(model_id)
    x, y = _randn(8, *inputs[0].shape[1:], seed=2), torch.arange(8) % 3
    plan = gc.plan(model, text, example_inputs=inputs)
    opt = torch.optim.SGD(plan.param_groups(lr=0.05), momentum=0.9)
    plan.install(opt, backend="eager")
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


class NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale


def test_a_model_without_conv_or_linear_weights_is_a_clear_error():
    with pytest.raises(gc.GeomCompileError, match=r"NoLayers has no conv, transposed-conv or linear weight.*Fix:"):
        gc.suggest_policy(NoLayers(), (torch.randn(2, 3),))


# ---- command line ---------------------------------------------------------------------------------
def test_cli_writes_the_policy_and_plan_reads_it(tmp_path, capsys):
    out = tmp_path / "convnext.yaml"
    assert main(["suggest", "tests.policy_zoo:tiny_convnext", "--input-shape", "2,3,16,16", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (1 rule)" in printed and "geomcompile plan tests.policy_zoo:tiny_convnext" in printed
    assert out.read_text() == gc.suggest_policy(TinyConvNeXt(), (torch.randn(2, 3, 16, 16),))
    assert main(["plan", "tests.policy_zoo:tiny_convnext", str(out), "--input-shape", "2,3,16,16"]) == 0
    summary = capsys.readouterr().out
    # 30 parameters: stem conv + LN (4), 2 blocks x (gamma, dwconv, LN, pwconv1, pwconv2: 9), downsample
    # LN + conv (4), final LN (2), head (2); the 9 conv / linear weights get a geometry
    assert "9 of 30 parameters get a geometry" in summary and "channel-directed: 9 matched, 9 assigned" in summary


def test_cli_prints_the_policy_without_output_file(capsys):
    assert main(["suggest", "tests.models:resnet20"]) == 0
    assert capsys.readouterr().out == gc.suggest_policy(resnet20())


@pytest.mark.parametrize("spec, message", [
    ("tests.policy_zoo:no_such_model", r"'tests.policy_zoo' has no attribute 'no_such_model'. Fix: name a function"),
    ("tests.policy_zoo", r"expected MODULE:CALLABLE \(e.g. tests.models:resnet20\), got 'tests.policy_zoo'"),
    ("no_such_module_xyz:model", r"cannot import 'no_such_module_xyz'.*Run from the folder that contains it"),
    ("tests.policy_zoo:gpt_inputs", r"tests.policy_zoo:gpt_inputs\(\) returned a tuple, not an nn.Module"),
])
def test_cli_bad_model_spec_is_a_clear_error(spec, message, capsys):
    assert main(["suggest", spec]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("geomcompile: error: ")
    assert re.search(message, captured.err), captured.err


def test_cli_unwritable_output_is_a_clear_error(tmp_path, capsys):
    assert main(["suggest", "tests.models:resnet20", "-o", str(tmp_path / "missing" / "p.yaml")]) == 2
    assert "Fix: give a path in a folder you can write to" in capsys.readouterr().err

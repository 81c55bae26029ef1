"""G-chain analysis (issue 10, design gspace.md §8; §15 tests 10 and 11): the coupling facts on the
design's nets, every refusal with its quoted reason, and analysis precision on the whole zoo: every
claimed G-link survives a random rescaling of its hidden units in float64, and rescaling across a
refused link changes the output (the check is sensitive)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_leaves

import geomcompile as gc
from geomcompile.analysis import analyze
from geomcompile.policy import load_policy
from tests.models import (G_ENTRIES, ZOO, DenseNetStyle, FullyConvNet, GEntry, GMLP, GTinyCNN, ResNet50Style,
                          _randn, g_tiny_cnn_inputs, images)

ENTRIES = {e.name: e for e in G_ENTRIES}


def chains(structure) -> list[list[str]]:
    """The chains the facts describe, each from its first layer (no g_prev) along g_next."""
    out = []
    for name, f in structure.items():
        if f.g_next is not None and f.g_prev is None:
            chain = [name]
            while structure[chain[-1]].g_next is not None:
                chain.append(structure[chain[-1]].g_next)
            out.append(chain)
    return out


def analyse(entry: GEntry):
    model = entry.build()
    return model, analyze(model, entry.analysis_inputs())


# ---- facts on the design's nets -------------------------------------------------------------
@pytest.mark.parametrize("widths", [(3, 5, 4, 2), (3, 4, 4, 2), (3, 4, 6, 2), (3, 4, 2, 5, 2)])
def test_mlp_facts(widths):
    s = analyze(GMLP(widths), (_randn(4, widths[0]),))
    names = [f"layers.{i}.weight" for i in range(len(widths) - 1)]
    for i, name in enumerate(names):
        f = s[name]
        assert (f.g_prev, f.g_next) == (names[i - 1] if i else None, names[i + 1] if i + 1 < len(names) else None)
        assert (f.g_bias, f.g_taps, f.g_centre, f.g_block) == (f"layers.{i}.bias", 1, 0, None)
        assert s[f"layers.{i}.bias"].g_weight == name
        assert (f.g_reason == "") == (f.g_next is not None)
    assert s[names[-1]].g_reason == "`layers.2` → output: model output".replace("2", str(len(names) - 1))


def test_mlp_without_bias_has_no_g_bias():
    s = analyze(GMLP((3, 4, 4, 2), bias=False))
    assert chains(s) == [["layers.0.weight", "layers.1.weight", "layers.2.weight"]]
    assert all(s[f"layers.{i}.weight"].g_bias is None for i in range(3))


def test_tiny_cnn_facts():
    s = analyze(GTinyCNN(), g_tiny_cnn_inputs())
    got = {n: (f.g_prev, f.g_next, f.g_bias, f.g_taps, f.g_centre, f.g_block) for n, f in s.items()
           if n.endswith("weight")}
    assert got == {
        "conv1.weight": (None, "conv2.weight", "conv1.bias", 9, 4, None),
        "conv2.weight": ("conv1.weight", "fc.weight", "conv2.bias", 9, 4, None),
        # conv2's output (4, 2, 2) flattened channel-major: S = 4, centre (2//2)*2 + 2//2 = 3
        "fc.weight": ("conv2.weight", None, "fc.bias", 4, 3, (4, 4)),
    }
    assert {n: s[n].g_weight for n in ("conv1.bias", "conv2.bias", "fc.bias")} == {
        "conv1.bias": "conv1.weight", "conv2.bias": "conv2.weight", "fc.bias": "fc.weight"}


def test_flatten_block_centre_and_conv1d():
    s = analyze(ENTRIES["bn_between"].build(), images(2, 3, 4)())
    assert (s["fc.weight"].g_taps, s["fc.weight"].g_centre, s["fc.weight"].g_block) == (16, 10, (4, 16))
    e = ENTRIES["conv1d_chain"]
    s = analyze(e.build(), e.make_inputs())
    assert [(s[n].g_taps, s[n].g_centre) for n in ("conv1.weight", "conv2.weight", "fc.weight")] == \
        [(3, 1), (5, 2), (6, 3)]
    assert s["fc.weight"].g_block == (3, 6)


@pytest.mark.parametrize("entry", G_ENTRIES, ids=lambda e: e.name)
def test_chains_and_reasons(entry):
    """§15 test 10 (analysis side): the chains of every G model and each quoted refusal reason."""
    _, s = analyse(entry)
    assert sorted(chains(s)) == sorted(entry.chains)
    for name, piece in entry.reasons.items():
        assert piece in s[name].g_reason, (name, s[name].g_reason)
    for name, f in s.items():       # every conv / linear weight not linked onward says why
        if f.kind in ("conv", "linear", "conv_transpose") and f.g_next is None:
            assert f.g_reason, name


def test_bn_between_keeps_psi():
    """A BN between two convs ends the chain and psi is still offered for the BN'd weight."""
    entry = ENTRIES["bn_between"]
    model, s = analyse(entry)
    assert s["conv1.weight"].scale_invariant is not None and s["conv1.weight"].g_next is None
    plan = gc.plan(model, "version: 1\nrules:\n  - name: psi-bn\n    match: {scale_invariant: true}\n"
                          "    use: {psi: {}}\n", example_inputs=entry.make_inputs())
    assert [g.name for g in plan.assignments["conv1.weight"].values()] == ["psi"]


def test_frozen_bn_does_not_offer_psi():
    """A BatchNorm in eval mode inside a training model absorbs nothing: the link is refused and the
    reason does not point to psi (the weight is not scale-invariant)."""
    _, s = analyse(ENTRIES["frozen_bn_between"])
    assert s["conv1.weight"].scale_invariant is None
    assert s["conv1.weight"].g_reason.endswith("so in×c/out×1/c is not a symmetry")


def test_basic_block_without_bn_gives_one_chain_inside_the_block():
    _, s = analyse(ENTRIES["residual_toy"])
    assert chains(s) == [["conv1.weight", "conv2.weight"]]
    assert s["conv2.weight"].g_reason == "`conv2` → `add`: residual add; the chain ends here"


def test_flatten_without_example_inputs():
    s = analyze(GTinyCNN())
    assert chains(s) == [["conv1.weight", "conv2.weight"]]
    assert "flatten needs example_inputs" in s["conv2.weight"].g_reason
    assert s["fc.weight"].g_prev is None and s["fc.weight"].g_block is None


def test_g_coupled_selector():
    s = analyze(ENTRIES["residual_toy"].build(), images(2, 3, 6)())
    policy = load_policy("version: 1\nvalidate: warn\nrules:\n  - match: {g_coupled: true}\n"
                         "    use: {channel_directed: {}}\n")
    assert {n for n, f in s.items() if policy.rules[0].matches(f)} == {
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}
    off = load_policy("version: 1\nvalidate: warn\nrules:\n  - match: {g_coupled: false, kind: conv}\n"
                      "    use: {channel_directed: {}}\n")
    assert {n for n, f in s.items() if off.rules[0].matches(f)} == {"stem.weight"}
    with pytest.raises(gc.GeomCompileError, match="g_coupled: expected true or false"):
        load_policy("version: 1\nrules:\n  - match: {g_coupled: 1}\n    use: {channel_directed: {}}\n")


# ---- §15 test 11: analysis precision -------------------------------------------------------
def _double(inputs):
    return tuple(t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs)


def _output(model, inputs) -> list[torch.Tensor]:
    torch.manual_seed(0)                     # the same dropout masks / RReLU slopes on every forward
    with torch.no_grad():
        return [t for t in tree_leaves(model(*inputs)) if torch.is_tensor(t) and t.is_floating_point()]


def _rel_change(before, after) -> float:
    scale = max(t.abs().max().item() for t in before)
    return max((a - b).abs().max().item() for a, b in zip(after, before)) / scale


def _scale_link(params, w: str, nxt: str, bias: str | None, block, gen) -> None:
    """Hidden units between w and nxt: rows of w (and its bias) by c, nxt's input columns / channels
    (a flatten's channel-major column block) by 1/c, c in [e^-2, e^2]."""
    W, N = params[w], params[nxt]
    c = torch.empty(W.shape[0], dtype=W.dtype).uniform_(-2, 2, generator=gen).exp()
    W.mul_(c.view(-1, *[1] * (W.dim() - 1)))
    if bias is not None:
        params[bias].mul_(c)
    if block is not None or N.dim() == 2 and N.shape[1] != W.shape[0]:
        N.view(N.shape[0], W.shape[0], -1).div_(c.view(1, -1, 1))
    else:
        N.div_(c.view(1, -1, *[1] * (N.dim() - 2)))


def _precision_cases():
    """(name, factory, inputs, analysed with the inputs) for every model of tests/models.py."""
    cases = [(e.name, e.build, e.make_inputs, True) for e in ZOO]
    cases += [(e.name, e.build, e.make_inputs, e.shapes) for e in G_ENTRIES]
    cases += [(f.__name__, f, images(2, 3, 16), True) for f in (ResNet50Style, DenseNetStyle, FullyConvNet)]
    return cases


def _case_id(value):
    return value if isinstance(value, str) else "-"


@pytest.mark.parametrize("name, build, make_inputs, shapes", _precision_cases(), ids=_case_id)
def test_claimed_links_survive_random_rescaling(name, build, make_inputs, shapes):
    torch.manual_seed(0)
    model = build().double()         # in the mode it is built in: training, with frozen_bn_between's BN in eval
    inputs = _double(make_inputs())
    s = analyze(model, inputs if shapes else None)
    links = [(n, f.g_next, f.g_bias, s[f.g_next].g_block) for n, f in s.items() if f.g_next is not None]
    for n, f in s.items():           # no link across a normalisation
        if f.g_next is not None or f.g_prev is not None:
            assert f.scale_invariant is None, n
    before = _output(model, inputs)
    params = dict(model.named_parameters())
    worst = 0.0
    for trial in range(3):
        gen = torch.Generator().manual_seed(trial)
        with torch.no_grad():
            for link in links:
                _scale_link(params, *link, gen)
        worst = max(worst, _rel_change(before, _output(model, inputs)))
    assert worst < 1e-10, (name, links, worst)


@pytest.mark.parametrize("entry", [e for e in G_ENTRIES if e.refused], ids=lambda e: e.name)
def test_rescaling_across_a_refused_link_changes_the_output(entry):
    """The control: the same rescaling across a link the analysis refused (BN, GELU, fan-out, residual
    add, a feature-minor flatten) does change the output, so the precision test can fail."""
    torch.manual_seed(0)
    model = entry.build().double()
    inputs = _double(entry.make_inputs())
    s = analyze(model, inputs)
    w, nxt = entry.refused
    assert s[w].g_next != nxt
    before = _output(model, inputs)
    with torch.no_grad():
        _scale_link(dict(model.named_parameters()), w, nxt, s[w].g_bias, None, torch.Generator().manual_seed(0))
    assert _rel_change(before, _output(model, inputs)) > 1e-3


# ---- the report: plan.summary() and `geomcompile plan --chains` ------------------------------
def test_summary_lists_chains_and_groups_the_reasons():
    entry = ENTRIES["residual_toy"]
    plan = gc.plan(entry.build(), "plain", example_inputs=entry.make_inputs())
    assert "G-chains" not in plan.summary()                 # no rule uses gspace: not shown unless asked
    text = plan.summary(chains=True)
    assert "G-chains: 1 (" in text
    assert "\n  conv1 → conv2 (taps 9, 9); ends: `conv2` → `add`: residual add; the chain ends here\n" in text
    assert "  stem.weight: `stem` → `relu`: output used by 2 ops (`conv1`, `add`); the chain ends here" in text
    assert "  fc.weight: `fc` → output: model output" in text
    plan = gc.plan(ResNet50Style(), "resnet", example_inputs=images(2, 3, 16)())
    lines = plan.summary(chains=True).splitlines()
    assert "G-chains: none (analysis/coupling.py; gspace trains each as one unit)" in lines
    assert "not coupled: 54 conv/linear weight(s)" in lines
    grouped = [line for line in lines if "a normalisation absorbs" in line]
    assert grouped == ["  53 parameters (conv1.weight, layer1.0.conv1.weight, layer1.0.conv2.weight and 50 more): "
                       "a normalisation absorbs the unit's incoming scale, so in×c/out×1/c is not a symmetry; "
                       "psi applies to this weight"]


def test_cli_plan_chains(capsys):
    from geomcompile.cli import main
    assert main(["plan", "tests.models:GTinyCNN", "plain", "--input-shape", "2,1,6,6", "--chains"]) == 0
    out = capsys.readouterr().out
    assert "  conv1 → conv2 → fc (taps 9, 9, 4; flatten block (4, 4))" in out.splitlines()
    assert "not coupled" not in out                          # every conv / linear weight is in the chain
    assert main(["plan", "tests.models:GTinyCNN", "plain", "--chains"]) == 0   # no shapes: the flatten refuses
    out = capsys.readouterr().out
    assert "  conv1 → conv2 (taps 9, 9); ends: `conv2` → `flatten`: flatten needs example_inputs (the block " \
           "of features per channel comes from shapes)" in out.splitlines()
    assert "fc.weight: `fc` → output: model output" in out


@pytest.mark.parametrize("name, build, make_inputs, shapes", _precision_cases(), ids=_case_id)
def test_facts_are_consistent(name, build, make_inputs, shapes):
    """On every model: links are mutual, a weight with no next layer says why (and only then), the
    edge tensor W.reshape(out, in, T) exists with the widths of the link, biases point back."""
    s = analyze(build(), make_inputs() if shapes else None)
    if name == "data_dependent_mlp":
        assert s.capture_path == "run"
    for n, f in s.items():
        if f.kind in ("conv", "linear", "conv_transpose", "embedding", "other"):
            assert (f.g_next is None) == bool(f.g_reason), (n, f.g_reason)
        if f.kind == "conv_transpose":
            assert f.g_reason.startswith("conv_transpose")
        if f.g_next is not None:
            nxt = s[f.g_next]
            assert nxt.g_prev == n
            c, taps = (nxt.g_block[0], nxt.g_taps) if nxt.g_block else (nxt.shape[1], nxt.g_taps)
            assert c == f.shape[0] and c * taps * nxt.shape[0] == nxt.numel, (n, f.g_next)
        if f.g_taps is not None:
            assert 0 <= f.g_centre < f.g_taps
        if f.g_weight is not None:
            w = s[f.g_weight]
            assert w.g_bias == n and (w.g_next or w.g_prev)
        elif f.kind == "bias":
            assert not any(w.g_bias == n and (w.g_next or w.g_prev) for w in s.values())


def test_summary_shows_chains_by_default_when_a_rule_uses_gspace():
    from geomcompile.geometries import REGISTRY
    if "gspace" not in REGISTRY:
        pytest.skip("the gspace geometry (issue 10, part B) is not in this build")
    yaml = "version: 1\nrules:\n  - name: gsgd\n    match: {g_coupled: true}\n    use: {gspace: {skeleton_init: keep}}\n"
    plan = gc.plan(GTinyCNN(), yaml, example_inputs=g_tiny_cnn_inputs())
    assert "  conv1 → conv2 → fc (taps 9, 9, 4; flatten block (4, 4))" in plan.summary().splitlines()
    assert "G-chains" not in plan.summary(chains=False)

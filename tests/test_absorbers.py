"""Absorbers: the normalisations that absorb a scale-invariant weight, and matching their running
statistics after the weight's channels are rescaled, so the eval-mode function is unchanged.

The numerical checks run in float32 with every normalisation's eps set to 1e-10: with eps, the
eval output after a rescale by c is (z - mean)/sqrt(var + eps/c^2) instead of
(z - mean)/sqrt(var + eps), a relative change of about (1/c^2 - 1)*eps/(2*var), up to 1.2e-4/var
for c = 0.2 and the default eps = 1e-5. That is inherent to eps (training mode has it too, with
batch variances), not an error of the rescale, so it is made negligible here rather than
tolerated.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import geomcompile as gc
from geomcompile.analysis import Absorber
from geomcompile.errors import GeomCompileError
from geomcompile.runtime.absorb import rescale_problem, rescale_running_stats, rescaled_running_stats
from tests.models import (DENSENET, PASS_THROUGH, SHARED_NORM, ZOO, ConvBiasBN, InstanceNormConv1d,
                          ZooEntry, expected_facts, images)

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
EPS = 1e-10
RTOL = 1e-5
ENTRIES = {e.name: e for e in ZOO}


def analyze(entry: ZooEntry, with_inputs: bool = True):
    model = entry.build().train()
    return model, gc.analyze(model, example_inputs=entry.example_inputs if with_inputs else None)


def A(module, offset, channels, bias=None, running_stats=True) -> Absorber:
    return Absorber(module, offset, channels, bias, running_stats)


# --- facts ----------------------------------------------------------------------------------------
def test_resnet_convs_are_absorbed_by_their_own_bn():
    _, s = analyze(ENTRIES["small_resnet"], with_inputs=False)
    assert s["conv1.weight"].absorbers == (A("bn1", 0, 16),)
    assert s["layer1.1.conv2.weight"].absorbers == (A("layer1.1.bn2", 0, 32),)
    assert s["layer1.1.downsample.0.weight"].absorbers == (A("layer1.1.downsample.1", 0, 32),)
    for name, f in s.items():
        if f.kind == "conv":
            assert f.absorbers_reason == "" and len(f.absorbers) == 1, (name, f.absorbers_reason)


def test_densenet_channels_reach_several_bns_at_their_offsets_behind_cat():
    _, s = analyze(DENSENET)
    # x1 = cat([conv0, conv1]) (4 + 2 channels), x2 = cat([x1, conv2]) (6 + 2)
    assert s["conv0.weight"].absorbers == (A("bn1", 0, 4), A("bn2", 0, 4), A("bn3", 0, 4))
    assert s["conv1.weight"].absorbers == (A("bn2", 4, 2), A("bn3", 4, 2))
    assert s["conv2.weight"].absorbers == (A("bn3", 6, 2, bias="conv2.bias"),)


@pytest.mark.parametrize("name", ["conv_bias_bn", "conv_bias_maxpool_bn"])
def test_a_bias_reaching_the_bn_is_recorded(name):
    _, s = analyze(ENTRIES[name])
    assert s["conv.weight"].absorbers == (A("bn", 0, 4, bias="conv.bias"),)


def test_conv_transpose_bias_is_recorded():
    _, s = analyze(ENTRIES["convtranspose_decoder"])
    assert s["up1.weight"].absorbers == (A("bn1", 0, 4, bias="up1.bias"),)
    assert s["up2.weight"].absorbers == (A("bn2", 0, 4),)


def test_relu_and_maxpool_without_bias_before_the_bn():
    _, s = analyze(ENTRIES["conv_relu_maxpool_bn"])
    assert s["conv.weight"].absorbers == (A("bn", 0, 4),)


def test_groupnorm_and_layernorm_have_no_running_stats():
    _, s = analyze(ENTRIES["groupnorm"])
    assert s["conv1.weight"].absorbers == (A("gn1", 0, 8, running_stats=False),)
    assert s["conv2.weight"].absorbers == (A("gn2", 0, 8, running_stats=False),)
    _, s = analyze(ENTRIES["transformer_block"])
    assert s["embed.weight"].absorbers == (A("ln_in", 0, 8, running_stats=False),)


@pytest.mark.parametrize("track", [False, True])
def test_instance_norm_running_stats_follow_the_module(track):
    model = InstanceNormConv1d(track_running_stats=track).train()
    s = gc.analyze(model, example_inputs=(torch.randn(4, 3, 10),))
    assert s["conv1.weight"].absorbers == (A("inorm", 0, 4, bias="conv1.bias", running_stats=track),)


def test_cat_offsets_need_shapes():
    """Without shapes the channel counts before a layer in cat are unknown; first in the cat is fine."""
    _, with_inputs = analyze(DENSENET)
    _, s = analyze(DENSENET, with_inputs=False)
    assert s["conv0.weight"].absorbers == with_inputs["conv0.weight"].absorbers   # offset 0 everywhere
    for name in ("conv1.weight", "conv2.weight"):
        f = s[name]
        assert f.scale_invariant == with_inputs[name].scale_invariant   # the claim itself does not change
        assert f.absorbers is None
        assert "cat" in f.absorbers_reason and "example_inputs" in f.absorbers_reason, f.absorbers_reason
        assert rescale_problem(f) == f.absorbers_reason


def test_flatten_spreading_a_channel_over_features_is_not_recorded():
    _, s = analyze(PASS_THROUGH)
    f = s["conv4.weight"]
    assert f.scale_invariant is not None and f.absorbers is None
    assert "4 features" in f.absorbers_reason, f.absorbers_reason


def test_a_bn_shared_between_two_layers_is_not_recorded():
    """Its running statistics mix both calls: rescaling them for one layer would break the other."""
    _, s = analyze(SHARED_NORM)
    for name in ("conv_a.weight", "conv_b.weight"):
        f = s[name]
        assert f.scale_invariant is not None and f.absorbers is None
        assert "bn is called 2 times" in f.absorbers_reason, f.absorbers_reason


def test_a_bias_scaled_on_the_way_is_not_recorded():
    model = ConvBiasBN(maxpool=False, scale=0.5).train()
    f = gc.analyze(model, example_inputs=images()())["conv.weight"]
    assert f.scale_invariant is not None and f.absorbers is None
    assert "bias is multiplied" in f.absorbers_reason, f.absorbers_reason


class FunctionalBN(nn.Module):
    """F.conv2d -> F.batch_norm(training=True), with or without running-statistics buffers."""

    def __init__(self, running_stats: bool):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.b = nn.Parameter(torch.zeros(4))
        self.register_buffer("rm", torch.zeros(4) if running_stats else None)
        self.register_buffer("rv", torch.ones(4) if running_stats else None)

    def forward(self, x):
        z = F.batch_norm(F.conv2d(x, self.w, self.b, padding=1), self.rm, self.rv, training=True)
        return F.adaptive_avg_pool2d(F.relu(z), 1).flatten(1)


def test_functional_batch_norm():
    """Without buffers there is nothing to rescale; with buffers they belong to no norm module."""
    f = gc.analyze(FunctionalBN(False), example_inputs=images()())["w"]
    assert f.absorbers == (A("batch_norm", 0, 4, bias="b", running_stats=False),)
    f = gc.analyze(FunctionalBN(True), example_inputs=images()())["w"]
    assert f.scale_invariant is not None and f.absorbers is None
    assert "functional normalisation" in f.absorbers_reason, f.absorbers_reason


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_absorbers_are_known_or_explained(entry: ZooEntry):
    model, s = analyze(entry)
    for name, f in s.items():
        if f.scale_invariant is None:
            assert f.absorbers is None and f.absorbers_reason, name
            continue
        assert (f.absorbers is None) == bool(f.absorbers_reason), (name, f.absorbers, f.absorbers_reason)
        for a in f.absorbers or ():
            assert a.module in f.scale_invariant.normalizer, (name, a)
            assert a.channels == model.get_parameter(name).shape[f.out_dim], (name, a)
            norm = model.get_submodule(a.module)
            assert a.running_stats == (getattr(norm, "running_mean", None) is not None), (name, a)
            if a.running_stats:
                assert a.offset + a.channels <= norm.running_mean.numel(), (name, a)


# --- the pure formula -----------------------------------------------------------------------------
def test_formula_matches_the_statistics_of_the_rescaled_channels():
    """mean/var of c*u + b from those of u + b, as the batch statistics BN would average."""
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(64, 6, generator=gen, dtype=torch.float64) * 3 + 1
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    c = 0.2 + 4.8 * torch.rand(6, generator=gen, dtype=torch.float64)
    c[::2] = 1.0
    z, z_new = u + b, c * u + b
    mean, var = rescaled_running_stats(z.mean(0), z.var(0), c, b)
    torch.testing.assert_close(mean, z_new.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, z_new.var(0), rtol=1e-12, atol=1e-12)
    assert torch.equal(mean[::2], z.mean(0)[::2]) and torch.equal(var[::2], z.var(0)[::2])   # c == 1: exact


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_formula_computes_in_float32_and_keeps_the_dtype(dtype):
    mean, var = torch.randn(5).to(dtype), torch.rand(5).add(0.5).to(dtype)
    c, b = torch.rand(5) + 0.5, torch.randn(5)
    new_mean, new_var = rescaled_running_stats(mean, var, c, b)
    assert new_mean.dtype == new_var.dtype == dtype
    m, v = mean.float(), var.float()
    torch.testing.assert_close(new_mean, (c * (m - b) + b).to(dtype))
    torch.testing.assert_close(new_var, (c * c * v).to(dtype))


# --- the eval-mode function is preserved ----------------------------------------------------------
def _inputs(entry: ZooEntry, seed: int) -> tuple:
    torch.manual_seed(seed)
    return tuple(torch.randn_like(x) for x in entry.example_inputs)


def _warmed_up(entry: ZooEntry, momentum_none: bool = False, factory=None) -> nn.Module:
    """Training-mode passes on random data, so running statistics are far from their initial values."""
    torch.manual_seed(0)
    model = (factory or entry.factory)().train()
    for m in model.modules():
        if isinstance(m, _NORMS):
            m.eps = EPS
        if momentum_none and isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None   # cumulative average
    with torch.no_grad():
        for seed in range(1, 7):
            model(*_inputs(entry, seed))
    return model


def _rescale_weights(model: nn.Module, structure, rescale: bool, seed: int = 0) -> list[str]:
    """Scale some units of every weight with known absorbers by factors in [0.2, 5]."""
    gen = torch.Generator().manual_seed(seed)
    done = []
    for name, f in structure.items():
        if f.absorbers is None:
            continue
        weight = model.get_parameter(name)
        rows = weight.shape[f.out_dim]
        inv = f.scale_invariant
        if inv.unit == "tensor":
            factors = 0.2 + 4.8 * torch.rand(1, generator=gen)
            per_row = factors.expand(rows)
        else:
            size = inv.group_size if inv.unit == "group" else 1
            per_unit = 0.2 + 4.8 * torch.rand(rows // size, generator=gen)
            per_unit[torch.rand(rows // size, generator=gen) < 0.3] = 1.0   # some units unchanged
            factors = per_row = per_unit.repeat_interleave(size)
        shape = [1] * weight.dim()
        shape[f.out_dim] = rows
        with torch.no_grad():
            weight.mul_(per_row.view(shape))
        if rescale:
            rescale_running_stats(model, f, factors)
        done.append(name)
    return done


def _relative_change(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _has_invariant_weight(entry: ZooEntry) -> bool:
    return any(e.get("invariant") for e in expected_facts(entry, entry.build()).values())


# every zoo model with an invariant weight, except shared_norm, whose absorbers are unknown
CASES = {e.name: (e, {}) for e in ZOO if _has_invariant_weight(e) and e is not SHARED_NORM}
CASES["densenet_block_momentum_none"] = (DENSENET, {"momentum_none": True})
CASES["instancenorm_running_stats"] = (ENTRIES["instancenorm_conv1d"],
                                       {"factory": lambda: InstanceNormConv1d(track_running_stats=True)})


def _with_running_stats(structure, names) -> bool:
    return any(a.running_stats for n in names for a in structure[n].absorbers)


def _eval_change(case, rescale: bool):
    """Warm the case's model up, scale its weights' units (matching the running statistics or not),
    and return (structure, the weights scaled, the relative change of the eval-mode output)."""
    entry, options = CASES[case]
    model = _warmed_up(entry, **options)
    structure = gc.analyze(model, example_inputs=entry.example_inputs)
    eval_inputs = _inputs(entry, seed=99)
    model.eval()
    with torch.no_grad():
        ref = model(*eval_inputs)
        scaled = _rescale_weights(model, structure, rescale=rescale)
        out = model(*eval_inputs)
    return structure, scaled, _relative_change(ref, out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_eval_output_unchanged_after_rescale(case):
    _, scaled, change = _eval_change(case, rescale=True)
    assert scaled, f"{case}: no weight with known absorbers"
    assert change <= RTOL, f"{case}: eval output moved by {change:.3g} (relative) after rescaling {scaled}"


NEGATIVE = ["small_resnet", "densenet_block", "conv_bias_bn", "conv_bias_maxpool_bn", "conv_relu_maxpool_bn",
            "vgg11_bn", "mlp_bias", "convtranspose_decoder", "densenet_block_momentum_none",
            "instancenorm_running_stats"]


@pytest.mark.parametrize("case", NEGATIVE)
def test_without_the_rescale_the_eval_output_moves(case):
    """Negative control: the same scaling without matching the running statistics changes the output."""
    structure, scaled, change = _eval_change(case, rescale=False)
    assert _with_running_stats(structure, scaled), case
    assert change > 1e-2, f"{case}: eval output moved by only {change:.3g} without the rescale"


def test_rescale_touches_only_the_layers_channels():
    model = _warmed_up(DENSENET)
    f = gc.analyze(model, example_inputs=DENSENET.example_inputs)["conv2.weight"]   # bn3 channels 6..7
    before = {k: v.clone() for k, v in model.bn3.state_dict().items()}
    rescale_running_stats(model, f, torch.tensor([2.0, 0.5]))
    after = model.bn3.state_dict()
    for key in ("running_mean", "running_var"):
        assert torch.equal(after[key][:6], before[key][:6]) and not torch.equal(after[key][6:], before[key][6:])
    assert torch.equal(after["num_batches_tracked"], before["num_batches_tracked"])
    b = model.conv2.bias.detach()
    c = torch.tensor([2.0, 0.5])
    torch.testing.assert_close(after["running_mean"][6:], c * (before["running_mean"][6:] - b) + b)
    torch.testing.assert_close(after["running_var"][6:], c * c * before["running_var"][6:])


# --- errors ---------------------------------------------------------------------------------------
def test_unknown_absorbers_raise_with_the_reason():
    model, s = analyze(DENSENET, with_inputs=False)
    with pytest.raises(GeomCompileError, match="conv1.weight.*example_inputs"):
        rescale_running_stats(model, s["conv1.weight"], torch.ones(2))
    with pytest.raises(GeomCompileError, match="not scale-invariant"):
        rescale_running_stats(model, s["fc.weight"], torch.ones(3))


def test_wrong_number_of_factors_says_how_many():
    model, s = analyze(DENSENET)
    with pytest.raises(GeomCompileError, match="3 entries.*2 output channels"):
        rescale_running_stats(model, s["conv1.weight"], torch.ones(3))


def test_no_running_stats_is_a_no_op():
    model, s = analyze(ENTRIES["groupnorm"])
    assert rescale_problem(s["conv1.weight"]) is None
    before = copy.deepcopy(model.state_dict())
    rescale_running_stats(model, s["conv1.weight"], torch.full((8,), 3.0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- torch.compile --------------------------------------------------------------------------------
def test_under_torch_compile_fullgraph():
    """Tensor-only, so it traces without graph breaks; about 10 s to compile on 2 CPU cores."""
    model = _warmed_up(ENTRIES["conv_bias_bn"])
    f = gc.analyze(model, example_inputs=ENTRIES["conv_bias_bn"].example_inputs)["conv.weight"]
    eager = copy.deepcopy(model)
    factors = torch.tensor([0.2, 1.0, 3.0, 5.0])
    rescale_running_stats(eager, f, factors)
    compiled = torch.compile(lambda c: rescale_running_stats(model, f, c), fullgraph=True)
    compiled(factors)
    torch.testing.assert_close(model.bn.running_mean, eager.bn.running_mean)
    torch.testing.assert_close(model.bn.running_var, eager.bn.running_var)

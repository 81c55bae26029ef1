"""Issue 17: the analysis and the shipped policies on patterns of real model code.

Weights read for their attributes, weights handed to functions the analysis does not look inside,
a conv run at several input sizes (spectral's input size), models in eval mode, and the fgsgd
policy on a network without normalisation. The toy models are in tests/models.py (the zoo runs
its generic checks on them as well)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import geomcompile as gc
from geomcompile.geometries.spectral import conv_matrix, conv_spec
from tests.models import (CONV_RELU_BN, PLAIN_VGG, SHARED_HEAD_FPN, WEIGHT_ATTRIBUTE_READS, WRAPPED_ATTENTION,
                          WeightAttributeReads)


# --- 1. attribute reads of a weight are not uses -------------------------------------------------
class UntraceableAttributeReads(WeightAttributeReads):
    """The same model, but fx cannot trace it (a Python bool of a tensor): captured by running it."""

    def forward(self, x):
        if bool(x.abs().sum() >= 0):
            return super().forward(x)
        return x


@pytest.mark.parametrize("model_cls, path", [(WeightAttributeReads, "fx"), (UntraceableAttributeReads, "run")])
def test_dtype_and_device_reads_of_a_weight_keep_its_layout(model_cls, path):
    torch.manual_seed(0)
    model = model_cls().train()
    structure = gc.analyze(model, example_inputs=WEIGHT_ATTRIBUTE_READS.example_inputs)
    assert structure.capture_path == path
    conv, proj = structure["conv.weight"], structure["proj.weight"]
    assert (conv.kind, conv.out_dim, conv.uses) == ("conv", 0, 1), conv.notes
    assert (proj.kind, proj.out_dim, proj.uses) == ("linear", 0, 1), proj.notes
    assert conv.scale_invariant is not None and conv.scale_invariant.normalizer == "bn", conv.invariance_reason
    assert proj.scale_invariant is not None and proj.scale_invariant.normalizer == "bn1d", proj.invariance_reason


# --- 2. weights consumed inside wrapped functions or unknown leaf modules --------------------------
def test_weights_inside_a_wrapped_function_or_leaf_module_are_named_in_the_plan():
    model = WRAPPED_ATTENTION.build().train()
    inputs = WRAPPED_ATTENTION.example_inputs
    structure = gc.analyze(model, example_inputs=inputs)
    assert structure.capture_path == "fx"
    plan = gc.plan(model, "plain", example_inputs=inputs)
    notes = "\n".join(plan.notes)
    for name in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
        assert structure[name].kind == "other"
        line = next((n for n in plan.notes if n.startswith(f"{name}: ")), None)
        assert line is not None, f"no plan note for {name}:\n{notes}"
        assert "window_attention" in line and "layout not proven" in line, line
    for name in ("mha.in_proj_weight", "mha.out_proj.weight"):
        line = next((n for n in plan.notes if n.startswith(f"{name}: ")), None)
        assert line is not None and "MultiheadAttention" in line, f"{name}:\n{notes}"
    assert not any(n.startswith("head.weight") for n in plan.notes), "a proven linear needs no note"


# --- 3. a conv run at several input sizes (spectral's input size) ---------------------------------
def _spectral(input_size) -> dict:
    return {"version": 1, "rules": [{"name": "head", "match": {"param": "head.weight"},
                                     "use": {"spectral": {"input_size": input_size}}}]}


def test_layer_run_at_several_sizes_records_every_size():
    model = SHARED_HEAD_FPN.build()
    facts = gc.analyze(model, example_inputs=SHARED_HEAD_FPN.example_inputs)["head.weight"]
    assert facts.input_shape is None                         # no single shape
    assert facts.input_shapes == ((4, 4, 8, 8), (4, 4, 4, 4))


def test_spectral_auto_refuses_several_sizes_and_names_the_choices():
    model = SHARED_HEAD_FPN.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(gc.GeomCompileError) as info:
        gc.apply(model, _spectral("auto"), opt, example_inputs=SHARED_HEAD_FPN.example_inputs)
    message = str(info.value)
    assert "2 input sizes (8x8, 4x4)" in message and "input_size: largest" in message, message


@pytest.mark.parametrize("option, size, how", [("largest", (8, 8), "largest of the 2 sizes it runs at: 8x8, 4x4"),
                                               ([6, 6], (6, 6), "given")])
def test_spectral_input_size_choice_is_used_and_said_in_the_plan(option, size, how):
    model = SHARED_HEAD_FPN.build()
    x = SHARED_HEAD_FPN.example_inputs[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = gc.apply(model, _spectral(option), opt, example_inputs=(x,))
    geometry = plan.assignments["head.weight"]["penalty"]
    assert geometry.spec(plan.structure["head.weight"]).input_size == size
    assert f"spectral head.weight: operator on inputs of size {'x'.join(map(str, size))} ({how})" in plan.notes
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_largest_size_bounds_sigma_max_of_the_smaller_ones():
    """The documented reason for `largest`: with zero padding, M at a smaller size is a block of M
    at the larger one, so σ_max(M_small) <= σ_max(M_large)."""
    w = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = {n: torch.linalg.matrix_norm(conv_matrix(w, conv_spec(w.shape, [n, n], 1, 1)), ord=2).item()
             for n in (3, 4, 6)}
    assert sigma[3] <= sigma[4] + 1e-12 and sigma[4] <= sigma[6] + 1e-12, sigma


# --- 4. models in eval mode -------------------------------------------------------------------
def test_eval_mode_model_is_said_to_be_analysed_in_training_mode():
    model = CONV_RELU_BN.build().eval()
    structure = gc.analyze(model, example_inputs=CONV_RELU_BN.example_inputs)
    assert not model.training and not model.bn.training, "analyze must leave the mode as it was"
    note = next((n for n in structure.notes if "eval mode" in n), None)
    assert note is not None, structure.notes
    assert "analysed as in training mode" in note and "bn" in note and "frozen" in note, note
    assert structure["conv.weight"].scale_invariant is not None       # the training-mode answer
    plan = gc.plan(model, "resnet", example_inputs=CONV_RELU_BN.example_inputs)
    assert note in plan.notes


def test_frozen_batchnorm_in_a_training_model_absorbs_nothing():
    model = CONV_RELU_BN.build().train()
    model.bn.eval()                                     # frozen statistics, as in detection fine-tuning
    structure = gc.analyze(model, example_inputs=CONV_RELU_BN.example_inputs)
    facts = structure["conv.weight"]
    assert facts.scale_invariant is None
    assert "bn is in eval mode" in facts.invariance_reason, facts.invariance_reason
    assert any("bn in eval mode while the model is in training mode" in n for n in structure.notes), structure.notes
    # numerically: with running statistics, scaling a channel changes the output
    x = CONV_RELU_BN.example_inputs[0]
    with torch.no_grad():
        before = model(x)
        model.conv.weight[0].mul_(3.0)
        assert not torch.allclose(before, model(x))


# --- 5. fgsgd on a network without normalisation --------------------------------------------------
def _fit_plain_vgg(make_optimizer, policy="fgsgd", steps=20):
    torch.manual_seed(0)
    model = PLAIN_VGG.build()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    opt = make_optimizer(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = gc.apply(model, policy, opt, example_inputs=(x[:2],))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return plan, losses


@pytest.mark.parametrize("make_optimizer", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                            lambda p: torch.optim.AdamW(p, lr=1e-3)], ids=["sgd", "adamw"])
def test_fgsgd_stays_finite_on_a_plain_vgg(make_optimizer):
    plan, losses = _fit_plain_vgg(make_optimizer)
    convs = [n for n, f in plan.structure.items() if f.kind == "conv"]
    assert convs and all("manifold" in plan.assignments[n] for n in convs), "fgsgd must still apply pom"
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[0] < 3.0, f"the install-time retraction must keep the init scale (loss {losses[0]:.3g})"
    assert min(losses) < losses[0], losses


def test_fgsgd_radius_init_keeps_each_layers_scale():
    torch.manual_seed(0)
    model = PLAIN_VGG.build()
    rms = {n: p.detach().reshape(p.shape[0] * p.shape[1], -1).norm(dim=1).square().mean().sqrt().item()
           for n, p in model.named_parameters() if p.dim() == 4}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = gc.apply(model, "fgsgd", opt, example_inputs=(torch.randn(2, 3, 16, 16),))
    for name, p in model.named_parameters():
        if name in rms:
            kernel_norms = p.detach().reshape(p.shape[0] * p.shape[1], -1).norm(dim=1)
            assert torch.allclose(kernel_norms, torch.full_like(kernel_norms, rms[name]), rtol=1e-5), name
            assert any(n.startswith(f"pom {name}:") and "init: the RMS component norm" in n for n in plan.notes)


def test_pom_unit_radius_on_unnormalised_convs_warns_with_the_reason():
    model = PLAIN_VGG.build()
    policy = {"version": 1, "rules": [{"name": "k", "match": {"kind": "conv"}, "use": {"pom": {"radius": "unit"}}}]}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(gc.GeomCompileWarning, match=r"features\.3\.weight: radius unit scales .*`radius: init`"):
        gc.apply(model, policy, opt, example_inputs=(torch.randn(2, 3, 16, 16),))

"""The three layer patterns of issue 16 outside the zoo: the shipped transformers Conv1D, the run
capture path, and weight standardisations the pass must refuse (with no writes to the model)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn

import geomcompile as gc
from tests.models import NFNET, TRANSPOSED_LINEAR, WSConv2d, images


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config), {"input_ids": torch.randint(0, 40, (2, 8))}


def test_gpt2_conv1d_is_a_transposed_linear_and_the_policies_reach_it():
    model, batch = _gpt2()
    structure = gc.analyze(model, example_inputs=batch)
    conv1d = [n for n, m in model.named_modules() if isinstance(m, transformers.pytorch_utils.Conv1D)]
    assert len(conv1d) == 4
    for name in conv1d:
        w, b = structure[f"{name}.weight"], structure[f"{name}.bias"]
        assert (w.kind, w.out_dim) == ("linear", 1), (name, w.kind, w.out_dim)
        assert (b.kind, b.out_dim) == ("bias", 0), (name, b.kind)
        assert w.scale_invariant is None   # residual adds and GELU: nothing absorbs a GPT-2 layer
    plan = gc.plan(model, "plain", example_inputs=batch)
    assert all(plan.assignments.get(f"{n}.weight") for n in conv1d), plan.summary()


class DataDependent(nn.Module):
    """fx cannot trace a branch on a tensor's value, so gc.analyze captures by running the model."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.sum() > -1e9:
            return self.inner(x)
        return self.inner(-x)


def test_run_capture_finds_the_same_facts():
    """Run-based capture (Tensor methods as call_function targets) agrees with fx on the new patterns."""
    for entry in (NFNET, TRANSPOSED_LINEAR):
        traced = gc.analyze(entry.build(), example_inputs=entry.example_inputs)
        ran = gc.analyze(DataDependent(entry.build()), example_inputs=entry.example_inputs)
        assert traced.capture_path == "fx" and ran.capture_path == "run"
        for name, want in traced.items():
            got = ran[f"inner.{name}"]
            assert (got.kind, got.out_dim) == (want.kind, want.out_dim), (entry.name, name)
            assert (got.scale_invariant is None) == (want.scale_invariant is None), \
                (entry.name, name, got.invariance_reason)
            if want.scale_invariant is not None:
                assert got.scale_invariant.unit == want.scale_invariant.unit, (entry.name, name)


class RunningStatsStd(nn.Conv2d):
    """batch_norm of the weight with running buffers: evaluating it would write to them."""

    def __init__(self):
        super().__init__(3, 4, 3, padding=1, bias=False)
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, 4, -1), self.rm, self.rv, training=True).reshape_as(self.weight)
        return F.conv2d(x, w, None, padding=1)


class LargeEpsStd(nn.Conv2d):
    """(w - mean) / (std + 1): the 1 is no eps, the scale survives."""

    def __init__(self):
        super().__init__(3, 4, 3, padding=1, bias=False)

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1.0)
        return F.conv2d(x, w, None, padding=1)


def test_standardisations_it_cannot_show_are_refused():
    for model in (RunningStatsStd(), LargeEpsStd()):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        f = gc.analyze(model, example_inputs=images()())["weight"]
        assert f.scale_invariant is None, (type(model).__name__, f)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_wrong_dims_standardisation_is_not_claimed_even_before_a_batchnorm():
    """Before this pass a conv subclass was a leaf, and a BN after it was taken to absorb it."""
    model = nn.Sequential(WSConv2d(3, 4, 1, "wrong_dims"), nn.BatchNorm2d(4))
    assert gc.analyze(model, example_inputs=images()())["0.weight"].scale_invariant is None


class AddmmOfData(nn.Module):
    """torch.addmm(M, x, W) with M a tensor of activations: not a per-channel bias, so a BN after it
    does not remove it, and W is no linear layer the analysis can vouch for."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(torch.addmm(x * x, x, self.w))


def test_addmm_whose_first_argument_is_data_is_not_a_layer():
    f = gc.analyze(AddmmOfData(), example_inputs=(torch.randn(6, 8),))["w"]
    assert f.scale_invariant is None and f.kind == "other", (f.kind, f.scale_invariant)

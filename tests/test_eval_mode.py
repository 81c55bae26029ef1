"""psi's renormalisation keeps the eval-mode function: the running statistics of the normalisations
that absorb a unit follow its rescale. Two runs from the same start, one renormalising (max_norm 2)
and one never (max_norm 1e9), are scale-equivalent (Theorem 1 of seed 003 under SGD-M, with the
momentum rescaled): their eval-mode outputs must agree."""
import copy

import pytest
import torch
from torch import nn

import geomcompile as gc

from .models import ConvBiasBN, DenseBlockNet
from .test_runtime import SmallNet


def _policy(max_norm):
    return {"version": 1, "rules": [{"name": "psi", "match": {"scale_invariant": True},
                                     "use": {"psi": {"max_norm": max_norm}}}]}


def _run(model, max_norm, backend, steps=4, rescale_stats=True):
    torch.manual_seed(1)
    x0 = torch.randn(8, 3, 8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plan = gc.apply(model, _policy(max_norm), opt, example_inputs=(x0,), backend=backend)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
        opt.zero_grad()
        out = model(x)
        nn.functional.cross_entropy(out[:, :3], y).backward()
        opt.step()
    return plan


def _scaled_start(cls, seed=0):
    torch.manual_seed(seed)
    model = cls()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(10.0)           # every unit starts far above max_norm = 2
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 1e-12                 # eps is the one term a rescale cannot preserve exactly
    return model


@pytest.mark.parametrize("backend", ["eager", "triton", "compile"])
@pytest.mark.parametrize("make", [SmallNet, lambda: ConvBiasBN(False), lambda: ConvBiasBN(True), DenseBlockNet],
                         ids=["resnet_style", "conv_bias_bn", "conv_bias_maxpool_bn", "densenet_style"])
def test_eval_output_unchanged_by_renormalisation(make, backend):
    renorm, plain = _scaled_start(make), None
    plain = copy.deepcopy(renorm)
    plan = _run(renorm, 2.0, backend)
    _run(plain, 1e9, backend)
    assert sum(v["psi"]["renormalised_units"] for v in plan.diagnostics().values()) > 0
    x = torch.randn(16, 3, 8, 8)
    renorm.eval(), plain.eval()
    got, want = renorm(x), plain(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_without_the_running_stats_rescale_eval_output_moves():
    """The negative control: the same renormalisation with the running statistics left alone."""
    renorm = _scaled_start(SmallNet)
    plain = copy.deepcopy(renorm)
    _run(renorm, 2.0, "eager")
    _run(plain, 1e9, "eager")
    stats = {n: b.clone() for n, b in plain.named_buffers()}
    renorm_stats = dict(renorm.named_buffers())
    x = torch.randn(16, 3, 8, 8)
    renorm.eval(), plain.eval()
    with torch.no_grad():
        for n, b in renorm_stats.items():
            if n.endswith(("running_mean", "running_var")):
                b.copy_(stats[n])             # undo what the runtime did
    assert (renorm(x) - plain(x)).abs().max() > 0.1


def test_units_whose_absorbers_are_unknown_are_not_renormalised_and_said_so():
    """Without example_inputs the DenseNet block's cat offsets cannot be proven: psi leaves those units
    alone (eval mode would change otherwise) and the plan says why."""
    model = _scaled_start(DenseBlockNet)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plan = gc.apply(model, _policy(2.0), opt)
    refused = [n for n in plan.notes if n.startswith("psi does not renormalise")]
    assert refused, plan.notes
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    names = [n.split(":")[0].removeprefix("psi does not renormalise ") for n in refused]
    for n in names:     # stepped (no renormalisation): norms stay far above max_norm
        assert model.get_parameter(n).flatten(1).norm(dim=1).min() > 2.0, n

"""psi (seed 003): Riemannian gradient, renormalisation, and Theorem 1 (scale-equivalent runs stay equivalent)."""
import copy

import pytest
import torch
from torch import nn

import geomcompile as gc

PSI_POLICY = {"version": 1, "rules": [{"name": "psi", "match": {"scale_invariant": True}, "use": {"psi": {}}}]}


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_psi_grad_scales_each_row_by_its_squared_norm():
    w = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    g = torch.randn_like(w)
    got = gc.functional.psi_grad(w, g, unit="row")
    expected = g * (w.flatten(1).norm(dim=1) ** 2)[:, None, None, None]
    torch.testing.assert_close(got, expected)


def test_psi_grad_units_group_tensor_and_conv_transpose_dim():
    w = torch.randn(6, 4, dtype=torch.float64)
    g = torch.randn_like(w)
    grouped = gc.functional.psi_grad(w, g, unit="group", group_size=3)
    norms = w.reshape(2, 12).norm(dim=1) ** 2
    torch.testing.assert_close(grouped, g * norms.repeat_interleave(3)[:, None])
    torch.testing.assert_close(gc.functional.psi_grad(w, g, unit="tensor"), g * w.norm() ** 2)
    wt = torch.randn(3, 5, 2, dtype=torch.float64)  # conv-transpose layout, out_dim = 1
    gt = torch.randn_like(wt)
    per_out = wt.transpose(0, 1).reshape(5, -1).norm(dim=1) ** 2
    torch.testing.assert_close(gc.functional.psi_grad(wt, gt, unit="row", dim=1), gt * per_out[None, :, None])


def test_psi_zero_rows_give_zero_not_nan_and_inputs_untouched():
    w = torch.zeros(3, 4)
    g = torch.randn(3, 4)
    g0 = g.clone()
    out = gc.functional.psi_grad(w, g)
    assert torch.equal(out, torch.zeros_like(g)) and torch.equal(g, g0)
    assert torch.equal(gc.functional.psi_renorm_factors(w, 1.0), torch.ones(3, 1))


def test_psi_bf16_computes_in_fp32():
    w = torch.randn(4, 8).bfloat16()
    g = torch.randn(4, 8).bfloat16()
    out = gc.functional.psi_grad(w, g)
    ref = gc.functional.psi_grad(w.float(), g.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.bfloat16().float())


def _run_sgdm(model, momentum_bufs, steps, with_psi, data, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    # seed the momentum buffers: one SGD step on zero grads with lr 0 creates them, then overwrite
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = momentum_bufs[p_name(model, p)].clone()
    plan = gc.apply(model, PSI_POLICY, opt) if with_psi else None
    for x, y in data[:steps]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return plan


def p_name(model, p):
    return next(n for n, q in model.named_parameters() if q is p)


@pytest.mark.parametrize("with_psi", [True, False])
def test_theorem1_scale_equivalent_starts_stay_equivalent(with_psi):
    torch.manual_seed(0)
    model = BNNet().double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-12
    data = [(torch.randn(16, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(20)]
    bufs = {n: 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
    scaled = copy.deepcopy(model)
    factors = {}
    with torch.no_grad():
        for name in ("conv1.weight", "conv2.weight"):
            w = dict(scaled.named_parameters())[name]
            a = torch.empty(w.shape[0], 1, 1, 1, dtype=w.dtype).uniform_(0.3, 3.0)
            factors[name] = a
            w.mul_(a)
    bufs_scaled = {n: b * factors[n] if n in factors else b.clone() for n, b in bufs.items()}
    _run_sgdm(model, bufs, 20, with_psi, data)
    _run_sgdm(scaled, bufs_scaled, 20, with_psi, data)
    params, params_s = dict(model.named_parameters()), dict(scaled.named_parameters())
    for name, a in factors.items():
        diff = ((params_s[name] - a * params[name]).abs().max() / params_s[name].abs().max()).item()
        if with_psi:
            assert diff < 1e-8, f"{name}: PSI-SGDM runs drifted apart ({diff:.2e})"
        else:
            assert diff > 1e-4, f"{name}: plain SGD unexpectedly kept the runs equivalent ({diff:.2e})"


def _one_psi_step(model, max_norm, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    policy = {"version": 1, "rules": [{"name": "psi", "match": {"scale_invariant": True},
                                        "use": {"psi": {"max_norm": max_norm}}}]}
    plan = gc.apply(model, policy, opt)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return opt, plan


def test_renormalisation_keeps_function_and_scales_momentum():
    torch.manual_seed(1)
    model = BNNet().double()
    with torch.no_grad():
        model.conv1.weight.mul_(100.0)  # every row's norm is far above max_norm = 10
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    opt, plan = _one_psi_step(model, 10.0, x, y)
    opt_ref, _ = _one_psi_step(ref, 1e30, x, y)      # same step, never renormalised
    w, w_ref = model.conv1.weight, ref.conv1.weight
    row_norm = w_ref.flatten(1).norm(dim=1)[:, None, None, None]
    assert (row_norm > 10).all()
    torch.testing.assert_close(w, w_ref / row_norm)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], opt_ref.state[w_ref]["momentum_buffer"] / row_norm)
    torch.testing.assert_close(w.flatten(1).norm(dim=1), torch.ones(6, dtype=torch.float64))
    torch.manual_seed(5)
    with torch.no_grad():                            # training-mode function unchanged
        torch.testing.assert_close(model(x), ref(x))
    assert plan.diagnostics()["conv1.weight"]["psi"]["renormalised_units"] == 6.0


def test_psi_on_non_invariant_weight_is_a_policy_error_quoting_the_analysis():
    model = BNNet()
    bad = {"version": 1, "rules": [{"name": "all", "match": {"kind": "linear"}, "use": {"psi": {}}}]}
    with pytest.raises(gc.GeomCompileError, match=r"fc\.weight.*reaches the model output"):
        gc.plan(model, bad)


def test_weight_decay_warning_for_psi():
    model = BNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=5e-4)
    with pytest.warns(gc.GeomCompileWarning, match="weight_decay"):
        plan = gc.apply(model, PSI_POLICY, opt)
    assert "weight_decay" in plan.summary()

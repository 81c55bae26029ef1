"""Non-finite gradients (issue 15, R1, R2 and the NaN/Inf injection matrix).

A NaN or Inf in a gradient must do what it does in plain torch, no more: the step makes exactly
those entries of the weight (and of the base optimizer's state) non-finite, nothing raises, nothing
is masked, and no geometry state is poisoned, so once the user restores finite weights the next step
is the one a run that never saw the bad value takes.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import geomcompile as gc
from geomcompile.functional import pom_retract

from .registry import CASES, matrix
from .test_triton_backend import INPUTS, OPTIMIZERS, Net, _groups

POSITIONS = ("first", "middle", "last")
VALUES = {"nan": float("nan"), "inf": float("inf")}
BASE = ("sgd", "adam")                       # torch's SGD and Adam: both fused by the Triton kernels


def _model(case_name):
    torch.manual_seed(0)
    make = CASES[case_name].model
    model = make() if make is not None else Net()
    with torch.no_grad():
        model.conv1.weight.mul_(5.0)         # psi renormalises conv1's rows at every step
    return model


def _policy(case_name):
    """The case's policy; spectral's first solve limited to 3 iterations (its default 100 take ~20 s on a
    loaded 2-core machine, and convergence is not what these tests are about)."""
    policy = CASES[case_name].policy()
    policy["rules"] = [{**rule, "use": {g: ({**o, "init_iters": 3} if g == "spectral" else o)
                                        for g, o in rule["use"].items()}} for rule in policy["rules"]]
    return policy


def _install(case_name, backend, base, model):
    opt = OPTIMIZERS[base](*_groups(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        plan = gc.apply(model, _policy(case_name), opt, example_inputs=(INPUTS[0],), backend=backend)
    assert plan.backend_name == backend
    return opt, plan


def _set_grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 0.5


def _index(n, where):
    return {"first": 0, "middle": n // 2, "last": n - 1}[where]


def _snapshot(model, opt):
    weights = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
             for p in model.parameters() if p in opt.state}
    return weights, state


def _restore(model, opt, snapshot):
    """Finite weights and base-optimizer state back (the geometry state is left as the step made it)."""
    weights, state = snapshot
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
        for p in model.parameters():
            if id(p) not in state:
                opt.state.pop(p, None)          # no state before the step: none after the restore
            for key, value in state.get(id(p), {}).items():
                opt.state[p][key].copy_(value)


def _nonfinite(model, opt):
    """Per parameter: the non-finite mask of the weight and of every base-optimizer state tensor."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = ~torch.isfinite(p.detach())
        for key, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                out[f"{name}.{key}"] = ~torch.isfinite(v)
    return out


@pytest.mark.parametrize("base", BASE)
@pytest.mark.parametrize("case_name,backend", matrix())
def test_nonfinite_gradient_propagates_as_in_plain_torch_and_poisons_nothing(case_name, backend, base):
    """For every geometry x backend: NaN/Inf at the first, middle and last element of a gradient make
    the same entries non-finite as plain torch's optimizer (weights and optimizer state); after
    finite weights are restored the next step is finite and equals that of a twin run whose injected
    entry was 0 (so no geometry state was poisoned). Before: channel_directed spread the NaN over
    its column (6 non-finite weights for 1), pom over the component's group (27 for 1), gspace
    dropped the chain's step (0 for 1)."""
    model, twin = _model(case_name), _model(case_name)
    opt, plan = _install(case_name, backend, base, model)
    twin_opt, _ = _install(case_name, backend, base, twin)
    target = next(n for n, p in model.named_parameters() if n in plan.assignments and p.numel())
    for step, (label, where) in enumerate((v, w) for v in VALUES for w in POSITIONS):
        before, twin_before = _snapshot(model, opt), _snapshot(twin, twin_opt)
        plain, plain_opt = _plain_copy(model, opt, base)     # torch alone, from the same weights and state
        for m in (model, twin, plain):
            _set_grads(m, 10 + step)
        for m, v in ((model, VALUES[label]), (plain, VALUES[label]), (twin, 0.0)):
            g = dict(m.named_parameters())[target].grad.view(-1)
            g[_index(g.numel(), where)] = v
        for o in (opt, twin_opt, plain_opt):
            o.step()
        got, want = _nonfinite(model, opt), _nonfinite(plain, plain_opt)
        assert sorted(got) == sorted(want)
        for key, mask in want.items():
            assert torch.equal(got[key], mask), \
                (f"{label} at the {where} element of {target}: non-finite entries of {key} differ from plain "
                 f"torch ({int(got[key].sum())} vs {int(mask.sum())})")
        assert int(sum(m.sum() for m in want.values())) >= 1
        # finite weights and optimizer state back on both runs, then one healthy step each
        _restore(model, opt, before)
        _restore(twin, twin_opt, twin_before)
        _set_grads(model, 100 + step)
        _set_grads(twin, 100 + step)
        opt.step()
        twin_opt.step()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.isfinite(p).all(), f"{label} at {where}: {name} not finite after the healthy step"
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7,
                                       msg=lambda m: f"{label} at {where}: {name} after the healthy step: {m}")


def _plain_copy(model, opt, base):
    """A model and a plain torch optimizer with the same weights and base-optimizer state."""
    plain = _model_like(model)
    plain_opt = OPTIMIZERS[base](*_groups(plain))
    for p, q in zip(model.parameters(), plain.parameters()):
        if p in opt.state:
            plain_opt.state[q] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
    return plain, plain_opt


def _model_like(model):
    plain = copy.deepcopy(model)           # deepcopy keeps no hook of the plan (they live on the optimizer)
    for p in plain.parameters():
        p.grad = None
    return plain


# ---- R1: pom's Stiefel retraction on a non-finite gradient -----------------------------------------
def _stiefel_policy(method):
    return {"version": 1, "rules": [{"name": "convs", "match": {"kind": "conv", "depthwise": False},
                                     "use": {"pom": {"manifold": "stiefel", "component": "kernel",
                                                     "stiefel_retraction": method}}}]}


@pytest.mark.parametrize("backend", ["eager", "compile", "triton"])
@pytest.mark.parametrize("method", ["polar", "qr"])
def test_pom_stiefel_retraction_survives_a_nonfinite_gradient(method, backend):
    """Before: `linalg.svd ... failed to converge because the input matrix contained non-finite values`,
    raised in the post-step hook after the base optimizer had stepped. Now the component with the NaN
    keeps it (one non-finite weight, as plain SGD), every other component is retracted, the step is
    counted in diagnostics, and after restoring finite weights the next step lands on the manifold."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    plan = gc.apply(model, _stiefel_policy(method), opt, example_inputs=(INPUTS[0],), backend=backend)
    good = model.conv1.weight.detach().clone()
    _set_grads(model, 1)
    model.conv1.weight.grad.view(-1)[4] = float("nan")
    opt.step()
    w = model.conv1.weight.detach()
    assert int((~torch.isfinite(w)).sum()) == 1 and not torch.isfinite(w.view(-1)[4])
    components = w.reshape(-1, 3, 3)
    finite = torch.isfinite(components).flatten(1).all(1)
    gram = components[finite].mT @ components[finite]
    torch.testing.assert_close(gram, torch.eye(3).expand_as(gram), atol=1e-5, rtol=0)
    assert plan.diagnostics()["conv1.weight"]["pom"]["nonfinite_steps"] == 1
    with torch.no_grad():
        model.conv1.weight.copy_(good)
    _set_grads(model, 2)
    opt.step()
    components = model.conv1.weight.detach().reshape(-1, 3, 3)
    torch.testing.assert_close(components.mT @ components, torch.eye(3).expand_as(components), atol=1e-5, rtol=0)
    assert plan.diagnostics()["conv1.weight"]["pom"]["nonfinite_steps"] == 1


@pytest.mark.parametrize("manifold,method", [("sphere", "polar"), ("oblique", "polar"), ("stiefel", "polar"),
                                             ("stiefel", "qr")])
def test_functional_pom_retract_leaves_nonfinite_components_as_they_are(manifold, method):
    x = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(0))
    x[1, 0, 2] = float("nan")
    x[3, 2, 2] = float("inf")
    y = pom_retract(x, manifold, 2.0, method)
    assert torch.equal(y[1].isnan(), x[1].isnan()) and torch.equal(y[1][~x[1].isnan()], x[1][~x[1].isnan()])
    assert torch.equal(y[3], x[3])
    for i in (0, 2):
        torch.testing.assert_close(y[i], pom_retract(x[i:i + 1], manifold, 2.0, method)[0])
        assert torch.isfinite(y[i]).all()


# ---- R2: spectral's warm-started vectors and one NaN step ------------------------------------------
SPECTRAL = {"version": 1, "rules": [{"name": "convs", "match": {"kind": "conv", "depthwise": False},
                                     "use": {"spectral": {"coef": 0.1, "power_iters": 2, "init_iters": 3}}}]}


def test_one_nonfinite_step_does_not_poison_spectral_vectors():
    """Before: a NaN gradient made a weight NaN, the next solve ran on it and the warm-started
    vectors stayed NaN for good: after restoring finite weights, plain SGD had 0 NaN weights and
    spectral 462 (here 297: every conv weight). Now the solve reads non-finite weight entries as 0,
    the vectors stay finite, the NaN step is counted, and the NaN entries themselves stay non-finite
    exactly where plain SGD leaves them."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    plan = gc.apply(model, SPECTRAL, opt, example_inputs=(INPUTS[0],))
    plain = _model_like(model)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    good = [p.detach().clone() for p in model.parameters()]
    for step in range(2):       # the NaN step, then a step on the NaN weights (before a loop notices)
        for m in (model, plain):
            _set_grads(m, step)
            if step == 0:
                m.conv2.weight.grad.view(-1)[7] = float("nan")
        opt.step()
        plain_opt.step()
        for p, q in zip(model.parameters(), plain.parameters()):
            assert torch.equal(torch.isfinite(p), torch.isfinite(q))
    assert plan.diagnostics()["conv2.weight"]["spectral"]["nonfinite_steps"] == 1
    with torch.no_grad():
        for p, w in zip(model.parameters(), good):
            p.copy_(w)
    _set_grads(model, 2)
    opt.step()
    bad = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
    assert bad == 0, f"{bad} non-finite weights after restoring finite ones"
    diagnostics = plan.diagnostics()["conv2.weight"]["spectral"]
    assert all(v == v for v in diagnostics.values()), diagnostics


# ---- the Triton kernels, across their block boundaries ----------------------------------------------
# Small forced blocks: channel_directed in two passes over chunks of 4 rows and tiles of 8 columns;
# psi's multi-pass path in chunks of 8 elements. NaN/Inf sit on both sides of a boundary.
CD_BAD = ((3, 7, float("nan")), (4, 8, float("inf")), (0, 0, float("-inf")), (8, 19, float("nan")))


@pytest.mark.parametrize("metric", ["h0", "sobolev"])
@pytest.mark.parametrize("fused", [False, True], ids=["transform", "fused_sgd_momentum"])
def test_channel_directed_kernel_passes_nonfinite_entries_across_block_boundaries(metric, fused):
    from geomcompile.geometries.base import pass_nonfinite
    from geomcompile.geometries.channel_directed import METRICS
    from geomcompile.kernels.channel_directed import channel_directed
    from geomcompile.kernels.optim_updates import SGDUpdate
    gen = torch.Generator().manual_seed(3)
    w0, g = torch.randn(9, 20, generator=gen), torch.randn(9, 20, generator=gen)
    for r, c, v in CD_BAD:
        g[r, c] = v
    want = pass_nonfinite(lambda f: METRICS[metric](f, 0.5, dim=0, mix=0.25), g)
    assert int((~torch.isfinite(want)).sum()) == len(CD_BAD)
    got = g.clone()
    if not fused:
        channel_directed([got], [0], metric, 0.5, 0.25, block_o=4, block_r=8)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
        return
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    ref.grad = want
    opt.step()
    w, buf = w0.clone(), torch.zeros_like(w0)
    channel_directed([got], [0], metric, 0.5, 0.25, weights=[w], states=[[buf]], first=[True],
                     update=SGDUpdate(0.1, 0.9), block_o=4, block_r=8)
    for got_t, want_t in ((w, ref.detach()), (buf, opt.state[ref]["momentum_buffer"])):
        assert torch.equal(torch.isfinite(got_t), torch.isfinite(want_t))
        torch.testing.assert_close(got_t, want_t, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_psi_kernel_renormalises_around_nonfinite_units_across_block_boundaries():
    """A unit with an Inf entry is not renormalised (by 1/∞ = 0 its finite entries and state would
    become 0): it stays as torch's step left it; the other units are renormalised as in eager."""
    from geomcompile.geometries.psi import psi_grad, psi_renorm_factors
    from geomcompile.kernels.optim_updates import SGDUpdate
    from geomcompile.kernels.psi import psi
    gen = torch.Generator().manual_seed(4)
    w0, g = 2.0 * torch.randn(4, 20, generator=gen), torch.randn(4, 20, generator=gen)
    g[1, 7], g[1, 8], g[3, 15] = float("nan"), float("inf"), float("-inf")
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    ref.grad = psi_grad(w0, g)
    opt.step()
    factors = psi_renorm_factors(ref.detach(), 3.0)
    assert factors[1] == 1 and factors[3] == 1 and (factors[[0, 2]] != 1).all()
    want_w, want_buf = ref.detach() * factors, opt.state[ref]["momentum_buffer"] * factors
    w, buf, counter = w0.clone(), torch.zeros_like(w0), torch.zeros((), dtype=torch.int64)
    psi([w], [g.clone()], [("row", 0, None)], update=SGDUpdate(0.1, 0.9), states=[[buf]], first=[True],
        max_norm=3.0, counters=[counter], block=8)
    for got_t, want_t in ((w, want_w), (buf, want_buf)):
        assert torch.equal(torch.isfinite(got_t), torch.isfinite(want_t))
        torch.testing.assert_close(got_t, want_t, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert int(counter) == 2

"""G-SGD (`gspace`, seed 002): the tests of design §15 (../shared/designs/gspace.md), against the brute-force
float64 reference in tests/gspace_reference.py (path enumeration, structure matrix, explicit
reparametrisation w(v; w_F), autograd for ∂l/∂v).

Nets: MLP 3-5-4-2 with biases, 3-4-4-2 (equal widths), 3-4-6-2 with biases (a width increase), the
valley 3-4-2-5-2 with biases and the tiny CNN (conv taps and a flatten block). The models are
tests/models.py's GMLP and GTinyCNN; their random init has |w_F| ≠ 1 (design §15 test 5).
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import geomcompile as gc
from geomcompile.functional import gspace_direction, gspace_icr, gspace_masks, gspace_step

from .gspace_reference import ChainSpec, Reference
from .models import GMLP, GResidualToy, GTinyCNN, g_tiny_cnn_inputs

TOL = 1e-9


def _mlp(widths, bias):
    def make():
        torch.manual_seed(0)
        return GMLP(widths, bias).double()
    L = len(widths) - 1
    spec = ChainSpec([f"layers.{l}.weight" for l in range(L)],
                     [f"layers.{l}.bias" if bias else None for l in range(L)], [1] * L, [0] * L)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, widths[0], generator=gen, dtype=torch.float64)
    return make, spec, x, torch.randn(7, widths[-1], generator=gen, dtype=torch.float64)


def _cnn():
    def make():
        torch.manual_seed(0)
        return GTinyCNN(bias=True).double()
    # kernel centre (kh//2)*kw + kw//2 = 4; flatten block (C, S) = (4, 2x2): centre (Hs//2)*Ws + Ws//2 = 3
    spec = ChainSpec(["conv1.weight", "conv2.weight", "fc.weight"], ["conv1.bias", "conv2.bias", "fc.bias"],
                     [9, 9, 4], [4, 4, 3])
    x = g_tiny_cnn_inputs(5)[0].double()
    return make, spec, x, torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


NETS = {"mlp-3-5-4-2-bias": lambda: _mlp((3, 5, 4, 2), True),
        "mlp-3-4-4-2": lambda: _mlp((3, 4, 4, 2), False),
        "mlp-3-4-6-2-bias": lambda: _mlp((3, 4, 6, 2), True),
        "valley-3-4-2-5-2-bias": lambda: _mlp((3, 4, 2, 5, 2), True),
        "cnn-flatten": _cnn}
# design §1/§14: m − H per net
RANKS = {"mlp-3-5-4-2-bias": 45, "mlp-3-4-4-2": 28, "mlp-3-4-6-2-bias": 50, "valley-3-4-2-5-2-bias": 42,
         "cnn-flatten": 169}


class Net:
    """One test net: a model factory, its chain, data, and the brute-force reference on a fresh model."""

    def __init__(self, name):
        self.name = name
        self.make, self.spec, self.x, self.y = NETS[name]()
        self.ref = Reference(self.make(), self.spec, self.x, self.y)

    def inputs(self):
        return (self.x,)


@pytest.fixture(scope="module")
def nets():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Net(name)
        return cache[name]
    return get


def policy(step="exact", skeleton_init="keep", match=None):
    return {"version": 1, "rules": [{"name": "gsgd", "match": match or {"g_coupled": True},
                                     "use": {"gspace": {"step": step, "skeleton_init": skeleton_init}}}]}


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _load(model, ref, w):
    with torch.no_grad():
        for name, t in ref.unflat(w).items():
            dict(model.named_parameters())[name].copy_(t)


def _loss(model, net):
    return 0.5 * ((model(net.x) - net.y) ** 2).sum()


def _apply(model, net, optimizer, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        return gc.apply(model, policy(**kw), optimizer, example_inputs=net.inputs())


def library_step(net, w, lr, **kw):
    """One optimizer.step of gc.apply(gspace) + torch.optim.SGD from the flat weights w; the new flat weights."""
    model = net.make()
    _load(model, net.ref, w)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    plan = _apply(model, net, opt, **kw)
    opt.zero_grad()
    _loss(model, net).backward()
    opt.step()
    return net.ref.flat(model), plan, model


def check_properties(net, w, lr, **kw) -> dict:
    """Property (i) (design §14): after one library step the function equals the path-space truth's, the
    basis values equal v − η·∂l/∂v, and F is bitwise unchanged. Returns the relative errors."""
    ref = net.ref
    w1, plan, _ = library_step(net, w, lr, **kw)
    truth = ref.truth_step(w, lr)
    free = sorted(ref.free)
    return {"weights": _rel(w1, truth),
            "function": _rel(ref.output(w1), ref.output(truth)),
            "values": _rel(ref.values(w1), ref.values(w) - lr * ref.dl_dv(w)),
            "free_bitwise": bool(torch.equal(w1[free], w[free])), "plan": plan}


def _assert_properties(errors):
    assert errors["free_bitwise"], "the free skeleton moved"
    bad = {k: v for k, v in errors.items() if k not in ("free_bitwise", "plan") and not v < TOL}
    assert not bad, f"property (i) errors above {TOL}: {bad}"


ALL = list(NETS)


# ---- 1. masks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_masks_equal_the_brute_force_skeleton(nets, name):
    net = nets(name)
    ref = net.ref
    masks = gspace_masks(ref.h, ref.spec.taps, ref.spec.centres)
    for l, ((free, upd), (rfree, rupd)) in enumerate(zip(masks, ref.masks())):
        assert torch.equal(free, rfree), f"layer {l}: F differs"
        assert torch.equal(upd, rupd), f"layer {l}: U differs"
        assert not (free & upd).any()
    n_basis = ref.m - sum(int(f.sum()) for f, _ in masks)
    assert n_basis == ref.m - ref.H == RANKS[name] == len(ref.basis)
    h = ref.h
    classes = h[1] + sum(max(0, h[lv] - h[lv - 1]) for lv in range(2, len(h) - 1))
    assert sum(int(u.sum()) for _, u in masks) == classes
    checks = ref.structure_checks()
    assert checks["rank_A"] == checks["rank_basis"] == RANKS[name], checks          # Thm 3.4
    assert checks["basis_are_paths"] and checks["residual"] < 1e-12 and checks["non_integer"] < 1e-12, checks
    for k, path in ref.basis.items():               # p(e) holds one non-skeleton edge (e) or none (e ∈ U)
        off_skeleton = [j for j in path if j not in ref.free and j not in ref.updated]
        assert off_skeleton in ([k], []), (k, path)


# ---- 2. inverse chain rule -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_inverse_chain_rule_equals_autograd_through_the_reparametrisation(nets, name):
    ref = nets(name).ref
    w = ref.flat()
    E, _ = ref.split(w)
    gE, gb = ref.split(ref.plain_grad(w))
    got = gspace_icr(E, gE, ref.spec.centres, gb)
    flat = ref.join(got.dv, got.dv_bias)
    want = ref.dl_dv(w)
    assert _rel(flat[sorted(ref.basis)], want) < TOL
    assert (flat[sorted(ref.free)] == 0).all()


# ---- 3, 5. property (i) through gc.apply, random |w_F| != 1 ----------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_one_exact_step_is_sgd_on_basis_path_values(nets, name):
    net = nets(name)
    w = net.ref.flat()
    free = w[sorted(net.ref.free)]
    assert float((free.abs() - 1).abs().max()) > 0.1, "the test needs |w_F| != 1 (design §15 test 5)"
    _assert_properties(check_properties(net, w, lr=0.01))


# ---- 4. property (ii): invariance, with the plain-SGD control ---------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_a_rescaled_start_gives_the_same_function_and_plain_sgd_does_not(nets, name):
    net = nets(name)
    ref, lr = net.ref, 0.01
    w = ref.flat()
    w_rescaled = ref.rescale(w, torch.Generator().manual_seed(3))
    assert _rel(ref.output(w_rescaled), ref.output(w)) < 1e-12           # a 𝒢-action: same function
    a, _, _ = library_step(net, w, lr)
    b, _, _ = library_step(net, w_rescaled, lr)
    assert _rel(ref.output(b), ref.output(a)) < TOL
    sgd_a, sgd_b = w - lr * ref.plain_grad(w), w_rescaled - lr * ref.plain_grad(w_rescaled)
    control = _rel(ref.output(sgd_b), ref.output(sgd_a))
    assert control > 1e-4, f"plain SGD control {control:.1e}: the test cannot tell invariance apart"


# ---- 6. a class sign flip outside the pivot layer --------------------------------------------------
def test_a_class_value_changes_sign_in_the_forward_gauge(nets):
    net = nets("mlp-3-4-6-2-bias")
    ref = net.ref
    w = ref.flat()
    E, _ = ref.split(w)
    gE, gb = ref.split(ref.plain_grad(w))
    lam = gspace_icr(E, gE, ref.spec.centres, gb).lam
    # classes starting at level 1 have their U-edge in layer 0; the pivot (first widest) is level 2
    k = int(lam[1].argmax())
    lam_c = float(lam[1][k])
    assert lam_c > 0, "the seeded net needs a level-1 class with λ > 0"
    lr = 1.5 / lam_c                          # η·λ_C = 1.5 > 1: the class value changes sign
    rho = torch.cat([1 - lr * x for x in lam[1:-1]])
    assert float(rho.abs().min()) > 1e-2, "no class may land near ρ = 0"
    errors = check_properties(net, w, lr)
    _assert_properties(errors)
    w1, plan, _ = library_step(net, w, lr)
    u = ref.index[("w", 0, k, k % ref.h[0], 0)]
    assert math.copysign(1, float(w1[u])) != math.copysign(1, float(w[u])), "the class's U entry kept its sign"
    assert plan.diagnostics()
    flips = next(iter(plan.diagnostics().values()))["gspace"]["chain_sign_flips"]
    assert flips >= 1
    free = sorted(ref.free)
    assert torch.equal(torch.sign(w1[free]), torch.sign(w[free]))


# ---- 7. zero weights and zero biases ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp-3-5-4-2-bias", "cnn-flatten"])
def test_zero_non_skeleton_weights_and_zero_biases(nets, name):
    net = nets(name)
    ref = net.ref
    w = ref.flat().clone()
    skeleton = ref.free | ref.updated
    zeroed = [k for k, e in enumerate(ref.edges) if k not in skeleton and (e[0] == "b" or k % 2 == 0)]
    w[zeroed] = 0.0
    assert any(ref.edges[k][0] == "b" for k in zeroed)
    errors = check_properties(net, w, lr=0.01)
    _assert_properties(errors)


# ---- 8. tangent ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp-3-4-6-2-bias", "valley-3-4-2-5-2-bias", "cnn-flatten"])
def test_tangent_direction_is_the_first_order_exact_step(nets, name):
    ref = nets(name).ref
    w = ref.flat()
    E, b = ref.split(w)
    gE, gb = ref.split(ref.plain_grad(w))
    dE, db = gspace_direction(E, b, gE, gb, ref.spec.centres)
    d = ref.join(dE, db)
    free = sorted(ref.free)
    assert (d[free] == 0).all() and not (d[free].signbit()).any()
    errs = []
    # |d| reaches 1e6-1e7 on these random-init nets (steps scale as 1/κ²): η·max|d| = 1e-3 is first order
    eta = 1e-3 / float(d.abs().max())
    for lr in (eta, eta / 2, eta / 4):
        st = gspace_step(E, b, gE, gb, lr, ref.spec.centres)
        errs.append(float(((w - ref.join(st.weights, st.biases)) / lr - d).norm()))
    for big, small in zip(errs, errs[1:]):
        assert 0.4 < small / big < 0.6, f"the finite-difference error does not halve with η: {errs}"
    # d = (JᵀJ)^{-1} ∇_{w_N} l, J = ∂v/∂w_N: the Riemannian gradient in basis-path coordinates
    N = sorted(ref.basis)
    J = torch.autograd.functional.jacobian(lambda wn: ref.values(torch.index_put(w, (torch.tensor(N),), wn)), w[N])
    grad_n = ref.plain_grad(w)[N]
    want = torch.linalg.solve(J.T @ J, grad_n)
    assert _rel(d[N], want) < 1e-8


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.Adam(p, lr=1e-3),
                                      lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9)], ids=["adam", "sgd-momentum"])
def test_tangent_runs_with_momentum_and_adam_and_keeps_the_free_skeleton(nets, make_opt):
    net = nets("cnn-flatten")
    model = net.make()
    opt = make_opt(model.parameters())
    _apply(model, net, opt, step="tangent", skeleton_init="paper")      # V = κ = 1: steps of SGD's size
    w0 = net.ref.flat(model)
    free = sorted(net.ref.free)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = _loss(model, net)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    w = net.ref.flat(model)
    assert torch.equal(w[free], w0[free])
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert not torch.equal(w, w0)


# ---- 9. learning-rate schedules ---------------------------------------------------------------------
def test_exact_reads_the_current_lr_and_lr_zero_changes_nothing(nets):
    net = nets("valley-3-4-2-5-2-bias")
    ref = net.ref
    model = net.make()
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    _apply(model, net, opt)
    for lr in (0.02, 0.005):
        w = ref.flat(model)
        opt.zero_grad()
        _loss(model, net).backward()
        opt.step()
        sched.step()
        assert _rel(ref.flat(model), ref.truth_step(w, lr)) < TOL, f"lr {lr}"
    for group in opt.param_groups:
        group["lr"] = 0.0
    w = ref.flat(model)
    opt.zero_grad()
    _loss(model, net).backward()
    opt.step()
    assert torch.equal(ref.flat(model), w)


# ---- 10 (the geometry's side). refusals -------------------------------------------------------------
@pytest.mark.parametrize("make_opt, quoted", [
    (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), "momentum=0.9"),
    (lambda p: torch.optim.SGD(p, lr=0.01, weight_decay=1e-4), "weight_decay=0.0001"),
    (lambda p: torch.optim.Adam(p, lr=0.01), "needs torch.optim.SGD, got Adam"),
], ids=["momentum", "weight-decay", "adam"])
def test_exact_refuses_anything_but_plain_sgd_and_changes_nothing(nets, make_opt, quoted):
    net = nets("mlp-3-5-4-2-bias")
    model = net.make()
    before = copy.deepcopy(model.state_dict())
    opt = make_opt(model.parameters())
    with pytest.raises(gc.GeomCompileError, match="use step: tangent") as err:
        _apply(model, net, opt, skeleton_init="paper")
    assert quoted in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a refusal changed weights"
    assert not any(opt._optimizer_step_pre_hooks.values())
    _apply(model, net, make_opt(model.parameters()), step="tangent")       # the fix works


def test_exact_rechecks_the_optimizer_at_every_step(nets):
    net = nets("mlp-3-5-4-2-bias")
    model = net.make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _apply(model, net, opt)
    opt.param_groups[0]["momentum"] = 0.5
    _loss(model, net).backward()
    before = net.ref.flat(model)
    with pytest.raises(gc.GeomCompileError, match="use step: tangent"):
        opt.step()
    assert torch.equal(net.ref.flat(model), before)


def test_the_chain_needs_one_lr(nets):
    net = nets("mlp-3-5-4-2-bias")
    model = net.make()
    first = [p for n, p in model.named_parameters() if n.startswith("layers.0")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("layers.0")]
    opt = torch.optim.SGD([{"params": first}, {"params": rest, "lr": 0.02}], lr=0.01)
    with pytest.raises(gc.GeomCompileError, match="different learning rates"):
        _apply(model, net, opt)
    opt = torch.optim.SGD([{"params": first}, {"params": rest, "lr": 0.01}], lr=0.01)
    _apply(model, net, opt)                                                 # two groups, one lr: fine
    opt.param_groups[1]["lr"] = 0.5
    _loss(model, net).backward()
    with pytest.raises(gc.GeomCompileError, match="different learning rates"):
        opt.step()


YAML_WEIGHTS_ONLY = """
version: 1
rules:
  - name: gsgd
    match: {g_coupled: true, kind: linear}
    use: {gspace: {skeleton_init: keep}}
"""
YAML_LONE = """
version: 1
rules:
  - name: gsgd
    match: {g_coupled: true, module: "layers.1"}
    use: {gspace: {skeleton_init: keep}}
"""


def test_a_chain_bias_not_assigned_and_a_lone_layer_are_refused_at_the_rule(nets):
    net = nets("mlp-3-5-4-2-bias")
    model = net.make()
    with pytest.raises(gc.GeomCompileError, match=r"<string>:\d+:\d+: .*add `kind: bias` to the gspace rule"):
        gc.apply(model, YAML_WEIGHTS_ONLY, torch.optim.SGD(model.parameters(), lr=0.01))
    with pytest.raises(gc.GeomCompileError, match=r"<string>:\d+:\d+: .*needs ≥ 2 coupled layers"):
        gc.apply(model, YAML_LONE, torch.optim.SGD(model.parameters(), lr=0.01))
    sub = YAML_LONE.replace('module: "layers.1"', 'module: ["layers.1", "layers.2"]')
    plan = gc.apply(model, sub, torch.optim.SGD(model.parameters(), lr=0.01))    # a sub-chain is a chain
    (key,) = plan.diagnostics()
    assert key == "layers.1.weight+layers.1.bias+layers.2.weight+layers.2.bias"


# ---- 12. skeleton_init -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["valley-3-4-2-5-2-bias", "cnn-flatten"])
def test_skeleton_init_normalize_keeps_the_function_and_is_idempotent(nets, name):
    net = nets(name)
    ref = net.ref
    model = net.make()
    w0 = ref.flat(model)
    _apply(model, net, torch.optim.SGD(model.parameters(), lr=0.01), skeleton_init="normalize")
    w1 = ref.flat(model)
    free = sorted(ref.free)
    assert not torch.equal(w1, w0)
    assert _rel(ref.output(w1), ref.output(w0)) < 1e-12
    assert float((w1[free].abs() - 1).abs().max()) < 1e-15
    assert torch.equal(torch.sign(w1[free]), torch.sign(w0[free]))
    _apply(model, net, torch.optim.SGD(model.parameters(), lr=0.01), skeleton_init="normalize")
    assert torch.equal(ref.flat(model), w1), "normalize is not idempotent"


def test_skeleton_init_paper_sets_the_skeleton_to_one_and_reports_the_count(nets):
    net = nets("mlp-3-4-6-2-bias")
    ref = net.ref
    model = net.make()
    w0 = ref.flat(model)
    plan = _apply(model, net, torch.optim.SGD(model.parameters(), lr=0.01), skeleton_init="paper")
    w1 = ref.flat(model)
    skeleton = sorted(ref.free | ref.updated)
    others = sorted(set(range(ref.m)) - set(skeleton))
    assert (w1[skeleton] == 1).all() and torch.equal(w1[others], w0[others])
    assert len(skeleton) == ref.H + 4 + 2        # H + #classes: h[1] = 4, plus the 4 -> 6 increase
    assert any(f"paper set {len(skeleton)} skeleton entries to +1" in n for n in plan.notes), plan.notes


@pytest.mark.parametrize("mode", ["keep", "normalize"])
def test_a_zero_skeleton_entry_is_an_error_under_keep_and_normalize(nets, mode):
    net = nets("mlp-3-4-4-2")
    model = net.make()
    with torch.no_grad():
        model.layers[1].weight[0, 0] = 0.0             # a free skeleton entry (designated out-edge of (1, 0))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(gc.GeomCompileError, match="skeleton weight ≠ 0"):
        _apply(model, net, torch.optim.SGD(model.parameters(), lr=0.01), skeleton_init=mode)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    _apply(model, net, torch.optim.SGD(model.parameters(), lr=0.01), skeleton_init="paper")   # the fix


# ---- 13. dtypes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp-3-4-6-2-bias", "cnn-flatten"])
def test_float32_is_within_1e_5_of_the_float64_truth(nets, name):
    net = nets(name)
    ref, lr = net.ref, 0.01
    model = net.make().float()
    w64 = ref.flat(model)                             # the fp32 weights, exactly, in float64
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        gc.apply(model, policy(), opt, example_inputs=(net.x.float(),))
    loss = 0.5 * ((model(net.x.float()) - net.y.float()) ** 2).sum()
    loss.backward()
    opt.step()
    assert _rel(ref.flat(model), ref.truth_step(w64, lr)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_float32(nets, dtype):
    ref = nets("cnn-flatten").ref
    w = ref.flat()
    E, b = ref.split(w)
    gE, gb = ref.split(ref.plain_grad(w))
    low = lambda ts: [None if t is None else t.to(dtype) for t in ts]
    up = lambda ts: [None if t is None else t.to(dtype).float() for t in ts]
    got = gspace_step(low(E), low(b), low(gE), low(gb), 0.01, ref.spec.centres)
    want = gspace_step(up(E), up(b), up(gE), up(gb), 0.01, ref.spec.centres)
    assert all(x.dtype == torch.float32 for x in got.weights + got.biases)
    assert all(torch.equal(x, y) for x, y in zip(got.weights + got.biases, want.weights + want.biases))
    f64 = gspace_step(E, b, gE, gb, 0.01, ref.spec.centres)
    assert all(x.dtype == torch.float64 for x in f64.weights)


# ---- 14. diagnostics ---------------------------------------------------------------------------------
@pytest.mark.parametrize("h", [8, 16])
def test_diagnostics_report_the_invariant_ratio(h):
    model = GMLP((64, h, h, 10), bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        plan = gc.apply(model, policy(skeleton_init="paper"), opt)
    model(torch.randn(4, 64)).square().sum().backward()
    opt.step()
    (values,) = [v["gspace"] for v in plan.diagnostics().values()]
    assert values["invariant_ratio"] == pytest.approx(2 * h / (64 * h + h * h + 10 * h), rel=1e-12)
    assert values["classes"] == h
    assert values["min_abs_V"] == 1.0 and values["min_abs_kappa"] == 1.0       # paper: V = κ = 1 at the start
    assert 0 < values["max_lr_lambda"] and values["skipped_steps"] == 0
    model.layers[0].weight.grad = None                 # a layer without a gradient stops the chain's step
    model.layers[1].weight.grad = torch.ones_like(model.layers[1].weight)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    (values,) = [v["gspace"] for v in plan.diagnostics().values()]
    assert values["skipped_steps"] == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ---- 15. residual toy -------------------------------------------------------------------------------
def test_residual_block_chain_satisfies_property_one_and_leaves_the_rest_to_sgd():
    torch.manual_seed(0)
    model = GResidualToy().double()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    spec = ChainSpec(["conv1.weight", "conv2.weight"], ["conv1.bias", "conv2.bias"], [9, 9], [4, 4])
    with torch.no_grad():
        y = model(x) + 0.1
    ref = Reference(model, spec, x, y)
    w = ref.flat()
    truth = ref.truth_step(w, 0.01)
    params = dict(model.named_parameters())
    twin = copy.deepcopy(model)                      # plain SGD, no plan
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.01)
    (0.5 * ((twin(x) - y) ** 2).sum()).backward()
    twin_opt.step()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    plan = gc.apply(model, policy(), opt, example_inputs=(x,))
    chain = set(spec.weights) | set(spec.biases)
    assert [set(key.split("+")) for key in plan.diagnostics()] == [chain]      # the stem and fc are not coupled
    opt.zero_grad()
    (0.5 * ((model(x) - y) ** 2).sum()).backward()
    opt.step()
    assert _rel(ref.flat(model), truth) < TOL
    # outside the chain: plain SGD, bitwise; the chain's output bias is its own basis path: plain SGD too
    plain_sgd = (set(params) - chain) | {"conv2.bias"}
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q) == (n in plain_sgd), n


# ---- install details: frozen layers, backends ------------------------------------------------------
def test_skeleton_init_leaves_a_chain_with_a_frozen_layer_alone(nets):
    net = nets("mlp-3-5-4-2-bias")
    model = net.make()
    model.layers[1].weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    plan = _apply(model, net, torch.optim.SGD(model.parameters(), lr=0.01), skeleton_init="paper")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any("layers.1.weight is frozen" in n for n in plan.notes), plan.notes
    control = net.make()                      # the control: trainable, paper does rewrite the skeleton
    _apply(control, net, torch.optim.SGD(control.parameters(), lr=0.01), skeleton_init="paper")
    assert not torch.equal(control.layers[1].weight, before["layers.1.weight"])


def test_the_compile_backend_runs_the_eager_program_whole_and_says_so(nets):
    net = nets("cnn-flatten")
    results = {}
    for backend in ("eager", "compile"):
        model = net.make()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gc.GeomCompileWarning)
            plan = gc.apply(model, policy(), opt, example_inputs=net.inputs(), backend=backend)
        _loss(model, net).backward()
        opt.step()
        results[backend] = net.ref.flat(model)
        if backend == "compile":
            notes = plan.backend_notes()
            assert any(n.startswith("backend compile: gspace") and "no compiled program; its eager program runs "
                       "for 1 unit(s)" in n for n in notes), notes
    assert torch.equal(results["compile"], results["eager"])


# ---- the shipped policy ------------------------------------------------------------------------------
def _shipped_strict():
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "policies" / "gsgd.yaml").read_text()
    strict = text.replace("\nvalidate: warn\n", "\nvalidate: strict\n")
    assert strict != text
    return strict


@pytest.mark.parametrize("make, inputs, chain", [
    (lambda: GMLP((3, 5, 4, 2), True), (torch.randn(2, 3),), "layers.0 → layers.1 → layers.2"),
    (GTinyCNN, g_tiny_cnn_inputs(), "conv1 → conv2 → fc"),
], ids=["gmlp", "gtinycnn"])
def test_the_gsgd_policy_is_strict_clean_and_the_plan_shows_the_chains(make, inputs, chain, capsys):
    import geomcompile.cli as cli
    model = make()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plan = gc.apply(model, _shipped_strict(), torch.optim.SGD(model.parameters(), lr=0.01), example_inputs=inputs)
    assert not [r for r in record if issubclass(r.category, gc.GeomCompileWarning)]
    assert len(plan.diagnostics()) == 1 and all(plan.assignments.values())
    assert any("paper set" in n for n in plan.notes)
    shape = ",".join(map(str, inputs[0].shape))
    factory = "tests.models:GTinyCNN" if make is GTinyCNN else "tests.models:GMLP"
    assert cli.main(["plan", factory, "gsgd", "--input-shape", shape]) == 0
    out = capsys.readouterr().out
    assert "G-chains: 1" in out and chain in out, out
    # the control: a BatchNorm net has no chain, so the same strict policy refuses it
    bn = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                             torch.nn.Conv2d(3, 2, 3))
    with pytest.raises(gc.GeomCompileError):
        gc.apply(bn, _shipped_strict(), torch.optim.SGD(bn.parameters(), lr=0.01), example_inputs=(torch.randn(2, 1, 6, 6),))


# ---- the experiment (design §16), on a tiny budget -----------------------------------------------------
def test_the_digits_experiment_runs_and_checks_the_unbalanced_identity(tmp_path, capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gsgd_digits.py"
    spec = importlib.util.spec_from_file_location("gsgd_digits", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    png = tmp_path / "gap.png"
    assert bench.main(["--hs", "8", "--seeds", "1", "--epochs", "1", "--check", "identity", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| 8 | 0.0244 |" in out and png.stat().st_size > 0          # H/m = 16/656 for [64:8:8:10]
    row = bench.run_h(8, 1, 1, bench.digits())
    assert row["unbal_vs_bal"] < 1e-9 and not bench.check([row], "identity")
    assert bench.check([{**row, "unbal_vs_bal": 1e-6}], "identity"), "the identity check cannot fail"


# ---- a unit across param groups, checkpoints, bf16 through the runtime -----------------------------------
def _two_groups(model, lr, **kw):
    first = [p for n, p in model.named_parameters() if n.startswith("conv")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("conv")]
    return [{"params": first, **kw}, {"params": rest, **kw}], lr


def test_a_chain_across_param_groups_steps_exactly_and_resumes_exactly(nets):
    net = nets("cnn-flatten")
    ref, lr = net.ref, 0.01
    model = net.make()
    groups, _ = _two_groups(model, lr)
    opt = torch.optim.SGD(groups, lr=lr)
    _apply(model, net, opt)
    w = ref.flat(model)
    _loss(model, net).backward()
    opt.step()
    assert _rel(ref.flat(model), ref.truth_step(w, lr)) < TOL       # one unit, two groups: one G-SGD step

    def run(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            _loss(model, net).backward()
            opt.step()
    straight = net.make()
    straight_opt = torch.optim.Adam(_two_groups(straight, 1e-3)[0], lr=1e-3)
    _apply(straight, net, straight_opt, step="tangent", skeleton_init="paper")
    run(straight, straight_opt, 6)
    first = net.make()
    first_opt = torch.optim.Adam(_two_groups(first, 1e-3)[0], lr=1e-3)
    _apply(first, net, first_opt, step="tangent", skeleton_init="paper")
    run(first, first_opt, 3)
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(first_opt.state_dict())
    resumed = net.make()
    resumed.load_state_dict(saved_model)
    resumed_opt = torch.optim.Adam(_two_groups(resumed, 1e-3)[0], lr=1e-3)
    plan = _apply(resumed, net, resumed_opt, step="tangent", skeleton_init="paper")  # the same policy
    assert any("left the chain as it is" in n for n in plan.notes), plan.notes
    resumed_opt.load_state_dict(saved_opt)
    run(resumed, resumed_opt, 3)
    assert torch.equal(ref.flat(resumed), ref.flat(straight))
    (values,) = [v["gspace"] for v in plan.diagnostics().values()]
    assert values["skipped_steps"] == 0


def test_bfloat16_parameters_step_through_the_runtime_with_the_free_skeleton_fixed(nets):
    net = nets("mlp-3-4-6-2-bias")
    ref = net.ref
    model = net.make().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        plan = gc.apply(model, policy(skeleton_init="paper"), opt, example_inputs=(net.x.to(torch.bfloat16),))
    w0 = ref.flat(model)
    (0.5 * ((model(net.x.to(torch.bfloat16)).float() - net.y.float()) ** 2).sum()).backward()
    opt.step()
    w1 = ref.flat(model)
    free = sorted(ref.free)
    assert torch.equal(w1[free], w0[free]) and torch.isfinite(w1).all() and not torch.equal(w1, w0)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert next(iter(plan.diagnostics().values()))["gspace"]["skipped_steps"] == 0

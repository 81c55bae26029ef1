"""pom (FG-SGD on products of weight manifolds): the manifold math, groups, the shell, and training.

The manifold tests are driven by ``MANIFOLDS`` (the table the geometry itself uses); a manifold
added there without a tangent-space check here fails ``test_every_manifold_has_a_tangent_check``.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import geomcompile as gc
from geomcompile.errors import GeomCompileError
from geomcompile.geometries.pom import (MANIFOLDS, as_components, geometric_radius,
                                        pom_direction, pom_distance, pom_group_norms, pom_membership,
                                        pom_max_group, pom_proj, pom_retract, pom_zeta)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The training tests are tiny; on a shared 2-core machine, intra-op threads only contend.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the manifold table --------------------------------------------------------------------------
def _sym(a):
    return (a + a.mT) / 2


# Residual of the tangent-space condition at w (0 for a tangent vector v).
TANGENT = {
    "sphere": lambda w, v: (w * v).sum(dim=(-2, -1)),                 # ⟨w, v⟩ = 0
    "oblique": lambda w, v: (w * v).sum(dim=-2),                      # ⟨w_j, v_j⟩ = 0 per column
    "stiefel": lambda w, v: _sym(w.mT @ v).flatten(-2),               # WᵀV + VᵀW = 0
}
SHAPES = [(3, 3), (4, 2), (5, 1), (1, 3)]       # (n, k) components; stiefel needs n >= k


def cases():
    for name, m in MANIFOLDS.items():
        for n, k in SHAPES:
            if m.needs_tall and n < k:
                continue
            yield pytest.param(name, n, k, id=f"{name}-{n}x{k}")


def point(name, n, k, N=7, r=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pom_retract(torch.randn(N, n, k, generator=g, dtype=torch.float64), name, r)


def test_every_manifold_has_a_tangent_check():
    assert set(TANGENT) == set(MANIFOLDS)


@pytest.mark.parametrize("name,n,k", cases())
@pytest.mark.parametrize("r", [1.0, 0.3])
def test_projection_is_tangent_and_idempotent(name, n, k, r):
    w = point(name, n, k, r=r)
    g = torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p = pom_proj(w, g, name, r)
    assert TANGENT[name](w, p).abs().max() < 1e-12
    torch.testing.assert_close(pom_proj(w, p, name, r), p, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,n,k", cases())
@pytest.mark.parametrize("r", [1.0, 0.3])
def test_retraction_lands_on_manifold_and_fixes_its_points(name, n, k, r):
    x = 5 * torch.randn(7, n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = pom_retract(x, name, r)
    assert pom_distance(y, name, r).max() < 1e-12
    torch.testing.assert_close(pom_retract(y, name, r), y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,n,k", cases())
def test_batched_equals_loop(name, n, k):
    x = torch.randn(6, n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g = torch.randn(6, n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    r = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)        # a radius per component
    w = pom_retract(x, name, r)
    loop_w = torch.stack([pom_retract(x[i], name, float(r[i])) for i in range(6)])
    torch.testing.assert_close(w, loop_w, rtol=0, atol=1e-12)
    loop_p = torch.stack([pom_proj(w[i], g[i], name, float(r[i])) for i in range(6)])
    torch.testing.assert_close(pom_proj(w, g, name, r), loop_p, rtol=0, atol=1e-12)
    loop_d = torch.stack([pom_distance(w[i], name, float(r[i])) for i in range(6)])
    torch.testing.assert_close(pom_distance(w, name, r), loop_d, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,n,k", cases())
def test_zero_component_retracts_to_a_fixed_point(name, n, k):
    x = torch.zeros(2, n, k, dtype=torch.float64)
    x[1] = torch.randn(n, k, dtype=torch.float64)
    y = pom_retract(x, name, 0.5)
    assert torch.isfinite(y).all() and pom_distance(y, name, 0.5).max() < 1e-12
    torch.testing.assert_close(pom_retract(torch.zeros(1, n, k, dtype=torch.float64), name, 0.5), y[:1])


@pytest.mark.parametrize("method", ["polar", "qr"])
def test_stiefel_retractions(method):
    x = torch.randn(5, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = pom_retract(x, "stiefel", 2.0, method)
    assert pom_distance(y, "stiefel", 2.0).max() < 1e-12
    if method == "qr":   # Q spans the same columns as x, with a positive diagonal in R
        assert (torch.diagonal(y.mT @ x, dim1=-2, dim2=-1) > 0).all()
    else:                # polar is the closest point: closer than the QR one
        q = pom_retract(x, "stiefel", 2.0, "qr")
        assert ((y - x).flatten(1).norm(dim=1) <= (q - x).flatten(1).norm(dim=1) + 1e-12).all()


def _with_condition(n, k, kappa, N=20, seed=0, dtype=torch.float64):
    """N random n×k matrices with singular values log-spaced from 1 down to 1/kappa, and their U Vᵀ."""
    g = torch.Generator().manual_seed(seed)
    u, _, vh = torch.linalg.svd(torch.randn(N, n, k, dtype=torch.float64, generator=g), full_matrices=False)
    s = torch.logspace(0, -math.log10(kappa), k, dtype=torch.float64)
    return ((u * s[..., None, :]) @ vh).to(dtype), u @ vh


@pytest.mark.parametrize("n,k", [(3, 3), (9, 3), (16, 16), (64, 32)])
@pytest.mark.parametrize("kappa", [1.0, 1e3, 1e6, 1e10])
def test_polar_factor_is_the_svds_polar_factor(n, k, kappa):
    """polar_factor (QR + scaled Newton, no SVD: sync-free on a GPU) against U Vᵀ of torch's SVD, fp64.
    Both are backward stable, and the polar factor moves by up to ~‖Δx‖/σ_min under a perturbation
    Δx, so they agree to a few k·eps·kappa; it is orthonormal to a few eps whatever the condition."""
    from geomcompile.geometries.pom import polar_factor

    x, exact = _with_condition(n, k, kappa)
    got = polar_factor(x)
    eps = torch.finfo(torch.float64).eps
    assert (got - exact).abs().max() <= 10 * k * eps * kappa
    assert pom_distance(got, "stiefel").max() <= 10 * k * eps


@pytest.mark.parametrize("n,k", [(3, 3), (64, 32)])
def test_polar_factor_in_float32(n, k):
    from geomcompile.geometries.pom import polar_factor

    eps = torch.finfo(torch.float32).eps
    for kappa in (1.0, 1e2, 1e4):
        x, _ = _with_condition(n, k, kappa, dtype=torch.float32)
        u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)     # exact for the rounded input
        got = polar_factor(x)
        assert got.dtype == torch.float32
        assert (got.double() - u @ vh).abs().max() <= 10 * k * eps * kappa, kappa
        assert pom_distance(got.double(), "stiefel").max() <= 10 * k * eps


def test_polar_factor_has_converged_at_its_fixed_iteration_count():
    """POLAR_ITERATIONS is enough: twice as many iterations change nothing beyond rounding, up to
    condition numbers where the working precision runs out (1e15 in fp64, 1e6 in fp32)."""
    from geomcompile.geometries.pom import POLAR_ITERATIONS, polar_factor

    for dtype, kappa in ((torch.float64, 1e15), (torch.float32, 1e6)):
        for n, k in ((3, 3), (16, 16), (64, 32)):
            x, _ = _with_condition(n, k, kappa, dtype=dtype)
            once, twice = polar_factor(x), polar_factor(x, iters=2 * POLAR_ITERATIONS)
            assert (once - twice).abs().max() <= 10 * k * torch.finfo(dtype).eps, (dtype, n, k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_polar_factor_of_a_rank_deficient_matrix_is_on_the_manifold(dtype):
    """Lower rank: the polar factor is not unique and R is singular (Newton's inverse overflows);
    those components take Q of x = QR (diag(R) ≥ 0) and land on the manifold; the others do not."""
    from geomcompile.geometries.pom import polar_factor

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 3, dtype=torch.float64, generator=g)
    x[0, :, 2] = 0                                     # a zero column
    x[1] = x[1, :, :1] * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)   # rank 1
    x[2, :, 1] = x[2, :, 0] * (1 + 1e-9)               # numerically rank 2 in float32
    x = x.to(dtype)
    got = polar_factor(x)
    eps = torch.finfo(dtype).eps
    assert torch.isfinite(got).all()
    assert pom_distance(got.double(), "stiefel").max() <= 10 * 3 * eps
    u, _, vh = torch.linalg.svd(x[3:].double(), full_matrices=False)
    assert (got[3:].double() - u @ vh).abs().max() <= 1e3 * eps     # full-rank ones: the polar factor


# ---- groups and ζ -------------------------------------------------------------------------------
def test_zeta_matches_eq7():
    R = torch.tensor([0.0, 0.1, 0.4, math.sqrt(2) - 1, 0.5, 1.0, 3.0], dtype=torch.float64)
    expected = [math.sqrt(max(1.0, v**2 * (2 + v) ** 2)) for v in R.tolist()]
    torch.testing.assert_close(pom_zeta(R), torch.tensor(expected, dtype=torch.float64))
    assert torch.isfinite(pom_zeta(torch.tensor([1e10], dtype=torch.float32))).all()   # R⁴ would overflow


def test_group_norms_and_direction_match_a_direct_computation():
    gen = torch.Generator().manual_seed(6)
    w = pom_retract(torch.randn(12, 3, 3, generator=gen, dtype=torch.float64), "sphere", 1.0)
    g = 2 * torch.randn(12, 3, 3, generator=gen, dtype=torch.float64)
    gid = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 3])
    direction, R = pom_direction(w, g, "sphere", 1.0, gid, 4)
    for group in range(4):
        members = [i for i in range(12) if gid[i] == group]
        tangents = [g[i] - (g[i] * w[i]).sum() * w[i] for i in members]
        norm = math.sqrt(sum(float((t * t).sum()) for t in tangents))
        assert R[group].item() == pytest.approx(norm, rel=1e-12)
        zeta = math.sqrt(max(1.0, norm**2 * (2 + norm) ** 2))
        for i, t in zip(members, tangents):
            torch.testing.assert_close(direction[i], t / zeta)
    torch.testing.assert_close(pom_group_norms(pom_proj(w, g, "sphere"), gid, 4), R)


def _groups(gid):
    out = {}
    for idx in zip(*torch.nonzero(torch.ones_like(gid, dtype=torch.bool), as_tuple=True)):
        idx = tuple(int(i) for i in idx)
        out.setdefault(int(gid[idx]), []).append(idx)
    return list(out.values())


@pytest.mark.parametrize("group_size", [0, 2, 4])
def test_membership_index_sets(group_size):
    O, I = 6, 5
    for grouping in ("PI", "PO", "PIO", "none"):
        gid, n = pom_membership((O, I), grouping, group_size, torch.Generator().manual_seed(0))
        groups = _groups(gid)
        assert gid.shape == (O, I) and len(groups) == n and sorted(map(int, gid.unique())) == list(range(n))
        size_i = group_size if 0 < group_size < I else I
        size_o = group_size if 0 < group_size < O else O
        for members in groups:
            outs, ins = {o for o, _ in members}, {i for _, i in members}
            if grouping == "PI":      # one output channel, a piece of the inputs
                assert len(outs) == 1 and len(ins) == len(members) <= size_i
            elif grouping == "PO":    # one input channel, a piece of the outputs
                assert len(ins) == 1 and len(outs) == len(members) <= size_o
            elif grouping == "PIO":   # a block: piece of outputs × piece of inputs
                assert len(members) == len(outs) * len(ins) and len(outs) <= size_o and len(ins) <= size_i
            else:
                assert len(members) == 1
        if grouping == "PI":
            assert n == O * -(-I // size_i)
    # filters: PI = none; PO = PIO = pieces of the output axis
    gid, n = pom_membership((7,), "PI", 2, torch.Generator().manual_seed(0))
    assert n == 7 and gid.tolist() == list(range(7))
    gid, n = pom_membership((7,), "PO", 3, torch.Generator().manual_seed(0))
    assert n == 3 and sorted(gid.bincount().tolist()) == [1, 3, 3]


@pytest.mark.parametrize("grouping", ["PI", "PO", "PIO", "none"])
@pytest.mark.parametrize("grid", [(0,), (0, 5), (4, 0)])
def test_membership_of_an_empty_grid_has_no_groups(grid, grouping):
    """A zero-size layer (nn.Linear(5, 0)) has no components: no groups (PO/PIO once divided by 0)."""
    gid, n = pom_membership(grid, grouping, 2, torch.Generator().manual_seed(0))
    assert gid.shape == grid and gid.numel() == 0
    assert n == 0


def test_max_group_matches_the_drawn_membership():
    for grid in ((6, 5), (7,), (1, 9)):
        for grouping in ("PI", "PO", "PIO", "none"):
            for size in (0, 1, 2, 4):
                gid, n = pom_membership(grid, grouping, size, torch.Generator().manual_seed(3))
                assert pom_max_group(grid, grouping, size) == int(gid.reshape(-1).bincount(minlength=n).max())


def test_membership_is_random_but_seeded():
    draw = lambda seed: pom_membership((8, 16), "PI", 4, torch.Generator().manual_seed(seed))[0]
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))


# ---- the geometry on a model --------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self, cin=3, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def policy(conv=None, linear=None, validate="strict"):
    rules = [{"name": "convs", "match": {"kind": "conv"}, "use": {"pom": conv or {}}}]
    if linear is not None:
        rules.append({"name": "head", "match": {"kind": "linear"}, "use": {"pom": linear}})
    return {"version": 1, "validate": validate, "rules": rules}


def make():
    torch.manual_seed(0)
    return SmallCNN(), torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))


def train(model, opt, x, y, steps, scale=1.0):
    for _ in range(steps):
        opt.zero_grad()
        loss = scale * nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return loss.item()


def max_drift(model, manifold, radius=1.0):
    out = 0.0
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            comp = "kernel" if p.dim() == 4 else "filter"
            out = max(out, float(pom_distance(as_components(p, comp), manifold, radius).max()))
    return out


OPTIMIZERS = {"sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
              "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2)}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("manifold", list(MANIFOLDS))
def test_500_steps_stay_on_the_manifold(manifold, opt_name):
    model, x, y = make()
    opt = OPTIMIZERS[opt_name](model.parameters())
    gc.apply(model, policy({"manifold": manifold},
                           {"manifold": manifold, "component": "filter", "grouping": "PO"}), opt)
    loss0 = nn.functional.cross_entropy(model(x), y).item()
    loss = train(model, opt, x, y, 500)
    assert max_drift(model, manifold) < 1e-5
    assert math.isfinite(loss) and loss < loss0


@pytest.mark.parametrize("manifold", list(MANIFOLDS))
def test_shell_writes_the_reference_direction(manifold):
    model, x, y = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = gc.apply(model, policy({"manifold": manifold, "grouping": "PIO", "group_size": 3}), opt)
    state = plan.state.of("conv2.weight", "pom")
    w = model.conv2.weight.detach().clone()
    opt.zero_grad()
    (100 * nn.functional.cross_entropy(model(x), y)).backward()   # large enough for ζ > 1
    g = model.conv2.weight.grad.clone()
    opt.step()
    expected, R = pom_direction(as_components(w, "kernel"), as_components(g, "kernel"), manifold, 1.0,
                                state["group_id"].reshape(-1), state["n_groups"])
    assert (pom_zeta(R) > 1).any()
    torch.testing.assert_close(model.conv2.weight.grad, expected.reshape(g.shape))
    assert plan.diagnostics()["conv2.weight"]["pom"]["normalised_groups"] > 0


@pytest.mark.parametrize("manifold", list(MANIFOLDS))
def test_zero_weights_and_zero_gradients_give_no_nan(manifold):
    model, x, y = make()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gc.apply(model, policy({"manifold": manifold}, {"manifold": manifold, "component": "filter"}), opt)
    assert max_drift(model, manifold) < 1e-6
    for _ in range(3):                       # zero gradients
        opt.zero_grad()
        (0.0 * model(x).sum()).backward()
        opt.step()
    train(model, opt, x, y, 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert max_drift(model, manifold) < 1e-5


def test_install_retracts_and_reports():
    model, x, _ = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = gc.apply(model, policy({"manifold": "oblique", "radius": 0.5}), opt)
    assert max_drift(nn.ModuleDict({"c": model.conv1}), "oblique", 0.5) < 1e-6
    report = plan.summary()
    assert "pom conv1.weight: 8x3 kernel components 3x3 on oblique" in report
    assert "retracted 24 of 24 components onto the manifold at install" in report


def test_install_leaves_points_on_the_manifold_bit_identical():
    model, x, y = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gc.apply(model, policy({"manifold": "stiefel"}), opt)
    train(model, opt, x, y, 5)
    resumed = copy.deepcopy(model)
    plan = gc.apply(resumed, policy({"manifold": "stiefel"}), torch.optim.SGD(resumed.parameters(), lr=0.1))
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert "retracted 0 of 24 components" in plan.summary()


def test_geometric_radius_is_eq2():
    model, x, y = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = gc.apply(model, policy({"radius": "geometric"}), opt, example_inputs=(x,))
    diag = plan.diagnostics()
    assert diag["conv1.weight"]["pom"]["radius"] == pytest.approx(geometric_radius(3 * 9, 8 * 8 * 8))
    assert diag["conv2.weight"]["pom"]["radius"] == pytest.approx(1 / math.sqrt(8 * 9 + 16 * 64))
    train(model, opt, x, y, 2)
    assert max_drift(nn.ModuleDict({"c": model.conv2}), "sphere", 1 / math.sqrt(8 * 9 + 16 * 64)) < 1e-5


def test_membership_seeded_and_restored_from_state_dict():
    def setup(seed, **install):
        model, x, y = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        plan = gc.apply(model, policy({"grouping": "PI", "group_size": 2, "seed": seed}), opt, **install)
        return model, opt, plan, x, y

    def gid(plan):
        return plan.state.of("conv2.weight", "pom")["group_id"]

    assert torch.equal(gid(setup(1)[2]), gid(setup(1)[2]))
    model_a, opt_a, plan_a, x, y = setup(1)
    train(model_a, opt_a, x, y, 3)
    saved_opt, saved_model = copy.deepcopy(opt_a.state_dict()), copy.deepcopy(model_a.state_dict())

    with pytest.raises(gc.GeomCompileError, match=r"different geomcompile plan: conv1.weight: "
                                                  r"manifold=pom\(group_size=2, seed=1\) in the checkpoint"):
        setup(2)[1].load_state_dict(copy.deepcopy(saved_opt))
    # The explicit override takes the checkpoint's membership (seed 1) into a plan made with seed 2.
    model_b, opt_b, plan_b, _, _ = setup(2, state_mismatch="load")
    assert not torch.equal(gid(plan_a), gid(plan_b))
    model_b.load_state_dict(saved_model)
    control = copy.deepcopy(model_b)            # same weights, keeps seed 2's membership
    opt_c = torch.optim.SGD(control.parameters(), lr=0.05, momentum=0.9)
    plan_c = gc.apply(control, policy({"grouping": "PI", "group_size": 2, "seed": 2}), opt_c, state_mismatch="load")
    opt_c.load_state_dict(copy.deepcopy(saved_opt))
    plan_c.state.of("conv2.weight", "pom")["group_id"] = gid(plan_b).clone()
    opt_b.load_state_dict(copy.deepcopy(saved_opt))
    assert torch.equal(gid(plan_b), gid(plan_a))

    train(model_a, opt_a, x, y, 1, scale=20.0)   # ζ > 1 at this scale, so membership matters
    assert plan_a.diagnostics()["conv2.weight"]["pom"]["normalised_groups"] > 0
    train(model_b, opt_b, x, y, 1, scale=20.0)
    train(control, opt_c, x, y, 1, scale=20.0)
    torch.testing.assert_close(model_b.conv2.weight, model_a.conv2.weight, rtol=0, atol=0)
    assert not torch.allclose(control.conv2.weight, model_a.conv2.weight)


def test_feature_std_radius_follows_input_std():
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    plan = gc.apply(model, policy({"radius": 2.0, "feature_std": True, "std_momentum": 0.5, "min_std": 0.01}), opt)
    radius = lambda name: plan.diagnostics()[name]["pom"]["radius"]
    assert radius("conv1.weight") == 2.0                        # λ = 1 before any measurement

    def step(x):
        opt.zero_grad()                     # one training forward = one measurement
        model(x).sum().backward()
        opt.step()
        return x.double().std().item()

    s1 = step(3.0 * torch.randn(8, 3, 8, 8))
    assert radius("conv1.weight") == pytest.approx(2.0 / s1)  # first measurement replaces λ = 1
    s2 = step(0.2 * torch.randn(8, 3, 8, 8))
    assert radius("conv1.weight") == pytest.approx(2.0 / (0.5 * s1 + 0.5 * s2))
    w = as_components(model.conv1.weight, "kernel")
    assert pom_distance(w, "sphere", radius("conv1.weight")).max() < 1e-5
    model.eval()
    model(10 * torch.randn(8, 3, 8, 8))                          # eval forwards do not measure
    assert plan.diagnostics()["conv1.weight"]["pom"]["feature_std"] == pytest.approx(0.5 * s1 + 0.5 * s2)
    plan.remove()
    assert not model.conv1._forward_pre_hooks


def test_feature_std_is_floored_at_min_std():
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    plan = gc.apply(model, policy({"radius": 2.0, "feature_std": True, "std_momentum": 0.0}), opt)
    for scale, expected in ((0.1, 2.0), (4.0, None)):        # default min_std = 1 (the paper's λ ≥ 1)
        x = scale * torch.randn(8, 3, 8, 8)
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        expected = expected or 2.0 / x.double().std().item()
        assert plan.diagnostics()["conv1.weight"]["pom"]["radius"] == pytest.approx(expected)


# ---- errors -------------------------------------------------------------------------------------
class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)).mean()


def test_pom_with_psi_is_a_policy_error():
    pol = {"version": 1, "rules": [
        {"name": "psi", "match": {"kind": "conv", "scale_invariant": True}, "use": {"psi": {}}},
        {"name": "pom", "match": {"kind": "conv"}, "use": {"pom": {}}}]}
    with pytest.raises(GeomCompileError, match="incompatible") as info:
        gc.plan(BNNet(), pol)
    assert "psi" in str(info.value) and "pom" in str(info.value) and "Fix" in str(info.value)


@pytest.mark.parametrize("conv,linear,fragments", [
    ({"radius": "geometric"}, None, ["example_inputs", "conv1.weight"]),
    ({}, {"component": "kernel"}, ["component: filter"]),
    ({"radius": "big"}, None, ["pom.radius", "unit, geometric"]),
    ({"radius": -1}, None, ["> 0"]),
    ({"grouping": "IO"}, None, ["PI, PO, PIO"]),
])
def test_user_errors(conv, linear, fragments):
    with pytest.raises(GeomCompileError) as info:
        gc.plan(SmallCNN(), policy(conv, linear))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_checks_for_shapes_that_do_not_fit():
    wide = nn.Sequential(nn.Conv2d(3, 4, (1, 3)), nn.Conv2d(4, 4, 1))
    with pytest.raises(GeomCompileError, match="at least as many rows"):
        gc.plan(wide, {"version": 1, "rules": [{"name": "s", "match": {"param": "0.weight"},
                                                "use": {"pom": {"manifold": "stiefel"}}}]})
    with pytest.raises(GeomCompileError, match="single numbers"):
        gc.plan(wide, {"version": 1, "rules": [{"name": "s", "match": {"param": "1.weight"},
                                                "use": {"pom": {}}}]})


# ---- the shipped policy and a real (small) task ---------------------------------------------------
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    X = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    Y = torch.tensor(d.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    return X, Y, perm[:1400], perm[1400:]


def digits_net():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 10))


def fit_digits(pol, data, steps=150):
    X, Y, train_idx, test_idx = data
    torch.manual_seed(0)
    model = digits_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if pol is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gc.apply(model, pol, opt, example_inputs=(X[:2],))
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = train_idx[torch.randint(0, len(train_idx), (64,), generator=gen)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(X[train_idx]), Y[train_idx]).item()
        acc = (model(X[test_idx]).argmax(1) == Y[test_idx]).float().mean().item()
    return loss, acc


def test_digits_pom_trains_about_as_well_as_sgd():
    data = digits()
    plain_loss, plain_acc = fit_digits(None, data)
    results = {m: fit_digits(policy({"manifold": m}), data) for m in MANIFOLDS}
    results["fgsgd.yaml"] = fit_digits("fgsgd", data)
    print(f"\ndigits, 150 steps SGD-momentum: plain loss {plain_loss:.4f} acc {plain_acc:.3f}; "
          + "; ".join(f"pom {k}: loss {l:.4f} acc {a:.3f}" for k, (l, a) in results.items()))
    # Measured: plain 0.047; sphere 0.053, oblique 0.026, stiefel 0.039 (test acc 0.96-0.97 for all).
    shipped = results.pop("fgsgd.yaml")
    for loss, acc in results.values():
        assert loss <= 1.5 * plain_loss and acc >= plain_acc - 0.03
    # digits_net has no normalisation, so fgsgd.yaml gives its convs `radius: init` (the scale their
    # init gave them) instead of radius 1, which makes a deeper plain net diverge
    # (tests/test_analysis_robustness.py). The price is a larger angular step lr*|grad|/r on these
    # small kernels: measured loss 0.141, test acc 0.940 in 150 steps (radius 1: 0.053, 0.975).
    loss, acc = shipped
    assert loss <= 3.5 * plain_loss and acc >= plain_acc - 0.04


def test_shipped_policy_loads_and_describes_pom():
    pol = gc.load_policy("fgsgd")
    assert any(g.name == "pom" for rule in pol.rules for g in rule.use.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("manifold, method", [("stiefel", "polar"), ("stiefel", "qr"), ("sphere", "polar"),
                                              ("oblique", "polar")])
def test_functional_retract_half_precision_computes_in_float32(dtype, manifold, method):
    """Issue 15, R10: pom_retract(..., "stiefel") raised NotImplementedError ("linalg_svd_cpu" not
    implemented for 'Half'). Half inputs are retracted in float32 and returned in their dtype."""
    x = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(0))
    out = gc.functional.pom_retract(x.to(dtype), manifold, 2.0, method)
    assert out.dtype == dtype
    reference = gc.functional.pom_retract(x.to(dtype).float(), manifold, 2.0, method)
    assert torch.equal(out, reference.to(dtype))
    assert float(gc.functional.pom_distance(out.float(), manifold, 2.0).max()) < 2e-2   # on it, to half precision

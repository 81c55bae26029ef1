"""pom's compile fast path (geometries/pom.py::CompiledPOM) beyond the registry matrix: the matrix row
pom × compile really runs the compiled program (one function for the bucket's layers), and the
program, run uncompiled, equals pom's eager pre_step and post_step on the options the matrix does not cover
(per-layer radii, feature_std's tensor radius, oblique and Stiefel components, PO / PIO groups,
filters, non-finite gradients), state included."""
import warnings

import pytest
import torch
from torch import nn

import geomcompile as gc
from geomcompile.runtime import compile_backend

from . import test_matrix, test_runtime
from .test_runtime import SmallNet


def _pom_entries(kind):
    return [(key, entry) for key, entry in compile_backend._CACHE.items() if key[:2] == (kind, "pom")]


def test_matrix_case_runs_pom_compiled_one_function_for_the_bucket():
    model, opt, plan = test_matrix._setup("pom", "sgd_momentum", "compile")
    for step in range(2):
        test_matrix._step(model, opt, step, torch.float32)
    notes = plan.backend_notes()
    assert any("torch.compile" in line and "runs pom (" in line for line in notes), notes
    assert not any("failed" in line for line in notes), notes
    # conv1 and conv2 both have 3x3 kernels: one compiled function transforms both
    for phase in ("transform", "retract in graph"):
        used = [(key, e) for key, e in _pom_entries(phase) if e.calls and len(key[3]) == 2]
        assert used and all(e.failure is None for _, e in used), (phase, [key[3] for key, _ in _pom_entries(phase)])


POLICIES = {
    "sphere_init_radius": {"manifold": "sphere", "component": "kernel", "grouping": "PI", "radius": "init"},
    "oblique_po_groups": {"manifold": "oblique", "component": "kernel", "grouping": "PO", "group_size": 3},
    "stiefel_pio_qr": {"manifold": "stiefel", "component": "kernel", "grouping": "PIO", "group_size": 4,
                       "radius": 0.7, "stiefel_retraction": "qr"},
    "stiefel_pi_polar": {"manifold": "stiefel", "component": "kernel", "grouping": "PI", "radius": "init"},
    "filter_feature_std": {"manifold": "sphere", "component": "filter", "grouping": "PO", "feature_std": True},
}


def _run(options, backend, steps=4):
    torch.manual_seed(0)
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    match = {"kind": ["conv", "linear"]} if options["component"] == "filter" else {"kind": "conv"}
    policy = {"version": 1, "rules": [{"name": "pom", "match": match, "use": {"pom": options}}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        plan = gc.apply(model, policy, opt, example_inputs=test_runtime._inputs(), backend=backend)
    for step, (x, y) in enumerate(test_runtime._data(steps)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == steps - 1:         # the last step: a NaN and an Inf pass through, the counter counts
            model.conv2.weight.grad[1, 2, 0, 0] = float("nan")
            model.conv1.weight.grad[0, 0, 1, 1] = float("inf")
        opt.step()
    return plan, model, opt


@pytest.mark.parametrize("case", list(POLICIES))
def test_program_uncompiled_equals_eager_pre_step(case, monkeypatch):
    """torch.compile replaced by the identity: the program's own arithmetic against eager, in
    milliseconds (compiled parity is the matrix's job)."""
    monkeypatch.setattr(compile_backend, "_CACHE", type(compile_backend._CACHE)())
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    _, model, opt = _run(POLICIES[case], "compile")
    assert [e.calls for _, e in _pom_entries("transform")] and all(e.calls for _, e in _pom_entries("transform"))
    in_graph = _pom_entries("retract in graph")       # every manifold, Stiefel's QR / polar included
    assert in_graph and all(e.calls for _, e in in_graph)
    _, ref, opt_ref = _run(POLICIES[case], "eager")
    tol = dict(rtol=1e-5, atol=1e-6, equal_nan=True)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **tol, msg=lambda m: f"{case} {name}: {m}")
        for key in opt_ref.state.get(q, {}):
            torch.testing.assert_close(opt.state[p][key], opt_ref.state[q][key], **tol,
                                       msg=lambda m: f"{case} {name}.{key}: {m}")
    ours, theirs = test_runtime._entries(opt.state_dict()), test_runtime._entries(opt_ref.state_dict())
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        units, units_ref = ours[name]["units"], theirs[name]["units"]
        torch.testing.assert_close(units, units_ref, **tol, msg=lambda m: f"{case} {name}: {m}")
    for name in ("conv1.weight", "conv2.weight"):      # trained (SmallNet.frozen never gets a gradient)
        state = next(iter(ours[name]["units"].values()))["pom"]
        assert float(state["last_max_group_norm"]) > 0, f"{name}: pre_step's state was not written"
    counted = {n: int(next(iter(e["units"].values()))["pom"]["nonfinite_steps"]) for n, e in ours.items()}
    assert counted["conv1.weight"] >= 1 and counted["conv2.weight"] >= 1, counted


def test_concatenated_layers_keep_their_own_groups():
    """Two parameters in one call: each one's direction and R_g equal pom_direction on it alone (what
    POM.pre_step computes), with a float radius and a tensor one."""
    from geomcompile.geometries.pom import as_components, pom_direction, pom_direction_of_layers, pom_membership
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 3, 3, 3), (5, 4, 3, 3)]
    weights = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    states = []
    for s, radius in zip(shapes, (0.5, torch.tensor(2.0, dtype=torch.float64))):
        group_id, n_groups = pom_membership(s[:2], "PO", 2, g)
        states.append({"group_id": group_id, "n_groups": n_groups, "radius": radius})
    both, R_both = pom_direction_of_layers(weights, grads, "kernel", "oblique", states)
    for w, grad, state, new, R in zip(weights, grads, states, both, R_both):
        want, R_want = pom_direction(as_components(w, "kernel"), as_components(grad, "kernel"), "oblique",
                                     state["radius"], state["group_id"].reshape(-1), state["n_groups"])
        torch.testing.assert_close(R, R_want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(new, want.reshape(grad.shape), rtol=1e-6, atol=1e-7)


def test_compiled_single_group():
    """A layer whose components form one group (filters, PO, the whole axis): compiled, it must equal
    the uncompiled call (torch 2.13 inductor fails on an index_add_ into one element; the program
    keeps a spare group)."""
    from geomcompile.geometries.pom import pom_direction_of_layers
    g = torch.Generator().manual_seed(2)
    weight, grad = torch.randn(8, 3, 3, 3, generator=g), torch.randn(8, 3, 3, 3, generator=g)
    states = [{"group_id": torch.zeros(8, dtype=torch.long), "n_groups": 1, "radius": 1.0}]

    def direction(weights, grads):
        return pom_direction_of_layers(weights, grads, "filter", "sphere", states)
    (got,), (R,) = torch.compile(direction, fullgraph=True)([weight], [grad])
    (want,), (R_want,) = direction([weight], [grad])
    assert R.shape == (1,)
    torch.testing.assert_close(R, R_want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["polar", "qr"])
def test_compiled_stiefel_retraction_equals_eager(method):
    """Stiefel components retract in the compiled graph (QR + Newton for polar: no SVD, no graph
    break under fullgraph=True), equal to the eager pom_retract and on the manifold, with a
    per-layer radius and a zero component."""
    from geomcompile.geometries.pom import as_components, pom_distance, pom_retract, pom_retract_layers
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(4, 3, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)]
    weights[1][2, 1] = 0
    radii = [0.7, 1.3]

    def retract(ws):
        return pom_retract_layers(ws, "kernel", "stiefel", radii, method)
    got = torch.compile(retract, fullgraph=True)(weights)
    for w, r, y in zip(weights, radii, got):
        want = pom_retract(as_components(w, "kernel"), "stiefel", r, method).reshape(w.shape)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
        assert pom_distance(as_components(y, "kernel"), "stiefel", r).max() < 1e-5

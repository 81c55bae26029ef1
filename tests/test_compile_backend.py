"""backend="compile": parity with the eager reference, and the registry-driven runtime tests.

Compiling costs seconds on CPU, so the cases reuse tests/test_runtime.py's SmallNet and CASES:
compiled functions are cached per process by geometry, options and tensor shapes, and the parity
tests and the runtime matrix share them. Fallbacks (a geometry without a compiled program, a
failed compile) are tested without compiling anything.
"""
import copy
import inspect
import warnings

import pytest
import torch

import geomcompile as gc
from geomcompile.runtime import compile_backend
from geomcompile.runtime.backends import BACKENDS
from geomcompile.runtime.compile_backend import CompileBackend
from geomcompile.runtime.fastpath import fast_path

from . import test_runtime
from .test_runtime import CASES, OPTIMIZERS, SmallNet, _data, _inputs, _policy, _train

PARITY_OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
}
TOLERANCE = dict(rtol=1e-5, atol=1e-6)     # fp32: parameters and optimizer state after 5 steps
# SmallNet's conv rows start with norm ~0.58 (PyTorch's default init) and grow under PSI: with
# max_norm=0.6 some units pass it within 5 steps, so the renormalisation path runs too.
PARITY_CASES = {"channel_directed": CASES["channel_directed"], "channel_directed_h0": CASES["channel_directed_h0"],
                "psi": {**CASES["psi"], "use": {"psi": {"max_norm": 0.6}}}}


def _twin_runs(case, make_optimizer, steps=5, backend="compile"):
    """The same model, policy, data and optimizer, once with `backend` and once with eager."""
    torch.manual_seed(0)
    model = SmallNet()
    reference = copy.deepcopy(model)
    opt, opt_ref = make_optimizer(model.parameters()), make_optimizer(reference.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)   # psi: none expected; keep output quiet
        plan = gc.apply(model, _policy(case), opt, example_inputs=_inputs(), backend=backend)
        gc.apply(reference, _policy(case), opt_ref, example_inputs=_inputs(), backend="eager")
    data = _data(steps)
    _train(model, opt, data)
    _train(reference, opt_ref, data)
    return plan, (model, opt), (reference, opt_ref)


def _assert_same_run(run, reference, **tol):
    (model, opt), (ref, opt_ref) = run, reference
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **tol, msg=lambda m: f"{name}: {m}")
        state, state_ref = opt.state[p], opt_ref.state[q]
        assert state.keys() == state_ref.keys(), name
        for key in state:
            torch.testing.assert_close(state[key], state_ref[key], **tol, msg=lambda m: f"{name}.{key}: {m}")
    # Geometry state (as carried by the state dicts) matches too.
    ours, theirs = test_runtime._entries(opt.state_dict()), test_runtime._entries(opt_ref.state_dict())
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name]["steps"] == theirs[name]["steps"], name
        torch.testing.assert_close(ours[name]["units"], theirs[name]["units"], **tol, msg=lambda m: f"{name}: {m}")


def _program(name):
    return fast_path(gc.geometries.get(name)(), "compile")


def test_compile_is_registered_and_has_programs_for_the_issue_geometries():
    assert BACKENDS["compile"] is CompileBackend
    assert all(_program(name) is not None for name in ("channel_directed", "psi", "pom"))


@pytest.mark.parametrize("opt_name", list(PARITY_OPTIMIZERS))
@pytest.mark.parametrize("case_name", list(PARITY_CASES))
def test_matches_eager_over_five_steps(case_name, opt_name):
    plan, run, reference = _twin_runs(PARITY_CASES[case_name], PARITY_OPTIMIZERS[opt_name])
    assert plan.backend_name == "compile"
    _assert_same_run(run, reference, **TOLERANCE)
    if case_name == "psi":
        renormalised = sum(v["psi"]["renormalised_units"] for v in plan.diagnostics().values())
        assert renormalised > 0, "the case should exercise the renormalisation path"


def test_a_program_refusal_runs_the_eager_program_and_is_reported(monkeypatch):
    """Program.refusal (no shipped program refuses today: spectral batches every padding mode since
    2026-12-04): the refused unit runs its geometry's eager program, describe() names it with the
    reason, the others stay in the compiled bucket, and the run equals eager's."""
    program = type(_program("channel_directed"))
    monkeypatch.setattr(program, "refusal", lambda self, geometry, facts:
                        "a test refusal" if facts.name == "conv1.weight" else None, raising=False)
    monkeypatch.setattr(compile_backend, "_CACHE", type(compile_backend._CACHE)())
    plan, run, reference = _twin_runs(PARITY_CASES["channel_directed"], PARITY_OPTIMIZERS["sgd_momentum"])
    notes = plan.backend_notes()
    assert any("runs its eager program for 1 unit(s): a test refusal" in line for line in notes), notes
    compiled = [key for key, entry in compile_backend._CACHE.items() if key[0] == "transform" and entry.calls]
    stepped = [n for n, p in run[0].named_parameters() if plan.assignments.get(n) and p.grad is not None]
    assert "conv1.weight" in stepped
    assert compiled and max(len(key[3]) for key in compiled) == len(stepped) - 1, (stepped, [k[3] for k in compiled])
    _assert_same_run(run, reference, **TOLERANCE)


# The registry-driven runtime tests of tests/test_runtime.py with backend="compile": passed directly
# to the tests that take a backend, and in place of "auto" for those that do not. Geometries without a compiled program (gspace) run their
# eager program inside the compile backend, so they take part too.
@pytest.fixture
def compile_by_default(monkeypatch):
    install = gc.Plan.install

    def install_compile(self, optimizer, backend="auto"):
        return install(self, optimizer, backend="compile" if backend == "auto" else backend)

    monkeypatch.setattr(gc.Plan, "install", install_compile)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("case_name", list(CASES))
def test_runtime_every_optimizer(case_name, opt_name, compile_by_default):
    test_runtime.test_runs_with_every_optimizer_and_changes_the_update(case_name, opt_name)


@pytest.mark.parametrize("runtime_test", [
    "test_params_with_none_grad_are_untouched",
    "test_remove_restores_bit_identical_behaviour",
    "test_state_dict_round_trip_continues_exactly",
    "test_grad_scaler_skipped_step_changes_nothing_and_hooks_see_unscaled_grads",
])
@pytest.mark.parametrize("case_name", list(CASES))
def test_runtime_lifecycle(case_name, runtime_test, compile_by_default):
    test = getattr(test_runtime, runtime_test)
    if "backend" in inspect.signature(test).parameters:     # tests parametrised over backends take it directly
        test(case_name, backend="compile")
    else:
        test(case_name)


def test_geometry_without_program_runs_eager_and_is_reported(monkeypatch):
    psi = gc.geometries.get("psi")
    monkeypatch.setattr(psi, "fast_paths", {k: v for k, v in psi.fast_paths.items() if k != "compile"})
    # psi now declares no compiled program: nothing compiles
    plan, run, reference = _twin_runs(CASES["psi"], PARITY_OPTIMIZERS["sgd_momentum"], steps=3)
    _assert_same_run(run, reference, rtol=0, atol=0)
    lines = plan.backend_notes()        # the backend's report, as plan.summary() shows it
    assert any("psi(max_norm=1.5) has no compiled program; its eager program runs" in line for line in lines)


def test_failed_compile_warns_and_runs_the_same_function_uncompiled(monkeypatch):
    from torch._dynamo.exc import Unsupported

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise Unsupported("no compiler here")
        return run

    monkeypatch.setattr(compile_backend, "_CACHE", type(compile_backend._CACHE)())
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(gc.GeomCompileWarning, match="torch.compile failed .* no compiler here.*runs uncompiled"):
        plan, run, reference = _twin_runs(CASES["channel_directed_h0"], PARITY_OPTIMIZERS["sgd_momentum"], steps=2)
    _assert_same_run(run, reference, rtol=1e-6, atol=1e-7)
    assert any("torch.compile failed" in line for line in plan.backend_notes())
    assert "torch.compile failed" in plan.summary(), "a failure at the first step must reach the report"


def test_channel_directed_program_concatenation_equals_one_call_per_tensor():
    """The program concatenates gradients that share O along R; uncompiled, it must equal the
    reference one tensor at a time: out_dim 0 and 1 (conv_transpose), fp16 and fp64, O = 1."""
    from geomcompile.geometries.channel_directed import METRICS
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(8, 3, 3, 3, generator=g), torch.randn(4, 8, 3, 3, generator=g),   # O = 8 twice
             torch.randn(8, 5, generator=g), torch.randn(8, 6, generator=g).half(),
             torch.randn(8, 2, generator=g).double(), torch.randn(1, 7, generator=g)]
    dims = (0, 1, 0, 0, 0, 0)
    for opts in ({"metric": "sobolev", "lam": 0.5, "mix": 0.5}, {"metric": "h0", "lam": 2.0}):
        geometry = gc.geometries.get("channel_directed")(**opts)
        got = _program("channel_directed").transform(geometry, dims, grads, [])
        for grad, dim, out in zip(grads, dims, got):
            want = METRICS[opts["metric"]](grad, opts["lam"], dim=dim, mix=opts.get("mix", 0.0))
            assert out.dtype == grad.dtype and out.shape == grad.shape
            torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7)


def test_psi_program_flags_units_near_max_norm():
    geometry = gc.geometries.get("psi")(max_norm=1.0)
    w = torch.zeros(3, 4)
    w[0, 0], w[1, 0], w[2, 0] = 0.5, 1.0 - 1e-6, 1.5      # below, at the limit within the margin, above
    flags = _program("psi").needs_retraction(geometry, (("row", 0, None),) * 3, [w[:1], w[1:2], w[2:]])
    assert flags.tolist() == [False, True, True]


def test_psi_screen_is_conservative():
    """The screen may flag more than the check, never less: a unit above the threshold flags its tensor
    whatever its layout; a NaN entry, which hides the other units' norms, flags it; bf16 norms are
    summed in float32 (bf16 would round 1.0005 down to 1.0, below a threshold of 1.0002)."""
    geometry = gc.geometries.get("psi")(max_norm=1.0)
    program = _program("psi")
    below = torch.full((2, 4), 0.1)                              # tensor norm 0.28: certainly nothing
    above = torch.zeros(2, 4)
    above[1, 2] = 1.5
    hidden = torch.zeros(2, 4)
    hidden[0, 0], hidden[1, 0] = float("nan"), 1.5               # row 1 needs renormalising
    tensor_unit = torch.full((4, 4), 0.2)                        # rows 0.4, the tensor 0.8: nothing
    layouts = (("row", 0, None), ("row", 1, None), ("row", 0, None), ("tensor", 0, None))
    flags = program.screen(geometry, layouts, [below, above, hidden, tensor_unit])
    assert flags == [False, True, True, False]
    exact = program.needs_retraction(geometry, layouts, [below, above, hidden, tensor_unit]).tolist()
    assert not any(e and not f for e, f in zip(exact, flags)), "the screen missed a parameter the check flags"
    half = torch.zeros(1, 4, dtype=torch.bfloat16)
    half[0, 0] = 1.0
    half[0, 1] = 0.0322265625          # norm 1.000519 in float32; rounded to bf16, 1.0
    near_one = gc.geometries.get("psi")(max_norm=1.0003)        # flags norms above 1.0002
    assert program.needs_retraction(near_one, (("row", 0, None),), [half]).tolist() == [True]
    assert program.screen(near_one, (("row", 0, None),), [half]) == [True]


def test_psi_screen_skips_the_compiled_check_and_keeps_parity(monkeypatch):
    """With every tensor's norm far below max_norm the compiled check never runs; with one above, it
    runs and the step equals eager's (the renormalisation happens)."""
    checks = []
    original = compile_backend._check_function

    def counting(program, geometry, layouts):
        fn = original(program, geometry, layouts)

        def counted(weights):
            checks.append(len(weights))
            return fn(weights)
        return counted
    monkeypatch.setattr(compile_backend, "_check_function", counting)
    monkeypatch.setattr(compile_backend, "_CACHE", type(compile_backend._CACHE)())   # built anew, counted
    for max_norm, want_checks in ((1e4, False), (1.5, True)):
        checks.clear()
        runs = {}
        for backend in ("eager", "compile"):
            torch.manual_seed(0)
            model = SmallNet()
            with torch.no_grad():
                model.conv1.weight.mul_(5.0)          # rows above 1.5: renormalised at the first step
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            gc.apply(model, {"version": 1, "rules": [{"name": "p", "match": {"scale_invariant": True},
                                                      "use": {"psi": {"max_norm": max_norm}}}]},
                     opt, example_inputs=_inputs(), backend=backend)
            for x, y in _data(3):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            runs[backend] = model
        assert bool(checks) == want_checks, (max_norm, checks)
        rows = runs["compile"].conv1.weight.detach().flatten(1).norm(dim=1)
        assert (rows <= min(max_norm, 10.0)).all(), rows        # renormalised where max_norm is 1.5
        for (name, a), b in zip(runs["eager"].named_parameters(), runs["compile"].parameters()):
            torch.testing.assert_close(b, a, **TOLERANCE, msg=lambda m: f"max_norm {max_norm} {name}: {m}")


def test_each_compiled_function_has_its_own_code_object():
    """Dynamo caches per code object and silently runs eager past 8 entries: buckets must not share one."""
    geometry = gc.geometries.get("channel_directed")()
    program = _program("channel_directed")
    a = compile_backend._transform_function(program, geometry, (0,))
    b = compile_backend._transform_function(program, geometry, (0, 0))
    assert a.__code__ is not b.__code__ and a.__code__.co_code == b.__code__.co_code


def test_foreach_copy_miscompile_still_avoided():
    """Why the compiled functions write back with copy_: torch 2.13 inductor (CPU) miscompiles
    _foreach_copy_ of per-tensor reductions. When this starts passing with _foreach_copy_, the
    workaround can go; until then this pins the behaviour of the copy_ form we use."""
    def update(xs):
        for x, new in zip(xs, [x * x.sum(0, keepdim=True) for x in xs]):
            x.copy_(new)

    torch.manual_seed(0)
    xs = [torch.randn(8, 8), torch.randn(4, 8)]
    expected = [x * x.sum(0, keepdim=True) for x in xs]
    torch.compile(update, fullgraph=True)(xs)
    for got, want in zip(xs, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

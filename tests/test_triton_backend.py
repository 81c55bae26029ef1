"""The Triton backend against the eager backend: same model, same gradients, every base optimizer.

Gradients are drawn directly (no forward/backward) so each step is cheap under the Triton
interpreter; the schedule gives some parameters no gradient on some steps (frozen, then unfrozen),
so buckets mix new and existing optimizer state and different Adam step counts. After every step,
parameters and every optimizer state entry must match (fp32: rtol 1e-5).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import copy
import sys
import types
import warnings

import pytest
import torch
from torch import nn

import triton  # noqa: E402,F401  (a missing triton fails the suite: the test command installs it)

import geomcompile as gc  # noqa: E402
from .test_runtime import _entries  # noqa: E402
from geomcompile.runtime import triton_backend  # noqa: E402
from geomcompile.runtime.backends import EagerBackend, select_backend  # noqa: E402
from geomcompile.runtime.triton_backend import TritonBackend  # noqa: E402

STEPS = 7
# conv2 has no gradient at first (its momentum buffer / Adam state is created one step after conv1's,
# in the same bucket), then is frozen for two steps (its Adam step count lags: a second launch)
NO_GRAD = {0: {"head.weight", "conv2.weight"}, 2: {"conv2.weight"}, 3: {"conv2.weight"},
           5: {"conv1.weight", "head.weight"}}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


class Net(nn.Module):
    """Two BN convolutions (scale-invariant rows), a linear head, and a zero-size linear layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(5)
        self.head = nn.Linear(5, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)      # "Initializing zero-element tensors is a no-op"
            self.empty = nn.Linear(5, 0)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        z = x.mean((2, 3))
        return torch.cat([self.head(z), self.empty(z)], dim=1)


INPUTS = (torch.zeros(2, 3, 6, 6),)
CONV_OR_LINEAR = {"kind": ["conv", "linear"]}
CONV = {"kind": "conv", "depthwise": False}
GEOMETRIES = {
    "sobolev": [(CONV_OR_LINEAR, {"channel_directed": {"metric": "sobolev", "lam": 0.5, "mix": 0.5}})],
    "h0": [(CONV_OR_LINEAR, {"channel_directed": {"metric": "h0", "lam": 0.5}})],
    "psi": [({"scale_invariant": True}, {"psi": {"max_norm": 1.5}})],
    "spectral": [(CONV, {"spectral": {"coef": 0.1, "power_iters": 1}})],
    "pom": [(CONV, {"pom": {"manifold": "sphere", "component": "kernel", "grouping": "PI"}})],
    # penalty (eager) then metric (kernel, still fused); metric (kernel) then manifold (eager)
    "spectral+sobolev": [(CONV, {"spectral": {"coef": 0.1, "power_iters": 1}}),
                         (CONV_OR_LINEAR, {"channel_directed": {"metric": "sobolev", "lam": 0.5}})],
    "sobolev+pom": [(CONV, {"pom": {"manifold": "sphere", "component": "kernel", "grouping": "PI"}}),
                    (CONV_OR_LINEAR, {"channel_directed": {"metric": "sobolev", "lam": 0.5}})],
    # pom's kernels: every grouping, both component kinds (filters of the linear head and of the
    # zero-size layer too), oblique, a radius other than 1
    "pom_oblique_po": [(CONV, {"pom": {"manifold": "oblique", "component": "kernel", "grouping": "PO",
                                       "group_size": 2}})],
    "pom_filter_pio": [(CONV_OR_LINEAR, {"pom": {"manifold": "sphere", "component": "filter", "grouping": "PIO",
                                                 "group_size": 2}})],
    "pom_none": [(CONV, {"pom": {"grouping": "none", "radius": 0.5}})],
    # what pom's kernels refuse (eager, said in the report)
    "pom_stiefel": [(CONV, {"pom": {"manifold": "stiefel", "component": "filter"}})],
    "pom_feature_std": [(CONV, {"pom": {"feature_std": True, "radius": 2.0}})],
}


def _groups(model):
    """Convolutions in one param group, the rest in another with its own lr: two sets of buckets."""
    convs = [p for n, p in model.named_parameters() if n.startswith("conv")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("conv")]
    return convs, rest


OPTIMIZERS = {
    "sgd": lambda c, r: torch.optim.SGD([{"params": c}, {"params": r, "lr": 0.02}], lr=0.05),
    "sgd_momentum": lambda c, r: torch.optim.SGD([{"params": c}, {"params": r, "lr": 0.02}], lr=0.05,
                                                 momentum=0.9, dampening=0.1, weight_decay=1e-3),
    "sgd_nesterov_maximize": lambda c, r: torch.optim.SGD([{"params": c}, {"params": r, "momentum": 0.5}], lr=0.05,
                                                          momentum=0.9, nesterov=True, maximize=True),
    "adam": lambda c, r: torch.optim.Adam([{"params": c}, {"params": r, "lr": 3e-3}], lr=1e-2, weight_decay=1e-3),
    "adamw_maximize": lambda c, r: torch.optim.AdamW([{"params": c}, {"params": r, "lr": 3e-3}], lr=1e-2,
                                                     weight_decay=1e-2, maximize=True),
    "adam_amsgrad": lambda c, r: torch.optim.Adam([{"params": c}, {"params": r}], lr=1e-2, amsgrad=True),
    "rmsprop_centered_momentum": lambda c, r: torch.optim.RMSprop([{"params": c}, {"params": r}], lr=1e-3,
                                                                  momentum=0.5, centered=True),
}


def _policy(geometry):
    return {"version": 1, "validate": "warn",
            "rules": [{"name": f"r{i}", "match": m, "use": u} for i, (m, u) in enumerate(GEOMETRIES[geometry])]}


def _setup(geometry, opt_name, backend, dtype=torch.float32, channels_last=False):
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.conv1.weight.mul_(5.0)                  # rows above max_norm: psi renormalises at once
    model = model.to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = OPTIMIZERS[opt_name](*_groups(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        plan = gc.apply(model, _policy(geometry), opt, example_inputs=(INPUTS[0].to(dtype),), backend=backend)
    return model, opt, plan


def _grads(model, step, dtype):
    """Deterministic gradients for one step; None for the parameters NO_GRAD lists at that step."""
    gen = torch.Generator().manual_seed(100 + step)
    for name, p in model.named_parameters():
        g = (torch.randn(p.shape, generator=gen) * 0.5).to(dtype)
        if p.dim() == 4 and not p.is_contiguous():          # channels_last weights get channels_last grads
            g = g.contiguous(memory_format=torch.channels_last)
        p.grad = None if name in NO_GRAD.get(step, ()) else g


def _step(model, opt, step, dtype=torch.float32):
    _grads(model, step, dtype)
    opt.step()


def assert_same(model_a, opt_a, model_b, opt_b, what, dtype=torch.float32):
    """Parameters, every base-optimizer state entry (keys, dtype, device, values) and geometry state."""
    tol = TOL[dtype]
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(b, a, **tol, msg=lambda m: f"{what}: parameter {name}: {m}")
        # an empty entry counts as none: eager PSI.post_step reads optimizer.state[p] (a defaultdict)
        sa, sb = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert sorted(sa) == sorted(sb), f"{what}: {name} state keys {sorted(sa)} vs {sorted(sb)}"
        for key in sa:
            va, vb = sa[key], sb[key]
            assert (va.dtype, va.device, va.shape) == (vb.dtype, vb.device, vb.shape), f"{what}: {name}.{key}"
            torch.testing.assert_close(vb, va, **tol, msg=lambda m: f"{what}: {name} state {key}: {m}")
    assert_same_geometry_state(opt_a, opt_b, what)


def assert_same_geometry_state(opt_a, opt_b, what):
    """The geometry state the two optimizers' state dicts carry: same parameters, steps and values."""
    ga, gb = _entries(opt_a.state_dict()), _entries(opt_b.state_dict())
    assert ga.keys() == gb.keys(), f"{what}: geometry state on {sorted(ga)} vs {sorted(gb)}"
    for name, entry in ga.items():
        other_entry = gb[name]
        assert entry["steps"] == other_entry["steps"], f"{what}: {name} steps"
        assert entry["units"].keys() == other_entry["units"].keys(), f"{what}: {name} units"
        for unit, per_geometry in entry["units"].items():
            for geometry, state in per_geometry.items():
                other = other_entry["units"][unit][geometry]
                assert sorted(state) == sorted(other), f"{what}: {unit}/{geometry} state keys"
                for key, va in state.items():
                    vb = other[key]
                    if isinstance(va, torch.Tensor) and not va.is_floating_point():
                        assert torch.equal(va.cpu(), vb.cpu()), f"{what}: {unit}/{geometry}.{key} {va} vs {vb}"
                    elif isinstance(va, torch.Tensor):   # e.g. spectral's power-iteration vectors: derived from
                        torch.testing.assert_close(       # the weights, they amplify 1e-7 weight differences tenfold
                            vb, va, rtol=1e-3, atol=1e-5, msg=lambda m: f"{what}: {unit} {key}: {m}")
                    else:
                        assert va == vb, f"{what}: {unit}/{geometry}.{key}"


def _parity(geometry, opt_name, dtype=torch.float32, channels_last=False, steps=STEPS):
    eager = _setup(geometry, opt_name, "eager", dtype, channels_last)
    triton = _setup(geometry, opt_name, "triton", dtype, channels_last)
    assert triton[2].backend_name == "triton"
    for step in range(steps):
        _step(eager[0], eager[1], step, dtype)
        _step(triton[0], triton[1], step, dtype)
        assert_same(eager[0], eager[1], triton[0], triton[1], f"{geometry}/{opt_name} step {step}", dtype)
    return eager, triton


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("geometry", ["sobolev", "h0", "psi"])
def test_seven_step_parity_with_eager(geometry, opt_name):
    eager, triton = _parity(geometry, opt_name)
    if geometry == "psi":
        entries = [v["geomcompile"] for v in triton[1].state_dict()["state"].values() if "geomcompile" in v]
        renormalised = sum(int(u["psi"]["renormalised"]) for e in entries for u in e["units"].values())
        assert renormalised > 0, "the case never exercised psi's renormalisation"


@pytest.mark.parametrize("geometry, opt_name", [("spectral", "sgd_momentum"), ("spectral+sobolev", "adam")])
def test_spectral_runs_its_batched_torch_step_and_matches_eager(geometry, opt_name):
    """spectral's Triton fast path runs its batched torch step, never fused (kernels/spectral.py), also
    before a fused metric-stage kernel (spectral+sobolev)."""
    _parity(geometry, opt_name, steps=4)


def _launched(run):
    """The kernels launched (by name) while `run()` runs."""
    from geomcompile.kernels.tables import Launch
    names, real = [], Launch.run

    def spy(self, scalars=None):
        names.append(self.kernel)
        return real(self, scalars)
    Launch.run = spy
    try:
        out = run()
    finally:
        Launch.run = real
    return out, set(names)


@pytest.mark.parametrize("geometry, opt_name", [("pom", "adamw_maximize"), ("pom_oblique_po", "sgd_momentum"),
                                                ("pom_filter_pio", "adam"), ("pom_none", "sgd_nesterov_maximize"),
                                                ("sobolev+pom", "sgd_momentum"), ("pom_oblique_po", "adam_amsgrad"),
                                                ("pom", "rmsprop_centered_momentum")])
def test_pom_kernels_match_eager(geometry, opt_name):
    """pom's kernels against the eager program, every grouping: fused with SGD / Adam / AdamW (direction,
    base update and retraction in one launch), else the transform kernel, torch's step and the
    retraction kernel; a stage before pom (sobolev) keeps its own kernel. RMSprop only on the
    registry's sphere case: its first steps divide every coordinate by its own magnitude, so a 1-ulp
    difference of a near-zero direction entry (a cancellation in g − ⟨g, w⟩w/r²) becomes 4e-5
    relative in the momentum buffer (measured on oblique PO, with and without centring)."""
    (eager, fast), launched = _launched(lambda: _parity(geometry, opt_name, steps=4))
    assert {"_pom_kernel", "_pom_stats_kernel"} <= launched, launched
    notes = fast[2].backend_notes()
    if opt_name.startswith("rmsprop") or opt_name == "adam_amsgrad":
        assert "_pom_retract_kernel" in launched, launched
        assert any("gradient-transform kernels only" in line for line in notes), notes
    else:
        assert "_pom_retract_kernel" not in launched, launched      # retracted inside the fused launch
        assert any("fused" in line for line in notes), notes


def test_pom_kernels_channels_last_and_bf16():
    _, launched = _launched(lambda: _parity("pom", "adam", channels_last=True, steps=3))
    assert "_pom_kernel" in launched
    _parity("pom_oblique_po", "sgd_momentum", dtype=torch.bfloat16, steps=3)


@pytest.mark.parametrize("geometry", ["pom_stiefel", "pom_feature_std"])
def test_pom_options_without_kernels_run_the_batched_torch_program(geometry, monkeypatch):
    """Stiefel components and feature_std have no kernel: they ran pom's eager program, one
    parameter at a time. Now the compile backend's batched program runs uncompiled (POMTorchSteps),
    matches eager at every step (_parity), launches no pom kernel, says so, and the step plan replays
    its direction and its retraction (steps 2 and 3 step the same parameters)."""
    from geomcompile.kernels.tables import TorchStep
    replayed, real = [], TorchStep.run
    monkeypatch.setattr(TorchStep, "run", lambda self, scalars=None: (replayed.append(self.grad_role),
                                                                       real(self, scalars))[1])
    (eager, fast), launched = _launched(lambda: _parity(geometry, "sgd_momentum", steps=4))
    assert sorted(replayed, key=str) == [0, None], replayed        # direction (reads grads), retraction
    assert not {"_pom_kernel", "_pom_retract_kernel"} & launched, launched
    notes = fast[2].backend_notes()
    assert any("pom's fast path launches no fused update kernel for Stiefel components or feature_std" in line
               and "conv1.weight, conv2.weight" in line for line in notes), notes
    assert not any("eager program" in line for line in notes), notes
    backend = fast[2]._installation.backend
    assert backend._plan is not None and backend._plan.replays > 0, "the recorded torch steps never replayed"


def test_pom_nonfinite_gradient_is_counted_and_passed_through_like_eager():
    runs = []
    for backend in ("eager", "triton"):
        model, opt, plan = _setup("pom", "sgd_momentum", backend)
        for step in range(3):
            _grads(model, 1, torch.float32)
            if step == 1:
                model.conv1.weight.grad[0, 1, 2, 0] = float("nan")
            opt.step()
        runs.append((model, plan.diagnostics()))
    (eager, d_eager), (fast, d_fast) = runs
    # steps 1 (the gradient) and 2 (the weight entry that step 1 made NaN) are counted
    assert d_eager["conv1.weight"]["pom"]["nonfinite_steps"] == d_fast["conv1.weight"]["pom"]["nonfinite_steps"] == 2
    assert d_fast["conv2.weight"]["pom"]["nonfinite_steps"] == 0
    for name in ("conv1.weight", "conv2.weight"):
        torch.testing.assert_close(fast.get_parameter(name), eager.get_parameter(name), rtol=1e-5, atol=1e-6,
                                   equal_nan=True)
    assert torch.isnan(fast.conv1.weight[0, 1, 2, 0]) and torch.isfinite(fast.conv1.weight[0, 0]).all()


@pytest.mark.parametrize("geometry, opt_name", [("sobolev", "adam"), ("psi", "sgd_momentum")])
def test_channels_last_weights(geometry, opt_name):
    _parity(geometry, opt_name, channels_last=True, steps=3)


@pytest.mark.parametrize("geometry", ["sobolev", "psi"])
def test_bf16_parameters(geometry):
    _parity(geometry, "adam", dtype=torch.bfloat16, steps=3)


def test_float64_parameter_runs_eager_and_the_rest_fused():
    def model64():
        m = Net()
        m.head.double()
        return m
    runs = []
    for backend in ("eager", "triton"):
        torch.manual_seed(0)
        model = model64()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        plan = gc.apply(model, _policy("sobolev"), opt, backend=backend)     # fx capture: no inputs needed
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            opt.step()
        runs.append((model, opt, plan))
    assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1], "float64 head")
    lines = runs[1][2].backend_notes()  # the backend's report, as plan.summary() shows it
    assert any("eager program for head.weight: float64" in line for line in lines), lines


# ---- fused parameters and the base optimizer ----------------------------------------------------
def test_fused_parameters_are_hidden_from_the_base_step_and_grads_restored():
    model, opt, plan = _setup("psi", "sgd_momentum", "triton")
    _grads(model, 1, torch.float32)
    grads = {n: p.grad for n, p in model.named_parameters()}
    raw = {n: g.clone() for n, g in grads.items()}
    opt.step()
    for n, p in model.named_parameters():
        assert p.grad is grads[n], f"{n}: the grad object was not restored"
    for n in ("conv1.weight", "conv2.weight"):                # fused: the kernel only reads the gradient
        assert torch.equal(model.get_parameter(n).grad, raw[n])
    assert plan.backend.hidden_grads == 0
    assert opt.state[model.conv1.weight]["momentum_buffer"].dtype == torch.float32


def test_adam_state_matches_torch_types():
    model, opt, _ = _setup("sobolev", "adam", "triton")
    _step(model, opt, 1)
    state = opt.state[model.conv1.weight]
    assert state["step"].device.type == "cpu" and state["step"].dtype == torch.float32 and state["step"].dim() == 0
    assert float(state["step"]) == 1.0
    assert state["exp_avg"].shape == model.conv1.weight.shape


@pytest.mark.parametrize("geometry, opt_name", [("psi", "adam"), ("sobolev", "sgd_momentum")])
@pytest.mark.parametrize("first, then", [("eager", "triton"), ("triton", "eager")])
def test_state_dict_moves_between_backends(geometry, opt_name, first, then):
    reference = _setup(geometry, opt_name, "eager")
    for step in range(STEPS):
        _step(reference[0], reference[1], step)
    model, opt, _ = _setup(geometry, opt_name, first)
    for step in range(3):
        _step(model, opt, step)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = Net()
    resumed.load_state_dict(saved_model)
    resumed_opt = OPTIMIZERS[opt_name](*_groups(resumed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        gc.apply(resumed, _policy(geometry), resumed_opt, example_inputs=INPUTS, backend=then)
    resumed_opt.load_state_dict(saved_opt)
    for step in range(3, STEPS):
        _step(resumed, resumed_opt, step)
    assert_same(reference[0], reference[1], resumed, resumed_opt, f"{first} -> {then}")


@pytest.mark.parametrize("geometry, opt_name", [("sobolev", "sgd_momentum"), ("psi", "adam")])
def test_lr_scheduler_is_honoured_without_new_tables(geometry, opt_name):
    runs = []
    for backend in ("eager", "triton"):
        model, opt, plan = _setup(geometry, opt_name, backend)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch))
        slots = []
        for step in range(5):
            _step(model, opt, 1)                   # the same gradient values each step, new tensors
            sched.step()
            if backend == "triton":
                slots.append(len(plan.backend.cache))
        runs.append((model, opt))
    assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1], f"{geometry}/{opt_name} with LambdaLR")
    assert slots[1:] == slots[1:2] * 4, f"table slots grew with the lr: {slots}"


# ---- reports ----------------------------------------------------------------------------------------
def test_describe_reports_fused_transform_only_and_eager():
    model, opt, plan = _setup("spectral+sobolev", "sgd_momentum", "triton")
    lines = plan.backend_notes()        # the backend's report, as plan.summary() shows it
    assert any("fused" in line and "SGD" in line for line in lines), lines
    assert any("spectral's fast path launches no fused update kernel" in line and "never fused" in line
               for line in lines), lines
    model, opt, plan = _setup("psi", "rmsprop_centered_momentum", "triton")
    lines = plan.backend_notes()        # the backend's report, as plan.summary() shows it
    assert any("gradient-transform kernels only" in line and "RMSprop has no fused kernel" in line
               for line in lines), lines
    model, opt, plan = _setup("sobolev", "adam_amsgrad", "triton")
    assert any("amsgrad=True is not fused" in line for line in plan.backend_notes())
    model, opt, plan = _setup("sobolev+pom", "sgd", "triton")
    assert any("later-stage geometry" in line for line in plan.backend_notes())


# ---- backend selection ----------------------------------------------------------------------------
CUDA_PARAM = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))


def test_triton_is_selectable_on_cpu_under_the_interpreter():
    backend, notes = select_backend("triton", [torch.zeros(2, 2)])
    assert isinstance(backend, TritonBackend) and notes == []


def test_triton_on_cpu_without_the_interpreter_raises_with_the_fix(monkeypatch):
    monkeypatch.setattr(triton_backend, "interpreted", lambda: False)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(gc.GeomCompileError, match=r"TRITON_INTERPRET=1.*backend='eager' or 'compile'"):
        gc.apply(model, _policy("psi"), opt, example_inputs=INPUTS, backend="triton")
    assert not opt._optimizer_step_pre_hooks, "a failed install must leave the optimizer untouched"


def test_without_triton_triton_raises_and_auto_falls_back_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)          # `import triton` now raises ImportError
    with pytest.raises(gc.GeomCompileError, match="Triton is not installed"):
        select_backend("triton", [torch.zeros(2)])
    backend, notes = select_backend("auto", [CUDA_PARAM])
    assert isinstance(backend, EagerBackend)
    assert notes and "auto -> eager" in notes[0] and "Triton is not installed" in notes[0]


def test_auto_is_eager_on_cpu_and_for_cuda_under_the_interpreter():
    backend, notes = select_backend("auto", [torch.zeros(2)])
    assert isinstance(backend, EagerBackend) and notes == ["backend auto -> eager (parameters on CPU)"]
    backend, notes = select_backend("auto", [CUDA_PARAM])
    assert isinstance(backend, EagerBackend) and "CPU tensors only" in notes[0]
    with pytest.raises(gc.GeomCompileError, match="CPU tensors only"):
        select_backend("triton", [CUDA_PARAM])


def test_auto_picks_triton_for_cuda_when_the_self_test_passes(monkeypatch):
    monkeypatch.setattr(triton_backend, "triton_problem", lambda params: None)
    monkeypatch.setattr(triton_backend, "self_test", lambda device: None)
    backend, notes = select_backend("auto", [CUDA_PARAM])
    assert isinstance(backend, TritonBackend) and notes == ["backend auto -> triton (CUDA parameters)"]
    monkeypatch.setattr(triton_backend, "self_test", lambda device: "RuntimeError: no kernel image")
    backend, notes = select_backend("auto", [CUDA_PARAM])
    assert isinstance(backend, EagerBackend) and "self-test failed on cuda:0: RuntimeError" in notes[0]


def test_self_test_passes_on_cpu_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_backend, "_SELF_TEST_PASSED", set())
    assert triton_backend.self_test("cpu") is None


def test_a_failed_self_test_is_tried_again_and_a_pass_is_remembered(monkeypatch):
    """A transient failure (a CUDA error at the first install) must not make `auto` pick eager for
    the rest of the process."""
    monkeypatch.setattr(triton_backend, "_SELF_TEST_PASSED", set(), raising=False)
    real, calls = triton_backend._kernels, []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: launch failed (transient)")
        return real()
    monkeypatch.setattr(triton_backend, "_kernels", flaky)
    assert "transient" in triton_backend.self_test("cpu")
    assert triton_backend.self_test("cpu") is None
    assert triton_backend.self_test("cpu") is None and len(calls) == 2

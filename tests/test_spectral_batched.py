"""spectral's batched step (geometries/spectral.py: one solve for the layers of a bucket that share a
convolution) against the per-layer reference, and its two fast paths (CompiledSpectral,
kernels/spectral.SpectralFamily) beyond the registry matrix.

* The explicit adjoint (a grouped transposed convolution, then the adjoint of the padding): the
  adjoint identity ⟨M x, y⟩ = ⟨x, Mᵀ y⟩ per layer, Mᵀ y against autograd's vector-Jacobian product
  of the per-layer convolution, and MᵀM x against the eager gram_matvec, for strides, dilations,
  groups, asymmetric padding, circular, reflect and replicate padding, 1-d / 2-d / 3-d. Float64.
* The batched solver against the per-layer solver step for step, including degenerate start blocks
  (a collapsed block is nudged; converged vectors make every residual direction a dropped row).
* Training: the batched backends against eager over several steps with `every` > 1, two convolution
  configurations (strides) with the same weight shape in one model (mixed buckets), a reflect-padded
  layer (batched since 2026-12-04), the warm-start state, and a state_dict save / load in the middle
  of the run.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import geomcompile as gc
from geomcompile.geometries import spectral as S
from geomcompile.runtime import compile_backend


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny operators: one thread avoids OpenMP hand-offs on a busy machine (tests/test_spectral.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the operator and its explicit adjoint ---------------------------------------------------------
CONVS = {   # name: (module, input size, boundary)
    "plain": (lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False), (6, 5), "module"),
    "stride2": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False), (7, 6), "module"),
    "stride2_even_input": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False), (8, 6), "module"),
    "dilation2": (lambda: nn.Conv2d(2, 3, 3, padding=2, dilation=2, bias=False), (5, 7), "module"),
    "groups2": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False), (5, 5), "module"),
    "depthwise_stride2": (lambda: nn.Conv2d(3, 3, 3, stride=2, padding=1, groups=3, bias=False), (7, 7), "module"),
    "same_even_kernel": (lambda: nn.Conv2d(2, 3, 4, padding="same", bias=False), (6, 5), "module"),  # asymmetric
    "no_padding": (lambda: nn.Conv2d(2, 3, 3, bias=False), (6, 5), "module"),
    "circular_module": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", bias=False), (5, 6), "module"),
    "circular_boundary": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False), (6, 5), "circular"),
    "conv1d_stride2": (lambda: nn.Conv1d(3, 4, 5, padding=2, stride=2, bias=False), (13,), "module"),
    "conv3d_groups": (lambda: nn.Conv3d(2, 4, 3, padding=1, groups=2, bias=False), (3, 4, 3), "module"),
    "conv3d_circular": (lambda: nn.Conv3d(2, 3, 3, stride=(1, 2, 1), padding=1, bias=False), (3, 4, 3), "circular"),
    "reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=False), (5, 6), "module"),
    "reflect_stride2_pad2": (lambda: nn.Conv2d(2, 3, 5, stride=2, padding=2, padding_mode="reflect", bias=False),
                             (7, 6), "module"),
    "replicate": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate", bias=False), (6, 5), "module"),
    "replicate_dilation2": (lambda: nn.Conv2d(2, 3, 3, padding=2, dilation=2, padding_mode="replicate", bias=False),
                            (5, 7), "module"),
    "conv1d_reflect": (lambda: nn.Conv1d(3, 4, 5, padding=2, padding_mode="reflect", bias=False), (9,), "module"),
    "conv3d_replicate": (lambda: nn.Conv3d(2, 3, 3, padding=1, padding_mode="replicate", bias=False), (3, 4, 3),
                         "module"),
}
LAYERS = 3


def _layers(name: str, dtype=torch.float64):
    """(spec, weights (L, ...)) of LAYERS random kernels of the named convolution."""
    make, size, boundary = CONVS[name]
    torch.manual_seed(sum(map(ord, name)))
    convs = [make() for _ in range(LAYERS)]
    c = convs[0]
    spec = S.conv_spec(c.weight.shape, size, c.stride, c.padding, c.dilation, c.groups, c.padding_mode, boundary)
    return spec, torch.stack([conv.weight.detach().to(dtype) for conv in convs])


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", list(CONVS))
def test_explicit_adjoint_against_autograd_and_the_adjoint_identity(name):
    spec, weights = _layers(name)
    g = torch.Generator().manual_seed(0)
    X = torch.randn((LAYERS, 2, *spec.input_shape), generator=g, dtype=torch.float64)
    Y = torch.randn(S.conv_layers(X, weights, spec).shape, generator=g, dtype=torch.float64)
    MX, MtY = S.conv_layers(X, weights, spec), S.conv_adjoint_layers(Y, weights, spec)
    assert MtY.shape == X.shape
    for l in range(LAYERS):
        # ⟨M x, y⟩ = ⟨x, Mᵀ y⟩ per layer (the layers must not leak into each other)
        torch.testing.assert_close((MX[l] * Y[l]).sum(), (X[l] * MtY[l]).sum(), rtol=1e-12, atol=1e-12)
        x = X[l].clone().requires_grad_(True)
        y = S.conv_matvec(x, weights[l], spec)
        torch.testing.assert_close(MX[l], y.detach(), rtol=0, atol=1e-12)
        (vjp,) = torch.autograd.grad(y, x, Y[l])
        torch.testing.assert_close(MtY[l], vjp, rtol=0, atol=1e-12)
        _, gram = S.gram_matvec(X[l], weights[l], spec)
        torch.testing.assert_close(S.gram_matvec_layers(X, weights, spec)[1][l], gram, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_reflect_and_replicate_adjoints_equal_autograd_of_the_padding_bit_for_bit(mode):
    """pad_adjoint is F.pad's backward op, the one autograd runs in the per-layer program."""
    spec = S.conv_spec((3, 2, 3, 3), (5, 6), 1, (1, 2), 1, 1, mode)
    x = torch.randn(4, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    padded = S._pad(x, spec)
    z = torch.randn_like(padded)
    (want,) = torch.autograd.grad(padded, x, z)
    assert torch.equal(S.pad_adjoint(z, spec), want)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", ["plain", "stride2", "groups2", "same_even_kernel", "circular_boundary",
                                  "conv1d_stride2", "conv3d_groups", "reflect_stride2_pad2", "conv3d_replicate"])
def test_penalty_gradient_of_layers_equals_the_per_layer_gradient(name):
    spec, weights = _layers(name)
    g = torch.Generator().manual_seed(1)
    v = torch.randn((LAYERS, *spec.input_shape), generator=g, dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    got = S.penalty_grad_layers(weights, v, sign, spec)
    for l in range(LAYERS):
        torch.testing.assert_close(got[l], S.penalty_grad(weights[l], v[l], sign[l], spec), rtol=0, atol=1e-12)


# ---- the batched solver against the per-layer one ---------------------------------------------------
def _per_layer(weights, spec, V, iters, alpha=1.0, tie_tol=1e-3):
    return [S.spectral_penalty_step(weights[l], spec, alpha, V[l], iters, 0.0, tie_tol) for l in range(len(V))]


def _assert_steps_match(batched, reference, tol):
    for l, ref in enumerate(reference):
        for what, got, want in [("vectors", batched.solve.vectors[l], ref.solve.vectors),
                                ("theta", batched.solve.theta[l], ref.solve.theta),
                                ("residual", batched.solve.residual[l], ref.solve.residual),
                                ("lam", batched.lam[l], ref.lam), ("value", batched.value[l], ref.value),
                                ("grad", batched.grad[l], ref.grad), ("ambiguous", batched.ambiguous[l], ref.ambiguous)]:
            torch.testing.assert_close(got, want, **tol, msg=lambda m: f"layer {l} {what}: {m}")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", ["plain", "stride2", "dilation2", "groups2", "same_even_kernel",
                                  "circular_module", "conv1d_stride2", "conv3d_circular", "reflect",
                                  "replicate_dilation2", "conv1d_reflect"])
@pytest.mark.parametrize("iters", [1, 6])
def test_batched_step_equals_the_per_layer_step(name, iters):
    spec, weights = _layers(name)
    V = torch.stack([S.initial_block(spec, torch.float64, seed=l) for l in range(LAYERS)])
    nudge = S.nudge_of(spec, S.BLOCK, torch.float64, torch.device("cpu"))
    batched = S.spectral_penalty_step_layers(weights, spec, 1.0, V, iters, 1e-3, nudge)
    _assert_steps_match(batched, _per_layer(weights, spec, V, iters), dict(rtol=1e-9, atol=1e-10))
    assert batched.solve.iters == iters


def test_degenerate_start_blocks_follow_the_per_layer_rules():
    """Layer 0: a collapsed start block (all rows equal: nudged). Layer 1: converged vectors (every
    residual direction dropped: zero rows kept out of the picks). Layer 2: a random block. One solve."""
    spec, weights = _layers("plain")
    converged = S.spectral_penalty_step(weights[1], spec, 1.0, S.initial_block(spec, torch.float64, seed=1),
                                        300, 1e-13).solve.vectors
    random = S.initial_block(spec, torch.float64, seed=2)
    collapsed = random[:1].expand_as(random).clone()
    V = torch.stack([collapsed, converged, random])
    nudge = S.nudge_of(spec, S.BLOCK, torch.float64, torch.device("cpu"))
    batched = S.spectral_penalty_step_layers(weights, spec, 1.0, V, 4, 1e-3, nudge)
    _assert_steps_match(batched, _per_layer(weights, spec, V, 4), dict(rtol=1e-8, atol=1e-9))
    flat = batched.solve.vectors.reshape(LAYERS, V.shape[1], -1)
    torch.testing.assert_close(flat @ flat.mT, torch.eye(V.shape[1], dtype=torch.float64).expand(LAYERS, -1, -1),
                               rtol=0, atol=1e-9)
    assert batched.solve.theta[1, -1] > 1e-6, "a dropped (zero) row was picked as the bottom Ritz pair"


# ---- training: the fast paths against eager ------------------------------------------------------------
class MixedNet(nn.Module):
    """conv2 / conv3 share a weight shape with conv4 but not its stride: two ConvSpecs of one shape (two
    batched solves in one bucket); conv1 is alone; conv5's reflect padding is a spec of its own."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.conv4 = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False)
        self.conv5 = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", bias=False)

    def forward(self, x):
        return self.conv5(self.conv4(self.conv3(self.conv2(self.conv1(x))))).mean()


EXAMPLE = (torch.zeros(1, 3, 8, 8),)
STATE_KEYS = ("V", "theta", "residual", "steps", "calls", "ambiguous", "nonfinite_steps")


def _policy(every=2, **opts):
    return {"version": 1, "rules": [{"name": "s", "match": {"kind": "conv"},
                                     "use": {"spectral": {"coef": 0.1, "every": every, "init_iters": 30, **opts}}}]}


def _install(backend, policy, dtype=torch.float32):
    torch.manual_seed(0)
    model = MixedNet().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        plan = gc.apply(model, policy, opt, example_inputs=tuple(x.to(dtype) for x in EXAMPLE), backend=backend)
    return model, opt, plan


def _steps(model, opt, steps, first=0, nan_at=None):
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(10 + step)
        for name, p in model.named_parameters():
            p.grad = (0.5 * torch.randn(p.shape, generator=g)).to(p.dtype)
            if name == "conv2.weight" and step == nan_at:
                p.grad[0, 0, 0, 0] = float("nan")
        if step == 3:
            model.conv3.weight.grad = None          # no gradient: its calls do not advance, the bucket shrinks
        opt.step()


def _assert_same_run(a, b, tol, what):
    (model_a, _, plan_a), (model_b, _, plan_b) = a, b
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(pb, pa, **tol, equal_nan=True, msg=lambda m: f"{what} {name}: {m}")
        sa, sb = plan_a.state.of(name, "spectral"), plan_b.state.of(name, "spectral")
        assert sorted(sa) == sorted(sb), f"{what} {name}: state keys"
        for key in STATE_KEYS:
            va, vb = sa[key], sb[key]
            if isinstance(va, torch.Tensor):
                assert (va.dtype, va.shape, va.device) == (vb.dtype, vb.shape, vb.device), f"{what} {name}.{key}"
                torch.testing.assert_close(vb, va, **tol, msg=lambda m: f"{what} {name}.{key}: {m}")
            else:
                assert type(va) is type(vb) and va == vb, f"{what} {name}.{key}: {va!r} vs {vb!r}"


# float32: a batched matmul / grouped convolution rounds differently from the per-layer one (1e-7),
# which the LOBPCG step amplifies in its vectors by the conditioning of the Ritz problem (tests/
# test_triton_backend.py::assert_same_geometry_state); float64 shows the algebra is the same.
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


@pytest.fixture
def uncompiled(monkeypatch):
    """torch.compile replaced by the identity: the program's own arithmetic, in seconds (compiled
    parity is the matrix's job, and test_compiled_mixed_buckets_do_not_recompile's)."""
    monkeypatch.setattr(compile_backend, "_CACHE", type(compile_backend._CACHE)())
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)


@pytest.mark.parametrize("backend, dtype", [("compile", torch.float64), ("compile", torch.float32),
                                            ("triton", torch.float32)])     # the Triton backend takes no float64
def test_fast_paths_match_eager_with_every_and_mixed_buckets(backend, dtype, uncompiled):
    policy = _policy(every=2)
    eager, fast = _install("eager", policy, dtype), _install(backend, policy, dtype)
    for step in range(7):
        _steps(eager[0], eager[1], 1, first=step)
        _steps(fast[0], fast[1], 1, first=step)
        _assert_same_run(eager, fast, TOL[dtype], f"{backend} step {step}")
    state = fast[2].state.of("conv3.weight", "spectral")
    assert state["calls"] == 6 and state["steps"] == 3, state      # step 3 had no gradient; every=2
    if backend == "compile":
        used = [key for key, entry in compile_backend._CACHE.items() if key[:2] == ("transform", "spectral") and entry.calls]
        assert used and max(len(key[3]) for key in used) == 5, "conv1-conv5 never ran in one call"
    else:
        assert any("launches no fused update kernel" in line for line in fast[2].backend_notes())
        # decided anew at steps 0, 1 (momentum buffers appeared), 3 and 4 (conv3's gradient went and came
        # back); steps 2, 5 and 6 replay the recorded torch step, with the schedule decided at each run
        assert fast[2].backend._plan.replays == 2, "the step plan was not replayed"


@pytest.mark.parametrize("backend", ["compile", "triton"])
def test_non_finite_gradient_and_weight_are_counted_like_eager(backend, uncompiled):
    """A NaN gradient entry makes the weight entry NaN (plain torch); later solves read it as 0 and
    count the step; the batched step must do the same per layer, leaving the other layers alone."""
    policy = _policy(every=1)
    eager, fast = _install("eager", policy), _install(backend, policy)
    _steps(eager[0], eager[1], 5, nan_at=1)
    _steps(fast[0], fast[1], 5, nan_at=1)
    _assert_same_run(eager, fast, TOL[torch.float32], backend)
    counted = {n: int(fast[2].state.of(n, "spectral")["nonfinite_steps"]) for n, _ in fast[0].named_parameters()}
    assert counted["conv2.weight"] == 3 and counted["conv1.weight"] == 0, counted


@pytest.mark.parametrize("backend", ["compile", "triton"])
def test_state_dict_mid_run_resumes_exactly(backend, uncompiled):
    policy = _policy(every=2)
    reference = _install(backend, policy)
    _steps(reference[0], reference[1], 7)
    run = _install(backend, policy)
    _steps(run[0], run[1], 3)
    saved_model, saved_opt = copy.deepcopy(run[0].state_dict()), copy.deepcopy(run[1].state_dict())
    resumed = _install(backend, policy)
    resumed[0].load_state_dict(saved_model)
    resumed[1].load_state_dict(saved_opt)
    _steps(resumed[0], resumed[1], 4, first=3)
    _assert_same_run(reference, resumed, dict(rtol=0, atol=0), f"{backend} resumed")


def test_the_batched_step_and_the_torch_step_are_reported():
    """Every layer, the reflect-padded conv5 included, runs the batched step; none falls back."""
    _, _, compiled = _install("compile", _policy())
    notes = compiled.backend_notes()
    assert any("runs spectral" in line and "(5 unit(s))" in line for line in notes), notes
    assert not any("eager program" in line for line in notes), notes
    _, opt, triton = _install("triton", _policy())
    notes = triton.backend_notes()
    assert any("launches no fused update kernel" in line and "never fused" in line
               and "conv4.weight and 1 more" in line for line in notes), notes      # all five
    assert not any("eager program" in line for line in notes), notes
    assert not any("fused:" in line for line in notes), notes


def test_triton_backend_never_fuses_spectral():
    """SGD with momentum would be fused for a kernel family in the last stage; spectral's is not, so
    the base optimizer steps every parameter itself (its gradient is never hidden from it)."""
    model, opt, plan = _install("triton", _policy(every=1))
    seen = []
    hook = opt.register_step_pre_hook(lambda *_: seen.append(plan.backend.hidden_grads))
    _steps(model, opt, 3)
    hook.remove()
    assert plan.backend.hidden_grads == 0 and all(p.grad is not None for p in model.parameters())
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())


def test_compiled_mixed_buckets_do_not_recompile_as_counters_change():
    """Really compiled: calls / steps change at every step, but never enter the compiled function
    (Program.host_step), so after its first call a recompilation is an error."""
    import torch._dynamo
    policy = _policy(every=1, power_iters=1)
    eager, fast = _install("eager", policy), _install("compile", policy)
    for step in range(4):
        if step == 2:
            torch._dynamo.config.error_on_recompile = True
        try:
            _steps(eager[0], eager[1], 1, first=step)
            _steps(fast[0], fast[1], 1, first=step)
        finally:
            torch._dynamo.config.error_on_recompile = False
        _assert_same_run(eager, fast, TOL[torch.float32], f"compiled step {step}")
    assert not any("failed" in line for line in fast[2].backend_notes()), fast[2].backend_notes()

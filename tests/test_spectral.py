"""spectral (seed 004): σ_max(MᵀM − αI) of a convolution's true operator, matrix-free.

Ground truths: the dense M built by running the nn.Conv module itself on every basis input (so
the reference shares no code with the library), its eigenvalues by eigvalsh and the gradient by
autograd through eigvalsh; for circular convolutions the exact spectrum from the kernel's DFT
(Sedghi, Gupta & Long 2019). All in float64.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import geomcompile as gc
from geomcompile.geometries.spectral import Spectral, conv_matrix, conv_spec

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
ITERS = 400   # enough for the small cases below to converge to rounding (warm start not needed)


@pytest.fixture(autouse=True)
def one_thread():
    """Every operator here is tiny: with several threads on a busy machine OpenMP hand-offs make the
    module 10x slower (measured), with one it runs in seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_operator(conv: nn.Module, weight: torch.Tensor, input_size) -> torch.Tensor:
    """M(weight) as a dense matrix, differentiable in weight: the module applied to every basis input."""
    conv = copy.deepcopy(conv).to(weight.dtype)
    conv.bias = None                      # M is the linear part
    shape = (conv.in_channels, *input_size)
    n = math.prod(shape)
    basis = torch.eye(n, dtype=weight.dtype).reshape(n, *shape)
    out = torch.func.functional_call(conv, {"weight": weight}, (basis,))
    return out.reshape(n, -1).T


def dense_penalty(conv: nn.Module, weight: torch.Tensor, input_size, alpha: float):
    """(R, ∇R, eigenvalues of MᵀM − αI) from the dense matrix."""
    w = weight.detach().clone().requires_grad_(True)
    M = dense_operator(conv, w, input_size)
    eig = torch.linalg.eigvalsh(M.T @ M - alpha * torch.eye(M.shape[1], dtype=w.dtype))
    R = eig.abs().max()
    (grad,) = torch.autograd.grad(R, w)
    return R.detach(), grad, eig.detach()


CASES = {   # name: (module, input size, alpha); float64, kernels uniform in [0, 1] as in the paper
    "conv2d_nonsquare": (lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False), (6, 5), 1.0),
    "stride2": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False), (7, 6), 1.0),
    "dilation2": (lambda: nn.Conv2d(2, 3, 3, padding=2, dilation=2, bias=False), (5, 7), 1.0),
    "depthwise": (lambda: nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False), (5, 6), 1.0),
    "groups2": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False), (5, 5), 1.0),
    "even_kernel_same": (lambda: nn.Conv2d(2, 3, 4, padding="same", bias=False), (6, 5), 1.0),
    "reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=False), (5, 6), 1.0),
    "replicate_stride2": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="replicate",
                                            bias=False), (7, 5), 1.0),
    "circular_module": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", bias=False), (5, 6), 1.0),
    "conv1d": (lambda: nn.Conv1d(3, 4, 5, padding=2, stride=2, bias=False), (13,), 1.0),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3, padding=1, bias=False), (3, 4, 3), 1.0),
    # α − σ_min² gives R: M is the symmetric Toeplitz matrix of [0.55, 1, 0.55], eigenvalues
    # 1 + 1.1·cos(jπ/6), so MᵀM has the well separated smallest eigenvalues 0.0022 and 0.2025.
    "negative_end": (lambda: nn.Conv1d(1, 1, 3, padding=1, bias=False), (5,), 3.0),
}
KERNELS = {"negative_end": torch.tensor([[[0.55, 1.0, 0.55]]], dtype=torch.float64)}


def _module(name: str) -> tuple[nn.Module, tuple, float]:
    make, size, alpha = CASES[name]
    torch.manual_seed(sum(map(ord, name)))
    conv = make().double()
    with torch.no_grad():
        conv.weight.copy_(KERNELS[name]) if name in KERNELS else conv.weight.uniform_(0, 1)
    return conv, size, alpha


def _functional(conv: nn.Module, size, alpha, **kw):
    return gc.functional.spectral_penalty(conv.weight.detach(), size, alpha, conv.stride, conv.padding,
                                          conv.dilation, conv.groups, padding_mode=conv.padding_mode, **kw)


@pytest.mark.parametrize("name", list(CASES))
def test_matrix_free_operator_equals_the_modules_matrix(name):
    conv, size, _ = _module(name)
    spec = conv_spec(conv.weight.shape, size, conv.stride, conv.padding, conv.dilation, conv.groups,
                     conv.padding_mode)
    expected = dense_operator(conv, conv.weight.detach(), size)
    got = conv_matrix(conv.weight.detach(), spec)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_penalty_and_gradient_match_the_dense_eigenvalue(name):
    conv, size, alpha = _module(name)
    R, grad, eig = dense_penalty(conv, conv.weight, size, alpha)
    top2 = eig.abs().sort(descending=True).values[:2]
    assert top2[0] - top2[1] > 1e-3 * top2[0], "test case has a (nearly) double top eigenvalue; pick another seed"
    value, got, state = _functional(conv, size, alpha, iters=ITERS)
    torch.testing.assert_close(value, R, rtol=1e-4, atol=0)
    torch.testing.assert_close(got, grad, rtol=1e-3, atol=1e-3 * grad.abs().max().item())
    if name == "negative_end":
        assert state["lam"] < 0, "this case is meant to take the top |λ| from the negative end"


def test_functional_is_pure_and_warm_start_continues():
    conv, size, alpha = _module("stride2")
    R, _, _ = dense_penalty(conv, conv.weight, size, alpha)
    _, _, s1 = _functional(conv, size, alpha, iters=3, tol=0.0)
    V = s1["V"].clone()
    _, _, s2 = _functional(conv, size, alpha, iters=20, tol=0.0, state=s1)
    assert torch.equal(s1["V"], V), "the state passed in was modified"
    v1, v2 = abs(s1["lam"].abs() - R), abs(s2["lam"].abs() - R)
    assert v2 < 1e-3 * v1 and s2["residual"].max() < s1["residual"].max()


def test_low_precision_weights_are_processed_in_float32():
    w = torch.rand(3, 2, 3, 3)
    value32, grad32, _ = gc.functional.spectral_penalty(w, (6, 6), padding=1, iters=30)
    value, grad, state = gc.functional.spectral_penalty(w.bfloat16(), (6, 6), padding=1, iters=30)
    assert grad.dtype == torch.bfloat16 and state["V"].dtype == torch.float32
    torch.testing.assert_close(value, value32, rtol=2e-2, atol=0)
    torch.testing.assert_close(grad.float(), grad32, rtol=2e-2, atol=2e-2 * grad32.abs().max().item())


# ---- both ends against dense eigvalsh, with the geometry's default schedule ---------------------------
def _near_isometric(conv: nn.Module, noise: float, seed: int) -> torch.Tensor:
    """The identity kernel on the shared channels plus noise: a spectrum around 1 where either end
    can give R, as in training once the penalty acts (uniform kernels only ever give the top)."""
    w = torch.zeros_like(conv.weight)
    centre = [k // 2 for k in w.shape[2:]]
    for o in range(min(w.shape[0], w.shape[1] * conv.groups)):
        w[(o, o % w.shape[1], *centre)] = 1.0
    g = torch.Generator().manual_seed(seed)
    return w + noise * torch.randn(w.shape, generator=g, dtype=w.dtype)


LAYERS = {   # name: (module, input size); float64
    "conv3x3": (lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False), (6, 5)),
    "stride2": (lambda: nn.Conv2d(2, 12, 3, stride=2, padding=1, bias=False), (6, 6)),
    "stride2_wide": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False), (6, 5)),
    "dilation2": (lambda: nn.Conv2d(2, 3, 3, padding=2, dilation=2, bias=False), (5, 7)),
    "depthwise": (lambda: nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False), (5, 6)),
    "groups2": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False), (5, 5)),
    "reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=False), (5, 6)),
    "replicate": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="replicate", bias=False), (5, 6)),
    "circular": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", bias=False), (5, 6)),
    "conv1d_stride2": (lambda: nn.Conv1d(2, 5, 5, padding=2, stride=2, bias=False), (13,)),
    "depthwise4": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), (6, 6)),
}
# top: α = 1 (the largest singular value gives R); bottom: α = 0.6·λ_max (α − λ_min gives R);
# tie: α = (λ_min + λ_max)/2, the two ends give the same |λ| (built on purpose: the counter must fire).
ENDS = ("top", "bottom", "tie")
TWO_END_CASES = [(layer, end) for layer in LAYERS for end in ENDS
                 if not (layer == "stride2_wide" and end == "bottom")]   # λ_min = 0 is a null space there


def _two_end_case(layer: str, end: str):
    make, size = LAYERS[layer]
    seed = sum(map(ord, layer)) + ENDS.index(end)
    torch.manual_seed(seed)
    conv = make().double()
    with torch.no_grad():
        conv.weight.copy_(_near_isometric(conv, 0.25, seed))
    M = dense_operator(conv, conv.weight.detach(), size)
    eig = torch.linalg.eigvalsh(M.T @ M)
    alpha = {"top": 1.0, "bottom": 0.6 * eig[-1].item(), "tie": (eig[0] + eig[-1]).item() / 2}[end]
    return conv, size, alpha, eig


def _default_schedule(conv, size, alpha, steps: int = 4):
    """The geometry's defaults with fixed weights: init_iters at the first step, then power_iters."""
    o = Spectral().opts
    kw = dict(block=o["block"], tol=o["tol"], tie_tol=o["tie_tol"])
    out = [_functional(conv, size, alpha, iters=o["init_iters"], **kw)]
    for _ in range(steps - 1):
        out.append(_functional(conv, size, alpha, iters=o["power_iters"], state=out[-1][2], **kw))
    return out


@pytest.mark.parametrize("layer,end", TWO_END_CASES)
def test_both_ends_against_dense_eigvalsh(layer, end):
    conv, size, alpha, eig = _two_end_case(layer, end)
    R, grad, _ = dense_penalty(conv, conv.weight, size, alpha)
    lam = eig - alpha
    steps = _default_schedule(conv, size, alpha)
    if end == "tie":
        for value, _, state in steps:
            assert state["ambiguous"], f"{layer}: the ends tie ({lam[0]:.6f}, {lam[-1]:.6f}), the counter must fire"
            torch.testing.assert_close(value, R, rtol=1e-3, atol=0)
        return
    exact_end = 1.0 if lam[-1].abs() > lam[0].abs() else -1.0
    assert (exact_end > 0) == (end == "top"), "test case does not take R from the end it is named after"
    same_end = lam.flip(0) if exact_end > 0 else lam
    # a real kernel's periodic operator pairs the frequencies ω and −ω: double eigenvalues, whose
    # gradient is not defined (any vector of the eigenspace is exact); R and the end are still checked
    simple = bool((same_end[0] - same_end[1]).abs() > 1e-3 * R)
    assert simple or layer == "circular", "the eigenvalue giving R is (nearly) double; pick another seed"
    for i, (value, got, state) in enumerate(steps):
        assert float(torch.sign(state["lam"])) == exact_end, f"{layer}: wrong end at step {i}"
        assert not state["ambiguous"], f"{layer}: the ends are {abs(lam[-1].abs() - lam[0].abs()):.3g} apart"
        torch.testing.assert_close(value, R, rtol=1e-3, atol=0)
        assert not simple or (got - grad).norm() <= 1e-3 * grad.norm(), f"{layer} step {i}: gradient off by " \
            f"{((got - grad).norm() / grad.norm()).item():.2e}"


@pytest.mark.parametrize("layer,end", TWO_END_CASES)
def test_sigma_estimates_against_dense_singular_values(layer, end):
    conv, size, alpha, eig = _two_end_case(layer, end)
    *_, (_, _, state) = _default_schedule(conv, size, alpha)
    est = gc.geometries.spectral.spectral_estimates(state["theta"], state["residual"], alpha)
    s_max, s_min = eig[-1].sqrt().item(), eig[0].clamp_min(0).sqrt().item()
    assert est["sigma_max"] == pytest.approx(s_max, rel=1e-2)
    assert est["sigma_max"] <= s_max * (1 + 1e-12)                 # a Rayleigh quotient: never above
    assert est["sigma_min"] >= s_min * (1 - 1e-12)                 # never below: an upper bound always
    if s_min > 1e-6 * s_max:
        assert est["sigma_min"] == pytest.approx(s_min, rel=1e-2)
    else:      # M is wide (stride 2, fewer outputs than inputs): σ_min = 0, the null space is found
        assert est["sigma_min"] <= est["sigma_min_residual"] + 1e-6


def test_geometry_counts_ambiguous_steps_in_diagnostics():
    torch.manual_seed(0)
    model = TinyCNN().double()
    x = torch.randn(2, 3, 8, 8).double()
    M = dense_operator(model.conv1, model.conv1.weight.detach(), (8, 8))
    eig = torch.linalg.eigvalsh(M.T @ M)
    policy = {"version": 1, "rules": [{"name": "c1", "match": {"param": "conv1.weight"},
                                       "use": {"spectral": {"coef": 0.0, "alpha": (eig[0] + eig[-1]).item() / 2}}}]}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    plan = gc.apply(model, policy, opt, example_inputs=(x,))
    for bx, y in _batches(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(bx.double()), y).backward()
        opt.step()
    d = plan.diagnostics()["conv1.weight"]["spectral"]
    assert d["ambiguous_steps"] == 3 and d["steps"] == 3
    assert d["R_residual"] >= 0 and d["sigma_max_residual"] >= 0 and d["sigma_min_residual"] >= 0


# ---- circular boundary: the exact spectrum of Sedghi, Gupta & Long (2019) --------------------------
def circular_spectrum(weight: torch.Tensor, n: int, dilation: int = 1) -> torch.Tensor:
    """Eigenvalues of MᵀM for the periodic convolution on n×n inputs: the union over 2-D frequencies
    of the eigenvalues of P(ω)ᴴP(ω), P(ω) the C_out×C_in matrix of the kernel's 2-D DFT."""
    c_out, c_in, kh, kw = weight.shape
    spread = torch.zeros(c_out, c_in, dilation * (kh - 1) + 1, dilation * (kw - 1) + 1, dtype=weight.dtype)
    spread[:, :, ::dilation, ::dilation] = weight                   # the dilated kernel
    P = torch.fft.fft2(spread, s=(n, n)).permute(2, 3, 0, 1)          # (n, n, C_out, C_in)
    return torch.linalg.eigvalsh(P.mH @ P).flatten().sort().values


# The "min" case: P(ω) = 1 + 0.8·cos ω₂ has its smallest value 0.2 at ω₂ = π, well below the next
# (0.43), so α − σ_min² gives R with a usable gap; smooth 2-D kernels cluster their smallest
# singular values and would need thousands of iterations.
MIN_KERNEL = torch.tensor([[[[0.4, 1.0, 0.4]]]], dtype=torch.float64)


@pytest.mark.parametrize("c_in,c_out,padding,dilation,alpha", [
    (3, 4, 1, 1, 1.0),          # the largest singular value gives R
    (3, 4, 0, 1, 1.0),          # the layer's padding only sets the alignment
    (2, 3, 2, 2, 1.0),          # dilation
    (1, 1, (0, 1), 1, 1.7),     # α − σ_min² gives R
])
def test_circular_boundary_matches_the_fourier_spectrum(c_in, c_out, padding, dilation, alpha):
    n = 8
    torch.manual_seed(c_in * 10 + c_out)
    weight = MIN_KERNEL if c_in == 1 else torch.rand(c_out, c_in, 3, 3, dtype=torch.float64)
    exact = circular_spectrum(weight, n, dilation)
    spec = conv_spec(weight.shape, (n, n), 1, padding, dilation, boundary="circular")
    M = conv_matrix(weight, spec)
    torch.testing.assert_close(torch.linalg.eigvalsh(M.T @ M), exact, rtol=0, atol=1e-9)

    value, _, state = gc.functional.spectral_penalty(weight, (n, n), alpha, 1, padding, dilation,
                                                     boundary="circular", iters=ITERS)
    torch.testing.assert_close(value, (exact - alpha).abs().max(), rtol=1e-6, atol=0)
    est = gc.geometries.spectral.spectral_estimates(state["theta"], state["residual"], alpha)
    from_min_end = bool(state["lam"] < 0)
    assert from_min_end == (c_in == 1), "only the last case takes R from the smallest singular value"
    torch.testing.assert_close(est["sigma_max"], exact.max().sqrt().item(), rtol=1e-6, atol=0)
    if from_min_end:      # the smooth kernels' clustered bottom is only checked where it is separated
        torch.testing.assert_close(est["sigma_min"], exact.min().sqrt().item(), rtol=1e-6, atol=0)


# ---- the geometry in training ----------------------------------------------------------------------
class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _policy(**opts):
    return {"version": 1, "rules": [{"name": "convs", "match": {"kind": "conv"}, "use": {"spectral": opts}}]}


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 3, 8, 8, generator=g), torch.randint(0, 4, (5,), generator=g)) for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _exact_R(model, name, size, alpha=1.0):
    conv = model.get_submodule(name.rpartition(".")[0])
    return dense_penalty(conv, conv.weight.detach().double(), size, alpha)[0].item()


def test_one_step_adds_coef_times_the_functional_gradient():
    torch.manual_seed(0)
    model = TinyCNN()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    plan = gc.apply(model, _policy(coef=0.5, power_iters=3, init_iters=5), opt,
                    example_inputs=(torch.randn(2, 3, 8, 8),))
    start = plan.state.of("conv2.weight", "spectral")["V"].clone()
    (x, y), = _batches(1)
    _train(model, opt, [(x, y)])
    nn.functional.cross_entropy(reference(x), y).backward()
    w = reference.conv2.weight
    _, penalty, _ = gc.functional.spectral_penalty(w.detach(), (8, 8), 1.0, 2, 1, state={"V": start}, iters=5)
    torch.testing.assert_close(model.conv2.weight, w - (w.grad + 0.5 * penalty), rtol=1e-6, atol=1e-7)


def test_large_coef_drives_R_down_and_diagnostics_report_it():
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():          # kernels like the paper's (uniform, R ≫ α) rather than PyTorch's small init
        model.conv1.weight.uniform_(0, 0.5)
        model.conv2.weight.uniform_(0, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    plan = gc.apply(model, _policy(coef=1.0), opt, example_inputs=(torch.randn(2, 3, 8, 8),))
    before = {"conv1.weight": _exact_R(model, "conv1.weight", (8, 8)), "conv2.weight": _exact_R(model, "conv2.weight", (8, 8))}
    estimates = []
    for batch in _batches(30):
        _train(model, opt, [batch])
        estimates.append(plan.diagnostics()["conv1.weight"]["spectral"]["R"])
    for name, r0 in before.items():
        r1 = _exact_R(model, name, (8, 8))
        assert r1 < 0.5 * r0, f"{name}: R {r0:.3f} -> {r1:.3f}"
    assert estimates[-1] < 0.5 * estimates[0]
    diag = plan.diagnostics()["conv2.weight"]["spectral"]
    assert {"R", "R_residual", "lambda_top", "sigma_max", "sigma_max_residual", "sigma_min", "sigma_min_residual",
            "sigma_max_bound", "sigma_min_bound", "ambiguous_steps"} <= set(diag)
    assert diag["steps"] == 30


def test_diagnostics_match_the_dense_spectrum_when_weights_are_fixed():
    torch.manual_seed(1)
    model = TinyCNN().double()
    with torch.no_grad():
        model.conv1.weight.uniform_(0, 0.5)      # the positive end gives R, so sigma_max is exact
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    plan = gc.apply(model, _policy(coef=1.0, power_iters=20), opt, example_inputs=(torch.randn(2, 3, 8, 8).double(),))
    for x, y in _batches(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.double()), y).backward()
        opt.step()
    conv = model.conv1
    M = dense_operator(conv, conv.weight.detach(), (8, 8))
    sv = torch.linalg.svdvals(M)
    diag = plan.diagnostics()["conv1.weight"]["spectral"]
    R, _, _ = dense_penalty(conv, conv.weight, (8, 8), 1.0)
    assert diag["lambda_top"] > 0
    assert diag["R"] == pytest.approx(R.item(), rel=1e-8)
    assert diag["sigma_max"] == pytest.approx(sv.max().item(), rel=1e-8)
    assert diag["sigma_min"] == pytest.approx(sv.min().item(), rel=1e-2)     # both ends are estimated now
    assert diag["sigma_min"] >= sv.min().item() - 1e-9 and diag["sigma_min_bound"] <= sv.min().item()


def test_coef_zero_is_bit_identical_to_training_without_the_geometry():
    torch.manual_seed(0)
    model = TinyCNN()
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gc.apply(model, _policy(coef=0.0), opt, example_inputs=(torch.randn(2, 3, 8, 8),))
    batches = _batches(4)
    _train(model, opt, batches)
    _train(plain, torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9), batches)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), n


def test_vectors_survive_state_dict_and_the_resumed_run_is_identical():
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    policy = _policy(coef=0.1, power_iters=1, every=2)
    gc.apply(model, policy, opt, example_inputs=(torch.randn(2, 3, 8, 8),))
    batches = _batches(7)
    _train(model, opt, batches[:3])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    entries = {v["geomcompile"]["name"]: v["geomcompile"]["units"] for v in saved_opt["state"].values()
               if "geomcompile" in v}
    assert entries["conv1.weight"]["conv1.weight"]["spectral"]["V"].shape == (4, 3, 8, 8)   # 2 per end
    assert entries["conv2.weight"]["conv2.weight"]["spectral"]["steps"] == 2   # steps 0 and 2 of 0, 1, 2 (every=2)
    _train(model, opt, batches[3:])

    resumed = TinyCNN()
    resumed.load_state_dict(saved_model)
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    gc.apply(resumed, policy, opt2, example_inputs=(torch.randn(2, 3, 8, 8),))
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, batches[3:])
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_conv1d_and_explicit_input_size():
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = gc.apply(model, _policy(coef=0.1, input_size=[12]), opt)   # no example_inputs needed
    x = torch.randn(3, 2, 12)
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    assert plan.diagnostics()["0.weight"]["spectral"]["R"] > 0


# ---- errors --------------------------------------------------------------------------------------
def test_auto_input_size_without_example_inputs_says_what_to_do():
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(gc.GeomCompileError, match="example_inputs") as info:
        gc.apply(model, _policy(), opt)
    assert "input_size" in str(info.value) and "conv1.weight" in str(info.value)
    assert not opt._optimizer_step_pre_hooks


def test_non_conv_parameter_is_refused_in_strict_mode():
    policy = {"version": 1, "rules": [{"name": "all", "match": {"kind": ["conv", "linear"]}, "use": {"spectral": {}}}]}
    with pytest.raises(gc.GeomCompileError, match="fc.weight.*convolution weight.*kind: conv"):
        gc.plan(TinyCNN(), policy, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert Spectral().check(gc.ParamFacts("fc.weight", (4, 8), kind="linear")) is not None


@pytest.mark.parametrize("opts,fragment", [
    ({"alpha": 0}, "must be > 0"), ({"alpha": -1.0}, "must be > 0"), ({"power_iters": 0}, "must be >= 1"),
    ({"input_size": "big"}, "'auto' or a list"), ({"boundary": "periodic"}, "module, circular"),
])
def test_bad_options_are_errors(opts, fragment):
    with pytest.raises(gc.GeomCompileError, match=fragment):
        gc.load_policy(_policy(**opts))
    with pytest.raises(gc.GeomCompileError, match=fragment):
        Spectral(**opts)


def test_input_size_of_the_wrong_rank_or_too_small_is_an_error():
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(gc.GeomCompileError, match="input_size must be.*2 integers"):
        gc.apply(model, _policy(input_size=[8]), opt)
    with pytest.raises(gc.GeomCompileError, match="no output"):
        gc.functional.spectral_penalty(torch.randn(2, 2, 5, 5), (3, 3))
    with pytest.raises(gc.GeomCompileError, match="alpha must be > 0"):
        gc.functional.spectral_penalty(torch.randn(2, 2, 3, 3), (5, 5), alpha=0.0)

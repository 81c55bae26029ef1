"""spectral's sync-free eigensolver: geomcompile.kernels.spectral.jacobi_eigh (the cyclic parallel
Jacobi method in one Triton program per matrix, run here by the Triton interpreter) against
torch.linalg.eigh, and the solver on the device path (geometries/spectral.py symmetric_eigh, which a
CPU tensor takes while it stands in for a GPU one: base._CPU_STANDS_IN_FOR_DEVICE) against the
solver on torch's eigh.

Tolerances come from backward stability: both methods return the exact eigenpairs of a matrix
within a few n·eps·‖A‖ of A, so eigenvalues agree to that, eigenvectors of a simple eigenvalue to
that over its gap, and the Jacobi vectors are orthonormal to a few n·eps."""
from __future__ import annotations

import pytest
import torch

from geomcompile.geometries import base
from geomcompile.geometries import spectral as S
from geomcompile.kernels import spectral as K

from .test_spectral_batched import LAYERS, _layers


def _symmetric(B, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, n, n, dtype=torch.float64, generator=g)
    return ((a + a.mT) / 2).to(dtype)


def _check_eigenpairs(A, w, V):
    """w ascending, A V = V diag(w), VᵀV = I, eigenvalues equal to eigh's: all to c·n·eps·‖A‖."""
    n, eps = A.shape[-1], torch.finfo(A.dtype).eps
    scale = torch.linalg.matrix_norm(A.double(), ord=2).clamp_min(1.0)[..., None, None]
    A, w, V = A.double(), w.double(), V.double()
    assert (w[..., 1:] >= w[..., :-1]).all()
    tol = 20 * n * eps
    assert ((A @ V - V * w[..., None, :]).abs() / scale).max() <= tol
    assert (V.mT @ V - torch.eye(n, dtype=torch.float64)).abs().max() <= tol
    assert ((w - torch.linalg.eigvalsh(A)).abs() / scale[..., 0]).max() <= tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 2, 4, 5, 12, 16])
def test_jacobi_eigh_matches_torch_eigh(n, dtype):
    A = _symmetric(3, n, dtype, seed=n)
    w, V = K.jacobi_eigh(A)
    assert w.shape == (3, n) and V.shape == (3, n, n) and w.dtype == V.dtype == dtype
    _check_eigenpairs(A, w, V)
    # random eigenvalues are simple: the vectors are eigh's up to sign, to n·eps·‖A‖ over the gap
    w_ref, V_ref = torch.linalg.eigh(A.double())
    inf = torch.full((3, 1), float("inf"), dtype=torch.float64)
    step = w_ref[:, 1:] - w_ref[:, :-1]
    gap = torch.minimum(torch.cat([step, inf], 1), torch.cat([inf, step], 1))       # to the nearest other
    sign = torch.where((V.double() * V_ref).sum(dim=-2) < 0, -1.0, 1.0).to(torch.float64)
    error = (V.double() * sign[:, None, :] - V_ref).abs().amax(dim=-2)
    scale = torch.linalg.matrix_norm(A.double(), ord=2)[:, None].clamp_min(1.0)
    gap = gap.clamp_max(2 * scale)          # no other eigenvalue (n = 1): the error itself is checked
    assert (error * gap / scale).max() <= 20 * n * torch.finfo(dtype).eps


def test_jacobi_eigh_unbatched_and_empty():
    A = _symmetric(1, 5, torch.float64)[0]
    w, V = K.jacobi_eigh(A)
    assert w.shape == (5,) and V.shape == (5, 5)
    _check_eigenpairs(A, w, V)
    w, V = K.jacobi_eigh(torch.zeros(0, 4, 4))
    assert w.shape == (0, 4) and V.shape == (0, 4, 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_jacobi_eigh_on_the_solvers_degenerate_matrices(dtype):
    """Repeated eigenvalues (any basis of an eigenspace is right: checked by A V = V Λ), the zero
    matrix, and the Rayleigh–Ritz matrix with a dropped direction: a zero row and column whose
    diagonal holds the sentinel below the spectrum. That pair comes back exact, a unit vector."""
    g = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=g))
    repeated = Q @ torch.diag(torch.tensor([1.0] * 4 + [2.0] * 4 + [-3.0] * 4, dtype=torch.float64)) @ Q.T
    sentinel = _symmetric(1, 12, torch.float64, seed=8)[0]
    sentinel[5, :] = 0
    sentinel[:, 5] = 0
    sentinel[5, 5] = -(1 + 2 * sentinel.norm())
    A = torch.stack([(repeated + repeated.T) / 2, torch.zeros(12, 12, dtype=torch.float64), sentinel]).to(dtype)
    w, V = K.jacobi_eigh(A)
    _check_eigenpairs(A, w, V)
    assert torch.equal(w[1], torch.zeros(12, dtype=dtype)) and torch.equal(V[1].abs(), torch.eye(12, dtype=dtype))
    assert w[2, 0] == A[2, 5, 5]
    assert torch.equal(V[2, :, 0].abs(), torch.eye(12, dtype=dtype)[5])


def test_jacobi_eigh_has_converged_at_its_fixed_sweep_count():
    """JACOBI_SWEEPS is enough: twice as many sweeps change nothing beyond rounding, on random
    matrices and on the slowest case measured (three 4-fold eigenvalues, 12×12)."""
    g = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=g))
    repeated = Q @ torch.diag(torch.tensor([1.0] * 4 + [2.0] * 4 + [-3.0] * 4, dtype=torch.float64)) @ Q.T
    for dtype in (torch.float64, torch.float32):
        for A in (_symmetric(2, 16, dtype, seed=3), ((repeated + repeated.T) / 2).to(dtype)[None]):
            n, eps = A.shape[-1], torch.finfo(dtype).eps
            once = K.jacobi_eigh(A)
            twice = K.jacobi_eigh(A, sweeps=2 * K.JACOBI_SWEEPS)
            scale = float(torch.linalg.matrix_norm(A.double(), ord=2).max())
            assert (once[0] - twice[0]).abs().max() <= 20 * n * eps * scale, (dtype, n)
            residual = A.double() @ once[1].double() - once[1].double() * once[0].double()[..., None, :]
            assert residual.abs().max() <= 20 * n * eps * scale, (dtype, n)


def test_jacobi_eigh_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="up to 16x16"):
        K.jacobi_eigh(torch.eye(17))
    with pytest.raises(ValueError, match="float32/float64"):
        K.jacobi_eigh(torch.eye(4, dtype=torch.float16))


def test_symmetric_eigh_uses_the_kernel_only_on_the_device_path(monkeypatch):
    calls = []
    real = K.jacobi_eigh
    monkeypatch.setattr(K, "jacobi_eigh", lambda H: calls.append(H.shape) or real(H))
    A = _symmetric(2, 4, torch.float64)
    S.symmetric_eigh(A)
    assert calls == []                                    # CPU: torch's eigh, no sync on a CPU anyway
    monkeypatch.setattr(base, "_CPU_STANDS_IN_FOR_DEVICE", [True])
    S.symmetric_eigh(A)
    S.symmetric_eigh(_symmetric(1, 17, torch.float64))    # larger than the kernel's tile: torch's eigh
    assert calls == [(2, 4, 4)]


def test_a_kernel_that_cannot_run_falls_back_to_torch_eigh_and_says_so(monkeypatch):
    import geomcompile as gc

    def broken(H):
        raise RuntimeError("no kernel for this GPU")
    monkeypatch.setattr(K, "jacobi_eigh", broken)
    monkeypatch.setattr(S, "_JACOBI_FAILED", [])
    monkeypatch.setattr(base, "_CPU_STANDS_IN_FOR_DEVICE", [True])
    A = _symmetric(2, 4, torch.float64)
    with pytest.warns(gc.GeomCompileWarning, match="no kernel for this GPU.*torch.linalg.eigh runs instead"):
        w, V = S.symmetric_eigh(A)
    torch.testing.assert_close(w, torch.linalg.eigvalsh(A))
    assert S._JACOBI_FAILED == ["RuntimeError: no kernel for this GPU"]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # said once
        S.symmetric_eigh(A)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_solver_on_the_device_path_equals_the_solver_on_torch_eigh(dtype, monkeypatch):
    """The batched step (the compile and Triton backends') and the per-layer step (eager) of three
    layers, two iterations, with the Jacobi kernel against torch's eigh: the same penalty, gradient
    and Ritz pairs to rounding (the Ritz vectors are sign-fixed by _fixed_signs on both paths)."""
    spec, weights = _layers("plain", dtype)
    V = torch.stack([S.initial_block(spec, dtype, seed=l) for l in range(LAYERS)])
    nudge = S.nudge_of(spec, S.BLOCK, dtype, torch.device("cpu"))
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)

    def both():
        batched = S.spectral_penalty_step_layers(weights, spec, 1.0, V, 2, 1e-3, nudge)
        single = S.spectral_penalty_step(weights[0], spec, 1.0, V[0], 2, tol=0.0, tie_tol=1e-3)
        return batched, single
    ref_batched, ref_single = both()
    calls = []
    real = K.jacobi_eigh
    monkeypatch.setattr(K, "jacobi_eigh", lambda H: calls.append(H.shape) or real(H))
    monkeypatch.setattr(base, "_CPU_STANDS_IN_FOR_DEVICE", [True])
    got_batched, got_single = both()
    assert len(calls) == 2 * 8 and (LAYERS, 12, 12) in calls and (12, 12) in calls, calls
    for what, got, want in [("theta", got_batched.solve.theta, ref_batched.solve.theta),
                            ("vectors", got_batched.solve.vectors, ref_batched.solve.vectors),
                            ("value", got_batched.value, ref_batched.value),
                            ("grad", got_batched.grad, ref_batched.grad),
                            ("theta 1", got_single.solve.theta, ref_single.solve.theta),
                            ("vectors 1", got_single.solve.vectors, ref_single.solve.vectors),
                            ("grad 1", got_single.grad, ref_single.grad)]:
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")

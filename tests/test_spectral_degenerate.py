"""spectral's solver on degenerate inputs, with fixed shapes and no host decision in a step
(geometries/spectral.py: a dropped direction is a zero row kept out of the Rayleigh–Ritz picks).

Each case fails on a wrong choice: a zero row picked as a Ritz pair would give θ_min = 0 for a
positive definite G, or a zero vector as a Ritz vector. Ground truth: dense eigvalsh in float64."""
from __future__ import annotations

import pytest
import torch

from geomcompile.geometries.spectral import (conv_matrix, conv_spec, initial_block, spectral_penalty,
                                             two_end_solve)
from geomcompile.bench.syncs import count_host_syncs

N = 12
EIGENVALUES = torch.arange(1, N + 1, dtype=torch.float64)        # G = diag(1..12): positive definite


def apply_diag(block: torch.Tensor) -> torch.Tensor:
    return block * EIGENVALUES


def assert_orthonormal(V: torch.Tensor) -> None:
    flat = V.reshape(V.shape[0], -1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(flat.shape[0], dtype=flat.dtype), atol=1e-10, rtol=0)


def test_converged_start_block_keeps_its_pairs_and_picks_no_dropped_direction():
    """Start at exact eigenvectors: every residual is 0, so all of W (and later P) is dropped."""
    V = torch.eye(N, dtype=torch.float64)[[N - 1, N - 2, 1, 0]]       # top two and bottom two
    solve = two_end_solve(apply_diag, V, iters=3)
    torch.testing.assert_close(solve.theta, torch.tensor([12.0, 11.0, 2.0, 1.0], dtype=torch.float64))
    assert_orthonormal(solve.vectors)
    assert solve.residual.max() <= 1e-12


def test_partly_converged_block_still_converges_to_both_ends():
    """Two exact eigenvectors (bottom end) and two random rows: half of W is dropped at every iteration."""
    gen = torch.Generator().manual_seed(1)
    V = torch.cat([torch.randn(2, N, generator=gen, dtype=torch.float64), torch.eye(N, dtype=torch.float64)[[1, 0]]])
    solve = two_end_solve(apply_diag, V, iters=60)
    torch.testing.assert_close(solve.theta, torch.tensor([12.0, 11.0, 2.0, 1.0], dtype=torch.float64))
    assert_orthonormal(solve.vectors)


def test_collapsed_block_is_nudged_apart_and_converges():
    row = torch.randn(1, N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    solve = two_end_solve(apply_diag, row.repeat(4, 1), iters=60)
    torch.testing.assert_close(solve.theta, torch.tensor([12.0, 11.0, 2.0, 1.0], dtype=torch.float64))
    assert_orthonormal(solve.vectors)


@pytest.mark.parametrize("in_channels,size", [(1, (2, 2)), (1, (3,)), (2, (2,))])
def test_layer_with_fewer_entries_than_the_basis(in_channels, size):
    """n = C_in·∏size ≤ 4: the basis [X, W, P] (up to 12 rows) is mostly dependent; both ends exact."""
    torch.manual_seed(3)
    weight = torch.randn(3, in_channels, *([3] * len(size)), dtype=torch.float64)
    spec = conv_spec(weight.shape, list(size), padding=1)
    M = conv_matrix(weight, spec)
    dense = torch.linalg.eigvalsh(M.T @ M)
    R, _, state = spectral_penalty(weight, list(size), alpha=0.5, padding=1, iters=50)
    k = state["theta"].shape[0]
    torch.testing.assert_close(state["theta"][: k // 2], dense.flip(0)[: k // 2], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(state["theta"][k // 2:], dense[: k // 2].flip(0), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(R, (dense - 0.5).abs().max())
    assert_orthonormal(state["V"])


def test_zero_kernel_gives_R_alpha_and_zero_gradient():
    weight = torch.zeros(4, 2, 3, 3, dtype=torch.float64)
    R, grad, state = spectral_penalty(weight, [5, 5], alpha=0.7, padding=1, iters=5)
    torch.testing.assert_close(R, torch.tensor(0.7, dtype=torch.float64))
    assert float(state["lam"]) == pytest.approx(-0.7)      # the bottom end: λ_min(0) − α
    assert torch.equal(grad, torch.zeros_like(grad))
    assert_orthonormal(state["V"])


def test_warm_started_solve_at_tol_zero_makes_no_host_sync():
    """At tol = 0 the solver makes no host decision of its own, and on a device its small eigenproblems
    run the Jacobi kernel (symmetric_eigh; the detector takes the device's path): no sync. A block
    above 2 (matrices larger than the kernel's 16×16 tile) keeps torch.linalg.eigh, whose error check
    reads the host on a GPU; tol > 0 adds the early stop's reads (docs/spectral.md "Host syncs")."""
    weight = torch.randn(4, 2, 3, 3)
    spec = conv_spec(weight.shape, [6, 6], padding=1)
    V = initial_block(spec, torch.float32)
    _, _, state = spectral_penalty(weight, [6, 6], padding=1, iters=20)
    log = count_host_syncs(lambda: spectral_penalty(weight, [6, 6], padding=1, state=state, iters=3, tol=0.0))
    assert len(log) == 0, log.summary()
    assert V.shape == state["V"].shape
    _, _, big = spectral_penalty(weight, [6, 6], padding=1, iters=20, block=3)
    log = count_host_syncs(lambda: spectral_penalty(weight, [6, 6], padding=1, state=big, iters=3, tol=0.0, block=3))
    assert len(log) > 0 and all("linalg.eigh" in what for what, _ in log.events), log.summary()
    # tol > 0 (a layer's first evaluation): on a device the early stop is a torch.where, no sync either
    early = count_host_syncs(lambda: spectral_penalty(weight, [6, 6], padding=1, iters=30, tol=1e-6))
    assert len(early) == 0, early.summary()


@pytest.mark.parametrize("iters", [3, 200])
def test_early_stop_on_a_device_keeps_the_pairs_the_host_early_stop_returns(iters, monkeypatch):
    """The cold start (tol > 0) on a device runs every iteration and keeps, by torch.where, the Ritz
    pairs of the first iteration that met tol: bit for bit what the host's early stop returns (200:
    it converges and stops early; 3: it does not, both return the last iteration's pairs)."""
    from geomcompile.geometries import base, spectral as S
    weight = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    spec = conv_spec(weight.shape, [6, 6], padding=1)
    V = initial_block(spec, torch.float64)
    apply_G = lambda X: S.gram_matvec(X, weight, spec)[1]
    host = two_end_solve(apply_G, V, iters=iters, tol=1e-6)
    assert (host.iters < iters) == (iters == 200), host.iters
    monkeypatch.setattr(base, "host_reads_are_free_for", lambda tensors: False)
    device = two_end_solve(apply_G, V, iters=iters, tol=1e-6)
    assert device.iters == iters
    for what in ("theta", "vectors", "residual"):
        assert torch.equal(getattr(device, what), getattr(host, what)), what

"""No host syncs in a step: every registry geometry's eager step, and the Triton backend's host path
with its launches stubbed, run under geomcompile.bench.syncs' detector (CPU tensors; it sees every
call that would make the host wait for a GPU: .item(), float/bool/int(tensor), .tolist(), .cpu(),
nonzero, boolean-mask indexing, ...). Steps 1-2 create the optimizer state; step 3 is counted."""
import copy
import warnings

import pytest
import torch

import geomcompile as gc
from geomcompile.bench.stubs import stub_kernel_launches
from geomcompile.bench.syncs import count_host_syncs, host_resident_state

from geomcompile.geometries import REGISTRY
from geomcompile.runtime.fastpath import fast_path

from .registry import CASES
from .test_matrix import _set_grads, _setup
from .test_triton_backend import INPUTS, Net

# Geometries whose step is known to sync (strict xfail, so removing the sync fails until this is
# updated). None since 2026-12-04: spectral's small eigenproblems ran torch.linalg.eigh, which reads
# its solver's error info on the host on a GPU (4 calls per solver iteration); they now run the Jacobi
# kernel of geomcompile.kernels.spectral there (geometries/spectral.py symmetric_eigh), which the
# detector's device path (a CPU tensor standing in for a GPU one) takes too; its first evaluation's
# early stop is a torch.where there (tests/test_spectral_degenerate.py). Left: blocks > 2. gspace's
# registry case counts a step its chain skips (conv2.weight has no gradient at step 2): its real step
# is counted by test_gspace_step_reads_the_host_once_per_chain (one read per chain is left).
KNOWN_SYNCS: dict[str, str] = {}
# Reads a geometry's counted steps are known to make (asserted exactly, so removing one fails until
# this is updated): gspace reads once per chain and step whether to drop the chain's step (its step 4).
KNOWN_READS: dict[str, int] = {"gspace": 1}


def _counted_step(model, opt, launches_stubbed: bool):
    """Steps 0-1 create the state; steps 2 (conv2.weight without a gradient, as the matrix has it)
    and 4 (every parameter with one: a coupled unit such as gspace's chain skips step 2) are counted."""
    def counted():
        opt.step()
        _set_grads(model, 4, torch.float32)
        opt.step()

    def run():
        for step in range(2):
            _set_grads(model, step, torch.float32)
            opt.step()
        _set_grads(model, 2, torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gc.GeomCompileWarning)
            return count_host_syncs(counted, host_resident_state(opt))
    if not launches_stubbed:
        return run(), []
    with stub_kernel_launches() as launched:
        log = run()
    return log, launched


def _cases(backend):
    out = []
    for name, case in CASES.items():
        if backend not in case.backends:
            continue
        marks = ([pytest.mark.xfail(strict=True, reason=KNOWN_SYNCS[case.geometry])]
                 if case.geometry in KNOWN_SYNCS else [])
        out += [pytest.param(name, opt, marks=marks, id=f"{name}-{opt}") for opt in ("sgd_momentum", "adam")]
    return out


@pytest.mark.parametrize("case_name,opt_name", _cases("eager"))
def test_eager_step_has_no_host_sync(case_name, opt_name):
    model, opt, _ = _setup(case_name, opt_name, "eager")
    log, _ = _counted_step(model, opt, launches_stubbed=False)
    assert len(log) == KNOWN_READS.get(CASES[case_name].geometry, 0), log.summary()


@pytest.mark.parametrize("case_name,opt_name", _cases("triton"))
def test_triton_host_path_has_no_host_sync(case_name, opt_name):
    """A family that launches no fused kernel of its own (KernelFamily.launches_kernels: spectral's
    batched torch step) runs its device work for real under the detector, so its whole step is
    checked; only its helper kernels (spectral's Jacobi eigensolver) are stubbed, and must launch."""
    model, opt, plan = _setup(case_name, opt_name, "triton")
    family = fast_path(plan._installation.items[0].geometry, "triton")    # the case's configuration
    log, launched = _counted_step(model, opt, launches_stubbed=True)
    if getattr(family, "launches_kernels", True):
        assert launched, "the stubbed kernels were never launched: the step did not take the Triton path"
    else:
        notes = plan.backend_notes()
        helpers = set(family.helper_kernels)
        assert {name for name, _ in launched} == helpers, (launched, helpers)
        assert any(f"{family.name}'s fast path launches no fused update kernel" in n for n in notes), notes
        assert not any("eager program" in n for n in notes), notes
    assert len(log) == 0, log.summary()


def test_psi_renormalises_without_a_sync_and_counts_it():
    """The branch-free psi post_step still renormalises (weights, momentum, counter) exactly."""
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.conv1.weight.mul_(5.0)             # every row above max_norm
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plan = gc.apply(model, CASES["psi"].policy(), opt, example_inputs=INPUTS, backend="eager")
    _set_grads(model, 0, torch.float32)
    log = count_host_syncs(opt.step)
    assert len(log) == 0, log.summary()
    rows = model.conv1.weight.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(rows, torch.ones_like(rows))
    assert plan.diagnostics()["conv1.weight"]["psi"]["renormalised_units"] == 6.0


def test_pom_feature_std_radius_has_no_host_sync():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    policy = {"version": 1, "rules": [{"name": "pom", "match": {"kind": "conv"},
                                       "use": {"pom": {"radius": 2.0, "feature_std": True}}}]}
    plan = gc.apply(model, policy, opt, example_inputs=INPUTS, backend="eager")
    x = 3.0 * torch.randn(4, 3, 6, 6)

    def forward_backward():
        opt.zero_grad()
        model(x).sum().backward()          # the forward measures conv1's input std (a pre-hook)
    forward_backward()
    opt.step()
    forward_backward()
    log = count_host_syncs(opt.step)
    assert len(log) == 0, log.summary()
    std = x.double().std().item()
    assert plan.diagnostics()["conv1.weight"]["pom"]["radius"] == pytest.approx(2.0 / max(std, 1.0))


def test_detector_sees_every_kind_of_sync():
    """The detector itself: each of these would block the host on a GPU; where() and counters not."""
    x = torch.randn(8)
    for sync in (lambda: float(x.sum()), lambda: bool((x > 0).all()), lambda: x.max().item(),
                 lambda: x.tolist(), lambda: x[x > 0], lambda: x.nonzero(), lambda: x.cpu(),
                 lambda: x.clone().__setitem__(x > 0, 0.0), lambda: x.unique()):
        assert len(count_host_syncs(sync)) == 1
    free = count_host_syncs(lambda: (torch.where(x > 0, x, 0.0), (x > 0).sum(), x.clamp_min(0.5)))
    assert len(free) == 0
    host_step = torch.tensor(3.0)                   # Adam's step: a CPU tensor even for CUDA parameters
    assert len(count_host_syncs(lambda: float(host_step), host=[host_step])) == 0


def test_detector_sees_solvers_that_check_their_errors_on_the_host():
    """torch's linear-algebra solvers read their info on the host on a GPU (torch's docs: "this
    function synchronizes that device with the CPU"); QR and the _ex forms without check_errors do not."""
    a = torch.randn(5, 5)
    spd = a @ a.T + torch.eye(5)
    for sync in (lambda: torch.linalg.eigh(spd), lambda: torch.linalg.eigvalsh(spd), lambda: torch.linalg.svd(a),
                 lambda: torch.linalg.svdvals(a), lambda: torch.linalg.cholesky(spd),
                 lambda: torch.linalg.solve(spd, a), lambda: torch.linalg.inv(spd),
                 lambda: torch.linalg.cholesky_ex(spd, check_errors=True)):
        assert len(count_host_syncs(sync)) == 1
    for free in (lambda: torch.linalg.qr(a), lambda: torch.linalg.cholesky_ex(spd),
                 lambda: torch.linalg.inv_ex(spd)):
        assert len(count_host_syncs(free)) == 0


@torch.library.custom_op("geomcompile::_test_eigvalsh_inside", mutates_args=())
def _eigvalsh_inside(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(x) * 2


@torch.library.custom_op("gctest::opaque_add_one", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x + 1


def test_detector_looks_inside_geomcompile_custom_ops_and_flags_foreign_ones():
    """A dispatch mode sees a custom operator, not the ops its kernel runs: the detector runs
    geomcompile's own operators as their Python functions (spectral's batched solve is one), and
    counts any other custom operator as a possible sync."""
    a = torch.randn(4, 4)
    spd = a @ a.T + torch.eye(4)
    log = count_host_syncs(lambda: _eigvalsh_inside(spd))
    assert len(log) == 1 and "eigvalsh" in log.summary(), log.summary()
    torch.testing.assert_close(_eigvalsh_inside(spd), 2 * torch.linalg.eigvalsh(spd))
    log = count_host_syncs(lambda: _opaque(a))
    assert len(log) == 1 and "cannot see inside" in log.summary(), log.summary()


def test_pom_stiefel_retractions_have_no_host_sync():
    """pom's Stiefel retraction, polar (the default) and qr: no sync. polar was torch.linalg.svd, which
    reads its solver's info on the host on a GPU; it is now QR + Newton's iteration (polar_factor,
    checked against the SVD in tests/test_pom.py). The detector still sees an SVD (the control)."""
    for method in ("polar", "qr"):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        policy = {"version": 1, "rules": [{"name": "pom", "match": {"kind": "conv"},
                                           "use": {"pom": {"manifold": "stiefel", "component": "kernel",
                                                           "stiefel_retraction": method}}}]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gc.GeomCompileWarning)
            gc.apply(model, policy, opt, example_inputs=INPUTS, backend="eager")
            for step in range(2):
                _set_grads(model, step, torch.float32)
                opt.step()
            _set_grads(model, 2, torch.float32)
            log = count_host_syncs(opt.step)
        assert len(log) == 0, (method, log.summary())
        components = model.conv1.weight.detach().reshape(-1, 3, 3)
        torch.testing.assert_close(components.mT @ components, torch.eye(3).expand_as(components),
                                   atol=1e-5, rtol=0)
    x = torch.randn(4, 3, 3)
    log = count_host_syncs(lambda: torch.linalg.svd(x))
    assert len(log) == 1 and "svd" in log.summary(), log.summary()


@pytest.mark.parametrize("geometry,reads", [("psi", 0), ("pom", 0), ("spectral", 1)])
def test_a_step_with_every_lr_zero_reads_the_gradients_at_most_once(geometry, reads):
    """The initialisation-step check (all learning rates 0, as DCP's state initialisation or the first
    step of a warmup from 0) asks whether every gradient is zero. With geometries that honour a
    device-side skip (psi, pom) the answer stays on the device (StepContext.skip) and the step changes
    nothing and is not counted; otherwise one host read per device, not one per parameter. With a
    learning rate above 0 it reads nothing."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        plan = gc.apply(model, CASES[geometry].policy(), opt, example_inputs=INPUTS, backend="eager")
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        before = [p.detach().clone() for p in model.parameters()]
        entries = copy.deepcopy(plan.state.state_dict())
        log = count_host_syncs(opt.step)
        assert len(log) == reads and (not reads or "bool(tensor)" in log.summary()), log.summary()
        assert len(list(model.parameters())) > 2
        assert plan.steps == 0
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        _assert_same_tree(plan.state.state_dict(), entries)
        opt.param_groups[0]["lr"] = 0.1
        _set_grads(model, 0, torch.float32)
        opt.step()
        _set_grads(model, 1, torch.float32)
        opt.step()
        _set_grads(model, 2, torch.float32)
        log = count_host_syncs(opt.step)
    assert len(log) == 0, log.summary()
    assert plan.steps == 3


@pytest.mark.parametrize("mode,make_opt", [
    ("tangent", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
    ("exact", lambda ps: torch.optim.SGD(ps, lr=0.05)),
])
def test_gspace_step_reads_the_host_once_per_chain(mode, make_opt):
    """The registry's gspace case counts a step at which conv2.weight has no gradient, so its chain
    skips the step and the registry test above saw none of gspace's reads. Here every layer of the
    chain has a gradient. Before: 13 reads per chain and step in tangent mode (4 float() of the
    skeleton's minima, 4 bool() of the step's finiteness, 4 boolean-mask indexings of the class
    units), 14 in exact mode (the zero-ratio check). Left: one read per chain, whether to drop the
    step (a class ratio of 0, or a step that is not finite): the base optimizer must then get no
    gradient at all, which is a host decision."""
    from tests.models import GSmallNet
    torch.manual_seed(0)
    model = GSmallNet()
    opt = make_opt(model.parameters())
    policy = {"version": 1, "rules": [{"name": "chain", "match": {"g_coupled": True},
                                       "use": {"gspace": {"step": mode, "skeleton_init": "keep"}}}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        plan = gc.apply(model, policy, opt, example_inputs=INPUTS, backend="eager")
        gen = torch.Generator().manual_seed(1)
        for step in range(3):
            for name, p in model.named_parameters():
                p.grad = None if name.startswith("frozen") else torch.randn(p.shape, generator=gen) * 1e-2
            log = count_host_syncs(opt.step) if step == 2 else opt.step()
    diagnostics = next(iter(plan.diagnostics().values()))["gspace"]
    assert diagnostics["skipped_steps"] == 0, diagnostics          # the counted step was a real step
    assert len(log) == 1 and ("_write" in log.summary() or "pre_step" in log.summary()), log.summary()


def _assert_same_tree(a, b, where="state"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_compile_backend_on_a_device_reads_no_flags_and_matches_eager(monkeypatch):
    """The compile backend cannot run under the detector (torch.compile refuses a TorchDispatchMode:
    "non-infra torch dispatch mode present"). Its compiled functions are built with fullgraph=True, so
    they hold no host read (a .item() or a data-dependent shape would be a graph break, an error
    under fullgraph). The host read that remained was psi's bucket check: one .tolist() of the
    compiled "near max_norm" flags per bucket and step. On a device's path (the detector's switch,
    base._CPU_STANDS_IN_FOR_DEVICE) no .tolist() runs in the step, every psi unit runs the branch-free
    eager post_step, and weights and momentum match the eager backend's while rows renormalise."""
    from geomcompile.geometries import base

    monkeypatch.setattr(base, "_CPU_STANDS_IN_FOR_DEVICE", [True])
    results, reads = {}, []
    for backend in ("eager", "compile"):
        torch.manual_seed(0)
        model = Net()
        with torch.no_grad():
            model.conv1.weight.mul_(5.0)             # every row above max_norm: psi renormalises
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        gc.apply(model, CASES["psi"].policy(), opt, example_inputs=INPUTS, backend=backend)
        for step in range(3):
            _set_grads(model, step, torch.float32)
            if backend == "compile" and step == 2:
                tolist = torch.Tensor.tolist
                monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or tolist(t))
                opt.step()
                monkeypatch.setattr(torch.Tensor, "tolist", tolist)
            else:
                opt.step()
        results[backend] = ({n: p.detach().clone() for n, p in model.named_parameters()},
                            {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()})
    assert reads == [], reads
    rows = results["compile"][0]["conv1.weight"].flatten(1).norm(dim=1)
    assert float(rows.max()) <= 1.5 * (1 + 1e-5)
    for eager, compiled in zip(results["eager"], results["compile"]):
        for name in eager:
            torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-6, msg=name)

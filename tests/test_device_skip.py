"""GradScaler with a fused=True optimizer: the skip verdict (found_inf) stays on the device.

torch's fused SGD/Adam/AdamW take ``found_inf`` as a device flag and skip a step with an inf/NaN
gradient without reading it on the host. The hooks used to read it (one host sync per step). Where
every installed geometry declares ``Geometry.honours_device_skip`` (channel_directed, psi, pom), the flag is
now handed to the programs (``StepContext.skip``) and the step reads nothing; elsewhere it is still read.

Each test trains twins side by side: one with CPU tensors as themselves (the flag is read on the host,
where that is free, and a skipped step runs no geometry), one under the host-sync detector, where CPU
tensors stand in for a GPU's (the flag stays a tensor). The two must agree bit for bit at every step,
weights, optimizer state, running statistics and geometry state, and the detector must count nothing.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import geomcompile as gc
from geomcompile.bench.syncs import count_host_syncs

from .test_reliability import batch, bn_cnn

# max_norm below the (scaled-up) initial row norms: psi renormalises at the first step, so a first step
# skipped by GradScaler (its first scales often overflow) is where an unmasked renormalisation would show
PSI = {"version": 1, "rules": [{"name": "bn-convs", "match": {"kind": "conv", "scale_invariant": True},
                                "use": {"psi": {"max_norm": 2.0}}}]}
CD = {"version": 1, "rules": [{"name": "convs", "match": {"kind": "conv"},
                               "use": {"channel_directed": {"metric": "sobolev", "lam": 2.0}}}]}
RESNET = "resnet"                 # the shipped policy: psi on the BN convs, channel_directed on the rest
POM = {"version": 1, "rules": [{"name": "convs", "match": {"kind": "conv"},
                                "use": {"pom": {"manifold": "sphere"}}}]}
# Stiefel components and feature_std: no kernel; the Triton backend runs CompiledPOM's programs uncompiled
POM_STIEFEL = {"version": 1, "rules": [{"name": "convs", "match": {"kind": "conv"},
                                        "use": {"pom": {"manifold": "stiefel", "grouping": "PIO", "group_size": 2}}}]}
POM_STD = {"version": 1, "rules": [{"name": "convs", "match": {"kind": "conv"},
                                    "use": {"pom": {"manifold": "oblique", "feature_std": True}}}]}
SPECTRAL = {"version": 1, "rules": [{"name": "convs", "match": {"kind": "conv"},
                                     "use": {"spectral": {"coef": 0.1, "power_iters": 1, "input_size": [6, 6]}}}]}

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, fused=True),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
}
# The steps whose gradients get an inf (GradScaler skips them). Not step 0 with momentum: torch 2.13's
# fused SGD creates the momentum buffers with empty_like and a skipped first step leaves them
# uninitialised (torch's own defect, geomcompile or not; docs/bench.md "Host syncs").
POISONED = {"sgd": (0, 2), "sgd_momentum": (1, 3), "adamw": (0, 2)}


def _without_running_stats() -> nn.Module:
    """bn_cnn whose BatchNorms keep no running statistics: nothing outside the optimizer follows psi's
    rescales, so the Triton backend renormalises in its kernel (with them, psi's eager post_step)."""
    model = bn_cnn()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
    return model


def _twin(policy, opt_name: str, backend: str, make_model=bn_cnn):
    model = make_model()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(10.0)           # row norms about 3-6: above psi's max_norm of 2
    opt = OPTIMIZERS[opt_name](model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        plan = gc.apply(model, policy, opt, backend=backend, example_inputs=(batch()[0],))
    return model, opt, plan, torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)


def _backward(model, opt, scaler, i: int, poisoned):
    x, y = batch(seed=i)
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    if i in poisoned:
        model[0].weight.grad.view(-1)[0] = float("inf")


def _optimizer_step(opt, scaler, detect: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        log = count_host_syncs(lambda: scaler.step(opt)) if detect else scaler.step(opt)
    scaler.update()
    return log


def _snapshot(model, opt, plan):
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()},
            "optimizer": copy.deepcopy(opt.state_dict()),
            "steps": plan.steps}


def _assert_bitwise_equal(a, b, where: str):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: largest difference {float((a.double() - b.double()).abs().max())}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _train_twins(policy, opt_name: str, backend: str, steps: int = 4, make_model=bn_cnn):
    host = _twin(policy, opt_name, backend, make_model)
    device = _twin(policy, opt_name, backend, make_model)
    logs = []
    for i in range(steps):
        for model, opt, _, scaler in (host, device):
            _backward(model, opt, scaler, i, POISONED[opt_name])
        before = _snapshot(host[0], host[1], host[2])
        _optimizer_step(host[1], host[3], detect=False)
        logs.append(_optimizer_step(device[1], device[3], detect=True))
        after_host, after_device = _snapshot(host[0], host[1], host[2]), _snapshot(device[0], device[1], device[2])
        _assert_bitwise_equal(after_device, after_host, f"step {i}, device-side skip vs host read")
        if i in POISONED[opt_name]:
            for key in ("params", "buffers", "steps"):
                _assert_bitwise_equal(after_host[key], before[key], f"skipped step {i} changed {key}")
            # torch creates a parameter's state at its first step, skipped or not; what existed stays
            state_before, state_after = before["optimizer"]["state"], after_host["optimizer"]["state"]
            for pid, entry in state_before.items():
                for key, value in entry.items():
                    _assert_bitwise_equal(state_after[pid][key], value, f"skipped step {i} changed {pid}/{key}")
        else:
            assert not torch.equal(after_host["params"]["0.weight"], before["params"]["0.weight"]), i
    assert host[2].steps == device[2].steps == steps - sum(i < steps for i in POISONED[opt_name])
    return logs, host, device


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("policy", [PSI, CD, RESNET, POM, POM_STIEFEL, POM_STD],
                         ids=["psi", "channel_directed", "resnet", "pom", "pom_stiefel", "pom_feature_std"])
def test_gradscaler_with_a_fused_optimizer_reads_no_flag_and_matches_the_host_read(policy, opt_name, backend):
    logs, _, _ = _train_twins(policy, opt_name, backend)
    for i, log in enumerate(logs):
        assert len(log) == 0, f"step {i}: {log.summary()}"


@pytest.mark.parametrize("shape,layout", [((6, 3, 3, 3), ("row", 0, None)),         # whole units in one tile
                                          ((2, 40, 9, 9), ("tensor", 0, None))])    # one unit in chunks
def test_psi_renorm_kernel_changes_nothing_where_the_flag_is_set(shape, layout):
    from geomcompile.kernels.psi import psi_renorm
    torch.manual_seed(0)
    for flag, moved in ((1, False), (0, True)):
        w = torch.randn(shape) * 10
        momentum = torch.randn(shape)
        w0, m0 = w.clone(), momentum.clone()
        counter = torch.zeros((), dtype=torch.int64)
        psi_renorm([w], [layout], 2.0, states=[[momentum]], powers=[1], counters=[counter],
                   skip=torch.full((), flag, dtype=torch.int32))
        assert torch.equal(w, w0) != moved and torch.equal(momentum, m0) != moved
        assert (int(counter) > 0) == moved


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_psi_renormalisation_kernel_reads_the_skip_flag_on_the_device(opt_name, monkeypatch):
    """Without running statistics the Triton backend renormalises in _psi_renorm_kernel, which reads
    StepContext.skip through a flag of the backend's at a fixed address (recorded launches replay)."""
    from geomcompile.kernels.tables import Launch
    launched, real = [], Launch.run
    monkeypatch.setattr(Launch, "run", lambda self, scalars=None: (launched.append(self.kernel),
                                                                   real(self, scalars))[1])
    logs, host, device = _train_twins(PSI, opt_name, "triton", steps=5, make_model=_without_running_stats)
    assert "_psi_renorm_kernel" in launched, launched
    assert all(len(log) == 0 for log in logs), [log.summary() for log in logs]
    renormalised = sum(values.get("renormalised_units", 0) for per_unit in device[2].diagnostics().values()
                       for values in per_unit.values())
    assert renormalised > 0


def test_psi_renormalises_at_the_first_step_it_takes_so_a_skipped_first_step_is_a_real_check():
    """Without the mask psi would renormalise at the skipped step 0 (row norms above max_norm)."""
    _, host, _ = _train_twins(PSI, "adamw", "eager", steps=2)
    renormalised = sum(values.get("renormalised_units", 0) for per_unit in host[2].diagnostics().values()
                       for values in per_unit.values())
    assert renormalised > 0


def test_a_geometry_without_the_declaration_still_reads_the_flag_once_and_skips_exactly():
    """gspace (like spectral) does not declare honours_device_skip: the hooks read found_inf, and a
    skipped step runs no geometry (on a skipped step that read is the only one; a real step adds
    gspace's own read per chain)."""
    from tests.models import GSmallNet
    torch.manual_seed(0)
    model = GSmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, fused=True)
    policy = {"version": 1, "rules": [{"name": "chain", "match": {"g_coupled": True},
                                       "use": {"gspace": {"step": "tangent", "skeleton_init": "keep"}}}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        plan = gc.apply(model, policy, opt, example_inputs=(torch.randn(2, 3, 6, 6),))
    assert any("found_inf is read on the host" in note and "gspace" in note for note in plan.notes), plan.notes
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    gen = torch.Generator().manual_seed(3)
    for i in range(3):
        opt.zero_grad()
        scaler.scale(model(torch.randn(2, 3, 6, 6, generator=gen)).square().mean()).backward()
        if i == 1:
            model.conv1.weight.grad.view(-1)[0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        log = _optimizer_step(opt, scaler, detect=True)
        if i == 1:
            assert len(log) == 1 and "_amp_skipped_step" in log.summary(), log.summary()
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        else:
            assert len(log) == 2, log.summary()
    assert plan.steps == 2


def test_the_skip_count_on_the_device_reaches_checkpoints():
    _, _, device = _train_twins(RESNET, "sgd_momentum", "eager")
    model, opt, plan, _ = device
    assert plan.state.skipped_on_device is not None          # the verdict did stay on the device
    saved = opt.state_dict()
    entries = [v["geomcompile"] for v in saved["state"].values() if "geomcompile" in v]
    assert entries and all(int(e["steps"]) == 2 for e in entries)
    fresh, fresh_opt, fresh_plan, _ = _twin(RESNET, "sgd_momentum", "eager")
    fresh_opt.load_state_dict(saved)
    assert fresh_plan.steps == 2 and fresh_plan.state.skipped_on_device is None


@pytest.mark.parametrize("policy,says", [(RESNET, "decided on the device, no host sync"),
                                         (SPECTRAL, "found_inf is read on the host at every step (one sync on a "
                                                    "GPU) because spectral cannot take the skip on the device yet")])
def test_the_summary_says_where_a_skipped_step_is_decided(policy, says):
    _, _, plan, _ = _twin(policy, "sgd", "eager")
    assert any(says in note for note in plan.notes), plan.notes
    assert says in plan.summary()
    model = bn_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        unfused = gc.apply(model, policy, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not any("GradScaler" in note for note in unfused.notes), unfused.notes


def test_compile_backend_keeps_everything_at_a_skipped_step_on_the_device():
    """torch.compile refuses the sync detector's dispatch mode, so the compile backend's device path is
    taken with the detector's switch alone (CPU tensors standing in for a GPU's: the flag stays a
    tensor and reaches pom's compiled direction and in-graph retraction as an input). A skipped step
    changes no weight and no state bit; the real steps follow the host-read twin (another compiled
    graph, the one with the flag: equal to rounding)."""
    from geomcompile.geometries import base
    host, device = _twin(POM, "sgd", "compile"), _twin(POM, "sgd", "compile")
    for i in range(4):
        for model, opt, _, scaler in (host, device):
            _backward(model, opt, scaler, i, POISONED["sgd"])
        before = _snapshot(device[0], device[1], device[2])
        _optimizer_step(host[1], host[3], detect=False)
        base._CPU_STANDS_IN_FOR_DEVICE[0] = True
        try:
            _optimizer_step(device[1], device[3], detect=False)
        finally:
            base._CPU_STANDS_IN_FOR_DEVICE[0] = False
        after = _snapshot(device[0], device[1], device[2])
        if i in POISONED["sgd"]:
            for key in ("params", "buffers", "steps"):
                _assert_bitwise_equal(after[key], before[key], f"skipped step {i} changed {key}")
            for pid, entry in before["optimizer"]["state"].items():
                for key, value in entry.items():
                    _assert_bitwise_equal(after["optimizer"]["state"][pid][key], value, f"step {i}: {pid}/{key}")
        for (name, p), q in zip(device[0].named_parameters(), host[0].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {i} {name}: {m}")
    assert device[2].state.skipped_on_device is not None        # the device path did run
    assert host[2].steps == device[2].steps == 2

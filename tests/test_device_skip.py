"""GradScaler with a fused=True optimizer: the skip verdict (found_inf) stays on the device.

torch's fused SGD/Adam/AdamW take ``found_inf`` as a device flag and skip a step with an inf/NaN
gradient without reading it on the host. The hooks used to read it (one host sync per step). Where
every installed geometry declares ``Geometry.honours_device_skip`` (channel_directed, psi), the flag is
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
        plan = gc.apply(model, policy, opt, backend=backend)
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
@pytest.mark.parametrize("policy", [PSI, CD, RESNET], ids=["psi", "channel_directed", "resnet"])
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
    """pom updates state in its programs that nothing masks yet: the hooks read found_inf (one read)."""
    logs, _, _ = _train_twins(POM, "sgd_momentum", "eager")
    for i, log in enumerate(logs):
        assert len(log) == 1, f"step {i}: {log.summary()}"


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
                                         (POM, "found_inf is read on the host at every step (one sync on a GPU) "
                                               "because pom cannot take the skip on the device yet")])
def test_the_summary_says_where_a_skipped_step_is_decided(policy, says):
    _, _, plan, _ = _twin(policy, "sgd", "eager")
    assert any(says in note for note in plan.notes), plan.notes
    assert says in plan.summary()
    model = bn_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        unfused = gc.apply(model, policy, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not any("GradScaler" in note for note in unfused.notes), unfused.notes

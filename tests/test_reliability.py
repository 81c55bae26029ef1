"""Reliability defects of issue 15, one test per row (R1-R11), each failing on the main it was found on."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import geomcompile as gc
from geomcompile.errors import GeomCompileError

PSI = {"version": 1, "rules": [{"name": "bn-convs", "match": {"kind": "conv", "scale_invariant": True},
                                "use": {"psi": {}}}]}
CD = {"version": 1, "rules": [{"name": "convs", "match": {"kind": "conv"},
                               "use": {"channel_directed": {"metric": "sobolev", "lam": 2.0}}}]}


def bn_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 2, (4,), generator=g)


def step(model, optimizer):
    x, y = batch()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


# ---- R6: one plan per optimizer ----------------------------------------------------------------
@pytest.mark.parametrize("second", [PSI, CD])
def test_a_second_plan_on_the_same_optimizer_is_refused_and_the_first_keeps_working(second):
    """Before: a second apply was accepted, both plans ran every step (step counter 2 after one step)
    and removing one deleted the state they shared."""
    model = bn_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = gc.apply(model, PSI, optimizer)
    with pytest.raises(GeomCompileError, match=r"already has a geomcompile plan installed.*remove\(\)"):
        gc.apply(model, second, optimizer)
    step(model, optimizer)
    assert first.steps == 1
    assert first.installed and len(optimizer._optimizer_step_pre_hooks) == 1

    # The same model and optimizer without the refused plan: identical weights after the step.
    twin = bn_cnn()
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    gc.apply(twin, PSI, twin_opt)
    step(twin, twin_opt)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_after_remove_another_plan_can_be_installed():
    model = bn_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gc.apply(model, PSI, optimizer).remove()
    plan = gc.apply(model, CD, optimizer)
    step(model, optimizer)
    assert plan.steps == 1


def test_one_plan_per_optimizer_sees_through_wrappers():
    """A plan on the inner optimizer and another through a wrapper of it (timm's Lookahead) would run
    on the same optimizer: refused like two plans on one optimizer."""
    from tests.test_step_protocol import _timm_module
    Lookahead = _timm_module("optim/lookahead.py").Lookahead
    model = bn_cnn()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = Lookahead(inner)
    gc.apply(model, PSI, inner)
    with pytest.raises(GeomCompileError, match="already has a geomcompile plan"):
        gc.plan(model, CD).install(wrapped)


# ---- R3: fused optimizers under GradScaler ------------------------------------------------------
def _scaled_run(fused: bool, make_opt, policy, steps: int = 3, poison_step: int | None = None):
    model = bn_cnn()
    optimizer = make_opt(model.parameters(), fused)
    plan = gc.apply(model, policy, optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for i in range(steps):
        x, y = batch(seed=i)
        optimizer.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if i == poison_step:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
    return model, plan


@pytest.mark.parametrize("make_opt", [
    lambda params, fused: torch.optim.SGD(params, lr=0.05, momentum=0.9, fused=fused, foreach=not fused),
    lambda params, fused: torch.optim.AdamW(params, lr=1e-3, fused=fused, foreach=not fused),
], ids=["sgd", "adamw"])
@pytest.mark.parametrize("policy", [PSI, CD], ids=["psi", "channel_directed"])
def test_fused_optimizer_under_gradscaler_gets_unscaled_gradients_and_skips_inf_steps(make_opt, policy):
    """Before: torch hands unscaling to fused optimizers, so the hooks saw scaled gradients (trajectory
    off by 4.7e-2) and ran on skipped steps (step counter 3 after 2 real + 1 skipped steps)."""
    reference, ref_plan = _scaled_run(False, make_opt, policy, poison_step=1)
    fused, fused_plan = _scaled_run(True, make_opt, policy, poison_step=1)
    assert ref_plan.steps == fused_plan.steps == 2
    worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                for a, b in zip(fused.parameters(), reference.parameters()))
    assert worst < 1e-5, worst


# ---- R4: a resumed lr reaches the fused kernels -------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_resumed_and_scheduled_lr_reach_every_backend(backend):
    """Before: the triton backend kept the param_group dicts of install; optimizer.load_state_dict
    replaces them, so a resumed lr (and a scheduler after resume) was ignored by the fused kernels
    (update 100x too large after resuming with lr 1e-3). Here every backend must move the weights
    exactly as the eager backend with the lr the optimizer holds now."""
    from tests.test_triton_backend import _setup, _step
    moved = {}
    for name in ("eager", backend):
        model, opt, plan = _setup("sobolev", "sgd_momentum", name)
        _step(model, opt, 0)
        saved = opt.state_dict()
        for group in saved["param_groups"]:
            group["lr"] = 1e-3                       # the checkpoint says lr 1e-3
        opt.load_state_dict(saved)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        before = [p.detach().clone() for p in model.parameters()]
        for step in (1, 2):
            _step(model, opt, step)
            scheduler.step()
        moved[name] = [float((p - b).abs().max()) for p, b in zip(model.parameters(), before) if p.numel()]
        assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    for a, b in zip(moved["eager"], moved[backend]):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-7)
    assert max(moved[backend]) < 0.05       # an lr of 0.05 (the install-time value) would move far more


# ---- R11: a model changed after gc.plan() --------------------------------------------------------
@pytest.mark.parametrize("change,named", [
    ("added", "extra.weight"), ("removed", "8.weight"), ("replaced", "3.weight")])
def test_a_model_changed_since_plan_is_refused_at_install_naming_the_parameters(change, named):
    """Before: a layer added (or replaced) after gc.plan() silently got no geometry and no warning."""
    model = bn_cnn()
    plan = gc.plan(model, PSI)
    if change == "added":
        model.add_module("extra", nn.Linear(2, 2))
    elif change == "removed":
        model[8] = nn.Identity()
    else:
        model[3] = nn.Conv2d(6, 4, 3, padding=1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(GeomCompileError, match=rf"changed since gc.plan\(\): {change} .*{named}.*gc.plan"):
        plan.install(optimizer)
    assert not optimizer._optimizer_step_pre_hooks


def test_a_model_wrapped_after_plan_is_the_same_model():
    """DataParallel (like DDP) prefixes names with `module.`; canonical names make it the same model."""
    model = bn_cnn()
    plan = gc.plan(model, PSI)
    wrapped = nn.DataParallel(model)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    plan.install(optimizer)
    step(model, optimizer)
    assert plan.steps == 1
    planned_wrapped = gc.plan(nn.DataParallel(bn_cnn()), PSI)
    planned_wrapped.install(torch.optim.SGD(planned_wrapped.model.parameters(), lr=0.1))


def test_parameters_added_to_the_optimizer_after_a_model_change_are_named_at_the_step():
    """A layer replaced after install and given to the optimizer (add_param_group): the next step
    warns, naming it, instead of training it silently without a geometry."""
    model = bn_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = gc.apply(model, PSI, optimizer)
    step(model, optimizer)
    model[3] = nn.Conv2d(6, 4, 3, padding=1, bias=False)      # a new layer in place of a psi conv
    optimizer.add_param_group({"params": list(model[3].parameters())})
    with pytest.warns(gc.GeomCompileWarning, match=r"add_param_group brought 1 parameter.*3\.weight.*gc\.plan"):
        step(model, optimizer)
    assert plan.steps == 2


# ---- R7: half precision results that fit the parameter's dtype ----------------------------------
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_fp16_psi_gradient_beyond_fp16_range_saturates_instead_of_overflowing(backend):
    """Before: ‖w‖²·g (finite in float32) overflowed into the float16 .grad inside optimizer.step, where
    GradScaler cannot catch it: 78 of 162 conv weights non-finite after one step with finite
    gradients (eager). Now the float32 value saturates at float16's largest finite value (README,
    precision); every weight stays finite and the entries that fit are the float32 result rounded.
    (The compile backend runs the same psi_grad. Triton's fused kernel never stores the transformed
    gradient: it updates the weight from the float32 value, so nothing saturates there.)"""
    from geomcompile.geometries.psi import psi_grad
    model = bn_cnn().half()
    with torch.no_grad():
        model[0].weight.mul_(400.0)                # ‖w_u‖² ≈ 4e4..6e4: ‖w_u‖²·g passes 65504 for |g| > ~1
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    gc.apply(model, PSI, optimizer, backend=backend)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 2).half()
    w, g = model[0].weight.detach().float(), model[0].weight.grad.float()
    exact = psi_grad(w, g)                          # float32 in, float32 out: the unrounded value
    assert bool((exact.abs() > 65504).any()) and bool(torch.isfinite(exact).all())
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name}: {int((~torch.isfinite(p)).sum())} non-finite weights"
    want = (w - 1e-6 * (exact if backend == "triton" else exact.clamp(-65504, 65504))).half()
    torch.testing.assert_close(model[0].weight.detach(), want, rtol=2e-3, atol=0)


# ---- R5: what user step hooks see, per backend (README "user step hooks", docs/triton.md) ----------
# When each hook runs relative to geomcompile's (torch runs step hooks in registration order), and the
# conv1.weight.grad it sees: "raw" (the loss gradient), "transformed" (the geometry's), None (hidden:
# the Triton kernel already stepped that parameter, so torch's step must skip it).
HOOK_VIEW = {
    "eager": {"pre_before": "raw", "pre_after": "transformed", "post_before": "transformed",
              "post_after": "transformed", "after_step": "transformed"},
    "triton": {"pre_before": "raw", "pre_after": None, "post_before": None, "post_after": "raw",
               "after_step": "raw"},
}
HOOK_VIEW["compile"] = HOOK_VIEW["eager"]


@pytest.mark.parametrize("backend", list(HOOK_VIEW))
def test_user_step_hooks_see_the_documented_gradients_on_every_backend(backend):
    """Before: undocumented; on triton a user pre-hook registered after install found .grad None while
    eager showed the transformed gradient. The behaviour is now documented per backend; this pins it."""
    from geomcompile.geometries.channel_directed import sobolev
    from tests.test_triton_backend import INPUTS, Net
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weight, seen = model.conv1.weight, {}

    def record(when):
        def hook(*args):
            seen[when] = None if weight.grad is None else weight.grad.clone()
        return hook

    optimizer.register_step_pre_hook(record("pre_before"))
    optimizer.register_step_post_hook(record("post_before"))
    gc.apply(model, CD, optimizer, example_inputs=INPUTS, backend=backend)
    optimizer.register_step_pre_hook(record("pre_after"))
    optimizer.register_step_post_hook(record("post_after"))
    for p in model.parameters():
        p.grad = torch.randn(p.shape)
    raw = weight.grad.clone()
    transformed = sobolev(raw, 2.0, 0)
    optimizer.step()
    seen["after_step"] = weight.grad

    def kind(g):
        if g is None:
            return None
        return "raw" if torch.equal(g, raw) else "transformed" if torch.allclose(g, transformed, atol=1e-6) else "other"
    assert {k: kind(v) for k, v in seen.items()} == HOOK_VIEW[backend]


# ---- R8: pom feature_std and copies of the model / data parallelism ---------------------------------
class _BNSmallCNN(nn.Module):
    """A BatchNorm layer, so that update_bn runs the copy's forwards."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x))))).mean(dim=(2, 3))


def _feature_std_run():
    from tests.test_pom import policy
    torch.manual_seed(0)
    model = _BNSmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    plan = gc.apply(model, policy({"radius": 2.0, "feature_std": True, "std_momentum": 0.5, "min_std": 0.01}),
                    optimizer)
    optimizer.zero_grad()
    model(3.0 * torch.randn(8, 3, 8, 8)).sum().backward()
    optimizer.step()
    return model, optimizer, plan


@pytest.mark.parametrize("copy_with", ["deepcopy", "averaged_model"])
def test_feature_std_of_a_copy_of_the_model_does_not_touch_the_live_statistics(copy_with):
    """Before: the forward pre-hook (and its captured state) was copied by deepcopy / AveragedModel, so
    update_bn on the copy rewrote the live run's input std and radius (0.58 -> 1.11). Now a run whose
    model was copied takes the same next step as one whose model was not."""
    import copy
    from torch.optim.swa_utils import AveragedModel, update_bn
    (model, optimizer, plan), (control, control_opt, control_plan) = _feature_std_run(), _feature_std_run()
    loader = [0.1 * torch.randn(8, 3, 8, 8) for _ in range(3)]     # inputs of a very different std
    if copy_with == "deepcopy":
        twin = copy.deepcopy(model).train()
        for x in loader:
            twin(x)
    else:
        update_bn(loader, AveragedModel(model))
    x = 2.0 * torch.randn(8, 3, 8, 8)
    for m, o in ((model, optimizer), (control, control_opt)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    got, want = plan.diagnostics()["conv1.weight"]["pom"], control_plan.diagnostics()["conv1.weight"]["pom"]
    assert (got["feature_std"], got["radius"]) == (want["feature_std"], want["radius"])
    torch.testing.assert_close(model.conv1.weight, control.conv1.weight, rtol=0, atol=0)


def test_feature_std_is_refused_under_data_parallelism(monkeypatch):
    """Before: each rank measured its own inputs, so DDP replicas' radii diverged (ranks 2.0e-2 apart).
    Refused at install when torch.distributed runs with world size > 1 (checked without spawning)."""
    from geomcompile.geometries.pom import feature_std_distributed_problem
    from tests.test_pom import SmallCNN, policy
    assert feature_std_distributed_problem() is None               # not initialised here
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    assert "world size 2" in feature_std_distributed_problem()
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(GeomCompileError, match=r"feature_std.*world size 2.*feature_std: false"):
        gc.apply(model, policy({"feature_std": True}), optimizer)
    gc.apply(model, policy({"feature_std": False}), optimizer)     # the rest of pom is fine distributed

"""The runtime's step protocol inside real training loops: closures, accumulation, frozen parameters,
DCP's initialisation step, add_param_group, plan fingerprints, wrapper optimizers, retraction events.

Each test compares against a reference computed from the pure functions (gc.functional) or from an
uninterrupted run, so that a silent no-op or a wrong update fails it.
"""
import copy
import importlib.util
import warnings

import pytest
import torch
from torch import nn

import geomcompile as gc
from geomcompile.functional import psi_grad, sobolev

from .test_runtime import BACKENDS, CASES, SmallNet, _data, _entries, _inputs, _model, _policy

SOBOLEV = {"version": 1, "rules": [{"name": "convs", "match": {"kind": "conv"},
                                    "use": {"channel_directed": {"metric": "sobolev", "lam": 0.5}}}]}


def _psi(max_norm=2.0):
    return {"version": 1, "rules": [{"name": "bn-convs", "match": {"scale_invariant": True},
                                     "use": {"psi": {"max_norm": max_norm}}}]}


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _raw_grads(model, batches):
    model.zero_grad()
    for b in batches:
        _loss(model, b).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_one_sobolev_step(model, reference, opt, name, lr):
    """One step through `opt` moves `name` by exactly -lr * sobolev(raw gradient, 0.5)."""
    batch = _data(1)[0]
    raw = _raw_grads(reference, [batch])
    before = model.get_parameter(name).detach().clone()
    opt.zero_grad()
    _loss(model, batch).backward()
    opt.step()
    torch.testing.assert_close(model.get_parameter(name).detach(), before - lr * sobolev(raw[name], 0.5),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS + ["compile"])
def test_closure_step_transforms_the_closures_gradients_once(backend):
    torch.manual_seed(0)
    model = SmallNet()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gc.apply(model, SOBOLEV, opt, example_inputs=_inputs(), backend=backend)
    batch = _data(1)[0]
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        return loss

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    returned = opt.step(closure)
    assert len(calls) == 1, "the closure must run exactly once"
    assert torch.equal(returned, _loss(reference, batch)), "step(closure) returns the closure's loss"
    raw = _raw_grads(reference, [batch])
    for n, p in model.named_parameters():
        if n not in raw:
            continue
        g = sobolev(raw[n], 0.5) if n.startswith("conv") else raw[n]
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * g, rtol=1e-5, atol=1e-6, msg=n)


def test_closure_optimizers_that_reevaluate_it_are_refused():
    model = SmallNet()
    with pytest.raises(gc.GeomCompileError, match="LBFGS evaluates the closure several times"):
        gc.apply(model, SOBOLEV, torch.optim.LBFGS(model.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulated_gradients_are_transformed_as_their_sum(backend):
    torch.manual_seed(0)
    model = SmallNet()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gc.apply(model, SOBOLEV, opt, example_inputs=_inputs(), backend=backend)
    batches = _data(2)
    raw = _raw_grads(reference, batches)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    for b in batches:
        _loss(model, b).backward()
    opt.step()
    for n in ("conv1.weight", "conv2.weight"):
        want = before[n] - 0.1 * sobolev(raw[n], 0.5)
        torch.testing.assert_close(getattr(model, n.split(".")[0]).weight.detach(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS + ["compile"])
def test_frozen_parameters_are_never_retracted(backend):
    torch.manual_seed(0)
    model = SmallNet()
    with torch.no_grad():
        model.conv2.weight.mul_(50.0)          # far above max_norm: psi would renormalise it
    model.conv2.weight.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plan = gc.apply(model, _psi(2.0), opt, example_inputs=_inputs(), backend=backend)
    frozen = model.conv2.weight.detach().clone()
    for b in _data(3):
        opt.zero_grad()
        _loss(model, b).backward()
        opt.step()
    assert torch.equal(model.conv2.weight, frozen)
    assert plan.steps == 3


@pytest.mark.parametrize("case_name", list(CASES))
def test_dcp_initialisation_step_is_not_a_training_step(case_name):
    """torch.distributed.checkpoint's _init_optim_state steps once with lr 0 on zero gradients."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state
    torch.manual_seed(0)
    model = _model(CASES[case_name])
    with torch.no_grad():
        model.conv1.weight.mul_(50.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plan = gc.apply(model, _policy(CASES[case_name]), opt, example_inputs=_inputs())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    entries = copy.deepcopy(_entries(opt.state_dict()))
    _init_optim_state(opt)
    assert plan.steps == 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    from .test_runtime import _assert_same_tree
    _assert_same_tree(_entries(opt.state_dict()), entries, "the initialisation step changed geometry state")


def test_add_param_group_after_install_gets_the_policy():
    torch.manual_seed(0)
    model = SmallNet()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD([model.conv1.weight], lr=0.1)
    with pytest.warns(gc.GeomCompileWarning, match="add_param_group later gives them"):
        plan = gc.apply(model, SOBOLEV, opt, example_inputs=_inputs())
    opt.add_param_group({"params": [model.conv2.weight], "lr": 0.05})
    _assert_one_sobolev_step(model, reference, opt, "conv2.weight", lr=0.05)
    assert any("add_param_group: 1 new parameter(s) got their geometries: conv2.weight" in n for n in plan.notes)


def test_state_of_another_plan_is_refused_unless_overridden():
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gc.apply(model, _psi(2.0), opt, example_inputs=_inputs())
    for b in _data(2):
        opt.zero_grad()
        _loss(model, b).backward()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert all(e["plan"] and e["version"] == gc.__version__ for e in _entries(saved).values())
    other = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plan = gc.apply(copy.deepcopy(model), _psi(3.0), other, example_inputs=_inputs())
    other2 = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gc.apply(model, _psi(3.0), other2, example_inputs=_inputs())
    with pytest.raises(gc.GeomCompileError, match=r"different geomcompile plan: conv1.weight: "
                                                  r"metric=psi\(max_norm=2.0\) in the checkpoint, "
                                                  r"metric=psi\(max_norm=3.0\) here.*state_mismatch='reset'"):
        other2.load_state_dict(saved)
    fresh = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plan = gc.apply(model, _psi(3.0), fresh, example_inputs=_inputs(), state_mismatch="reset")
    fresh.load_state_dict(saved)
    assert any("started fresh" in n for n in plan.notes)
    assert all(int(plan.state.of(k, "psi")["renormalised"]) == 0 for k in ("conv1.weight", "conv2.weight"))


def test_loading_before_install_is_refused_with_the_order_that_works():
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gc.apply(model, _psi(), opt, example_inputs=_inputs())
    opt.zero_grad()
    _loss(model, _data(1)[0]).backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    again = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    again.load_state_dict(saved)
    with pytest.raises(gc.GeomCompileError, match="install the plan first .* then call optimizer.load_state_dict"):
        gc.apply(model, _psi(), again, example_inputs=_inputs())


def test_optimizer_state_stays_parameter_keyed_for_dcp_zero_and_dynamo():
    model = SmallNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        gc.apply(model, _psi(), opt, example_inputs=_inputs())
    opt.zero_grad()
    _loss(model, _data(1)[0]).backward()
    opt.step()
    assert all(isinstance(k, torch.Tensor) for k in opt.state)
    assert all(isinstance(k, int) for k in opt.state_dict()["state"])


def test_psi_under_adaptive_optimizers_warns_once():
    model = SmallNet()
    with pytest.warns(gc.GeomCompileWarning) as record:
        plan = gc.apply(model, _psi(), torch.optim.Adam(model.parameters()), example_inputs=_inputs())
    texts = [str(w.message) for w in record if "psi under Adam" in str(w.message)]
    assert len(texts) == 1 and "Theorem 1" in texts[0] and "torch.optim.SGD" in texts[0]
    assert sum("psi under Adam" in w for w in plan.warnings) == 1


class _NoInit(torch.optim.SGD):
    def __init__(self, params):           # never calls Optimizer.__init__
        self.param_groups = [{"params": list(params), "lr": 0.1}]
        self.state = {}


def test_optimizer_subclass_without_optimizer_init_gets_a_clear_error():
    model = SmallNet()
    with pytest.raises(gc.GeomCompileError, match="never called torch.optim.Optimizer.__init__"):
        gc.apply(model, SOBOLEV, _NoInit(model.parameters()))


def _timm_module(relative):
    """A module of the timm package loaded by path: `import timm` needs torchvision (no CPU build here),
    these files need only torch."""
    import importlib.metadata as md
    dist = md.distribution("timm")
    path = dist.locate_file(f"timm/{relative}")
    spec = importlib.util.spec_from_file_location(f"_timm_{relative.replace('/', '_')[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _force_renormalisations(model, opt, steps=4):
    for b in _data(steps):
        opt.zero_grad()
        _loss(model, b).backward()
        opt.step()


def test_lookahead_slow_weights_follow_retractions():
    Lookahead = _timm_module("optim/lookahead.py").Lookahead
    torch.manual_seed(0)
    model = SmallNet()
    with torch.no_grad():
        model.conv1.weight.mul_(20.0)
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = Lookahead(base, alpha=0.5, k=2)
    plan = gc.apply(model, _psi(2.0), opt, example_inputs=_inputs())
    assert any("hooks on the SGD it wraps" in n for n in plan.notes)
    events = []
    plan.on_retract(events.append)
    _force_renormalisations(model, opt, steps=1)
    assert events and events[0].name == "conv1.weight"
    slow = base.state[model.conv1.weight].get("lookahead_slow_buff")
    _force_renormalisations(model, opt, steps=3)
    slow = base.state[model.conv1.weight]["lookahead_slow_buff"]
    rows = lambda t: t.detach().flatten(1).norm(dim=1)
    # After a retraction every unit's norm is 1 (renormalised) or grew slowly from it; the slow copy
    # must be on the same scale, not on the 20x scale it was created at.
    assert torch.all(rows(slow) < 3.0), rows(slow)


def _ema_of(kind, model):
    """(the averaged copy, how to update it): torch's AveragedModel or timm's ModelEmaV3."""
    if kind == "swa_utils":
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        return ema, ema.update_parameters
    ema = _timm_module("utils/model_ema.py").ModelEmaV3(model, decay=0.9)
    return ema, ema.update


@pytest.mark.parametrize("kind", ["swa_utils", "timm"])
def test_averaged_models_follow_retractions(kind):
    torch.manual_seed(0)
    model = SmallNet()
    with torch.no_grad():
        model.conv1.weight.mul_(20.0)
    ema, update = _ema_of(kind, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plan = gc.apply(model, _psi(2.0), opt, example_inputs=_inputs())
    gc.ema.follow(plan, ema)
    for b in _data(4):
        opt.zero_grad()
        _loss(model, b).backward()
        opt.step()
        update(model)
    ratio = ema.module.conv1.weight.flatten(1).norm(dim=1) / model.conv1.weight.flatten(1).norm(dim=1)
    assert torch.all((ratio - 1).abs() < 0.2), ratio     # without follow: about 13x (0.9^4 of the 20x start)


def test_retraction_events_report_the_factors():
    torch.manual_seed(0)
    model = SmallNet()
    with torch.no_grad():
        model.conv1.weight.mul_(20.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    plan = gc.apply(model, _psi(2.0), opt, example_inputs=_inputs())
    events = []
    handle = plan.on_retract(lambda e: events.append((e.name, e.channel_factors.clone())))
    opt.zero_grad()
    _loss(model, _data(1)[0]).backward()
    w_before = model.conv1.weight.detach().clone()
    g = psi_grad(w_before, model.conv1.weight.grad)
    opt.step()
    stepped = w_before - 0.05 * g
    name, factors = events[0]
    assert name == "conv1.weight"
    torch.testing.assert_close(factors, 1 / stepped.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(model.conv1.weight.detach(), stepped * factors.reshape(-1, 1, 1, 1), rtol=1e-5, atol=1e-6)
    handle.remove()
    seen = len(events)        # the eager renormalisation reports every psi parameter (factors 1 if unchanged)
    _force_renormalisations(model, opt, steps=1)
    assert len(events) == seen


def test_compiled_and_ddp_wrapped_models_use_the_users_names(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    policy = {"version": 1, "rules": [{"name": "one", "match": {"param": "conv1.weight"},
                                       "use": {"channel_directed": {"metric": "sobolev", "lam": 0.5}}}]}
    model = SmallNet()
    compiled = torch.compile(model)
    plan = gc.plan(compiled, policy, example_inputs=_inputs())
    assert [n for n, s in plan.assignments.items() if s] == ["conv1.weight"]
    assert any("torch.compile" in n for n in plan.notes), plan.notes
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        wrapped = DDP(SmallNet())
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
        plan = gc.apply(wrapped, policy, opt, example_inputs=_inputs())
        assert [n for n, s in plan.assignments.items() if s] == ["conv1.weight"]
        names = set(_entries(opt.state_dict()))
        assert "conv1.weight" in names and not any(n.startswith("module.") for n in names)
    finally:
        dist.destroy_process_group()


class _KwargsNet(nn.Module):
    """Called as model(**batch), like a Hugging Face model; the Python branch makes fx tracing fail."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8, bias=False)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None):
        h = self.norm(self.proj(self.embed(input_ids)))
        if attention_mask is not None and bool(attention_mask.any()):
            h = h * attention_mask.unsqueeze(-1)
        return self.head(h.mean(1))


def test_mapping_example_inputs_capture_by_running_the_model():
    batch = {"input_ids": torch.randint(0, 10, (2, 5)), "attention_mask": torch.ones(2, 5)}
    structure = gc.analyze(_KwargsNet(), example_inputs=batch)
    assert structure.capture_path == "run"
    assert structure["proj.weight"].scale_invariant is not None      # Linear -> LayerNorm: tensor unit
    assert structure["proj.weight"].input_shape == (2, 5, 8)


def test_mapping_example_inputs_on_the_fx_path():
    structure = gc.analyze(SmallNet(), example_inputs={"x": _inputs()[0]})
    assert structure.capture_path == "fx" and structure["conv1.weight"].input_shape == (6, 3, 8, 8)


@pytest.mark.parametrize("use, expected", [
    ({"channel_directed": {"metric": "h0"}}, "identical to plain SGD"),
    ({"psi": {"max_norm": 0.5}}, "every unit is renormalised at every step"),
])
def test_option_combinations_that_do_nothing_useful_warn_with_their_position(tmp_path, use, expected):
    import yaml
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "rules": [{"name": "r", "match": {"kind": "conv"}, "use": use}]}))
    if "psi" in use:
        text = path.read_text().replace("kind: conv", "scale_invariant: true")
        path.write_text(text)
    with pytest.warns(gc.GeomCompileWarning, match=expected) as record:
        gc.apply(SmallNet(), str(path), torch.optim.SGD(SmallNet().parameters(), lr=0.1), example_inputs=_inputs())
    texts = [str(w.message) for w in record if expected in str(w.message)]
    assert len(texts) == 1 and texts[0].startswith(f"{path}:") and texts[0].split(":")[1].isdigit(), texts


@pytest.mark.parametrize("wrap", ["accelerate", "lightning"])
def test_framework_optimizer_wrappers_install_on_the_optimizer_they_wrap(wrap):
    torch.manual_seed(0)
    model = SmallNet()
    reference = copy.deepcopy(model)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    if wrap == "accelerate":
        from accelerate import Accelerator
        from accelerate.optimizer import AcceleratedOptimizer
        Accelerator(cpu=True)
        wrapped = AcceleratedOptimizer(base, device_placement=False)
    else:   # what LightningModule.optimizers() returns; its step() needs a Trainer's strategy, which ends
        from lightning.pytorch.core.optimizer import LightningOptimizer     # in the wrapped optimizer's step
        wrapped = LightningOptimizer(base)
        wrapped.step = base.step
    plan = gc.apply(model, SOBOLEV, wrapped, example_inputs=_inputs())
    assert any("hooks on the SGD it wraps" in n for n in plan.notes)
    _assert_one_sobolev_step(model, reference, wrapped, "conv1.weight", lr=0.1)


@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_clip_grad_norm_clips_after_the_transform(backend):
    torch.manual_seed(0)
    model = SmallNet()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gc.apply(model, SOBOLEV, opt, example_inputs=_inputs(), backend=backend, clip_grad_norm=0.01)
    batch = _data(1)[0]
    raw = _raw_grads(reference, [batch])
    transformed = {n: (sobolev(g, 0.5) if n.startswith("conv") else g) for n, g in raw.items()}
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in transformed.values()]))
    assert total > 0.01, "the case must clip"
    scale = 0.01 / (total + 1e-6)                      # torch.nn.utils.clip_grad_norm_'s factor
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    _loss(model, batch).backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in transformed:
            torch.testing.assert_close(p.detach(), before[n] - 0.1 * scale * transformed[n], rtol=1e-5, atol=1e-7, msg=n)


def test_clip_grad_norm_with_triton_is_refused():
    model = SmallNet()
    with pytest.raises(gc.GeomCompileError, match="clip_grad_norm is not supported with the triton backend"):
        gc.apply(model, SOBOLEV, torch.optim.SGD(model.parameters(), lr=0.1), backend="triton", clip_grad_norm=1.0)


def test_single_parameter_geometries_refuse_coupled_units():
    from geomcompile.geometries.base import Unit
    structure = gc.analyze(SmallNet(), example_inputs=_inputs())
    unit = Unit(("conv1.weight", "conv2.weight"), (structure["conv1.weight"], structure["conv2.weight"]))
    with pytest.raises(gc.GeomCompileError, match="spectral acts on one parameter per unit"):
        gc.geometries.get("spectral")().pre_step(unit, [None, None], {}, None)

"""Hooks and plan lifecycle, driven by one table of geometry cases (every registered geometry needs one).

Each case gives a policy `use` entry, the selectors that pick the parameters it applies to, and
whether it needs example inputs. Every geometry then gets: works with every base optimizer,
None-grad parameters untouched, install/remove restores bit-identical behaviour, state_dict
round trip continues exactly, GradScaler-skipped steps change nothing.
"""
import copy

import pytest
import torch
from torch import nn

import geomcompile as gc
from geomcompile.geometries import REGISTRY

from .registry import CASES as REGISTRY_CASES

# The cases come from the one registry (tests/registry.py), in this file's {"use", "match"} form.
CASES = {name: {"use": case.rules[0][1], "match": case.rules[0][0], "model": case.model}
         for name, case in REGISTRY_CASES.items()}

# Every backend must run every geometry (fast paths where it has them, the eager program elsewhere).
# "triton" runs its kernels under the Triton interpreter on CPU (tests/conftest.py).
BACKENDS = ["eager", "triton"]

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
}


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.frozen = nn.Linear(4, 4)   # its grad stays None in some tests

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def _inputs():
    return (torch.randn(6, 3, 8, 8),)


def _entries(optimizer_state_dict) -> dict:
    """The geometry state an optimizer state dict carries: parameter name -> entry."""
    return {v["geomcompile"]["name"]: v["geomcompile"] for v in optimizer_state_dict["state"].values()
            if "geomcompile" in v}


def _assert_same_tree(a, b, msg):
    assert type(a) is type(b), msg
    if isinstance(a, dict):
        assert a.keys() == b.keys(), msg
        for k in a:
            _assert_same_tree(a[k], b[k], msg)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), msg
    else:
        assert a == b, msg


def _policy(case):
    return {"version": 1, "rules": [{"name": "case", "match": case["match"], "use": case["use"]}]}


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(n)]


def _train(model, opt, data, scaler=None):
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()


def _model(case):
    """The case's model (SmallNet unless the registry case brings its own with SmallNet's layout)."""
    return case["model"]() if case.get("model") is not None else SmallNet()


def _twins(case):
    """Two identical models, each with its own SGD-momentum optimizer."""
    torch.manual_seed(0)
    model = _model(case)
    reference = copy.deepcopy(model)
    return (model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            reference, torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9))


def _case(name):
    return CASES[name]


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("case_name", list(CASES))
def test_runs_with_every_optimizer_and_changes_the_update(case_name, opt_name):
    case = _case(case_name)
    torch.manual_seed(0)
    model = _model(case)
    plain = copy.deepcopy(model)
    opt = OPTIMIZERS[opt_name](model.parameters())
    plan = gc.apply(model, _policy(case), opt, example_inputs=_inputs())
    assert plan.assignments, "the case's rule assigned nothing"
    _train(model, opt, _data(3))
    _train(plain, OPTIMIZERS[opt_name](plain.parameters()), _data(3))
    changed = [n for n, p in model.named_parameters()
               if n in plan.assignments and not torch.equal(p, dict(plain.named_parameters())[n])]
    assert changed, "the geometry did not change any assigned parameter's trajectory"
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_params_with_none_grad_are_untouched(case_name, backend):
    case = _case(case_name)
    torch.manual_seed(0)
    model = _model(case)
    model.conv2.weight.requires_grad_(False)        # frozen: grad stays None
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gc.apply(model, _policy(case), opt, example_inputs=_inputs(), backend=backend)
    w0 = model.conv2.weight.detach().clone()
    _train(model, opt, _data(2))
    assert model.conv2.weight.grad is None
    assert torch.equal(model.conv2.weight, w0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_remove_restores_bit_identical_behaviour(case_name, backend):
    case = _case(case_name)
    model, opt, reference, opt_ref = _twins(case)
    plan = gc.apply(model, _policy(case), opt, example_inputs=_inputs(), backend=backend)
    plan.remove()
    assert "geomcompile" not in opt.state
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    # a geometry may move weights at install (pom retracts onto its manifold); from there on the
    # optimizer must behave exactly as one that never had hooks
    reference.load_state_dict(model.state_dict())
    data = _data(3)
    _train(model, opt, data)
    _train(reference, opt_ref, data)
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_state_dict_round_trip_continues_exactly(case_name, backend):
    case = _case(case_name)
    torch.manual_seed(0)
    model = _model(case)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gc.apply(model, _policy(case), opt, example_inputs=_inputs(), backend=backend)
    data = _data(6)
    _train(model, opt, data[:3])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _train(model, opt, data[3:])                    # uninterrupted run

    resumed = _model(case)
    resumed.load_state_dict(saved_model)
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    plan2 = gc.apply(resumed, _policy(case), opt2, example_inputs=_inputs(), backend=backend)
    kept = copy.deepcopy(saved_opt)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, data[3:])
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    assert plan2.steps == 6
    entries = _entries(saved_opt)
    assert entries and all(e["steps"] == 3 for e in entries.values())
    _assert_same_tree(entries, _entries(kept), "stepping wrote into the loaded checkpoint")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_grad_scaler_skipped_step_changes_nothing_and_hooks_see_unscaled_grads(case_name, backend):
    case = _case(case_name)
    model, opt, reference, opt_ref = _twins(case)
    gc.apply(model, _policy(case), opt, example_inputs=_inputs(), backend=backend)
    gc.apply(reference, _policy(case), opt_ref, example_inputs=_inputs(), backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    data = _data(2)
    _train(model, opt, data, scaler=scaler)          # scaled loss, unscaled before the hooks
    _train(reference, opt_ref, data)
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state_before = copy.deepcopy(opt.state_dict())
    x, y = data[0]
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y) * float("inf")).backward()
    scaler.step(opt)                                  # inf grads: the scaler skips the step
    scaler.update()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    _assert_same_tree(_entries(opt.state_dict()), _entries(state_before), "a skipped step changed geometry state")


def test_missing_parameters_are_reported():
    model = SmallNet()
    opt = torch.optim.SGD([model.conv1.weight], lr=0.1)
    with pytest.warns(gc.GeomCompileWarning, match="not in the optimizer"):
        plan = gc.apply(model, _policy(CASES["psi"]), opt)
    text = plan.summary()
    assert "not in the optimizer" in text and "conv2.weight" in text


def test_installing_twice_is_an_error_and_unknown_backend_named():
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = gc.apply(model, _policy(CASES["psi"]), opt)
    with pytest.raises(gc.GeomCompileError, match="already installed"):
        plan.install(opt)
    with pytest.raises(gc.GeomCompileError, match="unknown backend 'cuda'"):
        gc.plan(model, _policy(CASES["psi"])).install(torch.optim.SGD(model.parameters(), lr=0.1), backend="cuda")


def test_summary_readable_for_200_parameters():
    from collections import OrderedDict
    blocks = OrderedDict(
        (f"stage_with_a_long_name_{i}", nn.Sequential(OrderedDict(
            convolution=nn.Conv2d(4, 4, 3, padding=1, bias=False), norm=nn.BatchNorm2d(4), act=nn.ReLU())))
        for i in range(67))
    model = nn.Sequential(blocks)
    assert len(list(model.parameters())) >= 200
    plan = gc.plan(model, "resnet")
    lines = plan.summary(name_width=20).splitlines()
    table = lines[: 2 + len(list(model.parameters()))]
    col = table[0].index("shape")                     # every row's second column starts under its header
    assert all(line[col - 2:col] == "  " and line[col] != " " for line in table), "columns not aligned"
    assert col <= 22 and any("…" in line for line in table), "long names were not shortened in the middle"
    assert all(len(line) < 200 for line in table)
    assert "capture: fx" in plan.summary()


def test_reinstalling_does_not_repeat_warnings_and_a_failed_install_leaves_the_plan_as_it_was():
    model = SmallNet()
    plan = gc.plan(model, _policy(CASES["psi"]))
    before = (list(plan.warnings), list(plan.notes))
    with pytest.raises(gc.GeomCompileError, match="unknown backend"):
        plan.install(torch.optim.SGD([model.conv1.weight], lr=0.1), backend="cuda")
    assert (plan.warnings, plan.notes) == before and not plan.installed
    opt = torch.optim.SGD([model.conv1.weight], lr=0.1, weight_decay=1e-4)
    with pytest.warns(gc.GeomCompileWarning):
        plan.install(opt)
    first = plan.summary()
    plan.remove()
    with pytest.warns(gc.GeomCompileWarning):
        plan.install(opt)
    assert plan.summary() == first
    assert sum("not in the optimizer" in w for w in plan.warnings) == 1

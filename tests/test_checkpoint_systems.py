"""Geometry state through torch.distributed.checkpoint and ZeroRedundancyOptimizer (world size 1,
gloo), and a torch.compile'd optimizer.step, each against an uninterrupted eager run."""
import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import geomcompile as gc

from .test_runtime import SmallNet, _data, _inputs

POLICY = {"version": 1, "rules": [
    {"name": "psi", "match": {"scale_invariant": True}, "use": {"psi": {"max_norm": 2.0}}},
    {"name": "spectral", "match": {"kind": "conv"}, "use": {"spectral": {"coef": 0.1, "power_iters": 1}}}]}


def _train(model, opt, data, step=None):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        (step or opt.step)()


def _start():
    torch.manual_seed(0)
    model = SmallNet()
    with torch.no_grad():
        model.conv1.weight.mul_(10.0)        # psi renormalises from the first step on
    return model


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_dcp_round_trip_continues_bit_identically(tmp_path, process_group):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model = _start()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plan = gc.apply(model, POLICY, opt, example_inputs=_inputs())
    data = _data(6)
    _train(model, opt, data[:3])
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path / "ckpt"))
    renormalised = plan.diagnostics()["conv1.weight"]["psi"]["renormalised_units"]
    _train(model, opt, data[3:])

    resumed = SmallNet()
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    plan2 = gc.apply(resumed, POLICY, opt2, example_inputs=_inputs())
    model_sd, optim_sd = get_state_dict(resumed, opt2)
    assert plan2.steps == 0, "DCP's initialisation step must not count"
    state = {"model": model_sd, "optim": optim_sd}
    # SmallNet.frozen never gets a gradient in training, so the saved run has no momentum for it;
    # the fresh optimizer's DCP initialisation made one: a partial load, as without geomcompile.
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(resumed, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert plan2.steps == 3 and renormalised > 0
    assert plan2.diagnostics()["conv1.weight"]["psi"]["renormalised_units"] == renormalised
    _train(resumed, opt2, data[3:])
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_zero_redundancy_optimizer_matches_plain_and_resumes(process_group):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    model, reference = _start(), _start()
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.05, momentum=0.9)
    gc.apply(model, POLICY, zero, example_inputs=_inputs())
    plain = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    gc.apply(reference, POLICY, plain, example_inputs=_inputs())
    data = _data(6)
    _train(model, zero, data[:3])
    _train(reference, plain, data[:3])
    # psi's renormalisation rescaled ZeRO's momentum (it lives in zero.optim.state) like plain SGD's.
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), n
        if q in plain.state:
            assert torch.equal(zero.optim.state[p]["momentum_buffer"], plain.state[q]["momentum_buffer"]), n
    zero.consolidate_state_dict(to=0)
    saved = copy.deepcopy(zero.state_dict())
    resumed = copy.deepcopy(model)
    _train(model, zero, data[3:])
    zero2 = ZeroRedundancyOptimizer(resumed.parameters(), optimizer_class=torch.optim.SGD, lr=0.05, momentum=0.9)
    plan2 = gc.apply(resumed, POLICY, zero2, example_inputs=_inputs())
    zero2.load_state_dict(saved)
    assert plan2.steps == 3
    _train(resumed, zero2, data[3:])
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_compiled_optimizer_step_matches_eager_without_graph_breaks_in_geomcompile():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    policy = {"version": 1, "rules": [
        {"name": "psi", "match": {"scale_invariant": True}, "use": {"psi": {"max_norm": 2.0}}},
        {"name": "cd", "match": {"kind": "linear"}, "use": {"channel_directed": {"metric": "sobolev", "lam": 0.5}}}]}
    model, reference = _start(), _start()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plan = gc.apply(model, policy, opt, example_inputs=_inputs())
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    gc.apply(reference, policy, ref_opt, example_inputs=_inputs())
    data = _data(5)
    _train(model, opt, data, step=torch.compile(opt.step))
    _train(reference, ref_opt, data)
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=n)
    assert plan.steps == 5
    assert plan.diagnostics()["conv1.weight"]["psi"]["renormalised_units"] > 0
    # torch's own optimizer code calls torch._dynamo.graph_break(); any other break would come from
    # the hooks' code (geomcompile's), e.g. a host sync such as bool(tensor).
    other = [reason for reason in counters["graph_break"] if "User-inserted graph break" not in reason]
    assert not other, other
    assert counters["stats"]["unique_graphs"] <= 8, dict(counters["stats"])

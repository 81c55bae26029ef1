"""torch's own checkpoint and optimizer systems as clients, at world size 1 on gloo:
`torch.distributed.checkpoint` (get_state_dict / dcp.save / dcp.load / set_state_dict),
`ZeroRedundancyOptimizer`, and `torch.compile(optimizer.step)`.

A resumed run must continue bit-identically to an uninterrupted one, for geometries with state:
psi (momentum rescaled at every renormalisation, renormalisation counters) and spectral (the
power-iteration vectors). The conv rows start at norm 1.99 with lr 0.5, so psi renormalises
units (max_norm 2) before and after the checkpoint.
"""
import copy
import importlib.util
import linecache
import logging
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.optim import ZeroRedundancyOptimizer

import geomcompile as gc

from .frameworks import (CD_CONV, LR, PSI, SPECTRAL, TinyBNNet, UpdateRecorder, assert_params_close,
                         assert_params_equal, assert_same_diagnostics, example_images, image_batches,
                         scale_rows_to_norm, sobolev_on_convs, train_plain)

CASES = {"psi": dict(policy=PSI, lr=0.5, row_norm=1.99), "spectral": dict(policy=SPECTRAL, lr=LR, row_norm=None)}


def _model(seed: int = 0, row_norm: float | None = None) -> TinyBNNet:
    torch.manual_seed(seed)
    model = TinyBNNet()
    if row_norm is not None:
        for conv in (model.conv1, model.conv2):
            scale_rows_to_norm(conv.weight, row_norm)
    return model


def _renormalised(plan) -> float:
    return sum(v["psi"]["renormalised_units"] for v in plan.diagnostics().values())


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_update_recorder_accepts_a_plain_loop_and_catches_a_missing_geometry():
    """The observation the framework tests rely on, checked where today's runtime is right."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    gc.apply(model, CD_CONV, opt, example_inputs=example_images())
    recorder = UpdateRecorder(model, opt, LR, sobolev_on_convs(model))
    train_plain(model, opt, image_batches(3))
    recorder.verify(expected_steps=3)

    bare = _model()
    opt = torch.optim.SGD(bare.parameters(), lr=LR)
    recorder = UpdateRecorder(bare, opt, LR, sobolev_on_convs(bare))
    train_plain(bare, opt, image_batches(3))
    with pytest.raises(AssertionError, match="0 of 3 steps"):
        recorder.verify(expected_steps=3)


@pytest.mark.parametrize("case", list(CASES))
def test_dcp_save_and_load_continue_bit_identically(tmp_path, process_group, case):
    c = CASES[case]
    data = image_batches(6)

    def setup(seed):
        model = _model(seed, c["row_norm"])
        opt = torch.optim.SGD(model.parameters(), lr=c["lr"], momentum=0.9)
        return model, opt, gc.apply(model, c["policy"], opt, example_inputs=example_images())

    model, opt, plan = setup(seed=0)
    train_plain(model, opt, data[:3])
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path / "ckpt")
    train_plain(model, opt, data[3:])                          # uninterrupted

    resumed, opt2, plan2 = setup(seed=1)                       # other weights: the checkpoint decides
    model_sd, optim_sd = get_state_dict(resumed, opt2)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=tmp_path / "ckpt")
    set_state_dict(resumed, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train_plain(resumed, opt2, data[3:])
    assert_params_equal(resumed, model, "resumed from DCP vs uninterrupted")
    assert_same_diagnostics(plan2, plan)
    if case == "psi":
        assert _renormalised(plan) > 0


def _zero(model, lr):
    return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=lr, momentum=0.9)


def test_zero_state_dict_round_trip_continues_bit_identically(process_group):
    c = CASES["psi"]
    data = image_batches(6)
    model = _model(0, c["row_norm"])
    opt = _zero(model, c["lr"])
    plan = gc.apply(model, PSI, opt, example_inputs=example_images())
    train_plain(model, opt, data[:3])
    opt.consolidate_state_dict(to=0)
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_model = copy.deepcopy(model.state_dict())
    train_plain(model, opt, data[3:])                          # uninterrupted

    resumed = _model(1, c["row_norm"])
    resumed.load_state_dict(saved_model)
    opt2 = _zero(resumed, c["lr"])
    plan2 = gc.apply(resumed, PSI, opt2, example_inputs=example_images())
    opt2.load_state_dict(saved_opt)
    train_plain(resumed, opt2, data[3:])
    assert_params_equal(resumed, model, "resumed ZeRO vs uninterrupted")
    assert_same_diagnostics(plan2, plan)
    assert _renormalised(plan) > 0


def test_psi_renormalisation_rescales_zero_momentum_like_plain_sgd(process_group):
    """Rows start at norm 3 > max_norm 1, so step 1 renormalises every unit and must rescale the
    momentum ZeRO's inner optimizer holds, as it does plain SGD's."""
    policy = {"version": 1, "rules": [{"name": "bn-convs", "match": {"kind": "conv", "scale_invariant": True},
                                       "use": {"psi": {"max_norm": 1.0}}}]}
    data = image_batches(3)
    model = _model(0, row_norm=3.0)
    reference = copy.deepcopy(model)
    zero = _zero(model, LR)
    plain = torch.optim.SGD(reference.parameters(), lr=LR, momentum=0.9)
    gc.apply(model, policy, zero, example_inputs=example_images())
    plan_ref = gc.apply(reference, policy, plain, example_inputs=example_images())
    train_plain(model, zero, data[:1])
    train_plain(reference, plain, data[:1])
    assert _renormalised(plan_ref) == 12, "the reference did not renormalise every unit at step 1"
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(zero.optim.state[p]["momentum_buffer"], plain.state[q]["momentum_buffer"],
                                   rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"momentum of {name}: {m}")
    train_plain(model, zero, data[1:])
    train_plain(reference, plain, data[1:])
    assert_params_close(model, reference, "ZeRO vs plain SGD with the same plan", rtol=1e-6, atol=1e-7)


# -- torch.compile(optimizer.step) -------------------------------------------------------------
# Plain SGD-momentum's compiled step makes 2 graphs (the first step, then the step that finds
# momentum buffers; torch 2.13) and matches eager bit for bit. A plan may add a few, none after.
COMPILE_CASES = {"psi": dict(policy=PSI, lr=0.5, row_norm=1.99), "channel_directed": dict(policy=CD_CONV, lr=LR,
                                                                                           row_norm=None)}
MAX_GRAPHS = 4


def _geomcompile_dirs() -> tuple[str, ...]:
    dirs = [os.path.dirname(gc.__file__)]
    kernels = importlib.util.find_spec("geomcompile.kernels")
    if kernels is not None:
        dirs += list(kernels.submodule_search_locations or [])
    return tuple(os.path.realpath(d) + os.sep for d in dirs)


class _GraphBreakLocations(logging.Handler):
    """Where dynamo broke a graph: the "in user code at FILE:LINE" of its graph-break log, the
    innermost user frame (torch >= 2.4 logs it with `torch._logging.set_logs(graph_breaks=True)`)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.locations: list[tuple[str, int]] = []

    def emit(self, record):
        for path, line in re.findall(r"in user code at (.+?):(\d+)", record.getMessage()):
            self.locations.append((os.path.realpath(path), int(line)))


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_compiled_optimizer_step_matches_eager_without_breaks_in_geomcompile(case):
    from torch._dynamo.utils import counters

    c = COMPILE_CASES[case]
    data = image_batches(5)

    def setup():
        model = _model(0, c["row_norm"])
        opt = torch.optim.SGD(model.parameters(), lr=c["lr"], momentum=0.9)
        return model, opt, gc.apply(model, c["policy"], opt, example_inputs=example_images())

    eager, opt_eager, plan_eager = setup()
    compiled, opt_compiled, plan_compiled = setup()
    train_plain(eager, opt_eager, data)

    torch._dynamo.reset()
    counters.clear()
    breaks = _GraphBreakLocations()
    dynamo_log = logging.getLogger("torch._dynamo")
    dynamo_log.addHandler(breaks)
    torch._logging.set_logs(graph_breaks=True)
    try:
        step = torch.compile(opt_compiled.step)
        train_plain(compiled, opt_compiled, data[:2], step=step)
        graphs_after_two = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            train_plain(compiled, opt_compiled, data[2:], step=step)
    finally:
        torch._logging.set_logs()
        dynamo_log.removeHandler(breaks)

    ours = _geomcompile_dirs()
    inside = sorted({f"{path}:{line}: {linecache.getline(path, line).strip()}" for path, line in breaks.locations
                     if path.startswith(ours)})
    assert not inside, "graph breaks inside geomcompile:\n  " + "\n  ".join(inside[:5])
    assert counters["stats"]["unique_graphs"] == graphs_after_two, "steps 3-5 compiled new graphs"
    assert graphs_after_two <= MAX_GRAPHS, f"{graphs_after_two} graphs for one optimizer step"
    assert_params_close(compiled, eager, "torch.compile(step) vs eager", rtol=1e-6, atol=1e-6)
    assert plan_compiled.diagnostics().keys() == plan_eager.diagnostics().keys()
    if case == "psi":
        assert _renormalised(plan_compiled) == _renormalised(plan_eager) > 0

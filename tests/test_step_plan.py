"""The Triton backend's step plan: recorded at one step, replayed while it holds, decided anew when
anything it recorded changes. Every case runs the eager backend beside it and compares parameters
and optimizer state after every step (tests/test_triton_backend.assert_same), and checks that the
plan was replayed where it should be and rebuilt where it must be.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings  # noqa: E402

import torch  # noqa: E402

import geomcompile as gc  # noqa: E402
from .test_triton_backend import INPUTS, STEPS, Net, _grads, _policy, _setup, assert_same  # noqa: E402


def _fresh(model, step):
    """zero_grad(set_to_none=True), then new gradient tensors (step's values)."""
    _grads(model, step, torch.float32)


def _in_place(model, step):
    """zero_grad(set_to_none=False) and accumulate: the same gradient tensors, new values."""
    held = {n: p.grad for n, p in model.named_parameters()}
    _grads(model, step, torch.float32)
    for n, p in model.named_parameters():
        if held[n] is not None and p.grad is not None:
            held[n].copy_(p.grad)
            p.grad = held[n]


def _run(geometry, opt_name, steps=STEPS, grads=_in_place, event=None, setup=_setup, backend="triton"):
    """The eager backend and `backend` step by step (`event(model, opt, step)` before each step's
    gradients); returns the second backend's plan builds after each step."""
    runs = [setup(geometry, opt_name, b) for b in ("eager", backend)]
    builds = []
    for step in range(steps):
        for model, opt, _ in runs:
            if event is not None:
                event(model, opt, step)
            grads(model, step)
            opt.step()
        (ea, eo, _), (tm, to, tp) = runs
        assert_same(ea, eo, tm, to, f"{geometry}/{opt_name} step {step}")
        builds.append(tp.backend.plan_builds)
    return builds


def _same_grads(model, step):
    _in_place(model, 1)


def test_the_plan_is_replayed_with_cached_and_with_fresh_gradients():
    for grads in (_same_grads, _fresh):
        for geometry, opt_name in (("psi", "sgd_momentum"), ("sobolev", "adam")):
            builds = _run(geometry, opt_name, steps=5, grads=lambda m, s: grads(m, 1))
            # step 0 decides (state is created), step 1 decides again (the state exists now), then replays
            assert builds == [1, 2, 2, 2, 2], (geometry, opt_name, grads.__name__, builds)


def test_a_gradient_that_becomes_none_and_comes_back():
    # NO_GRAD of test_triton_backend: conv2/head without gradients at some steps
    builds = _run("psi", "adam", steps=STEPS, grads=_fresh)
    assert builds[-1] < STEPS + 1, builds           # the NO_GRAD steps decide anew; the others replay
    assert len(set(builds)) > 2, f"the changing gradients never rebuilt the plan: {builds}"


def _convs_only_setup(geometry, opt_name, backend):
    """An optimizer over the convolutions only (the head joins later, _add_head_at_step_3)."""
    torch.manual_seed(0)
    model = Net()
    convs = [p for n, p in model.named_parameters() if n.startswith("conv")]
    opt = torch.optim.SGD([{"params": convs}], lr=0.05, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        plan = gc.apply(model, _policy(geometry), opt, example_inputs=INPUTS, backend=backend)
    return model, opt, plan


def _add_head_at_step_3(model, opt, step):
    if step == 3:
        opt.add_param_group({"params": [model.head.weight, model.head.bias], "lr": 0.03})


def test_add_param_group_rebuilds_the_plan():
    builds = _run("sobolev", "sgd_momentum", steps=6, event=_add_head_at_step_3, setup=_convs_only_setup)
    assert builds[3] > builds[2], builds


def test_load_state_dict_with_new_lr_and_betas():
    def event(model, opt, step):
        if step == 3:
            sd = opt.state_dict()
            for g in sd["param_groups"]:
                g["lr"], g["betas"] = g["lr"] * 0.5, (0.8, 0.99)
            opt.load_state_dict(sd)

    builds = _run("sobolev", "adam", steps=6, event=event, grads=lambda m, s: _in_place(m, 1))
    assert builds[3] > builds[2] and builds[5] == builds[4], builds


def test_an_lr_scheduler_changes_lr_at_every_replayed_step():
    scheds = {}

    def event(model, opt, step):
        if id(opt) not in scheds:
            scheds[id(opt)] = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch))
        elif step:
            scheds[id(opt)].step()

    for opt_name in ("sgd_momentum", "adam"):
        builds = _run("psi", opt_name, steps=6, event=event, grads=lambda m, s: _in_place(m, 1))
        assert builds[-1] == 2, builds


def test_momentum_turned_on_and_weight_decay_to_zero_mid_run():
    def event(model, opt, step):
        if step == 3:
            for g in opt.param_groups:
                g["momentum"], g["weight_decay"] = 0.9, 0.0
        if step == 5:
            opt.param_groups[0]["nesterov"] = True

    builds = _run("psi", "sgd", steps=7, event=event, grads=lambda m, s: _in_place(m, 1))
    assert builds[3] > builds[2] and builds[5] > builds[4], builds


def test_switching_zero_grad_set_to_none_on_and_off():
    def grads(model, step):
        (_fresh if step % 3 == 0 else _in_place)(model, (1, 4)[step % 2])    # steps without NO_GRAD

    builds = _run("sobolev", "sgd_momentum", steps=8, grads=grads)
    assert builds[-1] == 2, f"new gradients of the same layout must be patched, not rebuilt: {builds}"


def test_replaced_weights_and_state_tensors_rebuild_the_plan():
    def event(model, opt, step):
        if step == 3:
            with torch.no_grad():
                model.conv1.weight.data = model.conv1.weight.data.clone()
        if step == 5:
            state = opt.state[model.conv2.weight]
            state["momentum_buffer"] = state["momentum_buffer"].clone()

    builds = _run("psi", "sgd_momentum", steps=7, event=event, grads=lambda m, s: _in_place(m, 1))
    assert builds[3] > builds[2] and builds[5] > builds[4], builds


def test_a_new_gradient_of_another_layout_rebuilds_the_plan():
    def grads(model, step):
        _fresh(model, 1)
        if step == 3:
            g = model.conv1.weight.grad
            model.conv1.weight.grad = g.contiguous(memory_format=torch.channels_last)

    builds = _run("sobolev", "adam", steps=5, grads=grads)
    assert builds[3] > builds[2], builds


def test_the_plan_keeps_no_gradient_or_replaced_state_alive():
    import copy
    import gc as collector
    import weakref
    model, opt, plan = _setup("sobolev", "adam", "triton")
    for step in range(3):
        _fresh(model, 1)
        opt.step()
    assert plan.backend.plan_builds == 2
    grads = [weakref.ref(p.grad) for p in model.parameters()]
    states = [weakref.ref(t) for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))     # new state tensors: the old ones must go
    opt.zero_grad(set_to_none=True)
    collector.collect()
    assert all(ref() is None for ref in grads), "the step plan keeps last step's gradients alive"
    assert all(ref() is None for ref in states), "the step plan keeps a replaced optimizer state alive"


# ---- the compile backend's recorded step (compile_backend._RecordedStep) ------------------------------
# Its decisions depend on the work items and on which parameters have gradients only (no optimizer
# state, no hyperparameters: torch's own step follows the transforms), so it is decided once and
# replayed until one of those changes; tensors are read again at every replay.
def test_compile_replays_its_step_with_cached_and_with_fresh_gradients():
    for grads in (_same_grads, _fresh):
        for geometry, opt_name in (("psi", "sgd_momentum"), ("sobolev", "adam")):
            builds = _run(geometry, opt_name, steps=5, grads=lambda m, s: grads(m, 1), backend="compile")
            assert builds == [1, 1, 1, 1, 1], (geometry, opt_name, grads.__name__, builds)


def test_compile_decides_anew_when_a_gradient_becomes_none_and_comes_back():
    builds = _run("psi", "adam", steps=STEPS, grads=_fresh, backend="compile")
    assert 1 < builds[-1] < STEPS, builds            # the NO_GRAD steps decide anew, the others replay


def test_compile_add_param_group_decides_anew():
    builds = _run("sobolev", "sgd_momentum", steps=6, event=_add_head_at_step_3, setup=_convs_only_setup,
                  backend="compile", grads=lambda m, s: _in_place(m, 1))
    assert builds == [1, 1, 1, 2, 2, 2], builds


def test_compile_replay_reads_replaced_weights_and_gradients_of_another_layout():
    """A replayed step reads the tensors again: weights replaced through .data and a channels_last
    gradient (a guard failure in its compiled function: it recompiles) are stepped as eager steps them."""
    def grads(model, step):
        _fresh(model, 1)
        if step == 4:
            g = model.conv1.weight.grad
            model.conv1.weight.grad = g.contiguous(memory_format=torch.channels_last)

    def event(model, opt, step):
        if step == 2:
            with torch.no_grad():
                model.conv1.weight.data = model.conv1.weight.data.clone() * 0.5

    for geometry in ("psi", "sobolev"):
        builds = _run(geometry, "sgd_momentum", steps=6, grads=grads, event=event, backend="compile")
        assert builds == [1] * 6, builds


def test_compile_recorded_step_keeps_no_gradient_alive():
    import gc as collector
    import weakref
    model, opt, plan = _setup("psi", "sgd_momentum", "compile")
    for step in range(3):
        _fresh(model, 1)
        opt.step()
    assert plan.backend.plan_builds == 1 and plan.backend._pre_plan is not None
    grads = [weakref.ref(p.grad) for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    collector.collect()
    assert all(ref() is None for ref in grads), "the recorded step keeps last step's gradients alive"

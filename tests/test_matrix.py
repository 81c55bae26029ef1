"""The test matrix, generated from tests/registry.py: every case × every backend that claims its
geometry (eager, plus each declared fast path) gets, without test code of its own:

* 7-step parity of parameters, every base-optimizer state entry and the geometry state against the
  eager reference, for SGD (momentum, dampening, weight decay; nesterov, maximize), Adam, AdamW,
  amsgrad and RMSprop, in float32 and bfloat16. The model has a zero-size parameter and two param
  groups with different hyperparameters; the gradient schedule leaves some parameters without a
  gradient on some steps (a None grad; frozen, then unfrozen);
* closure steps: ``optimizer.step(closure)`` equals setting the gradients, then stepping;
* a frozen parameter whose retraction would fire is never touched;
* a state_dict round trip continues exactly;
* remove(): the optimizer behaves bit-identically to one that never had a plan.
"""
import copy
import warnings

import pytest
import torch

import geomcompile as gc
from geomcompile.geometries import REGISTRY
from geomcompile.runtime.fastpath import fast_path

from .registry import CASES, matrix
from .test_triton_backend import INPUTS, OPTIMIZERS, Net, _grads, _groups, assert_same_geometry_state

STEPS = 7
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def test_every_registered_geometry_and_fast_path_has_cases():
    missing = [name for name in REGISTRY if not any(c.geometry == name for c in CASES.values())]
    assert not missing, f"add a case for {missing} to tests/registry.py::CASES"
    for name, cls in REGISTRY.items():
        for backend in cls.fast_paths:       # a declared fast path must load and be in the matrix
            assert fast_path(cls(), backend) is not None, f"{name}: fast path {backend!r} does not load"
            assert any(c.geometry == name and backend in c.backends for c in CASES.values()), \
                f"{name}: no case of tests/registry.py::CASES runs its {backend!r} fast path"


def _setup(case_name, opt_name, backend, dtype=torch.float32, frozen_retraction=False):
    torch.manual_seed(0)
    model = _model(case_name)
    with torch.no_grad():
        model.conv1.weight.mul_(5.0)              # rows above max_norm: psi renormalises at once
    if frozen_retraction:
        with torch.no_grad():
            model.conv2.weight.mul_(50.0)
        model.conv2.weight.requires_grad_(False)
        model.before_install = model.conv2.weight.detach().clone()
    model = model.to(dtype)
    opt = OPTIMIZERS[opt_name](*_groups(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        plan = gc.apply(model, CASES[case_name].policy(), opt, example_inputs=(INPUTS[0].to(dtype),),
                        backend=backend)
    assert plan.backend_name == backend
    return model, opt, plan


def _model(case_name):
    """The case's model (Net unless the case brings its own with Net's layout)."""
    make = CASES[case_name].model
    return make() if make is not None else Net()


def _set_grads(model, step, dtype):
    _grads(model, step, dtype)
    for p in model.parameters():
        if not p.requires_grad:
            p.grad = None                         # frozen: autograd never gives it a gradient


def _step(model, opt, step, dtype, closure=False):
    if not closure:
        _set_grads(model, step, dtype)
        return opt.step()

    def make_grads():
        _set_grads(model, step, dtype)
        return torch.tensor(float(step))
    loss = opt.step(make_grads)
    assert float(loss) == float(step), "step(closure) must return the closure's loss"
    return loss


def _close(got, want, case_name, dtype, what):
    """Elementwise rtol/atol for fp32. For bf16 the bound is normwise: |got − want| ≤ k·ulp·max|want|,
    because a one-ulp rounding difference of a large intermediate (the transformed gradient) lands on
    every element of the result, small ones included."""
    tol = CASES[case_name].tolerance(dtype)
    if dtype == torch.bfloat16:
        scale = want.detach().abs().max().float().item() if want.numel() else 0.0
        tol = dict(rtol=0.0, atol=tol["atol"] * max(scale, 1.0))
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")


def _assert_same(a, b, case_name, what, dtype):
    """Parameters, every base-optimizer state entry and the geometry state of two runs."""
    (model_a, opt_a), (model_b, opt_b) = a[:2], b[:2]
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        _close(pb, pa, case_name, dtype, f"{what}: parameter {name}")
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert sorted(sa) == sorted(sb), f"{what}: {name} state keys {sorted(sa)} vs {sorted(sb)}"
        for key in sa:
            va, vb = sa[key], sb[key]
            assert (va.dtype, va.device, va.shape) == (vb.dtype, vb.device, vb.shape), f"{what}: {name}.{key}"
            _close(vb, va, case_name, dtype, f"{what}: {name} state {key}")
    assert_same_geometry_state(opt_a, opt_b, what)


# RMSprop(centered=True) in bf16 subtracts two bf16-rounded estimates (E[g²] − E[g]²) that nearly
# cancel: one ulp of difference in the transformed gradient moves its step by up to 280% (measured),
# in eager as much as in a kernel. bf16 runs the non-centred RMSprop with momentum instead.
MATRIX_OPTIMIZERS = {**OPTIMIZERS, "rmsprop_momentum": lambda c, r: torch.optim.RMSprop(
    [{"params": c}, {"params": r}], lr=1e-3, momentum=0.5)}
OPTIMIZERS_OF = {"fp32": list(OPTIMIZERS), "bf16": [o for o in MATRIX_OPTIMIZERS if o != "rmsprop_centered_momentum"]}
# The same cancellation in fp32 amplifies one ulp of the transformed gradient into a visible share of
# the fp32 tolerance (|diff| / (atol + rtol·|want|), worst state entry, pom case), measured:
#   eager vs eager with ±1 ulp noise on every gradient: 0.54 after one step, 0.62 after 7 steps;
#   eager vs compile: 0.54 after one step from the same state (as the 1-ulp noise), 1.04 after 7
#   independent steps (AMD EPYC; a different vectorisation of the same sums on another CPU passed).
# So a 7-step independent trajectory of this optimizer tests the CPU's rounding, not the fast path:
# fp32 runs it as bf16 runs everything, each step from the eager run's state, same tolerance.
RESYNC_EACH_STEP = {"bf16": set(MATRIX_OPTIMIZERS), "fp32": {"rmsprop_centered_momentum"}}


def _resync(source, target):
    """target takes source's weights and optimizer state (geometry state included, through the hooks)."""
    target[0].load_state_dict(source[0].state_dict())
    target[1].load_state_dict(copy.deepcopy(source[1].state_dict()))


@pytest.mark.parametrize("dtype, opt_name", [(d, o) for d in DTYPES for o in OPTIMIZERS_OF[d]])
@pytest.mark.parametrize("case_name, backend", matrix("fast"))
def test_fast_path_matches_eager(case_name, backend, opt_name, dtype):
    """fp32: 7 steps of two independent runs (RMSprop(centered): see RESYNC_EACH_STEP). bf16: 7 steps,
    each from the eager run's state (a trajectory of bf16 roundings diverges for real at psi's max_norm
    threshold: a unit at 1.493 in one run and above 1.5 in the other is renormalised in one of them
    only)."""
    dt = DTYPES[dtype]
    OPTIMIZERS.setdefault(opt_name, MATRIX_OPTIMIZERS[opt_name])
    eager = _setup(case_name, opt_name, "eager", dt)
    fast = _setup(case_name, opt_name, backend, dt)
    for step in range(STEPS):
        if opt_name in RESYNC_EACH_STEP[dtype] and step:
            _resync(eager, fast)
        _step(eager[0], eager[1], step, dt)
        _step(fast[0], fast[1], step, dt)
        _assert_same(eager, fast, case_name, f"{case_name}/{backend}/{opt_name}/{dtype} step {step}", dt)


@pytest.mark.parametrize("case_name, backend", matrix())
def test_closure_steps_equal_plain_steps(case_name, backend):
    plain = _setup(case_name, "sgd_momentum", backend)
    closure = _setup(case_name, "sgd_momentum", backend)
    for step in range(3):
        _step(plain[0], plain[1], step, torch.float32)
        _step(closure[0], closure[1], step, torch.float32, closure=True)
    _assert_same(plain, closure, case_name, f"{case_name}/{backend} closure", torch.float32)


@pytest.mark.parametrize("case_name, backend", matrix())
def test_frozen_parameter_is_never_touched(case_name, backend):
    model, opt, plan = _setup(case_name, "sgd_momentum", backend, frozen_retraction=True)
    frozen = model.before_install               # install-time retractions (pom) must leave it alone too
    for step in range(3):
        _step(model, opt, step, torch.float32)
        assert model.conv2.weight.grad is None
    assert torch.equal(model.conv2.weight, frozen)
    if CASES[case_name].retracts:     # the control: the same weight, trainable, is retracted at once
        model2, opt2, _ = _setup(case_name, "sgd", backend, frozen_retraction=True)
        model2.conv2.weight.requires_grad_(True)
        _set_grads(model2, 1, torch.float32)
        model2.conv2.weight.grad.zero_()          # no update of its own: only the retraction moves it
        opt2.step()
        assert not torch.equal(model2.conv2.weight, frozen), "the control never retracted"


@pytest.mark.parametrize("case_name, backend", matrix())
def test_state_dict_round_trip_continues_exactly(case_name, backend):
    reference = _setup(case_name, "adam", backend)
    for step in range(STEPS):
        _step(reference[0], reference[1], step, torch.float32)
    model, opt, _ = _setup(case_name, "adam", backend)
    for step in range(3):
        _step(model, opt, step, torch.float32)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = _model(case_name)
    resumed.load_state_dict(saved_model)
    resumed_opt = OPTIMIZERS["adam"](*_groups(resumed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        gc.apply(resumed, CASES[case_name].policy(), resumed_opt, example_inputs=INPUTS, backend=backend)
    resumed_opt.load_state_dict(saved_opt)
    for step in range(3, STEPS):
        _step(resumed, resumed_opt, step, torch.float32)
    _assert_same(reference, (resumed, resumed_opt), case_name, f"{case_name}/{backend} resume", torch.float32)


@pytest.mark.parametrize("case_name, backend", matrix())
def test_remove_restores_the_plain_optimizer_bit_identically(case_name, backend):
    model, opt, plan = _setup(case_name, "sgd_momentum", backend)
    _step(model, opt, 1, torch.float32)
    plan.remove()
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS["sgd_momentum"](*_groups(twin))
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))   # no geometry state rides along any more
    assert not any("geomcompile" in v for v in opt.state_dict()["state"].values())
    for step in range(2, 5):
        _step(model, opt, step, torch.float32)
        _step(twin, twin_opt, step, torch.float32)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n

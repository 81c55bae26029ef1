"""Non-finite gradients (issue 15, R1, R2 and the NaN/Inf injection matrix).

A NaN or Inf in a gradient must do what it does in plain torch, no more: the step makes exactly
those entries of the weight (and of the base optimizer's state) non-finite, nothing raises, nothing
is masked, and no geometry state is poisoned, so once the user restores finite weights the next step
is the one a run that never saw the bad value takes.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import geomcompile as gc
from geomcompile.functional import pom_retract

from .registry import CASES, matrix
from .test_triton_backend import INPUTS, OPTIMIZERS, Net, _groups

POSITIONS = ("first", "middle", "last")
VALUES = {"nan": float("nan"), "inf": float("inf")}
BASE = ("sgd", "adam")                       # torch's SGD and Adam: both fused by the Triton kernels


def _model(case_name):
    torch.manual_seed(0)
    make = CASES[case_name].model
    model = make() if make is not None else Net()
    with torch.no_grad():
        model.conv1.weight.mul_(5.0)         # psi renormalises conv1's rows at every step
    return model


def _policy(case_name):
    """The case's policy; spectral's first solve limited to 3 iterations (its default 100 take ~20 s on a
    loaded 2-core machine, and convergence is not what these tests are about)."""
    policy = CASES[case_name].policy()
    policy["rules"] = [{**rule, "use": {g: ({**o, "init_iters": 3} if g == "spectral" else o)
                                        for g, o in rule["use"].items()}} for rule in policy["rules"]]
    return policy


def _install(case_name, backend, base, model):
    opt = OPTIMIZERS[base](*_groups(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        plan = gc.apply(model, _policy(case_name), opt, example_inputs=(INPUTS[0],), backend=backend)
    assert plan.backend_name == backend
    return opt, plan


def _set_grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 0.5


def _index(n, where):
    return {"first": 0, "middle": n // 2, "last": n - 1}[where]


def _snapshot(model, opt):
    weights = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
             for p in model.parameters() if p in opt.state}
    return weights, state


def _restore(model, opt, snapshot):
    """Finite weights and base-optimizer state back (the geometry state is left as the step made it)."""
    weights, state = snapshot
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
        for p in model.parameters():
            if id(p) not in state:
                opt.state.pop(p, None)          # no state before the step: none after the restore
            for key, value in state.get(id(p), {}).items():
                opt.state[p][key].copy_(value)


def _nonfinite(model, opt):
    """Per parameter: the non-finite mask of the weight and of every base-optimizer state tensor."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = ~torch.isfinite(p.detach())
        for key, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                out[f"{name}.{key}"] = ~torch.isfinite(v)
    return out


@pytest.mark.parametrize("base", BASE)
@pytest.mark.parametrize("case_name,backend", matrix())
def test_nonfinite_gradient_propagates_as_in_plain_torch_and_poisons_nothing(case_name, backend, base):
    """For every geometry x backend: NaN/Inf at the first, middle and last element of a gradient make
    the same entries non-finite as plain torch's optimizer (weights and optimizer state); after
    finite weights are restored the next step is finite and equals that of a twin run whose injected
    entry was 0 (so no geometry state was poisoned). Before: channel_directed spread the NaN over
    its column (6 non-finite weights for 1), pom over the component's group (27 for 1), gspace
    dropped the chain's step (0 for 1)."""
    model, twin = _model(case_name), _model(case_name)
    opt, plan = _install(case_name, backend, base, model)
    twin_opt, _ = _install(case_name, backend, base, twin)
    target = next(n for n, p in model.named_parameters() if n in plan.assignments and p.numel())
    for step, (label, where) in enumerate((v, w) for v in VALUES for w in POSITIONS):
        before, twin_before = _snapshot(model, opt), _snapshot(twin, twin_opt)
        plain, plain_opt = _plain_copy(model, opt, base)     # torch alone, from the same weights and state
        for m in (model, twin, plain):
            _set_grads(m, 10 + step)
        for m, v in ((model, VALUES[label]), (plain, VALUES[label]), (twin, 0.0)):
            g = dict(m.named_parameters())[target].grad.view(-1)
            g[_index(g.numel(), where)] = v
        for o in (opt, twin_opt, plain_opt):
            o.step()
        got, want = _nonfinite(model, opt), _nonfinite(plain, plain_opt)
        assert sorted(got) == sorted(want)
        for key, mask in want.items():
            assert torch.equal(got[key], mask), \
                (f"{label} at the {where} element of {target}: non-finite entries of {key} differ from plain "
                 f"torch ({int(got[key].sum())} vs {int(mask.sum())})")
        assert int(sum(m.sum() for m in want.values())) >= 1
        # finite weights and optimizer state back on both runs, then one healthy step each
        _restore(model, opt, before)
        _restore(twin, twin_opt, twin_before)
        _set_grads(model, 100 + step)
        _set_grads(twin, 100 + step)
        opt.step()
        twin_opt.step()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.isfinite(p).all(), f"{label} at {where}: {name} not finite after the healthy step"
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7,
                                       msg=lambda m: f"{label} at {where}: {name} after the healthy step: {m}")


def _plain_copy(model, opt, base):
    """A model and a plain torch optimizer with the same weights and base-optimizer state."""
    plain = _model_like(model)
    plain_opt = OPTIMIZERS[base](*_groups(plain))
    for p, q in zip(model.parameters(), plain.parameters()):
        if p in opt.state:
            plain_opt.state[q] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
    return plain, plain_opt


def _model_like(model):
    import copy
    plain = copy.deepcopy(model)           # deepcopy keeps no hook of the plan (they live on the optimizer)
    for p in plain.parameters():
        p.grad = None
    return plain

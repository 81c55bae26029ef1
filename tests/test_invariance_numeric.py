"""Numerical ground truth for scale invariance.

A weight is scale-invariant when scaling its units (rows along ``out_dim``, groups of rows, or
the whole tensor) by positive factors leaves the training-mode output unchanged. Each claim, the
analysis's and the zoo's hand-derived one, is checked by doing exactly that in float64 with
every normalisation's eps set to 1e-12; ``negative`` weights of the zoo must change the output,
so the check can fail.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.models import ZOO, ZooEntry, expected_facts

RTOL, ATOL = 1e-6, 1e-9
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def prepare(entry: ZooEntry) -> tuple[nn.Module, tuple]:
    model = entry.build().double().train()
    for m in model.modules():
        if isinstance(m, _NORMS):
            m.eps = 1e-12   # make the normalisations exactly scale-invariant up to rounding
    inputs = tuple(x.double() for x in entry.example_inputs)
    return model, inputs


def run(model: nn.Module, inputs: tuple) -> torch.Tensor:
    """Training-mode output of a copy (running stats untouched), same dropout masks every time."""
    model = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        return model(*inputs)


def scaled(model: nn.Module, name: str, unit: str, out_dim: int, group_size: int | None = None,
           seed: int = 1) -> nn.Module:
    """A copy of the model whose weight `name` has its units scaled by factors in [0.2, 5]."""
    model = copy.deepcopy(model)
    weight = model.get_parameter(name)
    rows = weight.shape[out_dim]
    gen = torch.Generator().manual_seed(seed)
    if unit == "row":
        factors = 0.2 + 4.8 * torch.rand(rows, generator=gen, dtype=weight.dtype)
    elif unit == "group":
        assert group_size and rows % group_size == 0, (name, rows, group_size)
        per_group = 0.2 + 4.8 * torch.rand(rows // group_size, generator=gen, dtype=weight.dtype)
        factors = per_group.repeat_interleave(group_size)
    elif unit == "tensor":
        factors = torch.full((rows,), float(0.2 + 4.8 * torch.rand((), generator=gen)), dtype=weight.dtype)
    else:
        raise AssertionError(f"unknown unit {unit!r} for {name}")
    shape = [1] * weight.dim()
    shape[out_dim] = rows
    with torch.no_grad():
        weight.mul_(factors.view(shape))
    return model


def assert_unchanged(ref: torch.Tensor, out: torch.Tensor, what: str) -> None:
    err = (out - ref).abs().max().item()
    assert torch.allclose(out, ref, rtol=RTOL, atol=ATOL), f"{what}: output changed, max abs diff {err:.3g}"


def assert_changed(ref: torch.Tensor, out: torch.Tensor, what: str) -> None:
    """The complement of assert_unchanged with ten times its tolerance as margin."""
    err = (out - ref).abs().max().item()
    assert not torch.allclose(out, ref, rtol=10 * RTOL, atol=10 * ATOL), \
        f"{what}: output did not change (max abs diff {err:.3g})"


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_expected_invariances_hold_numerically(entry: ZooEntry):
    """The zoo's own claims are true: otherwise the zoo would test the analysis against wrong answers."""
    model, inputs = prepare(entry)
    ref = run(model, inputs)
    for name, exp in expected_facts(entry, model).items():
        inv = exp.get("invariant")
        if inv is None:
            continue
        group_size = inv[2] if inv[0] == "group" else None
        out = run(scaled(model, name, inv[0], exp["out_dim"], group_size), inputs)
        assert_unchanged(ref, out, f"{entry.name}: {name} scaled per {inv[0]}")


@pytest.mark.parametrize("entry", [e for e in ZOO if e.negative], ids=lambda e: e.name)
def test_negative_controls_change_the_output(entry: ZooEntry):
    """Scaling the rows of a truly non-invariant weight changes the output, so the checks can fail.
    A weight laid out as "other" (no out_dim) is scaled along its dim 0."""
    model, inputs = prepare(entry)
    ref = run(model, inputs)
    expected = expected_facts(entry, model)
    for name in entry.negative:
        out = run(scaled(model, name, "row", expected[name].get("out_dim") or 0), inputs)
        assert_changed(ref, out, f"{entry.name}: {name} scaled per row")


def test_every_model_with_a_non_invariant_weight_has_a_negative_control():
    for entry in ZOO:
        model = entry.build()
        non_invariant = [n for n, e in expected_facts(entry, model).items()
                         if e.get("kind") in ("conv", "conv_transpose", "linear") and e.get("invariant") is None]
        assert not non_invariant or entry.negative, f"{entry.name}: no negative control for {non_invariant}"


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_analysis_invariances_hold_numerically(entry: ZooEntry):
    """Every invariance the analysis claims is true (the numerical check is the arbiter)."""
    gc = pytest.importorskip("geomcompile")
    model, inputs = prepare(entry)
    structure = gc.analyze(model, example_inputs=inputs)
    ref = run(model, inputs)
    claimed = 0
    for name, facts in structure.items():
        inv = facts.scale_invariant
        if inv is None:
            continue
        claimed += 1
        assert facts.out_dim is not None, f"{entry.name}: {name} claimed {inv} but has no out_dim"
        out = run(scaled(model, name, inv.unit, facts.out_dim, inv.group_size), inputs)
        assert_unchanged(ref, out, f"{entry.name}: {name} claimed {inv}")
    n_expected = sum(e.get("invariant") is not None for e in expected_facts(entry, model).values())
    assert claimed >= min(n_expected, 1), f"{entry.name}: the analysis claims no invariance at all"

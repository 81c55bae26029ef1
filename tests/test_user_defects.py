"""Small defects a careful user hits (issue 14): Structure behaves like a mapping, capture leaves
the user's modules and RNG states as it found them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import geomcompile as gc


class Branchy(nn.Module):
    """fx cannot trace it (data-dependent branch), so capture runs it."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.fc = nn.Linear(width, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        if x.sum() > -1e9:
            x = self.drop(x)
        return self.fc(x)


def test_structure_in_and_get_behave_like_a_mapping():
    s = gc.analyze(Branchy(), example_inputs=(torch.randn(2, 4),))
    assert "fc.weight" in s and s.get("fc.weight") is s["fc.weight"]
    assert "nope" not in s and 3 not in s
    assert s.get("nope") is None and s.get("nope", "x") == "x"
    with pytest.raises(gc.GeomCompileError, match="no parameter named 'nope'"):
        s["nope"]                       # indexing still explains which names exist


def test_a_module_whose_forward_raises_keeps_no_capture_attribute():
    model = Branchy()
    with pytest.raises(gc.GeomCompileError, match="could not capture"):
        gc.analyze(model, example_inputs=(torch.randn(2, 5),))       # fc expects 4 features
    for name, m in model.named_modules():
        assert not [a for a in vars(m) if a.startswith("_gc")], f"{name or 'model'} kept {vars(m).keys()}"


def test_the_shape_run_restores_the_cuda_rng_state_too(monkeypatch):
    """Without a GPU: CUDA's RNG functions are stood in for, and the state saved before the run
    must be the one set back after it."""
    saved, restored = [torch.tensor([1, 2, 3], dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(saved))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(states))
    model, x = Branchy(), torch.randn(2, 4)
    cpu = torch.get_rng_state()
    gc.analyze(model, example_inputs=(x,))
    assert torch.equal(torch.get_rng_state(), cpu)
    assert len(restored) == 1 and torch.equal(restored[0][0], saved[0])


def test_dead_code_is_gone_and_duplicated_rules_are_written_once():
    """Issue 14's list: unused functions removed; the compute-dtype rule, the short name list and the
    fused kernels' optimizer state keys each written once."""
    from pathlib import Path

    import importlib
    plan_module = importlib.import_module("geomcompile.plan")
    from geomcompile import names
    from geomcompile.bench.traffic import Traffic
    from geomcompile.geometries import base, spectral
    from geomcompile.runtime import compile_backend, triton_backend

    assert not hasattr(spectral, "conv_rmatvec") and not hasattr(Traffic, "gb_per_s")
    assert not hasattr(compile_backend, "clear_cache")
    root = Path(__file__).resolve().parents[1]
    assert "def clear(" not in (root / "kernels" / "tables.py").read_text()
    sources = {p: p.read_text() for p in (root / "geomcompile").rglob("*.py")}
    rule = [p.name for p, text in sources.items() if "torch.float64 if" in text]
    assert rule == ["base.py"], f"the compute-dtype rule is written in {rule}"
    assert base.compute_dtype(torch.bfloat16) == torch.float32 and base.compute_dtype(torch.float64) == torch.float64
    assert not hasattr(triton_backend, "_names") and plan_module._short_list is names.short_list
    assert names.short_list(["a", "b", "c"], 2) == "a, b and 1 more"
    assert not hasattr(triton_backend, "_STATE_KEYS")

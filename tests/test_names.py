"""Canonical names through wrappers (torch.compile, DDP, checkpoint_wrapper) and the accepted
forms of example_inputs (positional, one tensor, keyword mapping) on both capture paths.

Nothing here compiles: torch.compile only wraps, and the analysis reads the wrapped module."""
from __future__ import annotations

import dataclasses
import textwrap
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.nn import functional as F

import geomcompile as gc
from geomcompile.names import (canonical_module_names, canonical_name, canonical_names,
                               get_canonical_submodule, unwrap_model)
from geomcompile.models import small_resnet
from tests.models import DataDependentNet


def images(n=4, c=1, s=8):
    return (torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(0)),)


def facts_table(structure) -> dict:
    """Every fact of every parameter except free-form notes (they say which wrapper was peeled)."""
    return {name: {k: v for k, v in dataclasses.asdict(f).items() if k != "notes"}
            for name, f in structure.items()}


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Activation checkpointing as usually applied: every residual block wrapped."""
    for i, block in enumerate(model.layer1):
        model.layer1[i] = checkpoint_wrapper(block)
    return model


# ---- canonical_name / unwrap_model ----------------------------------------------------------------
@pytest.mark.parametrize("raw, canonical", [
    ("_orig_mod.layer1.0.conv1.weight", "layer1.0.conv1.weight"),
    ("module.fc.weight", "fc.weight"),
    ("module._orig_mod.fc.weight", "fc.weight"),
    ("_orig_mod.module.fc.weight", "fc.weight"),
    ("layer1.0._checkpoint_wrapped_module.conv1.weight", "layer1.0.conv1.weight"),
    ("_fsdp_wrapped_module.layer1._fsdp_wrapped_module.weight", "layer1.weight"),
    ("encoder.module.weight", "encoder.module.weight"),      # `module` deeper down is the user's
    ("module", "module"),                                    # a whole name is never dropped
    ("fc.weight", "fc.weight"),
])
def test_canonical_name(raw, canonical):
    assert canonical_name(raw) == canonical


def test_unwrap_model_peels_repeatedly(process_group):
    model = small_resnet()
    ddp = nn.parallel.DistributedDataParallel(model)
    inner, how = unwrap_model(torch.compile(ddp))
    assert inner is model and how == "torch.compile > DistributedDataParallel"
    assert unwrap_model(nn.DataParallel(model)) == (model, "DataParallel")
    assert unwrap_model(model) == (model, "")
    assert [n for n, _ in torch.compile(ddp).named_parameters()][0] == "_orig_mod.module.conv1.weight"
    assert list(canonical_names(torch.compile(ddp)).values()) == [n for n, _ in model.named_parameters()]


def test_canonical_names_inside_the_model():
    model = checkpoint_blocks(small_resnet())
    assert "layer1.0._checkpoint_wrapped_module.conv1.weight" in dict(nn.Module.named_parameters(model))
    names = canonical_names(model)
    assert names[id(model.layer1[0].conv1.weight)] == "layer1.0.conv1.weight"
    assert list(names.values()) == [n for n, _ in small_resnet().named_parameters()]
    modules = canonical_module_names(model)
    assert modules["layer1.0"] == modules["layer1.0._checkpoint_wrapped_module"] == "layer1.0"
    assert get_canonical_submodule(model, "layer1.0") is model.layer1[0]._checkpoint_wrapped_module
    assert get_canonical_submodule(torch.compile(model), "layer1.0.conv1") is model.layer1[0].conv1


class HasModule(nn.Module):
    """A user's own submodule called `module` (a common name for a wrapped sub-network)."""

    def __init__(self):
        super().__init__()
        self.module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.relu(self.module(x)).mean((2, 3)))


def test_a_user_module_called_module_is_not_mangled(process_group):
    bare = gc.analyze(HasModule(), images())
    assert list(bare) == ["module.0.weight", "module.1.weight", "module.1.bias", "head.weight", "head.bias"]
    assert bare["module.0.weight"].scale_invariant.normalizer == "module.1"
    ddp = gc.analyze(nn.parallel.DistributedDataParallel(HasModule()), images())
    assert facts_table(ddp) == facts_table(bare)                 # DDP's `module.` dropped, the user's kept
    # a policy naming the user's `module` as written matches it, with no note
    text = "version: 1\nrules:\n  - match: {param: module.0.weight}\n    use: {psi: {}}\n"
    result = gc.load_policy(text).resolve(bare)
    assert list(result.assignments) == ["module.0.weight"] and result.notes == []


# ---- wrapped models analyse like the bare model ------------------------------------------------------
WRAPS = {
    "compile": lambda m: torch.compile(m),
    "ddp": lambda m: nn.parallel.DistributedDataParallel(m),
    "compile_ddp": lambda m: torch.compile(nn.parallel.DistributedDataParallel(m)),
    "checkpoint_root": lambda m: checkpoint_wrapper(m),
    "checkpoint_blocks": checkpoint_blocks,
    "compiled_blocks": lambda m: _compile_blocks(m),
}


def _compile_blocks(model):
    model.layer1[0] = torch.compile(model.layer1[0])
    return model


@pytest.mark.parametrize("wrap", list(WRAPS))
@pytest.mark.parametrize("with_inputs", [False, True])
def test_wrapped_model_has_the_bare_models_facts(wrap, with_inputs, process_group):
    torch.manual_seed(0)
    inputs = images() if with_inputs else None
    bare = gc.analyze(small_resnet(), inputs)
    torch.manual_seed(0)
    wrapped = gc.analyze(WRAPS[wrap](small_resnet()), inputs)
    assert list(wrapped) == list(bare)
    assert facts_table(wrapped) == facts_table(bare)
    assert wrapped.capture_path == bare.capture_path == "fx"
    assert bare["layer1.0.conv1.weight"].scale_invariant is not None


@pytest.mark.parametrize("wrap", ["compile", "ddp", "checkpoint_router", "compiled_router"])
def test_wrapped_model_on_the_run_path(wrap, process_group):
    """DataDependentNet cannot be traced; the run capture must see through wrappers too."""
    wraps = {"compile": torch.compile, "ddp": nn.parallel.DistributedDataParallel}
    torch.manual_seed(0)
    bare = gc.analyze(DataDependentNet(), images(2, 3, 6))
    torch.manual_seed(0)
    model = DataDependentNet()
    if wrap in wraps:
        model = wraps[wrap](model)
    else:
        model.router = (checkpoint_wrapper if wrap == "checkpoint_router" else torch.compile)(model.router)
    wrapped = gc.analyze(model, images(2, 3, 6))
    assert bare.capture_path == wrapped.capture_path == "run"
    assert facts_table(wrapped) == facts_table(bare)
    assert bare["router.a.0.weight"].scale_invariant is not None


def test_the_peeled_wrapper_is_noted():
    structure = gc.analyze(torch.compile(small_resnet()))
    assert any("inside torch.compile" in n for n in structure.notes)
    assert not any("inside" in n for n in gc.analyze(small_resnet()).notes)


# ---- policies on wrapped models ------------------------------------------------------------------------
POLICY = textwrap.dedent("""\
    version: 1
    rules:
      - name: blocks
        match: {param: "PREFIXlayer*.**.weight", kind: conv, scale_invariant: true}
        use: {psi: {}}
      - name: head
        match: {param: "PREFIXfc.weight"}
        use: {channel_directed: {}}
    """)


def assigned(result) -> dict:
    return {(p, s): g.name for p, stages in result.assignments.items() for s, g in stages.items()}


def test_plan_of_a_compiled_model_matches_the_users_glob():
    bare = gc.plan(small_resnet(), POLICY.replace("PREFIX", ""))
    compiled = gc.plan(torch.compile(small_resnet()), POLICY.replace("PREFIX", ""))
    assert assigned(compiled) == assigned(bare)
    assert ("layer1.0.conv1.weight", "metric") in assigned(bare) and ("fc.weight", "metric") in assigned(bare)
    assert compiled.rule_counts == bare.rule_counts


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod."])
def test_a_glob_written_against_a_wrapped_name_is_read_canonically(prefix, tmp_path):
    path = tmp_path / "wrapped.yaml"
    path.write_text(POLICY.replace("PREFIX", prefix))
    structure = gc.analyze(torch.compile(small_resnet()))
    result = gc.load_policy(path).resolve(structure)          # strict: no "matches nothing" error
    assert assigned(result) == assigned(gc.load_policy(POLICY.replace("PREFIX", "")).resolve(structure))
    assert len(result.notes) == 2
    assert result.notes[0].startswith(f"{path}:4:20: param pattern '{prefix}layer*.**.weight'")
    assert "read as 'layer*.**.weight'" in result.notes[0]
    assert result.notes[1].startswith(f"{path}:7:20:") and "read as 'fc.weight'" in result.notes[1]


def test_a_wrapped_glob_that_matches_nothing_either_way_is_still_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(POLICY.replace("PREFIX", "module.").replace("fc.weight", "classifier.weight"))
    with pytest.raises(gc.GeomCompileError, match=f"{path}:6:5: rule 'head' matches no parameter"):
        gc.load_policy(path).resolve(gc.analyze(small_resnet()))


# ---- example_inputs forms --------------------------------------------------------------------------
class TinyLM(nn.Module):
    """Hugging Face style: forward(input_ids, attention_mask=None), called as model(**batch)."""

    def __init__(self, data_dependent: bool = False):
        super().__init__()
        self.data_dependent = data_dependent
        self.embed = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8, bias=False)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 11)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        if self.data_dependent and bool(input_ids.max() > 100):   # never true; fx cannot trace it
            h = h * 0
        h = self.norm(self.proj(h).transpose(1, 2)).transpose(1, 2)
        return self.head(F.relu(h))


class KeywordOnly(nn.Module):
    """A forward that can only be called with keywords."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, *, images, scale=1.0):
        return self.fc(F.relu(self.bn(self.conv(images * scale))).mean((2, 3)))


def batch(mask: bool = True) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {"input_ids": torch.randint(0, 11, (2, 5), generator=g)}
    if mask:
        out["attention_mask"] = torch.ones(2, 5)
    return out


@pytest.mark.parametrize("data_dependent, path", [(False, "fx"), (True, "run")])
@pytest.mark.parametrize("mask", [True, False])
def test_dict_example_inputs(data_dependent, path, mask):
    model = TinyLM(data_dependent)
    structure = gc.analyze(model, batch(mask))
    assert structure.capture_path == path
    proj = structure["proj.weight"]
    assert proj.input_shape == (2, 5, 8) and proj.output_shape == (2, 5, 8)
    assert structure["head.weight"].input_shape == (2, 5, 8)
    # the same call written positionally gives the same facts
    positional = tuple(batch(mask).values())
    assert facts_table(gc.analyze(model, positional)) == facts_table(structure)
    assert model.training and model.norm.num_batches_tracked.item() == 0   # left as it was


def test_dict_example_inputs_through_a_wrapper(process_group):
    bare = gc.analyze(TinyLM(), batch())
    assert facts_table(gc.analyze(torch.compile(TinyLM()), batch())) == facts_table(bare)
    assert facts_table(gc.analyze(nn.parallel.DistributedDataParallel(TinyLM()), batch())) == facts_table(bare)


def test_keyword_only_forward():
    x = images()[0]
    structure = gc.analyze(KeywordOnly(), {"images": x})
    assert structure.capture_path == "fx"
    assert structure["conv.weight"].input_shape == (4, 1, 8, 8)
    assert structure["conv.weight"].scale_invariant is not None
    with pytest.raises(gc.GeomCompileError, match="do not fit KeywordOnly.forward"):
        gc.analyze(KeywordOnly(), (x,))


def test_one_tensor_and_a_list_are_positional():
    x = images()[0]
    table = facts_table(gc.analyze(small_resnet(), (x,)))
    assert facts_table(gc.analyze(small_resnet(), x)) == table
    assert facts_table(gc.analyze(small_resnet(), [x])) == table


def test_positional_and_keyword_inputs_together():
    from geomcompile.capture import ExampleInputs

    class Mixed(TinyLM):
        def forward(self, *args, attention_mask=None):     # input_ids can only be positional
            return super().forward(args[0], attention_mask=attention_mask)

    b = batch()
    structure = gc.analyze(Mixed(), ExampleInputs((b["input_ids"],), {"attention_mask": b["attention_mask"]}))
    assert structure["proj.weight"].input_shape == (2, 5, 8)
    assert facts_table(structure) == facts_table(gc.analyze(TinyLM(), b))


def test_dict_keys_must_be_names():
    with pytest.raises(gc.GeomCompileError, match="keys must be strings"):
        gc.analyze(small_resnet(), {0: images()[0]})


def test_a_forward_that_takes_one_dict_gets_it_in_a_tuple():
    class DictIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, batch):
            return self.fc(batch["x"])

    structure = gc.analyze(DictIn(), ({"x": torch.randn(4, 3)},))
    assert structure["fc.weight"].input_shape == (4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no warning from the fx specialisation
        gc.analyze(TinyLM(), batch(mask=False))

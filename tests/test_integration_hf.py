"""`geomcompile.integrations.hf.GeomCompile` (issue 13) with a real `transformers.Trainer`: the
Trainer builds the optimizer through the callback's factory (param groups, plan installed), every
accumulated step gets the geometry, diagnostics go into the Trainer's logs, checkpoints get
`geomcompile_plan.json`, `optimizer.pt` resumes bit-identically and another policy is refused."""
from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import transformers
from torch import nn

import geomcompile as gc
from geomcompile.integrations.hf import GeomCompile

from .frameworks import LAM, PSI, UpdateRecorder, assert_params_equal, assert_same_diagnostics
from .test_hf import ENCODER_CD, LR, HFBNNet, _args, _batch, _bert, _image_dataset, _text_dataset


class RecordUpdates(transformers.TrainerCallback):
    """An UpdateRecorder on the optimizer the Trainer built (its hooks after the plan's)."""

    def __init__(self, transforms):
        self.transforms, self.recorder = transforms, None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)          # accelerate's AcceleratedOptimizer
        self.recorder = UpdateRecorder(model, inner, LR, self.transforms)


def _trainer(model, data, callback, out, extra_callbacks=(), **kwargs):
    return transformers.Trainer(model, _args(out, **kwargs), train_dataset=data,
                                callbacks=[callback, *extra_callbacks],
                                optimizer_cls_and_kwargs=callback.optimizer_cls_and_kwargs)


def test_the_trainer_builds_the_optimizer_and_every_accumulated_step_gets_the_geometry(tmp_path, capsys):
    model, data = _bert(), _text_dataset()
    callback = GeomCompile(ENCODER_CD, torch.optim.SGD, example_inputs=_batch(data))
    expected = {f"{n}.weight": partial(gc.functional.sobolev, lam=LAM, dim=0)
                for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.encoder.")}
    record = RecordUpdates(expected)
    _trainer(model, data, callback, tmp_path, [record]).train()           # gradient_accumulation_steps=2
    assert set(callback.plan.assignments) == set(expected)
    record.recorder.verify(expected_steps=4)
    assert capsys.readouterr().out.count(f"{len(expected)} of ") == 1      # the summary, once


def test_weight_decay_from_the_arguments_spares_the_psi_weights(tmp_path):
    model, data = HFBNNet(), _image_dataset()
    callback = GeomCompile(PSI, torch.optim.SGD, {"momentum": 0.9}, example_inputs=_batch(data))
    trainer = _trainer(model, data, callback, tmp_path, weight_decay=0.01, max_steps=1)
    trainer.train()
    name = {id(p): n for n, p in model.named_parameters()}
    groups = [(g["weight_decay"], g["lr"], g["momentum"], sorted(name[id(p)] for p in g["params"]))
              for g in trainer.optimizer.param_groups]
    assert groups == [(0.01, LR, 0.9, ["net.head.weight"]),
                      (0.0, LR, 0.9, ["net.bn1.bias", "net.bn1.weight", "net.bn2.bias", "net.bn2.weight",
                                      "net.head.bias"]),
                      (0.0, LR, 0.9, ["net.conv1.weight", "net.conv2.weight"])]
    assert not [w for w in callback.plan.warnings if "weight_decay" in str(w)]


def _psi_run(tmp_path, seed, policy=PSI, model=HFBNNet, data=_image_dataset, lr=0.5, **kwargs):
    data = data()
    model = model(seed=seed)
    callback = GeomCompile(policy, torch.optim.SGD, {"momentum": 0.9}, example_inputs=_batch(data),
                           print_summary=False)
    trainer = _trainer(model, data, callback, tmp_path, learning_rate=lr, save_strategy="steps", save_steps=2,
                       logging_strategy="steps", logging_steps=2)
    trainer.train(**kwargs)
    return model, callback, trainer


def test_a_tiny_bert_resumes_from_optimizer_pt_bit_identically(tmp_path):
    run = dict(policy=ENCODER_CD, model=_bert, data=_text_dataset, lr=LR)
    uninterrupted, first, _ = _psi_run(tmp_path, seed=0, **run)
    assert (tmp_path / "checkpoint-2" / "optimizer.pt").is_file()
    resumed, again, _ = _psi_run(tmp_path, seed=1, resume_from_checkpoint=str(tmp_path / "checkpoint-2"), **run)
    assert_params_equal(resumed, uninterrupted, "resumed vs uninterrupted")
    assert again.plan.steps == first.plan.steps == 4


def test_checkpoints_get_the_plan_and_optimizer_pt_resumes_bit_identically(tmp_path):
    uninterrupted, first, trainer = _psi_run(tmp_path, seed=0)
    on_disk = json.loads((tmp_path / "checkpoint-2" / "geomcompile_plan.json").read_text())
    assert on_disk["parameters"]["net.conv1.weight"]["geometries"]["metric"]["label"] == "psi(max_norm=2.0)"
    key = "geomcompile/net.conv2.weight/psi/renormalised_units"
    logged = [(entry["step"], entry[key]) for entry in trainer.state.log_history if key in entry]
    # the logs at steps 2 and 4, and the end-of-training summary log (also at step 4)
    assert [step for step, _ in logged] == [2, 4, 4], trainer.state.log_history
    assert logged[-1][1] == first.plan.diagnostics()["net.conv2.weight"]["psi"]["renormalised_units"] > 0
    saved_state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert any(key in entry for entry in saved_state["log_history"])

    resumed, again, _ = _psi_run(tmp_path, seed=1, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert_params_equal(resumed, uninterrupted, "resumed vs uninterrupted")
    assert_same_diagnostics(again.plan, first.plan)


def test_resuming_under_another_policy_is_refused(tmp_path):
    _psi_run(tmp_path, seed=0)
    other = {**PSI, "rules": [{**PSI["rules"][0], "use": {"psi": {"max_norm": 3.0}}}]}
    with pytest.raises(gc.GeomCompileError, match="made by a different geomcompile plan") as info:
        _psi_run(tmp_path, seed=1, policy=other, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "metric=psi(max_norm=2.0) in the checkpoint, metric=psi(max_norm=3.0) here" in str(info.value)


def test_misuse_is_an_error_with_the_fix(tmp_path):
    model, data = HFBNNet(), _image_dataset()
    callback = GeomCompile(PSI, torch.optim.SGD, example_inputs=_batch(data))
    with pytest.raises(gc.GeomCompileError, match="did not build its optimizer with geomcompile"):
        transformers.Trainer(model, _args(tmp_path), train_dataset=data, callbacks=[callback],
                             optimizers=(torch.optim.SGD(model.parameters(), lr=LR), None)).train()
    with pytest.raises(gc.GeomCompileError, match="not registered with"):
        transformers.Trainer(model, _args(tmp_path), train_dataset=data,
                             optimizer_cls_and_kwargs=GeomCompile(PSI, torch.optim.SGD).optimizer_cls_and_kwargs
                             ).train()
    with pytest.raises(gc.GeomCompileError, match="must be a torch.optim.Optimizer class"):
        GeomCompile(PSI, "sgd")

"""`geomcompile.integrations.lightning.GeomCompile` (issue 13) in real Lightning fits: the plan is
installed on what `configure_optimizers` returned, every step gets the geometry (fp32, bf16-mixed,
accumulation 2, two optimizers), diagnostics reach the logger, checkpoints carry the plan, a resume
continues bit-identically and a resume under another policy is refused."""
from __future__ import annotations

import csv
import json
import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import geomcompile as gc
from geomcompile.integrations.lightning import GeomCompile

from .frameworks import (batches_loader as _loader, CD_CONV, LR, PSI, UpdateRecorder, assert_params_equal, assert_same_diagnostics,
                         example_images, image_batches, sobolev_on_convs)
from .lightning_models import BNLit

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class PlainLit(BNLit):
    """A LightningModule that knows nothing of geomcompile; the callback applies the plan."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.example_input_array = example_images()[0]


class TwoOptimizers(PlainLit):
    """Manual optimisation with one SGD for the first conv block and one for the rest."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizers = self.optimizers()
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        for opt in optimizers:
            opt.step()

    def configure_optimizers(self):
        first = [self.net.conv1.weight, self.net.bn1.weight, self.net.bn1.bias]
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        return [torch.optim.SGD(first, lr=self.lr), torch.optim.SGD(rest, lr=self.lr)]


class RecordUpdates(Callback):
    """Registers an UpdateRecorder per optimizer after GeomCompile installed (callbacks run in order)."""

    def __init__(self):
        self.recorders = []

    def on_fit_start(self, trainer, pl_module):
        transforms = sobolev_on_convs(pl_module)
        for opt in trainer.optimizers:
            mine = {id(p) for g in opt.param_groups for p in g["params"]}
            named = [(n, p) for n, p in pl_module.named_parameters() if id(p) in mine]
            held = types.SimpleNamespace(named_parameters=lambda named=named: iter(named))
            self.recorders.append(UpdateRecorder(held, opt, LR, {n: t for n, t in transforms.items()
                                                                  if n in dict(named)}))


def _trainer(max_steps: int, callbacks, tmp_path=None, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, callbacks=list(callbacks),
                      logger=kwargs.pop("logger", False), enable_checkpointing=any(isinstance(c, ModelCheckpoint)
                                                                                   for c in callbacks),
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, **kwargs)


@pytest.mark.parametrize("setting, steps, batches", [
    ({}, 4, 4),
    ({"precision": "bf16-mixed"}, 4, 4),
    ({"accumulate_grad_batches": 2}, 3, 6),
], ids=["fp32", "bf16-mixed", "accumulate2"])
def test_every_step_gets_the_geometry(tmp_path, capsys, setting, steps, batches):
    callback, record = GeomCompile(CD_CONV, log_every_n_steps=1), RecordUpdates()
    module = PlainLit()
    _trainer(steps, [callback, record], **setting).fit(module, _loader(image_batches(batches)))
    assert set(callback.plan.assignments) == {"net.conv1.weight", "net.conv2.weight"}
    record.recorders[0].verify(expected_steps=steps)
    out = capsys.readouterr().out
    assert out.count("2 of 8 parameters get a geometry") == 1, out      # the summary, printed once


def test_diagnostics_are_logged_every_n_steps(tmp_path):
    spectral = {"version": 1, "rules": [{"name": "convs", "match": {"kind": "conv"},
                                         "use": {"spectral": {"coef": 0.1}}}]}
    callback = GeomCompile(spectral, log_every_n_steps=2, print_summary=False)
    logger = CSVLogger(tmp_path, name="logs")
    _trainer(4, [callback], logger=logger).fit(PlainLit(), _loader(image_batches(4)))
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    key = "geomcompile/net.conv1.weight/spectral/R"
    assert key in rows[0], sorted(rows[0])
    assert sorted(int(r["step"]) for r in rows if r.get(key)) == [2, 4], rows     # optimizer steps 2 and 4
    last = callback.plan.diagnostics()["net.conv1.weight"]["spectral"]["R"]
    assert float([r for r in rows if r.get(key)][-1][key]) == pytest.approx(last, rel=1e-6)


def test_two_optimizers_each_get_their_parameters_geometries_without_false_warnings(tmp_path):
    callback, record = GeomCompile(CD_CONV, print_summary=False), RecordUpdates()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # manual optimisation: Lightning's global step counts the steps of both optimizers
        _trainer(6, [callback, record]).fit(TwoOptimizers(), _loader(image_batches(3)))
    assert [set(n for it in p._installation.items for n in it.unit.names) for p in callback.plans] == \
           [{"net.conv1.weight"}, {"net.conv2.weight"}]
    for r in record.recorders:
        r.verify(expected_steps=3)
    coverage = [str(w.message) for w in caught if "not in the optimizer" in str(w.message)
                or "none of the" in str(w.message)]
    assert not coverage, coverage


def test_two_optimizers_that_leave_a_parameter_out_warn_once(tmp_path):
    class LeavesHeadBiasOut(TwoOptimizers):
        def configure_optimizers(self):
            first, rest = super().configure_optimizers()
            rest.param_groups[0]["params"] = [p for p in rest.param_groups[0]["params"] if p is not self.net.head.bias]
            return [first, rest]

    callback = GeomCompile(CD_CONV, print_summary=False)
    with pytest.warns(gc.GeomCompileWarning, match=r"1 model parameter\(s\) are in none of the 2 optimizers.*head.bias"):
        _trainer(1, [callback]).fit(LeavesHeadBiasOut(), _loader(image_batches(1)))


def _resume_module(seed=0):
    # psi: rows start at norm 1.99 with a large lr, so units are renormalised (momentum rescaled)
    # before and after the checkpoint at step 3
    return PlainLit(lr=0.5, momentum=0.9, seed=seed, row_norm=1.99)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_checkpoints_carry_the_plan_and_resume_bit_identically(tmp_path, precision):
    loader = _loader(image_batches(3))                      # one epoch = 3 steps
    ckpt_dir = tmp_path / "ckpt"
    first = GeomCompile(PSI, print_summary=False)
    uninterrupted = _resume_module()
    _trainer(6, [first, ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1)],
             tmp_path, precision=precision).fit(uninterrupted, loader)
    checkpoint = torch.load(ckpt_dir / "epoch=0-step=3.ckpt", weights_only=True)
    assert checkpoint["geomcompile"]["parameters"]["net.conv1.weight"]["geometries"]["metric"]["label"] == \
           "psi(max_norm=2.0)"
    on_disk = json.loads((ckpt_dir / "geomcompile_plan.json").read_text())
    assert on_disk == checkpoint["geomcompile"]
    for source in (ckpt_dir, checkpoint["geomcompile"]):      # the json file, or the record in the .ckpt
        loaded = gc.load_plan(source, _resume_module(seed=2), example_inputs=example_images())
        assert loaded.assignments == first.plan.assignments
    assert sum(v["psi"]["renormalised_units"] for v in first.plan.diagnostics().values()) > 0

    again = GeomCompile(PSI, print_summary=False)
    resumed = _resume_module(seed=1)                        # other weights: the checkpoint decides
    _trainer(6, [again], tmp_path, precision=precision).fit(resumed, loader, ckpt_path=ckpt_dir / "epoch=0-step=3.ckpt")
    assert_params_equal(resumed, uninterrupted, "resumed vs uninterrupted")
    assert_same_diagnostics(again.plan, first.plan)
    assert again.plan.steps == first.plan.steps == 6


def test_resuming_under_another_policy_is_refused_before_the_optimizer_state_loads(tmp_path):
    loader = _loader(image_batches(3))
    ckpt_dir = tmp_path / "ckpt"
    _trainer(3, [GeomCompile(PSI, print_summary=False), ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3)],
             tmp_path).fit(_resume_module(), loader)
    (ckpt,) = ckpt_dir.glob("*.ckpt")
    other = {**PSI, "rules": [{**PSI["rules"][0], "use": {"psi": {"max_norm": 3.0}}}]}
    callback = GeomCompile(other, print_summary=False)
    module = _resume_module(seed=1)
    with pytest.raises(gc.GeomCompileError, match="trained under another geomcompile plan") as info:
        _trainer(6, [callback], tmp_path).fit(module, loader, ckpt_path=ckpt)
    message = str(info.value)
    assert "net.conv1.weight: metric=psi(max_norm=2.0) in the saved plan, metric=psi(max_norm=3.0) here" in message
    assert "Fix:" in message and not callback.plans
    # asked for: the differing geometry state starts fresh, with a note
    reset = GeomCompile(other, print_summary=False, state_mismatch="reset")
    _trainer(4, [reset], tmp_path).fit(_resume_module(seed=1), loader, ckpt_path=ckpt)
    assert any("state_mismatch='reset'" in n for n in reset.notes)
    assert reset.plan.steps == 1                     # fresh geometry state: only the step after the resume
    # the same policy written differently (a comment) resumes, with a note
    same = GeomCompile("# the same rules\n" + json.dumps(PSI), print_summary=False)
    _trainer(4, [same], tmp_path).fit(_resume_module(seed=1), loader, ckpt_path=ckpt)
    assert any("policy text differs" in n for n in same.notes)


def test_a_bad_policy_fails_when_the_callback_is_made():
    with pytest.raises(gc.GeomCompileError, match="unknown geometry 'psy'"):
        GeomCompile({"version": 1, "rules": [{"name": "r", "match": {}, "use": {"psy": {}}}]})
    with pytest.raises(gc.GeomCompileError, match="log_every_n_steps must be an integer >= 0"):
        GeomCompile(PSI, log_every_n_steps=-1)

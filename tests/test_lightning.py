"""PyTorch Lightning as a client: `configure_optimizers` creates SGD and calls `gc.apply`.

Lightning's automatic optimisation calls `optimizer.step(closure)`: the forward, `zero_grad` and
backward run inside `step`, so the gradient the geometry must transform exists only once the
closure has run; with `accumulate_grad_batches=2` the closure's backward adds the second batch's
gradient to the first. The base optimizer must get T(g1 + g2), every step.
"""
import warnings

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
import pytest

import geomcompile as gc

from .frameworks import (batches_loader as _loader, CD_CONV, LR, PSI, SPECTRAL, UpdateRecorder, assert_params_close,
                         assert_params_equal, assert_same_diagnostics, example_images, image_batches,
                         sobolev_on_convs, train_plain)
from .lightning_models import BNLit

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class LitNet(BNLit):
    """BNLit whose configure_optimizers applies the policy itself (gc.apply on its own SGD)."""

    def __init__(self, policy, lr: float = LR, momentum: float = 0.0, record: bool = False, seed: int = 0,
                 row_norm: float | None = None):
        super().__init__(lr=lr, momentum=momentum, seed=seed, row_norm=row_norm)
        self.policy, self.record = policy, record
        self.plan = self.recorder = None

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        self.plan = gc.apply(self, self.policy, opt, example_inputs=example_images())
        if self.record:
            self.recorder = UpdateRecorder(self, opt, self.lr, sobolev_on_convs(self))
        return opt


def _trainer(max_steps: int, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, callbacks=list(callbacks),
                      enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False,
                      **kwargs)


@pytest.mark.parametrize("setting, steps, batches", [
    ({}, 4, 4),
    ({"precision": "bf16-mixed"}, 4, 4),
    ({"accumulate_grad_batches": 2}, 3, 6),
], ids=["fp32", "bf16-mixed", "accumulate2"])
def test_every_step_feeds_the_base_optimizer_the_transformed_gradient_sum(setting, steps, batches):
    module = LitNet(CD_CONV, record=True)
    _trainer(steps, **setting).fit(module, _loader(image_batches(batches)))
    assert set(module.plan.assignments) == {"net.conv1.weight", "net.conv2.weight"}
    module.recorder.verify(expected_steps=steps)


# psi: conv rows start at norm 1.99 and lr is large, so units pass max_norm=2 and are renormalised
# (momentum rescaled) both before and after the checkpoint at step 3.
RESUME_CASES = {"psi": dict(policy=PSI, lr=0.5, row_norm=1.99), "spectral": dict(policy=SPECTRAL)}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_checkpoint_and_resume_continue_bit_identically(tmp_path, case):
    def module(seed=0):
        return LitNet(momentum=0.9, seed=seed, **RESUME_CASES[case])

    batches = image_batches(3)
    loader = _loader(batches)                      # one epoch = 3 steps

    # the hand-written loop with the same plan is what Lightning must reproduce
    reference = module()
    opt = reference.configure_optimizers()
    train_plain(reference, opt, batches + batches)

    # Lightning's own checkpointing, at step 3 of 6. (A `trainer.save_checkpoint` after a fit that
    # stopped at max_steps=3 does not resume at the epoch boundary: Lightning replays a batch.)
    uninterrupted = module()
    _trainer(6, [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)]).fit(uninterrupted, loader)
    assert_params_close(uninterrupted, reference, "Lightning vs a plain loop with the same plan",
                        rtol=1e-5, atol=1e-6)

    resumed = module(seed=1)                       # other weights: the checkpoint decides
    _trainer(6).fit(resumed, loader, ckpt_path=tmp_path / "epoch=0-step=3.ckpt")
    assert_params_equal(resumed, uninterrupted, "resumed vs uninterrupted")
    assert_same_diagnostics(resumed.plan, uninterrupted.plan)
    if case == "psi":
        renormalised = {k: v["psi"]["renormalised_units"] for k, v in uninterrupted.plan.diagnostics().items()}
        assert sum(renormalised.values()) > 0, f"no renormalisation happened: {renormalised}"

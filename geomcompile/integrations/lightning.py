"""PyTorch Lightning: a Callback that installs a geomcompile plan on the optimizers
``configure_optimizers`` returned (``pip install geomcompile[lightning]``).

    from geomcompile.integrations.lightning import GeomCompile
    trainer = pl.Trainer(callbacks=[GeomCompile("resnet", example_inputs=(x,))])
    trainer.fit(module)                       # configure_optimizers stays plain torch

What it does, and when:

* ``on_fit_start`` (after Lightning built the optimizers, before it restores a checkpoint's
  optimizer state): analyses the LightningModule once (``example_inputs``, else its
  ``example_input_array``), installs one plan per optimizer, and prints the summary once, on
  global rank 0. ``callback.plans`` holds them (``callback.plan`` when there is one optimizer).
* every ``log_every_n_steps`` optimizer steps: ``plan.diagnostics()`` as scalars
  ``geomcompile/<unit>/<geometry>/<key>``, written to the module's loggers (``logger.log_metrics``,
  rank 0) at that step, whatever the Trainer's own ``log_every_n_steps``.
* ``on_save_checkpoint``: the resolved plan (``plan.save``'s record) goes into the checkpoint under
  ``"geomcompile"``, and ``geomcompile_plan.json`` is written next to the checkpoints of every
  ``ModelCheckpoint`` (rank 0).
* on resume (``ckpt_path=``): the checkpoint's plan is compared with this run's before any optimizer
  state loads; other assignments (another policy, another model) raise GeomCompileError naming
  them, unless ``state_mismatch="reset"`` or ``"load"`` was given (then a note in ``callback.notes``).
  The geometry state itself rides in the optimizer state and resumes bit-identically.

Works with precision plugins (``bf16-mixed``, ``16-mixed``), ``accumulate_grad_batches`` and
several optimizers (automatic or manual optimisation). Do not also call ``gc.apply`` in
``configure_optimizers``: that would install a second plan.
"""
from __future__ import annotations

from ..errors import GeomCompileError
from ..plan_io import PLAN_FILE, plan_record, save_plan
from ..policy import load_policy
from . import _common

try:
    from lightning.pytorch import Callback
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities import move_data_to_device
except ImportError:                          # the standalone package has the same API
    try:
        from pytorch_lightning import Callback
        from pytorch_lightning.callbacks import ModelCheckpoint
        from pytorch_lightning.utilities import move_data_to_device
    except ImportError:
        raise GeomCompileError("geomcompile.integrations.lightning needs PyTorch Lightning. Fix: pip install "
                               "'geomcompile[lightning]' (or lightning)") from None

CHECKPOINT_KEY = "geomcompile"


class GeomCompile(Callback):
    """Install `policy` (a shipped name, a path, YAML text, a dict or a Policy) on the optimizers
    of every fit. ``install_options`` go to ``plan.install`` (``state_mismatch``, ``clip_grad_norm``)."""

    def __init__(self, policy, example_inputs=None, backend: str = "auto", log_every_n_steps: int = 50,
                 print_summary: bool = True, **install_options):
        if not isinstance(log_every_n_steps, int) or isinstance(log_every_n_steps, bool) or log_every_n_steps < 0:
            raise GeomCompileError(f"log_every_n_steps must be an integer >= 0 (0: never log), got {log_every_n_steps!r}")
        self.policy = load_policy(policy)        # a bad policy fails here, before any training
        self.example_inputs = example_inputs
        self.backend = backend
        self.log_every_n_steps = log_every_n_steps
        self.print_summary = print_summary
        self.install_options = install_options
        self.plans: list = []
        self.notes: list[str] = []
        self._saved = None                      # the plan record of the checkpoint being resumed
        self._resuming = False
        self._last_logged_step = -1

    @property
    def plan(self):
        """The plan of the only optimizer (see ``plans`` for several)."""
        if len(self.plans) != 1:
            raise GeomCompileError(f"callback.plan needs exactly one installed plan, there are {len(self.plans)}; "
                                   f"use callback.plans" if self.plans else
                                   "no plan is installed yet: the callback installs it when trainer.fit starts")
        return self.plans[0]

    # -- fit start: analyse, install, check a resumed checkpoint ----------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        for plan in self.plans:                  # a second fit: configure_optimizers made new optimizers
            plan.remove()
        self.plans, self.notes = [], []
        inputs = self.example_inputs if self.example_inputs is not None else pl_module.example_input_array
        if inputs is not None:
            inputs = move_data_to_device(inputs, pl_module.device)
        self.plans = _common.install_on_all(pl_module, self.policy, list(trainer.optimizers), inputs,
                                            backend=self.backend, **self.install_options)
        if self._resuming:
            self._check_resume()
        if self.print_summary and trainer.is_global_zero:
            print(_common.summary(self.plans))

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Called before on_fit_start for most strategies, after it for those that restore after setup;
        # both before the optimizer state loads.
        self._saved, self._resuming = checkpoint.get(CHECKPOINT_KEY), True
        if self.plans:
            self._check_resume()

    def _check_resume(self) -> None:
        self._resuming = False
        try:
            self.notes += _common.check_saved(self._saved, self.plans[0], "the checkpoint")
        except GeomCompileError as error:
            if self.install_options.get("state_mismatch", "error") != "error":
                # the user asked for it: the differing geometry state is reset or loaded (runtime/state.py)
                self.notes.append(f"resuming under another plan (state_mismatch="
                                  f"{self.install_options['state_mismatch']!r}): {str(error).splitlines()[0]}")
                return
            for plan in self.plans:              # leave the optimizers as configure_optimizers made them
                plan.remove()
            self.plans = []
            raise

    # -- logging ---------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (not self.log_every_n_steps or not self.plans or step == self._last_logged_step
                or step % self.log_every_n_steps):
            return
        self._last_logged_step = step
        values = _common.scalars(self.plans)
        # Straight to the module's loggers at this optimizer step: LightningModule.log would hand
        # them over only at the Trainer's own log_every_n_steps.
        if values and trainer.is_global_zero:
            for logger in pl_module.loggers:
                logger.log_metrics(values, step=step)

    # -- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if not self.plans:
            return
        checkpoint[CHECKPOINT_KEY] = plan_record(self.plans[0])
        if trainer.is_global_zero:
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                    save_plan(self.plans[0], _folder(callback.dirpath))


def _folder(dirpath):
    from pathlib import Path
    path = Path(dirpath)
    path.mkdir(parents=True, exist_ok=True)
    return path / PLAN_FILE

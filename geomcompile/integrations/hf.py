"""Hugging Face ``transformers.Trainer``: the Trainer builds the optimizer with geomcompile's param
groups and the plan installed, and a TrainerCallback reports and saves the plan
(``pip install geomcompile[hf]``).

    from geomcompile.integrations.hf import GeomCompile
    geometry = GeomCompile("resnet", torch.optim.SGD, {"momentum": 0.9}, example_inputs=batch)
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[geometry],
                      optimizer_cls_and_kwargs=geometry.optimizer_cls_and_kwargs)
    trainer.train()                     # trainer.train(resume_from_checkpoint=...) resumes it

Why both: the optimizer must carry the plan *before* the Trainer loads ``optimizer.pt`` on resume,
and the only place a Trainer lets an outside object build its optimizer is
``optimizer_cls_and_kwargs`` with an optimizer factory (in transformers 5.24, which this is tested
with, a callable that is not an Optimizer class is called as ``factory()(model, **kwargs)``), while
reporting needs callback events.

* The optimizer: ``optimizer_cls(plan.param_groups(lr=..., weight_decay=...), **optimizer_kwargs)``,
  with ``lr`` and ``weight_decay`` taken from the TrainingArguments (``learning_rate``,
  ``weight_decay``) unless ``optimizer_kwargs`` gives them: parameters whose geometry weight decay
  hurts (psi, pom) get none, 1-d parameters none (HF's own rule for biases and norms), the others
  the requested decay. The plan is installed on it (``callback.plan``); accelerate's wrapper and
  ``gradient_accumulation_steps`` need nothing more.
* ``on_train_begin``: the summary, once, on the main process.
* ``on_log`` (every HF log, ``logging_steps``): ``plan.diagnostics()`` as
  ``geomcompile/<unit>/<geometry>/<key>`` scalars, added to that log's entry in
  ``state.log_history`` (saved in every checkpoint's ``trainer_state.json``) and to the ``logs``
  the callbacks after this one receive.
* ``on_save``: ``geomcompile_plan.json`` in the checkpoint folder (main process).
* Resume: ``optimizer.pt`` carries the geometry state (runtime/state.py); loading it under another
  plan raises GeomCompileError naming the parameters that differ.
"""
from __future__ import annotations

import os

import torch

from ..errors import GeomCompileError
from ..plan_io import PLAN_FILE, save_plan
from ..policy import load_policy
from . import _common

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError:
    raise GeomCompileError("geomcompile.integrations.hf needs Hugging Face transformers. Fix: pip install "
                           "'geomcompile[hf]' (or transformers accelerate)") from None

PREFIX = "geomcompile"


class GeomCompile(TrainerCallback):
    """Build the Trainer's optimizer (`optimizer_cls` with `optimizer_kwargs`) on geomcompile param
    groups with `policy` installed. Pass it as ``callbacks=[it]`` *and*
    ``optimizer_cls_and_kwargs=it.optimizer_cls_and_kwargs``. ``no_decay`` and ``decay_1d`` go to
    ``plan.param_groups``; ``install_options`` to ``plan.install`` (``state_mismatch``, ``clip_grad_norm``)."""

    def __init__(self, policy, optimizer_cls=torch.optim.AdamW, optimizer_kwargs: dict | None = None,
                 example_inputs=None, backend: str = "auto", no_decay=(), decay_1d: bool = False,
                 print_summary: bool = True, **install_options):
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise GeomCompileError(f"optimizer_cls must be a torch.optim.Optimizer class (e.g. torch.optim.SGD), "
                                   f"got {optimizer_cls!r}")
        self.policy = load_policy(policy)         # a bad policy fails here, before the Trainer exists
        self.optimizer_cls = optimizer_cls
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.example_inputs = example_inputs
        self.backend = backend
        self.no_decay, self.decay_1d = no_decay, decay_1d
        self.print_summary = print_summary
        self.install_options = install_options
        self.plan = None
        self._args = None

    @property
    def optimizer_cls_and_kwargs(self) -> tuple:
        """For ``Trainer(optimizer_cls_and_kwargs=...)``: an optimizer factory the Trainer calls with the model."""
        return (lambda: self._build, {})

    # -- the optimizer ---------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        self._args = args

    def _build(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        if self._args is None:
            raise GeomCompileError("the geomcompile optimizer factory was called by a Trainer this callback is not "
                                   "registered with. Fix: pass the same object as callbacks=[it] and "
                                   "optimizer_cls_and_kwargs=it.optimizer_cls_and_kwargs")
        if self.plan is not None:
            self.plan.remove()                    # a new optimizer for the same callback (a second Trainer)
            self.plan = None
        kwargs = dict(self.optimizer_kwargs)
        lr = kwargs.pop("lr", self._args.learning_rate)
        weight_decay = kwargs.pop("weight_decay", self._args.weight_decay)
        inputs = _to_device(self.example_inputs, next(model.parameters()).device)
        from ..analysis import analyze
        from ..plan import Plan
        structure = analyze(model, inputs)
        plan = Plan(model, structure, self.policy, self.policy.resolve(structure))
        groups = plan.param_groups(lr=lr, weight_decay=weight_decay, no_decay=self.no_decay, decay_1d=self.decay_1d)
        optimizer = self.optimizer_cls(groups, lr=lr, **kwargs)
        self.plan = plan.install(optimizer, backend=self.backend, **self.install_options)
        return optimizer

    # -- reporting and saving --------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if self.plan is None:
            raise GeomCompileError("the Trainer did not build its optimizer with geomcompile (an optimizer passed "
                                   "as optimizers=(...) wins over optimizer_cls_and_kwargs). Fix: pass "
                                   "optimizer_cls_and_kwargs=callback.optimizer_cls_and_kwargs and no optimizer, or "
                                   "drop the callback and call gc.apply on your own optimizer")
        if self.print_summary and state.is_world_process_zero:
            print(self.plan.summary())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.plan is None:
            return
        values = _common.scalars([self.plan], PREFIX)
        if logs is not None:
            logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_save(self, args, state, control, **kwargs):
        if self.plan is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            save_plan(self.plan, os.path.join(folder, PLAN_FILE))


def _to_device(inputs, device):
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: _to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs

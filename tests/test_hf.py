"""Hugging Face `Trainer` (on accelerate) as a client, with the user's own optimizer.

`gc.apply` gets the model's keyword arguments as `example_inputs` (a dict batch, as HF models are
called), `Trainer(optimizers=(opt, None))` steps the optimizer through accelerate's wrapper after
`gradient_accumulation_steps` backwards. Checkpoints are HF's own (`save_strategy="steps"`,
`resume_from_checkpoint=`).

Gradient clipping is off (`max_grad_norm=0`): the Trainer clips `p.grad` in place between the last
backward and the step, where the test's gradient hooks cannot see it, and clipping says nothing
about whether the geometry ran on the accumulated gradient.
"""
from functools import partial

import pytest
import torch
import transformers
from torch import nn

import geomcompile as gc

from .frameworks import (LAM, PSI, TinyBNNet, UpdateRecorder, assert_params_equal, assert_same_diagnostics,
                         scale_rows_to_norm)

LR = 0.05
ENCODER_CD = {"version": 1, "rules": [{"name": "encoder-linears",
                                       "match": {"kind": "linear", "param": "bert.encoder.**"},
                                       "use": {"channel_directed": {"metric": "sobolev", "lam": LAM}}}]}


def _bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=64,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def _text_dataset(n: int = 16, length: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[n // 2:, length // 2:] = 0                       # some padding
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def _batch(dataset, n: int = 4) -> dict:
    return {k: torch.stack([row[k] for row in dataset[:n]]) for k in dataset[0]}


class HFBNNet(nn.Module):
    """TinyBNNet behind the HF calling convention: keyword inputs, a dict with the loss."""

    def __init__(self, seed: int = 0, row_norm: float = 1.99):
        super().__init__()
        torch.manual_seed(seed)
        self.net = TinyBNNet()
        for conv in (self.net.conv1, self.net.conv2):
            scale_rows_to_norm(conv.weight, row_norm)

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def _image_dataset(n: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [{"pixel_values": x[i], "labels": y[i]} for i in range(n)]


def _args(out, **kwargs) -> transformers.TrainingArguments:
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4,
                    use_cpu=True, report_to=[], save_strategy="no", lr_scheduler_type="constant",
                    learning_rate=LR, max_grad_norm=0.0, logging_strategy="no", disable_tqdm=True,
                    dataloader_num_workers=0)
    settings.update(kwargs)
    return transformers.TrainingArguments(**settings)


def test_trainer_feeds_the_base_optimizer_the_transformed_accumulated_gradient(tmp_path):
    model = _bert()
    data = _text_dataset()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    plan = gc.apply(model, ENCODER_CD, opt, example_inputs=_batch(data))      # keyword inputs, as HF calls it
    expected = {f"{n}.weight": partial(gc.functional.sobolev, lam=LAM, dim=0)
                for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("bert.encoder.")}
    assert set(plan.assignments) == set(expected)
    recorder = UpdateRecorder(model, opt, LR, expected)
    transformers.Trainer(model, _args(tmp_path), train_dataset=data, optimizers=(opt, None)).train()
    recorder.verify(expected_steps=4)


CASES = {
    "bert-channel_directed": dict(model=_bert, data=_text_dataset, policy=ENCODER_CD, lr=LR),
    # psi: rows start at norm 1.99 with a large lr, so units are renormalised (momentum rescaled)
    "cnn-psi": dict(model=HFBNNet, data=_image_dataset, policy=PSI, lr=0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_from_an_hf_checkpoint_continues_bit_identically(tmp_path, case):
    c = CASES[case]
    data = c["data"]()

    def run(seed, **kwargs):
        model = c["model"](seed=seed)
        opt = torch.optim.SGD(model.parameters(), lr=c["lr"], momentum=0.9)
        plan = gc.apply(model, c["policy"], opt, example_inputs=_batch(data))
        trainer = transformers.Trainer(model, _args(tmp_path, learning_rate=c["lr"], save_strategy="steps",
                                                    save_steps=2), train_dataset=data, optimizers=(opt, None))
        trainer.train(**kwargs)
        return model, plan

    uninterrupted, plan = run(seed=0)
    resumed, plan_resumed = run(seed=1, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert_params_equal(resumed, uninterrupted, "resumed vs uninterrupted")
    assert_same_diagnostics(plan_resumed, plan)
    if c["policy"] is PSI:
        renormalised = sum(v["psi"]["renormalised_units"] for v in plan.diagnostics().values())
        assert renormalised > 0, "no renormalisation happened: the case does not test the rescaled state"

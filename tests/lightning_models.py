"""The LightningModule both Lightning test files train: TinyBNNet with cross-entropy, knowing nothing
of geomcompile. tests/test_lightning.py applies the plan in its configure_optimizers (gc.apply),
tests/test_integration_lightning.py through the GeomCompile callback."""
from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from .frameworks import LR, TinyBNNet, scale_rows_to_norm


class BNLit(pl.LightningModule):
    """TinyBNNet (seeded; optionally with the conv rows scaled to `row_norm`), plain SGD at lr/momentum."""

    def __init__(self, lr: float = LR, momentum: float = 0.0, seed: int = 0, row_norm: float | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.net = TinyBNNet()
        if row_norm is not None:
            for conv in (self.net.conv1, self.net.conv2):
                scale_rows_to_norm(conv.weight, row_norm)
        self.lr, self.momentum = lr, momentum

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)

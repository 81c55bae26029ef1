"""Capture details the zoo does not reach: in-place ops whose result is not reassigned."""
import torch
from torch import nn
from torch.nn import functional as F

import geomcompile as gc


class InplaceNotReassigned(nn.Module):
    """conv (with bias) -> relu_ on the same tensor, not reassigned -> BN. fx traces this as
    bn(conv(x)) with the relu_ node as a second user of the conv; the ReLU really ran, and with
    the unscaled bias it breaks the invariance, so the analysis must not claim it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        F.relu_(y)
        return self.bn(y).mean((2, 3))


def test_inplace_op_not_reassigned_is_seen_by_the_analysis():
    model = InplaceNotReassigned()
    for inputs in (None, (torch.randn(2, 3, 5, 5),)):
        facts = gc.analyze(model, example_inputs=inputs)["conv.weight"]
        assert facts.scale_invariant is None, "the in-place ReLU between conv and BN was missed"
        assert "relu" in facts.invariance_reason and "bias" in facts.invariance_reason


def test_numerically_the_weight_is_not_invariant():
    torch.manual_seed(0)
    model = InplaceNotReassigned().double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    out = model(x)
    with torch.no_grad():
        model.conv.weight.mul_(torch.tensor([0.2, 3.0, 1.0, 5.0], dtype=torch.float64)[:, None, None, None])
    assert (model(x) - out).abs().max() > 1e-6

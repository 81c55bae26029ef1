"""G-chain precision on random networks (issue 10, design gspace.md §8, §15 test 11): random stacks of
convs, linears and the ops between them (those that keep a per-unit scaling and those that do not:
GELU, tanh, BatchNorm, LayerNorm, residual adds, pooling over features, grouped convs, ...). Every
G-link the analysis claims must survive a random rescaling of its hidden units in float64, with and
without example_inputs. The seeds are fixed, so the test is deterministic."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from geomcompile.analysis import analyze
from tests.test_coupling import _output, _rel_change, _scale_link


class Mean(nn.Module):            # functional spellings: user modules are traced through
    def forward(self, x):
        return x.mean(dim=(-2, -1))


class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class Scale(nn.Module):
    def forward(self, x):
        return x * -1.5


class AvgPoolPad(nn.Module):
    def forward(self, x):
        return F.avg_pool2d(x, 3, stride=1, padding=1)


class PoolFeatures(nn.Module):    # max_pool1d on (N, F) pools over the features: not per unit
    def forward(self, x):
        return F.max_pool1d(x, 2, stride=1, padding=1)[..., : x.shape[-1]]


class Residual(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return x + self.layer(x)


def random_net(rng: random.Random) -> tuple[nn.Module, tuple]:
    """A random image-then-vector stack and its input; shapes stay valid by construction."""
    c, hw = rng.choice([1, 2, 3]), rng.choice([4, 6])
    inputs = (torch.randn(3, c, hw, hw, generator=torch.Generator().manual_seed(rng.randrange(10**6)),
                          dtype=torch.float64),)
    layers, image = [], True
    for _ in range(rng.randint(4, 12)):
        if image:
            op = rng.choice(["conv", "conv", "conv", "relu", "relu", "leaky", "prelu", "gelu", "tanh", "bn",
                             "maxpool", "avgpool", "upsample", "dropout2d", "scale", "identity", "residual",
                             "grouped", "to_vector"])
            if op in ("conv", "grouped"):
                out = rng.choice([2, 3, 4, 6])
                groups = 2 if op == "grouped" and c % 2 == 0 and out % 2 == 0 else 1
                k = rng.choice([1, 3])
                layers.append(nn.Conv2d(c, out, k, padding=k // 2, groups=groups, bias=rng.random() < 0.7))
                c = out
            elif op == "maxpool" and hw >= 2:
                layers.append(nn.MaxPool2d(2))
                hw //= 2
            elif op == "upsample" and hw <= 4:
                layers.append(nn.Upsample(scale_factor=2, mode=rng.choice(["nearest", "bilinear"])))
                hw *= 2
            elif op == "to_vector":
                how = rng.choice(["flatten", "view", "mean", "gap"])
                layers += {"flatten": [nn.Flatten()], "view": [Flatten()], "mean": [Mean()],
                           "gap": [nn.AdaptiveAvgPool2d(1), nn.Flatten()]}[how]
                c = c * hw * hw if how in ("flatten", "view") else c
                image = False
            else:
                layers += _elementwise(op, c, rng, image=True)
        else:
            op = rng.choice(["linear", "linear", "linear", "relu", "relu", "leaky", "gelu", "bn", "ln",
                             "dropout", "scale", "residual", "poolfeatures"])
            if op == "linear":
                out = rng.choice([2, 3, 5, 8])
                layers.append(nn.Linear(c, out, bias=rng.random() < 0.7))
                c = out
            elif op == "poolfeatures":
                layers.append(PoolFeatures())
            else:
                layers += _elementwise(op, c, rng, image=False)
    if image:
        layers.append(nn.Flatten())
        c = c * hw * hw
    layers.append(nn.Linear(c, 2))
    return nn.Sequential(*layers).double(), inputs


def _elementwise(op: str, c: int, rng: random.Random, image: bool) -> list[nn.Module]:
    if op == "residual":
        return [Residual(nn.Conv2d(c, c, 3, padding=1) if image else nn.Linear(c, c))]
    return [{"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.1), "prelu": lambda: nn.PReLU(rng.choice([1, c])),
             "gelu": nn.GELU, "tanh": nn.Tanh, "bn": lambda: nn.BatchNorm2d(c) if image else nn.BatchNorm1d(c),
             "ln": lambda: nn.LayerNorm(c), "avgpool": AvgPoolPad, "dropout2d": lambda: nn.Dropout2d(0.3),
             "dropout": lambda: nn.Dropout(0.3), "scale": Scale, "identity": nn.Identity,
             "maxpool": nn.Identity, "upsample": nn.Identity}[op]()]


N_NETS = 100


@pytest.mark.parametrize("shapes", [True, False], ids=["with_inputs", "without_inputs"])
def test_random_networks_claim_only_symmetries(shapes):
    rng = random.Random(1234)
    claimed, refused = 0, 0
    for i in range(N_NETS):
        torch.manual_seed(i)
        model, inputs = random_net(rng)
        s = analyze(model, inputs if shapes else None)
        links = [(n, f.g_next, f.g_bias, s[f.g_next].g_block) for n, f in s.items() if f.g_next is not None]
        claimed += len(links)
        refused += sum(1 for f in s.values() if f.kind in ("conv", "linear") and f.g_next is None)
        before = _output(model, inputs)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for link in links:
                _scale_link(params, *link, torch.Generator().manual_seed(i))
        change = _rel_change(before, _output(model, inputs))
        assert change < 1e-10, (i, model, links, change)
    # the nets exercise both sides: many links claimed, many refused
    assert claimed >= (90 if shapes else 60) and refused >= 100, (claimed, refused)

"""A zoo of tiny models, each with the facts the analysis should find, derived by hand.

Every entry names a factory, small ``example_inputs`` and EXPECTED: parameter name -> the fields
to check (``kind``, ``out_dim``, ``groups``, ``depthwise``, ``invariant``). ``invariant`` is None
or ``(unit, normalizer)`` / ``("group", normalizer, group_size)``; the normalizer only has to be
contained in ``facts.scale_invariant.normalizer``. Entries with a ``rule`` derive the
expectation of every parameter from its name (ResNets: every conv weight is row-invariant).

The rules the expectations follow (training mode): scaling output channel i of a layer by c > 0
travels through ReLU/LeakyReLU/PReLU, pooling, dropout, flatten, upsampling, cat along channels,
constant scaling, spatial means, permutes, and reshapes that keep the channel a dim of its own;
BatchNorm/InstanceNorm absorb it per row, GroupNorm per group, LayerNorm over the features per
tensor, and a layer that standardises its own weight per filter absorbs it per row at once;
anything else (residual adds, products of tensors, ReLU6/GELU/SiLU/..., slicing, reshapes that
split or mix channels, the model output) breaks it. A layer bias is
harmless only when nothing but max/avg pooling, flatten, identity, cat or constant scaling stands
before a BatchNorm/InstanceNorm. Only ``negative`` lists the weights whose per-row scaling truly
changes the output (a conservative None such as "slice then BN" is not a negative control).

The CLI reads ``tests.models:resnet20``, hence the re-export.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from geomcompile.models import resnet20, small_resnet

__all__ = ["ZOO", "ZooEntry", "resnet20", "small_resnet", "expected_facts"]


# --- expectation helpers ----------------------------------------------------------------------
def row(normalizer: str) -> tuple:
    return ("row", normalizer)


def group(normalizer: str, group_size: int) -> tuple:
    return ("group", normalizer, group_size)


def tensor(normalizer: str) -> tuple:
    return ("tensor", normalizer)


def conv(invariant=None, groups: int = 1, depthwise: bool = False) -> dict:
    return dict(kind="conv", out_dim=0, groups=groups, depthwise=depthwise, invariant=invariant)


def deconv(invariant=None) -> dict:
    return dict(kind="conv_transpose", out_dim=1, groups=1, depthwise=False, invariant=invariant)


def linear(invariant=None) -> dict:
    return dict(kind="linear", out_dim=0, groups=1, depthwise=False, invariant=invariant)


def bias() -> dict:
    return dict(kind="bias", out_dim=0, invariant=None)


def norm() -> dict:
    """Expectations for both the weight and the bias of a normalisation module (see expand)."""
    return {"weight": dict(kind="norm_weight", out_dim=None, invariant=None),
            "bias": dict(kind="norm_bias", out_dim=None, invariant=None)}


def other() -> dict:
    return dict(kind="other", invariant=None)


def expand(spec: dict) -> dict[str, dict]:
    """{"bn1": norm(), "fc.weight": linear()} -> {"bn1.weight": ..., "bn1.bias": ..., "fc.weight": ...}."""
    out: dict[str, dict] = {}
    for name, value in spec.items():
        if "kind" in value:
            out[name] = value
        else:
            out.update({f"{name}.{k}": v for k, v in value.items()})
    return out


@dataclass
class ZooEntry:
    name: str
    factory: Callable[[], nn.Module]
    make_inputs: Callable[[], tuple]
    expected: dict[str, dict]
    rule: Callable[[str], dict | None] | None = None   # expectation from the name, for the rest
    negative: tuple[str, ...] = ()        # weights whose per-row scaling does change the output
    traceable: bool = True                # torch.fx.symbolic_trace works without example_inputs
    shape_dependent: tuple[str, ...] = () # invariance needs shapes (Linear -> BatchNorm1d, ...)

    @property
    def example_inputs(self) -> tuple:
        return self.make_inputs()

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return self.factory()

    def __repr__(self) -> str:
        return f"ZooEntry({self.name})"


def expected_facts(entry: ZooEntry, model: nn.Module) -> dict[str, dict]:
    """EXPECTED completed by the entry's rule, for every parameter name the model has."""
    out = dict(entry.expected)
    if entry.rule is not None:
        for name, _ in model.named_parameters(remove_duplicate=False):
            if name not in out:
                derived = entry.rule(name)
                if derived is not None:
                    out[name] = derived
    return out


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def images(batch: int = 4, channels: int = 3, size: int = 8) -> Callable[[], tuple]:
    return lambda: (_randn(batch, channels, size, size),)


# --- ResNets from the package -----------------------------------------------------------------
def resnet_rule(name: str) -> dict | None:
    """Every conv of a post-activation BN ResNet feeds its BN directly: row-invariant."""
    if m := re.fullmatch(r"(.*)conv(\d)\.weight", name):
        return conv(row(f"{m[1]}bn{m[2]}"))
    if m := re.fullmatch(r"(.*downsample)\.0\.weight", name):
        return conv(row(f"{m[1]}.1"))
    if m := re.fullmatch(r"(.*(?:bn\d|downsample\.1))\.(weight|bias)", name):
        return norm()[m[2]]
    if name == "fc.weight":
        return linear(None)   # reaches the logits
    if name == "fc.bias":
        return bias()
    return None


RESNET20 = ZooEntry(
    "resnet20", resnet20, images(2, 3, 8),
    expected={
        "conv1.weight": conv(row("bn1")),
        "layer1.0.conv1.weight": conv(row("layer1.0.bn1")),
        # conv2 feeds bn2, and it is bn2's output that meets the residual add
        "layer1.0.conv2.weight": conv(row("layer1.0.bn2")),
        "layer2.0.downsample.0.weight": conv(row("layer2.0.downsample.1")),
        "layer3.2.conv2.weight": conv(row("layer3.2.bn2")),
        "bn1.weight": norm()["weight"], "bn1.bias": norm()["bias"],
        "fc.weight": linear(None), "fc.bias": bias(),
    },
    rule=resnet_rule, negative=("fc.weight",))

SMALL_RESNET = ZooEntry(
    "small_resnet", small_resnet, images(4, 1, 8),
    expected={
        "conv1.weight": conv(row("bn1")),
        "layer1.1.conv1.weight": conv(row("layer1.1.bn1")),
        "layer1.1.downsample.0.weight": conv(row("layer1.1.downsample.1")),
        "fc.weight": linear(None),
    },
    rule=resnet_rule, negative=("fc.weight",))


# --- pre-activation ResNet --------------------------------------------------------------------
class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.layer1 = PreActBlock(4, 4)
        self.layer2 = PreActBlock(4, 8, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        out = self.layer2(self.layer1(self.conv1(x)))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1)
        return self.fc(torch.flatten(out, 1))


PREACT = ZooEntry(
    "preact_resnet", PreActResNet, images(),
    expand({
        # the stem reaches layer1.bn1 but also the identity shortcut -> residual add
        "conv1.weight": conv(None),
        "layer1.bn1": norm(), "layer1.bn2": norm(), "layer2.bn1": norm(), "layer2.bn2": norm(), "bn": norm(),
        "layer1.conv1.weight": conv(row("layer1.bn2")),
        "layer1.conv2.weight": conv(None),          # feeds the residual add directly
        "layer2.conv1.weight": conv(row("layer2.bn2")),
        "layer2.conv2.weight": conv(None),
        "layer2.shortcut.weight": conv(None),       # the shortcut is a summand of the add
        "fc.weight": linear(None), "fc.bias": bias(),
    }),
    negative=("conv1.weight", "layer1.conv2.weight", "layer2.shortcut.weight", "fc.weight"))


# --- VGG-11 with and without BN -----------------------------------------------------------------
VGG11_CFG = (4, "M", 8, "M", 8, 8, "M", 8, 8, "M", 8, 8, "M")


class TinyVGG11(nn.Module):
    def __init__(self, batch_norm: bool):
        super().__init__()
        layers, cin = [], 3
        for v in VGG11_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(nn.Conv2d(cin, v, 3, padding=1))   # conv bias on, as in torchvision
                if batch_norm:
                    layers.append(nn.BatchNorm2d(v))
                layers.append(nn.ReLU(inplace=True))
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _vgg11_expected(batch_norm: bool) -> dict[str, dict]:
    spec: dict[str, dict] = {}
    i = 0
    for v in VGG11_CFG:
        if v == "M":
            i += 1
            continue
        # conv(bias) -> BN: the bias is a per-channel constant that BN's mean removes
        spec[f"features.{i}.weight"] = conv(row(f"features.{i + 1}") if batch_norm else None)
        spec[f"features.{i}.bias"] = bias()
        if batch_norm:
            spec[f"features.{i + 1}"] = norm()
        i += 3 if batch_norm else 2
    spec.update({"classifier.0.weight": linear(None), "classifier.0.bias": bias(),
                 "classifier.2.weight": linear(None), "classifier.2.bias": bias()})
    return expand(spec)


VGG11_BN = ZooEntry("vgg11_bn", lambda: TinyVGG11(True), images(2, 3, 32), _vgg11_expected(True),
                    negative=("classifier.0.weight", "classifier.2.weight"))
VGG11 = ZooEntry("vgg11", lambda: TinyVGG11(False), images(2, 3, 32), _vgg11_expected(False),
                 negative=("features.0.weight", "features.8.weight", "classifier.0.weight"))


# --- plain CNN --------------------------------------------------------------------------------
class PlainCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


PLAIN_CNN = ZooEntry(
    "plain_cnn", PlainCNN, images(),
    expand({"conv1.weight": conv(row("bn1")), "bn1": norm(),
            "conv2.weight": conv(None), "conv2.bias": bias(),   # no normalisation after it
            "fc1.weight": linear(None), "fc1.bias": bias(), "fc2.weight": linear(None), "fc2.bias": bias()}),
    negative=("conv2.weight", "fc1.weight", "fc2.weight"))


# --- MLP with BatchNorm1d ---------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(16, 12, bias=bias)
        self.bn1 = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 8, bias=bias)
        self.bn2 = nn.BatchNorm1d(8)
        self.fc3 = nn.Linear(8, 3, bias=bias)

    def forward(self, x):
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.fc3(x)


def _mlp_expected(with_bias: bool) -> dict[str, dict]:
    spec = {"fc1.weight": linear(row("bn1")), "bn1": norm(),   # Linear (2-D output) -> BN1d over features
            "fc2.weight": linear(row("bn2")), "bn2": norm(),
            "fc3.weight": linear(None)}
    if with_bias:   # the bias goes straight into BN, which removes it
        spec.update({"fc1.bias": bias(), "fc2.bias": bias(), "fc3.bias": bias()})
    return expand(spec)


MLP_BIAS = ZooEntry("mlp_bias", lambda: MLP(True), lambda: (_randn(6, 16),), _mlp_expected(True),
                    negative=("fc3.weight",), shape_dependent=("fc1.weight", "fc2.weight"))
MLP_NOBIAS = ZooEntry("mlp_nobias", lambda: MLP(False), lambda: (_randn(6, 16),), _mlp_expected(False),
                      negative=("fc3.weight",), shape_dependent=("fc1.weight", "fc2.weight"))


# --- DenseNet-style block ---------------------------------------------------------------------
class DenseBlockNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 2, 3, padding=1, bias=True)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x0 = self.conv0(x)
        x1 = torch.cat([x0, self.conv1(F.relu(self.bn1(x0)))], dim=1)
        x2 = torch.cat([x1, self.conv2(F.relu(self.bn2(x1)))], dim=1)
        out = F.adaptive_avg_pool2d(F.relu(self.bn3(x2)), 1)
        return self.fc(torch.flatten(out, 1))


DENSENET = ZooEntry(
    "densenet_block", DenseBlockNet, images(),
    expand({
        # conv0 reaches bn1 directly and bn2, bn3 through cat(dim=1): every path is absorbed
        "conv0.weight": conv(row("bn1")),
        "conv1.weight": conv(row("bn2")),       # cat -> bn2 and cat -> cat -> bn3
        "conv2.weight": conv(row("bn3")),       # its bias only passes cat before bn3: harmless
        "conv2.bias": bias(),
        "bn1": norm(), "bn2": norm(), "bn3": norm(),
        "fc.weight": linear(None), "fc.bias": bias(),
    }),
    negative=("fc.weight",))


# --- MobileNetV2 inverted residual ------------------------------------------------------------
class InvertedResidual(nn.Module):
    def __init__(self, channels: int, expand_ratio: int):
        super().__init__()
        hidden = channels * expand_ratio
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.conv(x)


class TinyMobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU6(inplace=True))
        self.block = InvertedResidual(4, 3)
        self.head = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        x = self.head(self.block(self.stem(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


MOBILENETV2 = ZooEntry(
    "mobilenetv2_block", TinyMobileNetV2, images(),
    expand({
        "stem.0.weight": conv(row("stem.1")), "stem.1": norm(),
        "block.conv.0.weight": conv(row("block.conv.1")), "block.conv.1": norm(),
        # depthwise 3x3: groups == in == out == 12, each output channel still goes to its BN
        "block.conv.3.weight": conv(row("block.conv.4"), groups=12, depthwise=True), "block.conv.4": norm(),
        # the projection feeds its BN; it is the BN's output that meets the residual add
        "block.conv.6.weight": conv(row("block.conv.7")), "block.conv.7": norm(),
        "head.0.weight": conv(row("head.1")), "head.1": norm(),
        "classifier.weight": linear(None), "classifier.bias": bias(),
    }),
    negative=("classifier.weight",))


# --- conv -> ReLU -> BN, conv(bias) -> BN, conv(bias) -> maxpool -> BN --------------------------
class ConvReluBN(nn.Module):
    def __init__(self, bias: bool, maxpool: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2) if maxpool else nn.Identity()
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.bn(self.pool(self.relu(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConvBiasBN(nn.Module):
    def __init__(self, maxpool: bool, scale: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
        self.pool = nn.MaxPool2d(2) if maxpool else nn.Identity()
        self.scale = scale          # != 1: the bias reaches the BN multiplied by it
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.pool(self.conv(x))
        if self.scale != 1.0:
            x = x * self.scale
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


_head = {"bn": norm(), "fc.weight": linear(None), "fc.bias": bias()}
CONV_RELU_BN = ZooEntry("conv_relu_bn", lambda: ConvReluBN(False), images(),
                        expand({"conv.weight": conv(row("bn")), **_head}), negative=("fc.weight",))
CONV_RELU_MAXPOOL_BN = ZooEntry(
    "conv_relu_maxpool_bn", lambda: ConvReluBN(False, maxpool=True), images(),
    # ReLU and max pooling are positively homogeneous; without a bias nothing else reaches the BN
    expand({"conv.weight": conv(row("bn")), **_head}), negative=("fc.weight",))
CONV_BIAS_RELU_BN = ZooEntry(
    "conv_bias_relu_bn", lambda: ConvReluBN(True), images(),
    # ReLU(c*z + b) != c*ReLU(z + b/c): the ReLU sees the unscaled bias before BN
    expand({"conv.weight": conv(None), "conv.bias": bias(), **_head}),
    negative=("conv.weight", "fc.weight"))
CONV_BIAS_BN = ZooEntry("conv_bias_bn", lambda: ConvBiasBN(False), images(),
                        expand({"conv.weight": conv(row("bn")), "conv.bias": bias(), **_head}),
                        negative=("fc.weight",))
CONV_BIAS_MAXPOOL_BN = ZooEntry(
    "conv_bias_maxpool_bn", lambda: ConvBiasBN(True), images(),
    # max(c*z + b) = c*max(z) + b per channel: the bias stays a per-channel constant for BN
    expand({"conv.weight": conv(row("bn")), "conv.bias": bias(), **_head}),
    negative=("fc.weight",))


# --- GroupNorm --------------------------------------------------------------------------------
class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(4, 8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=True)
        self.gn3 = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.gn2(self.conv2(x)))
        x = F.relu(self.gn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


GROUPNORM = ZooEntry(
    "groupnorm", GroupNormNet, images(),
    expand({
        "conv1.weight": conv(group("gn1", 4)),   # 8 channels / 2 groups
        "conv2.weight": conv(group("gn2", 2)),   # 8 channels / 4 groups
        # GN normalises a group with one mean: a bias that differs per channel is not removed
        "conv3.weight": conv(None), "conv3.bias": bias(),
        "gn1": norm(), "gn2": norm(), "gn3": norm(), "fc.weight": linear(None), "fc.bias": bias(),
    }),
    # per-row scaling breaks a group-invariant weight too: the unit must not be finer than "group"
    negative=("conv1.weight", "conv3.weight", "fc.weight"))


# --- one BatchNorm module applied to two convolutions ----------------------------------------
class SharedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = F.relu(self.bn(self.conv_a(x)))
        b = F.relu(self.bn(self.conv_b(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(a, 1) + F.adaptive_avg_pool2d(b, 1), 1))


SHARED_NORM = ZooEntry(
    "shared_norm", SharedNorm, images(),
    # in training mode each call normalises its own batch, so both convs are absorbed by bn
    # (its running statistics, however, mix the two calls)
    expand({"conv_a.weight": conv(row("bn")), "conv_b.weight": conv(row("bn")), **_head}),
    negative=("fc.weight",))


# --- transformer block ------------------------------------------------------------------------
class TinyTransformer(nn.Module):
    def __init__(self, d_in: int = 6, d: int = 8):
        super().__init__()
        self.embed = nn.Linear(d_in, d, bias=False)
        self.ln_in = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.ln2 = nn.LayerNorm(d)
        self.pre = nn.Linear(d, d)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)
        self.scale = 1.0 / math.sqrt(d)

    def forward(self, x):                                   # x: (batch, tokens, d_in)
        x = self.ln_in(self.embed(x))
        att = (self.q(x) @ self.k(x).transpose(-2, -1) * self.scale).softmax(dim=-1)
        x = x + self.proj(att @ self.v(x))
        x = self.ln1(x)
        x = self.ln2(x + self.fc2(F.gelu(self.fc1(x))))
        x = self.ln_f(self.pre(x))
        return self.head(x.mean(dim=1))


TRANSFORMER = ZooEntry(
    "transformer_block", TinyTransformer, lambda: (_randn(2, 5, 6),),
    expand({
        "embed.weight": linear(tensor("ln_in")),   # bias-free Linear -> LayerNorm over its features
        "ln_in": norm(), "ln1": norm(), "ln2": norm(), "ln_f": norm(),
        "q.weight": linear(None), "q.bias": bias(),   # q @ k^T: product of two tensors
        "k.weight": linear(None), "k.bias": bias(),
        "v.weight": linear(None), "v.bias": bias(),   # att @ v
        "proj.weight": linear(None), "proj.bias": bias(),   # feeds the residual add
        "fc1.weight": linear(None), "fc1.bias": bias(),     # GELU
        "fc2.weight": linear(None), "fc2.bias": bias(),     # residual add
        "pre.weight": linear(None), "pre.bias": bias(),     # LN(c*Wx + b) != LN(Wx + b)
        "head.weight": linear(None), "head.bias": bias(),
    }),
    negative=("embed.weight", "v.weight", "proj.weight", "fc1.weight", "pre.weight", "head.weight"))


# --- ConvTranspose decoder --------------------------------------------------------------------
class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.up1 = nn.ConvTranspose2d(8, 4, 2, stride=2, bias=True)    # weight (in=8, out=4, 2, 2)
        self.bn1 = nn.BatchNorm2d(4)
        self.up2 = nn.ConvTranspose2d(4, 4, 2, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.out = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.bn0(self.enc(x)))          # 8x8 -> 4x4
        x = F.relu(self.bn1(self.up1(x)))          # -> 8x8
        x = F.relu(self.bn2(self.up2(x)))          # -> 16x16
        return self.out(x)


DECODER = ZooEntry(
    "convtranspose_decoder", Decoder, images(),
    expand({
        "enc.weight": conv(row("bn0")), "bn0": norm(),
        "up1.weight": deconv(row("bn1")), "up1.bias": bias(), "bn1": norm(),   # bias -> BN: removed
        "up2.weight": deconv(row("bn2")), "bn2": norm(),
        "out.weight": conv(None), "out.bias": bias(),
    }),
    negative=("out.weight",))


# --- functional spellings ---------------------------------------------------------------------
class FunctionalSpellings(nn.Module):
    def __init__(self):
        super().__init__()
        for i in range(1, 8):
            setattr(self, f"conv{i}", nn.Conv2d(3 if i == 1 else 4, 4, 3, padding=1, bias=False))
        for i in range(1, 6):
            setattr(self, f"bn{i}", nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = self.bn1(F.relu(self.conv1(x), inplace=True))
        b = self.bn2(torch.relu_(self.conv2(a)))
        c = self.bn3(self.conv3(b).relu() * 0.5)
        d = self.bn4(F.leaky_relu(self.conv4(c), 0.1) / 2.0)
        e = self.conv5(d)
        e += d
        f = torch.add(e, self.conv6(e))
        g = self.bn5(f + self.conv7(f))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(g, 1), 1))


FUNCTIONAL = ZooEntry(
    "functional_spellings", FunctionalSpellings, images(),
    expand({
        "conv1.weight": conv(row("bn1")),   # F.relu(inplace=True)
        "conv2.weight": conv(row("bn2")),   # torch.relu_
        "conv3.weight": conv(row("bn3")),   # x.relu() * 0.5
        "conv4.weight": conv(row("bn4")),   # F.leaky_relu / 2.0
        "conv5.weight": conv(None),         # e += d (residual)
        "conv6.weight": conv(None),         # torch.add(e, conv6(e)); conv5 also reaches this add
        "conv7.weight": conv(None),         # f + conv7(f)
        **{f"bn{i}": norm() for i in range(1, 6)},
        "fc.weight": linear(None), "fc.bias": bias(),
    }),
    negative=("conv5.weight", "conv6.weight", "conv7.weight", "fc.weight"))


# --- a module used twice ----------------------------------------------------------------------
class SharedConv(nn.Module):
    def __init__(self, both_normalized: bool):
        super().__init__()
        self.both_normalized = both_normalized
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4) if both_normalized else None
        self.fc = nn.Linear(4, 3)

    def forward(self, x, y):
        a = F.relu(self.bn_a(self.conv(x)))
        b = self.conv(y)
        if self.bn_b is not None:
            b = F.relu(self.bn_b(b))
        out = F.adaptive_avg_pool2d(a, 1) + F.adaptive_avg_pool2d(b, 1)
        return self.fc(torch.flatten(out, 1))


def _two_images() -> tuple:
    return (_randn(4, 3, 8, 8, seed=0), _randn(4, 3, 8, 8, seed=1))


SHARED_BOTH_BN = ZooEntry(
    "shared_conv_both_bn", lambda: SharedConv(True), _two_images,
    expand({"conv.weight": {**conv(row("bn_a")), "uses": 2},   # both uses reach a BN
            "bn_a": norm(), "bn_b": norm(),
            "fc.weight": linear(None), "fc.bias": bias()}),
    negative=("fc.weight",))
SHARED_ONE_OUTPUT = ZooEntry(
    "shared_conv_one_output", lambda: SharedConv(False), _two_images,
    # the second use reaches the output unnormalised
    expand({"conv.weight": {**conv(None), "uses": 2}, "bn_a": norm(),
            "fc.weight": linear(None), "fc.bias": bias()}),
    negative=("conv.weight", "fc.weight"))


# --- tied weights -----------------------------------------------------------------------------
class TiedConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(4)
        self.conv_a = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.conv_b.weight = self.conv_a.weight     # two attributes, one nn.Parameter
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn_a(self.conv_a(x)))
        x = F.relu(self.bn_b(self.conv_b(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


TIED = ZooEntry(
    "tied_weights", TiedConvs, images(),
    expand({"stem.weight": conv(row("bn0")), "bn0": norm(),
            # listed once (as conv_a.weight, conv_b.weight an alias); both uses reach a BN
            "conv_a.weight": {**conv(row("bn_a")), "aliases": ("conv_b.weight",), "uses": 2},
            "bn_a": norm(), "bn_b": norm(),
            "fc.weight": linear(None), "fc.bias": bias()}),
    negative=("fc.weight",))


# --- data-dependent control flow --------------------------------------------------------------
class DataDependentRouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:        # data-dependent: torch.fx cannot trace this
            return self.a(x)
        return self.b(x)


class DataDependentNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.router = DataDependentRouter()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.router(F.relu(self.bn(self.stem(x))))   # ReLU output: sum > 0, branch a is taken
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


DATA_DEPENDENT = ZooEntry(
    "data_dependent", DataDependentNet, images(),
    expand({"stem.weight": conv(row("bn")), "bn": norm(),
            "router.a.0.weight": conv(row("router.a.1")), "router.a.1": norm(),
            "router.b.0.weight": conv(None), "router.b.1": norm(),   # branch not taken: not reached
            "fc.weight": linear(None), "fc.bias": bias()}),
    negative=("fc.weight",), traceable=False)


# --- sliced / permuted outputs ----------------------------------------------------------------
class SlicedPermuted(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.bn1(self.conv1(x)[:, :4])                                 # channel slice
        g = self.ln(self.conv2(F.relu(h)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)   # ConvNeXt-style
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(g), 1), 1))


SLICED = ZooEntry(
    "sliced_permuted", SlicedPermuted, images(),
    # conv1 is in fact invariant, but slicing is outside the rules: None (conservative); a permute
    # moves the channel dim without mixing it, so the LayerNorm over channels absorbs conv2 per tensor
    expand({"conv1.weight": conv(None), "bn1": norm(), "conv2.weight": conv(tensor("ln")), "ln": norm(),
            "fc.weight": linear(None), "fc.bias": bias()}),
    negative=("fc.weight",))


# --- Linear -> GELU -> BN ---------------------------------------------------------------------
class LinearGeluBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.bn(F.gelu(self.fc1(x))))


LINEAR_GELU_BN = ZooEntry(
    "linear_gelu_bn", LinearGeluBN, lambda: (_randn(6, 16),),
    expand({"fc1.weight": linear(None),   # GELU(c*z) != c*GELU(z)
            "bn": norm(), "fc2.weight": linear(None), "fc2.bias": bias()}),
    negative=("fc1.weight", "fc2.weight"))


# --- dropout between conv and BN --------------------------------------------------------------
class DropoutBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.drop = nn.Dropout(0.3)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.drop(self.conv1(x))))
        x = F.relu(self.bn2(F.dropout(self.conv2(x), 0.25, self.training)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


DROPOUT = ZooEntry(
    "dropout_between", DropoutBetween, images(),
    expand({"conv1.weight": conv(row("bn1")), "bn1": norm(),
            # the random mask multiplies the unscaled bias: no longer a per-channel constant
            "conv2.weight": conv(None), "conv2.bias": bias(), "bn2": norm(),
            "fc.weight": linear(None), "fc.bias": bias()}),
    negative=("conv2.weight", "fc.weight"))


# --- ops that pass a scaling on ---------------------------------------------------------------
class PassThroughOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.prelu = nn.PReLU()
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=True)
        self.pool = nn.AvgPool2d(2)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.lrelu = nn.LeakyReLU(0.2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.bn3 = nn.BatchNorm2d(4)
        self.conv4 = nn.Conv2d(4, 4, 3, padding=1, bias=True)
        self.bn4 = nn.BatchNorm1d(16)
        self.conv5 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn5 = nn.BatchNorm1d(4)
        self.fc = nn.Linear(20, 3)

    def forward(self, x):
        h = self.bn1(self.prelu(self.conv1(x)))
        h = self.bn2(self.pool(self.conv2(h)))                     # 8x8 -> 4x4
        h = self.bn3(self.up(self.lrelu(self.conv3(h))))           # 4x4 -> 8x8
        a = self.bn4(torch.flatten(F.adaptive_avg_pool2d(self.conv4(h), 2), 1))   # channel -> 4 features
        b = self.bn5(F.relu(self.conv5(h)).mean(dim=(2, 3)))
        return self.fc(torch.cat([F.relu(a), F.relu(b)], dim=1))


PASS_THROUGH = ZooEntry(
    "pass_through_ops", PassThroughOps, images(),
    expand({
        "conv1.weight": conv(row("bn1")), "prelu.weight": other(), "bn1": norm(),
        "conv2.weight": conv(row("bn2")), "conv2.bias": bias(), "bn2": norm(),  # avg pool, no padding
        "conv3.weight": conv(row("bn3")), "bn3": norm(),                        # LeakyReLU, upsample
        # adaptive pool + flatten: channel i becomes features 4i..4i+3, each normalised by bn4
        "conv4.weight": conv(row("bn4")), "conv4.bias": bias(), "bn4": norm(),
        "conv5.weight": conv(row("bn5")), "bn5": norm(),                        # spatial mean
        "fc.weight": linear(None), "fc.bias": bias(),
    }),
    negative=("fc.weight",), shape_dependent=("conv4.weight",))


# --- ops that break it ------------------------------------------------------------------------
class BreakingOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.relu6 = nn.ReLU6()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.conv4 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.conv5 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.conv6 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.conv7 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(6))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.bns[0](self.relu6(self.conv1(x)))
        h = self.bns[1](F.silu(self.conv2(h)))
        h = self.bns[2](torch.tanh(self.conv3(h)))
        h = self.bns[3](F.hardswish(self.conv4(h)))
        h = self.bns[4](F.elu(self.conv5(h)))
        h = self.bns[5](self.conv6(h) * torch.sigmoid(self.conv7(h)))   # gating: product of tensors
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


BREAKING = ZooEntry(
    "breaking_ops", BreakingOps, images(),
    expand({
        **{f"conv{i}.weight": conv(None) for i in range(1, 8)},
        **{f"bns.{i}": norm() for i in range(6)},
        "fc.weight": linear(None), "fc.bias": bias(),
    }),
    # conv1 (ReLU6 clips only values above 6) and conv6 (the gate multiplies channel i by a tensor,
    # so BN still absorbs c_i) may well be invariant numerically; the rules leave them None, so
    # they are no negative controls
    negative=("conv2.weight", "conv3.weight", "conv4.weight", "conv5.weight", "conv7.weight"))


# --- InstanceNorm and a 1-d conv --------------------------------------------------------------
class InstanceNormConv1d(nn.Module):
    def __init__(self, track_running_stats: bool = False):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 4, 3, padding=1, bias=True)
        self.inorm = nn.InstanceNorm1d(4, affine=True, track_running_stats=track_running_stats)
        self.conv2 = nn.Conv1d(4, 6, 3, padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):                       # x: (batch, 3, length)
        x = F.relu(self.inorm(self.conv1(x)))   # bias -> InstanceNorm: removed with the mean
        x = F.relu(self.bn(self.conv2(x)))
        return self.fc(x.mean(dim=2))


INSTANCENORM = ZooEntry(
    "instancenorm_conv1d", InstanceNormConv1d, lambda: (_randn(4, 3, 10),),
    expand({"conv1.weight": conv(row("inorm")), "conv1.bias": bias(), "inorm": norm(),
            # grouped (2 groups of 2 -> 3), not depthwise
            "conv2.weight": conv(row("bn"), groups=2, depthwise=False), "bn": norm(),
            "fc.weight": linear(None), "fc.bias": bias()}),
    negative=("fc.weight",))


ZOO: list[ZooEntry] = [
    RESNET20, SMALL_RESNET, PREACT, VGG11_BN, VGG11, PLAIN_CNN, MLP_BIAS, MLP_NOBIAS, DENSENET,
    MOBILENETV2, CONV_RELU_BN, CONV_RELU_MAXPOOL_BN, CONV_BIAS_RELU_BN, CONV_BIAS_BN, CONV_BIAS_MAXPOOL_BN,
    GROUPNORM, TRANSFORMER, DECODER, FUNCTIONAL, SHARED_BOTH_BN, SHARED_ONE_OUTPUT, SHARED_NORM, TIED,
    DATA_DEPENDENT, SLICED, LINEAR_GELU_BN, DROPOUT, PASS_THROUGH, BREAKING, INSTANCENORM,
]


# --- issue 17: analysis robustness on real model code -----------------------------------------
# Attribute reads of a weight (Hugging Face: `hidden.to(self.proj.weight.dtype)`): no values flow,
# so the conv / linear keep their layout and invariance.
class WeightAttributeReads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.proj = nn.Linear(4, 6, bias=False)
        self.bn1d = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = x.to(self.conv.weight.dtype).to(self.conv.weight.device)
        h = F.relu(self.bn(self.conv(x)))
        h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        h = h.to(dtype=self.proj.weight.dtype, device=self.fc.weight.device)
        return self.fc(F.relu(self.bn1d(self.proj(h))))


WEIGHT_ATTRIBUTE_READS = ZooEntry(
    "weight_attribute_reads", WeightAttributeReads, images(),
    expand({"conv.weight": conv(row("bn")), "bn": norm(),
            "proj.weight": linear(row("bn1d")), "bn1d": norm(),
            "fc.weight": linear(None), "fc.bias": bias()}),
    negative=("fc.weight",), shape_dependent=("proj.weight",))


# Weights handed to a function torch.fx does not trace into (torchvision's Swin attention is a
# torch.fx.wrap-ped `shifted_window_attention(x, qkv_weight, proj_weight, ...)`), and to a leaf
# module the analysis does not look inside (nn.MultiheadAttention).
def window_attention(x: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
                     qkv_bias: torch.Tensor, proj_bias: torch.Tensor) -> torch.Tensor:
    q, k, v = F.linear(x, qkv_weight, qkv_bias).chunk(3, dim=-1)
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return F.linear(attn @ v, proj_weight, proj_bias)


torch.fx.wrap("window_attention")


class WrappedAttention(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mha = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):                       # x: (batch, tokens, dim)
        x = x + window_attention(x, self.qkv.weight, self.proj.weight, self.qkv.bias, self.proj.bias)
        x = x + self.mha(x, x, x, need_weights=False)[0]
        return self.head(x.mean(dim=1))


WRAPPED_ATTENTION = ZooEntry(
    "wrapped_attention", WrappedAttention, lambda: (_randn(2, 4, 8),),
    expand({"qkv.weight": other(), "qkv.bias": other(), "proj.weight": other(), "proj.bias": other(),
            "mha.in_proj_weight": other(), "mha.in_proj_bias": other(),
            "mha.out_proj.weight": other(), "mha.out_proj.bias": other(),
            "head.weight": linear(None), "head.bias": bias()}),
    negative=("head.weight",))


# A head shared over the levels of a feature pyramid (FPN / RPN / RetinaNet): one conv run at
# several input sizes.
class SharedHeadFPN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False)
        self.head = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        p3 = F.relu(self.bn(self.stem(x)))      # 8x8
        p4 = self.down(p3)                      # 4x4
        outs = [self.head(p) for p in (p3, p4)]
        return torch.cat([o.flatten(1) for o in outs], dim=1)


SHARED_HEAD_FPN = ZooEntry(
    "shared_head_fpn", SharedHeadFPN, images(),
    expand({"stem.weight": conv(row("bn")), "bn": norm(), "down.weight": conv(None),
            "head.weight": conv(None), "head.bias": bias()}),
    negative=("down.weight", "head.weight"))


# A plain VGG-style network: no normalisation anywhere (the fgsgd policy's hard case).
class PlainVGG(nn.Module):
    def __init__(self, cfg=(32, "M", 64, "M", 64, 64, "M", 128, 128, "M"), classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(cin, 64), nn.ReLU(inplace=True), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def _plain_vgg_expected() -> dict[str, dict]:
    spec = {f"features.{i}.weight": conv(None) for i in (0, 3, 6, 8, 11, 13)}
    spec.update({f"features.{i}.bias": bias() for i in (0, 3, 6, 8, 11, 13)})
    spec.update({"classifier.0.weight": linear(None), "classifier.0.bias": bias(),
                 "classifier.2.weight": linear(None), "classifier.2.bias": bias()})
    return spec


PLAIN_VGG = ZooEntry("plain_vgg", PlainVGG, images(2, 3, 16), _plain_vgg_expected(),
                     negative=("features.0.weight", "classifier.0.weight"))

ZOO += [WEIGHT_ATTRIBUTE_READS, WRAPPED_ATTENTION, SHARED_HEAD_FPN, PLAIN_VGG]


# --- normalisation over flattened tokens (LeViT-style Linear -> flatten(0, 1) -> BatchNorm1d) -----
class LinearTokenBN(nn.Module):
    """LeViT's LinearNorm: BN1d over the features of every token of every sample."""

    def __init__(self, n_in: int, n_out: int, bias: bool = False):
        super().__init__()
        self.c = nn.Linear(n_in, n_out, bias=bias)
        self.bn = nn.BatchNorm1d(n_out)
        if bias:
            nn.init.uniform_(self.c.bias, 0.5, 1.5)   # non-zero: BN must remove it

    def forward(self, x):
        x = self.c(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class TokenBNNet(nn.Module):
    """Tokens (B, T=4, 8). Batch and token dims are merged, moved or regrouped around features that
    stay a dim of their own: every such layer is row-invariant. Two reshapes that do mix features
    with tokens, or split them, are negative controls."""

    def __init__(self):
        super().__init__()
        self.qkv = LinearTokenBN(8, 12, bias=True)            # flatten(0, 1): bias removed by BN
        self.proj = LinearTokenBN(12, 8)
        self.mlp = nn.Linear(8, 8, bias=False)                 # transpose(1, 2) -> BN1d over (B, C, T)
        self.bn_t = nn.BatchNorm1d(8)
        self.pw = nn.Conv2d(8, 8, 1, bias=False)               # conv-as-linear on a 2x2 token grid
        self.bn_pw = nn.BatchNorm1d(8)
        self.view = nn.Linear(8, 8, bias=False)                # (B*T, 8).view(B, T, 8) -> permute -> BN1d
        self.bn_view = nn.BatchNorm1d(8)
        self.split = nn.Linear(8, 8, bias=False)               # (B*T, 8) -> (2*B*T, 4): splits features
        self.bn_split = nn.BatchNorm1d(4)
        self.mix = nn.Linear(8, 8, bias=False)                 # (B, T, 8) -> (B, 8, T) by reshape: mixes
        self.bn_mix = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        b, t, c = x.shape
        h = F.relu(self.proj(F.relu(self.qkv(x))))
        h = F.relu(self.bn_t(self.mlp(h).transpose(1, 2)).transpose(1, 2))
        g = self.pw(h.transpose(1, 2).reshape(b, c, 2, 2))             # (B, 8, 2, 2)
        h = F.relu(self.bn_pw(g.flatten(2).transpose(1, 2).flatten(0, 1))).view(b, t, c)
        v = self.view(h.reshape(b * t, c)).view(b, t, c).permute(0, 2, 1)
        h = F.relu(self.bn_view(v)).permute(0, 2, 1)
        s = F.relu(self.bn_split(self.split(h).reshape(-1, 4))).reshape(b, t, c)
        m = F.relu(self.bn_mix(self.mix(s).reshape(b, c, t)))
        return self.head(m.mean(dim=2))


TOKEN_BN = ZooEntry(
    "token_bn", TokenBNNet, lambda: (_randn(3, 4, 8),),
    expand({
        "qkv.c.weight": linear(row("qkv.bn")), "qkv.c.bias": bias(), "qkv.bn": norm(),
        "proj.c.weight": linear(row("proj.bn")), "proj.bn": norm(),
        "mlp.weight": linear(row("bn_t")), "bn_t": norm(),
        "pw.weight": conv(row("bn_pw")), "bn_pw": norm(),
        "view.weight": linear(row("bn_view")), "bn_view": norm(),
        "split.weight": linear(None), "bn_split": norm(),   # BN channel j sees features j and j + 4
        "mix.weight": linear(None), "bn_mix": norm(),       # BN channel j sees tokens and features mixed
        "head.weight": linear(None), "head.bias": bias(),
    }),
    negative=("split.weight", "mix.weight", "head.weight"),
    # a Linear's output rank, and so where its features are, needs shapes (pw's conv output does not)
    shape_dependent=("qkv.c.weight", "proj.c.weight", "mlp.weight", "view.weight"))


# --- transposed-linear layers (Hugging Face Conv1D, x @ W, F.linear(x, W.t())) --------------------
class HFConv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D, spelled as it ships: weight (in, out), y = x @ W + b."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.rand(nf) + 0.5)        # random, non-zero

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class TransposedLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = HFConv1D(12, 8)
        self.bn1 = nn.BatchNorm1d(12)
        self.w_mm = nn.Parameter(torch.randn(12, 8) * 0.3)    # h @ W
        self.bn2 = nn.BatchNorm1d(8)
        self.w_t = nn.Parameter(torch.randn(8, 6) * 0.3)      # F.linear(h, W.t())
        self.bn3 = nn.BatchNorm1d(6)
        self.c_proj = HFConv1D(3, 6)

    def forward(self, x):                                     # x: (B, T, 8)
        h = self.c_fc(x)
        h = F.relu(self.bn1(h.flatten(0, 1)).reshape_as(h))
        h = F.relu(self.bn2((h @ self.w_mm).transpose(1, 2))).transpose(1, 2)
        h = F.linear(h, self.w_t.t())
        h = F.relu(self.bn3(h.reshape(-1, 6))).reshape_as(h)
        return self.c_proj(h).mean(dim=1)


def tlinear(invariant=None) -> dict:
    """A linear layer whose weight is stored (in, out): out_dim 1."""
    return dict(kind="linear", out_dim=1, groups=1, depthwise=False, invariant=invariant)


TRANSPOSED_LINEAR = ZooEntry(
    "transposed_linear", TransposedLinears, lambda: (_randn(3, 4, 8),),
    expand({
        "c_fc.weight": tlinear(row("bn1")), "c_fc.bias": bias(), "bn1": norm(),
        "w_mm": tlinear(row("bn2")), "bn2": norm(),
        "w_t": tlinear(row("bn3")), "bn3": norm(),
        "c_proj.weight": tlinear(None), "c_proj.bias": bias(),
    }),
    negative=("c_proj.weight",), shape_dependent=("c_fc.weight", "w_mm", "w_t"))

ZOO.extend([TOKEN_BN, TRANSPOSED_LINEAR])


# --- weight standardisation (NFNets' ScaledStdConv2d / StdConv2d, BiT's StdConv2d) ---------------
class ScaledStdConv2d(nn.Conv2d):
    """timm's ScaledStdConv2d as it ships (static padding): per-filter batch_norm of the weight,
    times a learnable gain. eps is an argument: the numerical check passes a tiny one."""

    def __init__(self, in_ch, out_ch, k, padding=0, bias=True, gamma=1.0, eps=1e-6):
        super().__init__(in_ch, out_ch, k, padding=padding, bias=bias)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)   # random, non-zero
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps
        if bias:
            nn.init.uniform_(self.bias, 0.5, 1.5)

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            weight=(self.gain * self.scale).view(-1), training=True, momentum=0., eps=self.eps
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class WSConv2d(nn.Conv2d):
    """The other spellings of a standardised conv; 'wrong_dims' and 'centred' are negative controls."""

    def __init__(self, in_ch, out_ch, k, spelling: str, eps: float = 1e-12):
        super().__init__(in_ch, out_ch, k, padding=k // 2, bias=True)
        self.spelling, self.eps = spelling, eps
        nn.init.uniform_(self.bias, -1.0, 1.0)

    def forward(self, x):
        w = self.weight
        if self.spelling == "var_mean":          # BiT's StdConv2d
            v, m = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
            w = (w - m) / torch.sqrt(v + self.eps)
        elif self.spelling == "timm_std":        # timm's StdConv2d: batch_norm without a gain
            w = F.batch_norm(w.reshape(1, self.out_channels, -1), None, None, training=True,
                             momentum=0., eps=self.eps).reshape_as(w)
        elif self.spelling == "arithmetic":      # mean / var by hand, rsqrt, then a gain
            centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
            w = centred * torch.rsqrt(w.var(dim=(1, 2, 3), keepdim=True) + self.eps) * 0.7
        elif self.spelling == "layer_norm":      # F.layer_norm over the whole filter
            w = F.layer_norm(w, w.shape[1:], eps=self.eps)
        elif self.spelling == "wrong_dims":      # standardised over the filters, not within each
            w = (w - w.mean(dim=0, keepdim=True)) / w.std(dim=0, keepdim=True)
        elif self.spelling == "centred":         # mean removed, scale kept
            w = w - w.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


class WSLinear(nn.Linear):
    def __init__(self, n_in, n_out, eps: float = 1e-12):
        super().__init__(n_in, n_out)
        self.eps = eps

    def forward(self, x):
        s, m = torch.std_mean(self.weight, dim=1, keepdim=True)
        return F.linear(x, (self.weight - m) / (s + self.eps), self.bias)


class NFNet(nn.Module):
    """No normalisation of activations anywhere: GELU, residual adds, a head. Every standardised
    layer is row-invariant on its own; the two look-alikes are not."""

    def __init__(self, eps: float = 1e-12):
        super().__init__()
        self.stem = ScaledStdConv2d(3, 8, 3, padding=1, eps=eps)
        self.conv1 = WSConv2d(8, 8, 3, "timm_std")
        self.conv2 = WSConv2d(8, 8, 3, "var_mean")
        self.conv3 = WSConv2d(8, 8, 1, "arithmetic")
        self.conv4 = WSConv2d(8, 8, 3, "layer_norm")
        self.wrong = WSConv2d(8, 8, 1, "wrong_dims")
        self.centred = WSConv2d(8, 8, 1, "centred")
        self.fc = WSLinear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = F.gelu(self.stem(x))
        h = h + 0.2 * F.gelu(self.conv2(F.gelu(self.conv1(h))))
        h = F.silu(self.conv3(h)) + h
        h = F.gelu(self.centred(F.gelu(self.wrong(self.conv4(h)))))
        h = F.gelu(self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1)))
        return self.head(h)


def _standardized(kind_facts: dict) -> dict:
    return {**kind_facts, "uses": 1}


NFNET = ZooEntry(
    "nfnet_weight_standardisation", lambda: NFNet(eps=1e-12), images(),
    {
        "stem.weight": conv(row("stem")), "stem.bias": bias(), "stem.gain": other(),
        **{f"conv{i}.weight": conv(row(f"conv{i}")) for i in range(1, 5)},
        **{f"conv{i}.bias": bias() for i in range(1, 5)},
        # not recognised as standardisation: consumed through arithmetic, so kind "other"
        "wrong.weight": other(), "wrong.bias": bias(),
        "centred.weight": other(), "centred.bias": bias(),
        "fc.weight": linear(row("fc")), "fc.bias": bias(),
        "head.weight": linear(None), "head.bias": bias(),
    },
    negative=("wrong.weight", "centred.weight", "head.weight"))

ZOO.extend([NFNET])


# --- architecture-sized toys for the shipped policies (issue 18) --------------------------------
# The layer layout of the real networks (ResNet-50: bottlenecks [3, 4, 6, 3] with 1x1 convs and
# 1x1 downsamples, 53 conv weights; DenseNet-121: dense layers [6, 12, 24, 16] of BN-ReLU-1x1 and
# BN-ReLU-3x3 convs, 1x1 transitions, 120 conv weights), with tiny widths so that they analyse in
# a second. The policy tests count warnings on them.
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50Style(nn.Module):
    def __init__(self, width: int = 4, blocks=(3, 4, 6, 3), classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)    # 64 -> 64 * 4: layer1 downsamples too
        self.bn1 = nn.BatchNorm2d(width)
        in_ch, layers = width, []
        for i, n in enumerate(blocks):
            w = width * 2 ** i
            stage = []
            for j in range(n):
                stage.append(Bottleneck(in_ch, w, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = w * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(in_ch, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseLayer(nn.Module):
    def __init__(self, in_ch: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))], dim=1)


class DenseNetStyle(nn.Module):
    """DenseNet-121's layout: every conv reaches a BatchNorm (directly, or through cat/avg-pool)."""

    def __init__(self, growth: int = 2, bn_size: int = 2, blocks=(6, 12, 24, 16), classes: int = 10):
        super().__init__()
        ch = 2 * growth
        self.conv0 = nn.Conv2d(3, ch, 3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(ch)
        stages = []
        for i, n in enumerate(blocks):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(ch, growth, bn_size))
                ch += growth
            if i < len(blocks) - 1:
                layers += [nn.BatchNorm2d(ch), nn.ReLU(), nn.Conv2d(ch, ch // 2, 1, bias=False), nn.AvgPool2d(2)]
                ch //= 2
            stages.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*stages)
        self.norm5 = nn.BatchNorm2d(ch)
        self.classifier = nn.Linear(ch, classes)

    def forward(self, x):
        x = self.features(F.relu(self.norm0(self.conv0(x))))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.norm5(x)), 1), 1))


class FullyConvNet(nn.Module):
    """A fully convolutional BN network (no linear layer): segmentation-style 1x1 conv head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.head(F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))))


# --- issue 10 (G-SGD coupling analysis): the design's nets and one model per refusal -------------
# G-chains (design gspace.md §8): conv / linear layers joined only by unary per-channel positively
# homogeneous ops. GEntry.chains lists the chains the analysis must find (weight names, in order);
# reasons maps a weight to a piece of its g_reason (why its chain ends there).
class GMLP(nn.Module):
    """Linear + ReLU stack on `widths` (e.g. (3, 5, 4, 2)); the last layer has no ReLU."""

    def __init__(self, widths=(3, 5, 4, 2), bias: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class GTinyCNN(nn.Module):
    """conv 1->3 (3x3), ReLU, maxpool 2, conv 3->4 (3x3, padding 1), ReLU, flatten, fc 16->2, on 1x6x6
    inputs (g_tiny_cnn_inputs): the flatten block is (C, S) = (4, 2*2)."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, bias=bias)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.fc = nn.Linear(16, 2, bias=bias)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return self.fc(torch.flatten(F.relu(self.conv2(x)), 1))


def g_tiny_cnn_inputs(batch: int = 2) -> tuple:
    return (_randn(batch, 1, 6, 6, seed=1),)


class GResidualToy(nn.Module):
    """A stem conv, a BasicBlock without BN (conv1 -> ReLU -> conv2 -> add(x) -> ReLU), a head: the
    only chain is [block.conv1, block.conv2] (the stem's output also feeds the add)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        out = F.relu(x + self.conv2(F.relu(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class GBetween(nn.Module):
    """conv -> `between` -> ReLU -> conv -> flatten -> fc: `between` decides whether conv1 -> conv2 links."""

    def __init__(self, between: nn.Module | None = None, groups: int = 1, act: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.between = between if between is not None else nn.Identity()
        self.act = act if act is not None else nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=groups)
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(self.act(self.between(self.conv1(x))))).flatten(1))


class GFanOut(nn.Module):
    """fc1's hidden units feed two layers: not a symmetry of either alone."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2(h) + self.fc3(h)


class GSharedWeight(nn.Module):
    """One hidden layer applied twice (fc2 shared): its rows and columns are the same tensor."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc2(F.relu(self.fc1(x)))))))


class GPassThrough(nn.Module):
    """Every op the analysis lets a chain through, in functional and module spellings: a chain
    conv1 -> conv2 -> conv3 -> conv4 -> fc1 -> fc2 (view(N, -1) block (8, 1)) -> fc3."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.prelu = nn.PReLU(5, init=0.2)
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1, padding_mode="reflect")
        self.drop2d = nn.Dropout2d(0.3)
        self.conv3 = nn.Conv2d(6, 7, 1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.w4 = nn.Parameter(torch.randn(8, 7, 3, 3) * 0.3)
        self.b4 = nn.Parameter(torch.randn(8) * 0.1)
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 5)
        self.rrelu = nn.RReLU()
        self.fc3 = nn.Linear(5, 3)

    def forward(self, x):
        x = F.avg_pool2d(self.prelu(self.conv1(x)), 2)                   # 8x8 -> 4x4
        x = self.drop2d(F.leaky_relu(self.conv2(x), 0.1)).contiguous()
        x = self.up(F.max_pool2d(F.relu(self.conv3(x)), 2))              # 4x4 -> 2x2 -> 4x4
        x = F.relu(F.conv2d(x * 2.0, self.w4, self.b4, padding=1))
        x = F.adaptive_max_pool2d(x, 1)
        x = F.relu(self.fc1(x.view(x.size(0), -1)))
        x = F.dropout(self.fc2(x), 0.2, training=self.training)
        return self.fc3(self.rrelu(x).clone())


class GMeanHead(nn.Module):
    """conv -> ReLU -> mean over (H, W) -> fc: a link with T = 1 and no flatten block."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean(dim=(-2, -1)))


class GConv1dChain(nn.Module):
    """Conv1d -> ReLU -> Conv1d -> flatten -> fc (block (3, 6)), and a max_pool2d that would pool
    over a Conv1d's channels in GPoolOverChannels below."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv1d(2, 4, 3, padding=1), nn.Conv1d(4, 3, 5, padding=2), nn.Linear(18, 2)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv2(F.relu(self.conv1(x)))), 1))


class GPoolOverChannels(nn.Module):
    """max_pool2d on a Conv1d output (N, C, L) pools over C: not per channel, the chain ends."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(2, 4, 3, padding=1), nn.Conv1d(2, 3, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2))


class GTokenMLP(nn.Module):
    """Linear on tokens (N, T, F) -> ReLU -> Linear: links; flatten(1) of the tokens into a Linear
    mixes the token and feature dims (feature-minor), so fc2 -> fc3 does not link."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(10, 2)

    def forward(self, x):
        return self.fc3(torch.flatten(F.relu(self.fc2(F.relu(self.fc1(x)))), 1))


@dataclass
class GEntry:
    name: str
    factory: Callable[[], nn.Module]
    make_inputs: Callable[[], tuple]
    chains: list[list[str]]                    # weight names, in order; every G-link the model has
    reasons: dict[str, str]                    # weight -> a piece of its g_reason
    refused: tuple[str, str] | None = None     # (W^l, W^{l+1}) across a refused link: rescaling changes the output
    shapes: bool = True                        # analysed with example_inputs (False: without; still run on them)

    def analysis_inputs(self):
        return self.make_inputs() if self.shapes else None

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return self.factory()


def _w(*names: str) -> list[str]:
    return [f"{n}.weight" for n in names]


G_ENTRIES: list[GEntry] = [
    GEntry("mlp_3_5_4_2", lambda: GMLP((3, 5, 4, 2)), lambda: (_randn(4, 3),),
           [_w("layers.0", "layers.1", "layers.2")], {"layers.2.weight": "model output"}),
    GEntry("mlp_3_4_4_2_nobias", lambda: GMLP((3, 4, 4, 2), bias=False), lambda: (_randn(4, 3),),
           [_w("layers.0", "layers.1", "layers.2")], {}, shapes=False),
    GEntry("mlp_3_4_6_2", lambda: GMLP((3, 4, 6, 2)), lambda: (_randn(4, 3),),
           [_w("layers.0", "layers.1", "layers.2")], {}),
    GEntry("mlp_valley_3_4_2_5_2", lambda: GMLP((3, 4, 2, 5, 2)), lambda: (_randn(4, 3),),
           [_w("layers.0", "layers.1", "layers.2", "layers.3")], {}),
    GEntry("tiny_cnn", GTinyCNN, g_tiny_cnn_inputs, [_w("conv1", "conv2", "fc")], {"fc.weight": "model output"}),
    GEntry("tiny_cnn_no_inputs", GTinyCNN, g_tiny_cnn_inputs, [_w("conv1", "conv2")],
           {"conv2.weight": "flatten needs example_inputs"}, shapes=False),
    GEntry("residual_toy", GResidualToy, images(2, 3, 6), [_w("conv1", "conv2")],
           {"stem.weight": "output used by 2 ops", "conv2.weight": "`conv2` → `add`: residual add"},
           refused=("conv2.weight", "fc.weight")),
    GEntry("bn_between", lambda: GBetween(nn.BatchNorm2d(4)), images(2, 3, 4), [_w("conv2", "fc")],
           {"conv1.weight": "`conv1` → `between`: a normalisation absorbs the unit's incoming scale, so "
                            "in×c/out×1/c is not a symmetry; psi applies to this weight"},
           refused=("conv1.weight", "conv2.weight")),
    GEntry("gelu_between", lambda: GBetween(act=nn.GELU()), images(2, 3, 4), [_w("conv2", "fc")],
           {"conv1.weight": "`conv1` → `act`: GELU is not positively homogeneous"},
           refused=("conv1.weight", "conv2.weight")),
    GEntry("grouped_conv", lambda: GBetween(groups=2), images(2, 3, 4), [],
           {"conv1.weight": "`conv1` → `conv2`: grouped conv (groups=2)", "conv2.weight": "grouped conv"}),
    GEntry("depthwise_conv", lambda: GBetween(groups=4), images(2, 3, 4), [],
           {"conv1.weight": "depthwise conv", "conv2.weight": "depthwise conv"}),
    GEntry("fan_out", GFanOut, lambda: (_randn(4, 3),), [],
           {"fc1.weight": "`fc1` → `relu`: output used by 2 ops"}, refused=("fc1.weight", "fc2.weight")),
    GEntry("shared_weight", GSharedWeight, lambda: (_randn(4, 3),), [],
           {"fc1.weight": "shared weight", "fc2.weight": "shared weight: used by 2 ops"}),
    GEntry("pass_through", GPassThrough, images(2, 3, 8),
           [["conv1.weight", "conv2.weight", "conv3.weight", "w4", "fc1.weight", "fc2.weight", "fc3.weight"]],
           {"fc3.weight": "model output"}),
    GEntry("mean_head", GMeanHead, images(2, 3, 5), [_w("conv", "fc")], {}),
    GEntry("conv1d_chain", GConv1dChain, lambda: (_randn(2, 2, 6),), [_w("conv1", "conv2", "fc")], {}),
    GEntry("pool_over_channels", GPoolOverChannels, lambda: (_randn(2, 2, 6),), [],
           {"conv1.weight": "max_pool2d pools over the dims that hold the units"}),
    GEntry("token_mlp", GTokenMLP, lambda: (_randn(2, 5, 3),), [_w("fc1", "fc2")],
           {"fc2.weight": "is not one channel-major flatten"}, refused=("fc2.weight", "fc3.weight")),
]


class GDataDependentMLP(nn.Module):
    """A branch on the input's values: torch.fx cannot trace it, so the graph comes from a run
    (capture path "run"); fc1 -> fc2 still links (the branch reads the input, not the units)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        if x.sum() > 0:
            h = F.dropout(h, 0.25, self.training)
        return self.fc2(h)


class GFunctionalMLP(nn.Module):
    """F.linear with parameters of the model, and x.view(x.size(0), -1) between two linears: the
    view is the identity with shapes and needs them to be proven so."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
        self.w2 = nn.Parameter(torch.randn(2, 4))

    def forward(self, x):
        h = F.leaky_relu(F.linear(x, self.w1, self.b1), 0.2)
        return F.linear(h.view(h.size(0), -1), self.w2)


G_ENTRIES += [
    GEntry("data_dependent_mlp", GDataDependentMLP, lambda: (_randn(4, 3).abs(),), [_w("fc1", "fc2")], {}),
    GEntry("functional_mlp", GFunctionalMLP, lambda: (_randn(4, 3),), [["w1", "w2"]], {"w2": "model output"}),
    GEntry("functional_mlp_no_inputs", GFunctionalMLP, lambda: (_randn(4, 3),), [],
           {"w1": "flatten needs example_inputs"}, shapes=False),
]


class GLayerNormMLP(nn.Module):
    """Linear -> LayerNorm -> ReLU -> Linear: LayerNorm absorbs fc1's scale as a whole (psi applies),
    so fc1 -> fc2 is no G-link; fc2 -> fc3 is."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2, self.fc3 = nn.Linear(3, 4, bias=False), nn.LayerNorm(4), nn.Linear(4, 5), \
            nn.Linear(5, 2)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.norm(self.fc1(x))))))


def _frozen_bn_between() -> nn.Module:
    model = GBetween(nn.BatchNorm2d(4))
    with torch.no_grad():       # statistics that make the frozen BN a visible affine map
        model.between.running_mean.uniform_(-1, 1)
        model.between.running_var.uniform_(0.5, 2)
    model.between.eval()
    return model


G_ENTRIES += [
    GEntry("layernorm_mlp", GLayerNormMLP, lambda: (_randn(4, 3),), [_w("fc2", "fc3")],
           {"fc1.weight": "`fc1` → `norm`: a normalisation absorbs the unit's incoming scale, so in×c/out×1/c is "
                          "not a symmetry; psi applies to this weight"}, refused=("fc1.weight", "fc2.weight")),
    GEntry("frozen_bn_between", _frozen_bn_between, images(2, 3, 4), [_w("conv2", "fc")],
           {"conv1.weight": "`conv1` → `between`: a normalisation absorbs"}, refused=("conv1.weight", "conv2.weight")),
]


# --- issue 10 part B (gspace geometry): the registry-driven runtime tests' net for a coupled unit ------
class GSmallNet(nn.Module):
    """The layout tests/test_matrix.py's Net and tests/test_runtime.py's SmallNet share (conv1, conv2
    in the "conv*" param group, a linear head with 4 outputs, an unused `frozen` layer, a zero-size
    layer; 3-channel images of any size) with a 𝒢-chain instead of BatchNorms: conv1 → ReLU → conv2,
    then tanh (not positively homogeneous: the chain ends), a spatial mean and the head. gspace's unit
    is (conv1.weight, conv1.bias, conv2.weight, conv2.bias)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)
        self.frozen = nn.Linear(4, 4)   # not used by forward: its grad stays None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)      # "Initializing zero-element tensors is a no-op"
            self.empty = nn.Linear(8, 0)

    def forward(self, x):
        z = torch.tanh(self.conv2(F.relu(self.conv1(x)))).mean((2, 3))
        return torch.cat([self.head(z), self.empty(z)], dim=1)

"""Toy models of the architectures the shipped policies name, for tests/test_shipped_policies.py and
tests/test_suggest.py: each has the architecture's typical blocks at toy size (the analysis must see
the same facts as on the real network) and trains in milliseconds.

The models of tests/models.py are reused where they fit (TinyVGG11, DenseBlockNet, TinyMobileNetV2,
TinyTransformer, Decoder, ...); the ones here add what the zoo lacks: an EfficientNet / MobileNetV3
block (squeeze-excitation, SiLU, hardswish), a ConvNeXt block net (depthwise 7x7, LayerNorm,
GELU, layer scale), a U-Net (transposed convs and skip connections) and a GPT-style pre-LN
transformer (token embedding, causal attention).

The CLI reads ``tests.policy_zoo:tiny_unet`` etc.: every model has a factory without arguments.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# --- EfficientNet / MobileNetV3: MBConv with squeeze-excitation ----------------------------------
class SqueezeExcite(nn.Module):
    """x * gate(conv_expand(act(conv_reduce(mean_hw(x))))): two 1x1 convs with biases."""

    def __init__(self, channels: int, reduced: int, act: type[nn.Module], gate: type[nn.Module]):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = act()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class MBConv(nn.Module):
    """EfficientNet's MBConv: expand 1x1 -> BN -> act -> depthwise 3x3 -> BN -> act -> SE -> project
    1x1 -> BN, plus the input (same channels, stride 1)."""

    def __init__(self, channels: int, expand_ratio: int, act: type[nn.Module], gate: type[nn.Module]):
        super().__init__()
        hidden = channels * expand_ratio
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), act())
        self.se = SqueezeExcite(hidden, max(1, channels // 2), act, gate)
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.project(self.se(self.depthwise(self.expand(x))))


class TinyEfficientNet(nn.Module):
    """Stem 3x3/2 -> BN -> SiLU, an EfficientNet MBConv (SiLU, sigmoid gate), a MobileNetV3 block
    (hardswish, hardsigmoid gate), head 1x1 -> BN -> hardswish, pooled into a linear classifier.
    Conv weights: stem 1, per block 5 (expand, depthwise, SE reduce, SE expand, project), head 1 = 12."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.SiLU())
        self.block1 = MBConv(4, 4, nn.SiLU, nn.Sigmoid)
        self.block2 = MBConv(4, 3, nn.Hardswish, nn.Hardsigmoid)
        self.head = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.classifier = nn.Linear(8, classes)

    def forward(self, x):
        x = self.head(self.block2(self.block1(self.stem(x))))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --- ConvNeXt ------------------------------------------------------------------------------------
class ChannelsFirstLayerNorm(nn.Module):
    """ConvNeXt's LayerNorm over the channels of an NCHW tensor (permute, nn.LayerNorm, permute)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """dwconv 7x7 -> (NHWC) LayerNorm -> Linear C->4C -> GELU -> Linear 4C->C -> layer scale -> + x."""

    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    """Stem conv 4x4/4 -> LN, a block at 8 channels, downsample LN -> conv 2x2/2, a block at 16,
    global average pool -> LN -> head. Conv weights: stem, 2 depthwise, downsample = 4; linear
    weights: 2 per block + head = 5; layer scales: 2 (kind other)."""

    def __init__(self, dims=(8, 16), classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), ChannelsFirstLayerNorm(dims[0]))
        self.stage1 = ConvNeXtBlock(dims[0])
        self.downsample = nn.Sequential(ChannelsFirstLayerNorm(dims[0]), nn.Conv2d(dims[0], dims[1], 2, stride=2))
        self.stage2 = ConvNeXtBlock(dims[1])
        self.norm = nn.LayerNorm(dims[1], eps=1e-6)
        self.head = nn.Linear(dims[1], classes)

    def forward(self, x):
        x = self.stage2(self.downsample(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean(dim=(2, 3))))


# --- U-Net ---------------------------------------------------------------------------------------
def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyUNet(nn.Module):
    """Two encoder levels and a bottleneck (double conv3x3 -> BN -> ReLU), max pooling down,
    ConvTranspose2d 2x2/2 up (with bias, no BN: its output is concatenated with the skip and goes
    into the decoder's conv, as in the U-Net paper), a 1x1 conv head per pixel.
    Conv weights: 2 double convs + bottleneck + 2 decoder double convs = 10, head 1; transposed 2."""

    def __init__(self, channels: int = 3, classes: int = 2, width: int = 4):
        super().__init__()
        w = width
        self.enc1, self.enc2 = _double_conv(channels, w), _double_conv(w, 2 * w)
        self.bottleneck = _double_conv(2 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = _double_conv(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = _double_conv(2 * w, w)
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x):
        s1 = self.enc1(x)
        s2 = self.enc2(F.max_pool2d(s1, 2))
        x = self.bottleneck(F.max_pool2d(s2, 2))
        x = self.dec2(torch.cat([self.up2(x), s2], dim=1))
        x = self.dec1(torch.cat([self.up1(x), s1], dim=1))
        return self.head(x)


# --- GPT-style pre-LN transformer ----------------------------------------------------------------
class PreLNBlock(nn.Module):
    """x + proj(causal_attention(qkv(LN(x)))), then x + fc2(GELU(fc1(LN(x))))."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token and position embeddings, two pre-LN blocks, final LN, an untied bias-free LM head.
    Linear weights: 4 per block + head = 9."""

    def __init__(self, vocab: int = 11, d: int = 8, context: int = 6, blocks: int = 2, heads: int = 2):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.positions = nn.Parameter(0.02 * torch.randn(context, d))
        self.blocks = nn.ModuleList(PreLNBlock(d, heads) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):                       # idx: (batch, tokens) of token ids
        x = self.tokens(idx) + self.positions[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# --- factories (the CLI's MODULE:CALLABLE) ---------------------------------------------------------
def tiny_efficientnet() -> nn.Module:
    return TinyEfficientNet()


def tiny_convnext() -> nn.Module:
    return TinyConvNeXt()


def tiny_unet() -> nn.Module:
    return TinyUNet()


def tiny_gpt() -> nn.Module:
    return TinyGPT()


def tiny_vgg11_bn() -> nn.Module:
    from tests.models import TinyVGG11
    return TinyVGG11(batch_norm=True)


def tiny_vgg11() -> nn.Module:
    from tests.models import TinyVGG11
    return TinyVGG11(batch_norm=False)


def gpt_inputs(batch: int = 2, tokens: int = 6, vocab: int = 11, seed: int = 0) -> tuple:
    """Token ids for TinyGPT, drawn from a generator of their own (the global RNG is untouched)."""
    return (torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed)),)

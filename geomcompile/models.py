"""Reference models in plain torch.nn (no torchvision), used by the demo, the tests and the benchmark.

Parameter names follow torchvision (``conv1``, ``bn1``, ``layerN.i.convK``, ``downsample.0/1``,
``fc``), so one policy reads the same on every ResNet here.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["BasicBlock", "Bottleneck", "CifarResNet", "ResNet50", "VGG", "SmallResNet",
           "resnet20", "resnet56", "resnet50", "vgg16", "small_resnet", "MODELS"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _he_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs and a residual add; 1x1 conv + BN shortcut when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:   # option B of He et al.: projection shortcut
            self.downsample = nn.Sequential(conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, ResNet v1.5), 1x1 expand by 4, each followed by BN."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        width = planes
        self.conv1 = conv1x1(in_planes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes * self.expansion:
            self.downsample = nn.Sequential(conv1x1(in_planes, planes * self.expansion, stride),
                                            nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


def _make_layer(block: type[nn.Module], in_planes: int, planes: int, blocks: int,
                stride: int) -> tuple[nn.Sequential, int]:
    layers = []
    for i in range(blocks):
        layers.append(block(in_planes, planes, stride if i == 0 else 1))
        in_planes = planes * block.expansion
    return nn.Sequential(*layers), in_planes


class CifarResNet(nn.Module):
    """CIFAR ResNet of He et al. (2016), 6n+2 layers: stages of 16/32/64 channels on 32x32 inputs."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        planes = 16
        self.layer1, planes = _make_layer(BasicBlock, planes, 16, blocks_per_stage, 1)
        self.layer2, planes = _make_layer(BasicBlock, planes, 32, blocks_per_stage, 2)
        self.layer3, planes = _make_layer(BasicBlock, planes, 64, blocks_per_stage, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes, num_classes)
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class ResNet50(nn.Module):
    """ImageNet ResNet-50: 7x7 stem, max pool, bottleneck stages [3, 4, 6, 3], expansion 4."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        planes = 64
        self.layer1, planes = _make_layer(Bottleneck, planes, 64, 3, 1)
        self.layer2, planes = _make_layer(Bottleneck, planes, 128, 4, 2)
        self.layer3, planes = _make_layer(Bottleneck, planes, 256, 6, 2)
        self.layer4, planes = _make_layer(Bottleneck, planes, 512, 3, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes, num_classes)
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """CIFAR-style VGG: 3x3 convs (with bias, as in the original) [-BN] -ReLU, max pools, one Linear."""

    def __init__(self, cfg=VGG16_CFG, num_classes: int = 10, batch_norm: bool = True, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers.append(nn.Conv2d(channels, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            channels = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)   # 32x32 input -> 1x1 after five pools
        return self.classifier(x)


class SmallResNet(nn.Module):
    """A small BN ResNet for 8x8 single-channel inputs: stem, two BasicBlocks (the second strided), Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.conv1 = conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width, num_classes)
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-20 (3 BasicBlocks per stage, 0.27M parameters)."""
    return CifarResNet(3, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-56 (9 BasicBlocks per stage, 0.85M parameters)."""
    return CifarResNet(9, num_classes, in_channels)


def resnet50(num_classes: int = 1000) -> ResNet50:
    """ImageNet ResNet-50 (bottleneck blocks [3, 4, 6, 3], 25.6M parameters)."""
    return ResNet50(num_classes)


def vgg16(num_classes: int = 10, batch_norm: bool = True) -> VGG:
    """CIFAR-style VGG-16 (with BN by default) for 32x32 inputs."""
    return VGG(VGG16_CFG, num_classes, batch_norm)


def small_resnet(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> SmallResNet:
    """Small BN ResNet for 8x8 single-channel inputs (fast on CPU; used by the demo)."""
    return SmallResNet(num_classes, in_channels, width)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet50": resnet50,
    "vgg16": vgg16,
    "small_resnet": small_resnet,
}

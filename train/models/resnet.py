"""Single-channel ResNets for 2-D medical images.

Widened variants (``resnet50w2``, ``resnet50w4``) multiply EVERY channel width (stem, bottleneck and
expansion), as SwAV's wide ResNets do; torchvision's ``wide_resnet50_2`` only widens the bottleneck.
The classifier is dropped: the encoder returns the globally average-pooled features
(``num_features`` = 512 for ResNet-18, 2048 x width for the bottleneck nets).
"""
from __future__ import annotations

import torch
from torch import nn


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(c_in, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)  # stride on the 3x3 (ResNet v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block: type[nn.Module], layers: tuple[int, ...], widen: int = 1, in_channels: int = 1):
        super().__init__()
        width = 64 * widen
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._c = width
        self.layer1 = self._stage(block, width, layers[0], 1)
        self.layer2 = self._stage(block, width * 2, layers[1], 2)
        self.layer3 = self._stage(block, width * 4, layers[2], 2)
        self.layer4 = self._stage(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = width * 8 * block.expansion

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each residual branch: every block starts as the identity.
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _stage(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._c != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self._c, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self._c, planes, stride, downsample)]
        self._c = planes * block.expansion
        layers += [block(self._c, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1),
    "resnet50w2": (Bottleneck, (3, 4, 6, 3), 2),
    "resnet50w4": (Bottleneck, (3, 4, 6, 3), 4),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 1),
}


ARCHS_3D = ("densenet3d",)


def build_encoder(arch: str, in_channels: int = 1) -> nn.Module:
    """The backbone named ``arch`` (``ARCHS`` for 2-D, ``ARCHS_3D`` for volumes); ``encoder.arch``
    records the name for export."""
    if arch in ARCHS_3D:
        from .densenet3d import DenseNet3D
        encoder = DenseNet3D(in_channels=in_channels)
        encoder.arch = arch
        return encoder
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join((*ARCHS, *ARCHS_3D))}")
    block, layers, widen = ARCHS[arch]
    encoder = ResNet(block, layers, widen=widen, in_channels=in_channels)
    encoder.arch = arch
    return encoder

"""3-D densely connected encoder for volumes of variable size (METHOD.md section 6).

Five dense blocks of (1, 2, 3, 3, 3) units; a unit is Conv3d -> BatchNorm3d -> LeakyReLU producing
``growth`` (7) new channels concatenated to its input; 16 initial features. Blocks 1-2 are in-plane
(kernels (1,3,3), 2x down-sampling in y and x only), blocks 3-5 use (3,3,3) kernels (2x down-sampling
in all axes between them). A 1x1x1 convolution to 512 channels, then adaptive max and average pooling
concatenated, gives the 1024-d feature whatever the input size (as amax and mean over the volume: the
same values as adaptive pooling to 1, with backward passes that have deterministic CUDA kernels).
"""
from __future__ import annotations

import torch
from torch import nn


class DenseUnit(nn.Module):
    def __init__(self, c_in: int, growth: int, kernel: tuple[int, int, int]):
        super().__init__()
        self.conv = nn.Conv3d(c_in, growth, kernel, padding=tuple(k // 2 for k in kernel), bias=False)
        self.bn = nn.BatchNorm3d(growth)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.act(self.bn(self.conv(x)))], dim=1)


class DenseNet3D(nn.Module):
    def __init__(self, units=(1, 2, 3, 3, 3), init_features: int = 16, growth: int = 7,
                 in_channels: int = 1, num_features: int = 1024):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv3d(in_channels, init_features, (1, 3, 3), padding=(0, 1, 1), bias=False),
                                   nn.BatchNorm3d(init_features), nn.LeakyReLU(0.01, inplace=True)]
        c = init_features
        for i, n in enumerate(units):
            kernel = (1, 3, 3) if i < 2 else (3, 3, 3)
            for _ in range(n):
                layers.append(DenseUnit(c, growth, kernel))
                c += growth
            if i < len(units) - 1:
                layers.append(nn.MaxPool3d((1, 2, 2)) if i < 2 else nn.MaxPool3d(2, ceil_mode=True))
        layers += [nn.Conv3d(c, num_features // 2, 1, bias=False), nn.BatchNorm3d(num_features // 2),
                   nn.LeakyReLU(0.01, inplace=True)]
        self.features = nn.Sequential(*layers)
        self.num_features = num_features
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, a=0.01, nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return torch.cat([x.amax(dim=(2, 3, 4)), x.mean(dim=(2, 3, 4))], dim=1)

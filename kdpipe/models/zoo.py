"""The model zoo: small classifiers sized by width and depth.

Each model exposes `default_taps` (feature maps at increasing depth, for the
feature-based methods) and `embedding_tap` (the penultimate vector); cnn and
resnet also `preact_taps` (the same stage ends before their ReLU) and
`preact_bns` (the BatchNorm that ReLU reads), see kdpipe.models.cifar. The mlp
has no stage ends before a ReLU to offer: methods needing them refuse it.
"""

from __future__ import annotations

import math

from torch import nn

from kdpipe.errors import InputError
from kdpipe.models.cifar import CifarResNet, conv_bn


class MLP(nn.Module):
    def __init__(self, input_shape, num_classes: int, width: int = 128, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        features = math.prod(input_shape)
        for _ in range(depth):
            layers += [nn.Linear(features, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            features = width
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(features, num_classes)
        relu_paths = [f"body.{3 * i + 3}" for i in range(depth)]
        self.default_taps = relu_paths
        self.embedding_tap = relu_paths[-1] if relu_paths else "body.0"

    def forward(self, x):
        return self.fc(self.body(x))


class CNN(nn.Module):
    """`depth` conv-BN-ReLU blocks; channels double (up to 4×width) and the map halves while it is larger than 2×2."""

    def __init__(self, input_shape, num_classes: int, width: int = 32, depth: int = 3):
        super().__init__()
        if len(input_shape) != 3:
            raise InputError("model.arch", f"cnn needs image inputs C×H×W, got samples of shape {tuple(input_shape)}")
        channels, size = input_shape[0], min(input_shape[1:])
        blocks = []
        for i in range(depth):
            out = width * 2 ** min(i, 2)
            stride = 2 if i > 0 and size > 2 else 1
            size = (size + 1) // 2 if stride == 2 else size
            blocks.append(conv_bn(channels, out, 3, stride, inplace=False))  # the BN's output is a pre-ReLU tap
            channels = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, num_classes)
        self.default_taps = [f"blocks.{i}" for i in range(depth)]
        self.preact_taps = self.preact_bns = [f"blocks.{i}.1" for i in range(depth)]
        self.embedding_tap = "pool"

    def forward(self, x):
        return self.fc(self.pool(self.blocks(x)))


class ResNet(CifarResNet):
    """CIFAR-style ResNet (He et al. 2016) sized by width and depth: depth = 6n + 2, stages of w, 2w, 4w channels."""

    def __init__(self, input_shape, num_classes: int, width: int = 16, depth: int = 8):
        super().__init__(input_shape, num_classes, depth, (width, width, 2 * width, 4 * width))

"""The model zoo: small classifiers sized by width and depth.

Each model exposes `default_taps` (feature maps at increasing depth, for the
feature-based methods) and `embedding_tap` (the penultimate vector).
"""

from __future__ import annotations

import math

from torch import nn

from kdpipe.errors import InputError


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


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


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
            blocks.append(conv_bn_relu(channels, out, stride))
            channels = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, num_classes)
        self.default_taps = [f"blocks.{i}" for i in range(depth)]
        self.embedding_tap = "pool"

    def forward(self, x):
        return self.fc(self.pool(self.blocks(x)))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016): depth = 6n + 2, three stages of widths w, 2w, 4w."""

    def __init__(self, input_shape, num_classes: int, width: int = 16, depth: int = 8):
        super().__init__()
        if len(input_shape) != 3:
            raise InputError("model.arch", f"resnet needs image inputs C×H×W, got samples of shape {tuple(input_shape)}")
        if (depth - 2) % 6 != 0 or depth < 8:
            raise InputError("model.depth", f"resnet depth must be 6n + 2 with n ≥ 1 (8, 14, 20, 32, …), got {depth}")
        n = (depth - 2) // 6
        self.stem = conv_bn_relu(input_shape[0], width)
        stages, channels = [], width
        for i, out in enumerate((width, 2 * width, 4 * width)):
            blocks = [BasicBlock(channels if j == 0 else out, out, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            channels = out
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, num_classes)
        self.default_taps = ["layer1", "layer2", "layer3"]
        self.embedding_tap = "pool"

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))

"""The CIFAR knowledge-distillation benchmark architectures (the set RepDistiller/CRD compare methods on).

Written from the architectures' descriptions: He et al. 2016 (CIFAR ResNets; the ×4 variants widen every
stage fourfold), Zagoruyko & Komodakis 2016 (WRN-d-k, pre-activation blocks), Simonyan & Zisserman 2015 with
batch norm and one linear classifier (VGG-8 / VGG-13), Sandler et al. 2018 (MobileNetV2 at width 0.5, expansion 6,
CIFAR strides) and Ma et al. 2018 (ShuffleNetV2 1×). Widths, depths, strides, biases and shortcuts are those of
the benchmark's definitions (RepDistiller's models/), so the parameter counts equal theirs (tests/test_zoo.py holds
the numbers for 3×32×32 inputs and 100 classes, and checks the CIFAR ResNets against He et al.'s table).

Every model takes any C×H×W input (global average pooling before the classifier), names its classifier `fc`,
and declares `default_taps` (the end of each resolution stage, shallow → deep) and `embedding_tap`. Each also
declares `preact_taps`, the same stage ends before their last ReLU (ReviewKD's teacher, OFD), and all but
ShuffleNetV2 `preact_bns`, the BatchNorm whose output that ReLU reads (OFD's teacher margins; in a residual
block its last BN, as OFD's reference takes it). The ReLU after a pre-ReLU tap is never in-place: it would
overwrite the tapped tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from kdpipe.errors import InputError


def _image_channels(input_shape, arch: str) -> int:
    if len(input_shape) != 3:
        raise InputError("model.arch", f"{arch} needs image inputs C×H×W, got samples of shape {tuple(input_shape)}")
    return input_shape[0]


def _pool() -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1, relu: bool = True,
            inplace: bool = True) -> nn.Sequential:
    """Conv-BN(-ReLU); `inplace=False` where the BN's output is tapped (a pre-ReLU tap)."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.ReLU(inplace=inplace)) if relu else nn.Sequential(*layers)


# --- ResNet (CIFAR) -------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN, added to the input (a 1×1 conv-BN projection when the shape changes), then ReLU.
    `preact` (parameterless, so state_dict keys are unchanged) gives the sum before that ReLU a module path."""

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
        self.preact = nn.Identity()
        self.out_relu = nn.ReLU()  # not in-place: `preact`'s output may be tapped

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.out_relu(self.preact(self.bn2(self.conv2(out)) + self.shortcut(x)))


class CifarResNet(nn.Module):
    """depth = 6n + 2: a 3×3 stem of widths[0] channels, three stages of n basic blocks with widths[1..3]
    channels (the 2nd and 3rd halve the map), global average pooling, a linear classifier."""

    def __init__(self, input_shape, num_classes: int, depth: int, widths: tuple[int, int, int, int], arch: str = "resnet"):
        super().__init__()
        channels = _image_channels(input_shape, arch)
        if (depth - 2) % 6 != 0 or depth < 8:
            raise InputError("model.depth", f"resnet depth must be 6n + 2 with n ≥ 1 (8, 14, 20, 32, …), got {depth}")
        n = (depth - 2) // 6
        self.stem = conv_bn(channels, widths[0])
        stages, channels = [], widths[0]
        for i, out in enumerate(widths[1:]):
            stages.append(nn.Sequential(*[BasicBlock(channels if j == 0 else out, out, 2 if (i > 0 and j == 0) else 1)
                                          for j in range(n)]))
            channels = out
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = _pool()
        self.fc = nn.Linear(channels, num_classes)
        self.default_taps = ["layer1", "layer2", "layer3"]
        self.preact_taps = [f"layer{i}.{n - 1}.preact" for i in (1, 2, 3)]
        self.preact_bns = [f"layer{i}.{n - 1}.bn2" for i in (1, 2, 3)]
        self.embedding_tap = "pool"

    def forward(self, x):
        return self.fc(self.pool(self.layer3(self.layer2(self.layer1(self.stem(x))))))


# --- Wide ResNet ----------------------------------------------------------------------------


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; the shortcut is a bare 1×1 conv when the shape changes (WRN)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.relu1 = nn.ReLU(inplace=False)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = None if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        # With a projection, the shortcut starts from the activated input, as the first conv does.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-k: depth = 6n + 4; a 16-channel stem, stages of 16k, 32k, 64k channels, final BN-ReLU."""

    def __init__(self, input_shape, num_classes: int, depth: int, widen: int, arch: str):
        super().__init__()
        channels = _image_channels(input_shape, arch)
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(channels, 16, 3, 1, 1, bias=False)
        stages, channels = [], 16
        for i, out in enumerate((16 * widen, 32 * widen, 64 * widen)):
            stages.append(nn.Sequential(*[PreActBlock(channels if j == 0 else out, out, 2 if (i > 0 and j == 0) else 1)
                                          for j in range(n)]))
            channels = out
        self.block1, self.block2, self.block3 = stages
        self.post = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=False))  # post.0 is a pre-ReLU tap
        self.pool = _pool()
        self.fc = nn.Linear(channels, num_classes)
        self.default_taps = ["block1", "block2", "post"]
        # A pre-activation stage ends without a ReLU; the next BN-ReLU (the next stage's first, or `post`) reads it:
        # the pre-ReLU point is that BN's output (relu1 is not in-place), as in mdistiller's preact features.
        self.preact_taps = self.preact_bns = ["block2.0.bn1", "block3.0.bn1", "post.0"]
        self.embedding_tap = "pool"

    def forward(self, x):
        return self.fc(self.pool(self.post(self.block3(self.block2(self.block1(self.stem(x)))))))


# --- VGG ------------------------------------------------------------------------------------


class VGG(nn.Module):
    """Five blocks of 3×3 conv (with bias)-BN-ReLU, 2×2 max pooling between them, global average pooling and one
    linear classifier. As in the benchmark, the pooling before the last block only runs on maps larger than 4×4
    (so 32×32 inputs reach the last block at 4×4); every pooling is skipped once the map is 1 pixel wide."""

    def __init__(self, input_shape, num_classes: int, blocks: list[list[int]], arch: str):
        super().__init__()
        channels = _image_channels(input_shape, arch)
        stages = []
        for widths in blocks:
            layers: list[nn.Module] = []
            for i, width in enumerate(widths):
                last = i == len(widths) - 1  # the block's last BN is a pre-ReLU tap: its ReLU is not in-place
                layers += [nn.Conv2d(channels, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=not last)]
                channels = width
            stages.append(nn.Sequential(*layers))
        self.block0, self.block1, self.block2, self.block3, self.block4 = stages
        self.downsample = nn.MaxPool2d(2, 2)
        self.pool = _pool()
        self.fc = nn.Linear(channels, num_classes)
        self.default_taps = ["block0", "block1", "block2", "block3", "block4"]
        self.preact_taps = self.preact_bns = [f"block{i}.{3 * len(widths) - 2}" for i, widths in enumerate(blocks)]
        self.embedding_tap = "pool"

    def _down(self, x, larger_than: int = 1):
        return self.downsample(x) if min(x.shape[-2:]) > larger_than else x

    def forward(self, x):
        x = self._down(self.block0(x))
        x = self._down(self.block1(x))
        x = self._down(self.block2(x))
        x = self._down(self.block3(x), larger_than=4)
        return self.fc(self.pool(self.block4(x)))


# --- MobileNetV2 ----------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """1×1 expansion, 3×3 depthwise, 1×1 linear projection (each with BN); residual when the shape is kept.
    The expansion conv is kept even at expansion 1, as in the benchmark's definition."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.conv = nn.Sequential(conv_bn(c_in, hidden, 1), conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  conv_bn(hidden, c_out, 1, relu=False))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32×32 inputs: (expansion, channels, blocks, stride) per stage with the second stage at
    stride 1; channels scaled by `width_mult`, a 1280-channel 1×1 head."""

    STAGES = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, input_shape, num_classes: int, width_mult: float = 0.5, arch: str = "mobilenetv2"):
        super().__init__()
        channels = _image_channels(input_shape, arch)
        width = int(32 * width_mult)
        self.stem = conv_bn(channels, width, 3, stride=2)
        stages = []
        for expand, c, n, s in self.STAGES:
            out = int(c * width_mult)
            stages.append(nn.Sequential(*[InvertedResidual(width if j == 0 else out, out, s if j == 0 else 1, expand)
                                          for j in range(n)]))
            width = out
        self.blocks = nn.Sequential(*stages)
        self.head = conv_bn(width, 1280, 1)
        self.pool = _pool()
        self.fc = nn.Linear(1280, num_classes)
        # The last block of each resolution: 16×16, 8×8, 4×4, 2×2 for 32×32 inputs.
        self.default_taps = ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]
        # Blocks end in a linear projection (no ReLU): the stage ends are already pre-ReLU; the BN is the last
        # block's projection BN (for a residual block, the one before the sum).
        self.preact_taps = list(self.default_taps)
        self.preact_bns = [f"{tap}.{len(self.blocks[int(tap.split('.')[1])]) - 1}.conv.2.1"
                           for tap in self.default_taps]
        self.embedding_tap = "pool"

    def forward(self, x):
        return self.fc(self.pool(self.head(self.blocks(self.stem(x)))))


# --- ShuffleNetV2 ---------------------------------------------------------------------------


def channel_shuffle(x, groups: int = 2):
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """Half the channels pass through; the other half go 1×1 → 3×3 depthwise → 1×1; concatenated and shuffled.

    The branch's last ReLU is applied after the shuffle, to the whole map (`keep` is a unit's output, ≥ 0, so
    the result is the same): the map before it is the unit's pre-ReLU output, tapped at the parameterless
    `preact`."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(conv_bn(half, half, 1), conv_bn(half, half, 3, groups=half, relu=False),
                                    conv_bn(half, half, 1, inplace=False))
        self.preact = nn.Identity()

    def forward(self, x):
        keep, change = x.chunk(2, dim=1)
        conv, bn, relu = self.branch[2]
        changed = bn(conv(self.branch[1](self.branch[0](change))))
        return relu(self.preact(channel_shuffle(torch.cat([keep, changed], 1))))


class ShuffleDownUnit(nn.Module):
    """Both branches see the whole input at stride 2: (3×3 dw → 1×1) and (1×1 → 3×3 dw → 1×1), concatenated."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        mid = c_out // 2
        self.left = nn.Sequential(conv_bn(c_in, c_in, 3, 2, groups=c_in, relu=False), conv_bn(c_in, mid, 1))
        self.right = nn.Sequential(conv_bn(c_in, mid, 1), conv_bn(mid, mid, 3, 2, groups=mid, relu=False),
                                   conv_bn(mid, mid, 1))

    def forward(self, x):
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 1× for 32×32 inputs: a 1×1 24-channel stem (no pooling), stages of 116, 232, 464 channels
    with 3, 7, 3 units after each stride-2 unit, a 1×1 1024-channel head."""

    def __init__(self, input_shape, num_classes: int, arch: str = "shufflev2"):
        super().__init__()
        channels = _image_channels(input_shape, arch)
        self.stem = conv_bn(channels, 24, 1)
        stages, channels = [], 24
        for out, units in ((116, 3), (232, 7), (464, 3)):
            stages.append(nn.Sequential(ShuffleDownUnit(channels, out), *[ShuffleUnit(out) for _ in range(units)]))
            channels = out
        self.layer1, self.layer2, self.layer3 = stages
        self.head = conv_bn(channels, 1024, 1)
        self.pool = _pool()
        self.fc = nn.Linear(1024, num_classes)
        self.default_taps = ["layer1", "layer2", "layer3"]
        # No preact_bns: half of a unit's channels pass through without a BN, so OFD cannot take margins here.
        self.preact_taps = [f"{layer}.{len(getattr(self, layer)) - 1}.preact" for layer in self.default_taps]
        self.embedding_tap = "pool"

    def forward(self, x):
        return self.fc(self.pool(self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))))


VGG8 = [[64], [128], [256], [512], [512]]
VGG13 = [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]
NARROW, X4 = (16, 16, 32, 64), (32, 64, 128, 256)

# name → builder(input_shape, num_classes)
CIFAR_ZOO = {
    "resnet8": lambda s, n: CifarResNet(s, n, 8, NARROW, "resnet8"),
    "resnet20": lambda s, n: CifarResNet(s, n, 20, NARROW, "resnet20"),
    "resnet56": lambda s, n: CifarResNet(s, n, 56, NARROW, "resnet56"),
    "resnet110": lambda s, n: CifarResNet(s, n, 110, NARROW, "resnet110"),
    "resnet8x4": lambda s, n: CifarResNet(s, n, 8, X4, "resnet8x4"),
    "resnet32x4": lambda s, n: CifarResNet(s, n, 32, X4, "resnet32x4"),
    "wrn_16_2": lambda s, n: WideResNet(s, n, 16, 2, "wrn_16_2"),
    "wrn_40_2": lambda s, n: WideResNet(s, n, 40, 2, "wrn_40_2"),
    "vgg8": lambda s, n: VGG(s, n, VGG8, "vgg8"),
    "vgg13": lambda s, n: VGG(s, n, VGG13, "vgg13"),
    "mobilenetv2": lambda s, n: MobileNetV2(s, n, 0.5, "mobilenetv2"),
    "shufflev2": lambda s, n: ShuffleNetV2(s, n, "shufflev2"),
}

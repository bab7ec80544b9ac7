"""User models for entry-point tests (`entrypoint: fixture_models:...`)."""

import torch
from torch import nn

from kdpipe.models.cifar import conv_bn


def ten_class_mlp(input_shape, num_classes, hidden: int = 16):
    """Ignores `num_classes`: always 10 outputs, like a checkpointed model trained elsewhere."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def not_a_module(input_shape, num_classes):
    return "model"


class OutlierChannelCNN(nn.Module):
    """A small CNN with one channel of its first block `gain` times larger and the next convolution reading that
    channel through weights `gain` times smaller: the same function and the same gradients as without the gain
    (it cancels in both), but an activation whose range is `gain` times what the other channels need, the kind of
    outlier that per-tensor INT8 activations handle badly (README: LCNet's hard-swish output, one channel at 360
    where the median channel's maximum is 4.1). Each later block is conv-BN-ReLU, channels doubling."""

    def __init__(self, input_shape, num_classes: int, width: int = 8, depth: int = 2, gain: float = 1000.0):
        super().__init__()
        self.stem = conv_bn(input_shape[0], width, 3, 1, inplace=False)
        gains = torch.ones(width)
        gains[0] = gain
        self.register_buffer("gains", gains.view(1, -1, 1, 1))
        # Without BatchNorm: torch's QAT exports a functional convolution with ReLU, not one followed by BN.
        self.reader = nn.Conv2d(width, 2 * width, 3, 2, 1)
        self.blocks = nn.Sequential(*[conv_bn(2 ** i * width, 2 ** (i + 1) * width, 3, 2, inplace=False)
                                      for i in range(1, depth - 1)])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 ** max(1, depth - 1) * width, num_classes)

    def forward(self, x):
        x = self.stem(x) * self.gains  # after the ReLU: torch's QAT has no ONNX export of a fused Mul-ReLU
        reader = self.reader
        x = torch.relu(nn.functional.conv2d(x, reader.weight / self.gains, reader.bias, reader.stride,
                                            reader.padding, reader.dilation, reader.groups))
        return self.fc(self.pool(self.blocks(x)))


def outlier_cnn(input_shape, num_classes, width: int = 8, depth: int = 2, gain: float = 1000.0):
    return OutlierChannelCNN(input_shape, num_classes, width, depth, gain)

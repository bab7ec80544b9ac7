"""User models for entry-point tests (`entrypoint: fixture_models:...`)."""

import torch
from torch import nn

from kdpipe.models.zoo import CNN


def ten_class_mlp(input_shape, num_classes, hidden: int = 16):
    """Ignores `num_classes`: always 10 outputs, like a checkpointed model trained elsewhere."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def not_a_module(input_shape, num_classes):
    return "model"


class OutlierChannelCNN(CNN):
    """The zoo CNN with one channel of its first block `gain` times larger and the second convolution reading that
    channel through weights `gain` times smaller: the same function and the same gradients as the plain CNN (the
    gain cancels in both), but an activation whose range is `gain` times what the other channels need, the kind
    of outlier that per-tensor INT8 activations handle badly (README: LCNet's hard-swish output, one channel at
    360 where the median channel's maximum is 4.1)."""

    def __init__(self, input_shape, num_classes: int, width: int = 8, depth: int = 2, gain: float = 1000.0):
        super().__init__(input_shape, num_classes, width, depth)
        gains = torch.ones(self.blocks[0][0].out_channels)
        gains[0] = gain
        self.register_buffer("gains", gains.view(1, -1, 1, 1))

    def forward(self, x):
        conv, bn, relu = self.blocks[0]
        x = relu(bn(conv(x))) * self.gains  # after the ReLU: torch's QAT has no ONNX export of a fused Mul-ReLU
        conv, *rest = self.blocks[1]
        x = nn.functional.conv2d(x, conv.weight / self.gains, conv.bias, conv.stride,
                                 conv.padding, conv.dilation, conv.groups)
        for module in [*rest, *self.blocks[2:]]:  # each installed as it is (fx traces it for QAT)
            x = module(x)
        return self.fc(self.pool(x))


def outlier_cnn(input_shape, num_classes, width: int = 8, depth: int = 2, gain: float = 1000.0):
    return OutlierChannelCNN(input_shape, num_classes, width, depth, gain)


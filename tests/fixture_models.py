"""User models for entry-point tests (`entrypoint: fixture_models:...`)."""

from torch import nn


def ten_class_mlp(input_shape, num_classes, hidden: int = 16):
    """Ignores `num_classes`: always 10 outputs, like a checkpointed model trained elsewhere."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def not_a_module(input_shape, num_classes):
    return "model"

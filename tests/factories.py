"""Tiny models for tests, reachable as `model.source: factory` (``tests.factories:<name>``)."""

from __future__ import annotations

from torch import nn


def tiny_convnet(num_classes: int, in_chans: int, width: int = 8) -> nn.Module:
    """A BatchNorm-free CNN: its gradients do not depend on how a batch is split across ranks."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def tiny_bn_convnet(num_classes: int, in_chans: int, width: int = 8) -> nn.Module:
    """A small CNN with batch norm (weights, and running statistics held as buffers)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def tiny_upsampler(num_classes: int, in_chans: int, width: int = 8) -> nn.Module:
    """A CNN with a transposed convolution: a layer type ONNX Runtime has no int8 kernel for."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(width, width, 2, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )

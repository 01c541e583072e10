"""Non-DEQ baselines and the wrapper that lets any ``nn.Module`` classifier join the zoo."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .mdeq import _param_dtype, check_input

__all__ = ["CheckedClassifier", "SmallCNN", "small_cnn", "resnet18"]


class CheckedClassifier(nn.Module):
    """Wraps a classifier that takes images in [0, 1] (B, C, H, W) and returns logits, adding the
    same input checks as the DEQs. ``is_deq`` is False: it has no dynamics and no f_theta."""
    is_deq = False

    def __init__(self, net: nn.Module, in_channels: int, image_size: Sequence[int],
                 num_classes: int, architecture: str = "custom"):
        super().__init__()
        self.net = net
        self.in_channels, self.image_size = int(in_channels), tuple(image_size)
        self.num_classes, self.architecture = int(num_classes), architecture

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.in_channels, self.image_size, _param_dtype(self))
        out = self.net(x)
        if out.dim() != 2 or out.shape[1] != self.num_classes:
            raise ValueError(f"{self.architecture} returned shape {tuple(out.shape)}, expected "
                             f"(B, {self.num_classes}) logits")
        return out

    def describe(self) -> dict:
        return {"architecture": self.architecture, "in_channels": self.in_channels,
                "image_size": list(self.image_size), "num_classes": self.num_classes}

    def num_parameters(self, part=None) -> int:
        return sum(p.numel() for p in self.parameters())


class SmallCNN(nn.Module):
    """A small conv net for 28x28 inputs, sized close to ``deq_tiny`` in parameters: the "deep
    network baseline" of the Fashion-MNIST zoo."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                        nn.Linear(2 * w, 2 * w), nn.ReLU(),
                                        nn.Linear(2 * w, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def small_cnn(in_channels=1, image_size=(28, 28), num_classes=10, width=32) -> CheckedClassifier:
    return CheckedClassifier(SmallCNN(in_channels, num_classes, width), in_channels, image_size,
                             num_classes, "small_cnn")


def resnet18(in_channels=3, image_size=(32, 32), num_classes=10) -> CheckedClassifier:
    """The CIFAR-layout ResNet-18 of robust-training papers, from robustbench's architectures."""
    if in_channels != 3:
        raise ValueError("robustbench's ResNet-18 takes 3-channel inputs")
    from .compat import resnet18 as rb_resnet18
    return CheckedClassifier(rb_resnet18(num_classes=num_classes), 3, image_size, num_classes,
                             "resnet18")

"""A DEQ written the torchdeq way (``get_deq``, ``apply_norm`` / ``reset_norm``), for Fashion-MNIST.

Nothing here imports deqbench except :func:`make_model`, which wraps the plain torchdeq model
into a DEQ-aware deqbench model in one line (``model_zoo.torchdeq_adapter``).  The shipped
weights ``tests/data/byo/torchdeq_fmnist.pt`` were trained by ``train_byo.py`` in this folder.

    x (B, 1, 28, 28) --injection--> u (B, 16, 14, 14)
    z* = cell(z*, u)   (weight-normed convs, GroupNorm; Broyden, 8 iterations)
    logits = head(z*)  (B, 10)
"""
import torch
from torch import nn
from torchdeq import get_deq
from torchdeq.norm import apply_norm, reset_norm


class Cell(nn.Module):
    """f(z, u): z and u are (B, C, 14, 14)."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, c)
        self.gn2 = nn.GroupNorm(4, c)

    def forward(self, z, u):
        h = torch.relu(self.gn1(self.conv1(z)))
        return self.gn2(torch.relu(self.conv2(h) + u))


class TinyTorchDEQ(nn.Module):
    def __init__(self, c: int = 16, f_max_iter: int = 8, f_tol: float = 1e-3):
        super().__init__()
        self.injection = nn.Conv2d(1, c, 3, stride=2, padding=1)
        self.cell = Cell(c)
        self.head = nn.Sequential(nn.Conv2d(c, 32, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))
        apply_norm(self.cell, "weight_norm")
        self.deq = get_deq(f_solver="broyden", f_max_iter=f_max_iter, f_tol=f_tol,
                           f_stop_mode="rel")

    def forward(self, x):
        u = self.injection(x)
        reset_norm(self.cell)
        z, info = self.deq(lambda z: self.cell(z, u), torch.zeros_like(u))
        return self.head(z[-1])


def make_model(c: int = 16, f_max_iter: int = 8):
    """The deqbench model: the torchdeq DEQ behind the DEQ protocol (factory for configs)."""
    from model_zoo.torchdeq_adapter import TorchDEQClassifier
    return TorchDEQClassifier(TinyTorchDEQ(c, f_max_iter), input_shape=(1, 28, 28),
                              num_classes=10)

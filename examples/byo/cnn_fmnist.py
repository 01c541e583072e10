"""An outside, non-DEQ classifier: a small CNN that flattens with ``x.view(x.size(0), -1)``.

Plain PyTorch; deqbench sees it as any ``nn.Module`` mapping [0, 1] images to logits.  The
shipped weights ``tests/data/byo/cnn_fmnist.pt`` were trained by ``train_byo.py``.
"""
import torch
from torch import nn


class SmallNet(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 7 * 7, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.view(x.size(0), -1))


def make_model(width: int = 16):
    return SmallNet(width)

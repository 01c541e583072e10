"""Shared fixtures for the model-zoo tests."""
import dataclasses
import os

import pytest
import torch
from torch import nn

# The suite runs as pytest-xdist workers, one per core: the runner's own worker processes
# ('auto' = 2 on a CPU) would oversubscribe them. The tests of the parallel runner ask for them.
os.environ.setdefault("DEQBENCH_WORKERS", "1")


def calibrate_batchnorm(model, x):
    """Set every BatchNorm's running statistics to those of one train-mode forward on ``x``
    (no parameter is trained). An untrained model in eval mode has running stats (0, 1) and
    N(0, 0.01) convs, so its stem shrinks the input injection to ~1e-5 of the state and the
    output hardly depends on the input; after calibration it does."""
    moms = {}
    model.train()
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            moms[mod] = mod.momentum
            mod.momentum = 1.0
    with torch.no_grad():
        model(x)
    for mod, mom in moms.items():
        mod.momentum = mom
    return model.eval()


@pytest.fixture
def tiny_model():
    """An untrained deq_tiny_fashion_mnist (1x28x28) in eval mode, seeded."""
    import model_zoo as mz
    torch.manual_seed(0)
    return mz.create("deq_tiny_fashion_mnist").eval()


@pytest.fixture
def calibrated_tiny_model():
    """deq_tiny_fashion_mnist (dropout off) with BatchNorm statistics calibrated on random
    images, in eval mode: an untrained model whose output depends on its input."""
    import model_zoo as mz
    torch.manual_seed(0)
    m = mz.create("deq_tiny_fashion_mnist", dropout=0.0)
    return calibrate_batchnorm(m, torch.rand(64, 1, 28, 28))


@pytest.fixture
def tiny_double_model():
    """A very small float64 MDEQ on 1x8x8 images (BatchNorm calibrated, eval mode), cheap
    enough for torch.autograd.gradcheck."""
    import model_zoo as mz
    torch.manual_seed(0)
    cfg = dataclasses.replace(mz.MDEQ_CONFIGS["deq_tiny"], channels=(4, 4), head_channels=(2, 2),
                              final_channels=8, num_groups=2, expansion=1, dropout=0.0)
    m = mz.MDEQClassifier(cfg, 1, (8, 8)).double()
    return calibrate_batchnorm(m, torch.rand(32, 1, 8, 8, dtype=torch.float64))

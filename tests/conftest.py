"""Shared fixtures for the model-zoo tests."""
import pytest
import torch


@pytest.fixture
def tiny_model():
    """An untrained deq_tiny_fashion_mnist (1x28x28) in eval mode, seeded."""
    import model_zoo as mz
    torch.manual_seed(0)
    return mz.create("deq_tiny_fashion_mnist").eval()


@pytest.fixture
def tiny_double_model():
    """A very small float64 MDEQ on 1x28x28 in eval mode, for gradcheck."""
    import model_zoo as mz
    torch.manual_seed(0)
    return mz.create("deq_tiny_fashion_mnist", channels=(4, 4), head_channels=(2, 2),
                     final_channels=8, num_groups=2, expansion=1).double().eval()

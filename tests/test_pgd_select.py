"""Ready-made PGD and the early-state selection protocol (EarlyState('select'))."""
import pytest
import torch
import torch.nn.functional as F

import model_zoo as mz
from attacks import check_linf_ball, pgd_linf, select_early_state
from benchmark.data import load_dataset


def _linear_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))


def test_pgd_stays_in_ball_and_increases_loss():
    net = _linear_model()
    x = torch.rand(32, 1, 4, 4)
    y = net(x).argmax(-1)
    res = pgd_linf(net, x, y, eps=0.1, alpha=0.025, steps=10, generator=torch.Generator().manual_seed(0))
    check_linf_ball(res.x_adv, x, 0.1)
    assert (res.x_adv - x).abs().max() <= 0.1 + 1e-6
    assert F.cross_entropy(net(res.x_adv), y) > F.cross_entropy(net(x), y)
    # linear model, eps large enough: PGD must flip many points
    assert res.correct.float().mean() < 1.0


def test_check_linf_ball_rejects_violations():
    x = torch.full((2, 1, 2, 2), 0.5)
    with pytest.raises(ValueError, match="leave the eps=0.1 ball"):
        check_linf_ball(x + 0.2, x, 0.1)
    with pytest.raises(ValueError, match=r"leave \[0, 1\]"):
        check_linf_ball(torch.full_like(x, 1.05), torch.ones_like(x), 0.1)


def test_select_early_state_records_choice():
    torch.manual_seed(0)
    m = mz.create("deq_tiny_fashion_mnist").eval()
    ds = load_dataset("synthetic", "val", shape=(1, 28, 28), n_train=200, val_size=24, seed=1)
    early = select_early_state(m, ds.images[:12], ds.labels[:12], eps=0.1, alpha=0.025,
                               steps=2, batch_size=6)
    acc = early.selection["accuracy_per_state"]
    assert len(acc) == m.solver.max_iter
    assert 1 <= early.index <= m.solver.max_iter
    assert acc[early.index - 1] == max(acc)
    # ties go to the later state
    assert all(a < max(acc) for a in acc[early.index:])
    m.set_defense(early)
    out = m(ds.images[:3])
    assert out.shape == (3, 10)
    assert m.defense.config()["index"] == early.index


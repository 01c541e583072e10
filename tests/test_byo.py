"""Bring your own model (issue 14): the DEQ protocol, the torchdeq adapter, contiguous data,
models from user code (factories, configs, CLI), ``benchmark()`` and entry identity.

The two outside models live in ``examples/byo/`` (plain user code: a torchdeq DEQ and a CNN
that flattens with ``x.view``); their weights in ``tests/data/byo/`` were trained by
``examples/byo/train_byo.py`` (400 Adam steps each, SHA-256 files beside them).
"""
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import model_zoo as mz
from model_zoo.protocol import (ProtocolError, check_deq_protocol, is_deq_aware,
                                require_deq_protocol)

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "byo"
DATA = ROOT / "tests" / "data" / "byo"
DEQ_CKPT = DATA / "torchdeq_fmnist.pt"
CNN_CKPT = DATA / "cnn_fmnist.pt"


def _sha_file(p):
    return p.with_name(p.name + ".sha256").read_text().split()[0]


@pytest.fixture(scope="module")
def examples():
    sys.path.insert(0, str(EX))
    import cnn_fmnist
    import torchdeq_fmnist
    yield torchdeq_fmnist, cnn_fmnist
    sys.path.remove(str(EX))


@pytest.fixture(scope="module")
def fmnist_test():
    from benchmark.data import load_dataset
    return load_dataset("fashion_mnist", "test")


@pytest.fixture(scope="module")
def tdeq(examples):
    """(the user's own torchdeq model, the same weights behind the deqbench adapter)."""
    torchdeq_fmnist, _ = examples
    sd = torch.load(DEQ_CKPT, map_location="cpu", weights_only=True)
    net = torchdeq_fmnist.TinyTorchDEQ()
    net.load_state_dict(sd)
    model = torchdeq_fmnist.make_model()
    model.load_state_dict(sd)          # a checkpoint of the bare torchdeq module loads as is
    return net.eval(), model.eval()


def test_shipped_checkpoints_match_their_sha256():
    for p in (DEQ_CKPT, CNN_CKPT):
        assert hashlib.sha256(p.read_bytes()).hexdigest() == _sha_file(p)


# ---------------------------------------------------------------------------------------------
# data: every loader hands out row-major tensors
# ---------------------------------------------------------------------------------------------

class ViewNet(nn.Module):
    """conv -> x.view(B, -1): fails on channels_last-strided inputs."""

    def __init__(self, c=1, hw=28):
        super().__init__()
        self.conv = nn.Conv2d(c, 4, 3, padding=1)
        self.fc = nn.Linear(4 * hw * hw, 10)

    def forward(self, x):
        x = self.conv(x)
        return self.fc(x.view(x.size(0), -1))


def test_every_loader_returns_row_major_tensors_a_view_model_accepts(tmp_path):
    from benchmark.data import load_dataset, subset
    # MNIST has the same IDX layout: point its loader at the Fashion-MNIST files
    mnist_root = tmp_path / "mnist"
    mnist_root.mkdir()
    for f in Path("/usr/share/datasets/fashion-mnist").glob("*.gz"):
        (mnist_root / f.name).symlink_to(f)
    sets = [load_dataset("fashion_mnist", s) for s in ("train", "val", "test")]
    sets += [load_dataset("mnist", "test", root=mnist_root),
             load_dataset("synthetic", "test", n_test=20, shape=(3, 8, 8))]
    sets += [subset(sets[2], 16, seed=3), subset(sets[2], 16, stratified=True)]
    for ds in sets:
        x = ds.images
        C, H, W = x.shape[1:]
        assert x.stride() == (C * H * W, H * W, W, 1), (ds, x.stride())
        assert ds.labels.is_contiguous()
        out = ViewNet(C, H)(x[:5])
        assert out.shape == (5, 10)
    # the defect itself: channels_last strides break the view model
    bad = sets[2].images[:5].clone().as_strided((5, 1, 28, 28), (784, 1, 28, 1))
    assert bad.stride() == (784, 1, 28, 1) and bad.is_contiguous()   # what numpy gave before
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        ViewNet()(bad)


# ---------------------------------------------------------------------------------------------
# the DEQ protocol
# ---------------------------------------------------------------------------------------------

def test_protocol_names_what_a_model_lacks(tiny_model, tdeq):
    rep = check_deq_protocol(tiny_model, torch.rand(2, 1, 28, 28))
    assert rep.ok and rep.probed and rep.features == ["core", "entropy_reduction"]
    assert check_deq_protocol(tdeq[1], torch.rand(2, 1, 28, 28)).features == \
        ["core", "entropy_reduction"]

    class HalfDEQ(nn.Module):
        is_deq = True

        def context(self, x):
            return None

    rep = check_deq_protocol(HalfDEQ())
    assert not rep.ok
    for name in ("model.solver", "model.zero_state", "model.run", "model.set_defense"):
        assert name in rep.missing["core"]
    assert "model.context" not in rep.missing["core"]
    with pytest.raises(ProtocolError, match="model.solver.*model.zero_state|model.zero_state"):
        is_deq_aware(HalfDEQ())
    # a plain classifier is not DEQ-aware and that is no error
    assert is_deq_aware(ViewNet()) is False
    assert not check_deq_protocol(ViewNet()).ok
    # the registry refuses a half DEQ instead of treating it as a plain classifier
    mz.register(name="half_deq_test", factory=lambda **kw: HalfDEQ(), dataset="fashion_mnist",
                input_shape=(1, 28, 28), overwrite=True)
    with pytest.raises(ProtocolError, match="model.solver"):
        mz.create("half_deq_test")


def test_protocol_probe_catches_wrong_shapes(tdeq):
    import copy
    m = copy.deepcopy(tdeq[1])
    m.zero_state = lambda x: x.new_zeros(x.shape[0], 7)          # wrong D
    rep = check_deq_protocol(m, torch.rand(2, 1, 28, 28))
    assert not rep.ok and any("ctx.f" in s or "probing" in s for s in rep.missing["core"])
    # entropy reduction needs Broyden
    m2 = copy.deepcopy(tdeq[1])
    m2.solver = mz.FixedPoint(max_iter=8)
    rep = require_deq_protocol(m2)
    assert rep.supports("core") and not rep.supports("entropy_reduction")
    assert "a Broyden solver (model.solver is FixedPoint)" in rep.missing["entropy_reduction"]


# ---------------------------------------------------------------------------------------------
# the torchdeq adapter on a trained torchdeq DEQ
# ---------------------------------------------------------------------------------------------

def test_torchdeq_adapter_equals_the_models_own_forward(tdeq, fmnist_test):
    net, model = tdeq
    x, y = fmnist_test.images[:200], fmnist_test.labels[:200]
    # the solver is read from the torchdeq DEQ
    assert type(model.solver).__name__ == "Broyden"
    assert (model.solver.max_iter, model.solver.eps, model.solver.stop_mode) == (8, 1e-3, "rel")
    with torch.no_grad():
        own = net(x)                                   # torchdeq's own eval forward
        rec = model.run(x, per_state=True)
    torch.testing.assert_close(rec.logits, own, rtol=1e-5, atol=1e-5)
    acc = (rec.logits.argmax(1) == y).float().mean().item()
    assert acc > 0.6, acc                              # chance is 0.10
    # at the same number of iterations (no early stop, last iterate) it is z[N] exactly
    for n in (3, 8):
        net.deq.f_tol, net.deq.eval_f_max_iter = 0.0, n
        with torch.no_grad():
            u = net.injection(x[:16])
            z, _ = net.deq(lambda z: net.cell(z, u), torch.zeros_like(u),
                           solver_kwargs={"return_final": True})
            own_n = net.head(z[-1])
            mine = model.run(x[:16], defense=mz.EarlyState(n)).logits
        torch.testing.assert_close(mine, own_n, rtol=1e-5, atol=1e-5)
    net.deq.f_tol, net.deq.eval_f_max_iter = 1e-3, 8
    # the trajectory: N states, per-state logits and entropies
    assert rec.trajectory.num_states == 8 and rec.state_logits.shape == (8, 200, 10)
    assert rec.entropies.shape == (8, 200) and bool(torch.isfinite(rec.entropies).all())
    assert int(rec.nfev_nograd[0]) == 9                 # g(z[0]) and g at z[1..8]


def test_torchdeq_adapter_runs_the_deq_protocol(tdeq, fmnist_test):
    from attacks.evaluation import autoattack_attack, grid_attack
    from attacks.pgd import select_early_state
    from attacks.surrogates import JudgedModule, UnrolledIntermediate, grid_settings
    _, model = tdeq
    x, y = fmnist_test.images[:8], fmnist_test.labels[:8]
    early = model.run(x, defense=mz.EarlyState(4))
    assert early.readout == "z[4]" and early.logits.shape == (8, 10)
    er = model.run(x, defense=mz.EntropyReduction(eps=0.1, beta=0.025, r=2, tf=2))
    d = (er.x_used - x).abs().max().item()
    assert 0 < d <= 0.1 + 1e-6                          # the input was purified, within eps
    g = grid_attack(model, model.defense, x, y, 0.1, 0.025, 3,
                    settings=grid_settings(8, kas=[1, 5], lams=(0.5,)), mode="full")
    assert g.per_setting.shape == (16, 8)
    assert 0 <= g.worst_case_accuracy <= (model(x).argmax(1) == y).float().mean().item()
    out = autoattack_attack(JudgedModule(model, model.defense, UnrolledIntermediate(8, 5, 0.5)),
                            x, y, 0.1, attacks=("apgd-ce",), budget={"apgd_n_iter": 5}, seed=0)
    assert out.correct.shape == (8,)
    sel = select_early_state(model, fmnist_test.images[100:116], fmnist_test.labels[100:116],
                             0.1, 0.025, 2)
    assert 1 <= sel.index <= 8

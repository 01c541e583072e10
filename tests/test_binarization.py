"""The binarization attack-strength test (Zimmermann et al., NeurIPS 2022): attacks/binarization.py
and the ``strength`` protocol attack (benchmark/suite/strength.py).

The decisive cases: the same PGD passes the test through a proper gradient and FAILS it (low pass
rate, flag raised) through a gradient-masking wrapper (bit-depth rounding, zero gradient a.e.) and,
on a DEQ, through a deliberately poor surrogate (a fixed random input direction)."""
import json

import pytest
import torch
from torch import nn

import model_zoo
from attacks.binarization import (DEFAULT_THRESHOLD, BinarizationSettings, binarization_test,
                                  binarized, find_readout, fit_binary_readout, readout_features,
                                  sample_boundary, sample_inner, strength_summary)
from attacks.evaluation import pgd_attack
from attacks.surrogates import GradientSource, JudgedModule, PhantomFinal
from benchmark.data import load_dataset, subset

EPS = 0.1


@pytest.fixture(scope="module")
def images():
    ds = subset(load_dataset("fashion_mnist", "test"), 12, seed=0)
    return ds.images, ds.labels


@pytest.fixture(scope="module")
def cnn():
    return model_zoo.load("small_cnn_fmnist_pgdat", device="cpu")


@pytest.fixture(scope="module")
def deq():
    return model_zoo.load("deq_tiny_fmnist_pgdat", device="cpu")


class RoundedInput(nn.Module):
    """Gradient masking: the classifier sees its input rounded to 8 bits, whose gradient is zero
    almost everywhere (a bit-depth-reduction "defense"); the forward is (nearly) the model's."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.num_classes = net.num_classes

    def forward(self, x):
        return self.net(torch.round(x * 255) / 255)


class RandomDirection(GradientSource):
    """A deliberately poor DEQ gradient: the reported logits, but the input-gradient of every
    logit is one fixed random direction (nothing to do with the model)."""
    name = "random_direction"

    def logits(self, model, x):
        r = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(1)).to(x)
        with torch.no_grad():
            lg = model.run(x.detach()).logits
        s = (x * r).flatten(1).sum(1, keepdim=True)
        return lg + s * torch.arange(lg.shape[1], dtype=x.dtype)


def _pgd(model, surrogate=None):
    def attack(x1, y1):
        return pgd_attack(JudgedModule(model, None, surrogate), x1, y1, EPS, EPS / 4, 10,
                          seed=0).x_adv
    return attack


def test_sampling_stays_in_the_balls():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 28, 28)
    x[0, :5] = 0.0  # clipped coordinates
    x[0, 5:10] = 1.0
    inner = sample_inner(x, 50, EPS, 0.05, gen)
    assert inner.shape == (50, 1, 28, 28) and torch.equal(inner[0], x)
    d_in = (inner - x).abs().flatten(1).max(1).values
    assert float(d_in.max()) <= 0.95 * EPS + 1e-6 and float(d_in[1:].min()) > 0.9 * EPS
    assert float(inner.min()) >= 0 and float(inner.max()) <= 1
    for mode in ("surface", "corners"):
        b = sample_boundary(x, 7, EPS, mode, gen)
        d = (b - x).abs().flatten(1).max(1).values
        assert torch.allclose(d, torch.full_like(d, EPS), atol=1e-6), (mode, d)
        assert float(b.min()) >= 0 and float(b.max()) <= 1
    with pytest.raises(ValueError, match="boundary"):
        BinarizationSettings(boundary="edges")
    with pytest.raises(ValueError, match="threshold_at"):
        BinarizationSettings(threshold_at=1.0)


def test_fit_separates_and_scales():
    torch.manual_seed(0)
    fi = torch.randn(200, 32)
    fb = torch.randn(1, 32) + 0.5
    layer, info = fit_binary_readout(fi, fb, threshold_at=0.5)
    s = lambda f: (layer(f)[:, 1] - layer(f)[:, 0]).detach()
    si, sb = s(fi), s(fb)
    assert float(si.max()) < 0 < float(sb.min())
    # threshold in the middle of the gap, training scores span unit range
    assert abs(float(-si.max()) - float(sb.min())) < 1e-4
    span = float(torch.cat([si, sb]).max() - torch.cat([si, sb]).min())
    assert abs(span - 1.0) < 1e-4 and info["score_gap"] > 0
    # a boundary feature inside the inner cloud's hull cannot be separated: setup failure
    layer, info = fit_binary_readout(fi, fi[:5].mean(0, keepdim=True))
    assert layer is None and info["score_gap"] <= 0


def test_binarized_swaps_and_restores_the_readout(cnn, deq):
    parent, name, old = find_readout(cnn)
    assert old.out_features == 10 and isinstance(old, nn.Linear)
    assert find_readout(deq)[2] is deq.head.classifier
    new = nn.Linear(old.in_features, 2)
    x = torch.rand(3, 1, 28, 28)
    with binarized(cnn, new):
        assert getattr(parent, name) is new and cnn.num_classes == 2
        assert cnn(x).shape == (3, 2)
    assert getattr(parent, name) is old and cnn.num_classes == 10
    with pytest.raises(RuntimeError):
        with binarized(cnn, new):
            raise RuntimeError("boom")
    assert getattr(parent, name) is old and cnn.num_classes == 10
    # the features are the readout's input: the original logits are W phi + b
    f = readout_features(cnn, x)
    with torch.no_grad():
        assert torch.allclose(old(f), cnn(x), atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        with binarized(cnn, nn.Linear(3, 2)):
            pass


def test_plain_model_passes_with_its_gradient_and_fails_when_masked(cnn, images):
    x = images[0][:10]
    st = BinarizationSettings(n_inner=99, n_validation=16)
    good = binarization_test(cnn, x, EPS, _pgd(cnn), settings=st, seed=0)
    assert all(r.setup == "ok" for r in good)
    # the guarantee: the boundary point is class 1 on the binarized model, x is class 0
    assert all(r.boundary_margin < 0 for r in good)
    # random noise alone rarely solves it (measured 0-5% of 16 points per test point)
    assert sum(r.random_asr for r in good) / len(good) < 0.1
    s_good = strength_summary([r.passed for r in good])
    assert s_good["n"] == 10 and s_good["pass_rate"] >= DEFAULT_THRESHOLD
    assert s_good["flag"] is False
    for r in good:
        assert r.x_adv.shape == (1, 28, 28)
        assert float((r.x_adv - x[good.index(r)]).abs().max()) <= EPS + 1e-6

    masked = RoundedInput(cnn)
    bad = binarization_test(masked, x, EPS, _pgd(masked), settings=st, seed=0)
    assert sum(r.setup == "ok" for r in bad) >= 8
    s_bad = strength_summary([r.passed for r in bad])
    assert s_bad["pass_rate"] <= 0.2 and s_bad["flag"] is True
    assert s_bad["ci_high"] < DEFAULT_THRESHOLD  # the weakness is significant, not noise


@pytest.mark.slow  # ~30 s on the shared 2-core CPU (12 DEQ points, 2 solves per PGD step)
def test_deq_passes_with_the_phantom_gradient_and_fails_with_a_poor_one(deq, images):
    x = images[0][:6]
    st = BinarizationSettings(n_inner=49)
    good = binarization_test(deq, x, EPS, _pgd(deq, PhantomFinal()), settings=st, seed=0)
    s_good = strength_summary([r.passed for r in good])
    assert s_good["n"] == 6 and s_good["passes"] == 6 and s_good["flag"] is False
    bad = binarization_test(deq, x, EPS, _pgd(deq, RandomDirection()), settings=st, seed=0)
    s_bad = strength_summary([r.passed for r in bad])
    # a random direction's sign steps sometimes land in class 1 by luck: 2 of 6 measured
    assert s_bad["n"] == 6 and s_bad["pass_rate"] <= 0.5 and s_bad["flag"] is True
    # the readout is the model's own again afterwards
    assert deq.head.classifier.out_features == 10


def test_apgd_ce_runs_on_the_binary_problem(cnn, images):
    """The suite's ``attack: apgd-ce`` (pyautoattack) accepts the 2-logit binarized model."""
    from attacks.evaluation import autoattack_attack

    def attack(x1, y1):
        return autoattack_attack(JudgedModule(cnn, None, None), x1, y1, EPS, attacks=["apgd-ce"],
                                 budget={"apgd_n_iter": 10}, seed=0).x_adv
    res = binarization_test(cnn, images[0][:3], EPS, attack,
                            settings=BinarizationSettings(n_inner=49), seed=0)
    assert [r.passed for r in res] == [True] * 3 and all(r.margin < 0 for r in res)


def test_strength_summary_statistics():
    s = strength_summary([True] * 19 + [False] + [None, None])
    assert (s["n"], s["passes"], s["setup_failures"]) == (20, 19, 2)
    assert s["pass_rate"] == 0.95 and s["flag"] is False
    from scipy.stats import binomtest
    ci = binomtest(19, 20).proportion_ci(method="exact")
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert strength_summary([True] * 17 + [False] * 3)["flag"] is True  # 0.85 < 0.9
    none = strength_summary([None])
    assert none["flag"] is None and none["n"] == 0  # not checked is not "no flag"


def _cfg(tmp_path, **strength):
    from benchmark.run_config import from_dict
    return from_dict({
        "name": "strength_test", "output": str(tmp_path / "run"), "seed": 0, "device": "cpu",
        "batch_size": 64, "shard_size": 4,
        "data": {"dataset": "fashion_mnist", "n": 8, "seed": 0},
        "threat": {"norm": "Linf", "eps": EPS},
        "models": [{"name": "small_cnn_fmnist_pgdat"}],
        "attacks": {"pgd": {"steps": 5, "alpha": 0.03},
                    "strength": {"n": 20, "n_inner": 49, **strength}}})


def test_strength_protocol_attack_records_and_summary(tmp_path):
    from benchmark.results_db import ResultsDB
    from benchmark.runner import evaluate
    cfg = _cfg(tmp_path)
    out = evaluate(cfg, progress=False)
    row = out["summary"].iloc[0]
    with ResultsDB(out["db"]) as db:
        recs = db.records_frame(attack="strength")
        units = db.units_frame()
    # n = 20 > 8 examples: every example of both shards is tested, once
    assert sorted(recs.example) == sorted(db_ex for db_ex in set(recs.example))
    assert len(recs) == 8 and set(recs.setting) == {"binarization"}
    ex = [json.loads(e) for e in recs.extra]
    assert all(e["threshold"] == DEFAULT_THRESHOLD and e["setup"] == "ok" for e in ex)
    assert all((e["passed"] is True) == (c == 0) for e, c in zip(ex, recs.correct))
    conf = json.loads(units[units.attack == "strength"].config.iloc[0])["attack"]
    assert conf["steps"] == 5 and conf["alpha"] == 0.03  # inherited from attacks.pgd
    assert conf["tested"] == "pgd" and conf["n_inner"] == 49
    assert row["strength_n"] == 8
    assert row["strength"] == pytest.approx(1 - recs.correct.mean())
    assert row["strength_flag"] == (row["strength"] < DEFAULT_THRESHOLD)
    assert row["strength_ci_low"] <= row["strength"] <= row["strength_ci_high"]
    # never an eps-attack on the entry: ALL is the pgd worst case alone
    assert row["ALL"] == pytest.approx(row["pgd"])


@pytest.mark.parametrize("opts, key", [({"n": 5}, "attacks.strength.n"),
                                       ({"threshold": 1.5}, "attacks.strength.threshold"),
                                       ({"gap": 1.0}, "attacks.strength.gap"),
                                       ({"boundary": "edge"}, "attacks.strength.boundary"),
                                       ({"attack": "fgsm"}, "attacks.strength.attack"),
                                       ({"surrogate": "strongest"}, "attacks.strength.surrogate"),
                                       ({"n_inner": 0}, "attacks.strength.n_inner")])
def test_strength_config_errors_name_the_key(tmp_path, opts, key):
    from benchmark.run_config import ConfigError
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(tmp_path, **opts)


def test_leaderboard_shows_the_pass_rate_and_the_flag():
    from benchmark.leaderboard import _flags_text, validate_entry  # noqa: F401
    from benchmark.suite.strength import strength_flag
    import pandas as pd
    recs = pd.DataFrame({"attack": ["strength"] * 4 + ["clean"],
                         "setting": ["binarization"] * 3 + ["binarization_setup_failed", "-"],
                         "correct": [0, 1, 1, 1, 1],
                         "extra": [json.dumps({"threshold": 0.5})] * 4 + [None]})
    f = strength_flag(recs)
    assert (f["n"], f["passes"], f["setup_failures"], f["threshold"]) == (3, 1, 1, 0.5)
    assert f["flag"] is True and f["pass_rate"] == pytest.approx(1 / 3)
    assert "attack strength 1/3 (FLAG)" in _flags_text({"attack_strength": f})
    ok = dict(f, flag=False, passes=3, pass_rate=1.0)
    text = _flags_text({"attack_strength": ok, "grad_masking": {"flag": False}})
    assert text == "attack strength 3/3"
    assert strength_flag(recs[recs.attack == "clean"]) is None  # not run: no flag record

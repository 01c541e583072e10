"""benchmark.report.stats: exact intervals, McNemar, Newcombe's paired interval, Holm."""
import math

import numpy as np
import pytest
from scipy.stats import beta, binomtest

from benchmark.report import stats


def test_clopper_pearson_hand_computed():
    # 0/48 and 48/48: closed forms 1 - 0.025**(1/48) and 0.025**(1/48)
    q = 0.025 ** (1 / 48)
    assert stats.clopper_pearson(0, 48) == pytest.approx((0.0, 1 - q), abs=1e-12)
    assert stats.clopper_pearson(48, 48) == pytest.approx((q, 1.0), abs=1e-12)
    assert 1 - q == pytest.approx(0.07397, abs=1e-5)
    # 21/48 = 43.75 %: the issue's [29.5, 58.8], and the beta-quantile definition
    lo, hi = stats.clopper_pearson(21, 48)
    assert (round(100 * lo, 1), round(100 * hi, 1)) == (29.5, 58.8)
    assert lo == pytest.approx(beta.ppf(0.025, 21, 28), rel=1e-9)
    assert hi == pytest.approx(beta.ppf(0.975, 22, 27), rel=1e-9)
    assert all(math.isnan(v) for v in stats.clopper_pearson(0, 0))
    with pytest.raises(ValueError):
        stats.clopper_pearson(5, 4)


def test_mcnemar_hand_computed_and_scipy():
    assert stats.mcnemar_exact(0, 0) == 1.0            # no discordant pair: no evidence
    assert stats.mcnemar_exact(1, 0) == pytest.approx(1.0)   # 2 * 0.5
    # 7 vs 2: 2 * (C(9,0)+C(9,1)+C(9,2)) / 2**9 = 92/512
    assert stats.mcnemar_exact(7, 2) == pytest.approx(92 / 512, abs=1e-12)
    assert stats.mcnemar_exact(2, 7) == stats.mcnemar_exact(7, 2)
    assert stats.mcnemar_exact(6, 0) == pytest.approx(2 / 64)
    for b, c in ((3, 11), (20, 9), (0, 5)):
        assert stats.mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue)


def test_paired_difference_ci_properties():
    # a = both right, b = A only, c = B only, d = both wrong
    for a, b, c, d in ((12, 9, 2, 21), (0, 0, 0, 48), (48, 0, 0, 0), (20, 7, 2, 19), (0, 5, 0, 0)):
        lo, hi = stats.paired_difference_ci(a, b, c, d)
        n = a + b + c + d
        theta = (b - c) / n
        assert -1 <= lo <= theta <= hi <= 1
        # swapping A and B mirrors the interval
        lo2, hi2 = stats.paired_difference_ci(a, c, b, d)
        assert (lo2, hi2) == pytest.approx((-hi, -lo), abs=1e-12)
    # no discordant pair: the interval still has width (uncertainty), and contains 0
    lo, hi = stats.paired_difference_ci(21, 0, 0, 27)
    assert lo < 0 < hi and hi - lo > 0.05
    # a clear effect excludes 0: 30 discordant pairs all one way out of 48
    lo, hi = stats.paired_difference_ci(10, 30, 0, 8)
    assert lo > 0
    # every example right under both (phi undefined -> 0): +-(1 - Wilson lower limit of 48/48)
    wl, _ = stats.wilson(48, 48)
    assert stats.paired_difference_ci(48, 0, 0, 0) == pytest.approx((-(1 - wl), 1 - wl))


def test_paired_comparison_counts_and_verdict():
    a = np.array([1] * 10 + [1] * 7 + [0] * 2 + [0] * 29)
    b = np.array([1] * 10 + [0] * 7 + [1] * 2 + [0] * 29)
    pc = stats.paired_comparison(a, b)
    assert (pc.n, pc.b, pc.c) == (48, 7, 2)
    assert pc.diff == pytest.approx(5 / 48)
    assert pc.acc_a == pytest.approx(17 / 48) and pc.acc_b == pytest.approx(12 / 48)
    assert pc.p == pytest.approx(92 / 512)
    assert pc.verdict == "inconclusive"
    assert "inconclusive" in pc.words("PGD", "grid")
    strong = stats.paired_comparison([1] * 12 + [0] * 36, [0] * 48)
    assert strong.verdict == "A higher" and strong.p < 0.001
    assert "A is higher" in strong.words()
    with pytest.raises(ValueError):
        stats.paired_comparison([1, 0], [1])


def test_holm():
    adj = stats.holm([0.01, 0.04, 0.03, None, 0.5])
    # sorted 0.01, 0.03, 0.04, 0.5 with m = 4: 0.04, 0.09, 0.09 (monotone), 0.5
    assert adj[0] == pytest.approx(0.04)
    assert adj[2] == pytest.approx(0.09)
    assert adj[1] == pytest.approx(0.09)
    assert adj[3] is None
    assert adj[4] == pytest.approx(0.5)
    assert stats.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])


def test_resolvable_difference_at_48():
    r = stats.resolvable_difference(48, 0.4375)
    assert r["min_discordant"] == 6          # 2 * 0.5**6 = 0.031 < 0.05; 5: 0.0625
    assert r["min_diff"] == pytest.approx(6 / 48)
    assert r["half_width"] == pytest.approx((0.588 - 0.295) / 2, abs=0.002)
    assert stats.format_interval((0.295, 0.588)) == "[29.5, 58.8]"


def test_summary_with_intervals():
    import pandas as pd
    summ = pd.DataFrame({"model": ["a", "b"], "n": [48, 48], "clean": [29 / 48, 1.0],
                         "ALL": [21 / 48, float("nan")], "f_evals_per_forward": [19.0, 0.0]})
    out = stats.summary_with_intervals(summ)
    assert out.ALL.tolist() == ["43.75 [29.5, 58.8]", "-"]
    assert out.clean[1] == "100.00 [92.6, 100.0]"
    assert out.f_evals_per_forward.tolist() == [19.0, 0.0]       # not an accuracy: untouched

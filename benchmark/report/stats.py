"""Statistics for every number deqbench publishes: exact intervals and paired tests.

* :func:`clopper_pearson` -- the exact (Clopper-Pearson) 95% interval of an accuracy k/n, from
  :func:`scipy.stats.binomtest` (``proportion_ci(method="exact")``).
* :func:`mcnemar_exact` -- the exact McNemar test of two accuracies measured on the SAME examples:
  a two-sided binomial test of the discordant pairs (b examples right only under A, c right only
  under B; under H0 b ~ Binomial(b + c, 1/2)).
* :func:`paired_difference_ci` -- the 95% interval of the paired difference acc_A - acc_B,
  Newcombe (1998) method 10 (Wilson score intervals of both marginals combined with the
  continuity-corrected phi correlation). Written here because scipy has no paired-difference
  interval (statsmodels neither); the Wilson limits themselves come from scipy.
* :func:`paired_comparison` -- the three together from two per-example 0/1 vectors, plus a verdict
  in words (``"A higher"``, ``"B higher"`` or ``"inconclusive"`` at the given level).
* :func:`holm` -- Holm's step-down adjustment of a family of p-values.

All accuracies are fractions in [0, 1]; intervals are ``(lo, hi)`` tuples of fractions.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
from scipy.stats import binomtest

__all__ = ["LEVEL", "ALPHA", "clopper_pearson", "wilson", "mcnemar_exact", "paired_difference_ci",
           "PairedComparison", "paired_comparison", "holm", "format_interval", "resolvable_difference"]

LEVEL = 0.95     #: confidence level of every interval
ALPHA = 0.05     #: two-sided significance level of every test (Holm-adjusted within a family)


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple:
    """Exact (Clopper-Pearson) interval of the proportion k/n; ``(nan, nan)`` for n = 0."""
    k, n = int(k), int(n)
    if n <= 0:
        return (float("nan"), float("nan"))
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return (float(ci.low), float(ci.high))


def wilson(k: int, n: int, level: float = LEVEL) -> tuple:
    """Wilson score interval of k/n (scipy), the building block of Newcombe's paired interval."""
    if n <= 0:
        return (float("nan"), float("nan"))
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return (float(ci.low), float(ci.high))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b, c: the binomial test of
    b successes in b + c trials at p = 1/2 (1.0 when there is no discordant pair)."""
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def paired_difference_ci(a: int, b: int, c: int, d: int, level: float = LEVEL) -> tuple:
    """Newcombe (1998) method 10 interval of p1 - p2 = (b - c) / n for a paired 2x2 table:
    a = both right, b = right only under the first, c = right only under the second,
    d = both wrong. Own code (scipy has no paired interval); the Wilson limits are scipy's."""
    a, b, c, d = (int(v) for v in (a, b, c, d))
    n = a + b + c + d
    if n == 0:
        return (float("nan"), float("nan"))
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, level)
    l2, u2 = wilson(a + c, n, level)
    den = (a + b) * (c + d) * (a + c) * (b + d)
    phi = 0.0
    if den > 0:
        num = a * d - b * c
        # Newcombe's continuity correction of phi: shrink a positive association by n/2
        num = max(num - n / 2.0, 0.0) if num > 0 else num
        phi = num / math.sqrt(den)
    theta = p1 - p2
    lo = theta - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    hi = theta + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return (max(-1.0, lo), min(1.0, hi))


@dataclass
class PairedComparison:
    """acc_a - acc_b on the same n examples, with its interval and the exact McNemar p."""
    n: int
    acc_a: float
    acc_b: float
    diff: float
    ci95: tuple
    b: int          # right under A only
    c: int          # right under B only
    p: float
    verdict: str    # "A higher" | "B higher" | "inconclusive"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci95"] = [float(x) for x in self.ci95]
        return d

    def words(self, name_a: str = "A", name_b: str = "B", alpha: float = ALPHA) -> str:
        """One sentence: the difference in points, its interval, p and the conclusion."""
        lo, hi = self.ci95
        head = (f"{name_a} - {name_b} = {100 * self.diff:+.1f} points "
                f"[{100 * lo:+.1f}, {100 * hi:+.1f}], McNemar p = {self.p:.3g} "
                f"({self.b} vs {self.c} discordant, n = {self.n})")
        if self.p >= alpha:
            return head + ": inconclusive at this n (inside the noise)"
        return head + f": {name_a if self.diff > 0 else name_b} is higher"


def paired_comparison(x_a: Sequence, x_b: Sequence, alpha: float = ALPHA,
                      level: float = LEVEL) -> PairedComparison:
    """Compare two per-example 0/1 correctness vectors over the SAME examples (same order)."""
    xa = np.asarray(x_a, dtype=int)
    xb = np.asarray(x_b, dtype=int)
    if xa.shape != xb.shape or xa.ndim != 1:
        raise ValueError(f"paired vectors must be 1-D and equally long, got {xa.shape} and {xb.shape}")
    a = int(((xa == 1) & (xb == 1)).sum())
    b = int(((xa == 1) & (xb == 0)).sum())
    c = int(((xa == 0) & (xb == 1)).sum())
    d = int(((xa == 0) & (xb == 0)).sum())
    n = len(xa)
    p = mcnemar_exact(b, c)
    diff = (b - c) / n if n else float("nan")
    verdict = "inconclusive" if p >= alpha else ("A higher" if diff > 0 else "B higher")
    return PairedComparison(n=n, acc_a=(a + b) / n if n else float("nan"),
                            acc_b=(a + c) / n if n else float("nan"), diff=diff,
                            ci95=paired_difference_ci(a, b, c, d, level), b=b, c=c, p=p,
                            verdict=verdict)


def holm(pvalues: Iterable[Optional[float]]) -> list:
    """Holm's step-down adjusted p-values (same order; None/NaN stay None and are not counted):
    p_(i) * (m - i + 1), made monotone and capped at 1."""
    ps = [None if p is None or (isinstance(p, float) and math.isnan(p)) else float(p)
          for p in pvalues]
    idx = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
    m = len(idx)
    out: list = [None] * len(ps)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def format_interval(ci: Sequence, digits: int = 1) -> str:
    """(0.295, 0.588) -> "[29.5, 58.8]" (percent)."""
    lo, hi = ci
    if lo is None or hi is None or lo != lo or hi != hi:
        return "-"
    return f"[{100 * lo:.{digits}f}, {100 * hi:.{digits}f}]"


def resolvable_difference(n: int, acc: float = 0.5, alpha: float = ALPHA) -> dict:
    """How large a difference n examples can resolve: the half-width of the Clopper-Pearson
    interval at ``acc`` and the fewest discordant pairs, all in one direction, that the exact
    McNemar test calls significant (each discordant pair is 1/n of a point)."""
    k = int(round(acc * n))
    lo, hi = clopper_pearson(k, n)
    m = 1
    while mcnemar_exact(m, 0) >= alpha:
        m += 1
    return {"n": n, "half_width": (hi - lo) / 2, "min_discordant": m, "min_diff": m / n}


#: the accuracy columns of :func:`benchmark.runner.summarize` (fractions over its ``n``)
SUMMARY_ACCURACIES = ("clean", "pgd", "grid", "autoattack", "adaptive", "checks", "top_settings",
                      "transfer", "ALL", "min_over_means")


def summary_with_intervals(summary, columns: Sequence[str] = SUMMARY_ACCURACIES):
    """A run summary (one row per model/defense, fractions, an ``n`` column) -> a copy whose
    accuracy columns read "43.75 [29.5, 58.8]" (percent with the exact 95% interval), for the
    command line; values that are not a count out of n are printed without an interval."""
    out = summary.copy()
    if "n" not in out.columns:
        return out
    for col in columns:
        if col not in out.columns:
            continue
        cells = []
        for v, n in zip(summary[col], summary["n"]):
            try:
                v, n = float(v), int(n)
            except (TypeError, ValueError):
                cells.append("-")
                continue
            if v != v or n <= 0:
                cells.append("-")
            elif abs(v * n - round(v * n)) > 1e-6:
                cells.append(f"{100 * v:.2f}")
            else:
                cells.append(f"{100 * v:.2f} {format_interval(clopper_pearson(round(v * n), n))}")
        out[col] = cells
    return out

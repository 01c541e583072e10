"""``deqbench gap`` (benchmark.report.gap): the paired gap between a reduced protocol and its full
version, on synthetic runs built so every number is known by hand."""
import json

import pandas as pd
import pytest

from benchmark.report.gap import reduction_gap, to_markdown, write_gap
from benchmark.report.stats import clopper_pearson, mcnemar_exact
from benchmark.tables import RunData


def _records(clean, grid, aa, examples=None, model="m", defense="final"):
    ex = examples or list(range(len(clean)))
    rows = []
    for e, c, g, a in zip(ex, clean, grid, aa):
        rows.append({"model": model, "defense": defense, "attack": "clean", "setting": "-",
                     "example": e, "correct": c})
        if g is not None:
            rows.append({"model": model, "defense": defense, "attack": "grid",
                         "setting": "worst", "example": e, "correct": g})
        if a is not None:
            rows.append({"model": model, "defense": defense, "attack": "autoattack",
                         "setting": "ensemble", "example": e, "correct": a})
    return rows


def _run(rows, attacks):
    return RunData(records=pd.DataFrame(rows), meta={"config": {"attacks": attacks},
                                                      "dataset": {"name": "x", "n": 10}})


RED_ATT = {"grid": {"kas": [1, 5], "lams": [0.5, 1.0], "mode": "full"},
           "autoattack": {"attacks": ["apgd-ce"], "budget": {"apgd_n_iter": 10}}}
FULL_ATT = {"grid": {"mode": "efficient"}, "autoattack": {}}


def test_gap_counts_by_hand():
    clean = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    # reduced: grid holds 0-5, AA holds 0-6; full: grid breaks 3 of those (3, 4, 5) and holds
    # 7 that the reduced grid broke; AA standard breaks 6 and 5
    red = _records(clean, [1, 1, 1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    full = _records(clean, [1, 1, 1, 0, 0, 0, 0, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    res = reduction_gap(_run(red, RED_ATT), _run(full, FULL_ATT))
    rows = {r["attack"]: r for r in res["rows"]}
    g = rows["grid"]
    assert g["n"] == 10 and g["reduced"] == 0.6 and g["full"] == 0.4
    assert g["broken_only_by_full"] == 3 and g["broken_only_by_reduced"] == 1
    assert g["broken_only_by_full_ci95"] == pytest.approx(list(clopper_pearson(3, 10)))
    assert g["p"] == pytest.approx(mcnemar_exact(3, 1))
    assert g["difference"] == pytest.approx(0.2)
    assert g["conclusion"] == "inconclusive at this n"
    a = rows["autoattack"]
    assert (a["reduced"], a["full"], a["broken_only_by_full"], a["broken_only_by_reduced"]) == \
        (0.7, 0.5, 2, 0)
    # ALL: reduced min(grid, AA) = 0-5 robust; with the full attacks added: 0-2 only
    al = rows["ALL"]
    assert (al["reduced"], al["full"], al["broken_only_by_full"], al["broken_only_by_reduced"]) \
        == (0.6, 0.3, 3, 0)
    assert "Ka in [1, 5]" in res["reduced_budget"]["grid"]
    md = to_markdown(res)
    assert g["ci95"] == {"reduced": pytest.approx(list(clopper_pearson(6, 10))),
                         "full": pytest.approx(list(clopper_pearson(4, 10)))}
    lo, hi = (100 * v for v in clopper_pearson(3, 10))
    assert (f"| m | worst case (ALL) | 10 | 60.0 [26.2, 87.8] | 30.0 [{lo:.1f}, {hi:.1f}] | "
            "3 (30.0%)") in md
    assert "inconclusive at this n" in md


def test_gap_significant_and_only_common_examples():
    n = 40
    clean = [1] * n
    red = _records(clean, [1] * n, [1] * n)
    full = _records(clean[:30], [0] * 10 + [1] * 20, [1] * 30)   # 30 common examples
    res = reduction_gap(_run(red, RED_ATT), _run(full, FULL_ATT))
    g = {r["attack"]: r for r in res["rows"]}["grid"]
    assert g["n"] == 30 and g["broken_only_by_full"] == 10
    assert g["p"] == pytest.approx(2 * 0.5 ** 10)
    assert g["conclusion"] == "the reduced version overestimates robustness"


def test_gap_refuses_disagreeing_clean_outcomes():
    red = _records([1, 1], [1, 1], [1, 1])
    full = _records([1, 0], [1, 0], [1, 0])
    with pytest.raises(ValueError, match="disagree on clean"):
        reduction_gap(_run(red, RED_ATT), _run(full, FULL_ATT))


def test_write_gap_files(tmp_path):
    red = _records([1, 1, 0], [1, 0, 0], [1, 1, 0])
    full = _records([1, 1, 0], [0, 0, 0], [1, 0, 0])
    paths = write_gap(_run(red, RED_ATT), _run(full, FULL_ATT), out=tmp_path)
    assert [p.name for p in paths] == ["gap.md", "gap.json"]
    js = json.loads((tmp_path / "gap.json").read_text())
    assert {r["attack"] for r in js["rows"]} == {"grid", "autoattack", "ALL"}

"""Issue 16 goal 2: the grid's 'pruned' mode (benchmark/suite/grid.py) -- the full grid on a
calibration subset, a greedy set cover of the settings that broke something there, only those
on the other points, and an audit subset with every setting that measures the miss rate."""
from __future__ import annotations

import json
import random

import pytest

from benchmark.results_db import ResultsDB
from benchmark.run_config import ConfigError, from_dict
from benchmark.runner import evaluate
from benchmark.suite.grid import Grid, _meta_key, set_cover

ZOO = "deq_tiny_fmnist_pgdat"   # shipped, trained
N, SHARD = 8, 4


def test_set_cover_constructed():
    broke = {"a": {1, 2, 3}, "b": {3, 4}, "c": {4, 5}, "d": {1, 2, 3, 4}, "e": set()}
    # d breaks the most; then only point 5 is left, which c (not b) breaks
    assert set_cover(broke) == ["d", "c"]
    # ties go to the smaller name, whatever the dict order
    assert set_cover({"z": {1}, "m": {1}, "b": {2}}) == ["b", "m"]
    assert set_cover({"x": set(), "y": set()}) == []
    assert set_cover({}) == []


def test_set_cover_covers_random_matrices():
    rng = random.Random(0)
    for _ in range(50):
        broke = {f"s{j:02d}": {p for p in range(30) if rng.random() < 0.08} for j in range(20)}
        chosen = set_cover(broke)
        universe = set().union(*broke.values())
        assert set().union(*(broke[c] for c in chosen)) == universe
        covered = set()
        for c in chosen:   # every chosen setting adds a point, and never more than the best left
            gain = broke[c] - covered
            assert gain and len(gain) == max(len(v - covered) for v in broke.values())
            covered |= broke[c]


def _raw(out, **grid):
    return {"name": "pruned", "output": str(out), "seed": 0, "device": "cpu", "batch_size": 16,
            "shard_size": SHARD, "data": {"dataset": "fashion_mnist", "n": N, "seed": 0},
            "threat": {"eps": 0.1}, "models": [ZOO],
            "attacks": {"grid": {"steps": 2, "kas": [1, 2], "lams": [1.0], "mode": "pruned",
                                 "calibration": 3, "audit": 2, **grid}}}


def _run_until(cfg, uid):
    """Run units one at a time until ``uid`` is committed."""
    for _ in range(20):
        evaluate(cfg, progress=False, stop_after_units=1)
        with ResultsDB(cfg.run_dir / "results.sqlite") as db:
            if uid in db.done_units():
                return
    raise AssertionError(f"{uid} never ran")


def _unit_conf(db, uid):
    row = db.conn.execute("SELECT config FROM units WHERE unit_id = ?", (uid,)).fetchone()
    return json.loads(row[0])["attack"]


def test_pruned_run_reuses_calibration_and_audits(tmp_path, monkeypatch):
    cfg = from_dict(_raw(tmp_path))
    first = f"{ZOO}|final|grid|0-{SHARD}"
    _run_until(cfg, first)
    key = _meta_key(ZOO, "final")
    with ResultsDB(cfg.run_dir / "results.sqlite") as db:
        meta = db.get_meta(key)
        c0 = _unit_conf(db, first)["pruned"]
    assert meta is not None and meta["chosen"] and len(meta["calibration"]) == 3
    assert set(meta["calibration"]).isdisjoint(meta["audit"]) and len(meta["audit"]) == 2
    assert c0["calibrated_in_this_unit"] and not c0["calibration_reused"]
    assert c0["chosen"] == meta["chosen"] and c0["calibration_indices"] == meta["calibration"]
    assert c0["points"]["calibration"] == 3

    # the second shard must not calibrate again: the meta is there
    def boom(*a, **k):
        raise AssertionError("recalibrated although the calibration is in the meta")
    monkeypatch.setattr(Grid, "_calibrate", boom)
    res = evaluate(cfg, progress=False)
    assert res["complete"]
    with ResultsDB(res["db"]) as db:
        c1 = _unit_conf(db, f"{ZOO}|final|grid|{SHARD}-{N}")["pruned"]
        recs = db.records_frame(attack="grid")
        summ = res["summary"].iloc[0]
    assert c1["calibration_reused"] and not c1["calibrated_in_this_unit"]
    assert c1["chosen"] == meta["chosen"] and c1["points"]["calibration"] == 0

    worst = recs[recs.setting == "worst"].set_index("example")
    assert sorted(worst.index) == sorted(json.loads(
        ResultsDB(res["db"]).conn.execute("SELECT value FROM meta WHERE key='dataset'")
        .fetchone()[0])["indices"])
    roles = worst.extra.map(lambda e: json.loads(e)["grid_pruned"]["role"])
    assert (roles == "calibration").sum() == 3 and (roles == "audit").sum() == 2
    assert (roles == "pruned").sum() == N - 5
    per = recs[recs.setting != "worst"]
    # calibration points: every setting ran; pruned points: only the chosen ones
    n_settings = 16
    for ex, r in roles.items():
        ran = set(per[per.example == ex].setting)
        if r == "calibration":
            assert len(ran) == n_settings
        elif r == "pruned":
            assert ran <= set(meta["chosen"])
    # the worst case is never weaker than a setting that ran: a point any record broke is broken
    mins = per.groupby("example").correct.min()
    assert (worst.correct.reindex(mins.index) <= mins).all()
    attacked = worst.extra.map(lambda e: json.loads(e)["broken_by"] != ["clean"])
    assert attacked.any() and (worst.nfev_grad[attacked] > 0).all()
    assert (worst.nfev_grad[~attacked] == 0).all()   # clean-misclassified: not attacked
    # the audit: a rate in [0, 1] with its interval, in the summary and the unit configs
    n_aud = c0["audit"]["n"] + c1["audit"]["n"]
    assert summ.grid_pruned_audited == n_aud == 2
    assert 0 <= summ.grid_pruned_miss_rate <= 1
    assert summ.grid_pruned_miss_lo <= summ.grid_pruned_miss_rate <= summ.grid_pruned_miss_hi
    assert 0 <= summ.grid_pruned_miss_lo and summ.grid_pruned_miss_hi <= 1
    assert summ.grid_pruned_missed == c0["audit"]["missed"] + c1["audit"]["missed"]
    assert summ.grid_f_equivalents > 0


def test_later_shard_calibrates_identically_without_meta(tmp_path):
    """A later shard that finds no calibration (another worker or rank got there first)
    calibrates on the first shard's points itself, with the same seed: the same choice."""
    cfg = from_dict(_raw(tmp_path, steps=1, kas=[1]))
    first = f"{ZOO}|final|grid|0-{SHARD}"
    _run_until(cfg, first)
    key = _meta_key(ZOO, "final")
    with ResultsDB(cfg.run_dir / "results.sqlite") as db:
        meta = db.get_meta(key)
        db.conn.execute("DELETE FROM meta WHERE key = ?", (key,))
    evaluate(cfg, progress=False)
    with ResultsDB(cfg.run_dir / "results.sqlite") as db:
        again = db.get_meta(key)
        c1 = _unit_conf(db, f"{ZOO}|final|grid|{SHARD}-{N}")["pruned"]
    assert c1["calibrated_in_this_unit"] and c1["points"]["calibration"] == 0
    assert again["chosen"] == meta["chosen"] and again["calibration"] == meta["calibration"]
    assert again["per_setting_broken"] == meta["per_setting_broken"]


@pytest.mark.parametrize("grid, match", [
    ({"mode": "prune"}, r"attacks\.grid\.mode: must be efficient, full, naive or pruned, got 'prune'"),
    ({"calibration": 0}, r"attacks\.grid\.calibration: must be an integer >= 1, got 0"),
    ({"audit": -2}, r"attacks\.grid\.audit: must be an integer >= 1, got -2"),
    ({"audit": "8"}, r"attacks\.grid\.audit: must be an integer >= 1, got '8'"),
    ({"calibration": True}, r"attacks\.grid\.calibration: must be an integer >= 1, got True"),
    ({"calibration": 5}, r"attacks\.grid\.calibration: must be <= shard_size \(4\)"),
])
def test_bad_config_one_line(tmp_path, grid, match):
    with pytest.raises(ConfigError, match=match) as e:
        from_dict(_raw(tmp_path, **grid))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "pruned").exists()


def test_bench_grid_pruned_small(tmp_path):
    """benchmark/bench_grid_pruned.py on a shrunken grid: the per-role f-equivalents add up to
    the per-example mean, the accuracies and the miss rate are consistent with the records."""
    from benchmark.bench_grid_pruned import REFERENCE_F, _finite, format_text, run
    r = run(ZOO, 6, calibration=3, audit=2, steps=1, kas=[1], lams=[1.0], output=tmp_path)
    assert REFERENCE_F == 44352 and r["settings"] == 8
    roles = r["F_by_role"]
    assert sum(v["n"] for v in roles.values()) == 6
    mean = sum(v["n"] * v["F_per_example"] for v in roles.values() if v["n"]) / 6
    assert abs(mean - r["F_per_example"]) < 1e-6 * mean
    assert abs(r["F_vs_reference"] - r["F_per_example"] / REFERENCE_F) < 1e-12
    assert r["audit"] == 2 and 0 <= r["miss_rate"] <= 1
    lo, hi = r["miss_rate_ci95"]
    assert lo <= r["miss_rate"] <= hi
    # chosen-only accuracy on the audit points is never below the full grid's
    assert r["audit_robust_acc_chosen_only"] >= r["audit_robust_acc_full_grid"]
    assert r["robust_acc_pruned"] <= r["clean_acc"]
    assert r["summary_fields"]["grid_pruned_audited"] == 2
    json.dumps(_finite(r), allow_nan=False, default=float)
    assert "miss rate" in format_text(r)

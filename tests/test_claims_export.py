"""deqbench claims (verdicts on a synthetic database built so each verdict comes out), the
paper's P / Delta H (Eqs. 12-13) by hand, and the per-example export's round trip."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from benchmark.report import claims as cl
from benchmark.report.export import export_frame, leaderboard_numbers, write_export
from benchmark.results_db import ResultsDB

N = 40
IDX = list(range(200, 200 + N))
SETTINGS = [(i, lam) for lam in (0.5, 1.0) for i in range(1, 5)]


def _ui(i, lam):
    return f"ui(i={i},ka=1,lam={lam:g})"


def _commit(db, model, attack, recs):
    db.commit_unit(f"{model}|final|{attack}", model, "final", attack, "0", recs, 1.0)


def build_claims_db(path):
    """deq_p: PGD breaks nothing; grid setting (i=2, lam=0.5) breaks e0..e19, nothing else does;
    perturbed entropy 0.9 > clean 0.5 on every attacked input.
    deq_p_sec33: PGD and (i=2, lam=0.5) both break e0..e35 (ALL 4/40, below deq_p's 20/40)."""
    with ResultsDB(path) as db:
        db.set_meta("config", {"name": "claims", "threat": {"norm": "Linf", "eps": 0.1},
                               "models": [{"name": "deq_p"}, {"name": "deq_p_sec33"}]})
        db.set_meta("dataset", {"name": "fashion_mnist", "n": N, "seed": 0, "indices": IDX})
        for model, pgd_breaks, grid_breaks in (("deq_p", 0, 20), ("deq_p_sec33", 36, 36)):
            _commit(db, model, "clean", [{"setting": "-", "example": e, "label": 1, "correct": 1,
                                          "state": "final", "nfev_nograd": 10.0, "nfev_grad": 0.0}
                                         for e in IDX])
            _commit(db, model, "pgd", [{"setting": "phantom_final", "example": e, "label": 1,
                                        "correct": int(k >= pgd_breaks), "margin": 0.1,
                                        "state": "final"} for k, e in enumerate(IDX)])
            recs = [{"setting": "worst", "example": e, "label": 1,
                     "correct": int(k >= grid_breaks), "state": "final"}
                    for k, e in enumerate(IDX)]
            for i, lam in SETTINGS:
                for k, e in enumerate(IDX):
                    broken = (i, lam) == (2, 0.5) and k < grid_breaks
                    recs.append({"setting": _ui(i, lam), "example": e, "label": 1,
                                 "correct": int(not broken), "state": "final",
                                 "extra": {"H": 0.9, "H_clean": 0.5} if model == "deq_p" else None})
            _commit(db, model, "grid", recs)
    return path


@pytest.fixture(scope="module")
def claims_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("claims_run")
    build_claims_db(run / "results.sqlite")
    return run


def _claim(res, cid):
    return next(c for c in res["claims"] if c["id"] == cid)


def test_claims_verdicts_by_value(claims_run):
    res = cl.evaluate_claims(claims_run)
    assert [c["id"] for c in res["claims"]] == list(range(1, 9))
    # claim 1: deq_p supported (PGD 40/40 vs best setting 20/40), deq_p_sec33 inconclusive
    c1 = _claim(res, 1)
    t_p, t_s = c1["tests"]
    assert "ui(i=2,ka=1,lam=0.5)" in t_p["test"]
    assert (t_p["n"], t_p["discordant"], t_p["effect"]) == (N, [20, 0], pytest.approx(0.5))
    assert t_p["p"] == pytest.approx(2 * 0.5 ** 20) and t_p["verdict"] == "supported"
    assert t_s["effect"] == 0 and t_s["p"] == 1.0 and t_s["verdict"] == "inconclusive at this n"
    assert c1["verdict"] == "inconclusive at this n"
    # claim 2 and 3: supported (lambda = 1 settings break nothing; only i = 2 breaks)
    assert _claim(res, 2)["verdict"] == "supported"
    c3 = _claim(res, 3)
    assert c3["verdict"] == "supported" and len(c3["tests"]) == 4
    assert c3["details"]["deq_p"] == {"strongest_setting": "ui(i=2,ka=1,lam=0.5)", "i": 2, "N": 4}
    # claim 4: every attacked input has higher perturbed entropy -> supported, P_avg = 1
    c4 = _claim(res, 4)
    assert c4["verdict"] == "supported"
    assert c4["details"]["deq_p"]["P_avg"] == 1.0
    assert c4["details"]["deq_p"]["dH_avg"] == pytest.approx(-0.4)
    assert c4["tests"][0]["n"] == N and c4["tests"][0]["p"] == pytest.approx(2 * 0.5 ** N)
    assert any("deq_p_sec33" in w for w in c4["not_measured"])
    # claim 7: Sec. 3.3 LOWERS ALL here (4/40 vs 20/40, discordant 0 vs 16): contradicted
    c7 = _claim(res, 7)
    (t7,) = c7["tests"]
    assert t7["effect"] == pytest.approx(-16 / N) and t7["discordant"] == [0, 16]
    assert t7["p"] == pytest.approx(2 * 0.5 ** 16)
    assert t7["verdict"] == "contradicted" == c7["verdict"]
    # claims 5, 6, 8: the data is not in this run -> not measured, with the reason
    for cid, why in ((5, "deviation"), (6, "Sec. 3.2"), (8, "transfer")):
        c = _claim(res, cid)
        assert c["verdict"] == "not measured" and c["tests"] == []
        assert any(why in w for w in c["not_measured"]), c["not_measured"]
    # Holm: adjusted p >= raw p, and the number of tests is the family size
    flat = [t for c in res["claims"] for t in c["tests"]]
    assert res["tests"] == len(flat)
    assert all(t["p_holm"] >= t["p"] for t in flat)
    smallest = min(flat, key=lambda t: t["p"])
    assert smallest["p_holm"] == pytest.approx(min(1.0, len(flat) * smallest["p"]))


def test_claims_cli_writes_md_json_and_leaderboard_copy(claims_run, tmp_path, capsys):
    from benchmark.cli import main
    lbd = tmp_path / "lb"
    assert main(["claims", str(claims_run), "--leaderboard", str(lbd)]) == 0
    md = (claims_run / "claims.md").read_text()
    data = json.loads((claims_run / "claims.json").read_text())
    assert (lbd / "claims.md").read_text() == md
    assert [c["verdict"] for c in data["claims"]][6] == "contradicted"
    assert "Verdict rule: two-sided test at alpha = 0.05 on the Holm-adjusted p" in md
    assert "## 7. Sec. 3.2, Sec. 3.3 and both raise ALL over their baselines (Table 1): contradicted" in md
    assert "not measured: the run has no transfer records" in md
    assert "a claim is supported when all its tests are, contradicted when any is" in md
    c7 = data["claims"][6]
    vs = [t["verdict"] for t in c7["tests"]]
    assert cl.tally(c7).endswith(f"of {len(vs)}") and f"{vs.count('contradicted')} contradicted" \
        in cl.tally(c7)
    assert f"| 7 | {c7['title']} | **contradicted** | {cl.tally(c7)} |" in md
    assert cl.tally({"tests": []}) == "-"
    assert cl.tally({"tests": [{"verdict": "supported"}, {"verdict": "inconclusive at this n"},
                               {"verdict": "supported"}]}) == "2 supported, 1 inconclusive of 3"
    assert main(["claims", str(tmp_path / "nothing")]) == 2
    assert "no results database" in capsys.readouterr().err


def test_entropy_statistics_eqs_12_13_by_hand():
    # Eqs. (12)-(13) over V: P = mean 1(H(z) < H(z~)), dH = mean (H(z) - H(z~))
    s = cl.entropy_statistics([0.5, 0.6, 1.0], [0.9, 0.4, 1.3])
    assert s == {"n": 3, "P": pytest.approx(2 / 3), "dH": pytest.approx(-0.5 / 3)}
    # from records: e0, e1 clean-correct; e2 clean-MISCLASSIFIED with a PGD-10 counterpart
    # (attacked); e3 clean-misclassified, not attacked (x~ = x, as the runner records it)
    g = pd.DataFrame([
        {"attack": "clean", "setting": "-", "example": 0, "correct": 1, "extra": None},
        {"attack": "clean", "setting": "-", "example": 1, "correct": 1, "extra": None},
        {"attack": "clean", "setting": "-", "example": 2, "correct": 0, "extra": None},
        {"attack": "clean", "setting": "-", "example": 3, "correct": 0, "extra": None},
        {"attack": "grid", "setting": "ui(i=1,ka=1,lam=0.5)", "example": 0, "correct": 0,
         "extra": {"H": 0.9, "H_clean": 0.5}},
        {"attack": "grid", "setting": "ui(i=1,ka=1,lam=0.5)", "example": 1, "correct": 1,
         "extra": {"H": 0.4, "H_clean": 0.6}},
        {"attack": "grid", "setting": "ui(i=1,ka=1,lam=0.5)", "example": 2, "correct": 0,
         "extra": {"H": 1.3, "H_clean": 1.0, "attacked": True}},
        {"attack": "grid", "setting": "ui(i=1,ka=1,lam=0.5)", "example": 3, "correct": 0,
         "extra": {"H": 0.7, "H_clean": 0.7}},
    ])
    st = cl.grid_entropy_statistics(g)
    (v,) = st["per_setting"]
    assert (v["n"], v["P"], v["dH"]) == (3, pytest.approx(2 / 3), pytest.approx(-0.5 / 3))
    (a,) = st["per_setting_all_inputs"]     # with x~ = x for e3: P 2/4, dH -0.5/4
    assert (a["n"], a["P"], a["dH"]) == (4, pytest.approx(0.5), pytest.approx(-0.125))
    assert (st["n_inputs"], st["n_attacked"]) == (4, 3)
    assert st["d_j"].to_dict() == pytest.approx({0: -0.4, 1: 0.2, 2: -0.3})
    with pytest.raises(ValueError):
        cl.entropy_statistics([], [])


def test_export_round_trip_rederives_every_leaderboard_number(tmp_path):
    from benchmark.leaderboard import _percent
    from benchmark.reports import entry_name
    from benchmark.runner import summarize
    from tests.test_tables_figures import build_full
    build_full(tmp_path / "results.sqlite")
    path = write_export(tmp_path)
    assert path == tmp_path / "export.csv.gz"
    f = pd.read_csv(path)
    assert {"entry", "model", "defense", "checkpoint_sha256", "example", "image_sha256", "label",
            "clean_correct", "pgd_correct", "pgd_margin", "grid_correct", "ALL_correct",
            "broken_by", "nfev_nograd", "nfev_grad", "f_evals_clean", "wall_s"} <= set(f.columns)
    assert any(c.startswith("grid:ui(") for c in f.columns)
    assert f.groupby("entry").size().to_dict() == {"deq_a": 8, "deq_a+early-select": 8, "cnn_b": 8}
    hashes = f.image_sha256.dropna()
    assert len(hashes) == 0 or hashes.str.fullmatch(r"[0-9a-f]{64}").all()
    nums = leaderboard_numbers(f)
    with ResultsDB(tmp_path / "results.sqlite") as db:
        summary = summarize(db)
    checked = 0
    for _, r in summary.iterrows():
        got = nums[entry_name(r["model"], r["defense"])]
        assert got["n"] == r["n"]
        for key in ("clean", "ALL", "f_evals_per_forward"):
            assert got[key] == pytest.approx(r[key]), key
            checked += 1
        aa = r.get("autoattack")
        assert _percent(got["autoattack"]) == _percent(r["ALL"] if aa != aa else aa)
        for key in ("grid", "min_over_means"):
            v = r.get(key)
            if v is not None and v == v:
                assert _percent(got[key]) == _percent(v), key
                checked += 1
    assert checked >= 9
    # which attack broke each point: deq_a final -- e0 PGD, e1/e2 grid, e3 AutoAttack, e7 clean
    a = f[f.entry == "deq_a"].set_index("example").broken_by.fillna("")
    assert a[[100, 101, 102, 103, 104, 107]].tolist() == ["pgd", "grid", "grid", "autoattack", "",
                                                          "clean"]
    assert export_frame(tmp_path, image_hashes=False).image_sha256.eq("").all()

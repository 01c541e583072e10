"""benchmark/tables.py and benchmark/figures.py on a small synthetic results database.

The database is written with ``ResultsDB.commit_unit`` exactly as the runner writes it: 8 test
examples (indices 100..107), two models -- a DEQ ``deq_a`` (N = 4 states) with the reported
forwards ``final`` and ``early:select`` (state z[3]) and a non-DEQ ``cnn_b`` -- and clean, pgd,
grid (worst + the 16 settings i in 1..4, Ka in {1, 2}, lambda in {0.5, 1}) and autoattack
records. Expected numbers below are worked out by hand from these records.
"""
from __future__ import annotations

import json
import math

import pytest

from benchmark import figures as F
from benchmark import tables as T
from benchmark.results_db import ResultsDB

IDX = list(range(100, 108))          # e0..e7
N_STATES = 4
CLEAN_H = [2.0, 1.5, 1.0, 0.5]
CLEAN_RES = [0.5, 0.1, 0.01, 0.001]
ADV_RES = [0.5, 0.2, 0.02, 0.002]


def _ui(i, ka, lam):
    return f"ui(i={i},ka={ka},lam={lam:g})"


# (model 'deq_a', defense 'final'): which examples (positions 0..7) each setting breaks.
# Strongest Ka per (i, lambda) -- ties go to the smaller Ka:
#   lambda 0.5: i1 -> Ka 2 (6/8), i2 -> Ka 1 (5/8), i3 -> Ka 2 (5/8), i4 -> Ka 1 (7/8, tie)
#   lambda 1.0: i1 -> Ka 1 (6/8), i2 -> Ka 1 (7/8, tie), i3 -> Ka 2 (6/8), i4 -> Ka 1 (6/8)
GRID_BREAKS = {
    (1, 1, 0.5): set(), (1, 2, 0.5): {1}, (2, 1, 0.5): {1, 2}, (2, 2, 0.5): {2},
    (3, 1, 0.5): {2}, (3, 2, 0.5): {1, 2}, (4, 1, 0.5): set(), (4, 2, 0.5): set(),
    (1, 1, 1.0): {1}, (1, 2, 1.0): set(), (2, 1, 1.0): set(), (2, 2, 1.0): set(),
    (3, 1, 1.0): set(), (3, 2, 1.0): {2}, (4, 1, 1.0): {1}, (4, 2, 1.0): set(),
}
SETTINGS = [(i, ka, lam) for lam in (0.5, 1.0) for i in range(1, N_STATES + 1) for ka in (1, 2)]


def _commit(db, model, defense, attack, recs, wall=1.0):
    for r in recs:
        r.setdefault("wall_s", wall / len(IDX))
    db.commit_unit(f"{model}|{defense}|{attack}|0-8", model, defense, attack, "0-8", recs, wall)


def _clean_recs(correct, state, entropies=True, nfev=(20.0, 0.0)):
    return [{"setting": "-", "example": e, "label": 0, "correct": c, "margin": 1.0 if c else -1.0,
             "state": state, "entropies": list(CLEAN_H) if entropies else None,
             "residuals": list(CLEAN_RES) if entropies else None,
             "nfev_nograd": nfev[0], "nfev_grad": nfev[1]} for e, c in zip(IDX, correct)]


def _outcome(correct, clean, state, setting, final_h=None, h_list=None, broken_by=None,
             nfev=(40.0, 50.0)):
    recs = []
    for k, (e, c) in enumerate(zip(IDX, correct)):
        ent = None
        if h_list is not None:
            ent = h_list[k]
        elif final_h is not None:
            ent = CLEAN_H[:-1] + [final_h[k]]
        bb = ["clean"] if not clean[k] else ([] if c else [setting])
        if broken_by is not None:
            bb = broken_by[k]
        recs.append({"setting": setting, "example": e, "label": 0, "correct": c,
                     "margin": 0.5 if c else -0.5, "state": state, "entropies": ent,
                     "residuals": None if ent is None else list(ADV_RES),
                     "nfev_nograd": nfev[0], "nfev_grad": nfev[1], "extra": {"broken_by": bb}})
    return recs


def _meta(db, models):
    db.set_meta("config", {"name": "synthetic", "threat": {"norm": "Linf", "eps": 0.1},
                           "data": {"dataset": "fashion_mnist", "n": 8, "seed": 0},
                           "models": models,
                           "attacks": {"pgd": {"steps": 10}, "grid": {"kas": [1, 2]},
                                       "autoattack": {"attacks": ["apgd-ce", "square"]}}})
    db.set_meta("dataset", {"name": "fashion_mnist", "split": "test", "n": 8, "seed": 0,
                            "indices": IDX})
    db.set_meta("provenance", {"device": "cpu"})


def build_full(path):
    """The full synthetic run (see the module docstring)."""
    with ResultsDB(path) as db:
        _meta(db, [{"name": "deq_a", "defenses": ["final", "early:select"]}, {"name": "cnn_b"}])
        # deq_a / final: clean e7 wrong; PGD breaks e0, grid e1+e2, AutoAttack e3 -> ALL 3/8.
        clean = [1, 1, 1, 1, 1, 1, 1, 0]
        _commit(db, "deq_a", "final", "clean", _clean_recs(clean, "final"))
        # final-state entropies under PGD: e0 1.5 (broken), e1..e5 0.7, e6 0.3, e7 0.5 (unattacked)
        pgd = _outcome([0, 1, 1, 1, 1, 1, 1, 0], clean, "final", "phantom_final",
                       final_h=[1.5, 0.7, 0.7, 0.7, 0.7, 0.7, 0.3, 0.5])
        for k, r in enumerate(pgd):   # deviation of example k at state t: 0.01 * t * (k + 1)
            r["extra"]["deviation"] = [0.01 * t * (k + 1) for t in range(1, N_STATES + 1)]
        _commit(db, "deq_a", "final", "pgd", pgd, wall=4.0)
        grid = _outcome([1, 0, 0, 1, 1, 1, 1, 0], clean, "final", "worst",
                        final_h=[0.6] * 8, nfev=(300.0, 400.0))
        for si, (i, ka, lam) in enumerate(SETTINGS):
            for k, e in enumerate(IDX):
                c = 0 if (not clean[k] or k in GRID_BREAKS[(i, ka, lam)]) else 1
                # entropies of setting si: 0.5 + 0.1 si at e0..e3, 0.4 at e4..e7; clean 0.5
                h = 0.5 + 0.1 * si if k < 4 else 0.4
                grid.append({"setting": _ui(i, ka, lam), "example": e, "label": 0, "correct": c,
                             "state": "final", "extra": {"H": h, "H_clean": 0.5}})
        _commit(db, "deq_a", "final", "grid", grid, wall=16.0)
        aa_bb = [[], [], [], ["apgd-ce"], [], [], [], ["clean"]]
        _commit(db, "deq_a", "final", "autoattack",
                _outcome([1, 1, 1, 0, 1, 1, 1, 0], clean, "final", "ensemble",
                         final_h=[0.5] * 8, broken_by=aa_bb), wall=8.0)

        # deq_a / early:select (state z[3]): clean e6 wrong; PGD breaks nothing; efficient grid.
        clean_e = [1, 1, 1, 1, 1, 1, 0, 1]
        _commit(db, "deq_a", "early:select", "clean", _clean_recs(clean_e, "z[3]"))
        adv_h = [[2.0, 1.5, 1.1, 0.6] if c else list(CLEAN_H) for c in clean_e]
        pgd = _outcome(clean_e, clean_e, "z[3]", "phantom_final", h_list=adv_h)
        for r in pgd:                 # a constant 5 % deviation
            r["extra"]["deviation"] = [0.05] * N_STATES
        _commit(db, "deq_a", "early:select", "pgd", pgd)
        grid = _outcome([0, 1, 1, 1, 1, 1, 0, 1], clean_e, "z[3]", "worst", final_h=[0.9] * 8)
        for si, (i, ka, lam) in enumerate(SETTINGS):
            for k, e in enumerate(IDX):
                if si == 0:      # the first setting attacks every clean-correct point, breaks e0
                    c = 0 if (k in (0, 6)) else 1
                elif k == 0:     # efficient mode: e0 already broken, not attacked again
                    continue
                else:
                    c = clean_e[k]
                grid.append({"setting": _ui(i, ka, lam), "example": e, "label": 0, "correct": c,
                             "state": "z[3]"})
        _commit(db, "deq_a", "early:select", "grid", grid)

        # cnn_b (non-DEQ): clean e0, e1 wrong; PGD breaks e2, e3; AA breaks e2, e3, e4.
        clean_c = [0, 0, 1, 1, 1, 1, 1, 1]
        _commit(db, "cnn_b", "final", "clean", _clean_recs(clean_c, "output", entropies=False,
                                                           nfev=(0.0, 0.0)))
        _commit(db, "cnn_b", "final", "pgd",
                _outcome([0, 0, 0, 0, 1, 1, 1, 1], clean_c, "output", "model", nfev=(0.0, 0.0)))
        cnn_bb = [["clean"], ["clean"], ["apgd-ce"], ["apgd-ce", "square"], ["square"], [], [], []]
        _commit(db, "cnn_b", "final", "autoattack",
                _outcome([0, 0, 0, 0, 0, 1, 1, 1], clean_c, "output", "ensemble",
                         broken_by=cnn_bb, nfev=(0.0, 0.0)))
    return path


def build_sparse(path):
    """Clean + PGD only (no grid, no AutoAttack)."""
    with ResultsDB(path) as db:
        _meta(db, [{"name": "deq_a", "defenses": ["final"]}, {"name": "cnn_b"}])
        clean = [1, 1, 1, 1, 1, 1, 1, 0]
        _commit(db, "deq_a", "final", "clean", _clean_recs(clean, "final"))
        _commit(db, "deq_a", "final", "pgd",
                _outcome([0, 1, 1, 1, 1, 1, 1, 0], clean, "final", "phantom_final",
                         final_h=[1.5, 0.7, 0.7, 0.7, 0.7, 0.7, 0.3, 0.5]))
        _commit(db, "cnn_b", "final", "clean", _clean_recs([1] * 8, "output", entropies=False))
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run_full")
    build_full(d / "results.sqlite")
    return d


def _row(df, **kw):
    m = df
    for k, v in kw.items():
        m = m[m[k] == v]
    assert len(m) == 1, (kw, df)
    return m.iloc[0]


# ---------------------------------------------------------------------------------------------

def test_table1_exact(full_run):
    t = T.table1(full_run)
    r = _row(t, model="deq_a", defense="final")
    assert r.n == 8 and r.state == "final"
    assert r.clean == pytest.approx(7 / 8)
    assert r.pgd == pytest.approx(6 / 8)
    assert r.grid == pytest.approx(5 / 8)
    assert r.autoattack == pytest.approx(6 / 8)
    assert math.isnan(r.adaptive)
    # different attacks break different points: ALL is below every single attack
    assert r.ALL == pytest.approx(3 / 8)
    assert r.ALL < min(r.pgd, r.grid, r.autoattack)
    assert r.min_over_means == pytest.approx(5 / 8)
    assert r.strongest_setting == "ui(i=2,ka=1,lam=0.5)"
    assert r.grid_settings == 16

    e = _row(t, model="deq_a", defense="early:select")
    assert e.state == "z[3]"
    assert (e.clean, e.pgd, e.grid, e.ALL) == pytest.approx((7 / 8, 7 / 8, 6 / 8, 6 / 8))
    assert math.isnan(e.min_over_means)           # efficient grid: settings lack examples
    assert any("min-over-means unavailable" in f for f in t.attrs["footnotes"])

    c = _row(t, model="cnn_b", defense="final")
    assert c.state == "output"
    assert (c.clean, c.pgd, c.autoattack, c.ALL) == pytest.approx((6 / 8, 4 / 8, 3 / 8, 3 / 8))
    assert math.isnan(c.grid)


def test_table1_matches_runner_summary(full_run):
    from benchmark.runner import summarize
    with ResultsDB(full_run / "results.sqlite") as db:
        s = summarize(db)
    t = T.table1(full_run)
    for _, r in s.iterrows():
        tr = _row(t, model=r.model, defense=r.defense)
        for col in ("clean", "pgd", "ALL"):
            assert tr[col] == pytest.approx(r[col])


def test_table2(full_run):
    t = T.table2(full_run)
    assert set(t.model) == {"deq_a"}              # the non-DEQ has no states
    r = _row(t, defense="final")
    assert (r.pgd_final, r.inter_worst, r.inter_min_over_means) == pytest.approx((6 / 8, 5 / 8, 5 / 8))
    assert r["diff"] == pytest.approx(1 / 8)
    e = _row(t, defense="early:select")
    assert e.state == "z[3]" and e["diff"] == pytest.approx(1 / 8)


def test_table8_strongest_ka(full_run):
    t = T.table8(full_run)
    f = t[(t.model == "deq_a") & (t.defense == "final")]
    assert len(f) == 8
    expect = {(1, 0.5): (2, 6 / 8), (2, 0.5): (1, 5 / 8), (3, 0.5): (2, 5 / 8), (4, 0.5): (1, 7 / 8),
              (1, 1.0): (1, 6 / 8), (2, 1.0): (1, 7 / 8), (3, 1.0): (2, 6 / 8), (4, 1.0): (1, 6 / 8)}
    for (i, lam), (ka, acc) in expect.items():
        r = _row(f, i=i, lam=lam)
        assert (int(r.ka), r.acc) == (ka, pytest.approx(acc)), (i, lam)
    e = t[(t.model == "deq_a") & (t.defense == "early:select")]
    assert len(e) == 8 and e.acc.isna().all() and e.ka.isna().all()
    r = _row(e, i=1, lam=0.5)
    assert (r.most_broken_ka, r.most_broken, r.available) == (1, 1, 1)
    assert any("unavailable" in f for f in t.attrs["footnotes"])


def test_setting_accuracy_rule(full_run):
    s = T.setting_accuracies(full_run)
    f = s[(s.defense == "final")].set_index("setting")
    assert f.loc["ui(i=2,ka=1,lam=0.5)", "acc"] == pytest.approx(5 / 8)
    assert f.loc["ui(i=1,ka=1,lam=0.5)", "acc"] == pytest.approx(7 / 8)
    e = s[(s.defense == "early:select")].set_index("setting")
    assert e.loc["ui(i=1,ka=1,lam=0.5)", "acc"] == pytest.approx(6 / 8)
    assert math.isnan(e.loc["ui(i=1,ka=2,lam=0.5)", "acc"])        # e0 (clean-correct) missing
    assert e.loc["ui(i=1,ka=2,lam=0.5)", "covered"] == 6


def test_table6_7_P_and_dH(full_run):
    t = T.table6_7(full_run)
    assert set(t.model) == {"deq_a"}
    r = _row(t, defense="final", attack="pgd")
    assert r.n == 8
    # Eq. 12: H_clean(z[N]) = 0.5 < H_adv for e0..e5 (1.5, 0.7 x 5), not e6 (0.3) or e7 (0.5)
    assert r.P == pytest.approx(6 / 8)
    # Eq. 13: mean(H_clean - H_adv) = (-1.0 - 5 x 0.2 + 0.2 + 0) / 8
    assert r.dH == pytest.approx(-1.8 / 8)
    assert (r.P_state, r.dH_state) == pytest.approx((r.P, r.dH))
    assert r.H_clean == pytest.approx(0.5)
    assert r.success_rate == pytest.approx(1 / 7)
    g = _row(t, defense="final", attack="grid")
    assert (g.P, g.dH) == pytest.approx((1.0, -0.1))
    a = _row(t, defense="final", attack="autoattack")
    assert (a.P, a.dH) == pytest.approx((0.0, 0.0))
    e = _row(t, defense="early:select", attack="pgd")
    assert (e.P, e.dH) == pytest.approx((7 / 8, -0.7 / 8))
    assert (e.P_state, e.dH_state) == pytest.approx((7 / 8, -0.7 / 8))   # at z[3]: 1.0 vs 1.1
    assert e.success_rate == pytest.approx(0.0)


def test_table6_7_grid_statistics_over_settings(full_run):
    """The paper's Tables 6-7: avg / min / max over the grid settings of one (P, dH) each."""
    t = T.table6_7_grid(full_run)
    assert t.defense.tolist() == ["final"]  # early:select's records hold no entropies
    r = _row(t, defense="final")
    assert (r.settings, r.n, r.state) == (16, 8, "final")
    # setting si: P = 4/8 (e0..e3 above 0.5) except si = 0 (0.5, not above: P = 0);
    # dH = (4 x (-0.1 si) + 4 x 0.1) / 8 = 0.05 - 0.05 si
    assert (r.P_avg, r.P_min, r.P_max) == pytest.approx((15 * 0.5 / 16, 0.0, 0.5))
    assert (r.dH_avg, r.dH_min, r.dH_max) == pytest.approx((0.05 - 0.05 * 7.5, -0.70, 0.05))
    assert r.P_min_setting == _ui(1, 1, 0.5) and r.dH_min_setting == _ui(4, 2, 1.0)
    assert any("16 setting(s) skipped" in f for f in t.attrs["footnotes"])
    # over V = the 7 attacked (clean-correct) inputs e0..e6 (e7 is clean-wrong, not attacked):
    # P_V = 4/7 for si >= 1, 0 for si = 0; dH_V = (4 x (-0.1 si) + 3 x 0.1) / 7
    assert r.n_V == 7
    assert (r.P_avg_V, r.P_min_V, r.P_max_V) == pytest.approx((15 * 4 / 7 / 16, 0.0, 4 / 7))
    assert r.dH_avg_V == pytest.approx((-0.4 * 7.5 + 0.3) / 7)


def test_table4_and_speed(full_run):
    t = T.table4_autoattack(full_run)
    c = _row(t, model="cnn_b")
    assert c.autoattack == pytest.approx(3 / 8) and c.broken == 3
    assert (c["broken_by_apgd-ce"], c["broken_by_square"], c["broken_by_clean"]) == (2, 2, 2)
    d = _row(t, model="deq_a", defense="final")
    assert (d["broken_by_apgd-ce"], d["broken_by_square"], d["broken_by_clean"]) == (1, 0, 1)
    s = T.table9_10(full_run)
    p = _row(s, model="deq_a", defense="final", attack="pgd")
    assert (p.f_evals, p.wall_s) == pytest.approx((90.0, 0.5))
    g = _row(s, model="deq_a", defense="final", attack="grid")
    assert g.setting == "worst" and g.n == 8 and g.f_evals == pytest.approx(700.0)
    assert g.wall_s == pytest.approx(2.0)


def test_table4_square_from_the_checks_when_top_settings_ran_without_it(tmp_path):
    """top_settings with APGD-CE only: Table 4's Square column is the checks' Square (one
    value per model, labelled), not a second Square run."""
    path = build_full(tmp_path / "results.sqlite")
    clean = [1, 1, 1, 1, 1, 1, 1, 0]
    st = _ui(2, 1, 0.5)
    with ResultsDB(path) as db:
        _commit(db, "deq_a", "final", "top_settings",
                _outcome([1, 0, 0, 0, 1, 1, 1, 0], clean, "final", f"apgd-ce@{st}"))
        checks = _outcome([1, 1, 0, 1, 1, 1, 1, 0], clean, "final", "square200")
        checks += _outcome([1, 1, 1, 1, 1, 1, 1, 0], clean, "final", "pgd10")
        _commit(db, "deq_a", "final", "checks", checks)
    t = T.table4_top_settings(tmp_path)
    r = _row(t, model="deq_a", defense="final", setting=st)
    assert r["apgd-ce"] == pytest.approx(4 / 8)
    assert r.square == pytest.approx(6 / 8)          # e2 and the clean-wrong e7 broken
    assert r.pgd == pytest.approx(5 / 8)             # the grid's own record of (2, 1, 0.5)
    assert any("checks' square200" in f for f in t.attrs["footnotes"])


def test_deviation_table_fig3c(full_run):
    d = F.deviation_table(T.load_run(full_run))
    assert set(d.model) == {"deq_a"} and len(d) == 2 * N_STATES    # the CNN has no states
    f = d[d.defense == "final"].set_index("t")
    # the SAME examples for every curve: clean-correct under both defenses, e0..e5 (e7 is
    # clean-wrong under final, e6 under early:select): the mean over k = 0..5 of
    # 0.01 * t * (k + 1) = 0.035 t; the median the same; quartiles 0.0225 t and 0.0475 t
    import numpy as np
    from scipy import stats as sps
    for t in range(1, N_STATES + 1):
        assert f.loc[t, "mean"] == pytest.approx(0.035 * t)
        assert f.loc[t, "median"] == pytest.approx(0.035 * t)
        assert (f.loc[t, "q25"], f.loc[t, "q75"]) == pytest.approx((0.0225 * t, 0.0475 * t))
        assert f.loc[t, "n"] == 6
        vals = [0.01 * t * (k + 1) for k in range(6)]
        h = sps.t.ppf(0.975, 5) * np.std(vals, ddof=1) / np.sqrt(6)
        assert (f.loc[t, "ci_lo"], f.loc[t, "ci_hi"]) == pytest.approx((0.035 * t - h, 0.035 * t + h))
    e = d[d.defense == "early:select"]
    assert e["mean"].tolist() == pytest.approx([0.05] * N_STATES)


def test_fig3b_sec32_entropy_change(tmp_path):
    """Delta H(z[t]) = H with Sec. 3.2 - H without, on the same inputs, from the records'
    ``extra.entropies_undefended`` (clean records and the PGD records of clean-correct points)."""
    clean = [1, 1, 1, 1, 1, 1, 0, 0]
    with ResultsDB(tmp_path / "results.sqlite") as db:
        _meta(db, [{"name": "deq_a", "defenses": ["entropy_reduction"]}])
        c = _clean_recs(clean, "final")
        for k, r in enumerate(c):       # clean: the defense lowers every H(z[t]) by 0.1
            r["extra"] = {"entropies_undefended": [h + 0.1 for h in CLEAN_H]}
        _commit(db, "deq_a", "entropy_reduction", "clean", c)
        p = _outcome(clean, clean, "final", "phantom_final", h_list=[list(CLEAN_H)] * 8)
        for k, r in enumerate(p):       # perturbed: by 0.1 * t * (k + 1)
            r["extra"]["entropies_undefended"] = [h + 0.1 * t * (k + 1)
                                                  for t, h in enumerate(CLEAN_H, 1)]
        _commit(db, "deq_a", "entropy_reduction", "pgd", p)
    data = T.load_run(tmp_path)
    g = data.records
    d = F.sec32_entropy_change(g)
    assert d["clean"].shape == (8, N_STATES) and d["clean"] == pytest.approx(-0.1)
    assert d["pgd"].shape == (6, N_STATES)                 # clean-correct e0..e5 only
    # mean over k = 0..5 of -0.1 t (k + 1) = -0.35 t
    assert d["pgd"].mean(0) == pytest.approx([-0.35 * t for t in range(1, N_STATES + 1)])
    files = F.write_figures(tmp_path, tmp_path / "figs", formats=("png",), training_logs=[])
    assert "fig3b_sec32_deq_a__entropy_reduction.png" in {f.name for f in files}


def _er(tf, r):
    return json.dumps({"name": "entropy_reduction", "r": r, "tf": tf}, sort_keys=True)


def test_table5_tf_by_r(tmp_path):
    """Three (Tf, R) settings of the Sec. 3.2 defense on one model: ALL and clean per pair, and
    the Tf x R grid of the paper's Table 5 in the Markdown file."""
    # (tf, r) -> (clean correct, broken by PGD) over the 8 examples
    cases = {(1, 5): ([1] * 8, {0}), (2, 5): ([1] * 7 + [0], {0, 1}), (2, 10): ([1] * 8, set())}
    with ResultsDB(tmp_path / "results.sqlite") as db:
        _meta(db, [{"name": "deq_a", "defenses": [json.loads(_er(*k)) for k in cases]}])
        for (tf, r), (clean, broken) in cases.items():
            dk = _er(tf, r)
            _commit(db, "deq_a", dk, "clean", _clean_recs(clean, "final"))
            adv = [0 if (k in broken or not c) else 1 for k, c in enumerate(clean)]
            _commit(db, "deq_a", dk, "pgd", _outcome(adv, clean, "final", "phantom_final",
                                                     final_h=[0.5] * 8))
        # a model with ONE (tf, r) only: not a Tf x R table
        _commit(db, "deq_b", _er(2, 10), "clean", _clean_recs([1] * 8, "final"))
    t = T.table5(tmp_path)
    assert set(t.model) == {"deq_a"} and len(t) == 3
    assert [(int(a), int(b)) for a, b in zip(t.tf, t.r)] == [(1, 5), (2, 5), (2, 10)]
    assert t.ALL.tolist() == pytest.approx([7 / 8, 5 / 8, 1.0])
    assert t.clean.tolist() == pytest.approx([1.0, 7 / 8, 1.0])
    T.write_tables(tmp_path, tmp_path / "tables")
    md = (tmp_path / "tables" / "table5.md").read_text()
    assert "| deq_a | 1 | 87.50 | - |" in md, md      # Tf = 1 row: R = 5 -> 87.5, R = 10 absent
    assert "| deq_a | 2 | 62.50 | 100.00 |" in md, md


def test_tables_9_10_from_bench_files(full_run, tmp_path):
    """Tables 9 (training speed) and 10 (inference speed over Tf x R) read the JSON files of
    ``deqbench bench train|forward --output``; without them both say what to run."""
    out = T.write_tables(full_run, tmp_path / "none", bench_dir=tmp_path / "nobench")
    assert "deqbench bench train" in (tmp_path / "none" / "table9.md").read_text()
    assert "deqbench bench forward" in (tmp_path / "none" / "table10.md").read_text()
    assert {p.name for p in out} >= {"table9.md", "table9.csv", "table10.md", "table10.csv"}
    bench = tmp_path / "bench"
    bench.mkdir()
    rows = [{"method": "pgd_at", "sec33": "-", "samples_per_s": 30.0, "f_evals_per_sample": 165.0,
             "s_per_step": 4.0, "speedup_vs_base": 1.0},
            {"method": "pgd_at", "sec33": "reference", "samples_per_s": 42.0,
             "f_evals_per_sample": 120.0, "s_per_step": 3.0, "speedup_vs_base": 1.4}]
    (bench / "train.json").write_text(json.dumps({"config": {"model": "deq_a"}, "rows": rows,
                                                  "provenance": {"device": "cpu"}}))
    fwd = []
    for tf, r, sps in ((1, 1, 50.0), (1, 5, 20.0), (2, 5, 30.0)):
        fwd.append({"defense": "plain", "tf": tf, "r": r, "samples_per_s": 100.0, "ratio": 1.0,
                    "f_nograd": 19.0, "f_grad": 0.0, "s_per_batch": 0.3})
        fwd.append({"defense": "entropy_reduction[reference]", "tf": tf, "r": r,
                    "samples_per_s": sps, "ratio": 100.0 / sps, "f_nograd": 19.0,
                    "f_grad": 8.0 * r / tf, "s_per_batch": 1.0})
    (bench / "forward.json").write_text(json.dumps({"model": "deq_a", "batch_size": 32,
                                                    "preset": "reference", "rows": fwd}))
    t9 = T.table9(bench)
    assert t9.samples_per_s.tolist() == [30.0, 42.0] and t9.speedup_vs_base.tolist() == [1.0, 1.4]
    t10 = T.table10(bench)
    assert [(int(a), int(b)) for a, b in zip(t10.tf, t10.r)] == [(1, 1), (1, 5), (2, 5)]
    assert t10.time_ratio.tolist() == pytest.approx([2.0, 5.0, 100 / 30])
    T.write_tables(full_run, tmp_path / "with", bench_dir=bench)
    md = (tmp_path / "with" / "table10.md").read_text()
    assert "| 1 | 50.0 | 20.0 |" in md and "| 2 | - | 30.0 |" in md, md
    assert "42.0" in (tmp_path / "with" / "table9.md").read_text()


def test_transfer_and_tf_r_absent(full_run):
    assert T.table3(full_run).empty
    assert T.table5(full_run).empty


def test_write_tables_and_figures(full_run, tmp_path):
    paths = T.write_tables(full_run / "results.sqlite", tmp_path / "tables")
    names = {p.name for p in paths}
    for stem in ("table1", "table2", "table3", "table4", "table5", "table6_7", "table6_7_grid",
                 "table8", "table9_10"):
        assert f"{stem}.md" in names and f"{stem}.csv" in names
    for p in paths:
        text = p.read_text()
        assert text and "fashion_mnist" in text and "eps=0.1" in text and "n=8" in text
        assert "deq_a" in text and "cnn_b" in text
    assert "not in this run" in (tmp_path / "tables" / "table3.md").read_text().lower()
    md1 = (tmp_path / "tables" / "table1.md").read_text()
    from benchmark.report.stats import clopper_pearson

    def acc(k):   # "value [lo, hi]": the exact 95% interval of k/8
        lo, hi = clopper_pearson(k, 8)
        return f"{100 * k / 8:.2f} [{100 * lo:.1f}, {100 * hi:.1f}]"
    assert (f"| deq_a | final | final | 8 | {acc(7)} | {acc(6)} | {acc(5)} | {acc(6)} |"
            in md1)
    assert "clean (%) [95% CI]" in md1 and "exact 95% Clopper-Pearson interval" in md1
    import pandas as pd
    back = pd.read_csv(tmp_path / "tables" / "table1.csv", comment="#")
    assert back.ALL.tolist() == pytest.approx([3 / 8, 6 / 8, 3 / 8])
    lo, hi = clopper_pearson(3, 8)
    assert (back.ALL_ci95_lo[0], back.ALL_ci95_hi[0]) == pytest.approx((lo, hi))
    cols = list(back.columns)
    assert cols[cols.index("ALL") + 1: cols.index("ALL") + 3] == ["ALL_ci95_lo", "ALL_ci95_hi"]
    # Table 2's paired test: PGD vs the best single setting (deq_a final: PGD 6/8; the best
    # setting breaks 2 of 7 clean-correct -> 5/8; discordant 2 vs 1 -> p = 1)
    t2 = pd.read_csv(tmp_path / "tables" / "table2.csv", comment="#")
    r = t2[(t2.model == "deq_a") & (t2.defense == "final")].iloc[0]
    assert r.pgd_minus_best == pytest.approx(6 / 8 - 5 / 8)
    assert r.mcnemar_p == pytest.approx(1.0) and r.conclusion == "inconclusive at this n"
    assert r.diff_ci_lo < 0 < r.diff_ci_hi

    log = tmp_path / "train" / "log.csv"
    log.parent.mkdir()
    log.write_text("epoch,step,lr,train_loss,train_acc,val_clean,val_pgd10\n"
                   "1,10,0.001,1.2,0.5,0.6,0.2\n2,20,0.0005,0.9,0.6,0.7,0.3\n")
    figs = F.write_figures(full_run, tmp_path / "figs", training_logs=[log])
    names = {p.name for p in figs}
    for stem in ("fig2a_deq_a__final", "fig2b_deq_a__final", "fig3b_deq_a__final",
                 "fig3a_deq_a__final", "fig5_deq_a__final", "fig2a_deq_a__early-select",
                 "fig4_training_curves"):
        assert f"{stem}.png" in names and f"{stem}.pdf" in names, stem
    # efficient grid: no per-setting accuracy curve for early:select, noted instead
    assert "fig3a_deq_a__early-select.png" not in names
    notes = (tmp_path / "figs" / "figures.md").read_text()
    assert "Fig. 3c: fig3c_deviation.png" in notes and "early:select" in notes
    assert "fig3c_deviation.png" in names and "fig3c_deviation.pdf" in names
    import matplotlib.image as mpimg
    for p in figs:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            img = mpimg.imread(p)
            assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200 and img.shape[2] in (3, 4)
            assert img.std() > 0.01        # not a blank canvas


def test_missing_data_does_not_crash(tmp_path):
    db = build_sparse(tmp_path / "run" / "results.sqlite")
    t1 = T.table1(db)
    r = _row(t1, model="deq_a")
    assert (r.clean, r.pgd, r.ALL) == pytest.approx((7 / 8, 6 / 8, 6 / 8))
    assert math.isnan(r.grid) and math.isnan(r.autoattack) and math.isnan(r.min_over_means)
    assert T.table8(db).empty and T.table4_autoattack(db).empty
    paths = T.write_tables(tmp_path / "run")                       # default: RUN_DIR/tables
    assert all(p.parent == tmp_path / "run" / "tables" and p.stat().st_size > 0 for p in paths)
    assert "not in this run" in (tmp_path / "run" / "tables" / "table8.md").read_text()
    figs = F.write_figures(tmp_path / "run", formats=("png",), training_logs=[])
    names = {p.name for p in figs}
    assert "fig2a_deq_a__final.png" in names and not any(n.startswith("fig3a") for n in names)
    assert all(p.parent == tmp_path / "run" / "figures" for p in figs)

    # a run with no records at all
    with ResultsDB(tmp_path / "empty" / "results.sqlite") as d:
        _meta(d, [{"name": "deq_a"}])
    assert all(p.stat().st_size > 0 for p in T.write_tables(tmp_path / "empty"))
    assert [p.name for p in F.write_figures(tmp_path / "empty", formats=("png",))] == ["figures.md"]


def test_figures_are_not_redrawn_for_the_same_inputs(tmp_path):
    """A second `deqbench figures` on an unchanged run returns the same files without drawing;
    a new work unit in the database, another format or ``force`` redraws."""
    db = build_sparse(tmp_path / "run" / "results.sqlite")
    first = F.write_figures(tmp_path / "run", formats=("png",), training_logs=[])
    stamps = {p: p.stat().st_mtime_ns for p in first}
    again = F.write_figures(tmp_path / "run", formats=("png",), training_logs=[])
    assert again == first and {p: p.stat().st_mtime_ns for p in again} == stamps
    forced = F.write_figures(tmp_path / "run", formats=("png",), training_logs=[], force=True)
    assert forced == first and any(p.stat().st_mtime_ns != stamps[p] for p in forced)
    # a missing file is redrawn
    first[0].unlink()
    assert first[0] in F.write_figures(tmp_path / "run", formats=("png",), training_logs=[])
    assert first[0].is_file()
    # new records (a grid unit) change the inputs: Fig. 3a appears
    clean = [1, 1, 1, 1, 1, 1, 1, 0]
    with ResultsDB(db) as d:
        grid = _outcome([1, 0, 0, 1, 1, 1, 1, 0], clean, "final", "worst", final_h=[0.6] * 8)
        for i, ka, lam in SETTINGS:
            for k, e in enumerate(IDX):
                c = 0 if (not clean[k] or k in GRID_BREAKS[(i, ka, lam)]) else 1
                grid.append({"setting": _ui(i, ka, lam), "example": e, "label": 0, "correct": c,
                             "state": "final"})
        _commit(d, "deq_a", "final", "grid", grid)
    names = {p.name for p in F.write_figures(tmp_path / "run", formats=("png",),
                                             training_logs=[])}
    assert "fig3a_deq_a__final.png" in names
    both = F.write_figures(tmp_path / "run", formats=("png", "pdf"), training_logs=[])
    assert any(p.suffix == ".pdf" for p in both)


def test_cli(full_run, tmp_path, capsys):
    assert T.main([str(full_run), "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "table1.md").is_file()
    assert F.main([str(full_run), "--out", str(tmp_path / "f"), "--formats", "png"]) == 0
    assert (tmp_path / "f" / "fig2a_deq_a__final.png").is_file()
    assert T.main([str(tmp_path / "nowhere")]) == 2
    assert not (tmp_path / "nowhere").exists()
    assert "no results database" in capsys.readouterr().err


def test_figure_legends_say_a_defense_in_words():
    raw = '{"name": "entropy_reduction", "r": 5, "tf": 4}'
    assert F._defense_label("m", raw) == "m, Sec. 3.2 (Tf=4, R=5)"
    assert F._defense_label("m", "final") == "m"
    assert F._defense_label("m", "early:select") == "m, early exit"
    run = T.RunData(records=__import__("pandas").DataFrame(columns=["attack", "example"]),
                    meta={"dataset": {"name": "fashion_mnist", "n": 8}})
    label = run.figure_label("m", raw)
    assert "Sec. 3.2 (Tf=4, R=5)" in label and "{" not in label
    # Clopper-Pearson error bars of 3/8 (percent, below and above)
    from benchmark.report.stats import clopper_pearson
    lo, hi = clopper_pearson(3, 8)
    err = F._cp_err([3 / 8], 8)
    assert err[:, 0].tolist() == pytest.approx([100 * (3 / 8 - lo), 100 * (hi - 3 / 8)])

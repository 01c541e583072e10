"""The paper's claims (Yang et al., ICML 2023) as tested verdicts: ``deqbench claims RUN``.

Each claim is one or more paired tests on the run's per-example records (same examples on both
sides). Verdict rule, the same for every test: a two-sided test at alpha = 0.05 on the
**Holm-adjusted** p-value (Holm over every test of the run's claims, so the family-wise error is
<= 0.05); *supported* when it is significant and the effect has the paper's sign,
*contradicted* when it is significant with the opposite sign, *inconclusive at this n* otherwise.
A claim is supported when all its measured tests are, contradicted when any is, inconclusive
otherwise; a claim whose data the run lacks is *not measured*, with the reason.

Tests: exact McNemar (binomial test of the discordant pairs) with Newcombe's 95% interval for
accuracies; the exact sign test (binomial) for "more inputs have higher perturbed entropy";
the Wilcoxon signed-rank test (scipy) with a t-interval of the mean paired difference for
continuous per-example quantities (deviation, entropy).

Writes ``RUN/claims.md`` and ``RUN/claims.json`` (and copies into a leaderboard folder).
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from scipy import stats as sps

from benchmark.report.outcomes import entry_outcomes, grid_setting_outcomes
from benchmark.report.stats import ALPHA, binomtest, clopper_pearson, holm, paired_comparison
from benchmark.tables import load_run, parse_setting

__all__ = ["CLAIMS", "RULE", "entropy_statistics", "evaluate_claims", "write_claims", "main"]

RULE = ("two-sided test at alpha = 0.05 on the Holm-adjusted p (over all tests below); "
        "supported = significant with the paper's sign, contradicted = significant with the "
        "opposite sign, inconclusive at this n = not significant; a claim is supported when all "
        "its tests are, contradicted when any is, inconclusive otherwise")

#: (id, short title, the paper's statement with its number)
CLAIMS = [
    (1, "Intermediate-state attacks beat the final-state attack (Table 2)",
     "Ready-made PGD at z* overestimates robustness; the intermediate attacks lower DEQ-Large "
     "(PGD-AT) robust accuracy from 36.93% (PGD) to 33.16% (INTER.)."),
    (2, "lambda = 0.5 attacks are stronger than lambda = 1 (Fig. 5)",
     "Mixing the intermediate and final gradients (lambda = 0.5) gives stronger attacks than the "
     "intermediate gradient alone (lambda = 1)."),
    (3, "The strongest attack lies mid-dynamics (Fig. 3 a)",
     "Attack strength peaks at intermediate states i (neither i = 1 nor i = N)."),
    (4, "Perturbed inputs have higher prediction entropy (Tables 6-7)",
     "P (Eq. 12) > 50% (average over the 144 attacks: over three-quarters) and Delta H "
     "(Eq. 13) < 0 for every attack (e.g. average -0.1027 for PGD-AT + Sec. 3.3)."),
    (5, "Sec. 3.3 reduces the deviation of the dynamics under attack (Fig. 3 c)",
     "Training with random intermediate states keeps perturbed trajectories closer to the clean "
     "ones."),
    (6, "Sec. 3.2 reduces prediction entropy (Fig. 3 b)",
     "The entropy-reduction defense lowers H(z[t]) of the (perturbed) inputs along the dynamics."),
    (7, "Sec. 3.2, Sec. 3.3 and both raise ALL over their baselines (Table 1)",
     "E.g. DEQ-Large TRADES: 33.16% -> +Sec. 3.3 / +Sec. 3.2 / both raise the worst-case robust "
     "accuracy (both: about +4 points)."),
    (8, "Attacks crafted on the combined defense transfer worse than its own attack (Table 3)",
     "Each off-diagonal (transferred) accuracy is above the diagonal (white-box on the same "
     "defense)."),
]


def _verdict(p_adj: Optional[float], effect: float) -> str:
    if p_adj is None or effect is None or not np.isfinite(effect):
        return "not measured"
    if p_adj < ALPHA:
        return "supported" if effect > 0 else "contradicted"
    return "inconclusive at this n"


def _mc_test(label, xa, xb, what_a, what_b, note=""):
    """Paired accuracies over the same examples: ``xa`` is the side the paper says has the HIGHER
    robust accuracy, so effect = acc(a) - acc(b) > 0 is the paper's direction."""
    pc = paired_comparison(xa, xb)
    return {"test": label, "kind": "McNemar exact (Newcombe 95% CI)", "n": pc.n,
            "effect": pc.diff, "effect_text": f"{what_a} {100 * pc.acc_a:.2f}% vs {what_b} "
                                              f"{100 * pc.acc_b:.2f}%: {100 * pc.diff:+.2f} points",
            "ci95": list(pc.ci95), "p": pc.p, "discordant": [pc.b, pc.c], "note": note,
            "unit": "points"}


def _cont_test(label, diffs, what, note="", unit=""):
    """Continuous paired differences (paper's direction positive): Wilcoxon signed-rank p,
    t-interval of the mean."""
    d = np.asarray(diffs, float)
    d = d[np.isfinite(d)]
    n = len(d)
    if n < 2:
        return None
    mean = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(n))
    h = float(sps.t.ppf(0.975, n - 1) * se) if se > 0 else 0.0
    p = 1.0 if np.all(d == 0) else float(sps.wilcoxon(d, alternative="two-sided").pvalue)
    return {"test": label, "kind": "Wilcoxon signed-rank (t 95% CI of the mean)", "n": n,
            "effect": mean, "effect_text": f"{what}: mean {mean:+.4g}{unit}",
            "ci95": [mean - h, mean + h], "p": p, "note": note, "unit": unit}


def _deq_finals(data):
    """(model, defense 'final') groups of DEQ models (evaluated state not 'output')."""
    out = []
    for (mk, dk), g in data.records.groupby(["model", "defense"], sort=False):
        c = g[g.attack == "clean"]
        if dk == "final" and len(c) and c.state.iloc[0] != "output":
            out.append((mk, dk, g))
    return out


def _settings_frame(g):
    wide = grid_setting_outcomes(g)
    if wide.empty or wide.isna().any().any():
        return None, None
    parsed = {s: parse_setting(s) for s in wide.columns}
    parsed = {s: p for s, p in parsed.items() if p}
    return wide[list(parsed)].astype(int), parsed


# ---------------------------------------------------------------------------------------------
# Eqs. (12)-(13)
# ---------------------------------------------------------------------------------------------

def entropy_statistics(h_clean, h_adv) -> dict:
    """The paper's Eqs. (12)-(13) for ONE attack over the set V of inputs given (every input with
    its perturbed counterpart): P = (1/|V|) sum_j 1(H(z_j) < H(z~*_j)) (a fraction; the paper
    prints x 100 %), Delta H = (1/|V|) sum_j (H(z_j) - H(z~*_j))."""
    hc, ha = np.asarray(h_clean, float), np.asarray(h_adv, float)
    if hc.shape != ha.shape or hc.ndim != 1 or len(hc) == 0:
        raise ValueError("h_clean and h_adv must be equally long non-empty 1-D arrays")
    return {"n": len(hc), "P": float(np.mean(hc < ha)), "dH": float(np.mean(hc - ha))}


def grid_entropy_statistics(g) -> Optional[dict]:
    """Per grid setting of one (model, defense): P and Delta H (Eqs. 12-13) over V = the inputs
    that have a perturbed counterpart -- clean-correct inputs, and clean-misclassified ones only
    when their record says ``extra.attacked`` (the runner does not attack them: x~ = x). Also
    the same over every input as recorded (x~ = x for the unattacked), and per example the
    average over settings of H_clean - H_adv (for the sign test)."""
    clean = g[g.attack == "clean"].groupby("example").correct.min()
    grid = g[(g.attack == "grid") & (g.setting != "worst")]
    # column-wise (not iterrows: a 1,000-image run has ~10^5 grid records per entry)
    ex = [e if isinstance(e, dict) else {} for e in grid.extra.tolist()]
    hc = [e.get("H_clean") for e in ex]
    ha = [e.get("H") for e in ex]
    keep = np.array([a is not None and b is not None for a, b in zip(hc, ha)], dtype=bool)
    if not keep.any():
        return None
    cc = grid.example.map(clean).fillna(0).to_numpy() == 1
    att = np.array([bool(e.get("attacked")) for e in ex], dtype=bool)
    f = pd.DataFrame({"setting": grid.setting.to_numpy()[keep],
                      "example": grid.example.to_numpy()[keep],
                      "hc": np.array([float(v) for v, k in zip(hc, keep) if k]),
                      "ha": np.array([float(v) for v, k in zip(ha, keep) if k]),
                      "attacked": (cc | att)[keep]})
    per, per_all = [], []
    for s, q in f.groupby("setting", sort=False):
        v = q[q.attacked]
        if len(v):
            per.append({"setting": s, **entropy_statistics(v.hc, v.ha)})
        per_all.append({"setting": s, **entropy_statistics(q.hc, q.ha)})
    v = f[f.attacked]
    d_j = (v.hc - v.ha).groupby(v.example).mean()
    return {"per_setting": per, "per_setting_all_inputs": per_all, "d_j": d_j,
            "n_inputs": int(f.example.nunique()), "n_attacked": int(v.example.nunique())}


# ---------------------------------------------------------------------------------------------
# the claims
# ---------------------------------------------------------------------------------------------

def _claim1(data, outs):
    tests, why = [], []
    for mk, dk, g in _deq_finals(data):
        o = outs[(mk, dk)]
        wide, parsed = _settings_frame(g)
        if "pgd" not in o or wide is None:
            why.append(f"{mk}: needs PGD and every grid setting on every example (grid mode full)")
            continue
        best = wide.mean().idxmin()
        t = _mc_test(f"{mk}: PGD at z* vs the best single setting {best}",
                     o["pgd"].to_numpy(), wide[best].reindex(o.index).to_numpy(),
                     "PGD", best, "the best setting is chosen on these examples (favours the "
                     "claim); table2's worst-over-all-settings column is <= PGD by construction "
                     "and not used")
        tests.append(t)
    return tests, why


def _lam_family(wide, parsed, lam):
    cols = [s for s, p in parsed.items() if abs(p["lam"] - lam) < 1e-9]
    return wide[cols].min(axis=1) if cols else None


def _claim2(data, outs):
    tests, why = [], []
    for mk, dk, g in _deq_finals(data):
        wide, parsed = _settings_frame(g)
        if wide is None:
            why.append(f"{mk}: no complete grid")
            continue
        a, b = _lam_family(wide, parsed, 1.0), _lam_family(wide, parsed, 0.5)
        if a is None or b is None:
            why.append(f"{mk}: the grid lacks lambda = 0.5 or 1")
            continue
        tests.append(_mc_test(f"{mk}: worst case over the lambda = 1 settings vs over the "
                              "lambda = 0.5 settings", a.to_numpy(), b.to_numpy(),
                              "lambda=1", "lambda=0.5"))
    return tests, why


def _claim3(data, outs):
    tests, why, extra = [], [], {}
    for mk, dk, g in _deq_finals(data):
        wide, parsed = _settings_frame(g)
        if wide is None:
            why.append(f"{mk}: no complete grid")
            continue
        iN = max(p["i"] for p in parsed.values())
        acc = wide.mean()
        best = acc.idxmin()
        extra[mk] = {"strongest_setting": best, "i": parsed[best]["i"], "N": iN}
        mid = [s for s, p in parsed.items() if 1 < p["i"] < iN]
        if not mid:
            why.append(f"{mk}: no mid-dynamics setting")
            continue
        bm = acc[mid].idxmin()
        for end in (1, iN):
            cols = [s for s, p in parsed.items() if p["i"] == end]
            if not cols:
                continue
            be = acc[cols].idxmin()
            t = _mc_test(f"{mk}: best at i = {end} ({be}) vs best mid-dynamics ({bm}); "
                         f"strongest overall: {best} (i = {parsed[best]['i']} of N = {iN})",
                         wide[be].to_numpy(), wide[bm].to_numpy(), be, bm,
                         "best settings chosen on these examples")
            tests.append(t)
    return tests, why, extra


def _claim4(data, outs):
    tests, why, extra = [], [], {}
    mode = ((data.config.get("attacks") or {}).get("grid") or {}).get("mode", "efficient")
    for mk, dk, g in _deq_finals(data):
        st = grid_entropy_statistics(g)
        if st is None or not st["per_setting"]:
            why.append(f"{mk}: no per-setting entropies (grid mode full with entropies)")
            continue
        P = np.array([r["P"] for r in st["per_setting"]])
        dH = np.array([r["dH"] for r in st["per_setting"]])
        Pall = np.array([r["P"] for r in st["per_setting_all_inputs"]])
        dHall = np.array([r["dH"] for r in st["per_setting_all_inputs"]])
        d = st["d_j"].to_numpy()
        k, m = int((d < 0).sum()), int((d != 0).sum())
        p = float(binomtest(k, m, 0.5).pvalue) if m else 1.0
        lo, hi = clopper_pearson(k, m) if m else (float("nan"), float("nan"))
        extra[mk] = {"settings": len(P), "P_avg": float(P.mean()), "P_min": float(P.min()),
                     "P_max": float(P.max()), "dH_avg": float(dH.mean()),
                     "dH_min": float(dH.min()), "dH_max": float(dH.max()),
                     "P_avg_all_inputs_as_recorded": float(Pall.mean()),
                     "dH_avg_all_inputs_as_recorded": float(dHall.mean()),
                     "n_inputs": st["n_inputs"], "n_with_counterpart": st["n_attacked"]}
        tests.append({"test": f"{mk}: inputs whose perturbed entropy is higher (averaged over "
                              f"{len(P)} settings), sign test", "kind": "exact sign test "
                              "(Clopper-Pearson 95% CI of the share)", "n": m,
                      "effect": k / m - 0.5 if m else float("nan"),
                      "effect_text": f"{k} of {m} inputs higher perturbed entropy "
                                     f"({100 * k / m if m else float('nan'):.1f}%); P_avg "
                                     f"{100 * P.mean():.1f}%, Delta H_avg {dH.mean():+.4f}",
                      "ci95": [lo - 0.5, hi - 0.5], "p": p, "unit": "share - 0.5",
                      "note": "V = inputs with a perturbed counterpart: the "
                              f"{st['n_attacked']} of {st['n_inputs']} attacked; the paper's V "
                              "also holds clean-misclassified inputs with their PGD-10 "
                              "counterpart, which the runner does not attack (x~ = x); over all "
                              f"inputs as recorded P_avg = {100 * Pall.mean():.1f}%, Delta H_avg "
                              f"= {dHall.mean():+.4f}." + (
                                  " PGD stops at the first misclassifying iterate (grid mode "
                                  f"{mode}), so x~ is that iterate, not the 10th."
                                  if mode != "naive" else " Grid mode naive: full PGD-10, no "
                                  "early stop.")})
        dt = _cont_test(f"{mk}: Delta H (Eq. 13) per input, averaged over settings",
                        -d, "H(x~) - H(x)")
        if dt:
            dt["effect_text"] = f"Delta H_avg = {dH.mean():+.4f} (paper's sign: clean - perturbed)"
            tests.append(dt)
    return tests, why, extra


def _sec33_pairs(models):
    return [(m.replace("_sec33", ""), m) for m in models if "_sec33" in m
            and m.replace("_sec33", "") in models]


def _deviation(g, attack="pgd"):
    clean = g[g.attack == "clean"].groupby("example").correct.min()
    a = g[g.attack == attack]
    out = {}
    for ex, e in zip(a.example, a.extra):
        if clean.get(ex, 0) == 1 and isinstance(e, dict) and isinstance(e.get("deviation"), list) \
                and e["deviation"]:
            out[ex] = float(e["deviation"][-1])
    return pd.Series(out, dtype=float)


def _claim5(data, outs):
    tests, why = [], []
    models = list(dict.fromkeys(data.records.model))
    pairs = _sec33_pairs(models)
    if not pairs:
        return tests, ["the run holds no model pair X / X_sec33"]
    recs = data.records
    for base, s33 in pairs:
        db = _deviation(recs[(recs.model == base) & (recs.defense == "final")])
        ds = _deviation(recs[(recs.model == s33) & (recs.defense == "final")])
        common = db.index.intersection(ds.index)
        if len(common) < 2:
            why.append(f"{s33} vs {base}: no per-example deviation on common examples")
            continue
        t = _cont_test(f"{s33} vs {base}: relative deviation ||z~* - z*|| / ||z*|| under PGD, "
                       f"same {len(common)} examples", (db[common] - ds[common]).to_numpy(),
                       "deviation(baseline) - deviation(Sec. 3.3)")
        if t:
            tests.append(t)
    return tests, why


def _claim6(data, outs):
    from benchmark.figures import sec32_entropy_change
    tests, why = [], []
    for (mk, dk), g in data.records.groupby(["model", "defense"], sort=False):
        if "entropy_reduction" not in str(dk):
            continue
        d = sec32_entropy_change(g)
        key = "pgd" if "pgd" in d else ("clean" if "clean" in d else None)
        if key is None:
            why.append(f"{mk} [{dk}]: no entropies with and without the defense")
            continue
        t = _cont_test(f"{mk} [{dk}]: H(z*) without minus with Sec. 3.2 on the "
                       f"{'PGD-perturbed' if key == 'pgd' else 'clean'} inputs", -d[key][:, -1],
                       "H without - H with")
        if t:
            tests.append(t)
    if not tests and not why:
        why.append("the run has no Sec. 3.2 (entropy_reduction) defense")
    return tests, why


def _claim7(data, outs):
    tests, why = [], []
    models = list(dict.fromkeys(data.records.model))
    for base, s33 in _sec33_pairs(models):
        for label, a, b in (("Sec. 3.3", (s33, "final"), (base, "final")),
                            ("Sec. 3.2 + Sec. 3.3", (s33, "entropy_reduction"), (base, "final"))):
            if a in outs and b in outs:
                oa, ob = outs[a], outs[b]
                c = oa.index.intersection(ob.index)
                tests.append(_mc_test(f"{label}: {a[0]} [{a[1]}] vs {b[0]} [{b[1]}], ALL",
                                      oa.ALL.reindex(c).to_numpy(), ob.ALL.reindex(c).to_numpy(),
                                      "defended", "baseline"))
    for (mk, dk), o in outs.items():
        if dk == "entropy_reduction" and (mk, "final") in outs:
            ob = outs[(mk, "final")]
            c = o.index.intersection(ob.index)
            tests.append(_mc_test(f"Sec. 3.2: {mk} [entropy_reduction] vs {mk} [final], ALL",
                                  o.ALL.reindex(c).to_numpy(), ob.ALL.reindex(c).to_numpy(),
                                  "defended", "baseline"))
    if not tests:
        why.append("the run has neither an X / X_sec33 pair nor a Sec. 3.2 defense with its "
                   "undefended model")
    return tests, why


def _claim8(data, outs):
    tests, why = [], []
    recs = data.records
    tr = recs[recs.attack == "transfer"]
    if tr.empty:
        return tests, ["the run has no transfer records (attacks.transfer)"]
    for (mk, dk), g in tr.groupby(["model", "defense"], sort=False):
        if "entropy_reduction" not in str(dk) or "_sec33" not in mk:
            continue   # the combined defense: Sec. 3.3 model + Sec. 3.2
        clean = outs[(mk, dk)].clean
        own = g[g.setting == f"{mk}@{dk}"]
        if own.empty:
            why.append(f"{mk} [{dk}]: no transfer record crafted on itself (the diagonal)")
            continue
        diag = (own.groupby("example").correct.min().reindex(clean.index).fillna(0) * clean)
        for src, s in g[g.setting != f"{mk}@{dk}"].groupby("setting", sort=False):
            off = s.groupby("example").correct.min().reindex(clean.index).fillna(0) * clean
            tests.append(_mc_test(f"{mk} [{dk}]: crafted on {src} vs on itself",
                                  off.to_numpy().astype(int), diag.to_numpy().astype(int),
                                  f"from {src}", "own"))
    if not tests and not why:
        why.append("no transfer records on a combined (Sec. 3.3 model + Sec. 3.2) defense")
    return tests, why


def evaluate_claims(src) -> dict:
    """The claims of :data:`CLAIMS` on a run (folder, database or RunData) ->
    ``{"rule", "n", "claims": [{id, title, paper, verdict, tests: [...], not_measured, ...}]}``,
    each test with ``effect`` (paper's direction positive), ``ci95``, ``n``, ``p`` and
    ``p_holm`` (over every test of the run) and its ``verdict``."""
    data = load_run(src)
    outs = {k: entry_outcomes(g) for k, g in data.records.groupby(["model", "defense"], sort=False)}
    fns = {1: _claim1, 2: _claim2, 3: _claim3, 4: _claim4, 5: _claim5, 6: _claim6, 7: _claim7,
           8: _claim8}
    claims = []
    for cid, title, paper in CLAIMS:
        res = fns[cid](data, outs)
        tests, why = res[0], res[1]
        claims.append({"id": cid, "title": title, "paper": paper, "tests": tests,
                       "not_measured": why, "details": res[2] if len(res) > 2 else {}})
    flat = [t for c in claims for t in c["tests"]]
    for t, p in zip(flat, holm([t["p"] for t in flat])):
        t["p_holm"] = p
        t["verdict"] = _verdict(p, t["effect"])
    for c in claims:
        vs = [t["verdict"] for t in c["tests"]]
        if not vs:
            c["verdict"] = "not measured"
        elif "contradicted" in vs:
            c["verdict"] = "contradicted"
        elif all(v == "supported" for v in vs):
            c["verdict"] = "supported"
        else:
            c["verdict"] = "inconclusive at this n"
    return {"rule": RULE, "n": data.n, "dataset": data.dataset, "eps": data.eps_text,
            "tests": len(flat), "claims": claims}


def tally(claim: dict) -> str:
    """How a claim's tests split, e.g. ``1 supported, 1 contradicted of 2``."""
    vs = [t["verdict"] for t in claim["tests"]]
    if not vs:
        return "-"
    parts = [f"{vs.count(v)} {v.replace(' at this n', '')}"
             for v in ("supported", "contradicted", "inconclusive at this n") if v in vs]
    return f"{', '.join(parts)} of {len(vs)}"


def _fmt_ci(t):
    lo, hi = t["ci95"]
    if t.get("unit") == "points":
        return f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return f"[{lo:+.3g}, {hi:+.3g}]"


def to_markdown(res: dict) -> str:
    lines = [f"# The paper's claims on this run ({res['dataset']}, eps = {res['eps']}, "
             f"n = {res['n']})", "", f"Verdict rule: {res['rule']}. Effects are signed so that "
             "positive is the paper's direction.", "",
             "| # | claim | verdict | tests |", "|---:|---|---|---|"]
    for c in res["claims"]:
        lines.append(f"| {c['id']} | {c['title']} | **{c['verdict']}** | {tally(c)} |")
    for c in res["claims"]:
        lines += ["", f"## {c['id']}. {c['title']}: {c['verdict']}", "",
                  f"Paper: {c['paper']}", ""]
        if c["tests"]:
            lines += ["| test | measured | 95% CI | n | p | p (Holm) | verdict |",
                      "|---|---|---|---:|---:|---:|---|"]
            for t in c["tests"]:
                cells = [t["test"], t["effect_text"], _fmt_ci(t), str(t["n"]), f"{t['p']:.3g}",
                         f"{t['p_holm']:.3g}", t["verdict"]]
                lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
            notes = [t["note"] for t in c["tests"] if t.get("note")]
            for note in dict.fromkeys(notes):
                lines.append(f"\n- {note}")
        for why in c["not_measured"]:
            lines.append(f"- not measured: {why}")
        if c.get("details"):
            lines.append(f"\n- details: `{json.dumps(c['details'], default=str)}`")
    return "\n".join(lines) + "\n"


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, pd.Series):
        return None
    return str(o)


def write_claims(run, leaderboard=None) -> list:
    """Write RUN/claims.md and RUN/claims.json (and copies into ``leaderboard``); returns paths."""
    data = load_run(run)
    res = evaluate_claims(data)
    out = data.run_dir
    md, js = out / "claims.md", out / "claims.json"
    md.write_text(to_markdown(res))
    js.write_text(json.dumps(res, indent=2, default=_jsonable, allow_nan=True) + "\n")
    paths = [md, js]
    if leaderboard is not None:
        lbd = Path(leaderboard)
        lbd.mkdir(parents=True, exist_ok=True)
        for p in (md, js):
            shutil.copy(p, lbd / p.name)
            paths.append(lbd / p.name)
    return paths


def main(argv=None) -> int:
    import argparse
    import sys
    ap = argparse.ArgumentParser(prog="deqbench claims", description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run folder holding results.sqlite, or the .sqlite file")
    ap.add_argument("--leaderboard", default=None, help="also copy claims.md/.json here")
    args = ap.parse_args(argv)
    try:
        paths = write_claims(args.run, args.leaderboard)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(paths[0].read_text())
    for p in paths:
        print(p)
    return 0

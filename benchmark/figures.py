"""The paper's figures (Yang et al., ICML 2023), drawn from a run's results database.

Everything is derived from the per-example records (see :mod:`benchmark.tables` for the
conventions); nothing is re-attacked. Figures use matplotlib's Agg canvas directly (no pyplot, no
display), and every one is titled with dataset, eps, model (and reported forward) and n::

    python -m benchmark.figures runs/eval/NAME [--out DIR] [--formats png,pdf] [--train-log CSV ...]

Files (``<slug>`` = model and defense; one per (model, defense) with the data):

* ``fig2a_<slug>``: distributions of the final relative residual and of the final-state entropy
  H(z[N]), clean vs perturbed (ready-made PGD records), the paper's Fig. 2 (a)-(b);
* ``fig2b_<slug>``: H(z[t]) along t for one example (clean-correct and broken by PGD when there
  is one), clean vs perturbed, the paper's Fig. 2 (c);
* ``fig3a_<slug>``: per-state accuracy of every (Ka, lambda) grid setting (transparent markers),
  the strongest at each state solid and joined;
* ``fig3b_sec32_<slug>`` (Sec. 3.2 defenses): the paper's Fig. 3 (b), Delta H(z[t]) = H(z[t])
  with the entropy reduction minus H(z[t]) without it, on the same PGD-perturbed inputs (box
  per t) and clean inputs (mean), from ``extra.entropies_undefended``;
* ``fig3b_<slug>``: distribution per t of Delta H(z[t]) = H(z~[t]) - H(z[t]) (PGD adversarial
  minus clean): the entropy increase the attack causes along the dynamics;
* ``fig5_<slug>``: the strongest per-state accuracy for lambda = 1.0 vs 0.5;
* ``fig4_training_curves``: training curves from ``log.csv`` files (:func:`plot_training_curves`).
* ``fig3c_deviation``: the relative deviation ||z~[t] - z[t]|| / ||z[t]|| (in %) of the
  perturbed dynamics (ready-made PGD examples) from the clean ones along t, one line (mean) and
  band (25-75 % quantiles) per (model, defense) in ONE figure, as the paper compares its models;
  from the records' ``extra.deviation`` (:func:`figure3c`).

Figures whose data is absent are skipped; ``figures.md`` in the output folder lists what was
drawn and what was skipped, and why. Per-setting accuracies (Fig. 3a, 5) need grid settings that
cover every clean-correct example (``grid.mode: full`` or ``naive``); in ``efficient`` mode they
are unavailable and the figures are skipped with that reason.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from benchmark.tables import (RunData, _clean, _groups, entropy_pairs, load_run,
                              setting_accuracies, table8)

__all__ = ["write_figures", "plot_training_curves", "figure2a", "figure2b", "figure3a",
           "figure3b", "figure3b_sec32", "sec32_entropy_change", "figure3c", "deviation_table", "figure5", "find_training_logs", "main"]

FIG3C_ATTACK = "pgd"  # the perturbed inputs of Fig. 3 (c): the ready-made PGD at the final state


def _new_figure(w=6.4, h=4.2, ncols=1):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w * ncols, h), layout="constrained")
    axes = [fig.add_subplot(1, ncols, k + 1) for k in range(ncols)]
    return fig, axes


def _slug(model: str, defense: Optional[str] = None) -> str:
    text = model if defense is None else f"{model}__{defense}"
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")
    if len(s) > 60 or s != text.replace(":", "-"):
        s = s[:60] + "-" + hashlib.sha1(text.encode()).hexdigest()[:6]
    return s


def _save(fig, out_dir: Path, stem: str, formats) -> list:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        p = out_dir / f"{stem}.{fmt}"
        fig.savefig(p, format=fmt, dpi=120)
        paths.append(p)
    return paths


def _cp_err(acc, n):
    """Asymmetric error bars (percent, shape (2, k)) of the exact 95% Clopper-Pearson intervals
    of accuracies ``acc`` (fractions, each k/n) over n examples -- the leaderboard's intervals."""
    from benchmark.report.stats import clopper_pearson
    acc = np.atleast_1d(np.asarray(acc, float))
    n = np.broadcast_to(np.asarray(n, int), acc.shape)
    lo, hi = [], []
    for a, m in zip(acc, n):
        ci = clopper_pearson(int(round(a * m)), int(m)) if m > 0 and a == a else (a, a)
        lo.append(100 * (a - ci[0]))
        hi.append(100 * (ci[1] - a))
    return np.array([lo, hi])


def _mean_ci(x):
    """(mean, lo, hi) with a 95% t-interval of the mean (scipy)."""
    from scipy import stats as sps
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(x.mean())
    if len(x) < 2:
        return m, m, m
    h = float(sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return m, m - h, m + h


def _defense_label(model: str, defense) -> str:
    """'model, Sec. 3.2 (Tf=4, R=5)' -- a defense in words for legends, never raw JSON."""
    from benchmark.leaderboard import defense_words
    short = defense_words(defense)[0]
    return model if short == "none" else f"{model}, {short}"


def _last(v) -> float:
    return float(v[-1]) if isinstance(v, list) and v else float("nan")


# ---------------------------------------------------------------------------------------------
# Fig. 2
# ---------------------------------------------------------------------------------------------

def figure2a(data: RunData, model: str, defense: str, g, out_dir: Path, formats) -> list:
    """Residual and entropy distributions at the final state, clean vs PGD-perturbed."""
    p = entropy_pairs(g, "pgd")
    if p.empty:
        return []
    fig, (a1, a2) = _new_figure(ncols=2)
    rc = np.array([_last(v) for v in p.res_clean], float)
    ra = np.array([_last(v) for v in p.res_adv], float)
    if np.isfinite(rc).any() or np.isfinite(ra).any():
        both = np.concatenate([rc[np.isfinite(rc)], ra[np.isfinite(ra)]])
        pos = both[both > 0]
        if len(pos) == len(both) and len(pos) and pos.max() > pos.min():
            bins = np.logspace(np.log10(pos.min()), np.log10(pos.max()), 25)
            a1.set_xscale("log")
        else:
            bins = 25
        a1.hist(rc[np.isfinite(rc)], bins=bins, alpha=0.6, label="clean")
        a1.hist(ra[np.isfinite(ra)], bins=bins, alpha=0.6, label="perturbed (PGD)")
        a1.legend()
    else:
        a1.text(0.5, 0.5, "no residuals stored", ha="center", transform=a1.transAxes)
    a1.set_xlabel(r"final relative residual $\|f(z[N])-z[N]\|/\|f(z[N])\|$")
    a1.set_ylabel("examples")
    a1.set_title("(a) relative residual at z[N]")
    hc = np.array([_last(v) for v in p.H_clean], float)
    ha = np.array([_last(v) for v in p.H_adv], float)
    lo, hi = np.nanmin(np.r_[hc, ha]), np.nanmax(np.r_[hc, ha])
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 25)
    for vals, lab in ((hc, "clean"), (ha, "perturbed (PGD)")):
        m, lo_m, hi_m = _mean_ci(vals)
        a2.hist(vals, bins=bins, alpha=0.6,
                label=f"{lab}: mean {m:.3f} [{lo_m:.3f}, {hi_m:.3f}]")
        a2.axvline(m, color="black" if lab == "clean" else "tab:red", lw=0.8)
        a2.axvspan(lo_m, hi_m, color="black" if lab == "clean" else "tab:red", alpha=0.12)
    a2.set_xlabel("prediction entropy H(z[N])")
    a2.set_ylabel("examples")
    a2.set_title("(b) entropy at z[N] (mean, 95% CI)")
    a2.legend(fontsize=7)
    fig.suptitle("Fig. 2 (a, b): residual and entropy at z[N], clean vs PGD\n"
                 + data.figure_label(model, defense, len(p)), fontsize=10)
    return _save(fig, out_dir, f"fig2a_{_slug(model, defense)}", formats)


def figure2b(data: RunData, model: str, defense: str, g, out_dir: Path, formats) -> list:
    """H(z[t]) along the dynamics for one example, clean vs PGD-perturbed."""
    p = entropy_pairs(g, "pgd")
    if p.empty:
        return []
    pick = p[(p.clean_correct == 1) & (p.adv_correct == 0)]
    row = (pick if len(pick) else p).iloc[0]
    hc, ha = list(row.H_clean), list(row.H_adv)
    fig, (ax,) = _new_figure()
    ax.plot(range(1, len(hc) + 1), hc, "o-", label=f"clean ({'correct' if row.clean_correct else 'wrong'})")
    ax.plot(range(1, len(ha) + 1), ha, "s--",
            label=f"perturbed, PGD ({'correct' if row.adv_correct else 'wrong'})")
    ax.set_xlabel("state t")
    ax.set_ylabel("prediction entropy H(z[t])")
    ax.set_xticks(range(1, max(len(hc), len(ha)) + 1))
    ax.legend()
    fig.suptitle(f"Fig. 2 (c): H(z[t]) of test example {int(row.example)}\n"
                 + data.figure_label(model, defense, 1), fontsize=10)
    return _save(fig, out_dir, f"fig2b_{_slug(model, defense)}", formats)


# ---------------------------------------------------------------------------------------------
# Fig. 3
# ---------------------------------------------------------------------------------------------

def figure3a(data: RunData, model: str, defense: str, s, out_dir: Path, formats) -> list:
    """Per-state accuracy of every available (Ka, lambda) setting (transparent); the strongest at
    each state solid, for the states whose settings all cover every clean-correct example.
    Skipped ([]) when no state is complete (efficient grid mode)."""
    s = s[s.i.notna()]
    complete = s.groupby("i").acc.apply(lambda a: bool(a.notna().all()))
    complete = set(complete[complete].index)
    s = s[s.acc.notna()]
    if s.empty or not complete:
        return []
    fig, (ax,) = _new_figure(7.0, 4.5)
    colors = {lam: c for lam, c in zip(sorted(s.lam.unique()), ("tab:blue", "tab:orange",
                                                                "tab:green", "tab:red"))}
    for lam, gl in s.groupby("lam"):
        ax.scatter(gl.i, 100 * gl.acc, alpha=0.25, color=colors[lam], s=18,
                   label=f"all Ka, lambda={lam:g}")
    sc = s[s.i.isin(complete)]
    best = sc.loc[sc.groupby("i").acc.idxmin()].sort_values("i")
    ax.plot(best.i, 100 * best.acc, "-", color="black", lw=1)
    ax.errorbar(best.i, 100 * best.acc, yerr=_cp_err(best.acc, best.n), fmt="none",
                ecolor="black", elinewidth=0.8, capsize=3, zorder=2,
                label="95% CI (Clopper-Pearson) of the strongest")
    for _, r in best.iterrows():
        ax.scatter([r.i], [100 * r.acc], color=colors[r.lam], edgecolor="black", s=60, zorder=3)
        ax.annotate(f"Ka={int(r.ka)}", (r.i, 100 * r.acc), textcoords="offset points",
                    xytext=(0, -13), ha="center", fontsize=7)
    k = best.acc.idxmin()
    ax.scatter([best.loc[k, "i"]], [100 * best.loc[k, "acc"]], marker="*", s=220, color="red",
               zorder=4, label=f"strongest: {best.loc[k, 'setting']}")
    ax.set_xlabel("intermediate state i (attack through z[i])")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_xticks(sorted(int(i) for i in s.i.unique()))
    ax.legend(fontsize=7)
    n = int(s.n.iloc[0])
    fig.suptitle("Fig. 3 (a): PGD through z[i] with Ka unrolled steps (solid: strongest at z[i], "
                 "bars: 95% CI)\n"
                 + data.figure_label(model, defense, n), fontsize=10)
    return _save(fig, out_dir, f"fig3a_{_slug(model, defense)}", formats)


def figure3b(data: RunData, model: str, defense: str, g, out_dir: Path, formats) -> list:
    """Box plot per state t of Delta H(z[t]) = H(z~[t]) - H(z[t]) (PGD minus clean)."""
    p = entropy_pairs(g, "pgd")
    if p.empty:
        return []
    T = min(min(len(a), len(b)) for a, b in zip(p.H_clean, p.H_adv))
    if T == 0:
        return []
    d = np.array([[a[t] - c[t] for t in range(T)] for c, a in zip(p.H_clean, p.H_adv)], float)
    fig, (ax,) = _new_figure(7.0, 4.5)
    ax.boxplot([d[:, t] for t in range(T)], positions=list(range(1, T + 1)), showfliers=True)
    ax.axhline(0, color="grey", lw=0.8, ls=":")
    ax.plot(range(1, T + 1), d.mean(0), "o-", color="tab:red", label="mean")
    ax.set_xlabel("state t")
    ax.set_ylabel(r"$\Delta H(z[t]) = H(\tilde z[t]) - H(z[t])$  (PGD $-$ clean)")
    ax.legend()
    fig.suptitle("Fig. 3 (b): entropy change along the dynamics under PGD\n"
                 + data.figure_label(model, defense, len(p)), fontsize=10)
    return _save(fig, out_dir, f"fig3b_{_slug(model, defense)}", formats)


def sec32_entropy_change(g, attack: str = "pgd") -> dict:
    """For one (model, Sec. 3.2 defense) group: per example, Delta H(z[t]) = H(z[t]) with the
    defense minus H(z[t]) without it (its readout forward) on the SAME inputs, from the records'
    ``entropies`` and ``extra.entropies_undefended``. ``{'clean': (n, T) array, attack: (n, T)
    array over the clean-correct examples (the ones the attack perturbed)}``; absent keys
    where the run has no such records."""
    out = {}
    clean_ok = _clean(g)
    for name, sel in (("clean", g[g.attack == "clean"]), (attack, g[g.attack == attack])):
        if name != "clean":
            sel = sel[sel.example.map(clean_ok).fillna(0).astype(int) == 1]
        pairs = [(h, e["entropies_undefended"]) for h, e in zip(sel.entropies, sel.extra)
                 if isinstance(h, list) and isinstance(e, dict)
                 and isinstance(e.get("entropies_undefended"), list)]
        if not pairs:
            continue
        T = min(min(len(a), len(b)) for a, b in pairs)
        if T:
            out[name] = np.array([[a[t] - b[t] for t in range(T)] for a, b in pairs], float)
    return out


def figure3b_sec32(data: RunData, model: str, defense: str, g, out_dir: Path, formats) -> list:
    """The paper's Fig. 3 (b): the entropy change made by the Sec. 3.2 defense along t, on the
    PGD-perturbed inputs (box per t) and on the clean ones (mean line)."""
    d = sec32_entropy_change(g)
    if "pgd" not in d and "clean" not in d:
        return []
    fig, (ax,) = _new_figure(7.0, 4.5)
    if "pgd" in d:
        T = d["pgd"].shape[1]
        ax.boxplot([d["pgd"][:, t] for t in range(T)], positions=list(range(1, T + 1)))
        ax.plot(range(1, T + 1), d["pgd"].mean(0), "o-", color="tab:red",
                label=f"PGD-perturbed inputs (mean, n={len(d['pgd'])})")
    if "clean" in d:
        T = d["clean"].shape[1]
        ax.plot(range(1, T + 1), d["clean"].mean(0), "s--", color="tab:blue",
                label=f"clean inputs (mean, n={len(d['clean'])})")
    ax.axhline(0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("state t")
    ax.set_ylabel(r"$\Delta H(z[t])$ = H with Sec. 3.2 $-$ H without")
    ax.legend(fontsize=8)
    n = len(d["pgd"]) if "pgd" in d else len(d["clean"])
    fig.suptitle("Fig. 3 (b): entropy reduction by Sec. 3.2 along the dynamics\n"
                 + data.figure_label(model, defense, n), fontsize=10)
    return _save(fig, out_dir, f"fig3b_sec32_{_slug(model, defense)}", formats)


def deviation_table(data: RunData, attack: str = FIG3C_ATTACK) -> "pd.DataFrame":
    """Per (model, defense, state t): mean and 25/50/75 % quantiles of the relative deviation
    ||z~[t] - z[t]|| / ||z[t]|| over the examples whose ``attack`` record carries
    ``extra.deviation`` (primary setting only), and their number ``n``. Only clean-correct
    examples count: the attacks leave the others unperturbed (deviation 0)."""
    import pandas as pd
    per = {}
    for (mk, dk), g in _groups(data.records):
        a = g[g.attack == attack]
        a = a[a.setting == "worst"] if attack == "grid" else a
        clean = _clean(g)
        a = a[a.example.map(clean).fillna(0).astype(int) == 1]
        devs = {int(ex): e["deviation"] for ex, e in zip(a.example, a.extra)
                if isinstance(e, dict) and isinstance(e.get("deviation"), list) and e["deviation"]}
        if devs:
            per[(mk, dk)] = devs
    # the SAME examples for every curve: those every (model, defense) has a deviation for
    # (clean-correct under all of them), so the curves are paired comparisons
    common = set.intersection(*(set(d) for d in per.values())) if per else set()
    rows = []
    for (mk, dk), devs in per.items():
        if not common:
            break
        T = min(len(devs[e]) for e in common)
        d = np.array([devs[e][:T] for e in sorted(common)], float)
        for t in range(T):
            q25, q50, q75 = np.quantile(d[:, t], [0.25, 0.5, 0.75])
            m, lo, hi = _mean_ci(d[:, t])
            rows.append({"model": mk, "defense": dk, "t": t + 1, "mean": m,
                         "ci_lo": lo, "ci_hi": hi,
                         "q25": float(q25), "median": float(q50), "q75": float(q75),
                         "n": len(d)})
    return pd.DataFrame(rows, columns=["model", "defense", "t", "mean", "ci_lo", "ci_hi", "q25",
                                       "median", "q75", "n"])


def figure3c(data: RunData, out_dir: Path, formats, attack: str = FIG3C_ATTACK) -> list:
    """Relative deviation of the perturbed from the clean dynamics along t, every (model,
    defense) with the data in one figure (mean line, 25-75 % band). ``[]`` without data."""
    d = deviation_table(data, attack)
    if d.empty:
        return []
    fig, (ax,) = _new_figure(7.0, 4.5)
    ns = []
    for (mk, dk), g in d.groupby(["model", "defense"], sort=False):
        g = g.sort_values("t")
        line, = ax.plot(g.t, 100 * g["mean"], "o-", label=_defense_label(mk, dk))
        ax.fill_between(g.t, 100 * g.ci_lo, 100 * g.ci_hi, color=line.get_color(), alpha=0.2)
        ax.plot(g.t, 100 * g.q75, ":", color=line.get_color(), lw=0.8)
        ns.append(int(g.n.iloc[0]))
    ax.set_xlabel("state t")
    ax.set_ylabel(r"$\|\tilde z[t] - z[t]\| / \|z[t]\|$  (%)")
    ax.set_xticks(sorted(int(t) for t in d.t.unique()))
    ax.legend(fontsize=7)
    n = min(ns) if min(ns) == max(ns) else f"{min(ns)}-{max(ns)}"
    fig.suptitle(f"Fig. 3 (c): deviation of the dynamics under {attack.upper()} "
                 "(band: 95% CI of the mean)\n"
                 "same clean-correct examples for every curve (dotted: 75th pct.); "
                 f"{data.dataset}, eps={data.eps_text}, n={n}", fontsize=10)
    return _save(fig, out_dir, "fig3c_deviation", formats)


def figure5(data: RunData, model: str, defense: str, t8, out_dir: Path, formats) -> list:
    """Strongest per-state accuracy for lambda = 1.0 vs 0.5."""
    t8 = t8[t8.acc.notna()]
    if t8.empty or t8.lam.nunique() < 1:
        return []
    fig, (ax,) = _new_figure()
    for j, ((pre, lam), gl) in enumerate(t8.groupby(["preset", "lam"])):
        gl = gl.sort_values("i")
        tag = "" if pre == "reference" else f" ({pre})"
        s_all = setting_accuracies(data)
        n_pts = int(s_all[(s_all.model == model) & (s_all.defense == defense)].n.iloc[0]) \
            if len(s_all) else data.n
        line, = ax.plot(gl.i, 100 * gl.acc, "o-", label=f"lambda={lam:g}{tag}")
        ax.errorbar(gl.i + (j - 0.5) * 0.08, 100 * gl.acc, yerr=_cp_err(gl.acc, n_pts),
                    fmt="none", ecolor=line.get_color(), elinewidth=0.8, capsize=3)
        for _, r in gl.iterrows():  # strongest Ka: below the first line's points, above the rest
            ax.annotate(f"{int(r.ka)}", (r.i, 100 * r.acc), textcoords="offset points",
                        xytext=(0, -12 if j == 0 else 5), ha="center", fontsize=7,
                        color=line.get_color())
    ax.set_xlabel("intermediate state i")
    ax.set_ylabel("accuracy under the strongest Ka (%)")
    ax.set_xticks(sorted(int(i) for i in t8.i.unique()))
    ax.legend(title="labels: strongest Ka", fontsize=8)
    s = setting_accuracies(data)
    s = s[(s.model == model) & (s.defense == defense)]
    n = int(s.n.iloc[0]) if len(s) else data.n
    fig.suptitle("Fig. 5: strongest intermediate attack per state, lambda = 1.0 vs 0.5 "
                 "(bars: 95% CI)\n"
                 + data.figure_label(model, defense, n), fontsize=10)
    return _save(fig, out_dir, f"fig5_{_slug(model, defense)}", formats)


# ---------------------------------------------------------------------------------------------
# Fig. 4: training curves
# ---------------------------------------------------------------------------------------------

def _read_log(path: Path) -> dict:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict = {}
    for r in rows:
        for k, v in r.items():
            try:
                cols.setdefault(k, []).append(float(v))
            except (TypeError, ValueError):
                cols.setdefault(k, []).append(float("nan"))
    return cols


def _log_info(path: Path) -> dict:
    """Dataset / eps / model / n of a training log from a ``summary.json`` beside it, else the
    zoo entry (``zoo.json`` beside ``NAME.log.csv``), else the file name."""
    info = {"label": path.parent.name if path.name == "log.csv" else path.name.replace(".log.csv", "")}
    summ = path.parent / "summary.json"
    try:
        if path.name == "log.csv" and summ.is_file():
            s = json.loads(summ.read_text())
            c = s.get("config") or {}
            info.update(dataset=(c.get("data") or {}).get("dataset"), model=c.get("model"),
                        eps=((c.get("train") or {}).get("attack") or {}).get("eps"),
                        n=(c.get("data") or {}).get("val_n") or s.get("val_samples"))
        elif (path.parent / "zoo.json").is_file():
            zoo = json.loads((path.parent / "zoo.json").read_text())
            entries = zoo if isinstance(zoo, list) else zoo.get("entries", zoo)
            if isinstance(entries, dict):
                entries = [dict(v, name=k) if isinstance(v, dict) else v for k, v in entries.items()]
            for e in entries if isinstance(entries, list) else []:
                if isinstance(e, dict) and e.get("name") == info["label"]:
                    info.update(dataset=e.get("dataset"), model=e.get("name"), eps=e.get("eps"),
                                n=(e.get("extra") or {}).get("val_n"))
    except (OSError, ValueError, AttributeError):
        pass
    return info


def plot_training_curves(csv_paths, out_dir, formats=("png", "pdf"), stem="fig4_training_curves",
                         title: Optional[str] = None) -> list:
    """Fig. 4: training curves (train_loss, val_clean, val_pgd10 and train_acc when present)
    against epoch, one line per ``log.csv`` (``model_zoo.training`` / ``NAME.log.csv`` format).
    Returns the files written ([] when no file has an ``epoch`` column)."""
    logs = []
    for p in csv_paths:
        p = Path(p)
        if not p.is_file():
            continue
        cols = _read_log(p)
        if cols.get("epoch"):
            logs.append((p, cols, _log_info(p)))
    if not logs:
        return []
    panels = [k for k in ("train_loss", "val_clean", "val_pgd10", "train_acc")
              if any(k in c for _, c, _ in logs)]
    if not panels:
        return []
    fig, axes = _new_figure(4.2, 3.8, ncols=len(panels))
    for ax, key in zip(axes, panels):
        for p, cols, info in logs:
            if key in cols:
                y = np.array(cols[key], float)
                y = 100 * y if key != "train_loss" else y
                line, = ax.plot(cols["epoch"], y, "o-", ms=3, label=info["label"])
                n_val = info.get("n")
                if key.startswith("val_") and n_val:   # 95% CI of a validation accuracy
                    ok = np.isfinite(y)
                    err = _cp_err(y[ok] / 100, int(n_val))
                    ep = np.array(cols["epoch"], float)[ok]
                    ax.fill_between(ep, y[ok] - err[0], y[ok] + err[1], color=line.get_color(),
                                    alpha=0.15, lw=0)
        ax.set_xlabel("epoch")
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel({"train_loss": "training loss", "val_clean": "clean val. acc. (%)",
                       "val_pgd10": "PGD-10 val. acc. (%)", "train_acc": "train acc. (%)"}[key])
        ax.set_title(key)
    axes[0].legend(fontsize=7)
    if title is None:
        def ctx(i):
            return (f"{i.get('dataset') or '?'}, "
                    f"eps={i.get('eps') if i.get('eps') is not None else '?'}, "
                    f"n_val={i.get('n') if i.get('n') is not None else '?'}")
        shared = {ctx(i) for _, _, i in logs}
        if len(shared) == 1:   # one context for all: say it once, the models are in the legend
            title = (f"Fig. 4: training curves ({shared.pop()}): "
                     + ", ".join(dict.fromkeys(i.get('model') or i['label'] for _, _, i in logs)))
        else:
            parts = [f"{i.get('model') or i['label']} ({ctx(i)})" for _, _, i in logs]
            title = "Fig. 4: training curves: " + "; ".join(dict.fromkeys(parts))
    fig.suptitle(title, fontsize=9)
    return _save(fig, Path(out_dir), stem, formats)


def find_training_logs(data: RunData) -> list:
    """Training logs of the run's models, where they can be found: ``NAME.log.csv`` beside the
    checkpoint (zoo convention), ``log.csv`` in the checkpoint's folder (training runs), or
    ``model_zoo/checkpoints/<model>.log.csv``."""
    spec = importlib.util.find_spec("model_zoo")
    zoo_dir = (Path(list(spec.submodule_search_locations)[0]) / "checkpoints"
               if spec and spec.submodule_search_locations else None)
    found = []
    for m in data.config.get("models") or []:
        cands = []
        ck = m.get("checkpoint")
        if ck:
            ck = Path(ck)
            if not ck.is_absolute() and zoo_dir is not None and not ck.exists():
                ck = zoo_dir / ck
            cands += [ck.with_name(ck.name.split(".")[0] + ".log.csv"), ck.parent / "log.csv"]
        if zoo_dir is not None and m.get("name"):
            cands.append(zoo_dir / f"{m['name']}.log.csv")
        for c in cands:
            if c.is_file() and c not in found:
                found.append(c)
                break
    return found


# ---------------------------------------------------------------------------------------------
# All figures of a run
# ---------------------------------------------------------------------------------------------

STAMP = ".figures.json"  # in the output folder: what the drawn figures were made from


def _inputs_fingerprint(data: RunData, out: Path, formats, logs) -> str:
    """SHA-256 over everything the figures depend on: the database's work units (ids and
    finish times: records are only ever added in whole units), the formats, the training logs
    (path, size, mtime) and the drawing code (this module and benchmark.tables)."""
    from benchmark.results_db import ResultsDB
    h = hashlib.sha256()
    with ResultsDB(data.path) as db:
        units = db.units_frame()
    rows = sorted(zip(units.unit_id, units.finished.astype(str)))
    h.update(json.dumps([rows, list(formats), str(out.resolve())], default=str).encode())
    for p in logs:
        st = Path(p).stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    from benchmark import tables
    for mod in (sys.modules[__name__], tables):
        h.update(Path(mod.__file__).read_bytes())
    import matplotlib
    h.update(matplotlib.__version__.encode())
    return h.hexdigest()


class _UpToDate(list):
    """The paths of figures found up to date (not redrawn)."""
    up_to_date = True


def write_figures(db_path, out_dir=None, formats=("png", "pdf"), training_logs=None,
                  force: bool = False) -> list:
    """Draw every figure the run's data allows into ``out_dir`` (default ``RUN_DIR/figures``) in
    each of ``formats``; skip (without error) those whose data is absent. Also writes
    ``figures.md`` (what was drawn, what was skipped and why).
    Returns the paths written (figures.md last).

    When the folder already holds the figures of the same inputs (the database's work units,
    formats, training logs and drawing code: :func:`_inputs_fingerprint`) and every one of
    them still exists, nothing is redrawn and their paths are returned (``force`` redraws)."""
    data = load_run(db_path)
    out = Path(out_dir) if out_dir is not None else data.run_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    formats = tuple(formats)
    logs = find_training_logs(data) if training_logs is None else list(training_logs)
    # a RunData built in memory has no database file to fingerprint: always drawn
    fp = _inputs_fingerprint(data, out, formats, logs) if data.path is not None else None
    stamp = out / STAMP
    if not force and fp is not None and stamp.is_file():
        try:
            old = json.loads(stamp.read_text())
        except (OSError, ValueError):
            old = {}
        files = [out / f for f in old.get("files", [])]
        if old.get("fingerprint") == fp and files and all(f.is_file() for f in files):
            return _UpToDate(files)
    stamp.unlink(missing_ok=True)  # an interrupted redraw leaves no stale stamp behind
    written, drawn, skipped = [], [], []
    sacc = setting_accuracies(data)
    t8 = table8(data)
    for (mk, dk), g in _groups(data.records):
        is_deq = (g.state != "output").any()
        label = f"{mk} [{dk}]"
        if not is_deq:
            skipped.append(f"{label}: not a DEQ (no states): Fig. 2, 3, 5 do not apply.")
            continue
        has_pgd = not entropy_pairs(g, "pgd").empty
        for fn, name in ((figure2a, "Fig. 2a"), (figure2b, "Fig. 2b"), (figure3b, "Fig. 3b")):
            if not has_pgd:
                skipped.append(f"{label}: {name}: no clean + PGD records with entropies.")
                continue
            files = fn(data, mk, dk, g, out, formats)
            written += files
            drawn += [f"{name}, {label}: {files[0].name}"] if files else []
        if sec32_entropy_change(g):
            files = figure3b_sec32(data, mk, dk, g, out, formats)
            written += files
            drawn += [f"Fig. 3b (Sec. 3.2 effect), {label}: {files[0].name}"] if files else []
        s = sacc[(sacc.model == mk) & (sacc.defense == dk)]
        t = t8[(t8.model == mk) & (t8.defense == dk)]
        if s.empty:
            skipped.append(f"{label}: Fig. 3a, 5: no individual grid-setting records.")
            continue
        files = figure3a(data, mk, dk, s, out, formats)
        if files:
            written += files
            drawn.append(f"Fig. 3a, {label}: {files[0].name}")
            if int(s.acc.isna().sum()):
                skipped.append(f"{label}: Fig. 3a shows {int(s.acc.notna().sum())} of {len(s)} "
                               "settings (the others do not cover every clean-correct example).")
        else:
            skipped.append(f"{label}: Fig. 3a: no state whose grid settings all cover every "
                           "clean-correct example (efficient grid mode); run the grid with "
                           "mode: full.")
        files = figure5(data, mk, dk, t, out, formats)
        if files:
            written += files
            drawn.append(f"Fig. 5, {label}: {files[0].name}")
        else:
            skipped.append(f"{label}: Fig. 5: no (i, lambda) with every Ka setting complete.")
    files = figure3c(data, out, formats)
    if files:
        written += files
        drawn.append(f"Fig. 3c: {files[0].name} ({FIG3C_ATTACK} records with extra.deviation)")
    else:
        skipped.append(f"Fig. 3c: no {FIG3C_ATTACK} records with per-state deviations "
                       "(extra.deviation; runs made before it was recorded lack it).")
    files = plot_training_curves(logs, out, formats) if logs else []
    if files:
        written += files
        drawn.append(f"Fig. 4: {files[0].name} from {', '.join(str(p) for p in logs)}")
    else:
        skipped.append("Fig. 4: no training log (log.csv / NAME.log.csv) found for the run's models.")
    md = [data.caption("Figures."), "", "## Drawn", ""] + [f"- {d}" for d in drawn] + \
         ["", "## Skipped", ""] + [f"- {s}" for s in skipped]
    notes = out / "figures.md"
    notes.write_text("\n".join(md) + "\n")
    written.append(notes)
    if fp is not None:
        stamp.write_text(json.dumps({"fingerprint": fp, "files": [p.name for p in written]}))
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.figures",
                                 description="Draw the paper's figures of a run.")
    ap.add_argument("run", help="run folder holding results.sqlite, or the .sqlite file")
    ap.add_argument("--out", default=None, help="output folder (default: RUN_DIR/figures)")
    ap.add_argument("--formats", default="png,pdf", help="comma-separated (default png,pdf)")
    ap.add_argument("--train-log", action="append", default=None,
                    help="training log.csv for Fig. 4 (repeatable; default: found from the config)")
    ap.add_argument("--force", action="store_true",
                    help="redraw even when the folder holds the figures of the same inputs")
    args = ap.parse_args(argv)
    try:
        paths = write_figures(args.run, args.out, [f for f in args.formats.split(",") if f],
                              training_logs=args.train_log, force=args.force)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    if getattr(paths, "up_to_date", False):
        print(f"{len(paths)} figures up to date (same database units, training logs and drawing "
              "code): not redrawn; --force redraws")
    return 0


if __name__ == "__main__":
    sys.exit(main())

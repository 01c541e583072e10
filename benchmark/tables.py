"""The paper's tables (Yang et al., ICML 2023), derived from a run's results database.

Every number here comes from the per-example ``records`` of ``results.sqlite``, read only through
:meth:`benchmark.results_db.ResultsDB.records_frame` and :meth:`~ResultsDB.meta`; nothing is
re-attacked. Each ``table*`` function takes a run folder, a database path or a :class:`RunData`
and returns a pandas DataFrame (accuracies as fractions in [0, 1]); ``DataFrame.attrs`` carries
``title``, ``footnotes`` and ``percent`` (the columns written as percentages in Markdown).
:func:`write_tables` writes each as ``tableK.md`` (caption line, table, footnotes) and
``tableK.csv`` (a ``# caption`` comment line, then the CSV; read it back with
``pandas.read_csv(path, comment="#")``)::

    python -m benchmark.tables runs/eval/NAME [--out DIR]     # default DIR: runs/eval/NAME/tables

Conventions (the same as :func:`benchmark.runner.summarize` for a complete run)
-----------------------------------------------------------------------------
* ``n`` is the number of examples with a ``clean`` record of the (model, defense).
* The accuracy under an attack is ``#{clean-correct examples whose record is correct} / n``.
  An example without a record counts as not robust only when it is clean-misclassified; when an
  attack has no record for some clean-correct example (an unfinished run, or an individual grid
  setting in ``efficient`` mode, which skips points already broken) its accuracy is NaN
  ("unavailable") and the table footnote says so.
* Attack families: ``pgd`` (all its settings, per-example worst case when there are several;
  the runner writes one: ``phantom_final`` for DEQs, ``model`` otherwise), ``grid`` (setting
  ``worst``: the per-example worst case over the (i, Ka, lambda) settings run), ``autoattack``
  (``ensemble``), ``adaptive`` (``worst``), and any other attack in the database by name.
* ``ALL``: the per-example worst case over every record of the (model, defense) (clean included):
  an example is robust only if it is correct clean and under every attack record present. With an
  attack unfinished it is an upper bound (footnoted). The paper's "ALL" is min(PGD, AA) of
  accuracies; ours is never higher.
* ``min_over_means``: the lowest per-setting accuracy of the grid (the paper's "minimum accuracy
  over the 144 attacks"), defined only when every grid setting covers every clean-correct example
  (``grid.mode: full`` or ``naive``).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "RunData", "load_run", "resolve_db", "parse_setting", "parse_defense", "attack_series",
    "accuracy", "setting_accuracies", "entropy_pairs",
    "table1", "table2", "table3", "table4_autoattack", "table5", "table6_7", "table6_7_grid",
    "table8",
    "table9_10", "TABLES", "to_markdown", "write_tables", "main",
]

MAIN_ATTACKS = ("pgd", "grid", "autoattack", "adaptive")
#: The record setting that holds an attack family's per-example outcome (None: all settings).
PRIMARY_SETTING = {"clean": "-", "pgd": None, "grid": "worst", "autoattack": "ensemble",
                   "adaptive": "worst"}
_SETTING_RE = re.compile(r"^ui\(i=(\d+),ka=(\d+),lam=([0-9.eE+-]+)(,paper)?\)$")
_STATE_RE = re.compile(r"^z\[(\d+)\]$")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def resolve_db(path) -> Path:
    """A run folder (holding ``results.sqlite``) or the database file itself -> the file.
    Raises FileNotFoundError rather than creating an empty database."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.sqlite"
    if not p.is_file():
        raise FileNotFoundError(f"no results database at {p} (give a run folder holding "
                                "results.sqlite, or the .sqlite file)")
    return p


def _json(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return None
    return v


@dataclass
class RunData:
    """A run's records (JSON columns parsed) and metadata, with the caption facts."""
    records: pd.DataFrame
    meta: dict
    path: Optional[Path] = None
    run_dir: Optional[Path] = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def config(self) -> dict:
        return self.meta.get("config") or {}

    @property
    def dataset(self) -> str:
        ds = self.meta.get("dataset") or {}
        return ds.get("name") or (self.config.get("data") or {}).get("dataset") or "?"

    @property
    def n(self) -> int:
        ds = self.meta.get("dataset") or {}
        if ds.get("n") is not None:
            return int(ds["n"])
        clean = self.records[self.records.attack == "clean"]
        return int(clean.example.nunique())

    @property
    def eps(self) -> Optional[float]:
        eps = (self.config.get("threat") or {}).get("eps")
        return None if eps is None else float(eps)

    @property
    def eps_text(self) -> str:
        if self.eps is None:
            return "?"
        from benchmark.leaderboard import format_eps
        return format_eps(self.eps, self.dataset)

    @property
    def models(self) -> list:
        keys = [m.get("label") or m.get("name") for m in self.config.get("models") or []]
        keys = [k for k in keys if k]
        for k in self.records.model.unique() if len(self.records) else []:
            if k not in keys:
                keys.append(k)
        return keys

    def caption(self, title: str) -> str:
        return (f"{title} Dataset {self.dataset} (test, n={self.n}), Linf eps={self.eps_text}, "
                f"models: {', '.join(self.models) or '-'}.")

    def figure_label(self, model: str, defense: Optional[str] = None, n: Optional[int] = None) -> str:
        from benchmark.leaderboard import defense_words
        d = "" if defense is None else f", defense: {defense_words(defense)[0]}"
        return (f"{self.dataset}, eps={self.eps_text}, {model}{d}, "
                f"n={self.n if n is None else n}")


def load_run(src) -> RunData:
    """A run folder, a database path or a RunData -> RunData (records with parsed JSON columns
    ``entropies``, ``residuals``, ``extra``)."""
    if isinstance(src, RunData):
        return src
    from benchmark.results_db import ResultsDB
    path = resolve_db(src)
    with ResultsDB(path) as db:
        df = db.records_frame()
        meta = db.meta()
    for col in ("entropies", "residuals", "extra"):
        if col in df:
            df[col] = df[col].map(_json).astype(object)
    return RunData(records=df, meta=meta, path=path, run_dir=path.parent)


# ---------------------------------------------------------------------------------------------
# Parsing and per-example helpers
# ---------------------------------------------------------------------------------------------

def parse_setting(name: str) -> Optional[dict]:
    """``'ui(i=3,ka=5,lam=0.5[,paper])'`` -> ``{'i': 3, 'ka': 5, 'lam': 0.5, 'preset': ...}``;
    None for any other setting name."""
    m = _SETTING_RE.match(str(name))
    if not m:
        return None
    return {"i": int(m.group(1)), "ka": int(m.group(2)), "lam": float(m.group(3)),
            "preset": "paper" if m.group(4) else "reference"}


def parse_defense(key: str) -> dict:
    """A defense key as stored (``'final'``, ``'early:select'``, ``'entropy_reduction'`` or a
    JSON dict string) -> a dict with at least ``name``."""
    key = str(key)
    if key.startswith("{"):
        try:
            d = json.loads(key)
            if isinstance(d, dict):
                return d
        except ValueError:
            pass
    name, _, arg = key.partition(":")
    out = {"name": name}
    if arg:
        out["index"] = arg
    return out


def _state_index(state) -> Optional[int]:
    m = _STATE_RE.match(str(state))
    return int(m.group(1)) if m else None


def _groups(df: pd.DataFrame):
    """(model, defense) groups in the order first seen."""
    if df.empty:
        return []
    return list(df.groupby(["model", "defense"], sort=False))


def _clean(g: pd.DataFrame) -> pd.Series:
    c = g[g.attack == "clean"]
    return c.groupby("example").correct.min().astype(int)


def attack_series(g: pd.DataFrame, attack: str) -> pd.Series:
    """Per-example ``correct`` of an attack family within one (model, defense) group (the
    per-example worst case over its records of the primary setting); empty when not run."""
    a = g[g.attack == attack]
    primary = PRIMARY_SETTING.get(attack)
    if attack == "grid":
        a = a[a.setting == "worst"]
    elif primary is not None and (a.setting == primary).any():
        a = a[a.setting == primary]
    if a.empty:
        return pd.Series(dtype=int)
    return a.groupby("example").correct.min().astype(int)


def accuracy(series: pd.Series, clean: pd.Series) -> tuple:
    """(accuracy, covered, needed): accuracy = #{clean-correct examples robust} / n, NaN when a
    clean-correct example has no record (clean-misclassified examples count as not robust)."""
    n = len(clean)
    cc = clean[clean == 1].index
    covered = int(series.index.isin(cc).sum())
    if n == 0 or series.empty:
        return float("nan"), covered, len(cc)
    if covered < len(cc):
        return float("nan"), covered, len(cc)
    return float((series.reindex(cc) == 1).sum()) / n, covered, len(cc)


def _other_attacks(df: pd.DataFrame) -> list:
    return [a for a in df.attack.unique() if a not in ("clean",) + MAIN_ATTACKS] if len(df) else []


def _finish(df: pd.DataFrame, title: str, percent=(), footnotes=()) -> pd.DataFrame:
    df.attrs["title"] = title
    df.attrs["percent"] = [c for c in percent if c in df.columns]
    df.attrs["footnotes"] = list(dict.fromkeys(f for f in footnotes if f))
    return df


# ---------------------------------------------------------------------------------------------
# Grid settings
# ---------------------------------------------------------------------------------------------

def setting_accuracies(src) -> pd.DataFrame:
    """Per (model, defense, individual grid setting): ``acc`` (NaN unless the setting has a
    record for every clean-correct example), ``broken`` (clean-correct examples it broke: always
    defined), ``covered`` / ``needed`` (clean-correct examples with a record / in total), and the
    parsed ``i``, ``ka``, ``lam``, ``preset``."""
    data = load_run(src)
    if "setting_acc" in data._cache:
        return data._cache["setting_acc"]
    df = data.records
    rows = []
    for (mk, dk), g in _groups(df):
        clean = _clean(g)
        grid = g[(g.attack == "grid") & (g.setting != "worst")]
        for name, s in grid.groupby("setting", sort=False):
            p = parse_setting(name) or {"i": None, "ka": None, "lam": None, "preset": None}
            ser = s.groupby("example").correct.min().astype(int)
            acc, cov, need = accuracy(ser, clean)
            cc = clean[clean == 1].index
            broken = int((ser.reindex(cc) == 0).sum())
            rows.append({"model": mk, "defense": dk, "setting": name, **p, "acc": acc,
                         "broken": broken, "covered": cov, "needed": need, "n": len(clean)})
    out = pd.DataFrame(rows, columns=["model", "defense", "setting", "i", "ka", "lam", "preset",
                                      "acc", "broken", "covered", "needed", "n"])
    data._cache["setting_acc"] = out
    return out


# ---------------------------------------------------------------------------------------------
# Table 1: clean / PGD / AA / ALL
# ---------------------------------------------------------------------------------------------

def table1(src) -> pd.DataFrame:
    """Table 1 per (model, defense): clean, PGD (ready-made, final state), grid worst case, AA,
    adaptive, any other attack by name, ALL (per-example worst case over every record) and the
    grid's min-over-means with its strongest setting."""
    data = load_run(src)
    df = data.records
    sacc = setting_accuracies(data)
    others = _other_attacks(df)
    rows, notes = [], []
    for (mk, dk), g in _groups(df):
        clean = _clean(g)
        n = len(clean)
        if n == 0:
            continue
        row = {"model": mk, "defense": dk,
               "state": g[g.attack == "clean"].state.iloc[0], "n": n,
               "clean": float(clean.mean())}
        partial = False
        for att in MAIN_ATTACKS + tuple(others):
            ser = attack_series(g, att)
            if ser.empty:
                row[att] = float("nan")
                continue
            acc, cov, need = accuracy(ser, clean)
            row[att] = acc
            if cov < need:
                partial = True
                notes.append(f"{mk} [{dk}] {att}: unfinished ({cov} of {need} clean-correct "
                             "examples have a record), accuracy unavailable.")
        # ALL: robust only if correct clean and under every record of this (model, defense).
        worst = g.groupby("example").correct.min()
        row["ALL"] = float((worst.reindex(clean.index).fillna(0) == 1).sum()) / n
        if partial:
            notes.append(f"{mk} [{dk}]: ALL is an upper bound (an attack is unfinished).")
        s = sacc[(sacc.model == mk) & (sacc.defense == dk)]
        row["grid_settings"] = len(s)
        if len(s) and s.acc.notna().all():
            k = s.acc.idxmin()
            row["min_over_means"] = float(s.acc.min())
            row["strongest_setting"] = s.loc[k, "setting"]
        else:
            row["min_over_means"] = float("nan")
            row["strongest_setting"] = None
            if len(s):
                notes.append(f"{mk} [{dk}]: min-over-means unavailable: {int(s.acc.isna().sum())} "
                             f"of {len(s)} grid settings do not cover every clean-correct example "
                             "(efficient grid mode); the grid column is the per-example worst case.")
        rows.append(row)
    cols = ["model", "defense", "state", "n", "clean", "pgd", "grid", "autoattack", "adaptive",
            *others, "ALL", "min_over_means", "strongest_setting", "grid_settings"]
    out = pd.DataFrame(rows, columns=cols)
    pct = ["clean", "pgd", "grid", "autoattack", "adaptive", *others, "ALL", "min_over_means"]
    return _finish(out, "Table 1. Robust accuracy (%) per model and reported forward (defense).",
                   pct, ["pgd: ready-made PGD (phantom gradient at the final state for DEQs); "
                         "grid: per-example worst case over the (i, Ka, lambda) intermediate "
                         "attacks; autoattack: AutoAttack ensemble; adaptive: BPDA / defended "
                         "trajectory / transfer for test-time defenses.",
                         "ALL: per-example worst case over every attack record (robust only if "
                         "correct clean and under every attack); the paper's ALL is min(PGD, AA).",
                         "NaN / empty: attack not run, or not covering every clean-correct "
                         "example.", *notes])


# ---------------------------------------------------------------------------------------------
# Table 2: ready-made PGD at the final state vs intermediate attacks
# ---------------------------------------------------------------------------------------------

def table2(src) -> pd.DataFrame:
    """Table 2 per DEQ (model, defense) -- 'final' and the early-state / other defenses: ready-made
    PGD judged at the evaluated state vs the intermediate-state grid (per-example worst case, and
    min-over-means when every setting covers every example); diff = PGD - grid worst."""
    from benchmark.report.outcomes import entry_outcomes, grid_setting_outcomes
    from benchmark.report.stats import paired_comparison
    data = load_run(src)
    t1 = table1(data)
    groups = dict(_groups(data.records))
    rows = []
    for _, r in t1.iterrows():
        if r.state == "output" or (math.isnan(r.pgd) and math.isnan(r.grid)):
            continue
        row = {"model": r.model, "defense": r.defense, "state": r.state, "n": r.n,
               "pgd_final": r.pgd, "inter_worst": r.grid,
               "inter_min_over_means": r.min_over_means,
               "diff": r.pgd - r.grid if not (math.isnan(r.pgd) or math.isnan(r.grid))
               else float("nan")}
        # the paired test of the claim: PGD vs the best SINGLE setting, same examples
        g = groups[(r.model, r.defense)]
        o = entry_outcomes(g)
        wide = grid_setting_outcomes(g, o.index)
        if "pgd" in o and len(wide.columns) and not wide.isna().any().any():
            best = wide.mean().idxmin()
            pc = paired_comparison(o["pgd"].to_numpy(), wide[best].astype(int).to_numpy())
            row.update({"best_setting": best, "pgd_minus_best": pc.diff,
                        "diff_ci_lo": pc.ci95[0], "diff_ci_hi": pc.ci95[1], "mcnemar_p": pc.p,
                        "conclusion": "inconclusive at this n" if pc.verdict == "inconclusive"
                        else ("intermediate stronger" if pc.diff > 0 else "PGD stronger")})
        rows.append(row)
    out = pd.DataFrame(rows, columns=["model", "defense", "state", "n", "pgd_final",
                                      "inter_worst", "inter_min_over_means", "diff",
                                      "best_setting", "pgd_minus_best", "diff_ci_lo",
                                      "diff_ci_hi", "mcnemar_p", "conclusion"])
    return _finish(out, "Table 2. Ready-made PGD (phantom gradient at z[N]) vs the intermediate "
                        "attacks at z[i] (%), judged at each defense's evaluated state.",
                   ["pgd_final", "inter_worst", "inter_min_over_means", "diff",
                    "pgd_minus_best", "diff_ci_lo", "diff_ci_hi"],
                   ["inter_worst: per-example worst case over the grid settings run (never above "
                    "the paper's INTER., the min over per-setting accuracies); "
                    "inter_min_over_means: the paper's INTER., NaN in efficient grid mode.",
                    "diff = pgd_final - inter_worst (percentage points; >= 0 by "
                    "construction, so not a test). The paired test: pgd_minus_best = PGD minus the "
                    "best single setting (chosen on these examples) with Newcombe's 95% interval "
                    "[diff_ci_lo, diff_ci_hi] and the exact McNemar p."] +
                   [f for f in t1.attrs.get("footnotes", []) if "unfinished" in f])


# ---------------------------------------------------------------------------------------------
# Table 3 (transfer) and Table 5 (Tf x R)
# ---------------------------------------------------------------------------------------------

def table3(src) -> pd.DataFrame:
    """Table 3 (attacks transferred between defenses): records with ``attack == 'transfer'``,
    one column per setting (the source), accuracy over the clean examples of the target.
    Empty when the run holds no transfer records (the runner does not run them yet)."""
    data = load_run(src)
    df = data.records
    rows = []
    for (mk, dk), g in _groups(df):
        t = g[g.attack == "transfer"]
        if t.empty:
            continue
        clean = _clean(g)
        row = {"model": mk, "defense": dk, "n": len(clean)}
        for setting, s in t.groupby("setting", sort=False):
            row[f"from {setting}"] = accuracy(s.groupby("example").correct.min(), clean)[0]
        rows.append(row)
    out = pd.DataFrame(rows)
    return _finish(out, "Table 3. Accuracy (%) under attacks transferred from other defenses.",
                   [c for c in out.columns if str(c).startswith("from ")])


_ER_DEFAULTS = {"r": 10, "tf": 2}  # EntropyReduction's constructor defaults (model_zoo.forward)


def table5(src) -> pd.DataFrame:
    """Table 5 (Tf x R of the Sec. 3.2 entropy reduction): per model, one row per distinct
    (tf, r) of its ``entropy_reduction`` defenses with ALL (per-example worst case over every
    attack) and clean. Empty unless some model was evaluated with >= 2 (tf, r) pairs."""
    data = load_run(src)
    t1 = table1(data)
    rows = []
    for _, r in t1.iterrows():
        d = parse_defense(r.defense)
        if d.get("name") != "entropy_reduction":
            continue
        rows.append({"model": r.model, "defense": r.defense, "tf": int(d.get("tf", _ER_DEFAULTS["tf"])),
                     "r": int(d.get("r", _ER_DEFAULTS["r"])), "n": r.n, "clean": r.clean,
                     "ALL": r.ALL})
    out = pd.DataFrame(rows, columns=["model", "defense", "tf", "r", "n", "clean", "ALL"])
    if len(out):
        keep = out.groupby("model")[["tf", "r"]].apply(lambda x: len(x.drop_duplicates()) >= 2)
        out = out[out.model.map(keep)].sort_values(["model", "tf", "r"]).reset_index(drop=True)
    out = _finish(out, "Table 5. Entropy reduction (Sec. 3.2) with frequency Tf and R "
                       "iterations: ALL accuracy (%).", ["clean", "ALL"],
                  ["ALL: per-example worst case over every attack run on that defense (the "
                   "paper reports the min over the intermediate attacks)."])
    if len(out):
        out.attrs["appendix"] = table5_grid_markdown(out)
    return out


def table5_grid_markdown(t5: pd.DataFrame) -> str:
    """The paper's layout of Table 5: one row per (model, Tf), one column per R, ALL in %
    ('-' where that pair was not run)."""
    rs = sorted(int(r) for r in t5.r.unique())
    lines = ["Tf x R (ALL, %):", "", "| model | Tf | " + " | ".join(f"R = {r}" for r in rs) + " |",
             "|---|---:|" + "---:|" * len(rs)]
    for (mk, tf), g in t5.groupby(["model", "tf"], sort=True):
        acc = {int(r): a for r, a in zip(g.r, g.ALL)}
        cells = [f"{100 * acc[r]:.2f}" if r in acc and pd.notna(acc[r]) else "-" for r in rs]
        lines.append(f"| {mk} | {int(tf)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Table 4 (here: AutoAttack and what broke the points)
# ---------------------------------------------------------------------------------------------

def table4_autoattack(src) -> pd.DataFrame:
    """The paper's Table 4 runs APGD-CE and Square at the top (i, Ka) settings; the run stores
    the AutoAttack ensemble instead (with the shard's strongest grid setting as surrogate), so
    this table lists per (model, defense) the AutoAttack accuracy and, from ``extra.broken_by``,
    how many clean-correct examples each component attack broke (``broken_by_clean``: examples
    misclassified without attack)."""
    data = load_run(src)
    df = data.records
    rows = []
    for (mk, dk), g in _groups(df):
        a = g[(g.attack == "autoattack")]
        if a.empty:
            continue
        clean = _clean(g)
        ser = attack_series(g, "autoattack")
        acc, cov, need = accuracy(ser, clean)
        cc = clean[clean == 1].index
        row = {"model": mk, "defense": dk, "n": len(clean), "clean": float(clean.mean()),
               "autoattack": acc, "broken": int((ser.reindex(cc) == 0).sum())}
        counts: dict = {}
        for e in a.extra:
            for name in ((e or {}).get("broken_by") or []):
                counts[name] = counts.get(name, 0) + 1
        for name in sorted(counts, key=lambda k: (k == "clean", k)):
            row[f"broken_by_{name}"] = counts[name]
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        bcols = [c for c in out.columns if c.startswith("broken_by_")]
        out[bcols] = out[bcols].fillna(0).astype(int)
    aa = ((data.config.get("attacks") or {}).get("autoattack")) or {}
    cfg = ", ".join(f"{k}={v}" for k, v in aa.items()) if aa else "default"
    return _finish(out, "Table 4b (AutoAttack). AutoAttack accuracy (%) and the component attacks "
                        "that broke the points.", ["clean", "autoattack"],
                   [f"AutoAttack configuration: {cfg}.",
                    "broken_by_X: clean-correct examples broken by component X (an example may be "
                    "counted for several components when the ensemble runs each on all points); "
                    "broken_by_clean: misclassified without attack.",
                    "The paper's Table 4 (APGD-CE and Square at the top (i, Ka) settings) is "
                    "table4.md, from a run with attacks.top_settings."])


def table4_top_settings(src) -> pd.DataFrame:
    """The paper's Table 4: per (model, defense) and each of its top grid settings (i, Ka,
    lambda) -- the ones that broke the most examples -- the accuracy under PGD (the grid's own
    record of that setting), APGD-CE (or another gradient attack) with that setting as its
    gradient, and Square (black box: the same for every setting), from ``top_settings``
    records. Accuracies count clean-misclassified examples as broken."""
    data = load_run(src)
    df = data.records
    rows, names, square_from = [], [], set()
    for (mk, dk), g in _groups(df):
        top = g[g.attack == "top_settings"]
        if top.empty:
            continue
        clean = _clean(g)
        per = setting_accuracies(data)
        per = per[(per.model == mk) & (per.defense == dk)].set_index("setting")

        def acc(sel):
            s = sel.groupby("example").correct.min().astype(int)
            return accuracy(s, clean)[0]
        square = top[top.setting == "square"]
        if square.empty:  # top_settings without Square: the checks' (same reported forward)
            ch = g[(g.attack == "checks") & g.setting.str.match(r"square\d+$")]
            square = ch[ch.setting == ch.setting.iloc[0]] if len(ch) else square
            if len(square):
                square_from.add(square.setting.iloc[0])
        settings = list(dict.fromkeys(st.split("@", 1)[1] for st in top.setting if "@" in st))
        for st in settings:
            p = parse_setting(st) or {}
            row = {"model": mk, "defense": dk, "setting": st, "i": p.get("i"), "ka": p.get("ka"),
                   "lam": p.get("lam"), "n": len(clean),
                   "pgd": float(per.acc.get(st, float("nan"))) if len(per) else float("nan")}
            for lab in sorted({x.split("@", 1)[0] for x in top.setting if x.endswith("@" + st)}):
                row[lab] = acc(top[top.setting == f"{lab}@{st}"])
                names.append(lab)
            if len(square):
                row["square"] = acc(square)
            rows.append(row)
    cols = ["model", "defense", "setting", "i", "ka", "lam", "n", "pgd"] + \
        list(dict.fromkeys(names)) + (["square"] if any("square" in r for r in rows) else [])
    out = pd.DataFrame(rows, columns=cols)
    return _finish(out, "Table 4. PGD, APGD-CE and Square at the top (i, Ka, lambda) settings: "
                        "accuracy (%).", [c for c in cols[7:]],
                   ["pgd: the grid's PGD with that setting; apgd-ce: APGD-CE with that setting's "
                    "unrolled gradient; square: Square on the reported forward (no gradient, so "
                    "one value per model). All judged on the reported forward.",
                    f"square: the obfuscation checks' {', '.join(sorted(square_from))} (the run's "
                    "top_settings did not run Square)" if square_from else ""])


# ---------------------------------------------------------------------------------------------
# Tables 6-7: P and Delta H (Eqs. 12-13)
# ---------------------------------------------------------------------------------------------

def _entropy_at(ent, state_idx: Optional[int]):
    if not isinstance(ent, (list, tuple)) or not ent:
        return float("nan")
    if state_idx is None:
        return float(ent[-1])
    return float(ent[state_idx - 1]) if 1 <= state_idx <= len(ent) else float("nan")


def entropy_pairs(g: pd.DataFrame, attack: str) -> pd.DataFrame:
    """Per example of one (model, defense): clean and adversarial entropy lists (``H_clean``,
    ``H_adv``: H(z[t]) for t = 1..N), clean / adversarial correctness, for the examples that have
    entropies in both the clean record and the attack's primary record."""
    clean = g[(g.attack == "clean") & g.entropies.map(lambda e: isinstance(e, list) and len(e) > 0)]
    a = g[g.attack == attack]
    a = a[a.setting == "worst"] if attack == "grid" else a
    primary = PRIMARY_SETTING.get(attack)
    if primary is not None and (a.setting == primary).any():
        a = a[a.setting == primary]
    a = a[a.entropies.map(lambda e: isinstance(e, list) and len(e) > 0)]
    if clean.empty or a.empty:
        return pd.DataFrame(columns=["example", "H_clean", "H_adv", "clean_correct", "adv_correct",
                                     "res_clean", "res_adv"])
    a = a.drop_duplicates("example")  # several pgd settings: the first (records are per setting)
    m = clean[["example", "entropies", "correct", "residuals"]].merge(
        a[["example", "entropies", "correct", "residuals"]], on="example", suffixes=("_c", "_a"))
    return pd.DataFrame({"example": m.example, "H_clean": m.entropies_c, "H_adv": m.entropies_a,
                         "clean_correct": m.correct_c.astype(int),
                         "adv_correct": m.correct_a.astype(int),
                         "res_clean": m.residuals_c, "res_adv": m.residuals_a})


def table6_7(src) -> pd.DataFrame:
    """Tables 6-7: per (model, defense, attack) the paper's P (Eq. 12) and Delta H (Eq. 13).

    With V the examples holding entropies in both the clean record and the attack's record,
    z*_j the final state of the clean input x_j and z~*_j that of its stored adversarial example:

    * ``P`` = (1/|V|) sum_j 1(H(z*_j) < H(z~*_j)) -- Eq. (12): the fraction of inputs whose clean
      prediction entropy is lower than their perturbed counterpart's (a fraction, not %);
    * ``dH`` = (1/|V|) sum_j (H(z*_j) - H(z~*_j)) -- Eq. (13), the paper's sign: clean minus
      perturbed, negative when attacks raise the entropy;
    * ``P_state`` / ``dH_state``: the same at the defense's evaluated state z[i] (equal to P / dH
      for 'final');
    * ``H_clean`` / ``H_adv``: the two means at z[N]; ``success_rate``: the fraction of
      clean-correct examples the attack broke (NOT the paper's P, listed beside it).

    One row per attack family at its stored adversarial examples (pgd, the grid's per-example
    worst case, autoattack, adaptive, ...) with per-state entropies; the paper's avg / min / max
    over the individual grid attacks is :func:`table6_7_grid`. Clean-misclassified points are
    not attacked (x~ = x, contributing 0 to dH and not counted in P), and PGD stops at the first
    misclassifying iterate, both of which shrink |dH| relative to full-length PGD."""
    data = load_run(src)
    df = data.records
    rows = []
    for (mk, dk), g in _groups(df):
        sidx = _state_index(g[g.attack == "clean"].state.iloc[0]) if (g.attack == "clean").any() else None
        for att in MAIN_ATTACKS + tuple(_other_attacks(df)):
            p = entropy_pairs(g, att)
            if p.empty:
                continue
            hc = p.H_clean.map(lambda e: _entropy_at(e, None)).to_numpy(float)
            ha = p.H_adv.map(lambda e: _entropy_at(e, None)).to_numpy(float)
            hcs = p.H_clean.map(lambda e: _entropy_at(e, sidx)).to_numpy(float)
            has = p.H_adv.map(lambda e: _entropy_at(e, sidx)).to_numpy(float)
            cc = p.clean_correct.to_numpy() == 1
            rows.append({"model": mk, "defense": dk, "attack": att,
                         "state": g[g.attack == "clean"].state.iloc[0], "n": len(p),
                         "P": float(np.mean(hc < ha)), "dH": float(np.mean(hc - ha)),
                         "P_state": float(np.mean(hcs < has)), "dH_state": float(np.mean(hcs - has)),
                         "H_clean": float(np.mean(hc)), "H_adv": float(np.mean(ha)),
                         "success_rate": float(np.mean(p.adv_correct.to_numpy()[cc] == 0))
                         if cc.any() else float("nan")})
    out = pd.DataFrame(rows, columns=["model", "defense", "attack", "state", "n", "P", "dH",
                                      "P_state", "dH_state", "H_clean", "H_adv", "success_rate"])
    return _finish(out, "Tables 6-7. Prediction entropy: P (Eq. 12, %) and Delta H (Eq. 13) per "
                        "attack.", ["P", "P_state", "success_rate"],
                   ["P = mean_j 1(H(z*_j) < H(z~*_j)); dH = mean_j (H(z*_j) - H(z~*_j)) (clean "
                    "minus adversarial, the paper's sign), at z[N]; *_state: at the evaluated "
                    "state; success_rate: broken among clean-correct (not the paper's P).",
                    "One row per attack family at its stored adversarial examples; the paper's "
                    "avg/min/max over the individual grid attacks: table6_7_grid."])


def table6_7_grid(src) -> pd.DataFrame:
    """The paper's Tables 6-7 as printed: per (model, defense) the average, minimum and maximum
    over the grid's (i, Ka, lambda) attacks of P (Eq. 12) and Delta H (Eq. 13), one (P, dH)
    per setting from its per-example records' ``extra.H`` (the reported forward's prediction
    entropy at that setting's adversarial example) and ``extra.H_clean`` (at the clean input).

    The entropies are those of the reported forward -- the equilibrium z* for 'final' (the
    paper's), the evaluated state for others. A setting counts only when it has a record for
    every example of the entry (grid mode 'full'; 'efficient' skips broken points, which would
    bias P and dH). Clean-misclassified points are not attacked (x~ = x: 0 to dH, not counted
    in P) and PGD stops at the first misclassifying iterate, as in :func:`table6_7`."""
    data = load_run(src)
    df = data.records
    rows, partial = [], 0
    for (mk, dk), g in _groups(df):
        n = _clean(g).index.nunique()
        grid = g[(g.attack == "grid") & (g.setting != "worst")]
        if grid.empty or not n:
            continue
        stats = []
        for name, s in grid.groupby("setting", sort=False):
            h = s.extra.map(lambda e: e.get("H") if isinstance(e, dict) else None)
            hc = s.extra.map(lambda e: e.get("H_clean") if isinstance(e, dict) else None)
            ok = h.notna() & hc.notna()
            if s.example[ok].nunique() < n:
                partial += 1
                continue
            h, hc = h[ok].to_numpy(float), hc[ok].to_numpy(float)
            stats.append((name, float(np.mean(hc < h)), float(np.mean(hc - h))))
        if not stats:
            continue
        P = np.array([t[1] for t in stats])
        dH = np.array([t[2] for t in stats])
        rows.append({"model": mk, "defense": dk, "state": grid.state.iloc[0],
                     "settings": len(stats), "n": n,
                     "P_avg": float(P.mean()), "P_min": float(P.min()), "P_max": float(P.max()),
                     "dH_avg": float(dH.mean()), "dH_min": float(dH.min()),
                     "dH_max": float(dH.max()),
                     "P_min_setting": stats[int(P.argmin())][0],
                     "dH_min_setting": stats[int(dH.argmin())][0]})
        # Eqs. (12)-(13) over V = the inputs with a perturbed counterpart (clean-misclassified
        # inputs are not attacked, so counting them as "not higher" caps P at clean accuracy)
        from benchmark.report.claims import grid_entropy_statistics
        st = grid_entropy_statistics(g)
        if st and st["per_setting"]:
            pv = np.array([r["P"] for r in st["per_setting"]])
            dv = np.array([r["dH"] for r in st["per_setting"]])
            rows[-1].update({"n_V": st["n_attacked"], "P_avg_V": float(pv.mean()),
                             "P_min_V": float(pv.min()), "P_max_V": float(pv.max()),
                             "dH_avg_V": float(dv.mean())})
    out = pd.DataFrame(rows, columns=["model", "defense", "state", "settings", "n", "P_avg",
                                      "P_min", "P_max", "dH_avg", "dH_min", "dH_max",
                                      "P_min_setting", "dH_min_setting", "n_V", "P_avg_V",
                                      "P_min_V", "P_max_V", "dH_avg_V"])
    return _finish(out, "Tables 6-7 (as in the paper). P (Eq. 12, %) and Delta H (Eq. 13): "
                        "average / minimum / maximum over the grid's intermediate-state attacks.",
                   ["P_avg", "P_min", "P_max", "P_avg_V", "P_min_V", "P_max_V"],
                   ["*_V: over V = the n_V inputs with a perturbed counterpart (the attacked, "
                    "clean-correct ones), the paper's Eqs. 12-13 except that its V also holds "
                    "clean-misclassified inputs with a PGD-10 counterpart, which the runner does "
                    "not attack; the columns without _V count those as x~ = x (not higher, 0 to "
                    "dH), so there P <= clean accuracy.",
                    "One P and one dH per (i, Ka, lambda) setting over the entry's examples "
                    "(the paper: over its validation set with 144 settings); H of the reported "
                    "forward (z* for 'final'); dH = clean minus adversarial (the paper's sign).",
                    f"{partial} setting(s) skipped: not every example has a record with "
                    "entropies (grid mode 'efficient', or a run made before they were stored)."
                    if partial else ""])


# ---------------------------------------------------------------------------------------------
# Table 8: strongest Ka per (state, lambda)
# ---------------------------------------------------------------------------------------------

def table8(src) -> pd.DataFrame:
    """Table 8 per (model, defense, preset, i, lambda): the strongest Ka (lowest per-setting
    accuracy) and its accuracy, defined when every Ka setting of that (i, lambda) covers every
    clean-correct example; ``most_broken_ka`` / ``most_broken``: the Ka that broke the most
    clean-correct examples (defined in efficient mode too, where it is order-dependent)."""
    data = load_run(src)
    s = setting_accuracies(data)
    s = s[s.i.notna()]
    rows, incomplete = [], False
    for (mk, dk, pre, i, lam), g in s.groupby(["model", "defense", "preset", "i", "lam"], sort=False):
        g = g.sort_values("ka")
        complete = bool(g.acc.notna().all())
        incomplete |= not complete
        k = g.acc.idxmin() if complete else None
        kb = g.broken.idxmax()
        rows.append({"model": mk, "defense": dk, "preset": pre, "i": int(i), "lam": float(lam),
                     "ka": int(g.loc[k, "ka"]) if complete else None,
                     "acc": float(g.loc[k, "acc"]) if complete else float("nan"),
                     "most_broken_ka": int(g.loc[kb, "ka"]), "most_broken": int(g.loc[kb, "broken"]),
                     "kas": len(g), "available": int(g.acc.notna().sum()),
                     "n": int(g.n.iloc[0])})
    out = pd.DataFrame(rows, columns=["model", "defense", "preset", "i", "lam", "ka", "acc",
                                      "most_broken_ka", "most_broken", "kas", "available", "n"])
    if len(out):
        order = {k: j for j, (k, _) in enumerate(_groups(data.records))}
        out["_o"] = [order.get((m, d), len(order)) for m, d in zip(out.model, out.defense)]
        out = out.sort_values(["_o", "preset", "lam", "i"]).drop(columns="_o").reset_index(drop=True)
        out["ka"] = out["ka"].astype("Int64")
    notes = ["ka / acc: the strongest Ka (lowest per-setting accuracy) at state i and lambda."]
    if incomplete:
        notes.append("ka / acc unavailable (empty) where some Ka setting lacks a record for a "
                     "clean-correct example (efficient grid mode skips points already broken); "
                     "most_broken_ka then names the Ka that broke the most points.")
    return _finish(out, "Table 8. The strongest intermediate attack (Eq. 11) at each state.",
                   ["acc"], notes)


# ---------------------------------------------------------------------------------------------
# Tables 9-10: cost
# ---------------------------------------------------------------------------------------------

def table9_10(src) -> pd.DataFrame:
    """Tables 9-10 (speed) per (model, defense, attack, setting): mean f_theta evaluations per
    example (``f_evals`` = nfev_nograd + nfev_grad, and each part), wall seconds per example and
    examples per second. The individual grid settings carry no cost of their own (their unit's
    cost is on the ``worst`` records), so they are left out."""
    data = load_run(src)
    df = data.records
    rows = []
    if len(df):
        d = df[~((df.attack == "grid") & (df.setting != "worst"))]
        for (mk, dk, att, st), g in d.groupby(["model", "defense", "attack", "setting"], sort=False):
            ng = g.nfev_nograd.astype(float)
            gr = g.nfev_grad.astype(float)
            wall = g.wall_s.astype(float)
            w = float(wall.mean()) if wall.notna().any() else float("nan")
            rows.append({"model": mk, "defense": dk, "attack": att, "setting": st, "n": len(g),
                         "f_evals": float((ng.fillna(0) + gr.fillna(0)).mean()),
                         "nfev_nograd": float(ng.mean()), "nfev_grad": float(gr.mean()),
                         "wall_s": w, "examples_per_s": 1.0 / w if w and w > 0 else float("nan")})
    out = pd.DataFrame(rows, columns=["model", "defense", "attack", "setting", "n", "f_evals",
                                      "nfev_nograd", "nfev_grad", "wall_s", "examples_per_s"])
    prov = data.meta.get("provenance") or {}
    dev = prov.get("device") or (data.config.get("device"))
    return _finish(out, "Tables 9-10. Cost per example: f_theta evaluations and wall time.", [],
                   [f"Device: {dev or '?'}; wall_s is the work unit's wall time split evenly "
                    "over its examples (clean-misclassified points cost little).",
                    "f_evals counts f_theta evaluations (backward passes are counted by the "
                    "solver's f-evals with graph, not as 2F)."])


def _bench_file(bench_dir, kind: str) -> Optional[dict]:
    """The newest ``deqbench bench KIND --output`` JSON in ``bench_dir`` whose content is of
    that kind (train: rows with 'method'; forward: rows with 'tf'), else None."""
    if bench_dir is None or not Path(bench_dir).is_dir():
        return None
    key = {"train": "method", "forward": "tf"}[kind]
    for p in sorted(Path(bench_dir).glob("*.json"), key=lambda q: q.stat().st_mtime, reverse=True):
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        rows = d.get("rows") if isinstance(d, dict) else None
        if rows and isinstance(rows, list) and isinstance(rows[0], dict) and key in rows[0]:
            return dict(d, path=str(p))
    return None


def table9(bench_dir) -> pd.DataFrame:
    """Table 9 (training speed, samples/s) of PGD-AT and TRADES without and with Sec. 3.3, from
    a ``deqbench bench train --output`` file (interleaved timing on one machine, so the
    speed-ups are ratios measured in one run)."""
    d = _bench_file(bench_dir, "train")
    cols = ["method", "sec33", "samples_per_s", "f_evals_per_sample", "speedup_vs_base"]
    if d is None:
        return _finish(pd.DataFrame(columns=cols), "Table 9. Training speed (samples/s).")
    out = pd.DataFrame([{c: r.get(c) for c in cols} for r in d["rows"]], columns=cols)
    prov = d.get("provenance") or {}
    model = (d.get("config") or {}).get("model")
    return _finish(out, "Table 9. Training speed (samples/s), vanilla vs + Sec. 3.3.", [],
                   [f"{d['path']}: model {model}, device {prov.get('device', '?')}, "
                    f"commit {prov.get('git_commit', '?')}.",
                    "Paper (DEQ-Large, CIFAR-10, RTX 3090): PGD-AT 30.2 -> 39.9 (1.32x), "
                    "TRADES 24.0 -> 30.6 (1.28x)."])


def table10(bench_dir) -> pd.DataFrame:
    """Table 10 (inference speed, samples/s) of the Sec. 3.2 defense over Tf x R (R = 0: the
    plain forward), from a ``deqbench bench forward --output`` file."""
    d = _bench_file(bench_dir, "forward")
    cols = ["tf", "r", "samples_per_s", "time_ratio", "f_evals_per_sample"]
    if d is None:
        return _finish(pd.DataFrame(columns=cols), "Table 10. Inference speed (samples/s).")
    rows = [{"tf": r["tf"], "r": r["r"], "samples_per_s": r["samples_per_s"],
             "time_ratio": r["ratio"], "f_evals_per_sample": r["f_nograd"] + r["f_grad"]}
            for r in d["rows"] if r["defense"] != "plain"]
    out = pd.DataFrame(rows, columns=cols).sort_values(["tf", "r"]).reset_index(drop=True)
    prov = d.get("provenance") or {}
    out = _finish(out, "Table 10. Inference speed (samples/s) of Sec. 3.2 over Tf x R.", [],
                  [f"{d['path']}: model {d.get('model')}, batch {d.get('batch_size')}, preset "
                   f"{d.get('preset')}, device {prov.get('device', '?')}; time_ratio: defended "
                   "/ plain forward timed next to it."])
    rs = sorted({int(r) for r in out.r})
    lines = ["Tf x R (samples/s):", "", "| Tf | " + " | ".join(f"R = {r}" for r in rs) + " |",
             "|---:|" + "---:|" * len(rs)]
    for tf, g in out.groupby("tf", sort=True):
        v = {int(r): x for r, x in zip(g.r, g.samples_per_s)}
        lines.append(f"| {int(tf)} | " + " | ".join(f"{v[r]:.1f}" if r in v else "-" for r in rs) + " |")
    out.attrs["appendix"] = "\n".join(lines)
    return out


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

TABLES = {"table1": table1, "table2": table2, "table3": table3, "table4": table4_top_settings,
          "table4_autoattack": table4_autoattack,
          "table5": table5, "table6_7": table6_7, "table6_7_grid": table6_7_grid,
          "table8": table8, "table9_10": table9_10}


def _cell(v, pct: bool) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return ""
    if isinstance(v, (float, np.floating)):
        if pct:
            return f"{100 * float(v):.2f}"
        return f"{float(v):.4g}" if abs(float(v)) < 10 else f"{float(v):,.1f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


#: percent columns that are not a count out of n (differences, averages, other denominators)
NOT_PROPORTIONS = ("diff", "pgd_minus_best", "diff_ci_lo", "diff_ci_hi", "success_rate", "P_avg",
                   "P_avg_V", "P_min_V", "P_max_V")   # the _V ones are over n_V, not n


def _interval(v, n) -> Optional[tuple]:
    """The Clopper-Pearson 95% interval of v = k/n (None unless v is a count out of n)."""
    from benchmark.report.stats import clopper_pearson
    try:
        v, n = float(v), int(n)
    except (TypeError, ValueError):
        return None
    if not (v == v) or n <= 0 or abs(v * n - round(v * n)) > 1e-6:
        return None
    return clopper_pearson(int(round(v * n)), n)


def ci_columns(df: pd.DataFrame) -> list:
    """The accuracy columns of a table that get a 95% interval: its percent columns that are
    proportions over the row's ``n`` (tables without ``n`` get none)."""
    if "n" not in df.columns:
        return []
    return [c for c in df.attrs.get("percent", []) if c not in NOT_PROPORTIONS]


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (percent columns as ``12.34``, accuracies over ``n`` as
    ``12.34 [lo, hi]`` with their exact 95% interval), without ``tabulate``."""
    pct = set(df.attrs.get("percent", []))
    cis = set(ci_columns(df))
    cols = [str(c) for c in df.columns]
    head = [f"{c} (%) [95% CI]" if c in cis else (f"{c} (%)" if c in pct else c) for c in cols]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else "---"
                            for c in df.columns) + "|"]
    for _, r in df.iterrows():
        cells = []
        for c in df.columns:
            text = _cell(r[c], str(c) in pct)
            ci = _interval(r[c], r["n"]) if str(c) in cis and text else None
            cells.append(text if ci is None else f"{text} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def with_interval_columns(df: pd.DataFrame) -> pd.DataFrame:
    """The table with ``<col>_ci95_lo`` / ``<col>_ci95_hi`` (fractions) after each accuracy
    column of :func:`ci_columns` (for the CSV files)."""
    out = df.copy()
    for c in reversed(ci_columns(df)):
        lo = [(_interval(v, n) or (float("nan"),) * 2)[0] for v, n in zip(df[c], df["n"])]
        hi = [(_interval(v, n) or (float("nan"),) * 2)[1] for v, n in zip(df[c], df["n"])]
        pos = list(out.columns).index(c) + 1
        out.insert(pos, f"{c}_ci95_lo", lo)
        out.insert(pos + 1, f"{c}_ci95_hi", hi)
    return out


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_tables(db_path, out_dir=None, bench_dir=None) -> list:
    """Write every table as ``<name>.md`` and ``<name>.csv`` into ``out_dir`` (default:
    ``RUN_DIR/tables``); returns the paths written. Tables without data (e.g. Table 3 or 5)
    still get both files, saying "not in this run". Tables 9 and 10 (training / inference
    speed) come from ``deqbench bench train|forward --output`` files in ``bench_dir`` (default:
    ``RUN_DIR/bench``); ``table9_10`` is the run's own attack cost per example."""
    data = load_run(db_path)
    out = Path(out_dir) if out_dir is not None else data.run_dir / "tables"
    out.mkdir(parents=True, exist_ok=True)
    bench_dir = Path(bench_dir) if bench_dir is not None else data.run_dir / "bench"
    written = []
    tables = dict(TABLES, table9=lambda _d: table9(bench_dir), table10=lambda _d: table10(bench_dir))
    for name, fn in tables.items():
        df = fn(data)
        title = df.attrs.get("title") or fn.__doc__.strip().splitlines()[0]
        cap = data.caption(title)
        if df.empty and name in ("table9", "table10"):
            cmd = "train --config CONFIG" if name == "table9" else "forward --model NAME"
            md = (f"{cap}\n\nNo data: no `deqbench bench {cmd} --output {bench_dir}/"
                  f"{'train' if name == 'table9' else 'forward'}.json` result in {bench_dir}.\n")
            csv = f"# {cap}\n# not in this run\n"
        elif df.empty:
            md = f"{cap}\n\nNo data: not in this run (the database holds no records for this table).\n"
            csv = f"# {cap}\n# not in this run\n"
        else:
            notes = df.attrs.get("footnotes", [])
            md = cap + "\n\n" + to_markdown(df) + "\n"
            if df.attrs.get("appendix"):
                md += "\n" + df.attrs["appendix"] + "\n"
            if ci_columns(df):
                notes = list(notes) + ["[lo, hi]: exact 95% Clopper-Pearson interval of the "
                                       "accuracy over the row's n examples."]
            if notes:
                md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
            csv = f"# {cap}\n" + with_interval_columns(df).to_csv(index=False)
        written.append(_write(out / f"{name}.md", md))
        written.append(_write(out / f"{name}.csv", csv))
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.tables",
                                 description="Write the paper's tables of a run (Markdown + CSV).")
    ap.add_argument("run", help="run folder holding results.sqlite, or the .sqlite file")
    ap.add_argument("--out", default=None, help="output folder (default: RUN_DIR/tables)")
    ap.add_argument("--bench", default=None,
                    help="folder of `deqbench bench train|forward --output` JSON files for "
                         "Tables 9-10 (default: RUN_DIR/bench)")
    args = ap.parse_args(argv)
    try:
        paths = write_tables(args.run, args.out, args.bench)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())

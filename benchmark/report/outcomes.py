"""Per-example outcomes of a run: the 0/1 vectors every reported accuracy is the mean of.

:func:`entry_outcomes` turns the records of one (model, defense) into a DataFrame indexed by the
example index (the clean examples of that entry, ascending) with one 0/1 column per attack family
and ``ALL``, by the same rules as :func:`benchmark.runner.summarize` (an example counts as robust
under an attack only if it is correct clean and its record under that attack is correct; an
example without a record counts 0; ``ALL`` is the per-example minimum over every family). So
``entry_outcomes(g)[col].mean()`` is summarize's number, and paired tests (McNemar) can be drawn on
the columns of two entries evaluated on the same examples.
"""
from __future__ import annotations

from typing import Optional

import pandas as pd

__all__ = ["FAMILIES", "entry_outcomes", "run_outcomes", "grid_setting_outcomes",
           "common_examples", "CHECKS_NOT_ATTACKS"]

try:  # the runner's list of check records that are not eps-attacks (sanity checks)
    from benchmark.runner import CHECKS_NOT_ATTACKS
except ImportError:  # pragma: no cover - keeps reports working while the runner is refactored
    CHECKS_NOT_ATTACKS = ("large_eps", "clean_agreement")

#: attack family -> the record setting holding its per-example outcome (None: min over settings)
FAMILIES = {"pgd": None, "grid": "worst", "autoattack": "ensemble", "adaptive": "worst",
            "checks": None, "top_settings": None, "transfer": None}


def entry_outcomes(g: pd.DataFrame) -> pd.DataFrame:
    """Records of ONE (model, defense) -> DataFrame[example] with int columns ``clean``, one per
    attack family present (see :data:`FAMILIES`) and ``ALL``; empty when there is no clean record."""
    clean = g[g.attack == "clean"]
    if clean.empty:
        return pd.DataFrame(columns=["clean", "ALL"], dtype=int)
    idx = pd.Index(sorted(clean.example.unique()), name="example")
    cols = {"clean": clean.groupby("example").correct.min().reindex(idx).fillna(0).astype(int)}
    for fam, setting in FAMILIES.items():
        a = g[g.attack == fam]
        if fam == "checks":
            a = a[~a.setting.astype(str).str.startswith(CHECKS_NOT_ATTACKS)]
        if setting is not None:
            a = a[a.setting == setting]
        if a.empty:
            continue
        s = a.groupby("example").correct.min().reindex(idx).fillna(0).astype(int)
        cols[fam] = s * cols["clean"]  # robust only if also correct clean
    out = pd.DataFrame(cols, index=idx)
    out["ALL"] = out.min(axis=1).astype(int)
    return out


def run_outcomes(records: pd.DataFrame) -> dict:
    """All records of a run -> {(model, defense): :func:`entry_outcomes`} in first-seen order."""
    if records.empty:
        return {}
    return {key: entry_outcomes(g) for key, g in records.groupby(["model", "defense"], sort=False)}


def grid_setting_outcomes(g: pd.DataFrame, index: Optional[pd.Index] = None) -> pd.DataFrame:
    """Records of ONE (model, defense) -> DataFrame[example x grid setting] of 0/1 (robust under
    that single (i, Ka, lambda) setting); NaN where a clean-correct example has no record
    (efficient mode skips points already broken). Clean-misclassified examples are 0."""
    clean = g[g.attack == "clean"].groupby("example").correct.min()
    idx = index if index is not None else pd.Index(sorted(clean.index), name="example")
    grid = g[(g.attack == "grid") & (g.setting != "worst")]
    if grid.empty:
        return pd.DataFrame(index=idx)
    wide = grid.pivot_table(index="example", columns="setting", values="correct", aggfunc="min")
    wide = wide.reindex(idx)
    wrong = clean.reindex(idx).fillna(0) == 0
    wide.loc[wrong.to_numpy(), :] = 0
    return wide[list(dict.fromkeys(grid.setting))]


def common_examples(*frames: pd.DataFrame) -> pd.Index:
    """The example indices shared by every frame (sorted): where a paired comparison is valid."""
    idx = None
    for f in frames:
        idx = f.index if idx is None else idx.intersection(f.index)
    return pd.Index([] if idx is None else sorted(idx), name="example")

"""Per (model, defense): how many examples had non-finite outputs or unconverged solves, from the
per-example records (their ``status``), and the flags / console warnings derived from that.

An example is ``nonfinite`` when any of its records (clean or under any attack) is, and
``unconverged`` when any of its records' final relative residual exceeds the run's threshold
(:data:`model_zoo.scoring.UNCONVERGED_REL_RESIDUAL` unless ``reliability.residual_threshold``
sets it). An entry is flagged when it has any non-finite example, or when the share of
unconverged examples exceeds ``reliability.unconverged_share``
(:data:`model_zoo.scoring.UNCONVERGED_SHARE`).
"""
from __future__ import annotations

import json
from typing import Optional

from model_zoo.scoring import UNCONVERGED_REL_RESIDUAL, UNCONVERGED_SHARE, record_status

__all__ = ["record_statuses", "reliability_rows", "reliability_flags", "warnings_for",
           "thresholds"]


def thresholds(cfg: Optional[dict]) -> tuple:
    """(residual threshold, unconverged share) of a stored run config dict."""
    rel = (cfg or {}).get("reliability") or {}
    return (float(rel.get("residual_threshold", UNCONVERGED_REL_RESIDUAL)),
            float(rel.get("unconverged_share", UNCONVERGED_SHARE)))


def record_statuses(df, residual_threshold: float = UNCONVERGED_REL_RESIDUAL):
    """The ``status`` column of a records frame; records of databases written before the
    column existed (NULL) get it derived from their margin and residuals."""
    if "status" in df.columns and df["status"].notna().all():
        return df["status"]

    def one(row):
        if "status" in row and isinstance(row["status"], str):
            return row["status"]
        res = row.get("residuals")
        res = json.loads(res) if isinstance(res, str) else None
        m = row.get("margin")
        return record_status(None if m is None or m != m else m, res, residual_threshold)[0]
    return df.apply(one, axis=1) if len(df) else df.get("status", df.index.to_series())


def reliability_rows(df, residual_threshold: float = UNCONVERGED_REL_RESIDUAL) -> dict:
    """{(model, defense): {'n', 'nonfinite', 'unconverged', 'unconverged_share'}} -- counts
    of EXAMPLES (of the clean records' examples) with any such record."""
    out = {}
    if df.empty:
        return out
    df = df.assign(_status=record_statuses(df, residual_threshold))
    for (mk, dk), g in df.groupby(["model", "defense"], sort=False):
        n = g[g.attack == "clean"].example.nunique() or g.example.nunique()
        bad = g[g._status == "nonfinite"].example.unique()
        unc = set(g[g._status == "unconverged"].example.unique()) - set(bad)
        out[(mk, dk)] = {"n": int(n), "nonfinite": int(len(bad)), "unconverged": len(unc),
                         "unconverged_share": len(unc) / max(int(n), 1)}
    return out


def reliability_flags(row: dict, residual_threshold: float = UNCONVERGED_REL_RESIDUAL,
                      share: float = UNCONVERGED_SHARE) -> dict:
    """Leaderboard flags ``{'nonfinite': {...}, 'unconverged': {...}}`` of one row of
    :func:`reliability_rows` (each ``{'flag': bool, ...numbers}``)."""
    return {"nonfinite": {"flag": row["nonfinite"] > 0, "examples": row["nonfinite"],
                          "n": row["n"]},
            "unconverged": {"flag": row["unconverged_share"] > share,
                            "examples": row["unconverged"], "n": row["n"],
                            "share": round(row["unconverged_share"], 6),
                            "residual_threshold": residual_threshold, "share_threshold": share}}


def warnings_for(rows: dict, residual_threshold: float = UNCONVERGED_REL_RESIDUAL,
                 share: float = UNCONVERGED_SHARE) -> list:
    """One console line per flagged (model, defense) of :func:`reliability_rows`."""
    lines = []
    for (mk, dk), r in rows.items():
        if r["nonfinite"]:
            lines.append(f"warning: {mk} [{dk}]: {r['nonfinite']} of {r['n']} examples have "
                         "non-finite logits, states or residuals (counted wrong everywhere; "
                         "check the weights)")
        if r["unconverged_share"] > share:
            lines.append(f"warning: {mk} [{dk}]: {r['unconverged']} of {r['n']} examples "
                         f"({100 * r['unconverged_share']:.1f}%) end with a relative residual "
                         f"> {residual_threshold:g} (unconverged dynamics)")
    return lines

"""What a reduced protocol misses, measured: ``deqbench gap REDUCED_RUN FULL_RUN``.

The committed leaderboard runs reduced budgets (a 32-setting grid, 10-iteration APGD, ...). A
second, smaller run (e.g. ``configs/eval/fmnist_zoo_1000_full.yaml``: the full 144-setting grid
and AutoAttack at its standard budget on 100 of the same images) measures the cost of that
reduction. For every entry in both runs, on the examples both evaluated (paired):

* ``grid``: robust under the reduced grid's worst case vs the full grid's;
* ``autoattack``: robust under the reduced AutoAttack vs the standard one;
* ``ALL``: the reduced run's per-example worst case vs that worst case AND every attack of the
  full run (what the leaderboard's ALL would lose if the full versions were added).

Each row gives the points broken only by the full version (the reduced version held them) with
an exact 95% Clopper-Pearson interval of that share, those broken only by the reduced version,
the paired difference of the two accuracies with its 95% interval and the exact McNemar p. A
difference with p >= 0.05 is *inconclusive at this n*, said in words.

Writes ``gap.md`` and ``gap.json`` (``--out``, default: the full run's folder).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from benchmark.report.outcomes import common_examples, entry_outcomes
from benchmark.report.stats import clopper_pearson, paired_comparison

__all__ = ["reduction_gap", "to_markdown", "write_gap", "main"]

WHAT = {"grid": "(i, Ka, lambda) grid, worst case", "autoattack": "AutoAttack",
        "ALL": "worst case (ALL)"}


def _budget_text(data, attack) -> str:
    opts = (data.config.get("attacks") or {}).get(attack) or {}
    if attack == "grid":
        kas, lams = opts.get("kas", list(range(1, 10))), opts.get("lams", [0.5, 1.0])
        return f"Ka in {list(kas)}, lambda in {list(lams)}, mode {opts.get('mode', 'efficient')}"
    if attack == "autoattack":
        b = opts.get("budget") or {}
        return (f"{', '.join(opts.get('attacks', ['apgd-ce', 'apgd-t', 'fab-t', 'square']))}; "
                + (", ".join(f"{k}={v}" for k, v in sorted(b.items())) or "standard budget"))
    return ""


def reduction_gap(reduced, full) -> dict:
    """Paired comparison of every (model, defense) present in both runs (folders, databases or
    :class:`benchmark.tables.RunData`): see the module docstring."""
    from benchmark.tables import load_run
    red, ful = load_run(reduced), load_run(full)
    rows = []
    fo = {k: entry_outcomes(g) for k, g in ful.records.groupby(["model", "defense"], sort=False)}
    ro = {k: entry_outcomes(g) for k, g in red.records.groupby(["model", "defense"], sort=False)}
    for key, f in fo.items():
        if key not in ro:
            continue
        r = ro[key]
        idx = common_examples(r, f)
        if not len(idx):
            continue
        r, f = r.loc[idx], f.loc[idx]
        if not np.array_equal(r["clean"].to_numpy(), f["clean"].to_numpy()):
            raise ValueError(f"{key[0]}|{key[1]}: the two runs disagree on clean correctness of "
                             "the same examples (different weights or forward?)")
        fams = [c for c in ("grid", "autoattack") if c in r.columns and c in f.columns]
        attacks_full = f.drop(columns=["clean", "ALL"])
        pairs = [(c, r[c], f[c]) for c in fams]
        if attacks_full.shape[1]:   # the full run attacked this entry at all
            pairs.append(("ALL", r["ALL"], np.minimum(r["ALL"], attacks_full.min(axis=1))))
        for fam, a, b in pairs:
            pc = paired_comparison(a.to_numpy(), b.to_numpy())
            n = len(idx)
            only_full = int(((a == 1) & (b == 0)).sum())
            only_red = int(((a == 0) & (b == 1)).sum())
            lo, hi = clopper_pearson(only_full, n)
            rows.append({
                "model": key[0], "defense": key[1], "attack": fam, "what": WHAT[fam], "n": n,
                "reduced": float(a.mean()), "full": float(b.mean()),
                "ci95": {"reduced": list(clopper_pearson(int(a.sum()), n)),
                         "full": list(clopper_pearson(int(b.sum()), n))},
                "broken_only_by_full": only_full, "broken_only_by_full_ci95": [lo, hi],
                "broken_only_by_reduced": only_red,
                "difference": pc.diff, "difference_ci95": [float(x) for x in pc.ci95],
                "p": pc.p, "conclusion": ("inconclusive at this n" if pc.p >= 0.05 else
                                          ("the reduced version overestimates robustness"
                                           if pc.diff > 0 else
                                           "the full version is weaker here"))})
    # runs named by their config (not their folder: the text must not depend on where the
    # database was rebuilt)
    return {"reduced_run": red.config.get("name") or str(red.run_dir),
            "full_run": ful.config.get("name") or str(ful.run_dir),
            "reduced_budget": {a: _budget_text(red, a) for a in ("grid", "autoattack")},
            "full_budget": {a: _budget_text(ful, a) for a in ("grid", "autoattack")},
            "rows": rows}


def table_lines(rows: list) -> list:
    """The gap table (Markdown lines), for ``gap.md`` and the README's leaderboard block."""
    lines = ["| entry | attack | n | reduced [95% CI] | full [95% CI] | broken only by full "
             "[95% CI] | only by "
             "reduced | difference [95% CI] | McNemar p | conclusion |",
             "|---|---|---:|---:|---:|---|---:|---|---:|---|"]
    for r in rows:
        lo, hi = r["broken_only_by_full_ci95"]
        dlo, dhi = r["difference_ci95"]
        entry = r["model"] + ("" if r["defense"] == "final" else f"+{r['defense']}")
        acc = {k: f"{100 * r[k]:.1f} [{100 * r['ci95'][k][0]:.1f}, {100 * r['ci95'][k][1]:.1f}]"
               for k in ("reduced", "full")}
        lines.append(
            f"| {entry} | {r['what']} | {r['n']} | {acc['reduced']} | "
            f"{acc['full']} | {r['broken_only_by_full']} "
            f"({100 * r['broken_only_by_full'] / r['n']:.1f}%) [{100 * lo:.1f}, {100 * hi:.1f}] | "
            f"{r['broken_only_by_reduced']} | {100 * r['difference']:+.1f} "
            f"[{100 * dlo:+.1f}, {100 * dhi:+.1f}] | {r['p']:.3g} | {r['conclusion']} |")
    if not rows:
        lines.append("| (no entry is in both runs on common examples) | | | | | | | | | |")
    return lines


def to_markdown(res: dict) -> str:
    lines = ["# What the reduced protocol misses (paired, same examples)", "",
             f"Reduced: `{res['reduced_run']}` (grid: {res['reduced_budget']['grid']}; "
             f"AutoAttack: {res['reduced_budget']['autoattack']}).  ",
             f"Full: `{res['full_run']}` (grid: {res['full_budget']['grid']}; AutoAttack: "
             f"{res['full_budget']['autoattack']}).", "",
             "Accuracies in %, with exact 95% Clopper-Pearson intervals. 'broken only by full' = "
             "examples the reduced version held and the "
             "full version broke, with the exact 95% interval of that share; difference = "
             "reduced - full with Newcombe's 95% interval and the exact McNemar p.", "",
             ] + table_lines(res["rows"])
    return "\n".join(lines) + "\n"


def write_gap(reduced, full, out: Optional[Path] = None) -> list:
    from benchmark.tables import load_run
    res = reduction_gap(reduced, full)
    out = Path(out) if out is not None else load_run(full).run_dir
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "gap.md", out / "gap.json"
    md.write_text(to_markdown(res))
    js.write_text(json.dumps(res, indent=2) + "\n")
    return [md, js]


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="deqbench gap", description=__doc__.splitlines()[0])
    ap.add_argument("reduced", help="the reduced run (folder holding results.sqlite, or the file)")
    ap.add_argument("full", help="the run with the full / standard versions on common examples")
    ap.add_argument("--out", default=None, help="folder for gap.md / gap.json")
    args = ap.parse_args(argv)
    paths = write_gap(args.reduced, args.full, args.out)
    print(paths[0].read_text())
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0

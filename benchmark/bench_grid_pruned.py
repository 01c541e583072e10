"""``python -m benchmark.bench_grid_pruned --model M --n N``: the grid's 'pruned' mode (issue 16
goal 2) through ``deqbench evaluate`` on N Fashion-MNIST test images (seeded subset), with the
paper's 144 (i, Ka, lambda) settings, PGD-10, alpha = eps / 4, eps 0.1, in ONE work unit (shard
size N, so the calibration and the audit come from these N points).

Prints and writes as JSON: f_theta evaluations per example in the reference's F units
(nfev_nograd + 3 nfev_grad: a forward with graph plus its backward ~ 3 F) against the reference
protocol's 44,352 F per example (``benchmark.attack_run``: 10 x (144 x 9 + 3 x 864) attack +
144 x 2 x (9 + 10) evaluation), per role (calibration: full grid; audit: every setting, chosen
first; pruned: only the chosen settings) and projected to larger N with the same calibration and
audit sizes; robust accuracy of the pruned run and, on the audit points, with the chosen
settings only vs with the full grid; the audited miss rate with its 95% Clopper-Pearson
interval. Counts are exact (FEvalMeter); the wall time is reported for information only (the
machine may be shared)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REFERENCE_F = 10 * (144 * 9 + 3 * 864) + 144 * 2 * (9 + 10)   # 44,352 (benchmark.attack_run)


def run(model: str, n: int, calibration: int = 32, audit: int = 16, eps: float = 0.1,
        steps: int = 10, seed: int = 0, batch_size: int = 100, output=None,
        progress: bool = False, kas=None, lams=None) -> dict:
    """The measurement (see the module docstring); ``kas`` / ``lams`` shrink the grid (tests
    only: the reference comparison is meant for the full 144 settings)."""
    from benchmark.report.stats import clopper_pearson
    from benchmark.results_db import ResultsDB
    from benchmark.run_config import from_dict
    from benchmark.runner import evaluate
    from benchmark.suite.grid import _meta_key

    tmp = None
    if output is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_grid_pruned_")
        output = tmp.name
    raw = {"name": f"pruned_{model}_n{n}", "output": str(output), "seed": seed, "device": "cpu",
           "batch_size": batch_size, "shard_size": n,
           "data": {"dataset": "fashion_mnist", "n": n, "seed": seed},
           "threat": {"eps": eps}, "models": [model],
           "attacks": {"grid": {"steps": steps, "alpha": eps / 4, "mode": "pruned",
                                "calibration": min(calibration, n), "audit": audit}}}
    if kas is not None:
        raw["attacks"]["grid"]["kas"] = list(kas)
    if lams is not None:
        raw["attacks"]["grid"]["lams"] = list(lams)
    cfg = from_dict(raw)
    t0 = time.perf_counter()
    res = evaluate(cfg, progress=progress)
    wall = time.perf_counter() - t0
    with ResultsDB(res["db"]) as db:
        recs = db.records_frame(attack="grid")
        meta = db.get_meta(_meta_key(model, "final"))
        units = db.units_frame()
    summ = res["summary"].iloc[0].to_dict()
    worst = recs[recs.setting == "worst"].copy()
    ex = worst.extra.map(json.loads)
    worst["role"] = ex.map(lambda e: e["grid_pruned"]["role"])
    worst["attacked"] = ex.map(lambda e: e["broken_by"] != ["clean"])
    worst["F"] = worst.nfev_nograd + 3 * worst.nfev_grad
    per_role = {r: {"n": int((worst.role == r).sum()),
                    "F_per_example": float(worst.F[worst.role == r].mean())
                    if (worst.role == r).any() else None}
                for r in ("calibration", "audit", "pruned")}
    for v in per_role.values():
        f = v["F_per_example"]
        v["F_vs_reference"] = None if f is None else f / REFERENCE_F
    f_all = float(worst.F.mean())

    # The most a pruned point can cost: robust to every chosen setting, each running all its
    # steps -- the calibration's costliest point's F per setting times the chosen settings (the
    # few pruned points of a small run may all break early, or be clean-misclassified).
    cal_f = worst.F[worst.role == "calibration"]
    cal_ex = worst.example[worst.role == "calibration"]
    per = recs[(recs.setting != "worst") & recs.example.isin(cal_ex)]
    n_settings = int(per.setting.nunique()) if len(per) else 0
    bound = (float(cal_f.max()) / n_settings * len(meta["chosen"])
             if len(cal_f) and n_settings else None)

    def projected(big: int, pruned_f):
        k = {r: per_role[r]["n"] for r in per_role}
        if pruned_f is None:
            return None
        tot = sum(k[r] * per_role[r]["F_per_example"] for r in ("calibration", "audit")
                  if k[r]) + (big - k["calibration"] - k["audit"]) * pruned_f
        return tot / big / REFERENCE_F
    aud = ex[worst.role == "audit"].map(lambda e: e["grid_pruned"])
    att_a = worst.attacked[worst.role == "audit"]
    n_a = len(aud)
    def audit_acc(field):   # robust: correct clean and not broken by the settings of ``field``
        return float(sum(a and not r[field] for a, r in zip(att_a, aud)) / n_a) if n_a else None
    acc_chosen, acc_full = audit_acc("chosen_broke"), audit_acc("full_broke")
    missed = int(sum(r["full_broke"] and not r["chosen_broke"] for r in aud))
    broken = int(sum(r["full_broke"] for r in aud))
    out = {
        "model": model, "n": n, "eps": eps, "alpha": eps / 4, "steps": steps,
        "settings": n_settings,
        "calibration": per_role["calibration"]["n"], "audit": n_a,
        "chosen": meta["chosen"], "n_chosen": len(meta["chosen"]),
        "calibration_per_setting_broken": meta["per_setting_broken"],
        "reference_F_per_example": REFERENCE_F,
        "F_per_example": f_all, "F_vs_reference": f_all / REFERENCE_F,
        "F_by_role": per_role,
        "F_vs_reference_projected": {str(b): projected(b, per_role["pruned"]["F_per_example"])
                                     for b in (n, 1000, 10000)},
        "F_pruned_bound_per_example": bound,
        "F_pruned_bound_vs_reference": None if bound is None else bound / REFERENCE_F,
        "F_vs_reference_projected_bound": {str(b): projected(b, bound) for b in (1000, 10000)},
        "clean_acc": float(summ["clean"]),
        "robust_acc_pruned": float(summ["grid"]),
        "audit_robust_acc_chosen_only": acc_chosen, "audit_robust_acc_full_grid": acc_full,
        "audit_missed": missed, "audit_broken_by_full_grid": broken,
        "miss_rate": missed / n_a if n_a else None,
        "miss_rate_ci95": list(clopper_pearson(missed, n_a)),
        "miss_rate_among_broken": missed / broken if broken else None,
        "miss_rate_among_broken_ci95": list(clopper_pearson(missed, broken)),
        "summary_fields": {k: summ[k] for k in summ if str(k).startswith("grid")},
        "wall_s": wall, "unit_wall_s": float(units.wall_s.sum()) if "wall_s" in units else None,
    }
    if tmp is not None:
        tmp.cleanup()
    return out


def _finite(v):
    """NaN (an interval of 0 points) -> null: strict JSON."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    try:
        return None if v != v else v
    except Exception:
        return v


def format_text(r: dict) -> str:
    fr = r["F_by_role"]
    lines = [f"grid pruned on {r['model']}, n={r['n']} (calibration {r['calibration']}, "
             f"audit {r['audit']}), {r['settings']} settings, PGD-{r['steps']}, eps {r['eps']}, "
             f"alpha {r['alpha']}",
             f"chosen settings ({r['n_chosen']}): {', '.join(r['chosen'])}",
             f"F per example: {r['F_per_example']:,.0f} = {r['F_vs_reference']:.3f}x the "
             f"reference's {r['reference_F_per_example']:,}"]
    for role in ("calibration", "audit", "pruned"):
        v = fr[role]
        if v["n"]:
            lines.append(f"  {role:11s} n={v['n']:3d}: {v['F_per_example']:,.0f} F/example "
                         f"({v['F_vs_reference']:.3f}x)")
    lines.append("  projected with the same calibration/audit: " + ", ".join(
        f"n={k}: {v:.3f}x" for k, v in r["F_vs_reference_projected"].items() if v is not None))
    if r["F_pruned_bound_per_example"] is not None:
        lines.append(f"  bound per pruned point ({r['n_chosen']} settings all run in full): "
                     f"{r['F_pruned_bound_per_example']:,.0f} F "
                     f"({r['F_pruned_bound_vs_reference']:.3f}x); projected with it: " + ", ".join(
                         f"n={k}: {v:.3f}x" for k, v in r["F_vs_reference_projected_bound"].items()))
    lines.append(f"robust accuracy (pruned run, all n): {100 * r['robust_acc_pruned']:.2f}% "
                 f"(clean {100 * r['clean_acc']:.2f}%)")
    if r["audit"]:
        lo, hi = r["miss_rate_ci95"]
        lines.append(f"audit points: chosen settings only {100 * r['audit_robust_acc_chosen_only']:.2f}% "
                     f"vs full grid {100 * r['audit_robust_acc_full_grid']:.2f}%")
        lines.append(f"miss rate {r['audit_missed']}/{r['audit']} = {r['miss_rate']:.3f} "
                     f"[95% CI {lo:.3f}, {hi:.3f}]; among the {r['audit_broken_by_full_grid']} "
                     f"audit points the grid broke: " +
                     ("-" if r["miss_rate_among_broken"] is None else
                      f"{r['miss_rate_among_broken']:.3f} [{r['miss_rate_among_broken_ci95'][0]:.3f}, "
                      f"{r['miss_rate_among_broken_ci95'][1]:.3f}]"))
    lines.append(f"wall {r['wall_s']:.0f} s (information only: shared machine)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.bench_grid_pruned", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--calibration", type=int, default=32)
    p.add_argument("--audit", type=int, default=16)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    r = run(a.model, a.n, a.calibration, a.audit, a.eps, a.steps, a.seed, a.batch_size,
            progress=a.progress)
    print(format_text(r))
    text = json.dumps(_finite(r), indent=1, default=float, allow_nan=False)
    if a.json:
        Path(a.json).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

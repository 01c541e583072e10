"""Measurement of issue 13 section 5: the adaptive protocol (attacks.adaptive) on the Sec. 3.2
test-time defense next to the undefended entry's ALL, paired on the same test images.

    OMP_NUM_THREADS=1 python -m benchmark.bench_adaptive --n 16 --out adaptive_n16.json

Per model: the undefended entry (final state) gets the demo's protocol directly through the
attack functions -- PGD-10 (phantom gradient), the (i, Ka, lambda) grid (Ka in {1, 5}, lambda in
{0.5, 1}, i in 1..8; mode full), AutoAttack (APGD-CE, APGD-T, FAB-T, Square) with the strongest
grid setting, Table 4's APGD-CE at the 2 strongest settings, and the checks' PGD-5/PGD-10/Square
-- and ALL is its per-example worst case. The defended entry (EntropyReduction (Tf, R) =
(2, 10), eps = the threat's, beta = eps / 4, as ``deqbench evaluate`` resolves it) gets
:func:`attacks.adaptive.adaptive_protocol` with the strongest undefended grid setting as the
transfer gradient and its (Ka, lambda) on the segment solves. Every accuracy comes with its
95% Clopper-Pearson interval; defended vs undefended with the exact McNemar test and Newcombe's
paired interval (benchmark.report.stats). Budgets are REDUCED (labelled in the output).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import model_zoo
from attacks.adaptive import adaptive_protocol
from attacks.evaluation import (autoattack_attack, grid_attack, pgd_attack, pgd_attack_steps,
                                setting_name)
from attacks.surrogates import JudgedModule, PhantomFinal, grid_settings
from benchmark.data import load_dataset, subset
from benchmark.report.stats import clopper_pearson, paired_comparison

MODELS = ("deq_tiny_fmnist_trades", "deq_tiny_fmnist_trades_sec33")


def _acc(c):
    k, n = int(c.sum()), len(c)
    lo, hi = clopper_pearson(k, n)
    return {"acc": k / n, "k": k, "n": n, "ci95": [lo, hi]}


def undefended_all(model, x, y, eps, alpha, seed, bs):
    """The demo protocol of a plain entry; returns (per-attack correct vectors, strongest)."""
    final = model_zoo.FinalState()
    res = {}
    res["pgd"] = pgd_attack(JudgedModule(model, final, PhantomFinal()), x, y, eps, alpha, 10,
                            seed=seed, batch_size=bs).correct
    g = grid_attack(model, final, x, y, eps, alpha, 10,
                    settings=grid_settings(model.solver.max_iter, kas=(1, 5), lams=(0.5, 1.0)),
                    mode="full", seed=seed, batch_size=bs)
    res["grid"] = g.worst.correct
    acc = g.setting_accuracy
    order = sorted(range(len(acc)), key=lambda i: (acc[i], g.settings[i]))
    srcs = grid_settings(model.solver.max_iter, kas=(1, 5), lams=(0.5, 1.0))
    top = [srcs[i] for i in order[:2]]
    strongest = top[0]
    res["autoattack"] = autoattack_attack(
        JudgedModule(model, final, strongest), x, y, eps,
        attacks=["apgd-ce", "apgd-t", "fab-t", "square"],
        budget={"apgd_n_iter": 10, "apgd_t_n_target_classes": 2, "fab_n_iter": 10,
                "fab_n_target_classes": 2, "square_n_queries": 200}, seed=seed,
        batch_size=bs).correct
    for s in top:
        res[f"apgd-ce@{setting_name(s)}"] = autoattack_attack(
            JudgedModule(model, final, s), x, y, eps, attacks=["apgd-ce"],
            budget={"apgd_n_iter": 10}, seed=seed, batch_size=bs).correct
    chk = pgd_attack_steps(JudgedModule(model, final, strongest), x, y, eps, alpha, (5, 10),
                           seed=seed, batch_size=bs)
    res["checks:pgd5"], res["checks:pgd10"] = chk[5].correct, chk[10].correct
    res["checks:square200"] = autoattack_attack(
        JudgedModule(model, final, strongest), x, y, eps, attacks=["square"],
        budget={"square_n_queries": 200}, seed=seed, batch_size=bs).correct
    return res, strongest


#: the order the ensemble runs its members in (attacks.adaptive: variants, then attacks)
_MEMBER_ORDER = ("transfer:pgd", "transfer:apgd-ce", "transfer:apgd-t", "through:apgd-ce",
                 "through:apgd-t", "cheap:apgd-ce", "cheap:apgd-t", "objectives:apgd-dlr",
                 "objectives:apgd-t-ce", "square")


def _member_rank(name: str) -> int:
    for k, pre in enumerate(_MEMBER_ORDER):
        if name == pre or name.startswith(pre + "@"):
            return k
    return len(_MEMBER_ORDER)


def run_table(run) -> dict:
    """The section-5 table from a finished ``deqbench evaluate`` run (e.g.
    configs/eval/fmnist_adaptive_n200.yaml): per model with a plain entry and a Sec. 3.2 entry
    on the same examples, the undefended entry's ALL, the defended entry's clean accuracy, its
    robust accuracy after each adaptive member in the ensemble's order (cumulative: a member
    attacks only the points every earlier one left robust) and its worst case (its ALL over
    every attack run on it), each with a 95% Clopper-Pearson interval, and the paired
    comparison (exact McNemar, Newcombe interval) of the defended worst case against the
    undefended ALL."""
    from pathlib import Path

    from benchmark.report.outcomes import entry_outcomes
    from benchmark.results_db import ResultsDB
    path = Path(run)
    path = path / "results.sqlite" if path.is_dir() else path
    with ResultsDB(path, create=False) as db:
        df = db.records_frame()
        units = db.units_frame()
    out = {"run": str(path), "models": {}}
    for mk, g in df.groupby("model", sort=False):
        defs = list(dict.fromkeys(g.defense))
        plain = [d for d in defs if not d.startswith("entropy_reduction")
                 and not d.startswith("{")]
        tt = [d for d in defs if d not in plain]
        if "final" not in plain or not tt:
            continue
        und = entry_outcomes(g[g.defense == "final"])
        for dk in tt:
            gd = g[g.defense == dk]
            dout = entry_outcomes(gd)
            idx = und.index.intersection(dout.index)
            u_all = und.ALL.reindex(idx)
            clean_d = dout.clean.reindex(idx)
            ad = gd[gd.attack == "adaptive"]
            # the transfer PGD's gradient is each shard's strongest undefended grid setting:
            # one member under several names ('transfer:pgd@<setting>'), one row here
            member = ad.setting.where(~ad.setting.str.startswith("transfer:pgd@"),
                                      "transfer:pgd@strongest")
            members = sorted(set(member) - {"worst"}, key=lambda n: (_member_rank(n), n))
            robust = clean_d.copy()
            rows = []
            for mname in members:
                broke = ad[(member == mname) & (ad.correct == 0)].example.unique()
                robust[robust.index.isin(broke)] = 0
                rows.append({"member": mname, "after": _acc(torch.tensor(robust.to_numpy()) > 0),
                             "attacked": int(ad[member == mname].example.nunique()),
                             "settings": sorted(set(ad.setting[member == mname]))})
            worst = dout.ALL.reindex(idx)
            wall = units[(units.model == mk) & (units.defense == dk)].groupby("attack").wall_s.sum()
            out["models"][f"{mk}@{dk}"] = {
                "n": len(idx), "undefended_clean": _acc(torch.tensor(und.clean.reindex(idx).to_numpy()) > 0),
                "undefended_ALL": _acc(torch.tensor(u_all.to_numpy()) > 0),
                "clean": _acc(torch.tensor(clean_d.to_numpy()) > 0),
                "cumulative": rows,
                "adaptive_worst": _acc(torch.tensor(
                    dout.get("adaptive", clean_d).reindex(idx).to_numpy()) > 0),
                "ALL": _acc(torch.tensor(worst.to_numpy()) > 0),
                "attacks_run": sorted(set(gd.attack)),
                "paired_ALL_vs_undefended_ALL": paired_comparison(
                    worst.tolist(), u_all.tolist()).to_dict(),
                "paired_words": paired_comparison(worst.tolist(), u_all.tolist()).words(
                    "Sec. 3.2", "undefended"),
                "unit_wall_s": {k: float(v) for k, v in wall.items()}}
    return out


def format_run_table(res: dict) -> str:
    def f(a):
        return f"{100 * a['acc']:.1f} [{100 * a['ci95'][0]:.1f}, {100 * a['ci95'][1]:.1f}]"
    lines = []
    for entry, e in res["models"].items():
        lines.append(f"### {entry} (n = {e['n']})")
        lines.append("")
        lines.append("| | robust accuracy % [95% CI] | points attacked |")
        lines.append("|---|---|---:|")
        lines.append(f"| undefended (final state): clean | {f(e['undefended_clean'])} | |")
        lines.append(f"| undefended: ALL of its protocol | {f(e['undefended_ALL'])} | |")
        lines.append(f"| Sec. 3.2: clean | {f(e['clean'])} | |")
        for r in e["cumulative"]:
            lines.append(f"| Sec. 3.2: after + {r['member']} | {f(r['after'])} | {r['attacked']} |")
        lines.append(f"| Sec. 3.2: adaptive worst case | {f(e['adaptive_worst'])} | |")
        lines.append(f"| Sec. 3.2: ALL ({', '.join(a for a in e['attacks_run'] if a != 'clean')}) "
                     f"| {f(e['ALL'])} | |")
        lines.append("")
        lines.append(f"Paired: {e['paired_words']}.")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--apgd-iter", type=int, default=10)
    ap.add_argument("--targets", type=int, default=2)
    ap.add_argument("--square", type=int, default=200)
    ap.add_argument("--ensemble", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="adaptive_measurement.json")
    ap.add_argument("--run", default=None, help="instead of attacking: the table of a finished "
                    "run folder (configs/eval/fmnist_adaptive_n200.yaml)")
    a = ap.parse_args(argv)
    if a.run:
        res = run_table(a.run)
        print(format_run_table(res))
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)
        return
    torch.manual_seed(a.seed)
    ds = subset(load_dataset("fashion_mnist", "test"), a.n, seed=0)
    x, y = ds.images, ds.labels
    alpha = a.eps / 4
    budget = {"pgd_steps": 10, "apgd_n_iter": a.apgd_iter, "apgd_t_n_target_classes": a.targets,
              "square_n_queries": a.square}
    report = {"n": a.n, "indices": [int(i) for i in ds.indices], "eps": a.eps, "budget": budget,
              "ensemble": a.ensemble, "models": {}}
    for name in a.models:
        t0 = time.perf_counter()
        model = model_zoo.load(name, device="cpu")
        with torch.no_grad():
            clean_u = model.run(x).logits.argmax(-1) == y
        und, strongest = undefended_all(model, x, y, a.eps, alpha, a.seed, a.n)
        all_u = clean_u.clone()
        for c in und.values():
            all_u &= c.cpu()
        t_und = time.perf_counter() - t0
        d = model_zoo.make_defense({"name": "entropy_reduction", "tf": 2, "r": 10})
        d.eps, d.beta = a.eps, a.eps / 4
        with torch.no_grad():
            clean_d = model.run(x, defense=d).logits.argmax(-1) == y
        t1 = time.perf_counter()
        out = adaptive_protocol(model, d, x, y, a.eps, transfer_surrogate=strongest, alpha=alpha,
                                budget=budget, ka=strongest.ka, lam=strongest.lam, seed=a.seed,
                                batch_size=a.n, ensemble=a.ensemble, progress=False)
        t_ad = time.perf_counter() - t1
        entry = {"strongest_setting": setting_name(strongest),
                 "undefended": {"clean": _acc(clean_u), "ALL": _acc(all_u),
                                "per_attack": {k: _acc(v.cpu() & clean_u) for k, v in und.items()},
                                "wall_s": t_und},
                 "defended": {"defense": d.config(), "clean": _acc(clean_d),
                              "worst": _acc(out.correct),
                              "per_attack": {m.name: {**_acc(m.correct), "budget": m.config["budget"],
                                                      "wall_s": m.wall_s}
                                             for m in out.extra["members"]},
                              "config": {k: v for k, v in out.config.items() if k != "members"},
                              "wall_s": t_ad},
                 "paired": {"worst_vs_undefended_ALL": paired_comparison(
                     out.correct.int().tolist(), all_u.int().tolist()).to_dict(),
                     **{f"{m.name}_vs_undefended_ALL": paired_comparison(
                         m.correct.int().tolist(), all_u.int().tolist()).to_dict()
                        for m in out.extra["members"]}},
                 "per_example": {"undefended_ALL": all_u.int().tolist(),
                                 "defended_worst": out.correct.int().tolist(),
                                 **{m.name: m.correct.int().tolist()
                                    for m in out.extra["members"]}}}
        report["models"][name] = entry
        print(json.dumps({name: {"und_ALL": entry["undefended"]["ALL"]["acc"],
                                 "def_worst": entry["defended"]["worst"]["acc"],
                                 "per_attack": {k: v["acc"] for k, v in
                                                entry["defended"]["per_attack"].items()},
                                 "wall_und": round(t_und), "wall_adaptive": round(t_ad)}}),
              flush=True)
        with open(a.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()

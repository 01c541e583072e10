"""Interleaved A/B measurement of the grid's stacking lever (issue 16, goal 1): the (i, Ka,
lambda) grid with every setting as its own batch (``grid_attack(stack=False)``) against the
settings sharing i stacked into one batch (``stack=True``), on the same images and seeds.

    OMP_NUM_THREADS=1 python -m benchmark.bench_grid_stack --grid demo --n 32 --sides off,i,all
    OMP_NUM_THREADS=1 python -m benchmark.bench_grid_stack --grid full --groups 1,4,8
    OMP_NUM_THREADS=1 python -m benchmark.bench_grid_stack --sides i,i+skip --groups 4

``--grid demo``: the demo config's 32 settings (Ka in {1, 5}, lambda in {0.5, 1}, i in 1..N);
``full``: the paper's 144. ``--groups`` restricts to some i (each i-group is what one stack
holds, so a subset of groups measures the full grid's per-group ratio in less time).
``--sides off,i,all``: the variants, the first the baseline (``off``: per-setting loop;
``i``: stacks of settings sharing i (``stack='i'``); ``all``: stacks across i (the
default ``stack=True``); ``+skip``: also skipping the
solver's unused f(z[i])).

Each round runs every side back to back (order rotated each round, so drift of the shared
machine's load hits every side) and checks that each gives the baseline's records
(per-setting matrix, worst-case correctness, x_adv, f-evals per example; f-evals differ by
design with ``+skip``). Printed and written (``--out``): per-round wall times and ratios
baseline / side, their median and the ratio of total times, f_theta evaluations per example
(no graph / with graph / f-equivalents = nograd + 3 x grad) of every side, the peak RSS.
Only ratios are meaningful on a loaded machine, never the absolute seconds.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import time

import torch

import model_zoo
from attacks.evaluation import grid_attack
from attacks.surrogates import grid_settings
from benchmark.data import load_dataset, subset


# the compared variants (grid_attack options)
SIDES = {"off": {"stack": False}, "i": {"stack": "i"}, "all": {"stack": True},
         "i+skip": {"stack": "i", "skip_last_f": True},
         "all+skip": {"stack": True, "skip_last_f": True}}


def _settings(model, grid: str, groups):
    kas, lams = ([1, 5], (0.5, 1.0)) if grid == "demo" else (range(1, 10), (0.5, 1.0))
    s = grid_settings(model.solver.max_iter, kas=kas, lams=lams)
    return [x for x in s if groups is None or x.i in groups]


def _same(a, b) -> dict:
    return {"per_setting_equal": bool(torch.equal(a.per_setting, b.per_setting)),
            "worst_correct_equal": bool(torch.equal(a.worst.correct, b.worst.correct)),
            "x_adv_max_abs_diff": float((a.worst.x_adv - b.worst.x_adv).abs().max()),
            "nfev_max_abs_diff": float((a.worst.nfev - b.worst.nfev).abs().max())}


def _cost(g) -> dict:
    w = g.worst
    return {"nograd": float(w.nfev_nograd.mean()), "grad": float(w.nfev_grad.mean()),
            "f_equivalents": float(w.f_equivalents.mean())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deq_tiny_fmnist_trades")
    ap.add_argument("--n", type=int, default=32, help="Fashion-MNIST test images (seed 0)")
    ap.add_argument("--grid", choices=("demo", "full"), default="demo")
    ap.add_argument("--groups", default=None, help="comma-separated i values (default: all)")
    ap.add_argument("--mode", choices=("full", "naive"), default="full")
    ap.add_argument("--sides", default="off,i,all",
                    help="comma-separated variants, the first is the baseline A: " + ", ".join(SIDES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=64, help="as the runner passes")
    ap.add_argument("--stack-rows", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    groups = None if a.groups is None else {int(v) for v in a.groups.split(",")}
    model = model_zoo.load(a.model)
    ds = subset(load_dataset("fashion_mnist", "test"), a.n, seed=0)
    x, y = ds.images, ds.labels
    settings = _settings(model, a.grid, groups)
    extra = {} if a.stack_rows is None else {"stack_rows": a.stack_rows}
    names = a.sides.split(",")
    bad = [v for v in names if v not in SIDES]
    if bad or len(names) < 2:
        raise SystemExit(f"--sides: two or more of {', '.join(SIDES)}, got {a.sides!r}")

    def run(kw):
        t0 = time.perf_counter()
        g = grid_attack(model, model.defense, x, y, a.eps, a.eps / 4, a.steps, settings=settings,
                        mode=a.mode, seed=0, batch_size=a.batch_size, **extra, **kw)
        return g, time.perf_counter() - t0

    rounds = []
    for r in range(a.rounds):
        # rotate the order every round, so drift of the shared machine's load hits every side
        order = list(range(len(names)))
        order = order[r % len(order):] + order[:r % len(order)]
        res = {k: run(SIDES[names[k]]) for k in order}
        g0, t0 = res[0]
        row = {"round": r, "order": [names[k] for k in order],
               "wall_s": {names[k]: round(res[k][1], 2) for k in range(len(names))},
               "ratio_vs_" + names[0]: {names[k]: round(t0 / res[k][1], 4)
                                         for k in range(1, len(names))},
               "same_records": {names[k]: _same(g0, res[k][0]) for k in range(1, len(names))}}
        rounds.append(row)
        print(json.dumps(row), flush=True)
    key = "ratio_vs_" + names[0]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = None
    out = {"model": a.model, "n": a.n, "grid": a.grid, "groups": sorted(groups) if groups else "all",
           "settings": len(settings), "mode": a.mode, "sides": {v: SIDES[v] for v in names},
           "steps": a.steps, "eps": a.eps, "batch_size": a.batch_size, **extra,
           "threads": torch.get_num_threads(), "rounds": rounds,
           "median_" + key: {v: statistics.median(r[key][v] for r in rounds)
                             for v in names[1:]},
           "total_" + key: {v: round(sum(r["wall_s"][names[0]] for r in rounds)
                                     / sum(r["wall_s"][v] for r in rounds), 4)
                            for v in names[1:]},
           "f_evals_per_example": {names[k]: _cost(res[k][0]) for k in range(len(names))},
           "worst_case_accuracy": g0.worst_case_accuracy,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "git_commit": commit, "torch": torch.__version__}
    print(json.dumps({k: v for k, v in out.items() if k != "rounds"}, indent=1))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()

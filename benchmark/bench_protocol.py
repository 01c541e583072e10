"""``deqbench bench protocol CONFIG --n N``: what a run config's protocol costs, per example and
attack, and -- with ``--baseline REV`` -- how much cheaper it is than the code at git revision
REV, measured interleaved in one invocation.

Each side runs ``deqbench evaluate`` on the config restricted to its first ``N`` examples (the
same seeded subset: ``data.n = N``; ``shard_size`` capped at N) into a fresh temporary folder,
as a subprocess whose wall time (imports included, the same for both sides) is taken; the
baseline runs from a git worktree of REV (``git worktree add --detach``; its own code, the
same interpreter and packages). Rounds alternate which side goes first (A B, B A, ...), so a
drift of the machine's speed falls on both; the ratio is the median of the per-round ratios.

From each side's results database it reports:
* wall time of the whole run and the sum of the work units' wall times per attack;
* f_theta evaluations per example and attack (the records' ``nfev_nograd`` = forward without
  a graph, ``nfev_grad`` = with a graph, i.e. the evaluations a backward goes through), summed
  over the run's entries;
* the per-example worst case ALL of every entry (each attack's ``summary`` from the current
  code's registry, read from both databases) and every example where the two sides differ.

Why our own harness rather than pytest-benchmark / asv: the unit is a whole CLI run of another
git revision in a subprocess, and the counts come from the results databases.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def restricted_config(raw: dict, n: int, output: Path, attacks=None) -> dict:
    """The run config ``raw`` on its first ``n`` examples, writing under ``output``; with
    ``attacks`` only those sections of ``attacks:``."""
    cfg = json.loads(json.dumps(raw))
    cfg["data"] = {**cfg.get("data", {}), "n": int(n)}
    cfg["shard_size"] = min(int(cfg.get("shard_size", n)), int(n))
    cfg["output"] = str(output)
    if attacks is not None:
        missing = [a for a in attacks if a not in cfg.get("attacks", {})]
        if missing:
            raise ValueError(f"--attacks: the config has no attacks.{missing[0]} section "
                             f"(it has {sorted(cfg.get('attacks', {}))})")
        cfg["attacks"] = {k: v for k, v in cfg["attacks"].items() if k in attacks}
    return cfg


def baseline_tree(rev: str) -> Path:
    """A git worktree of ``rev`` (created once under the system's temp folder)."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO,
                         capture_output=True, text=True)
    if sha.returncode != 0:
        raise ValueError(f"--baseline: {rev!r} is not a commit of {REPO}")
    sha = sha.stdout.strip()
    tree = Path(tempfile.gettempdir()) / f"deqbench_baseline_{sha[:12]}"
    if not (tree / "benchmark" / "cli.py").is_file():
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, check=False)
        subprocess.run(["git", "worktree", "add", "--detach", "--force", str(tree), sha],
                       cwd=REPO, check=True, capture_output=True)
    return tree


def run_side(tree: Path, config: Path, extra_args=(), threads=None) -> float:
    """``deqbench evaluate config`` with the code of ``tree``; returns its wall seconds."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
              "DEQBENCH_WORKERS"):
        env.pop(k, None)
    # the tree's own packages first (the editable install points at this checkout)
    env["PYTHONPATH"] = str(tree)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "benchmark.cli", "evaluate", str(config), "--quiet",
           *extra_args]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} (in {tree}) failed with exit code "
                           f"{out.returncode}:\n{out.stderr[-3000:]}")
    return wall


def measure_db(path: Path) -> dict:
    """Costs and per-example ALL of one finished run (read with the current code)."""
    import pandas as pd

    from benchmark.results_db import ResultsDB
    from benchmark.suite import get_attack, list_attacks
    with ResultsDB(path, create=False) as db:
        df = db.records_frame()
        units = db.units_frame()
    n = int(df[df.attack == "clean"].example.nunique())
    per_attack = {}
    for attack, g in df.groupby("attack"):
        per_attack[attack] = {
            "f_forward_per_example": float(g.nfev_nograd.fillna(0).sum()) / n,
            "f_backward_per_example": float(g.nfev_grad.fillna(0).sum()) / n,
            "unit_wall_s": float(units[units.attack == attack].wall_s.sum())}
    all_ = {}
    for (mk, dk), g in df.groupby(["model", "defense"], sort=True):
        clean = g[g.attack == "clean"].set_index("example").correct
        final = {}
        for key in list_attacks():
            s, _ = get_attack(key).summary(g, clean)
            if s is not None:
                final[key] = s
        allc = pd.concat(final, axis=1).reindex(clean.index).fillna(0).min(axis=1)
        all_[f"{mk}@{dk}"] = {int(k): int(v) for k, v in allc.items()}
    return {"n": n, "per_attack": per_attack, "ALL": all_,
            "unit_wall_s": float(units.wall_s.fillna(0).sum())}


def compare_all(a: dict, b: dict) -> dict:
    """Per entry: ALL on both sides and the examples where they differ."""
    out = {}
    for entry in sorted(set(a) | set(b)):
        ea, eb = a.get(entry, {}), b.get(entry, {})
        diff = sorted(k for k in set(ea) | set(eb) if ea.get(k) != eb.get(k))
        out[entry] = {"baseline": sum(ea.values()) / max(len(ea), 1),
                      "new": sum(eb.values()) / max(len(eb), 1), "n": len(eb),
                      "differ": [{"example": k, "baseline": ea.get(k), "new": eb.get(k)}
                                 for k in diff]}
    return out


def bench_protocol(config: str, n: int, baseline=None, rounds: int = 1, workers="auto",
                   attacks=None, keep=None, log=None) -> dict:
    if log is None:
        def log(msg):
            print(msg, flush=True)
    from benchmark.provenance import provenance
    from benchmark.run_config import from_dict, load_run_config, read_yaml
    load_run_config(config)                      # the config must be valid for this code
    raw = read_yaml(config)
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="deqbench_bench_protocol_"))
    work.mkdir(parents=True, exist_ok=True)
    if rounds < 1 or n < 1:
        raise ValueError("--n and --rounds must be integers >= 1")
    sides = [("new", REPO, ["--workers", str(workers)])]
    if baseline is not None:
        sides.insert(0, ("baseline", baseline_tree(baseline), []))
    walls = {name: [] for name, _, _ in sides}
    measured = {}
    for r in range(rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for name, tree, extra in order:
            out = work / f"{name}_r{r}"
            cfg = restricted_config(raw, n, out, attacks)
            from_dict(cfg, source=str(config))   # valid for this code (errors name the key)
            cpath = work / f"{name}_r{r}.yaml"
            cpath.write_text(yaml.safe_dump(cfg, sort_keys=False))
            log(f"round {r + 1}/{rounds}: {name} ({tree}) ...")
            wall = run_side(tree, cpath, extra)
            walls[name].append(wall)
            log(f"  {name}: {wall:.1f} s")
            if name not in measured:
                measured[name] = measure_db(out / cfg["name"] / "results.sqlite")
    res = {"config": str(config), "n": n, "rounds": rounds, "attacks": attacks,
           "workers_new": workers, "wall_s": walls,
           "median_wall_s": {k: statistics.median(v) for k, v in walls.items()},
           "sides": measured, "provenance": provenance("cpu"), "work_dir": str(work)}
    if baseline is not None:
        ratios = [b / a for b, a in zip(walls["baseline"], walls["new"])]
        res["baseline"] = baseline
        res["speedup_wall"] = {"per_round": ratios, "median": statistics.median(ratios)}
        fa = {k: v["f_forward_per_example"] + v["f_backward_per_example"]
              for k, v in measured["baseline"]["per_attack"].items()}
        fb = {k: v["f_forward_per_example"] + v["f_backward_per_example"]
              for k, v in measured["new"]["per_attack"].items()}
        res["f_evals_per_example"] = {
            "baseline": sum(fa.values()), "new": sum(fb.values()),
            "per_attack": {k: {"baseline": fa.get(k), "new": fb.get(k)}
                           for k in sorted(set(fa) | set(fb))}}
        res["ALL"] = compare_all(measured["baseline"]["ALL"], measured["new"]["ALL"])
        res["ALL_differences"] = sum(len(v["differ"]) for v in res["ALL"].values())
    return res


def format_report(res: dict) -> str:
    lines = [f"bench protocol: {res['config']} on n = {res['n']} examples, "
             f"{res['rounds']} round(s); new code with --workers {res['workers_new']}"]
    for side, walls in res["wall_s"].items():
        lines.append(f"  {side:8s} wall s per round: " + ", ".join(f"{w:.1f}" for w in walls))
    if "speedup_wall" in res:
        lines.append(f"  speed-up (baseline / new wall, median of rounds): "
                     f"{res['speedup_wall']['median']:.2f}x")
        f = res["f_evals_per_example"]
        lines.append(f"  f_theta evaluations per example: baseline {f['baseline']:.0f}, new "
                     f"{f['new']:.0f} ({f['baseline'] / max(f['new'], 1e-9):.2f}x)")
    lines.append("")
    lines.append("| attack | side | f fwd / ex | f bwd / ex | units wall s |")
    lines.append("|---|---|---:|---:|---:|")
    for side, m in res["sides"].items():
        for attack, v in sorted(m["per_attack"].items()):
            lines.append(f"| {attack} | {side} | {v['f_forward_per_example']:.0f} | "
                         f"{v['f_backward_per_example']:.0f} | {v['unit_wall_s']:.1f} |")
    if "ALL" in res:
        lines.append("")
        lines.append(f"ALL per entry (baseline -> new); examples that differ: "
                     f"{res['ALL_differences']}")
        for entry, v in res["ALL"].items():
            lines.append(f"  {entry}: {100 * v['baseline']:.2f} -> {100 * v['new']:.2f} % "
                         f"(n {v['n']})" + (f"; differ at {[d['example'] for d in v['differ']]}"
                                            if v["differ"] else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="deqbench bench protocol", description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--baseline", default=None, help="git revision to compare with")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--workers", default="auto")
    ap.add_argument("--attacks", default=None, help="comma-separated attacks sections to keep")
    ap.add_argument("--keep", default=None, help="folder for the runs (default: a temp folder)")
    ap.add_argument("--output", default=None, help="write the result as JSON")
    a = ap.parse_args(argv)
    res = bench_protocol(a.config, a.n, baseline=a.baseline, rounds=a.rounds, workers=a.workers,
                         attacks=a.attacks.split(",") if a.attacks else None, keep=a.keep)
    print(format_report(res))
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(json.dumps(res, indent=1, default=str))
        print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m benchmark.bench_alloc``: the allocator setting of ``model_zoo.runtime`` A/B.

malloc's settings hold for a whole process and cannot be undone inside it, so each side runs in
its own child process, alternately (tuned, default, tuned, ...), each child timing the plain
forward and Sec. 3.2 at (Tf, R) = (2, 10) on the same seeded batch. Reported per side: median
wall time, kernel (sys) time and minor page faults per forward, and the speed-up tuned /
default of each pair of neighbouring children. The numbers themselves are the same on both
sides (checked: the children's logits are compared bitwise).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def _child(model: str, batch: int, repeats: int, kernels: str, threads: int,
           inputs: str = "test") -> dict:
    from model_zoo.runtime import allocator_state, tune_allocator
    tune_allocator()
    import hashlib
    import resource
    import time

    import torch

    import model_zoo
    from benchmark.bench_forward import bench_model_and_inputs, forward_counted
    from model_zoo import EntropyReduction, FinalState
    torch.set_num_threads(threads)
    m, x, _ = bench_model_and_inputs(model, batch, inputs=inputs)
    eps = model_zoo.get_entry(model).eps or 8 / 255
    out = {"allocator": allocator_state()}
    for name, d in (("plain", FinalState()),
                    ("sec32", EntropyReduction(r=10, tf=2, eps=eps, beta=eps / 4, kernels=kernels))):
        rec, _ = forward_counted(m, x, d)  # warm-up
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(repeats):
            rec, _ = forward_counted(m, x, d)
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        out[name] = {"wall_s": (t1 - t0) / repeats, "sys_s": (r1.ru_stime - r0.ru_stime) / repeats,
                     "minor_faults": (r1.ru_minflt - r0.ru_minflt) / repeats,
                     "logits_sha256": hashlib.sha256(rec.logits.numpy().tobytes()).hexdigest()}
    return out


def bench_alloc(model: str = "deq_tiny_fmnist_trades", batch: int = 64, pairs: int = 3,
                repeats: int = 3, kernels: str = "fast", threads: int = 1,
                inputs: str = "test") -> dict:
    runs = {"tuned": [], "default": []}
    for _ in range(pairs):
        for side in ("tuned", "default"):
            env = dict(os.environ, DEQBENCH_MALLOC="tuned" if side == "tuned" else "default")
            cmd = [sys.executable, "-m", "benchmark.bench_alloc", "--child", "--model", model,
                   "--batch-size", str(batch), "--repeats", str(repeats), "--kernels", kernels,
                   "--threads", str(threads), "--inputs", inputs]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[side].append(json.loads(res.stdout.strip().splitlines()[-1]))
    summary = {}
    for name in ("plain", "sec32"):
        row = {}
        for side in runs:
            for k in ("wall_s", "sys_s", "minor_faults"):
                row[f"{side}_{k}"] = statistics.median(r[name][k] for r in runs[side])
        row["speedup_tuned"] = statistics.median(
            d[name]["wall_s"] / t[name]["wall_s"] for t, d in zip(runs["tuned"], runs["default"]))
        row["same_logits"] = len({r[name]["logits_sha256"] for s in runs for r in runs[s]}) == 1
        summary[name] = row
    summary["ratio_sec32_vs_plain"] = {
        side: statistics.median(r["sec32"]["wall_s"] / r["plain"]["wall_s"] for r in runs[side])
        for side in runs}
    summary["tuned_applied"] = all(r["allocator"]["tuned"] for r in runs["tuned"])
    return {"model": model, "batch_size": batch, "pairs": pairs, "repeats": repeats,
            "kernels": kernels, "threads": threads, "inputs": inputs, "summary": summary,
            "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.bench_alloc")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="deq_tiny_fmnist_trades")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kernels", default="fast")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--inputs", choices=["test", "random"], default="test",
                    help="the entry's test images or seeded uniform noise (bench_forward's)")
    ap.add_argument("--output", default=None)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.model, a.batch_size, a.repeats, a.kernels, a.threads, a.inputs)))
        return 0
    if min(a.batch_size, a.pairs, a.repeats, a.threads) < 1:
        ap.error("--batch-size, --pairs, --repeats and --threads must be >= 1")
    res = bench_alloc(a.model, a.batch_size, a.pairs, a.repeats, a.kernels, a.threads,
                      a.inputs)
    s = res["summary"]
    print(f"{a.model}, batch {a.batch_size} ({a.inputs} images), {a.threads} thread(s), "
          f"{a.pairs} pairs of child "
          f"processes, kernels={a.kernels}; tuned applied: {s['tuned_applied']}")
    print("| forward | wall tuned / default (s) | speed-up | sys tuned / default (s) | "
          "minor faults tuned / default | same logits |")
    print("|---|---|---|---|---|---|")
    for name in ("plain", "sec32"):
        r = s[name]
        print(f"| {name} | {r['tuned_wall_s']:.3f} / {r['default_wall_s']:.3f} | "
              f"{r['speedup_tuned']:.3f}x | {r['tuned_sys_s']:.3f} / {r['default_sys_s']:.3f} | "
              f"{r['tuned_minor_faults']:.0f} / {r['default_minor_faults']:.0f} | {r['same_logits']} |")
    rr = s["ratio_sec32_vs_plain"]
    print(f"Sec. 3.2 / plain: tuned {rr['tuned']:.2f}x, default {rr['default']:.2f}x")
    if a.output:
        from pathlib import Path
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(json.dumps(res, indent=2))
        print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

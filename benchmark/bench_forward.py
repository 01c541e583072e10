"""``deqbench bench forward``: cost of the plain forward vs the Sec. 3.2 defense (paper Table 10).

Throughput is measured as ratios taken in one run: the plain forward is timed again before
every defended configuration (interleaved), and each ratio uses the plain timing next to it, so
slow drift of a noisy machine cancels. f_theta evaluations per sample are counted exactly.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
from tqdm import tqdm

import model_zoo
from model_zoo import EntropyReduction, FinalState


def _time_forward(model, x, defense, repeats: int):
    best, rec = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():  # inference, as deployed; Sec. 3.2 enables grad where it needs it
            rec = model.run(x, defense=defense)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        best = min(best, time.perf_counter() - t0)
    return best, rec


def bench_forward(model_name: str, batch_size: int = 32, tfs: Sequence[int] = (1, 2, 4, 8),
                  rs: Sequence[int] = (0, 1, 5, 10, 20), preset: str = "reference",
                  device: str = "cpu", repeats: int = 2, seed: int = 0, checkpoint=None,
                  eps: float | None = None, beta: float | None = None, progress: bool = True):
    """Rows of dicts: defense, Tf, R, seconds per batch, samples/s, f-evals per sample (no grad
    / with grad), and the time ratio defended / plain measured beside it."""
    torch.manual_seed(seed)
    if checkpoint:
        model = model_zoo.load(model_name, checkpoint=checkpoint, device=device)
    else:
        model = model_zoo.create(model_name).to(device).eval()
    entry = model_zoo.get_entry(model_name)
    c, h, w = entry.input_shape
    x = torch.rand(batch_size, c, h, w, generator=torch.Generator().manual_seed(seed)).to(device)
    eps = eps if eps is not None else (entry.eps or 8 / 255)
    beta = beta if beta is not None else eps / 4
    plain = FinalState()
    _time_forward(model, x, plain, 1)  # warm-up (allocator, lazy init)
    rows = []
    grid = [(tf, r) for tf in tfs for r in rs]
    for tf, r in tqdm(grid, desc="bench forward", disable=not progress):
        t_plain, rec_p = _time_forward(model, x, plain, repeats)
        d = EntropyReduction(beta=beta, r=r, tf=tf, eps=eps, preset=preset)
        t_def, rec_d = _time_forward(model, x, d, repeats)
        rows.append({"defense": "plain", "tf": tf, "r": r, "s_per_batch": t_plain,
                     "samples_per_s": batch_size / t_plain,
                     "f_nograd": float(rec_p.nfev_nograd.float().mean()),
                     "f_grad": float(rec_p.nfev_grad.float().mean()), "ratio": 1.0})
        rows.append({"defense": f"entropy_reduction[{preset}]", "tf": tf, "r": r,
                     "s_per_batch": t_def, "samples_per_s": batch_size / t_def,
                     "f_nograd": float(rec_d.nfev_nograd.float().mean()),
                     "f_grad": float(rec_d.nfev_grad.float().mean()),
                     "ratio": t_def / t_plain})
    return rows


def format_table(rows) -> str:
    lines = ["| defense | Tf | R | samples/s | f evals/sample (no grad + grad) | time ratio vs plain |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["defense"] == "plain":
            continue
        lines.append(f"| {r['defense']} | {r['tf']} | {r['r']} | {r['samples_per_s']:.1f} | "
                     f"{r['f_nograd']:.0f} + {r['f_grad']:.0f} | {r['ratio']:.2f}x |")
    plain = [r for r in rows if r["defense"] == "plain"]
    if plain:
        sps = sorted(p["samples_per_s"] for p in plain)
        lines.append(f"\nplain forward (FinalState, interleaved): median {sps[len(sps)//2]:.1f} samples/s, "
                     f"{plain[0]['f_nograd']:.0f} + {plain[0]['f_grad']:.0f} f evals/sample")
    return "\n".join(lines)

"""``deqbench bench train``: training throughput of PGD-AT and TRADES with and without Sec. 3.3
random intermediate states (the paper's Table 9), as ratios measured in one run.

The four variants are timed in interleaved rounds on the same batches (one optimizer step per
variant per round, the order reversed every other round), so slow drift of a noisy machine hits
all of them alike; f_theta evaluations per training sample are counted exactly. Samples/s are
reported per variant, and the Sec. 3.3 speed-up both as the ratio of total throughputs and as
the median of the per-round ratios.
"""
from __future__ import annotations

import copy
import math
import time

import torch
from tqdm import tqdm

import model_zoo
from model_zoo.train_config import TrainConfig
from model_zoo.training import Trainer

VARIANTS = [("pgd_at", None), ("pgd_at", "reference"), ("trades", None), ("trades", "reference")]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def bench_train(cfg: TrainConfig, rounds: int = 3, batch_size=None, device="cpu", seed: int = 0,
                progress: bool = True, variants=None, autocast=None) -> list:
    """One row per variant (``VARIANTS`` by default: (method, random_states) pairs): samples/s,
    f_theta evaluations per training sample, seconds per optimizer step, and the Sec. 3.3
    speed-up over the same method without it, both as the ratio of total throughputs
    (``speedup_vs_base``) and as the median over rounds of the per-round time ratio
    (``speedup_median``: each round times base and Sec. 3.3 steps back to back on the same
    batch, so the median of these ratios is robust to a loaded machine).

    ``autocast``: None (fp32) or 'bf16' / 'fp16' -- every train step runs under
    ``torch.autocast(device_type, dtype)`` (forward, attack and backward; no grad scaler: meant
    for bf16, whose range is fp32's). Batches are random images of the model's input shape
    (B, C, H, W) in [0, 1] with random labels; the Jacobian term is off in every variant."""
    from model_zoo.scoring import resolve_device
    device = resolve_device(str(device))
    dev = torch.device(device)
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be one of {sorted(AUTOCAST_DTYPES)} or None, got {autocast!r}")
    variants = list(variants) if variants is not None else VARIANTS
    bs = batch_size or cfg.train.batch_size
    entry = model_zoo.get_entry(cfg.model)
    c, h, w = entry.input_shape
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.rand(bs, c, h, w, generator=g), torch.randint(0, entry.num_classes, (bs,), generator=g))
               for _ in range(rounds + 1)]

    def step(v, r):
        x, y = batches[r]
        if autocast is None:
            return v["trainer"].train_step(x, y, 0, r)
        with torch.autocast(dev.type, dtype=AUTOCAST_DTYPES[autocast]):
            return v["trainer"].train_step(x, y, 0, r)

    trainers = []
    for method, rs in variants:
        d = copy.deepcopy(cfg.to_dict())
        d["train"].update(method=method, random_states=rs, pretrain_steps=0, batch_size=bs,
                          init_from=None)
        d["train"]["jacobian"]["weight"] = 0.0
        vcfg = TrainConfig.from_dict(d)
        torch.manual_seed(seed)
        overrides = dict(vcfg.model_overrides)
        if vcfg.solver:
            overrides["solver"] = {"name": "broyden", **vcfg.solver}
        model = model_zoo.create(vcfg.model, **overrides).to(dev)
        tr = Trainer(vcfg, model, lambda e: batches, batches[0][0][:1], batches[0][1][:1],
                     "/tmp/deqbench-bench-train", device=dev, progress=False)
        v = {"method": method, "random_states": rs, "trainer": tr, "model": model,
             "time": 0.0, "samples": 0, "f": 0, "f_grad": 0, "round_s": [], "loss": []}
        step(v, 0)  # warm-up (allocator, cuDNN autotuning, lazy init)
        trainers.append(v)
    for r in tqdm(range(1, rounds + 1), desc="bench train", disable=not progress):
        # A B C D, then D C B A: a load that drifts linearly within two rounds hits every
        # variant alike (ABBA order)
        for v in (trainers if r % 2 else trainers[::-1]):
            f0, g0 = v["model"].f_evals.total, v["model"].f_evals.grad
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            out = step(v, r)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
            v["time"] += dt
            v["round_s"].append(dt)
            v["samples"] += bs
            v["f"] += v["model"].f_evals.total - f0
            v["f_grad"] += v["model"].f_evals.grad - g0
            v["loss"].append(out["loss"] / max(out["n"], 1))
    rows = []
    for v in trainers:
        rows.append({"method": v["method"], "sec33": v["random_states"] or "-",
                     "samples_per_s": v["samples"] / v["time"],
                     "f_evals_per_sample": v["f"] / v["samples"],
                     "f_grad_per_sample": v["f_grad"] / v["samples"],
                     # F-equivalents: an f with a graph costs a forward + a backward (~2 more),
                     # as in the grid's F; Sec. 3.3 saves only f evaluations without a graph
                     "F_per_sample": (v["f"] + 2 * v["f_grad"]) / v["samples"],
                     "s_per_step": v["time"] / rounds,
                     "round_s": v["round_s"], "batch_size": bs, "rounds": rounds,
                     "autocast": autocast or "fp32", "device": device,
                     "loss_finite": all(math.isfinite(l) for l in v["loss"])})
    for i, row in enumerate(rows):
        if row["sec33"] == "-":
            row["speedup_vs_base"] = row["speedup_median"] = 1.0
            row["f_ratio_vs_base"] = row["F_ratio_vs_base"] = 1.0
            continue
        base = next((b for b in rows if b["method"] == row["method"] and b["sec33"] == "-"), None)
        if base is None:
            row["speedup_vs_base"] = row["speedup_median"] = row["f_ratio_vs_base"] = None
            row["F_ratio_vs_base"] = None
            continue
        row["speedup_vs_base"] = row["samples_per_s"] / base["samples_per_s"]
        row["speedup_median"] = _median([tb / tf for tb, tf in zip(base["round_s"], row["round_s"])])
        row["f_ratio_vs_base"] = base["f_evals_per_sample"] / max(row["f_evals_per_sample"], 1e-12)
        row["F_ratio_vs_base"] = base["F_per_sample"] / max(row["F_per_sample"], 1e-12)
    return rows


def format_table(rows) -> str:
    """Markdown table of :func:`bench_train` rows (the speed-ups are Sec. 3.3 over the same
    method without it: ratio of total samples/s, median of the per-round ratios, f-eval ratio)."""
    def x(v):
        return "-" if v is None else f"{v:.2f}x"
    out = ["| method | Sec. 3.3 | samples/s | f evals / sample (with graph) | speed-up vs base | "
           "median per-round speed-up | f-eval ratio | F-equivalent ratio |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['sec33']} | {r['samples_per_s']:.1f} | "
                   f"{r['f_evals_per_sample']:.1f} ({r.get('f_grad_per_sample', 0):.1f}) | "
                   f"{x(r['speedup_vs_base'])} | "
                   f"{x(r.get('speedup_median'))} | {x(r.get('f_ratio_vs_base'))} | "
                   f"{x(r.get('F_ratio_vs_base'))} |")
    return "\n".join(out)

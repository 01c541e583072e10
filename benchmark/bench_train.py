"""``deqbench bench train``: training throughput of PGD-AT and TRADES with and without Sec. 3.3
random intermediate states (the paper's Table 9), as ratios measured in one run.

The four variants are timed in interleaved rounds on the same batches (one optimizer step per
variant per round), so slow drift of a noisy machine hits all of them alike; f_theta evaluations
per training sample are counted exactly.
"""
from __future__ import annotations

import copy
import time

import torch
from tqdm import tqdm

import model_zoo
from model_zoo.train_config import TrainConfig
from model_zoo.training import Trainer

VARIANTS = [("pgd_at", None), ("pgd_at", "reference"), ("trades", None), ("trades", "reference")]


def bench_train(cfg: TrainConfig, rounds: int = 3, batch_size=None, device="cpu", seed: int = 0,
                progress: bool = True) -> list:
    bs = batch_size or cfg.train.batch_size
    entry = model_zoo.get_entry(cfg.model)
    c, h, w = entry.input_shape
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.rand(bs, c, h, w, generator=g), torch.randint(0, entry.num_classes, (bs,), generator=g))
               for _ in range(rounds + 1)]
    trainers = []
    for method, rs in VARIANTS:
        d = copy.deepcopy(cfg.to_dict())
        d["train"].update(method=method, random_states=rs, pretrain_steps=0, batch_size=bs,
                          init_from=None)
        d["train"]["jacobian"]["weight"] = 0.0
        vcfg = TrainConfig.from_dict(d)
        torch.manual_seed(seed)
        overrides = dict(vcfg.model_overrides)
        if vcfg.solver:
            overrides["solver"] = {"name": "broyden", **vcfg.solver}
        model = model_zoo.create(vcfg.model, **overrides).to(device)
        tr = Trainer(vcfg, model, lambda e: batches, batches[0][0][:1], batches[0][1][:1],
                     "/tmp/deqbench-bench-train", device=device, progress=False)
        tr.train_step(*batches[0], 0, 0)  # warm-up
        trainers.append({"method": method, "random_states": rs, "trainer": tr, "model": model,
                         "time": 0.0, "samples": 0, "f": 0})
    for r in tqdm(range(1, rounds + 1), desc="bench train", disable=not progress):
        for v in trainers:
            x, y = batches[r]
            f0 = v["model"].f_evals.total
            t0 = time.perf_counter()
            v["trainer"].train_step(x, y, 0, r)
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
            v["time"] += time.perf_counter() - t0
            v["samples"] += len(x)
            v["f"] += v["model"].f_evals.total - f0
    rows = []
    for v in trainers:
        rows.append({"method": v["method"], "sec33": v["random_states"] or "-",
                     "samples_per_s": v["samples"] / v["time"],
                     "f_evals_per_sample": v["f"] / v["samples"], "s_per_step": v["time"] / rounds})
    for base, fast in ((0, 1), (2, 3)):
        rows[fast]["speedup_vs_base"] = rows[fast]["samples_per_s"] / rows[base]["samples_per_s"]
        rows[base]["speedup_vs_base"] = 1.0
    return rows


def format_table(rows) -> str:
    out = ["| method | Sec. 3.3 | samples/s | f evals / sample | speed-up vs base |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['sec33']} | {r['samples_per_s']:.1f} | "
                   f"{r['f_evals_per_sample']:.1f} | {r['speedup_vs_base']:.2f}x |")
    return "\n".join(out)

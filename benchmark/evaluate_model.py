"""Clean evaluation of one model on a fixed test subset: the per-example record and the
aggregates derived from it (accuracy of the reported forward and of every state z[t], entropies,
residuals, f_theta evaluations)."""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

import model_zoo
from benchmark.data import load_dataset, subset
from benchmark.provenance import provenance


def evaluate_clean(model_name: str, checkpoint=None, defense=None, dataset=None, n: int = 500,
                   batch_size: int = 100, device: str = "cpu", seed: int = 0, root=None, download: bool = False,
                   allow_untrained: bool = False, progress: bool = True) -> dict:
    from benchmark.attack_run import load_for_attack
    entry, model = load_for_attack(model_name, checkpoint, defense, device, allow_untrained, seed)
    ds = subset(load_dataset(dataset or entry.dataset, "test", root=root, download=download), n, seed=seed)
    per_example = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in tqdm(range(0, len(ds), batch_size), desc=f"eval {model_name}", disable=not progress):
            xb = ds.images[s:s + batch_size].to(device)
            yb = ds.labels[s:s + batch_size].to(device)
            if getattr(model, "is_deq", False):
                rec = model.run(xb, per_state=True)
                st_pred = rec.state_logits.argmax(-1)  # (N, B)
                ent = rec.entropies
                for k in range(len(yb)):
                    per_example.append({
                        "index": int(ds.indices[s + k]), "label": int(yb[k]),
                        "pred": int(rec.predictions[k]), "correct": bool(rec.predictions[k] == yb[k]),
                        "state_correct": (st_pred[:, k] == yb[k]).tolist(),
                        "state_entropy": ent[:, k].tolist(),
                        "rel_residual": rec.trajectory.rel_trace[k].tolist(),
                        "nfev": int(rec.nfev[k])})
            else:
                pred = model(xb).argmax(-1)
                for k in range(len(yb)):
                    per_example.append({"index": int(ds.indices[s + k]), "label": int(yb[k]),
                                        "pred": int(pred[k]), "correct": bool(pred[k] == yb[k])})
    wall = time.perf_counter() - t0
    n_ex = len(per_example)
    summary = {"clean_acc": sum(e["correct"] for e in per_example) / n_ex, "n": n_ex,
               "wall_s": wall, "samples_per_s": n_ex / wall}
    if per_example and "state_correct" in per_example[0]:
        N = len(per_example[0]["state_correct"])
        summary["state_acc"] = [sum(e["state_correct"][t] for e in per_example) / n_ex for t in range(N)]
        summary["mean_final_rel_residual"] = sum(e["rel_residual"][-1] for e in per_example) / n_ex
        summary["nfev_per_sample"] = sum(e["nfev"] for e in per_example) / n_ex
    return {"model": model_name, "entry": entry.to_dict(),
            "model_description": model.describe() if hasattr(model, "describe") else {},
            "checkpoint": str(checkpoint) if checkpoint else entry.checkpoint,
            "trained": not (checkpoint is None and entry.checkpoint is None),
            "dataset": {"name": ds.info.name, "split": "test", **ds.meta},
            "seed": seed, "provenance": provenance(device), "summary": summary,
            "per_example": per_example}

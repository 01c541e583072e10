"""Clean evaluation of one model on a fixed test subset: the per-example record and the
aggregates derived from it (accuracy of the reported forward and of every state z[t], entropies,
residuals, f_theta evaluations).

Every example is scored by :func:`model_zoo.scoring.score_logits`: a non-finite logit makes it
wrong (``status: nonfinite``, ``pred: -1``), never class 0; a DEQ solve whose final relative
residual exceeds ``residual_threshold`` is ``status: unconverged``."""
from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from benchmark.data import load_dataset, subset
from benchmark.provenance import provenance
from model_zoo.scoring import (UNCONVERGED_REL_RESIDUAL, finite_rows, predict, record_status,
                               resolve_device, score_logits)


def _num(v: float):
    """A float for JSON: non-finite values become None (their record's status says why)."""
    v = float(v)
    return v if math.isfinite(v) else None


def reliability_counts(per_example: list, threshold: float) -> dict:
    """Counts behind the console warning and the leaderboard flag, from per-example records
    that carry a ``status``."""
    n = max(len(per_example), 1)
    nonfinite = sum(e.get("status") == "nonfinite" for e in per_example)
    unconv = sum(e.get("status") == "unconverged" for e in per_example)
    return {"nonfinite": nonfinite, "unconverged": unconv, "unconverged_share": unconv / n,
            "residual_threshold": threshold}


def evaluate_clean(model_name: str, checkpoint=None, defense=None, dataset=None, n: int = 500,
                   batch_size: int = 100, device: str = "auto", seed: int = 0, root=None,
                   download: bool = False, allow_untrained: bool = False, progress: bool = True,
                   first_n: bool = False, sha256=None,
                   residual_threshold: float = UNCONVERGED_REL_RESIDUAL) -> dict:
    from benchmark.attack_run import checkpoint_identity, load_for_attack
    device = resolve_device(device)
    entry, model = load_for_attack(model_name, checkpoint, defense, device, allow_untrained, seed,
                                   sha256=sha256)
    ds = subset(load_dataset(dataset or entry.dataset, "test", root=root, download=download), n,
                seed=seed, first_n=first_n)
    per_example = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in tqdm(range(0, len(ds), batch_size), desc=f"eval {model_name}", disable=not progress):
            xb = ds.images[s:s + batch_size].to(device)
            yb = ds.labels[s:s + batch_size].to(device)
            if getattr(model, "is_deq", False):
                rec = model.run(xb, per_state=True)
                correct, nonfinite = score_logits(rec.logits, yb)
                pred = predict(rec.logits)
                sl = rec.state_logits  # (N, B, C); a state with a non-finite logit is wrong
                st_correct = (sl.argmax(-1) == yb[None]) & torch.isfinite(sl).all(-1)
                ent = rec.entropies
                states_finite = torch.stack([finite_rows(z) for z in rec.trajectory.states])
                res = rec.trajectory.rel_trace
                for k in range(len(yb)):
                    status, final = record_status(residuals=res[k].tolist(),
                                                  threshold=residual_threshold,
                                                  nonfinite=bool(nonfinite[k]))
                    per_example.append({
                        "index": int(ds.indices[s + k]), "label": int(yb[k]),
                        "pred": int(pred[k]), "correct": bool(correct[k]), "status": status,
                        "final_rel_residual": None if final is None else _num(final),
                        "nonfinite_logits": bool(nonfinite[k]),
                        "nonfinite_states": not bool(states_finite[:, k].all()),
                        "state_correct": st_correct[:, k].tolist(),
                        "state_entropy": [_num(v) for v in ent[:, k].tolist()],
                        "rel_residual": [_num(v) for v in res[k].tolist()],
                        "nfev": int(rec.nfev[k])})
            else:
                logits = model(xb)
                correct, nonfinite = score_logits(logits, yb)
                pred = predict(logits)
                for k in range(len(yb)):
                    per_example.append({"index": int(ds.indices[s + k]), "label": int(yb[k]),
                                        "pred": int(pred[k]), "correct": bool(correct[k]),
                                        "status": "nonfinite" if nonfinite[k] else "ok",
                                        "nonfinite_logits": bool(nonfinite[k])})
    wall = time.perf_counter() - t0
    n_ex = len(per_example)
    summary = {"clean_acc": sum(e["correct"] for e in per_example) / n_ex, "n": n_ex,
               "wall_s": wall, "samples_per_s": n_ex / wall,
               **reliability_counts(per_example, residual_threshold)}
    if per_example and "state_correct" in per_example[0]:
        N = len(per_example[0]["state_correct"])
        summary["state_acc"] = [sum(e["state_correct"][t] for e in per_example) / n_ex for t in range(N)]
        finals = [e["final_rel_residual"] for e in per_example if e["final_rel_residual"] is not None]
        # over the finite residuals only; how many were not finite is summary['nonfinite']
        summary["mean_final_rel_residual"] = sum(finals) / len(finals) if finals else None
        summary["max_final_rel_residual"] = max(finals) if finals else None
        summary["nfev_per_sample"] = sum(e["nfev"] for e in per_example) / n_ex
    return {"model": model_name, "entry": entry.to_dict(),
            "model_description": model.describe() if hasattr(model, "describe") else {},
            **checkpoint_identity(entry, checkpoint),
            "trained": not (checkpoint is None and entry.checkpoint is None),
            "dataset": {"name": ds.info.name, "split": "test", **ds.meta, "first_n": bool(first_n)},
            "seed": seed, "device": device, "provenance": provenance(device), "summary": summary,
            "per_example": per_example}

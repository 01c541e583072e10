"""``deqbench attack`` (one attack on one model/defense, per-example records) and
``deqbench bench grid`` (cost of the (i, Ka, lambda) grid: efficient vs the reference protocol)."""
from __future__ import annotations

import time
from typing import Optional

import torch

import model_zoo
from attacks.evaluation import (autoattack_attack, grid_attack, pgd_attack,
                                surrogate_agreement, torchattacks_attack)
from attacks.surrogates import JudgedModule, grid_settings, make_surrogate
from benchmark.data import load_dataset, subset
from benchmark.provenance import provenance
from model_zoo.scoring import resolve_device

# The reference protocol's arithmetic (spec section 7 item 14), per example, in F = one f_theta
# evaluation, backward counted as 2 F: attack 10 x (144 x 9 + 3 x 864) and evaluation
# 144 x 2 x (9 + 10).
REFERENCE_GRID_ATTACK_F = 10 * (144 * 9 + 3 * 864)
REFERENCE_GRID_EVAL_F = 144 * 2 * (9 + 10)

# The benchmark threat models (l_inf on [0, 1] images) when an entry does not name one.
DEFAULT_EPS = {"fashion_mnist": 0.1, "mnist": 0.3, "cifar10": 8 / 255}

ATTACKS = ("pgd", "grid", "autoattack", "adaptive", "torchattacks")


def _parse_ints(spec: str):
    out = []
    for part in str(spec).split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def checkpoint_identity(entry, checkpoint) -> dict:
    """What was evaluated: the checkpoint path and its SHA-256 (of the given file, else the
    zoo entry's registered one; None for untrained weights)."""
    if checkpoint:
        return {"checkpoint": str(checkpoint),
                "checkpoint_sha256": model_zoo.sha256_file(checkpoint)}
    return {"checkpoint": entry.checkpoint,
            "checkpoint_sha256": entry.sha256 if entry.checkpoint else None}


def load_for_attack(model_name: str, checkpoint=None, defense=None, device="auto",
                    allow_untrained: bool = False, seed: int = 0, sha256=None):
    """(zoo entry, model in eval mode on ``device``); ``sha256`` verifies a given checkpoint."""
    device = resolve_device(device)
    entry = model_zoo.get_entry(model_name)
    if checkpoint is None and entry.checkpoint is None \
            and entry.extra.get("weights") != "factory":  # user code that builds its weights
        if not allow_untrained:
            raise model_zoo.CheckpointError(
                f"{model_name!r} has no trained checkpoint; pass --checkpoint PATH or "
                "--allow-untrained to use random weights")
        torch.manual_seed(seed)
        model = model_zoo.create(model_name)
        if defense is not None and getattr(model, "is_deq", False):
            model.set_defense(model_zoo.make_defense(defense))
        return entry, model.to(device).eval()
    return entry, model_zoo.load(model_name, checkpoint=checkpoint, defense=defense, device=device,
                                 sha256=sha256)


def attack_subset(entry, n: int, seed: int, dataset=None, root=None, download=False, device="cpu",
                  first_n: bool = False):
    ds = subset(load_dataset(dataset or entry.dataset, "test", root=root, download=download), n,
                seed=seed, first_n=first_n)
    return ds, ds.images.to(device), ds.labels.to(device)


def run_attack(model_name: str, attack: str, checkpoint=None, defense=None, n: int = 100,
               seed: int = 0, eps: Optional[float] = None, alpha: Optional[float] = None,
               steps: int = 10, surrogate: Optional[str] = None, mode: str = "efficient",
               kas: str = "1-9", lams: str = "0.5,1", aa_attacks: str = "apgd-ce,apgd-t,fab-t,square",
               aa_budget: Optional[dict] = None, ta_kwargs: Optional[dict] = None,
               batch_size: int = 100, device: str = "auto", dataset=None, root=None,
               download: bool = False, allow_untrained: bool = False, progress: bool = True,
               first_n: bool = False, sha256=None) -> dict:
    name, _, sub = attack.partition(":")
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose one of {list(ATTACKS)} "
                         "('torchattacks:NAME' for a torchattacks class)")
    device = resolve_device(device)
    entry, model = load_for_attack(model_name, checkpoint, defense, device, allow_untrained, seed,
                                   sha256=sha256)
    eps = eps if eps is not None else (entry.eps or DEFAULT_EPS.get(dataset or entry.dataset))
    if eps is None:
        raise ValueError(f"{model_name!r} has no threat-model eps; pass --eps")
    alpha = eps / 4 if alpha is None else alpha
    ds, x, y = attack_subset(entry, n, seed, dataset, root, download, device, first_n)
    reported = getattr(model, "defense", None)
    from model_zoo.forward import EntropyReduction
    if isinstance(reported, EntropyReduction):
        # as `deqbench evaluate` resolves it: purify within the threat's eps with steps eps / 4
        # unless the defense spec sets them (the constructor's defaults are CIFAR-10's)
        given = defense if isinstance(defense, dict) else {}
        if "eps" not in given:
            reported.eps = eps
        if "beta" not in given:
            reported.beta = eps / 4
    elif name == "adaptive":
        raise ValueError("--attack adaptive is the adaptive protocol for the Sec. 3.2 test-time "
                         "defense: give --defense entropy_reduction (or a mapping such as "
                         "\"{name: entropy_reduction, tf: 2, r: 10}\")")
    src = make_surrogate(surrogate) if surrogate else None
    if src is None and getattr(model, "is_deq", False):
        src = make_surrogate("phantom_final")
    judged = JudgedModule(model, reported, src)
    t0 = time.perf_counter()
    grid = None
    if name == "pgd":
        out = pgd_attack(judged, x, y, eps, alpha, steps, seed=seed, batch_size=batch_size)
    elif name == "grid":
        settings = grid_settings(model.solver.max_iter, kas=_parse_ints(kas),
                                 lams=tuple(float(v) for v in lams.split(",")))
        grid = grid_attack(model, reported, x, y, eps, alpha, steps, settings=settings,
                           mode=mode, seed=seed, batch_size=batch_size, progress=progress)
        out = grid.worst
    elif name == "autoattack":
        out = autoattack_attack(judged, x, y, eps, attacks=aa_attacks.split(","),
                                budget=aa_budget, seed=seed, batch_size=batch_size,
                                progress=progress)
    elif name == "adaptive":
        # the protocol of benchmark/suite/adaptive.py (Croce et al., ICML 2022), every member
        # only on the points still robust (the worst case is the same; members have no
        # accuracy of their own); the transfer gradient is --surrogate (default phantom)
        from attacks.adaptive import adaptive_protocol
        from attacks.surrogates import UnrolledIntermediate
        kw = {"ka": src.ka, "lam": src.lam} if isinstance(src, UnrolledIntermediate) else {}
        out = adaptive_protocol(model, reported, x, y, eps, transfer_surrogate=src, alpha=alpha,
                                budget={**(aa_budget or {}), "pgd_steps": steps}, seed=seed,
                                batch_size=batch_size, ensemble=True, progress=progress, **kw)
        members = out.extra.pop("members", [])
        out.extra["members"] = {
            m.name: {"budget": m.config["budget"],
                     "attacked": int(m.extra["attacked"].sum()) if "attacked" in m.extra else None,
                     "broken": int((~m.correct.cpu() & m.extra["attacked"].cpu()).sum())
                     if "attacked" in m.extra else None, "wall_s": m.wall_s}
            for m in members}
        out.extra.pop("per_attack", None)
    else:
        if not sub:
            raise ValueError("torchattacks needs a class name: 'torchattacks:PGD'")
        out = torchattacks_attack(judged, x, y, eps, sub, seed=seed, batch_size=batch_size,
                                  **(ta_kwargs or {}))
    records = out.records([int(i) for i in ds.indices])
    result = {
        "model": model_name, **checkpoint_identity(entry, checkpoint),
        "reported": None if reported is None else reported.config(),
        "dataset": {"name": ds.info.name, "split": "test", "n": len(ds), "seed": seed,
                    "first_n": bool(first_n)},
        "attack": out.config, "device": device, "provenance": provenance(device),
        "summary": {"robust_accuracy": out.accuracy, "n": len(x),
                    "nonfinite": sum(r["nonfinite"] for r in records),
                    "nfev_per_example": float(out.nfev.mean()),
                    "f_equivalents_per_example": float(out.f_equivalents.mean()),
                    "wall_s": time.perf_counter() - t0,
                    **{k: v for k, v in out.extra.items() if not torch.is_tensor(v)}},
        "per_example": [{**r, "status": "nonfinite" if r["nonfinite"] else "ok"} for r in records],
    }
    if src is not None and getattr(model, "is_deq", False):
        result["summary"]["surrogate_clean_agreement"] = surrogate_agreement(judged, x)
    if grid is not None:
        result["grid"] = {"settings": grid.settings, "setting_accuracy": grid.setting_accuracy,
                          "min_over_means": grid.min_over_means,
                          "per_setting": grid.per_setting.tolist()}
    return result


def bench_grid(model_name: str, checkpoint=None, defense=None, n: int = 32, seed: int = 0,
               modes=("efficient", "naive"), kas="1-9", lams="0.5,1", eps=None, alpha=None,
               steps: int = 10, batch_size: int = 100, device: str = "auto",
               allow_untrained: bool = False, progress: bool = True) -> dict:
    """The (i, Ka, lambda) grid's per-example worst case in several modes on the same examples
    and seeds, in one run: f_theta evaluations per example (raw and in the reference's F
    units: forward + 2 x backward), wall time, worst-case accuracy and min-over-means."""
    device = resolve_device(device)
    entry, model = load_for_attack(model_name, checkpoint, defense, device, allow_untrained, seed)
    eps = eps if eps is not None else (entry.eps or DEFAULT_EPS.get(entry.dataset))
    if eps is None:
        raise ValueError(f"{model_name!r} has no threat-model eps; pass --eps")
    alpha = eps / 4 if alpha is None else alpha
    _, x, y = attack_subset(entry, n, seed, device=device)
    settings = grid_settings(model.solver.max_iter, kas=_parse_ints(kas),
                             lams=tuple(float(v) for v in lams.split(",")))
    rows = []
    for mode in modes:
        t0 = time.perf_counter()
        g = grid_attack(model, model.defense, x, y, eps, alpha, steps, settings=settings,
                        mode=mode, seed=seed, batch_size=batch_size, progress=progress)
        rows.append({"mode": mode, "settings": len(settings), "n": n,
                     "worst_case_acc": g.worst_case_accuracy, "min_over_means": g.min_over_means,
                     "nfev_per_example": float(g.worst.nfev.mean()),
                     "nfev_grad_per_example": float(g.worst.nfev_grad.mean()),
                     "F_per_example": float(g.worst.f_equivalents.mean()),
                     "wall_s": time.perf_counter() - t0,
                     "correct": g.worst.correct.int().tolist()})
    ref = REFERENCE_GRID_ATTACK_F + REFERENCE_GRID_EVAL_F
    for r in rows:
        r["F_vs_reference_arithmetic"] = r["F_per_example"] / ref if len(settings) == 144 else None
        r["wall_vs_first"] = r["wall_s"] / rows[0]["wall_s"]
    return {"model": model_name, "checkpoint": checkpoint or entry.checkpoint,
            "reported": model.defense.config(), "eps": eps, "alpha": alpha, "steps": steps,
            "reference_arithmetic_F": {"attack": REFERENCE_GRID_ATTACK_F,
                                       "evaluation": REFERENCE_GRID_EVAL_F, "total": ref},
            "provenance": provenance(device), "rows": rows}


def format_grid_table(res: dict) -> str:
    out = ["| mode | settings | n | worst-case acc | min over means | f evals / example | "
           "F (fwd + 2 bwd) / example | vs reference 44,352 F | wall s | wall vs first |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        mom = "-" if r["min_over_means"] is None else f"{100 * r['min_over_means']:.1f}%"
        vs = "-" if r["F_vs_reference_arithmetic"] is None else f"{r['F_vs_reference_arithmetic']:.2f}"
        out.append(f"| {r['mode']} | {r['settings']} | {r['n']} | {100 * r['worst_case_acc']:.1f}% | "
                   f"{mom} | {r['nfev_per_example']:,.0f} | {r['F_per_example']:,.0f} | {vs} | "
                   f"{r['wall_s']:.1f} | {r['wall_vs_first']:.2f} |")
    return "\n".join(out)

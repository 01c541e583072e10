"""``deqbench zoo publish``: turn a finished training run into a shipped zoo entry.

Copies the selected checkpoint (``best.pt``, chosen on the held-out validation split) and its
training log into ``model_zoo/checkpoints/``, records its SHA-256, evaluates it on a fixed
test subset (clean and PGD-10 at the final state, the numbers the tests check), and writes the
entry into ``model_zoo/checkpoints/zoo.json``, which the registry reads at import.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

import model_zoo
from attacks.pgd import pgd_linf
from benchmark.data import load_dataset, subset
from benchmark.provenance import device_description
from model_zoo.registry import CHECKPOINT_DIR, ZOO_FILE, sha256_file
from model_zoo.scoring import score_logits
from model_zoo.train_config import load_train_config

TEST_N, TEST_SEED = 500, 0
# The quality bar is judged on larger samples: clean on the whole test set, PGD-10 on 2,000.
BAR_PGD_N, BAR_PGD_SEED = 2000, 1


def evaluate_test_subset(model, dataset: str, eps: float, alpha: float, n: int = TEST_N,
                         seed: int = TEST_SEED, batch_size: int = 100, pgd_steps: int = 10) -> dict:
    """Clean and PGD-``pgd_steps`` accuracy of the model's forward on a fixed test subset."""
    ds = load_dataset(dataset, "test")
    ds = subset(ds, min(n, len(ds)), seed=seed)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    clean = adv = 0
    for s in range(0, len(ds), batch_size):
        x, y = ds.images[s:s + batch_size], ds.labels[s:s + batch_size]
        with torch.no_grad():
            clean += int(score_logits(model(x), y)[0].sum())  # non-finite logits: wrong
        if pgd_steps:
            adv += int(pgd_linf(model, x, y, eps, alpha, pgd_steps, generator=gen).correct.sum())
    return {"n": len(ds), "seed": seed, "clean_acc": clean / len(ds),
            f"pgd{pgd_steps}_acc": adv / len(ds) if pgd_steps else None}


def publish(run_dir, config_path, name: str, notes: str = "") -> dict:
    run_dir, cfg = Path(run_dir), load_train_config(config_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    best = run_dir / "best.pt"
    CHECKPOINT_DIR.mkdir(parents=True, exist_ok=True)
    ckpt, log = CHECKPOINT_DIR / f"{name}.pt", CHECKPOINT_DIR / f"{name}.log.csv"
    # Store weights only (no optimizer state) to keep the shipped files small.
    sd = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    meta = torch.load(best, map_location="cpu", weights_only=True)["meta"]
    torch.save({"state_dict": sd, "meta": {"name": name, "selection": meta.get("selection")}}, ckpt)
    shutil.copyfile(run_dir / "log.csv", log)
    base = model_zoo.get_entry(cfg.model)
    t = cfg.train
    training = t.method + (f"+sec33[{t.random_states}]" if t.random_states else "")
    overrides = dict(cfg.model_overrides)
    if cfg.solver:
        overrides["solver"] = {"name": "broyden", **cfg.solver}
    entry = {
        "name": name, "base": cfg.model, "overrides": overrides, "dataset": base.dataset,
        "input_shape": list(base.input_shape), "num_classes": base.num_classes,
        "architecture": base.architecture, "training": training, "threat_model": "Linf",
        "eps": t.attack.eps, "checkpoint": ckpt.name, "sha256": sha256_file(ckpt),
        "paper": base.paper, "venue": base.venue, "defense": "final",
        "notes": notes,
        "extra": {
            "config": str(Path(config_path)), "command": f"deqbench train {config_path}",
            "log": log.name, "epochs": t.epochs, "steps": summary["steps"],
            "train_samples": summary["train_samples"],
            "train_subset": cfg.data.train_subset, "init_from": t.init_from,
            "requires": _prerequisite(t.init_from),
            "chain": _training_chain(run_dir, summary),
            "val_n": summary.get("val_samples"),
            "selection": summary["best"], "wall_s": summary["wall_s"],
            "samples_per_s": summary["samples_per_s"],
            "hardware": summary["provenance"]["device"],
            "git_commit": summary["provenance"]["git_commit"],
            "budget": ("reduced (CPU): " + (f"{cfg.data.train_subset} training images, " if cfg.data.train_subset else "")
                       + f"{t.epochs} epochs" + (f", initialised from {t.init_from}" if t.init_from else "")),
        },
    }
    _update_zoo_file(entry)
    model = model_zoo.load(name)
    entry["extra"]["test_subset"] = evaluate_test_subset(model, base.dataset, t.attack.eps,
                                                         t.attack.alpha)
    full = evaluate_test_subset(model, base.dataset, t.attack.eps, t.attack.alpha, n=10 ** 9,
                                pgd_steps=0)
    pgd = evaluate_test_subset(model, base.dataset, t.attack.eps, t.attack.alpha, n=BAR_PGD_N,
                               seed=BAR_PGD_SEED) if t.method != "standard" else None
    entry["extra"]["test_bar"] = {
        "clean_acc": full["clean_acc"], "clean_n": full["n"],
        "pgd10_acc": pgd["pgd10_acc"] if pgd else None, "pgd10_n": pgd["n"] if pgd else 0,
        "pgd10_seed": BAR_PGD_SEED, "eps": t.attack.eps, "alpha": t.attack.alpha,
        "forward": "final state (FinalState(), phantom gradient for PGD)"}
    entry["extra"]["test_hardware"] = device_description("cpu")
    _update_zoo_file(entry)
    return entry


def _training_chain(run_dir: Path, summary: dict) -> list:
    """The training runs behind this checkpoint, first to last: this run, then the run its
    ``init_from`` names (when that is a run folder's best.pt with a summary.json), and so on.
    Each: name, epochs, steps, training images, wall seconds -- the whole budget of the model."""
    chain, seen = [], set()
    d, s = run_dir, summary
    while s is not None and str(d) not in seen:
        seen.add(str(d))
        c = s.get("config") or {}
        chain.append({"run": c.get("name") or d.name, "epochs": (c.get("train") or {}).get("epochs"),
                      "steps": s.get("steps"), "train_samples": s.get("train_samples"),
                      "wall_s": s.get("wall_s"), "samples_per_s": s.get("samples_per_s"),
                      "init_from": (c.get("train") or {}).get("init_from")})
        nxt = chain[-1]["init_from"]
        s = None
        if nxt and Path(nxt).name == "best.pt" and (Path(nxt).parent / "summary.json").is_file():
            d = Path(nxt).parent
            s = json.loads((d / "summary.json").read_text())
    return chain[::-1]


def _prerequisite(init_from) -> str:
    """What must exist before ``deqbench train CONFIG`` reproduces an entry: nothing, a shipped
    zoo checkpoint, or another training run (its command)."""
    if not init_from:
        return "-"
    p = Path(init_from)
    if p.parent.resolve() == CHECKPOINT_DIR.resolve():
        return f"the shipped checkpoint model_zoo/checkpoints/{p.name} (committed)"
    if len(p.parts) >= 2 and p.parts[-1] in ("best.pt", "last.pt"):
        return f"deqbench train configs/train/{p.parts[-2]}.yaml (writes {init_from})"
    return f"the checkpoint {init_from}"


@contextlib.contextmanager
def _zoo_lock():
    """An exclusive lock on zoo.json for its read-modify-write, so that publishes running in
    parallel (one per finished training run) never drop each other's entries."""
    CHECKPOINT_DIR.mkdir(parents=True, exist_ok=True)
    with open(CHECKPOINT_DIR / ".zoo.lock", "w") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: publish one run at a time
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _update_zoo_file(entry: dict) -> None:
    """Insert or replace ``entry`` in zoo.json (re-read under the lock; atomic replace), then
    re-register the zoo's entries."""
    with _zoo_lock():
        entries = json.loads(ZOO_FILE.read_text()) if ZOO_FILE.is_file() else []
        entries = [e for e in entries if e["name"] != entry["name"]] + [entry]
        tmp = ZOO_FILE.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(sorted(entries, key=lambda e: e["name"]), indent=1) + "\n")
        os.replace(tmp, ZOO_FILE)
    model_zoo.registry.load_zoo_file(overwrite=True)

"""``benchmark(model, ...)``: one call from any ``nn.Module`` to per-example results, a summary
and a leaderboard entry (RobustBench's ``benchmark()`` habit, with the DEQ protocol).

    from benchmark import benchmark
    res = benchmark(model, dataset="fashion_mnist", n=100, eps=0.1, attacks="quick")
    res.summary            # pandas: clean, PGD, grid, AutoAttack, ALL per (model, defense)
    res.records            # pandas: one row per (example, attack, setting)
    res.entry_path         # the RobustBench-format JSON entry it wrote

A model that satisfies the DEQ protocol (``model_zoo/protocol.py``; e.g. an MDEQ or a torchdeq
DEQ behind :class:`model_zoo.torchdeq_adapter.TorchDEQClassifier`) gets the DEQ-aware protocol:
early states, the (i, Ka, lambda) grid, surrogate-gradient AutoAttack, adaptive attacks for
test-time defenses.  Any other module is a plain classifier (clean, PGD, AutoAttack, checks).

How: the weights are written once to ``OUTPUT/NAME/weights.pt`` (their SHA-256 identifies the
entry), the model is registered under ``name`` (:func:`model_zoo.byo.register_user_model`), and
the run is an ordinary run config given to the runner's public :func:`benchmark.runner.evaluate`
-- resumable: calling again with the same arguments continues or only re-reads the database --
and to :func:`benchmark.reports.leaderboard_from_db`.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["benchmark", "BenchmarkResult", "ATTACK_PRESETS", "resolve_device"]

#: ``attacks="quick"`` / ``"standard"``: the run-config ``attacks`` section they stand for.
#: Attacks a model cannot take are skipped by the runner (the grid, top settings and adaptive
#: attacks need the DEQ protocol; adaptive attacks are for test-time defenses).
ATTACK_PRESETS = {
    "quick": {  # minutes on a CPU for ~100 small images: REDUCED budgets, labelled as such
        "pgd": {"steps": 10},
        "grid": {"steps": 10, "kas": [1, 5, 9], "lams": [0.5, 1.0]},
        "autoattack": {"attacks": ["apgd-ce", "apgd-t"],
                       "budget": {"apgd_n_iter": 10, "apgd_t_n_target_classes": 3}},
        "adaptive": {"steps": 10, "budget": {"apgd_n_iter": 10, "apgd_t_n_target_classes": 3,
                                             "square_n_queries": 200}},
        "checks": {"steps": 5, "square_queries": 200},
    },
    "standard": {  # the paper's protocol with the standard budgets
        "pgd": {"steps": 10},
        "grid": {"steps": 10},
        "top_settings": {"k": 7},
        "autoattack": {},
        "adaptive": {"steps": 10},
        "checks": {"steps": 10},
    },
}


@dataclass
class BenchmarkResult:
    """What :func:`benchmark` returns.  ``summary``: one row per (model, defense) with accuracies
    as fractions (:func:`benchmark.runner.summarize`); ``records``: the per-example records;
    ``entries`` / ``entry_paths``: the leaderboard entries written (one per defense);
    ``db_path``: the results database; ``is_deq``: whether the DEQ protocol ran."""
    summary: "object"
    records: "object"
    entry_paths: list
    entries: list
    db_path: Path
    run_dir: Path
    is_deq: bool
    weights_sha256: str
    config: "object" = field(repr=False, default=None)

    @property
    def entry_path(self) -> Optional[Path]:
        return self.entry_paths[0] if self.entry_paths else None

    @property
    def entry(self) -> Optional[dict]:
        return self.entries[0] if self.entries else None


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _attacks_section(attacks) -> dict:
    if isinstance(attacks, str):
        if attacks not in ATTACK_PRESETS:
            raise ValueError(f"attacks: {attacks!r} is not a preset (choose one of "
                             f"{sorted(ATTACK_PRESETS)}, a list of attack keys or a dict "
                             "key -> options)")
        return copy.deepcopy(ATTACK_PRESETS[attacks])
    if isinstance(attacks, dict):
        return copy.deepcopy(attacks)
    if isinstance(attacks, (list, tuple)):
        return {a: {} for a in attacks}
    raise ValueError(f"attacks: a preset name, a list of attack keys or a dict, got {attacks!r}")


def _default_name(model: nn.Module) -> str:
    inner = getattr(model, "net", None)
    base = type(inner if isinstance(inner, nn.Module) else model).__name__
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", base).lower()


def _defense_spec(model, spec):
    """A DEQ's own default forward as a config spec: 'final' when it is the harness's default
    FinalState(), else its config dict (e.g. torchdeq's h(z*): steps 0)."""
    from model_zoo.forward import make_defense
    d = model.defense if spec is None else make_defense(spec)
    if d.config() == make_defense("final").config():
        return "final"
    return d.config() if spec is None or not isinstance(spec, str) else spec


def _save_weights(model: nn.Module, path: Path) -> str:
    """Write ``model.state_dict()`` to ``path`` unless the file already holds these weights
    (a resumed call keeps the same file, so the run's hash stays valid)."""
    from model_zoo.registry import sha256_file
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if path.is_file():
        try:
            old = torch.load(path, map_location="cpu", weights_only=True)
            same = set(old) == set(sd) and all(torch.equal(old[k], sd[k]) for k in sd)
        except Exception:
            same = False
        if same:
            return sha256_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(sd, tmp)
    if path.is_file() and (path.parent / "results.sqlite").is_file():
        # never replace the weights a finished or resumable run was evaluated with
        old, new = sha256_file(path), sha256_file(tmp)
        tmp.unlink()
        raise ValueError(f"{path.parent} holds the run of other weights (sha256 {old[:12]}); "
                         f"this model's weights differ (sha256 {new[:12]}): give it another "
                         "name= (or output=)")
    tmp.replace(path)
    return sha256_file(path)


def benchmark(model: nn.Module, dataset: str = "fashion_mnist", n: int = 100,
              eps: Union[float, str] = 0.1, defenses: Optional[Sequence] = None,
              attacks: Union[str, list, dict] = "quick", device: str = "auto",
              output: Union[str, Path] = "runs/benchmark", first_n: bool = False,
              name: Optional[str] = None, leaderboard: Union[str, Path, None] = None,
              seed: int = 0, batch_size: int = 100, shard_size: int = 50,
              data_root: Optional[str] = None, progress: bool = False,
              training: Optional[str] = None, authors: Optional[str] = None,
              link: Optional[str] = None, paper: Optional[str] = None,
              venue: Optional[str] = None, reported: Optional[str] = None) -> BenchmarkResult:
    """Evaluate ``model`` with deqbench's protocol; returns a :class:`BenchmarkResult`.

    Args:
        model: any ``nn.Module`` mapping [0, 1] images (B, C, H, W) to logits (B, K).
        dataset: a :mod:`benchmark.data` dataset (offline), e.g. 'fashion_mnist', 'cifar10'.
        n: number of test images; ``first_n=True`` takes the first n (as published numbers
            usually do), else a seeded random subset (``seed``).
        eps: l_inf radius on [0, 1] images, a number or a string such as '8/255'.
        defenses: forwards of a DEQ to evaluate, e.g. ``["final", "early:select",
            "entropy_reduction"]`` (default: the model's own forward); not for plain models.
        attacks: 'quick' (reduced budgets), 'standard', a list of attack keys, or a dict
            key -> options (the run config's ``attacks`` section).
        device: 'auto' (CUDA when available), 'cpu' or 'cuda[:k]'.
        output: folder of the run (``OUTPUT/NAME/results.sqlite``, ``weights.pt``).
        name: the entry's model name (default: from the class name).  A zoo model's name is
            only accepted with the zoo's weights.
        leaderboard: root of the leaderboard folders (default ``OUTPUT/leaderboards``); the
            entry goes to ``<root>/<dataset>-Linf/<name>.json``.
        training, authors, link, paper, venue, reported: the entry's metadata (RobustBench
            model_info semantics; ``reported`` is the accuracy the source reported, '73.27').
    """
    from benchmark.data import get_info
    from benchmark.reports import leaderboard_from_db
    from benchmark.results_db import ResultsDB
    from benchmark.run_config import DATA_KEYS, from_dict
    from benchmark.runner import evaluate
    from model_zoo.byo import register_user_model
    from model_zoo.protocol import is_deq_aware

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    name = name or _default_name(model)
    info = get_info(dataset)
    is_deq = is_deq_aware(model)        # ProtocolError when it says is_deq but lacks parts
    if defenses is not None and not is_deq:
        raise ValueError("defenses: only a model satisfying the DEQ protocol has forwards to "
                         f"choose from; {type(model).__name__} is a plain classifier")
    if is_deq:
        defenses = [_defense_spec(model, None)] if defenses is None else list(defenses)
    out = Path(output)
    run_dir = out / name
    template = copy.deepcopy(model).cpu().eval()
    sha = _save_weights(template, run_dir / "weights.pt")
    arch = getattr(model, "architecture", None) or type(model).__name__
    register_user_model(name, lambda **kw: copy.deepcopy(template), dataset=info.name,
                        input_shape=info.input_shape, num_classes=info.num_classes,
                        checkpoint=run_dir / "weights.pt", architecture=arch,
                        source="benchmark()", training=training, authors=authors, link=link,
                        paper=paper, venue=venue, reported=reported,
                        defense=defenses[0] if is_deq else "final")
    data = {"dataset": info.name, "n": int(n), "seed": int(seed)}
    if data_root is not None:
        data["root"] = data_root
    if first_n:
        if "first_n" not in DATA_KEYS:
            raise NotImplementedError("first_n needs the run config's data.first_n key")
        data["first_n"] = True
    raw = {"name": name, "output": str(out), "seed": int(seed), "device": resolve_device(device),
           "batch_size": int(batch_size), "shard_size": int(shard_size), "data": data,
           "threat": {"norm": "Linf", "eps": eps},
           "models": [{"name": name, **({"defenses": list(defenses)} if is_deq else {})}],
           "attacks": _attacks_section(attacks),
           "description": f"benchmark() of {arch}"}
    cfg = from_dict(raw, source="benchmark()")
    res = evaluate(cfg, progress=progress)
    root = Path(leaderboard) if leaderboard is not None else out / "leaderboards"
    paths = leaderboard_from_db(res["db"], root=root)
    import json
    with ResultsDB(res["db"]) as db:
        records = db.records_frame()
    return BenchmarkResult(summary=res["summary"], records=records, entry_paths=list(paths),
                           entries=[json.loads(Path(p).read_text()) for p in paths],
                           db_path=Path(res["db"]), run_dir=run_dir, is_deq=is_deq,
                           weights_sha256=sha, config=cfg)

"""Evaluation run configuration: one YAML file, validated with errors naming the key and value.

Example (``configs/eval/fmnist_zoo_demo.yaml``)::

    name: fmnist_zoo_demo
    output: runs/eval                  # the run folder is OUTPUT/NAME (results.sqlite inside)
    seed: 0
    device: cpu
    batch_size: 100
    shard_size: 50                     # examples per work unit (the unit of resumption)
    data: {dataset: fashion_mnist, n: 100, seed: 0, root: null, val_n: 200}
    threat: {norm: Linf, eps: 0.1}
    models:
      - {name: deq_tiny_fmnist_pgdat, defenses: [final, "early:select", entropy_reduction]}
      - {name: small_cnn_fmnist_pgdat}
    attacks:
      pgd: {steps: 10, alpha: 0.025}
      grid: {steps: 10, alpha: 0.025, kas: [1, 5, 9], lams: [0.5, 1.0], mode: efficient}
      autoattack: {attacks: [apgd-ce, apgd-t, fab-t, square], budget: {apgd_n_iter: 20}}
      adaptive: {steps: 10}
      checks: {steps: 10, square_queries: 200}   # gradient-obfuscation indicators
      transfer: {steps: 10}                      # every (model, defense) -> every other
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from model_zoo.train_config import ConfigError, read_yaml

__all__ = ["RunConfig", "ModelSpec", "load_run_config", "ConfigError", "ATTACK_KEYS",
           "parse_source"]


def attack_keys() -> dict:
    """Attack key -> the option names ``attacks.<key>`` accepts, from the protocol-attack
    registry (:mod:`benchmark.suite`: one module per key declares its options)."""
    from benchmark.suite import attack_options, config_attacks
    return {k: attack_options(k) for k in config_attacks()}


def __getattr__(name):
    # ATTACK_KEYS stays importable; it is computed from the registry (imported lazily: the
    # suite's modules import this one)
    if name == "ATTACK_KEYS":
        return attack_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


TOP_KEYS = {"name", "output", "seed", "device", "batch_size", "shard_size", "data", "threat",
            "models", "attacks", "description"}
DATA_KEYS = {"dataset", "n", "seed", "root", "val_n", "val_seed"}


@dataclass
class ModelSpec:
    name: str
    checkpoint: Optional[str] = None
    defenses: list = field(default_factory=lambda: ["final"])
    label: Optional[str] = None

    @property
    def key(self) -> str:
        return self.label or self.name

    def weights_sha256(self) -> Optional[str]:
        """SHA-256 of the weights this model is evaluated with: the given checkpoint file, else
        the zoo entry's registered file (None: an untrained architecture). Part of the run's
        hash, so a re-trained model published under the same name is never scored from the
        old model's records."""
        from model_zoo.registry import get_entry, sha256_file
        if self.checkpoint:
            p = Path(self.checkpoint)
            return sha256_file(p) if p.is_file() else f"missing:{p}"
        try:
            e = get_entry(self.name)
        except KeyError:
            return None
        p = e.checkpoint_path()
        if p is None:
            return None
        return e.sha256 or (sha256_file(p) if p.is_file() else f"missing:{p}")


@dataclass
class RunConfig:
    name: str
    output: str = "runs/eval"
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 100
    shard_size: int = 50
    data: dict = field(default_factory=dict)
    threat: dict = field(default_factory=dict)
    models: list = field(default_factory=list)
    attacks: dict = field(default_factory=dict)
    description: str = ""
    source: Optional[str] = None

    @property
    def run_dir(self) -> Path:
        return Path(self.output) / self.name

    @property
    def eps(self) -> float:
        return float(self.threat["eps"])

    def to_dict(self) -> dict:
        return {"name": self.name, "output": self.output, "seed": self.seed,
                "device": self.device, "batch_size": self.batch_size,
                "shard_size": self.shard_size, "data": self.data, "threat": self.threat,
                "models": [{"name": m.name, "checkpoint": m.checkpoint, "defenses": m.defenses,
                            "label": m.label} for m in self.models],
                "attacks": self.attacks, "description": self.description}

    def weights(self) -> dict:
        """Model key -> SHA-256 of its weights (see :meth:`ModelSpec.weights_sha256`)."""
        return {m.key: m.weights_sha256() for m in self.models}

    def hash(self) -> str:
        """Hash of everything that changes results: the config (not the output folder, device
        or batch size) and the weights of every model."""
        d = self.to_dict()
        for k in ("output", "device", "description", "batch_size"):
            d.pop(k)
        d["weights"] = self.weights()
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _err(key, msg):
    raise ConfigError(f"run config: {key}: {msg}")


def _int(d, key, lo=None, path=""):
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
        _err(f"{path}{key}", f"must be an integer{'' if lo is None else f' >= {lo}'}, got {v!r}")
    return v


def from_dict(raw: dict, source: Optional[str] = None) -> RunConfig:
    import model_zoo
    from model_zoo.forward import make_defense

    if not isinstance(raw, dict):
        raise ConfigError("run config must be a YAML mapping")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        _err(sorted(unknown)[0], f"unknown key (known: {sorted(TOP_KEYS)})")
    if not raw.get("name") or not isinstance(raw["name"], str) or "/" in raw["name"]:
        _err("name", f"a non-empty name without '/' is required, got {raw.get('name')!r}")
    cfg = RunConfig(name=raw["name"], output=str(raw.get("output", "runs/eval")),
                    seed=raw.get("seed", 0), device=str(raw.get("device", "cpu")),
                    batch_size=raw.get("batch_size", 100), shard_size=raw.get("shard_size", 50),
                    description=str(raw.get("description", "")), source=source)
    for k in ("seed", "batch_size", "shard_size"):
        _int({k: getattr(cfg, k)}, k, 0 if k == "seed" else 1)
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        _err("device", f"must be 'cpu' or 'cuda[:k]', got {cfg.device!r}")
    data = dict(raw.get("data") or {})
    unknown = set(data) - DATA_KEYS
    if unknown:
        _err(f"data.{sorted(unknown)[0]}", f"unknown key (known: {sorted(DATA_KEYS)})")
    data.setdefault("n", 100)
    data.setdefault("seed", 0)
    data.setdefault("val_n", 200)
    data.setdefault("val_seed", 0)
    for k in ("n", "val_n"):
        _int(data, k, 1, "data.")
    for k in ("seed", "val_seed"):
        _int(data, k, 0, "data.")
    cfg.data = data
    threat = dict(raw.get("threat") or {})
    if set(threat) - {"norm", "eps"}:
        _err("threat", f"unknown keys {sorted(set(threat) - {'norm', 'eps'})}")
    threat.setdefault("norm", "Linf")
    if threat["norm"] != "Linf":
        _err("threat.norm", f"only 'Linf' is supported, got {threat['norm']!r}")
    eps = threat.get("eps")
    if isinstance(eps, str) and "/" in eps:
        a, b = eps.split("/")
        eps = float(a) / float(b)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps <= 1:
        _err("threat.eps", f"must be a number in [0, 1] (images live in [0, 1]), got {threat.get('eps')!r}")
    threat["eps"] = float(eps)
    cfg.threat = threat
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        _err("models", "a non-empty list of models is required")
    seen = set()
    datasets = set()
    for i, m in enumerate(models):
        if isinstance(m, str):
            m = {"name": m}
        if not isinstance(m, dict) or "name" not in m:
            _err(f"models[{i}]", f"must be a name or a mapping with 'name', got {m!r}")
        bad = set(m) - {"name", "checkpoint", "defenses", "label"}
        if bad:
            _err(f"models[{i}].{sorted(bad)[0]}", "unknown key (known: name, checkpoint, defenses, label)")
        try:
            entry = model_zoo.get_entry(m["name"])
        except KeyError as e:
            _err(f"models[{i}].name", str(e.args[0] if e.args else e))
        datasets.add(entry.dataset)
        defs = m.get("defenses") or ["final"]
        if not isinstance(defs, list):
            _err(f"models[{i}].defenses", f"must be a list, got {defs!r}")
        for d in defs:
            try:
                make_defense(d)
            except (ValueError, TypeError) as e:
                _err(f"models[{i}].defenses", str(e))
        spec = ModelSpec(m["name"], m.get("checkpoint"), defs, m.get("label"))
        if spec.key in seen:
            _err(f"models[{i}]", f"duplicate model {spec.key!r} (give one a 'label')")
        seen.add(spec.key)
        cfg.models.append(spec)
    if data.get("dataset") and len(datasets) == 1 and data["dataset"] not in datasets:
        _err("data.dataset", f"{data['dataset']!r} does not match the models' dataset "
                             f"{next(iter(datasets))!r}")
    data.setdefault("dataset", datasets.pop() if len(datasets) == 1 else None)
    if not data["dataset"]:
        _err("data.dataset", "required when the models come from different datasets")
    attacks = raw.get("attacks") or {}
    if not isinstance(attacks, dict):
        _err("attacks", f"must be a mapping of attack name -> options, got {attacks!r}")
    from benchmark.suite import get_attack
    known = attack_keys()
    for name, opts in attacks.items():
        if name not in known:
            _err(f"attacks.{name}", f"unknown attack (known: {sorted(known)})")
        opts = dict(opts or {})
        bad = set(opts) - known[name]
        if bad:
            _err(f"attacks.{name}.{sorted(bad)[0]}", f"unknown option (known: {sorted(known[name])})")
        if "steps" in opts:
            _int(opts, "steps", 1, f"attacks.{name}.")
        if "alpha" in opts and (not isinstance(opts["alpha"], (int, float)) or opts["alpha"] <= 0):
            _err(f"attacks.{name}.alpha", f"must be > 0, got {opts['alpha']!r}")
        _check_common(name, opts)
        get_attack(name).check(opts, cfg, attacks)  # the attack's own options (benchmark/suite)
        attacks[name] = opts
    cfg.attacks = attacks
    return cfg


def _check_common(name: str, opts: dict) -> None:
    """Options several attacks share: surrogates, presets, flags, counts and ranges."""
    path = f"attacks.{name}."
    if "surrogate" in opts:
        sp = opts["surrogate"]
        if not (sp == "strongest" and name != "pgd"):
            from attacks.surrogates import make_surrogate
            try:
                make_surrogate(sp)
            except (ValueError, TypeError) as e:
                hint = "" if name == "pgd" else " (or 'strongest': the strongest grid setting)"
                _err(f"{path}surrogate", f"{e}{hint}")
    for k in ("on_test_time_defenses", "random_start"):
        if k in opts and not isinstance(opts[k], bool):
            _err(f"{path}{k}", f"must be true or false, got {opts[k]!r}")
    if "preset" in opts and opts["preset"] not in ("reference", "paper"):
        _err(f"{path}preset", f"must be 'reference' or 'paper', got {opts['preset']!r}")
    for k in ("ka", "square_queries"):
        if k in opts:
            _int(opts, k, 1, path)
    for k in ("lam", "large_eps"):
        if k in opts and (isinstance(opts[k], bool) or not isinstance(opts[k], (int, float))
                          or not 0 < opts[k] <= 1):
            _err(f"{path}{k}", f"must be a number in (0, 1], got {opts[k]!r}")


def defense_text(spec) -> str:
    """A defense spec as written in 'MODEL@DEFENSE' and stored as the database's defense key:
    the string itself, or a dict's JSON with sorted keys."""
    return spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True)


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_source(spec: str, cfg: RunConfig):
    """A transfer source/target 'MODEL@DEFENSE' (or 'DEFENSE' when the run has one model) ->
    (ModelSpec, defense spec), checked against the run's models and their defenses."""
    if not isinstance(spec, str) or not spec:
        _err("attacks.transfer", f"sources/targets are strings 'MODEL@DEFENSE', got {spec!r}")
    if "@" in spec:
        mkey, dspec = spec.split("@", 1)
    elif len(cfg.models) == 1:
        mkey, dspec = cfg.models[0].key, spec
    else:
        _err("attacks.transfer", f"{spec!r}: write 'MODEL@DEFENSE' when the run has several models")
    for m in cfg.models:
        if m.key == mkey:
            # a dict defense is written as its JSON (the results database's defense key)
            for d in m.defenses:
                if dspec == defense_text(d) or (isinstance(d, dict) and _json_or_none(dspec) == d):
                    return m, d
            _err("attacks.transfer", f"{spec!r}: {mkey} is not evaluated with defense "
                                     f"{dspec!r} (its defenses: "
                                     f"{[defense_text(d) for d in m.defenses]})")
    _err("attacks.transfer", f"{spec!r}: no model {mkey!r} in this run "
                             f"(models: {[m.key for m in cfg.models]})")


def load_run_config(path) -> RunConfig:
    return from_dict(read_yaml(path), source=str(path))

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
import math
import re
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
            "models", "model", "attacks", "description", "reliability", "archive",
            "unit_order"}
#: keys of a model from user code: ``models: [{factory: "pkg.mod:fn" | "file.py:fn", ...}]``
#: (or ``model: {...}`` for a run of one model); see :mod:`model_zoo.byo`
USER_MODEL_KEYS = {"factory", "kwargs", "checkpoint", "sha256", "name", "label", "defenses",
                   "architecture", "training", "authors", "link", "paper", "venue", "reported"}
DATA_KEYS = {"dataset", "n", "seed", "root", "val_n", "val_seed", "first_n"}
RELIABILITY_KEYS = {"residual_threshold", "unconverged_share"}
# Run and label names become folder and file names (OUTPUT/NAME/results.sqlite) and leaderboard
# entry names: the leaderboard's own rule, so a name that passes here never fails there, and
# '..', '/' or a leading '.' can never address a folder outside OUTPUT.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class ModelSpec:
    name: str
    checkpoint: Optional[str] = None
    defenses: list = field(default_factory=lambda: ["final"])
    label: Optional[str] = None
    sha256: Optional[str] = None   # expected SHA-256 of ``checkpoint`` (verified when loading)
    factory: Optional[dict] = None  # a model from user code: its factory spec and metadata

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
            return e.sha256  # None (untrained architecture), or a user factory's own weights
        return e.sha256 or (sha256_file(p) if p.is_file() else f"missing:{p}")


@dataclass
class RunConfig:
    name: str
    output: str = "runs/eval"
    seed: int = 0
    device: str = "cpu"            # resolved: 'auto' in the file becomes cuda or cpu here
    batch_size: int = 100
    shard_size: int = 50
    data: dict = field(default_factory=dict)
    threat: dict = field(default_factory=dict)
    models: list = field(default_factory=list)
    attacks: dict = field(default_factory=dict)
    description: str = ""
    source: Optional[str] = None
    device_requested: str = "auto"
    reliability: dict = field(default_factory=dict)
    # where finished units are archived for committing (benchmark.archive), and the order units
    # run in ('attack': attack by attack; 'shard': shard by shard, so a stopped run has whole
    # shards); neither changes a result, so neither is in the hash
    archive: dict = field(default_factory=dict)
    unit_order: str = "attack"

    @property
    def run_dir(self) -> Path:
        return Path(self.output) / self.name

    @property
    def eps(self) -> float:
        return float(self.threat["eps"])

    def to_dict(self) -> dict:
        # keys added later (sha256, reliability) appear only when set, so the hash of a config
        # written before them is unchanged and its run folder stays resumable
        d = {"name": self.name, "output": self.output, "seed": self.seed,
             "device": self.device, "batch_size": self.batch_size,
             "shard_size": self.shard_size, "data": self.data, "threat": self.threat,
             "models": [{"name": m.name, "checkpoint": m.checkpoint, "defenses": m.defenses,
                         "label": m.label, **({"sha256": m.sha256} if m.sha256 else {}),
                         **({"factory": m.factory} if m.factory else {})}
                        for m in self.models],
             "attacks": self.attacks, "description": self.description,
             "device_requested": self.device_requested}
        if self.reliability:
            d["reliability"] = self.reliability
        if self.archive:
            d["archive"] = self.archive
        if self.unit_order != "attack":
            d["unit_order"] = self.unit_order
        return d

    def weights(self) -> dict:
        """Model key -> SHA-256 of its weights (see :meth:`ModelSpec.weights_sha256`)."""
        return {m.key: m.weights_sha256() for m in self.models}

    def hash(self) -> str:
        """Hash of everything that changes results: the config (not the output folder, device
        or batch size) and the weights of every model."""
        d = self.to_dict()
        for k in ("output", "device", "description", "batch_size", "device_requested"):
            d.pop(k)
        d.pop("archive", None)
        d.pop("unit_order", None)
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
        raise ConfigError(f"run config must be a YAML mapping, got {type(raw).__name__}")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        _err(sorted(unknown, key=str)[0], f"unknown key (known: {sorted(TOP_KEYS)})")
    check_name(raw.get("name"), "name")
    if not isinstance(raw.get("output", "runs/eval"), str) or not raw.get("output", "x"):
        _err("output", f"must be a folder path (a string), got {raw.get('output')!r}")
    if not isinstance(raw.get("description", ""), str):
        _err("description", f"must be a string, got {raw.get('description')!r}")
    device = check_device(raw.get("device", "auto"), "device")
    cfg = RunConfig(name=raw["name"], output=str(raw.get("output", "runs/eval")),
                    seed=raw.get("seed", 0), device=resolve_device(device),
                    batch_size=raw.get("batch_size", 100), shard_size=raw.get("shard_size", 50),
                    description=str(raw.get("description", "")), source=source,
                    device_requested=device)
    for k in ("seed", "batch_size", "shard_size"):
        _int({k: getattr(cfg, k)}, k, 0 if k == "seed" else 1)
    cfg.reliability = _check_reliability(raw.get("reliability"))
    from benchmark.archive import check_archive
    cfg.archive = check_archive(raw.get("archive"), source)
    cfg.unit_order = raw.get("unit_order", "attack")
    if cfg.unit_order not in ("attack", "shard"):
        _err("unit_order", f"must be 'attack' or 'shard', got {cfg.unit_order!r}")
    data = _mapping(raw, "data")
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
    if "first_n" in data and not isinstance(data["first_n"], bool):
        _err("data.first_n", f"must be true (the first n test images) or false (a seeded "
                             f"random subset), got {data['first_n']!r}")
    if data.get("root") is not None and not isinstance(data["root"], str):
        _err("data.root", f"must be a folder path (a string), got {data['root']!r}")
    cfg.data = data
    threat = _mapping(raw, "threat")
    if set(threat) - {"norm", "eps"}:
        _err("threat", f"unknown keys {sorted(set(threat) - {'norm', 'eps'}, key=str)}")
    threat.setdefault("norm", "Linf")
    if threat["norm"] != "Linf":
        _err("threat.norm", f"only 'Linf' is supported, got {threat['norm']!r}")
    threat["eps"] = parse_eps(threat.get("eps"), "threat.eps")
    cfg.threat = threat
    models = raw.get("models")
    if "model" in raw:
        if models is not None:
            _err("model", "give either model: (one model) or models: (a list), not both")
        models = [raw["model"]]
    if not isinstance(models, list) or not models:
        _err("models", "a non-empty list of models is required")
    seen = set()
    datasets = set()
    for i, m in enumerate(models):
        if isinstance(m, str):
            m = {"name": m}
        user = None
        if isinstance(m, dict) and "factory" in m:
            m, user = _user_model(m, i, data, source)
        if not isinstance(m, dict) or "name" not in m:
            _err(f"models[{i}]", f"must be a name or a mapping with 'name', got {m!r}")
        bad = set(m) - {"name", "checkpoint", "defenses", "label", "sha256"}
        if bad:
            _err(f"models[{i}].{sorted(bad, key=str)[0]}",
                 "unknown key (known: name, checkpoint, sha256, defenses, label)")
        if not isinstance(m["name"], str):
            _err(f"models[{i}].name", f"must be a registered model name, got {m['name']!r}")
        try:
            entry = model_zoo.get_entry(m["name"])
        except KeyError as e:
            _err(f"models[{i}].name", str(e.args[0] if e.args else e))
        if m.get("label") is not None:
            check_name(m["label"], f"models[{i}].label")
        _check_checkpoint(m.get("checkpoint"), m.get("sha256"), f"models[{i}].")
        datasets.add(entry.dataset)
        defs = m.get("defenses") or ["final"]
        if not isinstance(defs, list):
            _err(f"models[{i}].defenses", f"must be a list, got {defs!r}")
        for d in defs:
            try:
                make_defense(d)
            except (ValueError, TypeError) as e:
                _err(f"models[{i}].defenses", str(e))
        spec = ModelSpec(m["name"], m.get("checkpoint"), defs, m.get("label"), m.get("sha256"))
        spec.factory = user
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
    _check_n(data)
    attacks = raw.get("attacks") or {}
    if not isinstance(attacks, dict):
        _err("attacks", f"must be a mapping of attack name -> options, got {attacks!r}")
    from benchmark.suite import get_attack
    known = attack_keys()
    for name, opts in attacks.items():
        if name not in known:
            _err(f"attacks.{name}", f"unknown attack (known: {sorted(known)})")
        if opts is not None and not isinstance(opts, dict):
            _err(f"attacks.{name}", f"must be a mapping of options (e.g. {{steps: 10}}) or "
                                    f"empty, got {opts!r}")
        opts = dict(opts or {})
        bad = set(opts) - known[name]
        if bad:
            _err(f"attacks.{name}.{sorted(bad)[0]}", f"unknown option (known: {sorted(known[name])})")
        if "steps" in opts:
            _int(opts, "steps", 1, f"attacks.{name}.")
        if "alpha" in opts and (isinstance(opts["alpha"], bool)
                                or not isinstance(opts["alpha"], (int, float))
                                or not 0 < opts["alpha"] <= 1):
            _err(f"attacks.{name}.alpha", f"must be a number in (0, 1], got {opts['alpha']!r}")
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
    """Read and validate a run config file; every error names the file and the key."""
    raw = read_yaml(path)
    try:
        return from_dict(raw, source=str(path))
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(f"{path}: {msg[len('run config: '):]}"
                          if msg.startswith("run config: ") else f"{path}: {msg}") from None


# ---------------------------------------------------------------------------------------------
# checks shared by run configs and the command line (benchmark/cli.py builds the same dict)
# ---------------------------------------------------------------------------------------------

def _mapping(raw: dict, key: str) -> dict:
    v = raw.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        _err(key, f"must be a mapping, got {v!r}")
    return dict(v)


def check_name(v, key: str) -> str:
    """A run or label name: it becomes a folder / file / leaderboard entry name."""
    if not isinstance(v, str) or not SAFE_NAME.match(v) or len(v) > 200:
        _err(key, "a non-empty name without '/' is required: letters, digits and . _ + - "
                  "starting with a letter or digit (it names a folder and leaderboard "
                  f"entries), got {v!r}")
    return v


def check_device(v, key: str = "device") -> str:
    if not isinstance(v, str) or not (v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v)):
        _err(key, f"must be 'cpu' or 'cuda[:k]' or 'auto' (CUDA when available, else CPU), "
                  f"got {v!r}")
    return v


def check_device_available(v: str, key: str = "device") -> str:
    """Before running (not when validating: a GPU config is valid on a CPU machine)."""
    if v.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            _err(key, f"{v!r} was asked for but no CUDA device is available here (use 'auto' "
                      "or 'cpu')")
        if ":" in v and int(v.split(":")[1]) >= torch.cuda.device_count():
            _err(key, f"{v!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return v


def resolve_device(v: str) -> str:
    from model_zoo.scoring import resolve_device as _resolve
    return _resolve(v)


def parse_eps(v, key: str = "threat.eps") -> float:
    """A perturbation budget on [0, 1] images: a number or a fraction 'A/B' such as '8/255'."""
    given = v
    if isinstance(v, str):
        parts = v.strip().split("/")
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            nums = None
        if nums is None or len(parts) > 2:
            _err(key, f"must be a number or a fraction A/B such as 8/255, got {given!r}")
        if len(nums) == 2 and nums[1] == 0:
            _err(key, f"division by zero in {given!r}")
        v = nums[0] / nums[1] if len(nums) == 2 else nums[0]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or not 0 <= v <= 1:
        _err(key, f"must be a number in [0, 1] (images live in [0, 1]), got {given!r}")
    return float(v)


def _user_model(m: dict, i: int, data: dict, source: Optional[str]):
    """Register a model from user code (``factory:``) and return the plain model mapping the
    rest of the validation sees (its name, defenses, label) and the spec recorded in the run."""
    from model_zoo.byo import UserModelError, import_factory, register_user_model
    from benchmark.data import get_info
    p = f"models[{i}]."
    bad = set(m) - USER_MODEL_KEYS
    if bad:
        _err(f"{p}{sorted(bad, key=str)[0]}", f"unknown key for a model from user code (known: "
                                             f"{', '.join(sorted(USER_MODEL_KEYS))})")
    if not isinstance(m.get("name"), str) or not m["name"]:
        _err(f"{p}name", "a model from user code needs a name (its leaderboard entry's)")
    check_name(m["name"], f"{p}name")
    if not data.get("dataset"):
        _err("data.dataset", f"required for a model from user code ({p}factory): the "
                             "images it takes, e.g. fashion_mnist")
    try:
        info = get_info(data["dataset"])
    except Exception as e:
        _err("data.dataset", str(e))
    kwargs = m.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        _err(f"{p}kwargs", f"must be a mapping of keyword arguments, got {kwargs!r}")
    for k in ("checkpoint", "sha256", "architecture", *RESERVED_USER_METADATA):
        if m.get(k) is not None and not isinstance(m[k], str):
            _err(f"{p}{k}", f"must be a string, got {m[k]!r}")
    base = Path(source).parent if source and Path(source).is_file() else None
    try:
        factory = import_factory(m["factory"], base)
        entry = register_user_model(m["name"], factory, dataset=info.name, input_shape=info.input_shape,
                            num_classes=info.num_classes, kwargs=kwargs,
                            checkpoint=m.get("checkpoint"), sha256=m.get("sha256"),
                            architecture=m.get("architecture"),
                            source=m["factory"],
                            **{k: m.get(k) for k in RESERVED_USER_METADATA})
    except UserModelError as e:
        _err(f"{p}{e.key}", str(e))
    rec = {k: m[k] for k in sorted(USER_MODEL_KEYS - {"name", "label", "defenses"}) if k in m}
    plain = {k: m[k] for k in ("name", "label", "defenses") if k in m}
    plain.setdefault("defenses", [entry.defense])  # a DEQ's own forward (torchdeq's h(z*))
    return plain, rec


RESERVED_USER_METADATA = ("training", "authors", "link", "paper", "venue", "reported")


def _check_checkpoint(ckpt, sha, prefix: str) -> None:
    if sha is not None and ckpt is None:
        _err(f"{prefix}sha256", "given without a checkpoint (the zoo's own checkpoints are "
                                "verified against their registered SHA-256 already)")
    if ckpt is None:
        return
    if not isinstance(ckpt, str) or not ckpt:
        _err(f"{prefix}checkpoint", f"must be a file path (a string), got {ckpt!r}")
    if sha is not None and (not isinstance(sha, str) or not SHA256_HEX.match(sha.lower())):
        _err(f"{prefix}sha256", f"must be 64 hexadecimal digits, got {sha!r}")


def check_checkpoint_files(cfg: "RunConfig") -> None:
    """Before running (a config naming a checkpoint that training will produce is valid):
    every given checkpoint exists and has the given SHA-256."""
    for i, m in enumerate(cfg.models):
        if m.checkpoint:
            _check_checkpoint_file(m.checkpoint, m.sha256, f"models[{i}].")


def _check_checkpoint_file(ckpt, sha, prefix: str) -> None:
    p = Path(ckpt)
    if not p.is_file():
        _err(f"{prefix}checkpoint", f"file not found: {p}" if not p.exists()
             else f"{p} is not a file")
    if sha is not None:
        from model_zoo.registry import sha256_file
        found = sha256_file(p)
        if found != sha.lower():
            _err(f"{prefix}sha256", f"{p} has SHA-256 {found}, not the given {sha}: the file "
                                    "is not the expected checkpoint")


def _check_n(data: dict) -> None:
    from benchmark.data import get_info
    if not isinstance(data["dataset"], str):
        _err("data.dataset", f"must be a dataset name, got {data['dataset']!r}")
    try:
        info = get_info(data["dataset"])
    except (KeyError, ValueError) as e:
        _err("data.dataset", str(e.args[0] if e.args else e))
    if info.name != "synthetic" and data["n"] > info.test_size:
        _err("data.n", f"{data['n']} is larger than the {info.name} test set "
                       f"({info.test_size:,} images)")


def _check_reliability(rel) -> dict:
    if rel is None:
        return {}
    if not isinstance(rel, dict):
        _err("reliability", f"must be a mapping, got {rel!r}")
    bad = set(rel) - RELIABILITY_KEYS
    if bad:
        _err(f"reliability.{sorted(bad, key=str)[0]}",
             f"unknown key (known: {sorted(RELIABILITY_KEYS)})")
    t = rel.get("residual_threshold")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))
                          or not math.isfinite(t) or t <= 0):
        _err("reliability.residual_threshold", f"must be a number > 0, got {t!r}")
    s = rel.get("unconverged_share")
    if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))
                          or not 0 <= s <= 1):
        _err("reliability.unconverged_share", f"must be a number in [0, 1], got {s!r}")
    return dict(rel)

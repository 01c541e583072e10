"""Training configuration: one YAML file, validated with errors that name the key and the value."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = ["TrainConfig", "ConfigError", "load_train_config", "read_yaml"]


class ConfigError(ValueError):
    """A configuration value or key the trainer cannot use."""


@dataclass
class DataSection:
    dataset: str = "fashion_mnist"
    root: Optional[str] = None
    val_size: int = 5000             # held-out validation split of the TRAINING set
    val_seed: int = 0
    val_n: int = 1000                # validation images used per epoch for selection
    train_subset: Optional[int] = None   # train on a fixed subset (CPU budgets); None = all
    augment: bool = True
    options: dict = field(default_factory=dict)   # dataset options (synthetic only)


@dataclass
class AttackSection:
    eps: float = 0.1
    alpha: float = 0.025
    steps: int = 10


@dataclass
class JacobianSection:
    weight: float = 0.0              # JAC_LOSS_WEIGHT (paper App. C.2 discusses 0.4 and 2.0)
    freq: float = 0.02               # probability of a regularised step
    stop_epoch: Optional[int] = None   # no penalty from this epoch on (reference: 90)
    vecs: int = 2                    # Hutchinson vectors
    rand_thres_delta: int = 2        # on regularised steps N += randint(-delta, delta)


@dataclass
class TrainSection:
    method: str = "pgd_at"           # standard | pgd_at | trades
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    lr_min: float = 1e-6
    weight_decay: float = 0.0
    pretrain_steps: int = 0          # explicit weight-tied net z = f^L(0), clean loss
    pretrain_layers: int = 8
    gradient: str = "phantom"        # phantom | implicit
    unroll_steps: int = 5            # phantom: f then this many damped steps
    unroll_lam: float = 0.5
    backward_iter: int = 7           # implicit: Broyden steps of the backward solve
    random_states: Optional[str] = None   # Sec. 3.3: None | reference | paper
    trades_beta: float = 6.0
    attack: AttackSection = field(default_factory=AttackSection)
    jacobian: JacobianSection = field(default_factory=JacobianSection)
    max_steps: Optional[int] = None  # stop after this many optimizer steps (budgets, tests)
    init_from: Optional[str] = None  # start from these weights (e.g. a clean-trained model,
                                     # in place of the reference's long clean pretraining)


@dataclass
class TrainConfig:
    name: str = "run"
    model: str = "deq_tiny_fashion_mnist"
    model_overrides: dict = field(default_factory=dict)
    solver: dict = field(default_factory=dict)     # e.g. {max_iter: 8}
    seed: int = 0
    device: str = "auto"             # auto: CUDA when available, else CPU
    output: str = "runs/train"
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        cfg = _build(cls, d or {}, "")
        cfg.validate()
        return cfg

    def _validate_model(self) -> None:
        _validate_model_impl(self)

    def validate(self) -> None:
        t, a, j, dt = self.train, self.train.attack, self.train.jacobian, self.data
        _choice("train.method", t.method, ("standard", "pgd_at", "trades"))
        _choice("train.gradient", t.gradient, ("phantom", "implicit"))
        _choice("train.random_states", t.random_states, (None, "reference", "paper"))
        _positive_int("train.epochs", t.epochs)
        _positive_int("train.batch_size", t.batch_size)
        _positive_int("train.pretrain_layers", t.pretrain_layers)
        _positive_int("train.backward_iter", t.backward_iter)
        _range("train.lr", t.lr, 0, None, open_lo=True)
        _range("train.lr_min", t.lr_min, 0, t.lr)
        _range("train.weight_decay", t.weight_decay, 0, None)
        _range("train.pretrain_steps", t.pretrain_steps, 0, None)
        _range("train.unroll_steps", t.unroll_steps, 0, None)
        _range("train.unroll_lam", t.unroll_lam, 0, 1, open_lo=True)
        _range("train.trades_beta", t.trades_beta, 0, None, open_lo=True)
        _range("train.attack.eps", a.eps, 0, 1)
        _range("train.attack.alpha", a.alpha, 0, 1, open_lo=True)
        _range("train.attack.steps", a.steps, 0, None)
        _range("train.jacobian.weight", j.weight, 0, None)
        _range("train.jacobian.freq", j.freq, 0, 1)
        _positive_int("train.jacobian.vecs", j.vecs)
        if j.stop_epoch is not None:
            _positive_int("train.jacobian.stop_epoch", j.stop_epoch)
        _range("train.jacobian.rand_thres_delta", j.rand_thres_delta, 0, None)
        if t.max_steps is not None:
            _positive_int("train.max_steps", t.max_steps)
        _range("data.val_size", dt.val_size, 1, None)
        _range("data.val_n", dt.val_n, 1, dt.val_size)
        if dt.train_subset is not None:
            _positive_int("data.train_subset", dt.train_subset)
        if t.random_states and t.gradient == "implicit":
            raise ConfigError("train.random_states (Sec. 3.3) uses the phantom unroll; "
                              "set train.gradient: phantom")
        _range("seed", self.seed, 0, None)
        self._validate_model()
        if not (self.device == "auto" or str(self.device).startswith(("cpu", "cuda"))):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:k]' or 'auto' (CUDA when "
                              f"available, else CPU), got {self.device!r}")


def _validate_model_impl(cfg) -> None:
    """``model`` must be registered, and ``model_overrides`` / ``solver`` must build it: a
    typo is a config error naming the key, not a traceback from deep inside the factory."""
    import model_zoo
    try:
        model_zoo.get_entry(cfg.model)
    except KeyError as e:
        raise ConfigError(f"model: {e.args[0] if e.args else e}") from None
    if cfg.solver is not None and not isinstance(cfg.solver, dict):
        raise ConfigError(f"solver must be a mapping (e.g. {{max_iter: 8}}), got {cfg.solver!r}")
    if not isinstance(cfg.model_overrides, dict):
        raise ConfigError(f"model_overrides must be a mapping, got {cfg.model_overrides!r}")
    overrides = dict(cfg.model_overrides)
    if cfg.solver:
        overrides["solver"] = {"name": "broyden", **cfg.solver}
    if not overrides:
        return
    try:
        model_zoo.create(cfg.model, **overrides)
    except (TypeError, ValueError, KeyError) as e:
        key = "solver" if cfg.solver and "solver" in str(e).lower() else "model_overrides"
        raise ConfigError(f"{key}: cannot build {cfg.model!r} with {overrides}: {e}") from None


def _build(cls, d, prefix):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown key(s){where}: {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(fields))}")
    kw = {}
    for k, v in d.items():
        f = fields[k]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kw[k] = _build(sub, v, f"{prefix}{k}.")
        else:
            kw[k] = v
    obj = cls(**kw)
    for k, v in kw.items():
        _check_type(f"{prefix}{k}", v, fields[k])
    return obj


def _check_type(key, v, f):
    t = str(f.type)
    if v is None:
        if "Optional" not in t:
            raise ConfigError(f"{key} must not be null")
        return
    t = t.replace("Optional[", "").rstrip("]")
    if t == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key} must be an integer, got {v!r}")
    elif t == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{key} must be a number, got {v!r}")
    elif t == "bool" and not isinstance(v, bool):
        raise ConfigError(f"{key} must be true or false, got {v!r}")
    elif t == "str" and not isinstance(v, str):
        raise ConfigError(f"{key} must be a string, got {v!r}")
    elif t == "dict" and not isinstance(v, dict):
        raise ConfigError(f"{key} must be a mapping, got {v!r}")


def _choice(key, v, options):
    if v not in options:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, options))}; got {v!r}")


def _positive_int(key, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{key} must be a positive integer, got {v!r}")


def _range(key, v, lo, hi, open_lo=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key} must be a number, got {v!r}")
    if (v <= lo if open_lo else v < lo) or (hi is not None and v > hi):
        lo_s = f"> {lo}" if open_lo else f">= {lo}"
        hi_s = f" and <= {hi}" if hi is not None else ""
        raise ConfigError(f"{key} must be {lo_s}{hi_s}, got {v!r}")


def _unique_key_loader():
    """A ``yaml.SafeLoader`` whose mappings refuse duplicate keys at every level: PyYAML's own
    loaders keep the last value silently, so a config with two ``eps:`` lines would run with
    whichever came last."""
    import yaml
    from yaml.constructor import ConstructorError

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                self.flatten_mapping(node)  # merge keys (<<) are expanded first, not duplicates
                seen = {}
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=True)
                    try:
                        hash(key)
                    except TypeError:
                        raise ConstructorError("while constructing a mapping", node.start_mark,
                                               f"unhashable key {key!r}", key_node.start_mark)
                    if key in seen:
                        raise ConstructorError(
                            "while constructing a mapping", node.start_mark,
                            f"duplicate key {key!r} (first on line {seen[key] + 1})",
                            key_node.start_mark)
                    seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)
    return UniqueKeyLoader


def read_yaml(path):
    """Parse a YAML config file (safe loader, duplicate keys refused at every level);
    ConfigError naming the file for a missing/unreadable file, non-UTF-8 text or invalid YAML."""
    import yaml
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" if not path.exists()
                          else f"config {path} is not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); save the config as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return yaml.load(text, Loader=_unique_key_loader())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if mark is not None and getattr(e, "problem", None):
            ctx = f" ({e.context})" if getattr(e, "context", None) else ""
            raise ConfigError(f"{path}: not valid YAML: line {mark.line + 1}, column "
                              f"{mark.column + 1}: {e.problem}{ctx}") from None
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None


def load_train_config(path) -> TrainConfig:
    path = Path(path)
    d = read_yaml(path)
    try:
        return TrainConfig.from_dict(d or {})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None

"""The model registry: entries carry their metadata as data beside the factory (timm-style).

``create(name, **overrides)`` builds an (untrained) model; ``load(name, checkpoint=..., defense=...)``
builds it and loads verified weights; ``list_models()`` lists names; ``register(...)`` adds any
``nn.Module`` classifier that takes [0, 1] inputs.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from .baselines import CheckedClassifier, resnet18, small_cnn
from .forward import make_defense
from .mdeq import MDEQ_CONFIGS, MDEQClassifier
from .solvers import Solver, make_solver

__all__ = ["ModelEntry", "register", "create", "load", "list_models", "get_entry",
           "checkpoint_status", "CheckpointError", "sha256_file", "CHECKPOINT_DIR", "save_checkpoint",
           "ZOO_FILE", "load_zoo_file"]

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
ZOO_FILE = CHECKPOINT_DIR / "zoo.json"   # the shipped, trained entries (written by zoo publish)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, of the wrong model or with the wrong hash."""


@dataclass(frozen=True)
class ModelEntry:
    """Metadata of one zoo model (serialisable with :meth:`to_dict`)."""
    name: str
    factory: Callable[..., nn.Module] = field(repr=False)
    dataset: str
    input_shape: tuple                   # (C, H, W)
    num_classes: int = 10
    architecture: str = "mdeq"
    training: str = "untrained"          # e.g. 'standard', 'pgd_at', 'trades', 'trades+sec33'
    threat_model: str = "Linf"
    eps: Optional[float] = None          # training / evaluation epsilon on [0, 1] images
    checkpoint: Optional[str] = None     # file under model_zoo/checkpoints/ or an absolute path
    sha256: Optional[str] = None
    paper: str = ""
    venue: str = ""
    defense: Union[str, dict] = "final"  # default forward pass (DEQs)
    notes: str = ""
    extra: dict = field(default_factory=dict)   # training log, wall time, hardware, ...

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "factory"}
        d["input_shape"] = list(self.input_shape)
        return d

    def checkpoint_path(self) -> Optional[Path]:
        if self.checkpoint is None:
            return None
        p = Path(self.checkpoint)
        return p if p.is_absolute() else CHECKPOINT_DIR / p


_REGISTRY: dict = {}


def register(entry: Optional[ModelEntry] = None, *, overwrite: bool = False, **kw) -> ModelEntry:
    """Register a model: ``register(ModelEntry(...))`` or ``register(name=..., factory=...,
    dataset=..., input_shape=(C, H, W), ...)``. ``factory(**overrides)`` must return a module
    mapping [0, 1] images (B, C, H, W) to logits (B, num_classes); plain modules are wrapped in
    :class:`CheckedClassifier` by :func:`create`."""
    if entry is None:
        entry = ModelEntry(**kw)
    elif kw:
        raise TypeError("pass either a ModelEntry or keyword fields, not both")
    if entry.name in _REGISTRY and not overwrite:
        raise ValueError(f"model {entry.name!r} is already registered (overwrite=True replaces it)")
    if len(entry.input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {entry.input_shape}")
    _REGISTRY[entry.name] = entry
    return entry


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = fnmatch.filter(_REGISTRY, f"*{name}*")
        hint = f" Did you mean: {', '.join(sorted(close))}?" if close else ""
        from .byo import USER_HELP
        raise KeyError(f"unknown model {name!r}.{hint} Known: {', '.join(sorted(_REGISTRY))}. "
                       f"To bring your own: {USER_HELP}") from None


def list_models(pattern: str = "*") -> list:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create(name: str, **overrides) -> nn.Module:
    """Build an untrained model. DEQ overrides: any :class:`MDEQConfig` field, ``solver``
    (a :class:`Solver` or a dict such as ``{'name': 'broyden', 'max_iter': 8}``), ``defense``
    (see :func:`model_zoo.forward.make_defense`), ``num_classes``."""
    entry = get_entry(name)
    model = entry.factory(**overrides)
    if not isinstance(model, nn.Module):
        raise TypeError(f"the factory of {name!r} returned {type(model).__name__}, not an nn.Module")
    if getattr(model, "is_deq", False):
        # A model that says it is a DEQ gets the DEQ protocol; one that lacks part of it is an
        # error naming what is missing, never silently a plain classifier.
        from .protocol import require_deq_protocol
        require_deq_protocol(model)
    if not hasattr(model, "is_deq"):
        c, h, w = entry.input_shape
        model = CheckedClassifier(model, c, (h, w), entry.num_classes, entry.architecture)
    model.zoo_entry = entry
    return model


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_status(entry: ModelEntry) -> str:
    """'none' (untrained entry), 'missing', 'ok' or 'hash mismatch'."""
    p = entry.checkpoint_path()
    if p is None:
        return "none"
    if not p.is_file():
        return "missing"
    if entry.sha256 and sha256_file(p) != entry.sha256:
        return "hash mismatch"
    return "ok"


def save_checkpoint(model: nn.Module, path, meta: Optional[dict] = None) -> str:
    """Save ``{'state_dict', 'meta'}`` (loadable with ``weights_only=True``); returns SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": meta or {}}, path)
    return sha256_file(path)


def registered_sha256(path) -> Optional[str]:
    """The SHA-256 registered for ``path`` when it is a zoo entry's checkpoint file (so that a
    training run initialised from a shipped model verifies it like ``load`` does), else None."""
    target = Path(path).resolve()
    for e in _REGISTRY.values():
        p = e.checkpoint_path()
        if p is not None and e.sha256 and p.resolve() == target:
            return e.sha256
    return None


def _read_state_dict(path: Path, sha256: Optional[str]) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if sha256:
        found = sha256_file(path)
        if found != sha256:
            raise CheckpointError(f"checkpoint {path} has SHA-256 {found}, expected {sha256}: "
                                  "the file is corrupt or not the registered checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, disallowed globals ...
        # torch's own text runs to paragraphs (weights_only advice); its first sentence says it
        text = " ".join(str(e).split())
        why = text.split(". ")[0][:160]
        glob = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
        why += f"; {glob.group(0)}" if glob else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {why} (not a "
                              "torch.save file of tensors, truncated, or a pickle with code)") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"checkpoint {path} holds no state_dict of tensors")
    return sd


def load_state_dict_checked(model: nn.Module, sd: dict, source: str) -> None:
    """``model.load_state_dict`` with errors that name the file and the offending keys."""
    own = model.state_dict()
    # A checkpoint of the bare network of a wrapped model (a baseline in CheckedClassifier, a
    # torchdeq DEQ in TorchDEQClassifier): accept it under the 'net.' prefix.
    if isinstance(getattr(model, "net", None), nn.Module) and not set(sd) & set(own):
        sd = {f"net.{k}": v for k, v in sd.items()}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:10])}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not fit the model: " + " | ".join(problems))
    model.load_state_dict(sd, strict=True)


def load(name: str, checkpoint=None, defense=None, device="cpu", sha256: Optional[str] = None,
         **overrides) -> nn.Module:
    """Build model ``name`` and load weights, in eval mode on ``device``.

    ``checkpoint``: path of a checkpoint (``{'state_dict': ...}`` or a raw state_dict); default
    the entry's registered file, verified against its SHA-256 (``sha256=`` checks a given file).
    ``defense``: forward pass for DEQs (default: the entry's).
    """
    entry = get_entry(name)
    if checkpoint is None:
        path = entry.checkpoint_path()
        if path is None and entry.extra.get("weights") == "factory":
            # a user factory that builds its own (e.g. pretrained) weights: identified by the
            # state_dict hash recorded at registration, checked again here
            from .byo import state_dict_sha256
            model = create(name, **overrides)
            found = state_dict_sha256(model.net if isinstance(model, CheckedClassifier) else model)
            if entry.sha256 and found != entry.sha256 and not overrides:
                raise CheckpointError(f"the factory of {name!r} now builds weights with state_dict "
                                      f"SHA-256 {found}, registered {entry.sha256}")
            if getattr(model, "is_deq", False):
                model.set_defense(make_defense(defense if defense is not None else entry.defense))
            return model.to(device).eval()
        if path is None:
            raise CheckpointError(f"model {name!r} has no registered checkpoint; pass checkpoint=PATH "
                                  f"or use model_zoo.create({name!r}) for an untrained model")
        sha256 = sha256 or entry.sha256
    else:
        path = Path(checkpoint)
    model = create(name, **overrides)
    load_state_dict_checked(model, _read_state_dict(path, sha256), str(path))
    from .scoring import resolve_device
    device = resolve_device(device)  # 'auto': CUDA when available, else CPU
    if getattr(model, "is_deq", False):
        model.set_defense(make_defense(defense if defense is not None else entry.defense))
    elif defense not in (None, "final"):
        raise ValueError(f"model {name!r} is not a DEQ; it has no defense {defense!r}")
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# built-in architectures (untrained; trained zoo entries are registered by model_zoo.zoo)
# ---------------------------------------------------------------------------------------------

def mdeq_factory(arch: str, in_channels: int, image_size, num_classes: int = 10,
                 defense="final"):
    def factory(**overrides):
        cfg_fields = {f.name for f in dataclasses.fields(MDEQ_CONFIGS[arch])}
        cfg_kw = {k: overrides.pop(k) for k in list(overrides) if k in cfg_fields}
        if "channels" in cfg_kw:
            cfg_kw["channels"] = tuple(cfg_kw["channels"])
        if "head_channels" in cfg_kw:
            cfg_kw["head_channels"] = tuple(cfg_kw["head_channels"])
        cfg = dataclasses.replace(MDEQ_CONFIGS[arch], **cfg_kw)
        solver = overrides.pop("solver", None)
        if isinstance(solver, dict):
            solver = make_solver(**solver)
        elif solver is not None and not isinstance(solver, Solver):
            raise TypeError(f"solver must be a Solver or a dict, got {type(solver).__name__}")
        d = make_defense(overrides.pop("defense", defense))
        ncls = overrides.pop("num_classes", num_classes)
        if overrides:
            raise TypeError(f"unknown override(s) for {arch}: {sorted(overrides)}")
        return MDEQClassifier(cfg, in_channels, image_size, ncls, solver=solver, defense=d)
    return factory


_PAPER = "Yang, Li, Pang, Liu. Improving Adversarial Robustness of DEQs with Explicit Regulations Along the Neural Dynamics"

for _arch, _ds, _shape in [("deq_large", "cifar10", (3, 32, 32)), ("deq_xl", "cifar10", (3, 32, 32)),
                           ("deq_tiny", "fashion_mnist", (1, 28, 28)),
                           ("deq_tiny", "cifar10", (3, 32, 32)),
                           ("deq_large", "fashion_mnist", (1, 28, 28))]:
    register(ModelEntry(name=f"{_arch}_{_ds}", factory=mdeq_factory(_arch, _shape[0], _shape[1:]),
                        dataset=_ds, input_shape=_shape, architecture=_arch,
                        paper=_PAPER, venue="ICML 2023",
                        notes="architecture only (untrained)"))

register(ModelEntry(name="resnet18_cifar10",
                    factory=lambda **kw: resnet18(3, (32, 32), kw.pop("num_classes", 10), **kw),
                    dataset="cifar10", input_shape=(3, 32, 32), architecture="resnet18",
                    notes="robustbench's CIFAR-layout ResNet-18 (untrained)"))
register(ModelEntry(name="small_cnn_fashion_mnist",
                    factory=lambda **kw: small_cnn(1, (28, 28), **kw),
                    dataset="fashion_mnist", input_shape=(1, 28, 28), architecture="small_cnn",
                    notes="deep-network baseline for the Fashion-MNIST zoo (untrained)"))


def _zoo_factory(base: str, overrides: dict):
    base_factory = get_entry(base).factory

    def factory(**kw):
        merged = dict(overrides)
        merged.update(kw)
        return base_factory(**merged)
    return factory


def load_zoo_file(path: Path = ZOO_FILE, overwrite: bool = False) -> list:
    """Register the trained entries listed in ``zoo.json`` (metadata as data)."""
    import json
    if not Path(path).is_file():
        return []
    names = []
    for e in json.loads(Path(path).read_text()):
        e = dict(e)
        base, overrides = e.pop("base"), e.pop("overrides", {})
        e["input_shape"] = tuple(e["input_shape"])
        register(ModelEntry(factory=_zoo_factory(base, overrides), **e), overwrite=overwrite)
        names.append(e["name"])
    return names


load_zoo_file()

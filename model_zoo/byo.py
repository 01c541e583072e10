"""Bring your own model: models from user code, identified by their weights.

* :func:`import_factory` resolves ``"package.module:function"`` or ``"path/to/file.py:function"``
  (the ``model: {factory: ...}`` key of run configs, ``--model-factory`` / ``--model-file``).
* :func:`register_user_model` puts such a model into the registry (so every entry point --
  ``model_zoo.load``, the runner, the leaderboard -- sees it like a zoo model) after checking
  its identity: a name is one set of weights.  A user model may not take a zoo model's name
  with other weights (the error names both), and every registered entry carries the SHA-256
  of its weights: of the checkpoint file, or, for a factory that builds its weights itself, of
  its state_dict (:func:`state_dict_sha256`).
* :data:`USER_HELP` is the text the "unknown model" errors add: how to bring one's own model.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .registry import ModelEntry, _REGISTRY, get_entry, register, sha256_file

__all__ = ["import_factory", "state_dict_sha256", "register_user_model", "UserModelError",
           "USER_HELP", "RESERVED_METADATA"]

USER_HELP = ("to evaluate your own model, register it in Python (model_zoo.register(name=..., "
             "factory=..., dataset=..., input_shape=(C, H, W))), call "
             "benchmark.benchmark(model, ...), give a run config "
             "'models: [{factory: \"package.module:function\" | \"path/to/file.py:function\", "
             "checkpoint: PATH, name: ...}]', or pass --model-factory MODULE:FN / "
             "--model-file FILE.py:FN on the command line")

#: metadata keys of a user model and what they mean (RobustBench model_info semantics).
RESERVED_METADATA = {
    "training": "how the weights were trained, e.g. 'pgd_at eps=0.1, 20 epochs' (footnote)",
    "authors": "authors of the model / paper (RobustBench 'authors')",
    "link": "URL of the paper or code (RobustBench 'link')",
    "paper": "title of the paper the model comes from",
    "venue": "venue of the paper, e.g. 'ICML 2023' (RobustBench 'venue')",
    "reported": "clean or robust accuracy the source reported, percent string such as '73.27' "
                "(RobustBench 'reported')",
}


class UserModelError(ValueError):
    """A user model spec that cannot be resolved, loaded or registered (one-line message);
    ``key``: the spec's key at fault (factory, checkpoint, sha256, name, or a metadata key)."""

    def __init__(self, message: str, key: str = "factory"):
        super().__init__(message)
        self.key = key


def import_factory(spec: str, base: Optional[Path] = None) -> Callable[..., nn.Module]:
    """``"pkg.mod:fn"`` (imported) or ``"path/to/file.py:fn"`` (loaded from the file; a relative
    path is looked up in the working directory, then in ``base``, e.g. the config's folder)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise UserModelError(f"a factory is 'package.module:function' or "
                             f"'path/to/file.py:function', got {spec!r}")
    target, _, fn = spec.rpartition(":")
    if not target or not fn.isidentifier():
        raise UserModelError(f"a factory is 'package.module:function' or "
                             f"'path/to/file.py:function', got {spec!r}")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_absolute() and not path.is_file() and base is not None:
            path = Path(base) / path
        if not path.is_file():
            raise UserModelError(f"factory file not found: {target}")
        path = path.resolve()
        modname = "deqbench_user_" + re.sub(r"\W", "_", str(path))
        if modname in sys.modules:
            mod = sys.modules[modname]
        else:
            # The file's folder goes on sys.path so that it can import its neighbours.
            if str(path.parent) not in sys.path:
                sys.path.insert(0, str(path.parent))
            s = importlib.util.spec_from_file_location(modname, path)
            mod = importlib.util.module_from_spec(s)
            sys.modules[modname] = mod
            try:
                s.loader.exec_module(mod)
            except Exception as e:
                del sys.modules[modname]
                raise UserModelError(f"cannot import {path}: {type(e).__name__}: {e}") from None
    else:
        # like `python -m`: modules of the working directory are importable
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            mod = importlib.import_module(target)
        except Exception as e:
            raise UserModelError(f"cannot import module {target!r} of factory {spec!r}: "
                                 f"{type(e).__name__}: {e}") from None
    f = getattr(mod, fn, None)
    if not callable(f):
        raise UserModelError(f"{target} has no function {fn!r} (factory {spec!r})")
    return f


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 over a module's state_dict (names, dtypes, shapes and bytes, in key order): the
    identity of weights that do not come from a checkpoint file."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check_sha(value, key: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise UserModelError(f"{key}: must be a 64-digit hex SHA-256, got {value!r}", key)
    return value.lower()


def register_user_model(name: str, factory: Callable[..., nn.Module], *, dataset: str,
                        input_shape, num_classes: int = 10, kwargs: Optional[dict] = None,
                        checkpoint=None, sha256: Optional[str] = None,
                        architecture: Optional[str] = None, source: str = "",
                        defense=None, **metadata) -> ModelEntry:
    """Register a model built by user code; returns its :class:`ModelEntry`.

    ``factory(**kwargs)`` builds the module (a plain classifier, or a model satisfying the DEQ
    protocol, e.g. a :class:`~model_zoo.torchdeq_adapter.TorchDEQClassifier`).  ``checkpoint``:
    weights to load (verified against ``sha256`` when given; a mismatch is an error).  Without
    a checkpoint the factory's own weights are evaluated and identified by their state_dict hash.
    ``metadata``: the keys of :data:`RESERVED_METADATA`.  ``defense``: the default forward of
    a DEQ (default: the model's own, ``model.defense``).

    Identity: a zoo model's name with other weights is refused (naming both); the same name
    registered again by user code with other weights replaces the earlier user entry.
    """
    unknown = set(metadata) - set(RESERVED_METADATA)
    if unknown:
        raise UserModelError(f"unknown model metadata {sorted(unknown)[0]!r} "
                             f"(known: {sorted(RESERVED_METADATA)})", sorted(unknown)[0])
    for k, v in metadata.items():
        if v is not None and not isinstance(v, str):
            raise UserModelError(f"{k}: must be a string, got {v!r}", k)
    rep = metadata.get("reported")
    if rep is not None:
        try:
            ok = 0 <= float(rep) <= 100
        except ValueError:
            ok = False
        if not ok:
            raise UserModelError(f"reported: the accuracy the source reported, a percent string "
                                 f"such as '73.27', got {rep!r}", "reported")
    kwargs = dict(kwargs or {})
    sha256 = _check_sha(sha256, "sha256")
    try:
        probe = factory(**kwargs)
    except Exception as e:
        raise UserModelError(f"factory of {name!r} failed: {type(e).__name__}: {e}") from None
    if not isinstance(probe, nn.Module):
        raise UserModelError(f"factory of {name!r} returned {type(probe).__name__}, "
                             "not a torch.nn.Module")
    if defense is None:
        # a DEQ's own forward (e.g. torchdeq's h(z*)) is its default: 'final' when it is the
        # harness's FinalState(), else its config
        from .forward import make_defense
        d = getattr(probe, "defense", None) if getattr(probe, "is_deq", False) else None
        defense = "final" if d is None or d.config() == make_defense("final").config() \
            else d.config()
    if checkpoint is not None:
        path = Path(checkpoint).expanduser().resolve()
        if not path.is_file():
            raise UserModelError(f"file not found: {checkpoint}", "checkpoint")
        found = sha256_file(path)
        if sha256 and found != sha256:
            raise UserModelError(f"checkpoint {path} has SHA-256 {found}, the config says "
                                 f"{sha256}: wrong or corrupt file", "sha256")
        sha256, weights = found, "checkpoint"
    else:
        path = None
        found = state_dict_sha256(probe)
        if sha256 and found != sha256:
            raise UserModelError(f"the weights built by the factory of {name!r} have state_dict "
                                 f"SHA-256 {found}, the config says {sha256}", "sha256")
        sha256, weights = found, "factory"
    old = _REGISTRY.get(name)
    if old is not None and not old.extra.get("user_model"):
        if old.sha256 != sha256:
            raise UserModelError(
                f"model name {name!r} is the zoo's ({old.checkpoint or 'untrained architecture'}, "
                f"SHA-256 {old.sha256 or 'none'}); these weights ({path or 'from the factory'}, "
                f"SHA-256 {sha256}) are another model: give it its own name", "name")
        return old  # the zoo's own weights under the zoo's name
    built_kwargs = kwargs

    def make(**overrides):
        kw = dict(built_kwargs)
        kw.update(overrides)
        return factory(**kw)

    entry = ModelEntry(
        name=name, factory=make, dataset=dataset, input_shape=tuple(input_shape),
        num_classes=int(num_classes),
        architecture=architecture or getattr(probe, "architecture", None) or type(probe).__name__,
        training=metadata.get("training") or "not stated",
        checkpoint=None if path is None else str(path), sha256=sha256,
        paper=metadata.get("paper") or "", venue=metadata.get("venue") or "", defense=defense,
        notes=f"user model ({source})" if source else "user model",
        extra={"user_model": True, "weights": weights, "source": source, "kwargs": kwargs,
               **{k: v for k, v in metadata.items() if k in ("authors", "link", "reported")
                  and v is not None}})
    return register(entry, overwrite=True)


def entry_metadata(entry: ModelEntry) -> dict:
    """authors / link / reported of an entry (zoo entries keep them in ``extra`` too)."""
    return {k: entry.extra.get(k) for k in ("authors", "link", "reported")}

"""The one door through which deqbench imports robustbench.

robustbench 1.1.1 does not import as installed (see /work/shared/reference/library-facts.md):

* ``robustbench/loaders.py`` does ``import pkg_resources``, which setuptools 81+ no longer
  ships.  Fix: ``pip install 'setuptools>=77.0.3,<81'``.
* ``robustbench/eval.py`` does ``from autoattack import AutoAttack`` and
  ``from autoattack.state import EvaluationState``, expecting the *old* upstream (fra31) API::

      adversary = AutoAttack(model, norm=threat_model_.value, eps=eps, version='standard',
                             device=device, log_path=log_path)
      x_adv = adversary.run_standard_evaluation(clean_x_test, clean_y_test,
                                                bs=batch_size, state_path=aa_state_path)
      ...
      aa_state = EvaluationState.from_disk(aa_state_path)   # only when a state path is given
      adv_accuracy = aa_state.robust_flags.mean().item()

  The AutoAttack we install is ``pyautoattack`` 0.2.0 (import name ``pyautoattack``), which
  renamed that API: keyword-only ``AutoAttack(model, *, attacks=None, device='cpu', eps=0.3,
  norm='Linf', seed=None, version='standard')``; ``run_standard_evaluation(x, y, /, *,
  batch_size=250, state_path=None)`` returns a *tuple* ``(x_adv, y_adv)``; there is no
  ``log_path`` / ``verbose`` / ``is_tf_model``; messages go to the ``logging`` logger
  ``auto-attack``.  :func:`install_autoattack_shim` registers a small module as
  ``sys.modules['autoattack']`` whose ``AutoAttack`` is an adapter (a subclass of
  ``pyautoattack.AutoAttack``) taking the old signature.
* The torchattacks 3.5.1 wheel ships its own, older top-level ``robustbench/`` package; whichever
  of the two installs last wins, and ``pip check`` does not notice.  The real 1.1.1
  ``robustbench/__init__.py`` contains ``from .eval import benchmark``.  Fix:
  ``pip install --no-deps --force-reinstall robustbench==1.1.1``
  (or ``python -m model_zoo.compat --repair``).

Importing this module is cheap: it imports neither torch nor robustbench nor pyautoattack, prints
nothing and downloads nothing.  robustbench is imported on first use by :func:`import_robustbench`.

Command line (used by ``make`` to verify the install)::

    python -m model_zoo.compat --check    # prints OK, or the problems and exits 1
    python -m model_zoo.compat --repair   # runs the pip fixes for the problems found
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

__all__ = [
    "CLASH_REPAIR_COMMAND",
    "SETUPTOOLS_REPAIR_COMMAND",
    "RobustbenchInstallError",
    "install_autoattack_shim",
    "legacy_autoattack_class",
    "import_robustbench",
    "check_robustbench_install",
    "repair_robustbench_install",
    "resnet18",
    "robustbench_benchmark", "OfflineDataError",
    "robustbench_benchmark_local",
    "load_model_info_json",
    "main",
]

ROBUSTBENCH_VERSION = "1.1.1"
#: The line that only the real robustbench 1.1.1 ``__init__.py`` has (not torchattacks' copy).
ROBUSTBENCH_MARKER_LINE = "from .eval import benchmark"
CLASH_REPAIR_COMMAND = f"pip install --no-deps --force-reinstall robustbench=={ROBUSTBENCH_VERSION}"
SETUPTOOLS_REPAIR_COMMAND = "pip install 'setuptools>=77.0.3,<81'"
PYAUTOATTACK_INSTALL_COMMAND = "pip install pyautoattack==0.2.0"

# pip argument lists for --repair (run as `sys.executable -m pip ...`).
_REPAIR_ARGS = {
    "setuptools": ["install", "setuptools>=77.0.3,<81"],
    "clash": ["install", "--no-deps", "--force-reinstall", f"robustbench=={ROBUSTBENCH_VERSION}"],
}

_SHIM_FLAG = "__deqbench_autoattack_shim__"
# pyautoattack submodules that keep their upstream `autoattack.<name>` names.  Only `state` is
# needed by robustbench; the rest are aliased so `from autoattack.autopgd_base import APGDAttack`
# style imports keep working (their attack classes kept the upstream signatures).
_ALIASED_SUBMODULES = ("state", "checks", "other_utils", "autopgd_base", "fab_base",
                       "fab_projections", "fab_pt", "square")


class RobustbenchInstallError(ImportError):
    """robustbench (or the AutoAttack it needs) cannot be imported; the message says how to fix."""


class _Problem(NamedTuple):
    kind: str      # "clash", "setuptools", "missing", "autoattack", "import"
    message: str


# --------------------------------------------------------------------------------------------
# AutoAttack shim
# --------------------------------------------------------------------------------------------

_ADAPTER_CLASS: Optional[type] = None


def _has_old_autoattack_api(module: Any) -> bool:
    """True when ``module.AutoAttack`` takes the old upstream signature (``log_path``, ``bs``)."""
    cls = getattr(module, "AutoAttack", None)
    if not isinstance(cls, type):
        return False
    try:
        init_params = inspect.signature(cls.__init__).parameters
        run_params = inspect.signature(cls.run_standard_evaluation).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    return "log_path" in init_params and "bs" in run_params


def _logger_for(log_path: Any) -> logging.Logger:
    """The logger an adapter instance writes to.

    Old upstream AutoAttack wrote its log to ``log_path`` (its own ``Logger``); pyautoattack logs to
    the ``logging`` logger ``auto-attack``.  For a ``log_path`` we use a child logger
    ``auto-attack.file.<hash of path>`` holding one appending FileHandler, created once per path,
    so records still propagate to handlers configured on ``auto-attack`` and the root.
    """
    base = logging.getLogger("auto-attack")
    if log_path is None:
        return base
    path = os.path.abspath(os.fspath(log_path))
    name = "auto-attack.file." + hashlib.sha1(path.encode()).hexdigest()[:12]
    logger = logging.getLogger(name)
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == path
               for h in logger.handlers):
        handler = logging.FileHandler(path, mode="a", delay=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return logger


def _default_device(model: Any) -> Any:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"


def legacy_autoattack_class() -> type:
    """The adapter class ``autoattack.AutoAttack`` resolves to once the shim is installed.

    Built on first call (it subclasses ``pyautoattack.AutoAttack``, whose import pulls in torch).
    """
    global _ADAPTER_CLASS
    if _ADAPTER_CLASS is not None:
        return _ADAPTER_CLASS
    try:
        import pyautoattack
        from pyautoattack.autoattack import AutoAttack as _NewAutoAttack
    except ImportError as exc:
        raise RobustbenchInstallError(
            f"pyautoattack is not importable ({exc}); install it: {PYAUTOATTACK_INSTALL_COMMAND}"
        ) from exc

    class AutoAttack(_NewAutoAttack):
        """pyautoattack's AutoAttack behind the old upstream (fra31) ``autoattack`` API.

        Why this exists: robustbench 1.1.1 calls ``AutoAttack(model, norm=..., eps=...,
        version='standard', device=..., log_path=...)`` and
        ``run_standard_evaluation(x, y, bs=..., state_path=...)`` expecting ``x_adv`` back, but the
        installed ``pyautoattack`` 0.2.0 renamed that API (keyword-only ``attacks=``,
        ``batch_size=``, tuple return, no ``log_path``/``verbose``).  Everything else (the
        attacks, ``apgd``/``apgd_targeted``/``fab``/``square`` knobs, ``attacks_to_run``,
        ``seed``, checks) is pyautoattack's own code, inherited unchanged.

        Differences from old upstream, on purpose:

        * ``device=None`` (default) means the device of the model's parameters, else ``'cuda'``
          when available, else ``'cpu'`` (upstream defaulted to ``'cuda'``, which fails on CPU
          machines).  pyautoattack never moves the model.
        * Messages go to the ``logging`` logger ``auto-attack`` (``log_path`` adds a file
          handler); nothing is printed.
        * ``run_standard_evaluation_individual`` restores ``attacks_to_run`` afterwards.
        * Resuming from an existing ``state_path`` raises ``NotImplementedError``: pyautoattack
          0.2.0 cannot resume (its state JSON stores the attack set as a string, which never
          matches; reloaded ``_run_attacks`` is a list; and its resume branch never defines
          ``y_adv``).  A fresh ``state_path`` works and is written, so robustbench's
          ``EvaluationState.from_disk(aa_state_path)`` after the run reads the robust flags.
        * ``is_tf_model=True`` raises ``NotImplementedError`` (pyautoattack's AutoAttack has no
          TF path).
        """

        def __init__(self, model, norm="Linf", eps=.3, seed=None, verbose=True,
                     attacks_to_run=(), version="standard", is_tf_model=False, device=None,
                     log_path=None):
            if is_tf_model:
                raise NotImplementedError("pyautoattack's AutoAttack supports PyTorch models only")
            attacks_to_run = list(attacks_to_run or [])
            if version != "custom" and attacks_to_run:
                raise ValueError("attacks_to_run will be overridden unless you use version='custom'")
            if device is None:
                device = _default_device(model)
            super().__init__(model,
                             attacks=attacks_to_run if version == "custom" else None,
                             device=device, eps=eps, norm=norm, seed=seed, version=version)
            self.verbose = verbose
            self.is_tf_model = False
            self.log_path = log_path
            logger = _logger_for(log_path)
            self.logger = logger
            self.apgd.logger = logger
            self.apgd_targeted.logger = logger

        def set_version(self, version="standard"):
            """Old public name of pyautoattack's ``_set_version``."""
            self.version = version
            self._set_version(version)

        def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False,
                                    state_path=None, *, batch_size=None):
            """Old API: returns ``x_adv``, or ``(x_adv, y_adv)`` with ``return_labels=True``.

            ``batch_size=`` (pyautoattack's name) is accepted as an alias of ``bs``.
            """
            bs = bs if batch_size is None else batch_size
            if state_path is not None:
                state_path = Path(state_path)
                if state_path.exists():
                    raise NotImplementedError(
                        f"AutoAttack state file {state_path} exists, but pyautoattack 0.2.0 cannot "
                        "resume from a state file (its saved attack set never matches and its "
                        "resume branch is broken). Delete the file to start over, or resume at "
                        "the project level.")
            x_adv, y_adv = _NewAutoAttack.run_standard_evaluation(
                self, x_orig, y_orig, batch_size=bs, state_path=state_path)
            return (x_adv, y_adv) if return_labels else x_adv

        def run_standard_evaluation_individual(self, x_orig, y_orig, bs=250,
                                               return_labels=False, *, batch_size=None):
            """Old API: ``{attack: x_adv}`` (or ``{attack: (x_adv, y_adv)}``), each attack alone."""
            bs = bs if batch_size is None else batch_size
            attacks = list(self.attacks_to_run)
            verbose = self.verbose
            if verbose:
                self.logger.info("using {} version including {}".format(
                    self.version, ", ".join(attacks)))
            adv = {}
            self.verbose = False
            try:
                for attack in attacks:
                    self.attacks_to_run = [attack]
                    x_adv, y_adv = _NewAutoAttack.run_standard_evaluation(
                        self, x_orig, y_orig, batch_size=bs)
                    adv[attack] = (x_adv, y_adv) if return_labels else x_adv
                    if verbose:
                        acc = self.clean_accuracy(x_adv, y_orig, bs=bs)
                        self.logger.info("robust accuracy by {}\t{:.2%}".format(attack.upper(), acc))
            finally:
                self.attacks_to_run = attacks
                self.verbose = verbose
            return adv

    AutoAttack.__module__ = "autoattack"
    AutoAttack.__qualname__ = "AutoAttack"
    AutoAttack.__pyautoattack_version__ = getattr(pyautoattack, "__version__", None)
    _ADAPTER_CLASS = AutoAttack
    return AutoAttack


def _build_shim() -> tuple[types.ModuleType, dict[str, types.ModuleType]]:
    adapter = legacy_autoattack_class()
    import pyautoattack

    shim = types.ModuleType(
        "autoattack",
        "deqbench shim (model_zoo/compat.py): the old upstream `autoattack` API on top of "
        "pyautoattack " + str(getattr(pyautoattack, "__version__", "?")) + ".")
    shim.__path__ = []          # a package, so `autoattack.<sub>` resolves through sys.modules
    shim.__file__ = __file__
    shim.__version__ = getattr(pyautoattack, "__version__", None)
    setattr(shim, _SHIM_FLAG, True)
    shim.AutoAttack = adapter
    submodules = {}
    for name in _ALIASED_SUBMODULES:
        try:
            submodules[name] = importlib.import_module(f"pyautoattack.{name}")
        except ImportError:
            if name == "state":
                raise
    for name, module in submodules.items():
        setattr(shim, name, module)
    return shim, submodules


def install_autoattack_shim() -> types.ModuleType:
    """Make ``import autoattack`` give the old upstream API; return the ``autoattack`` module.

    * If our shim is already registered, return it.
    * If a real ``autoattack`` package with the old API is importable, leave it alone (only add
      ``autoattack.state`` from pyautoattack if that package lacks one) and return it.
    * Otherwise register a shim module as ``sys.modules['autoattack']`` whose ``AutoAttack`` is
      :func:`legacy_autoattack_class`, plus ``autoattack.state`` etc. aliased to pyautoattack's
      submodules.  An importable ``autoattack`` without the old API is shadowed (for this process).
    """
    existing = sys.modules.get("autoattack")
    if existing is not None and getattr(existing, _SHIM_FLAG, False):
        return existing

    real = existing
    if real is None:
        try:
            spec = importlib.util.find_spec("autoattack")
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            try:
                real = importlib.import_module("autoattack")
            except Exception:   # a broken package: shadow it below
                real = None
    if real is not None and _has_old_autoattack_api(real):
        try:
            importlib.import_module("autoattack.state")
        except ImportError:
            state = importlib.import_module("pyautoattack.state")
            sys.modules["autoattack.state"] = state
            real.state = state
        return real

    for name in [n for n in sys.modules if n == "autoattack" or n.startswith("autoattack.")]:
        del sys.modules[name]
    shim, submodules = _build_shim()
    sys.modules["autoattack"] = shim
    for name, module in submodules.items():
        sys.modules[f"autoattack.{name}"] = module
    return shim


# --------------------------------------------------------------------------------------------
# Install checks
# --------------------------------------------------------------------------------------------

def _clash_message(init_file: Path, why: str) -> str:
    return (f"robustbench at {init_file.parent} is not robustbench {ROBUSTBENCH_VERSION} ({why}); "
            "the torchattacks wheel ships an older top-level robustbench/ that overwrites the real "
            f"one. Repair: {CLASH_REPAIR_COMMAND}  (or: python -m model_zoo.compat --repair)")


def _robustbench_init_file(site_dir: Optional[os.PathLike | str]) -> tuple[Optional[Path], Optional[_Problem]]:
    """Where robustbench's ``__init__.py`` is (or should be), without importing robustbench."""
    if site_dir is not None:
        pkg = Path(site_dir) / "robustbench"
        if not pkg.is_dir():
            return None, _Problem("missing", f"no robustbench package under {site_dir}; install it: "
                                             f"pip install robustbench=={ROBUSTBENCH_VERSION}")
        return pkg / "__init__.py", None
    module = sys.modules.get("robustbench")
    spec = getattr(module, "__spec__", None) if module is not None else None
    if spec is None:
        try:
            spec = importlib.util.find_spec("robustbench")
        except (ImportError, ValueError):
            spec = None
    if spec is None:
        return None, _Problem("missing", "robustbench is not installed; install it: "
                                         f"pip install robustbench=={ROBUSTBENCH_VERSION}")
    if spec.origin and spec.origin.endswith("__init__.py"):
        return Path(spec.origin), None
    locations = list(spec.submodule_search_locations or [])
    base = Path(locations[0]) if locations else Path("robustbench")
    return base / "__init__.py", None


def _record_mismatches(site_dir: Optional[os.PathLike | str] = None) -> list[str]:
    """robustbench/ files whose content differs from the robustbench dist-info RECORD hashes.

    torchattacks' copy overwrites more than ``__init__.py`` (``eval.py``, ``utils.py``, ``data.py``,
    ``model_zoo/*`` ...), so a correct ``__init__.py`` alone does not prove a clean install.
    Empty when no robustbench dist-info is found (nothing to compare against).
    """
    import importlib.metadata as metadata
    try:
        if site_dir is None:
            dist = metadata.distribution("robustbench")
        else:
            found = list(metadata.distributions(name="robustbench", path=[str(site_dir)]))
            if not found:
                return []
            dist = found[0]
    except metadata.PackageNotFoundError:
        return []
    changed = []
    for record in dist.files or []:
        if record.hash is None or not record.parts or record.parts[0] != "robustbench":
            continue
        path = Path(record.locate())
        try:
            digest = hashlib.new(record.hash.mode, path.read_bytes()).digest()
        except (OSError, ValueError):
            changed.append(str(record))
            continue
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != record.hash.value:
            changed.append(str(record))
    return changed


def _find_problems(site_dir: Optional[os.PathLike | str] = None) -> list[_Problem]:
    problems: list[_Problem] = []
    init_file, missing = _robustbench_init_file(site_dir)
    if missing is not None:
        problems.append(missing)
    elif init_file is not None:
        if not init_file.is_file():
            problems.append(_Problem("clash", _clash_message(
                init_file, "robustbench/__init__.py is missing: the folder was emptied, "
                           "e.g. by uninstalling torchattacks")))
        else:
            text = init_file.read_text(encoding="utf-8", errors="replace")
            if ROBUSTBENCH_MARKER_LINE not in {line.strip() for line in text.splitlines()}:
                problems.append(_Problem("clash", _clash_message(
                    init_file, f"its __init__.py lacks the line `{ROBUSTBENCH_MARKER_LINE}`")))
            else:
                changed = _record_mismatches(site_dir)
                if changed:
                    shown = ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else "")
                    problems.append(_Problem("clash", _clash_message(
                        init_file, f"{len(changed)} of its files differ from what the installed "
                                   f"robustbench wheel recorded: {shown}")))
    if importlib.util.find_spec("pkg_resources") is None:
        problems.append(_Problem("setuptools",
                                 "pkg_resources is missing (setuptools 81+ dropped it) and "
                                 f"robustbench imports it. Fix: {SETUPTOOLS_REPAIR_COMMAND}"))
    autoattack_mod = sys.modules.get("autoattack")
    have_autoattack = autoattack_mod is not None and (
        getattr(autoattack_mod, _SHIM_FLAG, False) or _has_old_autoattack_api(autoattack_mod))
    if not have_autoattack and importlib.util.find_spec("pyautoattack") is None:
        problems.append(_Problem("autoattack",
                                 "pyautoattack is not installed (robustbench needs AutoAttack). "
                                 f"Fix: {PYAUTOATTACK_INSTALL_COMMAND}"))
    return problems


def check_robustbench_install(site_dir: Optional[os.PathLike | str] = None, *,
                              try_import: bool = False) -> list[str]:
    """Problems with the robustbench install, as human-readable messages ([] when fine).

    :param site_dir: look for ``robustbench/`` in this folder instead of where Python finds it
        (the environment checks, ``pkg_resources`` and pyautoattack, are unaffected).
    :param try_import: also import robustbench (through the shim) and check ``benchmark`` exists;
        slower (a few seconds: timm, torchvision), meant for ``--check``.
    """
    problems = _find_problems(site_dir)
    if try_import and not problems and site_dir is None:
        try:
            rb = import_robustbench()
            if not callable(getattr(rb, "benchmark", None)):
                problems.append(_Problem("clash", _clash_message(
                    Path(rb.__file__), "it has no callable `benchmark`")))
        except Exception as exc:    # report, do not raise: this is a checker
            problems.append(_Problem("import", f"import robustbench failed: "
                                               f"{type(exc).__name__}: {exc}"))
    return [p.message for p in problems]


def repair_robustbench_install(site_dir: Optional[os.PathLike | str] = None, *,
                               dry_run: bool = False) -> list[list[str]]:
    """Run the pip commands that fix the detected clash / missing ``pkg_resources``.

    Returns the commands (argument lists) run, or that would run with ``dry_run=True``.
    Raises ``subprocess.CalledProcessError`` when pip fails.
    """
    kinds = {p.kind for p in _find_problems(site_dir)}
    commands = [[sys.executable, "-m", "pip", *_REPAIR_ARGS[kind]]
                for kind in ("setuptools", "clash") if kind in kinds]
    if not dry_run:
        for command in commands:
            subprocess.run(command, check=True)
        importlib.invalidate_caches()
    return commands


# --------------------------------------------------------------------------------------------
# robustbench access
# --------------------------------------------------------------------------------------------

def import_robustbench() -> types.ModuleType:
    """Install the AutoAttack shim, then import and return the ``robustbench`` module.

    Known install problems become :class:`RobustbenchInstallError` with the fix in the message.
    The import-time deprecation noise of robustbench's dependencies (pkg_resources, timm, torch.jit)
    is silenced; nothing is downloaded.
    """
    module = sys.modules.get("robustbench")
    if module is not None and callable(getattr(module, "benchmark", None)):
        install_autoattack_shim()
        return module
    problems = _find_problems()
    if problems:
        raise RobustbenchInstallError("robustbench cannot be imported:\n  "
                                      + "\n  ".join(p.message for p in problems))
    install_autoattack_shim()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*pkg_resources is deprecated.*")
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            import robustbench
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "pkg_resources":
            raise RobustbenchInstallError(
                "robustbench imports pkg_resources, which setuptools 81+ no longer ships. "
                f"Fix: {SETUPTOOLS_REPAIR_COMMAND}") from exc
        clash = [p for p in _find_problems() if p.kind == "clash"]
        if clash:
            raise RobustbenchInstallError(clash[0].message) from exc
        raise
    except ImportError as exc:
        clash = [p for p in _find_problems() if p.kind == "clash"]
        if clash:
            raise RobustbenchInstallError(clash[0].message) from exc
        raise
    if not callable(getattr(robustbench, "benchmark", None)):
        raise RobustbenchInstallError(_clash_message(Path(robustbench.__file__),
                                                     "it has no callable `benchmark`"))
    return robustbench


class OfflineDataError(FileNotFoundError):
    """robustbench would have downloaded a dataset and the caller did not allow it."""


def _refuse_torchvision_cifar_download(self) -> None:
    # torchvision's CIFAR10/CIFAR100.download without the network: files already in place
    # pass, anything else is a clear error instead of a fetch.
    if self._check_integrity():
        return
    raise OfflineDataError(
        f"robustbench.benchmark wants to download {type(self).__name__} into {self.root!r}; "
        "nothing is downloaded unless you ask: put cifar-10-batches-py/ (or "
        "cifar-100-python/) there, use robustbench_benchmark_local() with images loaded by "
        "benchmark.data.load_dataset, or pass allow_download=True (needs network)")


def robustbench_benchmark(*args: Any, allow_download: bool = False, **kwargs: Any):
    """Thin pass-through to ``robustbench.benchmark`` (robustbench 1.1.1, through the shim).

    ``allow_download=False`` (default): robustbench's CIFAR loader (torchvision, which it calls
    with ``download=True``) may only read files already in ``data_dir``; a missing dataset
    raises :class:`OfflineDataError` before any network access. ``True`` lets it download.

    Signature there: ``benchmark(model, n_examples=10000, dataset='cifar10', threat_model='Linf',
    to_disk=False, model_name=None, data_dir='./data', corruptions_data_dir=None, device=None,
    batch_size=32, eps=None, log_path=None, preprocessing=None, aa_state_path=None)`` ->
    ``(clean_accuracy, adversarial_accuracy)``.  Beware: it always runs the full standard
    AutoAttack, loads CIFAR through torchvision with ``download=True`` (fails offline unless
    ``data_dir`` already holds the dataset), prints its accuracies, and ``to_disk=True`` writes
    ``./model_info/...`` relative to the working directory.

    ``aa_state_path`` is refused (``NotImplementedError``): robustbench 1.1.1 then computes
    ``EvaluationState.from_disk(path).robust_flags.mean()`` on a *bool* tensor, which torch rejects
    (``RuntimeError: mean(): could not infer output dtype``) after the whole attack has run, and
    pyautoattack 0.2.0 cannot resume from the state anyway.
    """
    if kwargs.get("aa_state_path") is not None or (len(args) >= 14 and args[13] is not None):
        raise NotImplementedError(
            "aa_state_path is broken in robustbench 1.1.1 (it calls .mean() on the bool "
            "robust_flags after the attack) and pyautoattack 0.2.0 cannot resume; pass "
            "aa_state_path=None and resume at the project level.")
    rb = import_robustbench()
    if allow_download:
        return rb.benchmark(*args, **kwargs)
    import torchvision.datasets as tvd
    old = tvd.CIFAR10.download  # CIFAR100 inherits it
    tvd.CIFAR10.download = _refuse_torchvision_cifar_download
    try:
        return rb.benchmark(*args, **kwargs)
    finally:
        tvd.CIFAR10.download = old


def robustbench_benchmark_local(model, x, y, eps: float, dataset: str = "cifar10",
                                batch_size: int = 32, device=None, **kwargs):
    """``robustbench.benchmark()`` on images WE loaded (e.g. ``benchmark.data.load_dataset``
    from a local ``cifar-10-batches-py/``) instead of robustbench's loader, which downloads
    through torchvision (``download=True``) and fails offline. robustbench's own clean-accuracy
    and AutoAttack code then runs unchanged on ``x`` (N, C, H, W in [0, 1]) and ``y``.

    ``dataset`` is robustbench's label ('cifar10', 'cifar100', 'imagenet'); it only selects
    robustbench's preprocessing (none for CIFAR) and the ``to_disk`` folder, so for a dataset
    robustbench does not know (Fashion-MNIST) keep 'cifar10' with ``to_disk=False``. Returns
    ``(clean_accuracy, adversarial_accuracy)`` as robustbench computes them."""
    import torch
    if x.ndim != 4 or len(x) != len(y):
        raise ValueError(f"x must be (N, C, H, W) with len(y) == N, got {tuple(x.shape)} and {tuple(y.shape)}")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError("x must lie in [0, 1]")
    import_robustbench()
    rb_eval = sys.modules["robustbench.eval"]
    n = len(x)

    def local_loader(_dataset, n_examples, _data_dir, _prepr):
        return x[:n_examples].cpu(), y[:n_examples].cpu()

    # robustbench.eval imported load_clean_dataset by name: patch it there, for this call only.
    old = rb_eval.load_clean_dataset
    rb_eval.load_clean_dataset = local_loader
    try:
        return robustbench_benchmark(model, n_examples=n, dataset=dataset, threat_model="Linf",
                                     eps=eps, batch_size=batch_size,
                                     device=device or torch.device("cpu"), **kwargs)
    finally:
        rb_eval.load_clean_dataset = old


def resnet18(num_classes: int = 10):
    """robustbench's CIFAR-layout ResNet-18 (3x3 stem, no max-pool, 32x32 inputs), untrained.

    ``robustbench.model_zoo.architectures.resnet.ResNet18()`` takes no ``num_classes``, so the
    same network is built as ``ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)``;
    11,173,962 parameters for 10 classes.
    """
    import_robustbench()
    from robustbench.model_zoo.architectures.resnet import BasicBlock, ResNet
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


def load_model_info_json(path: os.PathLike | str) -> dict:
    """Read one robustbench model-entry JSON (``model_info/<dataset>/<threat>/<name>.json``).

    robustbench 1.1.1 has no reusable reader for these files: ``utils.list_available_models``,
    ``utils.get_leaderboard_latex``/``get_leaderboard_bibtex`` and
    ``leaderboard.template.generate_leaderboard`` each inline ``json.load`` on paths under a
    hard-coded ``./model_info`` (and print), and its ``utils.ModelInfo`` dataclass lacks the
    ``external``/``unreliable`` fields real entries use.  So this is our own plain reader: the
    values are returned as stored (accuracies and ``eps`` are strings, e.g. ``"8/255"``).
    """
    with open(path, "r", encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a model_info entry must be a JSON object, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_zoo.compat",
                                     description="Check (default) or repair the robustbench install.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="print OK or the problems found; exit 1 on problems")
    mode.add_argument("--repair", action="store_true",
                      help="run the pip commands that fix the problems found, then check again")
    parser.add_argument("--site-dir", default=None,
                        help="look for robustbench/ in this folder instead of sys.path")
    parser.add_argument("--no-import", action="store_true",
                        help="only inspect files; do not import robustbench")
    args = parser.parse_args(argv)
    try_import = not args.no_import and args.site_dir is None

    if args.repair:
        commands = repair_robustbench_install(args.site_dir, dry_run=True)
        for command in commands:
            print("running:", " ".join(command), flush=True)
            completed = subprocess.run(command)
            if completed.returncode != 0:
                print(f"FAILED (exit {completed.returncode}): {' '.join(command)}")
                return 1
        if commands:
            # Check again in a fresh interpreter: this one may hold a half-imported robustbench.
            recheck = [sys.executable, os.path.abspath(__file__), "--check"]
            if args.site_dir is not None:
                recheck += ["--site-dir", str(args.site_dir)]
            if args.no_import:
                recheck.append("--no-import")
            return subprocess.run(recheck).returncode

    problems = check_robustbench_install(args.site_dir, try_import=try_import)
    if problems:
        for problem in problems:
            print("PROBLEM:", problem)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

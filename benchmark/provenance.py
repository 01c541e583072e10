"""What goes into every result record: versions, git commit, device, time."""
from __future__ import annotations

import datetime as _dt
import platform
import subprocess
from pathlib import Path

import torch

_PACKAGES = ["torch", "torchvision", "torchdeq", "pyautoattack", "torchattacks", "robustbench",
             "numpy", "pandas"]


def git_commit(path=None) -> str:
    """The commit of the deqbench checkout (with '+dirty' for uncommitted changes), or 'unknown'."""
    cwd = Path(path or Path(__file__).resolve().parent.parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def device_description(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(device="cpu", **extra) -> dict:
    from model_zoo.runtime import allocator_state
    return {"git_commit": git_commit(), "versions": package_versions(),
            "device": device_description(device),
            "allocator": allocator_state(),  # speed only: the numbers are the same either way
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **extra}

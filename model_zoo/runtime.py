"""Process-level settings that make CPU evaluation faster without changing any number.

``tune_allocator()`` keeps freed tensor memory inside the process instead of handing it back to
the kernel after every op. PyTorch's CPU allocator is glibc's malloc: a tensor above malloc's
mmap threshold (128 KiB at start, raised only after such a chunk is freed) gets fresh pages from
the kernel, and freeing it (or trimming the heap top) returns them, so the next op of the same
size page-faults its output in again. On this 2-core VM one process measured ~95,000 minor page
faults and 16% kernel time per Sec. 3.2 forward of 64 Fashion-MNIST images; with the settings
below, ~200 faults and <1%. Whether the default falls into this depends on the process's
allocation history (``python -m benchmark.bench_alloc`` measures both sides in fresh processes,
where the default threshold had often adapted: plain forward 1.06x, Sec. 3.2 1.00x). torch has no CPU caching
allocator to switch on and jemalloc/tcmalloc would need an LD_PRELOAD before start, hence these
three ``mallopt`` calls (ours). Values are unchanged: only where memory comes from differs.

The cost is memory held: up to ``trim_mib`` of freed heap stays mapped (the RSS does not shrink
back after a peak). ``DEQBENCH_MALLOC=default`` (or ``0``) turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_allocator", "allocator_state"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_STATE = {"tuned": False, "reason": "not requested"}


def tune_allocator(mmap_mib: int = 32, trim_mib: int = 512, top_pad_mib: int = 64) -> bool:
    """Raise glibc malloc's mmap threshold to ``mmap_mib`` (its maximum on 64-bit Linux is
    32 MiB), its trim threshold to ``trim_mib`` and its top pad to ``top_pad_mib``. Returns
    whether the settings were applied; a no-op (False) off glibc Linux or with
    ``DEQBENCH_MALLOC=default``. Idempotent; call it once at process start."""
    if _STATE["tuned"]:
        return True
    if os.environ.get("DEQBENCH_MALLOC", "").lower() in ("default", "0", "off", "no"):
        _STATE["reason"] = "DEQBENCH_MALLOC=default"
        return False
    if not sys.platform.startswith("linux"):
        _STATE["reason"] = f"not glibc Linux ({sys.platform})"
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        _STATE["reason"] = "no glibc mallopt"
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(k, v << 20) == 1 for k, v in ((_M_MMAP_THRESHOLD, mmap_mib),
                                                    (_M_TRIM_THRESHOLD, trim_mib),
                                                    (_M_TOP_PAD, top_pad_mib)))
    _STATE.update(tuned=ok, reason="applied" if ok else "mallopt refused a value",
                  mmap_mib=mmap_mib, trim_mib=trim_mib, top_pad_mib=top_pad_mib)
    return ok


def allocator_state() -> dict:
    """Whether :func:`tune_allocator` applied its settings in this process, and why not."""
    return dict(_STATE)

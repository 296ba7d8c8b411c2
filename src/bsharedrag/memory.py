"""The process's resident memory: its peak, resetting the peak, and handing freed memory back."""

from __future__ import annotations

import ctypes
import gc
import resource
from pathlib import Path

__all__ = ["free_memory", "peak_rss_mib", "reset_peak_rss", "trim_heap"]

_STATUS = Path("/proc/self/status")


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (since the start, or since `reset_peak_rss`).

    Linux's VmHWM belongs to the process's own address space. `ru_maxrss` is not used where VmHWM
    exists: it survives `exec`, so a child started by a large parent reports the parent's peak.
    """
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux and BSD report KiB


def reset_peak_rss() -> bool:
    """Start measuring the peak anew from the current resident memory (Linux); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def trim_heap() -> None:
    """Hand the heap's free pages back to the system (glibc; elsewhere nothing to do).

    glibc keeps freed blocks below its mmap threshold (which grows up to 32 MiB) in the heap, and
    tensors of ever-changing shapes fragment it: without a trim the resident memory of a long loop
    climbs well above what it holds. One trim takes milliseconds, so loops call it once per step.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def free_memory() -> None:
    """Collect unreachable objects, then trim the heap: between stages and the phases of a stage."""
    gc.collect()
    trim_heap()


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - raises AttributeError where the C library is not glibc
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()

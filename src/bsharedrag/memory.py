"""The process's resident memory: its peak, resetting the peak, and handing freed memory back."""

from __future__ import annotations

import ctypes
import gc
import resource
from pathlib import Path

__all__ = ["free_memory", "peak_rss_mib", "reset_peak_rss"]

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


def free_memory() -> None:
    """Collect unreachable objects and hand the heap's free pages back to the system.

    glibc keeps freed blocks below its mmap threshold (which grows up to 32 MiB) in the heap, so
    without the trim a process keeps much of a finished stage's peak resident.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass

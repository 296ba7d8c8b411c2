"""Measurements: the peak memory a child process reports is its own; a heap trim hands pages back."""

import subprocess
import sys
from pathlib import Path

import pytest

from bsharedrag import memory
from bsharedrag.efficiency import _percentile, peak_rss_mib


def test_a_child_does_not_report_its_parents_peak_memory():
    ballast = bytearray(400 * 2**20)  # the parent's peak grows by 400 MiB
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    assert peak_rss_mib() > 400
    child = subprocess.run([sys.executable, "-c", "from bsharedrag.efficiency import peak_rss_mib; "
                            "print(peak_rss_mib())"], capture_output=True, text=True, check=True)
    assert float(child.stdout) < 300
    del ballast


def test_percentiles_pick_ranked_values():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert _percentile(values, 0.5) == 3.0
    assert _percentile(values, 0.95) == 5.0
    assert _percentile([7.0], 0.95) == 7.0


def _resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(memory._LIBC is None or not Path("/proc/self/status").exists(), reason="glibc on Linux only")
def test_trim_heap_returns_the_free_pages_inside_the_heap():
    blocks = [bytes(4096) for _ in range(16_000)]  # 64 MiB of heap blocks, above Python's small-object arenas
    kept = blocks[::16]  # pins the heap: the free runs between them are not at its top, so free() keeps them
    del blocks
    before = _resident_mib()
    memory.trim_heap()
    assert _resident_mib() < before - 30
    assert len(kept) == 1000

"""Serving measurements: the peak memory a child process reports is its own."""

import subprocess
import sys

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

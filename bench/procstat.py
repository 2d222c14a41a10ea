"""What the benchmarks read of their own process: /proc/self/status fields (Linux), for peak and current RSS."""

from __future__ import annotations


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmHWM`` peak RSS, ``VmRSS``, ``RssAnon``, …)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")

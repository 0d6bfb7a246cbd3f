"""Facts about the machine, for the records that results and shipped files keep."""

from __future__ import annotations

import platform
import resource
from pathlib import Path


def _cpuinfo_field(name: str) -> str | None:
    """The first value of `name` in /proc/cpuinfo, None where there is none (not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module says."""
    return _cpuinfo_field("model name") or platform.processor()


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags (/proc/cpuinfo: avx512f, avx512_bf16, ...); empty where unknown."""
    return set((_cpuinfo_field("flags") or "").split())


def peak_rss_gib() -> float:
    """The largest resident memory this process has had, in GiB (Linux counts it in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20

"""Small, dependency-free helpers: percentiles, medians, /proc readers, machine facts."""

from __future__ import annotations

import os
import platform
import resource
import sys
from collections.abc import Iterable, Sequence

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of an already sorted sequence; None if empty."""
    n = len(sorted_values)
    if n == 0:
        return None
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile out of range: {q}")
    if n == 1:
        return float(sorted_values[0])
    pos = (n - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(sorted_values[lo]) + (float(sorted_values[hi]) - float(sorted_values[lo])) * frac


def summarize_latencies(values: Iterable[float]) -> dict[str, float | int | None]:
    """p50/p90/p99/max in milliseconds from seconds."""
    s = sorted(values)
    out: dict[str, float | int | None] = {"n": len(s)}
    for name, q in (("p50_ms", 50.0), ("p90_ms", 90.0), ("p99_ms", 99.0)):
        v = percentile(s, q)
        out[name] = None if v is None else round(v * 1000.0, 3)
    out["max_ms"] = round(s[-1] * 1000.0, 3) if s else None
    return out


def median(values: Iterable[float | int | None]) -> float | int | None:
    """Median of the non-None values (lower/upper mean for even counts); None if there are none."""
    s = sorted(v for v in values if v is not None)
    n = len(s)
    if n == 0:
        return None
    mid = n // 2
    if n % 2:
        return s[mid]
    a, b = s[mid - 1], s[mid]
    if isinstance(a, bool) or isinstance(b, bool):
        return a and b
    if a == b:
        return a
    return (a + b) / 2


def parse_stat_cpu_split(text: str) -> tuple[float, float]:
    """(utime, stime) in seconds from the text of /proc/<pid>/stat."""
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[14 - 3]) / CLK_TCK, int(rest[15 - 3]) / CLK_TCK


def proc_cpu_split(pid: int) -> tuple[float, float] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_stat_cpu_split(f.read())
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


def parse_stat_cpu(text: str) -> float:
    """utime+stime in seconds from the text of /proc/<pid>/stat.

    The command name (field 2) is in parentheses and may contain spaces or ')' itself,
    so split after the *last* ')'. utime and stime are fields 14 and 15 (1-based).
    """
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3]
    utime = int(rest[14 - 3])
    stime = int(rest[15 - 3])
    return (utime + stime) / CLK_TCK


def proc_cpu_seconds(pid: int) -> float | None:
    """utime+stime of a process in seconds (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_stat_cpu(f.read())
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


def parse_proc_stat_busy(text: str) -> tuple[float, float]:
    """(busy, steal) seconds of the whole machine from the text of /proc/stat ("cpu " line).

    busy = user + nice + system + irq + softirq (+ guest is already inside user); idle and
    iowait are not busy; steal is time the hypervisor gave to someone else.
    """
    for line in text.splitlines():
        if line.startswith("cpu "):
            f = [int(x) for x in line.split()[1:]]
            f += [0] * (8 - len(f))
            user, nice, system, _idle, _iowait, irq, softirq, steal = f[:8]
            return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK
    raise ValueError("no cpu line in /proc/stat")


def machine_busy() -> tuple[float, float] | None:
    try:
        with open("/proc/stat") as f:
            return parse_proc_stat_busy(f.read())
    except (OSError, ValueError):
        return None


def parse_status_kb(text: str, key: str = "VmRSS") -> int | None:
    """A kB value (e.g. VmRSS, VmHWM) from the text of /proc/<pid>/status."""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            parts = line.split()
            return int(parts[1])
    return None


def proc_rss_kb(pid: int, key: str = "VmRSS") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return parse_status_kb(f.read(), key)
    except (FileNotFoundError, ProcessLookupError):
        return None


def cpu_model(cpuinfo_text: str | None = None) -> str:
    if cpuinfo_text is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo_text = f.read()
        except OSError:
            return platform.processor() or "unknown"
    for line in cpuinfo_text.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, object]:
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def count_offsets(counts: bytearray | bytes, expected: Iterable[int]) -> tuple[int, int, int]:
    """(lost, duplicated, unexpected) from per-offset receive counts.

    counts[o] is how many times offset o was received (saturating at 255).
    expected are the offsets the subscriber should have received exactly once.
    """
    exp = set(expected)
    lost = 0
    dup = 0
    for o in exp:
        c = counts[o] if o < len(counts) else 0
        if c == 0:
            lost += 1
        elif c > 1:
            dup += c - 1
    unexpected = 0
    for o, c in enumerate(counts):
        if c and o not in exp:
            unexpected += c
    return lost, dup, unexpected

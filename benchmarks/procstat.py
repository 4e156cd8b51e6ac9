"""CPU seconds and peak RSS of a process, read from /proc (Linux), so no psutil dependency."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Usage:
    cpu_seconds: float  # on a CPU, since the process started (its live threads)
    rss_mb: float
    peak_rss_mb: float  # VmHWM: the high-water mark since start (or since reset_peak)


def cpu_seconds(pid: int) -> float:
    """CPU time of a process's live threads, in nanoseconds from their schedstat: the clock ticks of
    /proc/<pid>/stat (10 ms) left the launch phase of a couple of launches at 0."""
    if not os.path.exists(f"/proc/{pid}/schedstat"):  # a kernel without schedstat: ticks it is
        with open(f"/proc/{pid}/stat") as file:
            # Fields after the command name, which may itself hold spaces and parentheses.
            fields = file.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)
    total = 0
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{thread}/schedstat") as file:
                total += int(file.read().split()[0])
        except FileNotFoundError:
            pass  # the thread has just ended
    return total / 1e9


def usage(pid: int) -> Usage:
    cpu = cpu_seconds(pid)
    rss = peak = 0.0
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return Usage(cpu, rss, peak)


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its live children (the hub and its proxy)."""
    total = usage(pid).cpu_seconds
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        try:
            total += usage(int(child)).cpu_seconds
        except OSError:
            pass
    return total

"""Summarise a py-spy ``--format raw`` profile (collapsed stacks): where the consumer's CPU goes.

``python -m benchmarks.profile_summary FILE [TOP]``: the busiest functions by own samples, and by
samples under them (inclusive), idle samples (the event loop waiting in epoll/select) left out.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

IDLE = re.compile(r"\b(select|poll|epoll_wait|_run_once \(asyncio/base_events|wait \(threading)")
FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    """``function (path/to/module.py:123)`` → ``module.py:function``; line numbers merged."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match["file"]
    for marker in ("site-packages/", "python3.11/", "/work/main/", "/tmp/before/", "/tmp/after/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{file}:{match['function']}"


def summarise(path: Path, top: int = 25) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = busy = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames or IDLE.search(stack.split(";")[-1]):
            continue  # the loop was waiting for I/O: not CPU
        busy += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{path.name}: {total} samples, {busy} busy ({busy / max(total, 1):.0%})", "", "own samples:"]
    lines += [f"  {n / max(busy, 1):6.1%}  {name}" for name, n in own.most_common(top)]
    lines += ["", "inclusive (consumer, schemas, aio_pika/aiormq, aiohttp, pydantic, logging):"]
    interesting = (
        "consumer/",
        "schemas/",
        "aio_pika/",
        "aiormq/",
        "aiohttp/",
        "pydantic",
        "logging/",
        "json/",
        "pamqp/",
    )
    lines += [
        f"  {n / max(busy, 1):6.1%}  {name}" for name, n in inclusive.most_common() if name.startswith(interesting)
    ][:top]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarise(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 25))

"""Scenario 6, "class start" (issue 10): N launches at once against a hub that others use too.

Per case (the hub's ``concurrent_spawn_limit``, none or e.g. 64, and a spawn delay) and per system
(this checkout's consumer, and a baseline checkout's, side by side in the same run):

- a **probe** sends ``GET /hub/api/`` every 100 ms from a thread of its own (as a person's browser
  or the proxy would, no token): its answer times while the hub is idle (``--class-idle`` seconds
  before the burst) and during the burst (first command published → last reply);
- wall time, failures, requests to the hub per launch (the hub's request log, ``launcher`` token),
  start requests answered 429;
- order: the Spearman rank correlation of the order launches were published in and the order the
  hub marked them ready (``hub_config.BenchProxy``'s log line): 1.0 = ready in the order sent;
- ``launch.progress`` events with a ``queue_position`` (launches the launcher held back).

Servers are removed with the benchmark's own admin token (not through the consumer) between rounds.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from .hub import CONFIG, BenchHub
from .procstat import tree_cpu_seconds, usage
from .report import text_table
from .scenarios import image, new_users
from .services import Names, RpcClient, consumer_process, delete_topology
from .stats import summary
from tests.support.localhub import LocalHub

PROBE_INTERVAL = 0.1


@dataclass
class Probe:
    """``GET /hub/api/`` every ``interval`` s in a thread (own connection, blocking): (sent, latency)."""

    url: str
    interval: float = PROBE_INTERVAL
    samples: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Probe:
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def _run(self) -> None:
        parts = urlsplit(self.url)
        connection: http.client.HTTPConnection | None = None
        next_at = time.monotonic()
        while not self._stop.is_set():
            sent = time.time()
            began = time.monotonic()
            try:
                if connection is None:
                    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
                connection.request("GET", parts.path + "/")
                response = connection.getresponse()
                response.read()
                self.samples.append((sent, time.monotonic() - began))
            except (OSError, http.client.HTTPException):
                connection = None  # a dropped keep-alive connection: open a new one next time
            next_at = max(next_at + self.interval, time.monotonic())  # a slow answer delays the next
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def between(self, start: float, end: float) -> list[float]:
        return [latency for sent, latency in self.samples if start <= sent <= end]


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation (no ties expected: timestamps)."""
    n = len(xs)
    if n < 3:
        return None

    def ranks(values: list[float]) -> list[int]:
        order = sorted(range(n), key=values.__getitem__)
        result = [0] * n
        for rank, index in enumerate(order):
            result[index] = rank
        return result

    rx, ry = ranks(xs), ranks(ys)
    d2 = sum((a - b) ** 2 for a, b in zip(rx, ry))
    return 1 - 6 * d2 / (n * (n * n - 1))


def limited_hub(limit: int) -> BenchHub:
    """A benchmark hub with JupyterHub's spawn limit set (its Retry-After range left at 30-60 s)."""
    return BenchHub(hub=LocalHub(config=CONFIG, extra={"concurrent_spawn_limit": limit}))


async def class_start_round(
    hub: BenchHub,
    session: aiohttp.ClientSession,
    system: str,
    root: Path,
    n: int,
    delay: float,
    limit: int,
    max_concurrency: int,
    launch_timeout: float,
    idle_seconds: float,
) -> dict[str, Any]:
    names = Names.unique(f"class-{system}")
    _prefix, users = new_users("k", n)
    consumer = consumer_process(
        hub, names, max_concurrency, launch_timeout, f"class-{system}-{limit}-{delay:g}", root=root
    )
    await consumer.start()
    result: dict[str, Any] = {
        "system": system,
        "root": str(root),
        "n": n,
        "delay": delay,
        "limit": limit,
        "max_concurrency": max_concurrency,
    }
    queued_events: dict[str, int] = {}
    probe = Probe(hub.api_url).start()
    try:
        async with RpcClient(names, watch_events=("launch.progress",)) as client:

            def on_event(_: str, event: dict[str, Any]) -> None:
                if event.get("data", {}).get("queue_position"):
                    queued_events[event["subject"]] = queued_events.get(event["subject"], 0) + 1

            client.on_event = on_event
            idle_from = time.time()
            await asyncio.sleep(idle_seconds)  # the probe, on its own thread, sees the hub idle
            offset = hub.log_offset()
            cpu_before = usage(consumer.pid).cpu_seconds
            hub_cpu = tree_cpu_seconds(hub.pid)
            began = time.time()
            ids = [await client.send({"action": "launch", "username": u, "image": image(delay)}) for u in users]
            replies = await asyncio.gather(*(client.reply(i, launch_timeout + 60) for i in ids))
            ended = max((r[0] for r in replies if r), default=time.time())
            await asyncio.sleep(0.5)  # the hub writes a request's log line as it answers: let it land
            log = hub.log_slice(offset, hub.log_offset())
            after = usage(consumer.pid)
            hub_cpu = tree_cpu_seconds(hub.pid) - hub_cpu
        sent = [client.sent_at[i] for i in ids]
        ready = [log.ready_at.get(u) for u in users]
        timed = [(s, r) for s, r in zip(sent, ready) if r is not None]
        starts = [r for r in log.requests if r[0] == "launcher" and r[1] == "POST" and r[2].endswith("/server")]
        refused = sum(1 for r in starts if r[3] == 429)
        result.update(
            failures=sum(1 for r in replies if r is None or not r[1]["ok"]),
            errors=sorted({str(r[1]["error"])[:200] for r in replies if r and not r[1]["ok"]})[:5],
            wall_s=ended - began,
            reply_s=summary([r[0] - s for r, s in zip(replies, sent) if r]),
            probe_idle_s=summary(probe.between(idle_from, began)),
            probe_burst_s=summary(probe.between(began, ended)),
            hub_requests_per_launch=log.count("launcher") / n,
            hub_requests_breakdown=log.breakdown("launcher"),
            start_requests=len(starts),
            refused_429=refused,
            refused_share=refused / len(starts) if starts else None,
            rank_correlation=spearman([s for s, _ in timed], [r for _, r in timed]),
            ready_timed=len(timed),
            queued_launches=len(queued_events),
            queued_events=sum(queued_events.values()),
            consumer_cpu_s=after.cpu_seconds - cpu_before,
            hub_cpu_s=hub_cpu,
            consumer_peak_rss_mb=after.peak_rss_mb,
            probe_samples=[(t - began, x) for t, x in probe.samples if t >= idle_from],
        )
    finally:
        probe.stop()
        result["consumer_exit"] = await consumer.stop()
        result["consumer_log_errors"] = [l for l in consumer.log_text().splitlines() if " ERROR " in l][:10]
        await delete_topology(names)
        await hub.clean_up(session, users)
    return result


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


COLUMNS = (
    "system",
    "spawn limit",
    "delay",
    "N",
    "fail",
    "wall s",
    "probe idle p50/p95 ms",
    "probe burst p50/p95/max ms",
    "429s",
    "hub req/launch",
    "hub CPU s",
    "rank corr",
    "queued",
    "max_concurrency",
)


def table(rounds: list[dict[str, Any]]) -> str:
    rows = [COLUMNS]
    for r in rounds:
        idle, burst = r["probe_idle_s"], r["probe_burst_s"]
        share = "-" if r["refused_share"] is None else f"{r['refused_share']:.1%}"
        rows.append(
            (
                r["system"],
                str(r["limit"] or "none"),
                f"{r['delay']:g}",
                str(r["n"]),
                str(r["failures"]),
                f"{r['wall_s']:.1f}",
                f"{_ms(idle['p50'])}/{_ms(idle['p95'])}",
                f"{_ms(burst['p50'])}/{_ms(burst['p95'])}/{_ms(burst['max'])}",
                f"{r['refused_429']} ({share})",
                f"{r['hub_requests_per_launch']:.2f}",
                f"{r.get('hub_cpu_s', 0):.1f}",
                "-" if r["rank_correlation"] is None else f"{r['rank_correlation']:.3f}",
                str(r["queued_launches"]),
                str(r["max_concurrency"]),
            )
        )
    return "\n".join(text_table(rows))


def targets(rounds: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, judged on this run's rounds (this checkout = "launcher")."""
    out = []
    ours = [r for r in rounds if r["system"] == "launcher"]
    for r in ours:
        p95 = r["probe_burst_s"]["p95"]
        if p95 is not None:
            out.append(
                f"[{'met' if p95 <= 0.25 else 'MISS':>4}] probe p95 during the burst <= 250 ms "
                f"(limit {r['limit'] or 'none'}, {r['delay']:g} s): {_ms(p95)} ms"
            )
        base = next(
            (b for b in rounds if b["system"] == "base" and b["limit"] == r["limit"] and b["delay"] == r["delay"]), None
        )
        if base is not None:
            ratio = r["wall_s"] / base["wall_s"]
            out.append(
                f"[{'met' if ratio <= 1.1 else 'MISS':>4}] wall within 10% of {base['system']} "
                f"(max_concurrency {base['max_concurrency']}; limit {r['limit'] or 'none'}, {r['delay']:g} s): "
                f"{r['wall_s']:.1f} vs {base['wall_s']:.1f} s ({ratio:.2f}x)"
            )
        if r["limit"]:
            share = r["refused_share"] or 0.0
            out.append(
                f"[{'met' if share <= 0.02 else 'MISS':>4}] <= 2% of starts answered 429 "
                f"(limit {r['limit']}, {r['delay']:g} s): {r['refused_429']} of {r['start_requests']} ({share:.1%})"
            )
            out.append(
                f"[{'met' if r['hub_requests_per_launch'] <= 5 else 'MISS':>4}] <= 5 hub requests per launch "
                f"(limit {r['limit']}, {r['delay']:g} s): {r['hub_requests_per_launch']:.2f}"
            )
    return out

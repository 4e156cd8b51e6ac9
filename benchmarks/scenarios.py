"""Scenarios 1–5 of issue 4. Each round returns raw per-launch timestamps and counters (wall clock,
seconds); ``report.py`` turns them into figures."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import time
import uuid
from dataclasses import dataclass
from typing import Any, Self

import aiohttp

from . import legacy
from .hub import BenchHub, Observer
from .procstat import tree_cpu_seconds, usage
from .services import Names, RpcClient, consumer_process, delete_topology, echo_process


@dataclass
class Context:
    hub: BenchHub
    session: aiohttp.ClientSession  # the benchmark's own HTTP client (observer, floor, clean-up)
    max_concurrency: int
    launch_timeout: float
    legacy_a_max: int


def image(delay: float) -> str:
    return f"bench:delay-{delay:g}"


def new_users(tag: str, n: int) -> tuple[str, list[str]]:
    # Unique per round: the observer lists users by this prefix, and rounds never reuse a server.
    prefix = f"{tag}{uuid.uuid4().hex[:6]}-"
    return prefix, [f"{prefix}{i}" for i in range(n)]


class Watch:
    """The independent observer and the hub's log around one round."""

    def __init__(self, ctx: Context, prefix: str, give_up: float) -> None:
        self.ctx = ctx
        self.observer = Observer(ctx.hub, ctx.session, prefix)
        self.stop = asyncio.Event()
        self.give_up = give_up

    async def __aenter__(self) -> Self:
        self.offset = self.ctx.hub.log_offset()
        self.hub_cpu = tree_cpu_seconds(self.ctx.hub.pid)
        self.task = asyncio.create_task(self.observer.run(self.stop, time.monotonic() + self.give_up))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await self.task
        await self.observer.finish()
        await asyncio.sleep(0.3)  # the hub writes a request's log line as it answers: let it land
        self.hub_cpu = tree_cpu_seconds(self.ctx.hub.pid) - self.hub_cpu
        self.log = self.ctx.hub.log_slice(self.offset, self.ctx.hub.log_offset())
        self.observer.resolve_from_log(self.log)

    def annotate(self, launches: list[dict[str, Any]], who: str) -> None:
        # When the hub answered the system's last request for each launch: splits the overhead into
        # hub round trips after ready, and what follows the hub (broker, consumer, client).
        last_request = self.log.last_request(who)
        for launch in launches:
            seen = self.observer.ready_at(launch["username"])
            launch["hub_ready"] = seen.ready_at
            launch["ready_source"] = seen.source
            launch["stream_ready"] = seen.seen_at
            launch["last_hub_answer"], launch["last_hub_request"] = last_request.get(launch["username"], (None, None))


def hub_figures(watch: Watch, who: str, launches: int) -> dict[str, Any]:
    count = watch.log.count(who)
    return {
        "hub_requests": count,
        "hub_requests_per_launch": count / launches if launches else None,
        "hub_requests_breakdown": watch.log.breakdown(who),
        "hub_cpu_s": watch.hub_cpu,
        "observer_requests": watch.log.count("observer"),
    }


async def launcher_round(ctx: Context, n: int, delay: float) -> dict[str, Any]:
    """Scenario 1: N launches at once through RabbitMQ and the consumer, then N removes."""
    names = Names.unique("launch")
    prefix, users = new_users("l", n)
    consumer = consumer_process(ctx.hub, names, ctx.max_concurrency, ctx.launch_timeout, f"launch-n{n}-d{delay:g}")
    await consumer.start()
    result: dict[str, Any] = {"system": "launcher", "n": n, "delay": delay}
    try:
        async with RpcClient(names) as client:
            cpu_before = usage(consumer.pid).cpu_seconds
            async with Watch(ctx, prefix, ctx.launch_timeout + 60) as watch:
                began = time.time()
                ids = await asyncio.gather(
                    *(client.send({"action": "launch", "username": u, "image": image(delay)}) for u in users)
                )
                replies = await asyncio.gather(*(client.reply(i, ctx.launch_timeout + 30) for i in ids))
            launch_usage = usage(consumer.pid)
            launches = []
            for user, correlation_id, reply in zip(users, ids, replies):
                entry: dict[str, Any] = {"username": user, "sent": client.sent_at[correlation_id]}
                if reply is None:
                    entry.update(replied=None, ok=False, error="no reply")
                else:
                    entry.update(replied=reply[0], ok=bool(reply[1]["ok"]), error=reply[1].get("error"))
                launches.append(entry)
            watch.annotate(launches, "launcher")
            result.update(
                launches=launches,
                wall_s=max((e["replied"] or 0) for e in launches) - began,
                consumer_cpu_s=launch_usage.cpu_seconds - cpu_before,
                **hub_figures(watch, "launcher", n),
            )
            # Then remove them all, through the consumer too.
            offset = ctx.hub.log_offset()
            removed = time.time()
            ids = await asyncio.gather(*(client.send({"action": "remove", "username": u}) for u in users))
            replies = await asyncio.gather(*(client.reply(i, 120) for i in ids))
            await asyncio.sleep(0.3)
            remove_log = ctx.hub.log_slice(offset, ctx.hub.log_offset())
            result["remove"] = {
                "latencies": [r[0] - client.sent_at[i] if r else None for i, r in zip(ids, replies)],
                "failures": sum(1 for r in replies if r is None or not r[1]["ok"]),
                "wall_s": max((r[0] for r in replies if r), default=removed) - removed,
                "hub_requests_per_remove": remove_log.count("launcher") / n,
            }
            final = usage(consumer.pid)
            result.update(consumer_peak_rss_mb=final.peak_rss_mb, consumer_cpu_total_s=final.cpu_seconds)
    finally:
        result["consumer_exit"] = await consumer.stop()
        result["consumer_log_errors"] = [l for l in consumer.log_text().splitlines() if " ERROR " in l][:10]
        await delete_topology(names)
        await ctx.hub.clean_up(ctx.session, users)
    return result


async def floor_launch(ctx: Context, username: str, delay: float) -> dict[str, Any]:
    """One launch straight at the hub, as lean as the hub allows: user, then token alongside
    start + progress stream."""
    api, headers = ctx.hub.api_url, ctx.hub.headers("floor")
    entry: dict[str, Any] = {"username": username, "sent": time.time(), "ok": False, "error": None}

    async def token() -> None:
        async with ctx.session.post(
            f"{api}/users/{username}/tokens",
            json={"expires_in": 1800, "note": "floor", "scopes": [f"access:servers!server={username}/"]},
            headers=headers,
        ) as response:
            response.raise_for_status()
            await response.read()

    async def start() -> None:
        async with ctx.session.post(
            f"{api}/users/{username}/server", json={"image": image(delay)}, headers=headers
        ) as response:
            await response.read()
            if response.status == 201:
                return  # ready within the hub's wait: nothing to follow
            if response.status != 202:
                raise RuntimeError(f"start answered {response.status}")
        async with ctx.session.get(
            f"{api}/users/{username}/server/progress", headers={**headers, "Accept": "text/event-stream"}
        ) as response:
            async for raw in response.content:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    if event.get("failed"):
                        raise RuntimeError(event.get("message"))
                    if event.get("ready"):
                        return
            raise RuntimeError("progress stream ended before ready")

    try:
        async with ctx.session.post(f"{api}/users/{username}", headers=headers) as response:
            await response.read()
        await asyncio.wait_for(asyncio.gather(token(), start()), ctx.launch_timeout)
        entry["ok"] = True
    except Exception as error:  # noqa: BLE001 (a failed launch is a figure, not a crash of the benchmark)
        entry["error"] = f"{type(error).__name__}: {error}"
    entry["replied"] = time.time()
    return entry


async def floor_round(ctx: Context, n: int, delay: float) -> dict[str, Any]:
    """Scenario 2: the same N launches, no broker, no consumer."""
    prefix, users = new_users("f", n)
    try:
        async with Watch(ctx, prefix, ctx.launch_timeout + 60) as watch:
            began = time.time()
            launches = list(await asyncio.gather(*(floor_launch(ctx, u, delay) for u in users)))
        watch.annotate(launches, "floor")
        return {
            "system": "floor",
            "n": n,
            "delay": delay,
            "launches": launches,
            "wall_s": max(e["replied"] for e in launches) - began,
            **hub_figures(watch, "floor", n),
        }
    finally:
        await ctx.hub.clean_up(ctx.session, users)


async def legacy_round(ctx: Context, n: int, delay: float, variant: str) -> dict[str, Any]:
    """Scenario 3: the older worker's algorithm. (a) 2 processes, one launch at a time each;
    (b) one thread per launch. (a) runs at most ``legacy_a_max`` launches and scales its wall time
    to N: its launches run strictly one after another per process, so the scaling is linear."""
    measured = min(n, ctx.legacy_a_max) if variant == "a" else n
    prefix, users = new_users(f"o{variant}", measured)
    loop = asyncio.get_running_loop()
    token = ctx.hub.token("legacy")
    if variant == "a":
        # "spawn": a fork of this process would copy its running event loop and connections.
        pool: concurrent.futures.Executor = concurrent.futures.ProcessPoolExecutor(
            2, mp_context=multiprocessing.get_context("spawn")
        )
        # Celery's workers are up before the first task: start the processes outside the timing.
        await asyncio.gather(*(loop.run_in_executor(pool, time.sleep, 0.2) for _ in range(2)))
    else:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, measured))
    try:
        async with Watch(ctx, prefix, ctx.launch_timeout + 60 + measured * (delay + 3)) as watch:
            began = time.time()
            launches = list(
                await asyncio.gather(
                    *(loop.run_in_executor(pool, legacy.launch, ctx.hub.api_url, token, u, image(delay)) for u in users)
                )
            )
        for entry in launches:
            entry["sent"] = began  # every command is queued at once; (a) works through the queue
        watch.annotate(launches, "legacy")
        wall = max(e["replied"] for e in launches) - began
        return {
            "system": f"legacy_{variant}",
            "n": n,
            "delay": delay,
            "launches": launches,
            "measured_launches": measured,
            "wall_s": wall * n / measured,
            "wall_extrapolated": measured < n,
            **hub_figures(watch, "legacy", measured),
        }
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        await ctx.hub.clean_up(ctx.session, users)


async def capacity_round(ctx: Context, n: int, delay: float) -> dict[str, Any]:
    """Scenario 4: N launches in flight in one consumer process at once (the spawn delay keeps them
    pending), with its peak RSS and CPU."""
    names = Names.unique("capacity")
    _prefix, users = new_users("c", n)
    consumer = consumer_process(ctx.hub, names, max(n, ctx.max_concurrency), ctx.launch_timeout, f"capacity-n{n}")
    await consumer.start()
    in_flight = {"now": 0, "peak": 0, "accepted": 0}
    samples: list[tuple[float, int, float]] = []
    result: dict[str, Any] = {"system": "capacity", "n": n, "delay": delay}

    def on_event(kind: str, _: dict[str, Any]) -> None:
        in_flight["accepted"] += 1
        in_flight["now"] += 1
        in_flight["peak"] = max(in_flight["peak"], in_flight["now"])

    def on_reply(_: str) -> None:
        in_flight["now"] -= 1

    try:
        async with RpcClient(names, watch_events=("launch.accepted",)) as client:
            client.on_event, client.on_reply = on_event, on_reply
            cpu_before = usage(consumer.pid).cpu_seconds
            offset = ctx.hub.log_offset()
            hub_cpu = tree_cpu_seconds(ctx.hub.pid)
            began = time.time()
            ids = await asyncio.gather(
                *(client.send({"action": "launch", "username": u, "image": image(delay)}) for u in users)
            )
            waiting = asyncio.gather(*(client.reply(i, ctx.launch_timeout + 60) for i in ids))
            while not waiting.done():  # sample the consumer's memory while the launches are in flight
                sample = usage(consumer.pid)
                samples.append((time.time() - began, in_flight["now"], sample.rss_mb))
                await asyncio.wait({waiting}, timeout=0.5)
            replies = waiting.result()
            await asyncio.sleep(0.3)
            after = usage(consumer.pid)
            log = ctx.hub.log_slice(offset, ctx.hub.log_offset())
            result.update(
                peak_in_flight=in_flight["peak"],
                failures=sum(1 for r in replies if r is None or not r[1]["ok"]),
                errors=sorted({json.dumps(r[1]["error"])[:200] for r in replies if r and not r[1]["ok"]})[:5],
                wall_s=max((r[0] for r in replies if r), default=began) - began,
                consumer_cpu_s=after.cpu_seconds - cpu_before,
                consumer_peak_rss_mb=after.peak_rss_mb,
                hub_cpu_s=tree_cpu_seconds(ctx.hub.pid) - hub_cpu,
                hub_requests_per_launch=log.count("launcher") / n,
                reply_latencies=[r[0] - client.sent_at[i] if r else None for i, r in zip(ids, replies)],
                samples=samples,
            )
            ids = await asyncio.gather(*(client.send({"action": "remove", "username": u}) for u in users))
            removes = await asyncio.gather(*(client.reply(i, 300) for i in ids))
            result["remove_failures"] = sum(1 for r in removes if r is None or not r[1]["ok"])
            result["consumer_peak_rss_mb"] = usage(consumer.pid).peak_rss_mb
    finally:
        result["consumer_exit"] = await consumer.stop()
        await delete_topology(names)
        await ctx.hub.clean_up(ctx.session, users)
    return result


async def _closed_loop(seconds: float, concurrency: int, one: Any) -> dict[str, Any]:
    """``concurrency`` callers, each sending its next command as soon as the last one is answered."""
    latencies: list[float] = []
    failures = 0
    give_up = time.monotonic() + seconds

    async def caller() -> None:
        nonlocal failures
        while time.monotonic() < give_up:
            began = time.monotonic()
            if await one():
                latencies.append(time.monotonic() - began)
            else:
                failures += 1

    began = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.monotonic() - began
    return {
        "completed": len(latencies),
        "failures": failures,
        "seconds": elapsed,
        "per_second": len(latencies) / elapsed,
        "latencies": latencies,
    }


async def read_round(ctx: Context, seconds: float, concurrency: int) -> dict[str, Any]:
    """Scenario 5: ``read`` end to end (publish → reply) for ``seconds``, against the same loop on a
    bare echo consumer (the broker's floor) and on the hub's own GET (the hub's floor)."""
    _, (username,) = new_users("r", 1)
    floor = await floor_launch(ctx, username, 0)
    if not floor["ok"]:
        raise RuntimeError(f"could not start the read target: {floor['error']}")
    command = {"action": "read", "username": username}
    result: dict[str, Any] = {"seconds": seconds, "concurrency": concurrency}
    try:
        for system in ("echo", "launcher"):
            names = Names.unique(f"read-{system}")
            process = (
                echo_process(names, ctx.max_concurrency)
                if system == "echo"
                else consumer_process(ctx.hub, names, ctx.max_concurrency, ctx.launch_timeout, "read")
            )
            await process.start()
            try:
                async with RpcClient(names) as client:

                    async def one() -> bool:
                        reply = await client.reply(await client.send(command), 30)
                        return reply is not None and bool(reply[1]["ok"])

                    cpu_before = usage(process.pid).cpu_seconds
                    figures = await _closed_loop(seconds, concurrency, one)
                    after = usage(process.pid)
                    figures.update(cpu_s=after.cpu_seconds - cpu_before, peak_rss_mb=after.peak_rss_mb)
                    result[system] = figures
            finally:
                await process.stop()
                await delete_topology(names)

        async def hub_get() -> bool:
            async with ctx.session.get(
                f"{ctx.hub.api_url}/users/{username}", headers=ctx.hub.headers("floor")
            ) as response:
                await response.read()
                return response.status == 200

        result["hub_direct"] = await _closed_loop(seconds, concurrency, hub_get)
    finally:
        await ctx.hub.clean_up(ctx.session, [username])
    return result

"""``python -m benchmarks`` (``make bench ARGS=...``): run scenarios 1–5, print the table, write JSON.

Quick default (a few minutes on 2 cores): N = 1, 50; delays 0 s, 5 s; capacity 200; read 5 s.
``--full`` is the issue's configuration: N = 1, 50, 200; capacity 1,000; read 20 s.
``--only class_start`` runs scenario 6 (issue 10), a class start, against this checkout and
``--class-base`` (another checkout, e.g. main) side by side; it is not in the default run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, UTC
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp

from . import class_start, report, services
from .hub import BenchHub
from .scenarios import Context, capacity_round, floor_round, launcher_round, legacy_round, read_round

RESULTS = Path(__file__).with_name("results")
SCENARIOS = ("launch", "floor", "legacy_a", "legacy_b", "capacity", "read")
EXTRA_SCENARIOS = ("class_start",)  # only when named in --only


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    numbers = lambda kind: lambda text: [kind(x) for x in text.split(",") if x]
    parser.add_argument("--full", action="store_true", help="the issue's sizes: N=1,50,200, capacity 1000, read 20 s")
    parser.add_argument("--n", type=numbers(int), help="concurrent launches per round (default 1,50)")
    parser.add_argument("--delays", type=numbers(float), default=[0.0, 5.0], help="spawn delays, s (default 0,5)")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions of each launch round (default 1)")
    parser.add_argument("--capacity", type=int, help="launches in flight for scenario 4 (default 200; 0 skips)")
    parser.add_argument(
        "--capacity-delay", type=float, help="spawn delay for scenario 4, s (default 15; 45 with --full)"
    )
    parser.add_argument("--read-seconds", type=float, help="duration of each read loop (default 5; 20 with --full)")
    parser.add_argument("--read-concurrency", type=int, default=20, help="outstanding reads (default 20)")
    parser.add_argument(
        "--legacy-a-max",
        type=int,
        default=6,
        help="launches baseline (a) really runs; its wall time is scaled to N (default 6)",
    )
    parser.add_argument(
        "--max-concurrency", type=int, default=1000, help="the consumer's max_concurrency (default 1000)"
    )
    parser.add_argument("--launch-timeout", type=float, default=300, help="the consumer's launch_timeout, s")
    parser.add_argument(
        "--only",
        type=lambda t: t.split(","),
        default=list(SCENARIOS),
        help=f"scenarios to run, of {','.join(SCENARIOS + EXTRA_SCENARIOS)} (default: all but "
        f"{','.join(EXTRA_SCENARIOS)})",
    )
    parser.add_argument("--class-n", type=int, default=300, help="class start: launches at once (default 300)")
    parser.add_argument(
        "--class-cases",
        type=lambda t: [(int(c.split(":")[0]), float(c.split(":")[1])) for c in t.split(",")],
        default=[(0, 5.0), (64, 5.0), (64, 20.0)],
        help="class start: SPAWN_LIMIT:DELAY pairs, 0 = no limit (default 0:5,64:5,64:20)",
    )
    parser.add_argument(
        "--class-base",
        type=Path,
        default=os.environ.get("BENCH_BASELINE_ROOT"),
        help="class start: a checkout whose consumer runs as the baseline (default "
        "$BENCH_BASELINE_ROOT; none: this checkout only); its max_concurrency is 100, "
        "or the spawn limit where there is one",
    )
    parser.add_argument(
        "--class-concurrency",
        type=numbers(int),
        default=[100],
        help="class start: max_concurrency values for this checkout's consumer (default 100, the "
        "service's default; the class's size holds the whole class in the launcher)",
    )
    parser.add_argument("--class-idle", type=float, default=3.0, help="class start: probe the idle hub this long, s")
    parser.add_argument(
        "--profile",
        metavar="PY_SPY",
        help="attach this py-spy binary to each consumer; collapsed stacks go to <out>/profile-<time>/<round>.txt",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    args.n = args.n or ([1, 50, 200] if args.full else [1, 50])
    args.capacity = args.capacity if args.capacity is not None else (1000 if args.full else 200)
    args.capacity_delay = args.capacity_delay if args.capacity_delay is not None else (45.0 if args.full else 15.0)
    args.read_seconds = args.read_seconds if args.read_seconds is not None else (20.0 if args.full else 5.0)
    if any(n < 1 for n in args.n) or args.repeat < 1:
        parser.error("N and --repeat must be positive")
    return args


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(l.split(":", 1)[1].strip() for l in cpuinfo if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for package in ("jupyterhub", "aio-pika", "aiohttp", "pydantic"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "consumer": consumer_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
        "versions": versions,
    }


def consumer_version() -> dict[str, Any]:
    """Which consumer code ran: the checkout's commit and whether consumer/ or schemas/ differ from it."""
    root = str(services.CONSUMER_ROOT)
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "consumer", "schemas"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        commit, changed = "", []
    return {"root": root, "commit": commit or None, "uncommitted_changes": [c for c in changed if c.strip()]}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raw: dict[str, Any] = {"rounds": []}
    if "class_start" in args.only:
        raw["class_start"] = await run_class_start(args)
        if set(args.only) <= set(EXTRA_SCENARIOS):
            return raw
    hub = BenchHub().start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            ctx = Context(hub, session, args.max_concurrency, args.launch_timeout, args.legacy_a_max)
            for delay in args.delays:
                for n in args.n:
                    for rep in range(args.repeat):
                        # The order rotates so no system always runs right after another's clean-up.
                        for system in ("launch", "floor", "legacy_b", "legacy_a"):
                            if system not in args.only:
                                continue
                            print(f"... {system} N={n} delay={delay:g} s (rep {rep + 1})", file=sys.stderr, flush=True)
                            if system == "launch":
                                raw["rounds"].append(await launcher_round(ctx, n, delay))
                            elif system == "floor":
                                raw["rounds"].append(await floor_round(ctx, n, delay))
                            else:
                                raw["rounds"].append(await legacy_round(ctx, n, delay, system[-1]))
            if "capacity" in args.only and args.capacity > 0:
                print(f"... capacity N={args.capacity} delay={args.capacity_delay:g} s", file=sys.stderr, flush=True)
                raw["capacity"] = await capacity_round(ctx, args.capacity, args.capacity_delay)
            if "read" in args.only and args.read_seconds > 0:
                print(f"... read {args.read_seconds:g} s x3", file=sys.stderr, flush=True)
                raw["read"] = await read_round(ctx, args.read_seconds, args.read_concurrency)
    finally:
        hub.stop()
    return raw


async def run_class_start(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Scenario 6: per case, a hub with that spawn limit; this checkout and the baseline, alternating."""
    rounds: list[dict[str, Any]] = []
    systems = [("launcher", services.CONSUMER_ROOT, c) for c in args.class_concurrency]
    if args.class_base:
        systems.append(("base", args.class_base, 0))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for limit in dict.fromkeys(limit for limit, _ in args.class_cases):
            hub = (class_start.limited_hub(limit) if limit else BenchHub()).start()
            try:
                for case_limit, delay in args.class_cases:
                    if case_limit != limit:
                        continue
                    for system, root, concurrency in systems:
                        # The baseline: the service's default, or the spawn limit, the best fixed choice for it.
                        concurrency = concurrency or limit or 100
                        print(
                            f"... class start {system} N={args.class_n} limit={limit or 'none'} delay={delay:g} s",
                            file=sys.stderr,
                            flush=True,
                        )
                        for attempt in (1, 2):  # the broker is shared: a round it broke is run again, once
                            try:
                                rounds.append(
                                    await class_start.class_start_round(
                                        hub,
                                        session,
                                        system,
                                        Path(root),
                                        args.class_n,
                                        delay,
                                        limit,
                                        concurrency,
                                        args.launch_timeout,
                                        args.class_idle,
                                    )
                                )
                                print(class_start.table(rounds[-1:]), file=sys.stderr, flush=True)
                                break
                            except Exception as error:
                                print(
                                    f"... round failed ({type(error).__name__}: {str(error)[-300:]})",
                                    file=sys.stderr,
                                    flush=True,
                                )
                                if attempt == 2:
                                    raise
                                await asyncio.sleep(15)  # a broker that was restarting: let it come back
            finally:
                hub.stop()
    return rounds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    stamp = f"{datetime.fromtimestamp(started, UTC):%Y%m%dT%H%M%SZ}"
    if args.profile:
        services.PY_SPY, services.PROFILES = args.profile, args.out / f"profile-{stamp}"
    info = machine()
    raw = asyncio.run(run(args))
    info["load_average_at_end"] = os.getloadavg()
    figs = report.figures(raw)
    results = {
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "duration_s": time.time() - started,
        "machine": info,
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "consumer_root": str(services.CONSUMER_ROOT),
        "figures": figs,
        "raw": raw,
    }
    results["targets"] = report.targets(figs, args.n, args.delays)
    if raw.get("class_start"):
        results["class_start_targets"] = class_start.targets(raw["class_start"])
    results["failures"] = sum(r["failures"] for r in raw.get("class_start", [])) + (
        sum(f["failures"] + f.get("remove_failures", 0) for f in figs["launches"])
        + (figs["capacity"]["failures"] if figs.get("capacity") else 0)
        + (figs["read"]["launcher"]["failures"] + figs["read"]["echo"]["failures"] if figs.get("read") else 0)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-{stamp}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    if raw["rounds"] or raw.get("capacity") or raw.get("read"):
        print(report.format_table(results))
    if raw.get("class_start"):
        print("\nclass start (scenario 6):\n" + class_start.table(raw["class_start"]) + "\n")
        print("\n".join(results["class_start_targets"]))
    print(
        f"\n{info['cpus']} CPUs ({info['cpu_model']}); load average {info['load_average_at_start'][0]:.2f} at start, "
        f"{info['load_average_at_end'][0]:.2f} at end; {results['failures']} failures; "
        f"{results['duration_s']:.0f} s; raw figures: {path}"
    )
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

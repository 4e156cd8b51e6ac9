"""The benchmark's JupyterHub: stand-in spawns, per-source service tokens, its request log, and an
independent observer of when the hub itself marks servers ready."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aiohttp

from tests.support.localhub import ROOT, LocalHub, free_port

CONFIG = Path(__file__).with_name("hub_config.py")

# JupyterHub's request log line: "[I 2026-11-25 20:17:11.196 JupyterHub log:192] 201 POST /hub/api/users/x (launcher@127.0.0.1) 12.34ms"
REQUEST_LINE = re.compile(
    r"^\[[A-Z] (?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) [^\]]*\] (?P<status>\d{3}) (?P<method>[A-Z]+) "
    r"(?P<uri>\S+) \((?P<who>[^@)]*)@"
)
# Progress streams the observer follows per round, at most. Each one is a request and an open
# stream the hub serves on top of the system under test; following every pending spawn loaded a
# launcher round (whose spawns are pending while the observer lists them) with up to N extra
# streams, and a floor round (whose starts reach the hub at once, before a listing sees them) with
# a few, which made the hub slower for one system than for the other.
MAX_FOLLOWED = 20
# Logged by hub_config.BenchProxy when the hub has added the server's route: it is ready.
READY_LINE = re.compile(
    r"^\[[A-Z] (?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) [^\]]*\] bench: server (?P<user>[^:\s]+):(?P<server>\S*) ready"
)


def service_token(base: str, name: str) -> str:
    """Same derivation as hub_config.py."""
    if name == "launcher":
        return base
    return hashlib.sha256(f"{base}:{name}".encode()).hexdigest()


def _log_time(text: str) -> float:
    """The hub logs local wall-clock time with milliseconds."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()


@dataclass
class HubLogSlice:
    """What the hub logged between two offsets of its log file."""

    requests: list[tuple[str, str, str, int]]  # (who, method, uri without query, status)
    ready_at: dict[str, float]  # user (default server) -> when the hub marked it ready
    answered_at: list[float]  # per request: when the hub answered it (its log line's time)

    def last_answer(self, who: str) -> dict[str, float]:
        """user -> when the hub answered ``who``'s last request about that user."""
        return {user: at for user, (at, _) in self.last_request(who).items()}

    def last_request(self, who: str) -> dict[str, tuple[float, str]]:
        """user -> (when the hub answered it, its shape) of ``who``'s last request about that user."""
        last: dict[str, tuple[float, str]] = {}
        for (source, method, uri, status), at in zip(self.requests, self.answered_at):
            parts = uri.split("/")
            if source == who and "users" in parts[:-1]:
                user = parts[parts.index("users") + 1]
                if at >= last.get(user, (0.0, ""))[0]:
                    shape = re.sub(r"/users/[^/]+", "/users/{u}", uri)
                    last[user] = (at, f"{method} {re.sub(r'/tokens/[^/]+', '/tokens/{id}', shape)} {status}")
        return last

    def count(self, who: str) -> int:
        return sum(1 for r in self.requests if r[0] == who)

    def breakdown(self, who: str) -> dict[str, int]:
        """Requests by method and route shape (user names replaced by {u})."""
        shapes: Counter[str] = Counter()
        for source, method, uri, status in self.requests:
            if source == who:
                shape = re.sub(r"/users/[^/]+", "/users/{u}", uri)
                shape = re.sub(r"/tokens/[^/]+", "/tokens/{id}", shape)
                shapes[f"{method} {shape} {status}"] += 1
        return dict(shapes)


@dataclass
class BenchHub:
    default_delay: float = 0.0
    hub: LocalHub = field(default_factory=lambda: LocalHub(config=CONFIG))
    standin: subprocess.Popen[bytes] | None = None

    def start(self) -> BenchHub:
        port = free_port()
        self.standin = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.standin", str(port)], cwd=ROOT, start_new_session=True
        )
        (self.hub.state_dir / "bench.json").write_text(
            json.dumps({"standin_port": port, "default_delay": self.default_delay})
        )
        try:
            self.hub.start()
        except BaseException:
            # A hub that does not come up (LocalHub ends its own processes) must not leave the
            # stand-in running: nothing else would stop it.
            self._stop_standin()
            raise
        return self

    def stop(self) -> None:
        self.hub.stop()
        self._stop_standin()

    def _stop_standin(self) -> None:
        standin, self.standin = self.standin, None
        if standin is not None:
            standin.terminate()
            try:
                standin.wait(10)
            except subprocess.TimeoutExpired:
                standin.kill()

    @property
    def pid(self) -> int:
        assert self.hub.process is not None
        return self.hub.process.pid

    @property
    def url(self) -> str:
        return self.hub.url

    @property
    def api_url(self) -> str:
        return self.hub.api_url

    def token(self, service: str) -> str:
        return service_token(self.hub.token, service)

    def headers(self, service: str) -> dict[str, str]:
        return {"Authorization": f"token {self.token(service)}"}

    def log_offset(self) -> int:
        return self.hub.log_path.stat().st_size

    def log_slice(self, start: int, end: int | None = None) -> HubLogSlice:
        with self.hub.log_path.open("rb") as file:
            file.seek(start)
            data = file.read() if end is None else file.read(end - start)
        requests: list[tuple[str, str, str, int]] = []
        answered: list[float] = []
        ready: dict[str, float] = {}
        for line in data.decode("utf-8", "replace").splitlines():
            match = REQUEST_LINE.match(line)
            if match:
                requests.append((match["who"], match["method"], match["uri"].split("?", 1)[0], int(match["status"])))
                answered.append(_log_time(match["ts"]))
                continue
            match = READY_LINE.match(line)
            if match and not match["server"]:
                ready[match["user"]] = _log_time(match["ts"])
        return HubLogSlice(requests, ready, answered)

    async def clean_up(self, session: aiohttp.ClientSession, usernames: list[str], parallel: int = 20) -> None:
        """Delete the round's users (stopping their servers) so later rounds start from a quiet hub."""
        gate = asyncio.Semaphore(parallel)

        async def delete(username: str) -> None:
            async with gate:
                for _ in range(20):  # bounded: a server still stopping answers 400 for a moment
                    try:
                        async with session.delete(
                            f"{self.api_url}/users/{username}", headers=self.headers("admin")
                        ) as response:
                            if response.status in (204, 404):
                                return
                    except aiohttp.ClientConnectionError:
                        pass  # a kept-alive connection the hub had just closed: ask again
                    await asyncio.sleep(0.5)

        await asyncio.gather(*(delete(u) for u in usernames))


@dataclass
class Observation:
    ready_at: float | None = None  # wall clock: when the hub marked the server ready (its log)
    seen_at: float | None = None  # when the observer's progress stream delivered "ready"
    source: str = ""  # "hub-log", or "stream" where the hub's line is missing
    failed: bool = False


class Observer:
    """Watches a round's users from outside the system under test, with its own service token.

    Hub-ready is when the hub itself marked the server ready: the line ``hub_config.BenchProxy``
    logs once the route is added (the hub's clock, to the millisecond). The observer corroborates
    it from outside: one listing request (``GET /users?state=active&name_filter=<prefix>``) finds
    spawns that are pending, and a progress-stream follower timestamps each one's ``ready`` event
    (``seen_at``; the table reports how far behind the hub's mark the stream delivers it), for at
    most ``MAX_FOLLOWED`` spawns per round, so that it adds the same small load to every system's
    round. Spawns that finish between two listings are not streamed. Where the hub's line is
    missing, the stream's time is used.
    """

    def __init__(self, hub: BenchHub, session: aiohttp.ClientSession, prefix: str) -> None:
        self.hub = hub
        self.session = session
        self.prefix = prefix
        self.observations: dict[str, Observation] = {}
        self.followers: set[asyncio.Task[None]] = set()
        self.listings = 0
        self.followed = 0

    async def run(self, stop: asyncio.Event, give_up: float) -> None:
        while not stop.is_set() and time.monotonic() < give_up:
            began = time.monotonic()
            try:
                async with self.session.get(
                    f"{self.hub.api_url}/users",
                    params={"state": "active", "name_filter": self.prefix},
                    headers=self.hub.headers("observer"),
                ) as response:
                    users = await response.json() if response.status == 200 else []
            except aiohttp.ClientError:
                users = []
            self.listings += 1
            for user in users:
                name = user["name"]
                if not name.startswith(self.prefix) or name in self.observations:
                    continue
                server = (user.get("servers") or {}).get("")
                if not server:
                    continue
                self.observations[name] = Observation()
                if server.get("pending") == "spawn" and self.followed < MAX_FOLLOWED:
                    self.followed += 1
                    task = asyncio.create_task(self._follow(name))
                    self.followers.add(task)
                    task.add_done_callback(self.followers.discard)
            # Listing costs the hub more as the round grows: keep its share of the hub near 10%.
            took = time.monotonic() - began
            try:
                await asyncio.wait_for(stop.wait(), max(0.2, 8 * took))
            except TimeoutError:
                pass

    async def finish(self, timeout: float = 30) -> None:
        if self.followers:
            _, pending = await asyncio.wait(set(self.followers), timeout=timeout)
            for task in pending:
                task.cancel()

    async def _follow(self, username: str) -> None:
        observation = self.observations[username]
        try:
            async with self.session.get(
                f"{self.hub.api_url}/users/{username}/server/progress",
                headers={**self.hub.headers("observer"), "Accept": "text/event-stream"},
                timeout=aiohttp.ClientTimeout(total=900, sock_read=60),
            ) as response:
                if response.status != 200:
                    return  # no longer starting: timed from the hub log instead
                first = True
                async for raw in response.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if event.get("failed"):
                        observation.failed = True
                        return
                    if event.get("ready"):
                        if not first:  # a stream that opens on "ready" tells only that it was ready before
                            observation.seen_at = time.time()
                        return
                    first = False
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return

    def resolve_from_log(self, log: HubLogSlice) -> None:
        for observation in self.observations.values():
            if observation.seen_at is not None:
                observation.ready_at, observation.source = observation.seen_at, "stream"
        for username, ready in log.ready_at.items():
            if username.startswith(self.prefix):
                observation = self.observations.setdefault(username, Observation())
                observation.ready_at, observation.source = ready, "hub-log"

    def ready_at(self, username: str) -> Observation:
        return self.observations.get(username, Observation())

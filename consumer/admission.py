"""Admission control: how much the launcher asks of JupyterHub at once.

A class start sends hundreds of launches within seconds to one hub that also serves people's
browsers. JupyterHub works through its API requests one at a time on one event loop, so sending
them all at once makes nothing finish sooner: it only makes everyone else's requests wait behind
them. Launches beyond what the hub can take therefore wait here, in arrival order, with two limits:

1. **Hub requests in flight** (``RequestLimit``). Adaptive by default, like TCP Vegas (and Netflix's
   concurrency-limits): from the answer times of cheap requests (users, tokens, models) it estimates
   how many of our requests wait in the hub's queue, ``limit * (1 - base / rtt)`` with ``base`` the
   hub's idle answer time (the smallest seen in the last few minutes) and ``rtt`` the fastest answer
   of the last round trip, and once per round trip grows the limit by one while fewer than
   ``QUEUED_LOW`` wait and shrinks it by one while more than ``QUEUED_HIGH`` do. So a fast, idle
   hub gets more, a slow or busy one fewer, and our share of the hub's queue stays about one request
   long: a person's request waits behind those, not behind hundreds. The hub's other work (spawns
   finishing, browsers) raises ``rtt`` and the estimate with it, and the limit shrinks. A start or
   stop request is held by the hub until the spawn or stop is done (up to ``slow_spawn_timeout``),
   but costs it work only when it arrives: it holds its slot for about one current answer time,
   then only waits. Progress streams are not counted: opening one costs the hub little, and then
   it only waits. Waiting requests are served in order of lane (reads, removes and clean-ups
   before launches: a read never waits behind queued launches), then of launch (a launch that came
   first sends its requests first), then of request. Once a launch's start is sent, its other
   requests (the token right behind the start, a model read) go without waiting, and count: the
   limit paces how fast launches begin.
2. **Our pending spawns** (``SpawnLimit``). Unknown at first (no limit). A 429 on a start means the
   hub's ``concurrent_spawn_limit`` is reached: the limit becomes the number of our spawns pending
   at that moment, new starts wait until one of ours becomes ready or fails, and the refused start
   is retried as soon as one of our slots frees, never later than its ``Retry-After`` (30-60 s,
   random: a hint against a herd of browsers, not a measure of when a slot frees). The limit grows
   again by one after as many ready spawns as it is large (counted only while it holds launches
   back), and no sooner than the last 429's ``Retry-After``: growing asks for a slot that none of
   ours freed, which is what the hub answers Retry-After about. Each growth that meets another 429
   doubles the spawns needed for the next one, each that does not halves it.

Settings fix either limit (``hub_max_requests``, ``hub_max_pending_spawns``; 0 or absent: adaptive).

While a launch waits for either limit, before its start request is sent, it is *queued*: it reports
its 1-based position among the queued launches (``on_queued``) when it joins the queue and then, at
most every ``QUEUE_REPORT_INTERVAL`` seconds, when its position has changed; ``on_queued(0)`` once its
start is sent, if it had reported.

The state is plain attributes (``requests.limit``, ``requests.in_flight``, ``requests.waiting``,
``spawns.limit``, ``spawns.pending``, ``spawns.waiting``, ``queued``), gathered by ``snapshot()``
for the log and for ``/metrics`` (``metrics.watch_admission``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import itertools
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Lanes, served in this order. Reads, removes and a failed launch's clean-up are what a person or a
# platform waits for right now; queued launches come after them.
LANE_INTERACTIVE = 0
LANE_LAUNCH = 1
# (lane, launch ticket) of the code running now: a launch sets it, and the tasks it creates (its
# token request, model read) inherit it, so every hub request knows whose it is.
_order: ContextVar[tuple[int, int]] = ContextVar("admission_order", default=(LANE_INTERACTIVE, 0))

# Vegas' alpha and beta: our requests waiting at the hub. 0.5/1, not the usual 2/4: a launch's
# ready answer leaves the hub a turn or two of its event loop after the spawn is done, and each turn
# waits behind our queued requests, so at most about one of ours waits. N = 200 overhead p95 (0 s /
# 5 s spawns, with the reply on a 201): 1/2 74-75 / 66 ms, 0.5/1 30-51 / 27-61 ms; the class-start
# wall times stayed 0.94-0.96x the previous code's (benchmarks/README.md, 2026-12-07).
QUEUED_LOW, QUEUED_HIGH = 0.5, 1
INITIAL_REQUESTS, MIN_REQUESTS, MAX_REQUESTS = 4, 1, 64
# The idle answer time is the smallest seen in the last BASE_WINDOW seconds (BASE_BUCKETS buckets):
# a hub that got slower for good (a bigger database) is taken as the new normal after that long.
BASE_WINDOW, BASE_BUCKETS = 300.0, 10
MIN_ROUND = 0.05  # the limit changes at most once per round trip, and at most every 50 ms
MIN_HOLD, MAX_HOLD = 0.01, 2.0  # how long a start or stop request counts as in flight, bounds
QUEUE_REPORT_INTERVAL = 5.0  # seconds between position reports of one queued launch
LOG_INTERVAL = 10.0  # seconds between log lines of the limits while launches are queued


class Kind(enum.Enum):
    """What a hub request costs the hub, which decides how it counts against the limit."""

    CHEAP = "cheap"  # answered as soon as the hub has done its work: its answer time is a sample
    START = "start"  # held until the spawn is ready (or slow_spawn_timeout): work only at first
    STOP = "stop"  # held until the server has stopped (or slow_stop_timeout): likewise
    STREAM = "stream"  # a progress stream: not counted (the hub client does not ask for a slot)


class Slot:
    """One request's place in the limit; released once, whichever comes first."""

    def __init__(self, limit: RequestLimit | None) -> None:
        self._limit = limit

    def release(self) -> None:
        limit, self._limit = self._limit, None
        if limit is not None:
            limit._release()


NO_SLOT = Slot(None)


class _WindowedMin:
    """The smallest value added in the last ``window`` seconds (to within one bucket)."""

    def __init__(self, window: float, buckets: int) -> None:
        self._width = window / buckets
        self._buckets: deque[tuple[int, float]] = deque(maxlen=buckets)

    def add(self, now: float, value: float) -> None:
        index = int(now // self._width)
        while self._buckets and self._buckets[0][0] <= index - self._buckets.maxlen:  # type: ignore[operator]
            self._buckets.popleft()
        if self._buckets and self._buckets[-1][0] == index:
            self._buckets[-1] = (index, min(self._buckets[-1][1], value))
        else:
            self._buckets.append((index, value))

    def value(self) -> float | None:
        return min((v for _, v in self._buckets), default=None)


class RequestLimit:
    """Hub requests in flight: a priority queue in front of a limit that adapts to answer times."""

    def __init__(self, fixed: int | None = None) -> None:
        self.fixed = fixed or None
        self.limit: int = self.fixed or INITIAL_REQUESTS
        self.in_flight = 0
        self.rtt: float | None = None  # smoothed answer time of cheap requests, seconds
        self._base = _WindowedMin(BASE_WINDOW, BASE_BUCKETS)
        self._queue: list[tuple[int, int, int, asyncio.Future[None]]] = []
        self._sequence = itertools.count()
        self._round_end = 0.0
        self._round_min, self._round_count = 0.0, 0
        self._saturated = False  # the limit was reached this round: growing it would be used

    @property
    def base(self) -> float | None:
        """The hub's idle answer time (seconds), as far as seen."""
        return self._base.value()

    @property
    def waiting(self) -> int:
        return sum(1 for *_, future in self._queue if not future.done())

    async def acquire(self) -> Slot:
        if self.in_flight < self.limit and not self.waiting:
            self.in_flight += 1
            self._saturated |= self.in_flight >= self.limit
            return Slot(self)
        self._saturated = True
        future = asyncio.get_running_loop().create_future()
        lane, ticket = _order.get()
        heapq.heappush(self._queue, (lane, ticket, next(self._sequence), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # granted just as it was cancelled: pass the slot on
            else:
                future.cancel()  # skipped when its turn comes
            raise
        return Slot(self)

    def admit_now(self) -> Slot:
        """A slot without waiting (a started launch's next request); it counts all the same."""
        self.in_flight += 1
        return Slot(self)

    def admit_waiting(self, lane: int, ticket: int) -> None:
        """Admit now whatever this launch has waiting (its token request, behind its start)."""
        for entry_lane, entry_ticket, _, future in self._queue:
            if (entry_lane, entry_ticket) == (lane, ticket) and not future.done():
                self.in_flight += 1
                future.set_result(None)  # the heap drops it when it comes up

    def _release(self) -> None:
        self.in_flight -= 1
        self._grant()

    def _grant(self) -> None:
        while self._queue and self.in_flight < self.limit:
            *_, future = heapq.heappop(self._queue)
            if future.done():
                continue  # cancelled while waiting
            self.in_flight += 1
            future.set_result(None)

    def hold_time(self) -> float:
        """How long a start or stop request counts as in flight: about the hub's current answer
        time, by when it has taken the request up (it serves requests in arrival order)."""
        return min(MAX_HOLD, max(MIN_HOLD, self.rtt or MIN_HOLD))

    def sample(self, rtt: float, now: float) -> None:
        """A cheap request was answered after ``rtt`` seconds."""
        self._base.add(now, rtt)
        self.rtt = rtt if self.rtt is None else 0.8 * self.rtt + 0.2 * rtt
        if self.fixed:
            return
        # The round's fastest answer: the others also carry our own event loop's delays (a busy
        # or descheduled consumer), which are not the hub's queue.
        self._round_min = min(self._round_min, rtt) if self._round_count else rtt
        self._round_count += 1
        if now < self._round_end:
            return
        fastest = self._round_min
        base = self._base.value() or fastest
        queued = self.limit * (1 - base / fastest) if fastest > 0 else 0.0
        before = self.limit
        if queued > QUEUED_HIGH:
            self.limit = max(MIN_REQUESTS, self.limit - 1)
        elif queued < QUEUED_LOW and self._saturated:
            self.limit = min(MAX_REQUESTS, self.limit + 1)
        if self.limit != before:
            log.debug(
                "hub requests limit %d -> %d (answer %.0f ms, idle %.0f ms)",
                before,
                self.limit,
                fastest * 1000,
                base * 1000,
            )
        self._round_end = now + max(MIN_ROUND, self.rtt or fastest)
        self._round_min, self._round_count = 0.0, 0
        self._saturated = self.in_flight >= self.limit or bool(self.waiting)
        self._grant()


@dataclass
class SpawnLimit:
    """Our spawns pending at the hub: unknown (None) until a 429 tells, or fixed by a setting."""

    fixed: int | None = None
    limit: float | None = None
    pending: int = 0  # launches holding a slot: from their start request to ready or failed
    throttled: int = 0  # of those, starts refused with 429 waiting to be retried
    # (ticket, sequence, waiter): a launch may wait for a retry more than once, and the sequence
    # keeps equal tickets from comparing their futures.
    _queue: list[tuple[int, int, asyncio.Future[None]]] = field(default_factory=list)
    _retries: list[tuple[int, int, asyncio.Future[None]]] = field(default_factory=list)
    _sequence: itertools.count[int] = field(default_factory=itertools.count)
    _ready_since_growth: int = 0
    _growth_factor: float = 1.0  # ready spawns needed for the next growth, in multiples of the limit
    _probing: bool = False  # the limit grew and no 429 has answered since
    _grow_after: float = 0.0  # event loop time: the last 429's Retry-After ends

    def __post_init__(self) -> None:
        self.fixed = self.fixed or None
        self.limit = self.fixed

    @property
    def waiting(self) -> int:
        return sum(1 for *_, future in self._queue if not future.done())

    def _free(self) -> bool:
        # A refused start waiting for its retry comes before any new start.
        retries_waiting = any(not f.done() for *_, f in self._retries)
        return not retries_waiting and (self.limit is None or self.pending < math.floor(self.limit))

    def can_start_now(self) -> bool:
        return self._free() and not self.waiting

    async def acquire(self, ticket: int) -> None:
        if self.can_start_now():
            self.pending += 1
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (ticket, next(self._sequence), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(ok=False)
            else:
                future.cancel()
            raise

    def release(self, ok: bool) -> None:
        """One of ours is ready (``ok``) or failed, or gave up waiting: its slot frees."""
        self.pending -= 1
        # Growth is tried only where the limit holds launches back, not during a quiet hour.
        if ok and self.limit is not None and not self.fixed and self.waiting:
            self._ready_since_growth += 1
            if (
                self._ready_since_growth >= self.limit * self._growth_factor
                and asyncio.get_running_loop().time() >= self._grow_after
            ):
                if self._probing:  # the last growth met no 429: grow sooner next time
                    self._growth_factor = max(1.0, self._growth_factor / 2)
                self.limit += 1
                self._ready_since_growth = 0
                self._probing = True
                log.info("hub spawn limit: trying %d pending spawns", math.floor(self.limit))
        # The earliest refused start retries first, into the slot that just freed.
        while self._retries:
            *_, future = heapq.heappop(self._retries)
            if not future.done():
                future.set_result(None)
                return
        self._grant()

    def _grant(self) -> None:
        while self._queue and self._free():
            *_, future = heapq.heappop(self._queue)
            if future.done():
                continue
            self.pending += 1
            future.set_result(None)

    def refused(self, retry_after: float = 0.0) -> None:
        """The hub answered a start of ours with 429 (and ``Retry-After``): it is full at the spawns
        of ours pending now."""
        at = max(1, self.pending - self.throttled - 1)  # not counting this one nor others refused
        if not self.fixed:
            self._grow_after = asyncio.get_running_loop().time() + retry_after
            if self._probing:
                self._growth_factor = min(16.0, self._growth_factor * 2)
                self._probing = False
            if self.limit is None or at != math.floor(self.limit):
                log.info("hub refused a start (429): new starts wait while %d spawns of ours are pending", at)
            self.limit = float(at)
            self._ready_since_growth = 0

    async def wait_for_retry(self, ticket: int, timeout: float) -> None:
        """Wait until one of our slots frees, or ``timeout`` (the 429's Retry-After) passes."""
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._retries, (ticket, next(self._sequence), future))
        self.throttled += 1
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            pass
        finally:
            self.throttled -= 1
            if not future.done():
                future.cancel()
            # No longer ahead of new starts; and a slot given to a retry that was cancelled just
            # then (its launch timed out) must not stay unused.
            self._grant()


async def spawn_slot(admission: Admission | None) -> None:
    """``admission.spawn_slot()``, or nothing without admission control."""
    if admission is not None:
        await admission.spawn_slot()


async def start_retried(admission: Admission | None) -> bool:
    """``admission.start_retried()``, or False without admission control."""
    return admission is not None and await admission.start_retried()


def admitted_launch(
    admission: Admission | None, on_queued: Callable[[int], None]
) -> contextlib.AbstractAsyncContextManager[None]:
    """``admission.launch(on_queued)``, or nothing without admission control."""
    return contextlib.nullcontext() if admission is None else admission.launch(on_queued)


@dataclass
class _Queued:
    report: Callable[[int], None]
    reported: int = 0  # the last position reported (0: none yet)
    reported_at: float = 0.0


class Admission:
    """The launcher's admission control for one hub; see the module's docstring."""

    def __init__(self, max_requests: int | None = None, max_pending_spawns: int | None = None) -> None:
        self.requests = RequestLimit(max_requests)
        self.spawns = SpawnLimit(max_pending_spawns)
        self._tickets = itertools.count(1)
        self._queued: dict[int, _Queued] = {}  # ticket -> a launch whose start is not sent yet
        self._spawning: set[int] = set()  # tickets holding a spawn slot
        self._started: set[int] = set()  # tickets whose start request was sent
        self._retrying: dict[int, asyncio.Event] = {}  # tickets whose start waits out a 429: set when resent
        self._reporter: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Launches waiting in the launcher, not yet started at the hub."""
        return len(self._queued)

    def position(self, ticket: int) -> int:
        return 1 + sum(1 for other in self._queued if other < ticket)

    @contextlib.asynccontextmanager
    async def launch(self, on_queued: Callable[[int], None]) -> AsyncIterator[None]:
        """Admission for one launch. Hub requests made inside are in the launch lane, ordered by
        this launch's arrival; its start request first waits for a spawn slot, held until the block
        ends: normally (ready) or with an exception (failed). ``on_queued(position)`` reports
        waiting, until the start request is sent."""
        ticket = next(self._tickets)
        order = _order.set((LANE_LAUNCH, ticket))
        queued = self._queued[ticket] = _Queued(on_queued)
        ok = False
        try:
            if not self.spawns.can_start_now() or self.position(ticket) > 1:
                self._report(queued, self.position(ticket), asyncio.get_running_loop().time())
                self._ensure_reporter()
            yield
            ok = True
        finally:
            self._queued.pop(ticket, None)
            self._started.discard(ticket)
            if ticket in self._spawning:
                self._spawning.discard(ticket)
                self.spawns.release(ok)
            _order.reset(order)

    async def spawn_slot(self) -> None:
        """Inside ``launch()``: wait for one of our spawn slots, held until the launch ends (once;
        a START request takes it itself if not taken yet)."""
        lane, ticket = _order.get()
        if lane == LANE_LAUNCH and ticket not in self._spawning:
            await self.spawns.acquire(ticket)
            self._spawning.add(ticket)

    @contextlib.asynccontextmanager
    async def request(self, kind: Kind) -> AsyncIterator[Slot]:
        """One hub request's slot. A CHEAP request's answer time (the block ending without an
        exception) is a sample; a STREAM's caller releases its slot once the response starts. A
        launch's START first takes a spawn slot (once: a retry keeps it)."""
        loop = asyncio.get_running_loop()
        lane, ticket = _order.get()
        if kind is Kind.START:
            await self.spawn_slot()
        if lane == LANE_LAUNCH and ticket in self._started and kind is not Kind.START:
            # A started launch's token request and model read go at once: they finish a launch
            # that holds a spawn slot, and the token, sent right behind the start, is answered
            # before a quick spawn is ready (waiting for a slot, it came after, and the reply with it).
            slot = self.requests.admit_now()
        else:
            slot = await self.requests.acquire()
        began = loop.time()
        hold: asyncio.TimerHandle | None = None
        if kind is Kind.START and lane == LANE_LAUNCH:
            self._started.add(ticket)
            self.requests.admit_waiting(lane, ticket)
        if kind is Kind.START:
            queued = self._queued.pop(ticket, None)  # sent: no longer queued in the launcher
            if queued is not None and queued.reported:
                self._call(queued, 0)
        if kind in (Kind.START, Kind.STOP):
            hold = loop.call_later(self.requests.hold_time(), slot.release)
        answered = False
        try:
            yield slot
            answered = True
        finally:
            if hold is not None:
                hold.cancel()
            slot.release()
            if answered and kind is Kind.CHEAP:
                now = loop.time()
                self.requests.sample(now - began, now)

    async def throttled(self, retry_after: float) -> None:
        """A start was refused with 429: learn the limit, then wait for the retry (see SpawnLimit)."""
        ticket = _order.get()[1]
        retried = self._retrying[ticket] = asyncio.Event()
        try:
            self.spawns.refused(retry_after)
            await self.spawns.wait_for_retry(ticket, retry_after)
        finally:
            del self._retrying[ticket]
            retried.set()

    async def start_retried(self) -> bool:
        """Inside ``launch()``: while this launch's start waits out a 429, wait until it is sent
        again (True); False at once if it is not waiting. Its progress stream cannot open before
        (the hub answers 400, not pending), so asking for it meanwhile only costs the hub requests."""
        retried = self._retrying.get(_order.get()[1])
        if retried is None:
            return False
        await retried.wait()
        return True

    def _report(self, queued: _Queued, position: int, now: float) -> None:
        if position != queued.reported:
            queued.reported, queued.reported_at = position, now
            self._call(queued, position)

    @staticmethod
    def _call(queued: _Queued, position: int) -> None:
        try:
            queued.report(position)
        except Exception:  # reporting is best effort; the launch goes on
            log.exception("could not report a queued launch")

    def _ensure_reporter(self) -> None:
        if self._reporter is None or self._reporter.done():
            self._reporter = asyncio.create_task(self._report_positions())

    async def _report_positions(self) -> None:
        loop = asyncio.get_running_loop()
        logged = 0.0
        while self._queued:
            await asyncio.sleep(QUEUE_REPORT_INTERVAL / 5)
            now = loop.time()
            if now - logged >= LOG_INTERVAL:
                logged = now
                state = self.snapshot()
                log.info(
                    "admission: %d launches queued; hub requests %d in flight (limit %d), %d waiting, answer %.0f ms "
                    "(idle %.0f ms); spawns %d pending (limit %s), %d waiting",
                    state["launches_queued"],
                    state["requests_in_flight"],
                    state["requests_limit"],
                    state["requests_waiting"],
                    (state["hub_answer_s"] or 0) * 1000,
                    (state["hub_idle_answer_s"] or 0) * 1000,
                    state["spawns_pending"],
                    state["spawns_limit"] or "unknown",
                    state["spawns_waiting"],
                )
            for position, ticket in enumerate(sorted(self._queued), 1):
                queued = self._queued[ticket]
                if (
                    queued.reported
                    and queued.reported != position
                    and now - queued.reported_at >= QUEUE_REPORT_INTERVAL
                ):
                    self._report(queued, position, now)

    def snapshot(self) -> dict[str, float | int | None]:
        """The limits and queue lengths now, for logs and metrics."""
        return {
            "requests_limit": self.requests.limit,
            "requests_in_flight": self.requests.in_flight,
            "requests_waiting": self.requests.waiting,
            "hub_answer_s": self.requests.rtt,
            "hub_idle_answer_s": self.requests.base,
            "spawns_limit": None if self.spawns.limit is None else math.floor(self.spawns.limit),
            "spawns_pending": self.spawns.pending,
            "spawns_waiting": self.spawns.waiting,
            "launches_queued": self.queued,
        }

"""Admission control's algorithms (consumer/admission.py), against scripted hubs on a virtual clock.

The hub is a model here (the quality bar allows it for a pure algorithm): the real hub's behaviour
under a burst is in test_admission_hub.py.
"""

from __future__ import annotations

import asyncio
import heapq

from consumer.admission import LANE_LAUNCH, QUEUED_HIGH, Admission, Kind, RequestLimit, SpawnLimit, _order


def simulate(limiter: RequestLimit, answer_time, seconds: float = 30.0, demand: int = 200) -> list[int]:
    """Drive ``limiter`` with ``demand`` requests always wanting to go, on a virtual clock.

    ``answer_time(now, in_flight_at_hub)`` says when a request sent now is answered. Returns the
    limit after each answer."""
    now, in_flight = 0.0, 0
    answers: list[tuple[float, float]] = []  # (answered at, sent at)
    limits = []
    while now < seconds:
        while in_flight < limiter.limit and in_flight < demand:
            in_flight += 1
            limiter.in_flight = in_flight
            limiter._saturated |= in_flight >= limiter.limit
            heapq.heappush(answers, (answer_time(now, in_flight), now))
        now, sent = heapq.heappop(answers)
        in_flight -= 1
        limiter.in_flight = in_flight
        limiter.sample(now - sent, now)
        limits.append(limiter.limit)
    return limits


class SerialHub:
    """JupyterHub's API: one request at a time, ``work`` seconds each, in arrival order."""

    def __init__(self, work: float, others: float = 0.0) -> None:
        self.work, self.others = work, others
        self.free_at = 0.0

    def __call__(self, now: float, _: int) -> float:
        self.free_at = max(self.free_at, now) + self.work + self.others
        return self.free_at


def test_a_hub_whose_answers_stay_fast_gets_more_requests_in_flight_than_one_that_queues_them() -> None:
    parallel = simulate(RequestLimit(), lambda now, _: now + 0.005)  # answers in 5 ms, however many
    serial = simulate(RequestLimit(), SerialHub(work=0.005))  # 5 ms of work each, one at a time
    assert max(parallel[-100:]) >= 32, parallel[-100:]
    # The serial hub's queue is what we add: a few requests, not the 200 that want to go.
    assert max(serial[len(serial) // 2 :]) <= QUEUED_HIGH + 2, serial[-50:]


def test_a_hub_that_becomes_slow_gets_fewer_requests_in_flight() -> None:
    limiter = RequestLimit()
    fast = simulate(limiter, lambda now, _: now + 0.005, seconds=20)
    # Now its answers take 20x longer (other work on its event loop), whatever we send.
    slow = simulate(limiter, lambda now, _: now + 0.1, seconds=40)
    assert fast[-1] >= 32
    assert slow[-1] <= QUEUED_HIGH + 1 and slow[-1] < fast[-1] / 4, (fast[-1], slow[-20:])


def test_a_fixed_limit_does_not_adapt() -> None:
    limits = simulate(RequestLimit(fixed=7), SerialHub(work=0.005))
    assert set(limits) == {7}


async def test_a_waiting_read_gets_the_next_slot_before_waiting_launch_requests() -> None:
    admission = Admission(max_requests=1)
    granted: list[str] = []
    hold = await admission.requests.acquire()  # the one slot is busy

    async def ask(name: str, lane: int, ticket: int) -> None:
        _order.set((lane, ticket))
        async with admission.request(Kind.CHEAP):
            granted.append(name)

    launches = [asyncio.create_task(ask(f"launch{i}", LANE_LAUNCH, i)) for i in (3, 1, 2)]
    await asyncio.sleep(0)
    read = asyncio.create_task(ask("read", 0, 0))
    await asyncio.sleep(0)
    hold.release()
    await asyncio.gather(read, *launches)
    # The read came last but goes first; launches in their order of arrival (ticket), not of asking.
    assert granted == ["read", "launch1", "launch2", "launch3"]


async def test_a_429_holds_new_starts_at_our_pending_spawns_and_retries_when_one_frees() -> None:
    spawns = SpawnLimit()
    for ticket in range(1, 6):  # limit unknown: five start at once
        await spawns.acquire(ticket)
    # The hub refuses the 6th start: it is full with our 5 (pending counts the refused one too).
    await spawns.acquire(6)
    spawns.refused()
    assert spawns.limit == 5
    retry = asyncio.create_task(spawns.wait_for_retry(6, timeout=60))
    new = asyncio.create_task(spawns.acquire(7))
    await asyncio.sleep(0.01)
    assert not retry.done() and not new.done()
    spawns.release(ok=True)  # one of ours is ready: the refused start retries at once, not in 60 s
    await asyncio.wait_for(retry, 1)
    assert not new.done()  # ...and takes the slot that freed; the new start still waits
    spawns.release(ok=True)
    await asyncio.wait_for(new, 1)
    assert spawns.pending == 5


async def test_a_429_retry_waits_no_longer_than_retry_after() -> None:
    spawns = SpawnLimit()
    await spawns.acquire(1)
    spawns.refused()
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(spawns.wait_for_retry(1, timeout=0.2), 5)  # nothing of ours frees
    assert 0.15 < loop.time() - began < 5
    assert spawns.throttled == 0


async def test_the_learned_spawn_limit_grows_after_as_many_ready_spawns_as_it_is_large() -> None:
    spawns = SpawnLimit()

    async def start() -> None:
        await asyncio.wait_for(spawns.acquire(0), 1)

    async def ready_while_one_waits() -> None:
        waiting = asyncio.create_task(spawns.acquire(0))  # the limit holds a launch back...
        await asyncio.sleep(0)
        spawns.release(ok=True)  # ...when one of ours is ready: its slot goes to the waiting one
        await asyncio.wait_for(waiting, 1)

    for _ in range(4):
        await start()
    spawns.refused()  # the 4th refused: full at 3
    spawns.release(ok=False)  # (the refused one gives up)
    assert spawns.limit == 3
    spawns.release(ok=True)  # ready while nobody waits: no reason to grow
    await start()
    for _ in range(3):
        await ready_while_one_waits()
    assert spawns.limit == 4  # grew by one after 3 ready
    await start()
    spawns.refused()  # ...and that growth met a 429: the next one needs twice as many ready
    spawns.release(ok=False)
    assert spawns.limit == 3 and spawns._growth_factor == 2
    for _ in range(5):
        await ready_while_one_waits()
    assert spawns.limit == 3
    await ready_while_one_waits()
    assert spawns.limit == 4


async def test_the_learned_spawn_limit_does_not_grow_before_the_last_429s_retry_after() -> None:
    spawns = SpawnLimit()

    async def ready_while_one_waits() -> None:
        waiting = asyncio.create_task(spawns.acquire(0))
        await asyncio.sleep(0)
        spawns.release(ok=True)
        await asyncio.wait_for(waiting, 1)

    for _ in range(3):
        await asyncio.wait_for(spawns.acquire(0), 1)
    spawns.refused(retry_after=0.3)  # the 3rd refused: full at 2
    spawns.release(ok=False)
    assert spawns.limit == 2
    for _ in range(4):  # twice as many ready as needed, all within the Retry-After
        await ready_while_one_waits()
    assert spawns.limit == 2
    await asyncio.sleep(0.35)
    await ready_while_one_waits()  # the next ready spawn after it grows the limit
    assert spawns.limit == 3


async def test_queued_launches_report_their_position_and_are_cleared_once_started() -> None:
    admission = Admission(max_pending_spawns=1)
    reports: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    started: list[str] = []
    go = asyncio.Event()

    async def launch(name: str) -> None:
        async with admission.launch(reports[name].append):
            async with admission.request(Kind.START):
                started.append(name)
            await go.wait()  # pending at the hub until "ready"

    tasks = [asyncio.create_task(launch(n)) for n in "abc"]
    await asyncio.sleep(0.05)
    assert started == ["a"] and admission.queued == 2
    assert reports == {"a": [], "b": [1], "c": [2]}  # a started at once; b is next in line, then c
    go.set()
    await asyncio.gather(*tasks)
    assert started == ["a", "b", "c"]
    assert reports["b"] == [1, 0] and reports["c"][-1] == 0  # told when their start went
    assert admission.spawns.pending == 0 and admission.queued == 0


async def test_a_started_launch_sends_its_token_request_with_its_start_not_after_other_launches() -> None:
    admission = Admission(max_requests=1)
    hold = await admission.requests.acquire()  # the one slot is busy
    sent: list[str] = []
    finish = asyncio.Event()

    async def request(name: str, kind: Kind) -> None:
        async with admission.request(kind):
            sent.append(name)
            await finish.wait()

    async def launch(name: str) -> None:
        async with admission.launch(lambda _: None):
            start = asyncio.create_task(request(f"{name}:start", Kind.START))
            token = asyncio.create_task(request(f"{name}:token", Kind.CHEAP))
            await asyncio.gather(start, token)

    first = asyncio.create_task(launch("a"))
    await asyncio.sleep(0)
    second = asyncio.create_task(launch("b"))
    await asyncio.sleep(0.01)
    assert sent == []
    hold.release()
    await asyncio.sleep(0.01)
    # a's start took the slot, and its token went with it (over the limit); b waits.
    assert sent == ["a:start", "a:token"]
    finish.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert sent[2:] == ["b:start", "b:token"] and admission.requests.in_flight == 0


def test_settings_fix_either_limit_and_zero_or_absent_means_adaptive() -> None:
    from consumer.config import load_settings

    settings = load_settings(None, {"LAUNCHER_HUB_MAX_REQUESTS": "6", "LAUNCHER_HUB_MAX_PENDING_SPAWNS": "64"})
    fixed = Admission(settings.hub_max_requests, settings.hub_max_pending_spawns)
    assert (fixed.requests.fixed, fixed.requests.limit, fixed.spawns.limit) == (6, 6, 64)
    for environ in ({}, {"LAUNCHER_HUB_MAX_REQUESTS": "0", "LAUNCHER_HUB_MAX_PENDING_SPAWNS": "0"}):
        settings = load_settings(None, environ)
        adaptive = Admission(settings.hub_max_requests, settings.hub_max_pending_spawns)
        assert adaptive.requests.fixed is None and adaptive.spawns.limit is None


async def test_a_start_refused_twice_waits_for_its_retry_twice() -> None:
    spawns = SpawnLimit()
    await spawns.acquire(1)
    await spawns.acquire(2)
    for _ in range(2):  # the same launch (ticket 2) refused again after its retry
        spawns.refused()
        await asyncio.wait_for(spawns.wait_for_retry(2, timeout=0.05), 5)
    retry = asyncio.create_task(spawns.wait_for_retry(2, timeout=60))
    await asyncio.sleep(0)
    spawns.release(ok=True)  # ticket 1 is ready: ticket 2 retries at once
    await asyncio.wait_for(retry, 1)


async def test_a_launch_waiting_out_a_429_is_told_when_its_start_is_sent_again() -> None:
    admission = Admission()
    first_started = asyncio.Event()

    async def first() -> None:
        async with admission.launch(lambda _: None):
            await admission.spawn_slot()
            first_started.set()
            await asyncio.sleep(0.3)  # its spawn takes a while, then it is ready

    async def second() -> tuple[bool, bool, float]:
        async with admission.launch(lambda _: None):
            await first_started.wait()
            await admission.spawn_slot()
            assert not await admission.start_retried()  # not refused: nothing to wait for
            refused = asyncio.create_task(admission.throttled(retry_after=60))
            await asyncio.sleep(0)
            waited_from = asyncio.get_running_loop().time()
            retried = await admission.start_retried()  # as its progress stream would
            waited = asyncio.get_running_loop().time() - waited_from
            await refused
            return retried, refused.done(), waited

    _, (retried, resent, waited) = await asyncio.wait_for(asyncio.gather(first(), second()), 5)
    assert retried and resent
    assert 0.2 < waited < 2  # until the first launch's slot freed, not Retry-After's 60 s

"""Fuzz: thousands of hostile messages against the real broker and hub, then a valid launch.

Hypothesis generates the bodies (random bytes, JSON nested thousands deep, huge strings, lone
surrogates, numbers such as Infinity, NaN and 1e999, wrong types, truncated JSON, text that is not
UTF-8) and the properties (content types and encodings, headers, reply_to, message_id, correlation
ids). Every message must end answered (its result event published) or dead-lettered, and the
consumer must still launch a server afterwards. ``FUZZ_EXAMPLES`` and ``FUZZ_SEED`` change the run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import pamqp.encode
import pytest
from hypothesis import HealthCheck, Phase, given, seed
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from consumer.config import Settings
from schemas import ACTIONS
from tests.conftest import AMQP_URL, Client, unique

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2500"))
OUR_QUEUE = "<the test's reply queue>"  # replaced by the client's reply queue when published
FUZZ_HEADER = "x-fuzz-case"


@dataclass
class Case:
    body: bytes
    # Properties are short strings: UTF-8 from most clients, any bytes from some.
    reply_to: str | bytes | None
    message_id: str | bytes | None
    correlation_suffix: str | bytes
    content_type: str | bytes | None
    content_encoding: str | bytes | None
    headers: dict[str, Any]
    delivery_mode: int
    priority: int | None


def strategies(users: list[str]) -> st.SearchStrategy[Case]:
    surrogate = st.integers(0xD800, 0xDFFF).map(chr)
    text = st.one_of(
        st.text(st.one_of(st.characters(), surrogate), max_size=30),
        st.sampled_from(["", " ", "Alice", "a/b", "../../etc", "\x00", "\ud800", "\udfff", "\ud83d\ude00", "null"]),
        st.integers(300, 20_000).map(lambda n: "x" * n),
    )
    number = st.one_of(
        st.integers(-(10**30), 10**30),
        st.floats(),  # includes nan, inf and -inf: json.dumps writes NaN and Infinity
        st.sampled_from([0, -1, 1, 2, 10**400, 1e308, -0.0, 5e-324, 1e-400]),
    )
    value = st.recursive(
        st.one_of(st.none(), st.booleans(), number, text),
        lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(text, children, max_size=4)),
        max_leaves=12,
    )
    memory = st.one_of(number, st.sampled_from(["1G", "4X", "1e308", "99999999T", "1" + "0" * 400, "-1G"]), text)
    resources = st.fixed_dictionaries({}, optional={"request": number, "limit": number})
    volume = st.fixed_dictionaries({"pvc": text, "mount": text}, optional={"subpath": text})
    command = st.fixed_dictionaries(
        {
            "action": st.one_of(st.sampled_from(ACTIONS), value),
            "username": st.one_of(st.sampled_from(users), text, value),
        },
        optional={
            "server_name": st.one_of(st.sampled_from(["", "fz-1"]), text, value),
            "image": st.one_of(st.just("standin"), text, value),
            "cpu": st.one_of(resources, value),
            "memory": st.one_of(st.fixed_dictionaries({}, optional={"request": memory, "limit": memory}), value),
            "gpu": st.one_of(resources, value),
            "vols": st.one_of(st.lists(volume, max_size=3), value),
            "env": st.one_of(st.dictionaries(text, text, max_size=3), value),
            "json": value,
            "timeout": st.one_of(number, value),
            "skip_check": value,
            "privileged": value,
        },
    )
    # Valid commands too, so that runs, joined copies and acks meet the hostile properties.
    target = {"username": st.sampled_from(users)}
    optional = {
        "server_name": st.sampled_from(["", "fz-1"]),
        "timeout": st.integers(1, 30),
        "skip_check": st.booleans(),
    }
    valid = st.one_of(
        st.fixed_dictionaries({"action": st.sampled_from(["read", "remove"]), **target}, optional=optional),
        st.fixed_dictionaries(
            {"action": st.just("launch"), "image": st.just("standin"), **target},
            optional={**optional, "cpu": st.just({"limit": 1}), "memory": st.just({"limit": "1G"})},
        ),
    )
    deep = st.one_of(
        st.builds(
            lambda depth, inside: (
                (b'{"action": "launch", "username": "a", "image": "standin", "json": ' if inside else b"")
                + b"[" * depth
                + b"1"
                + b"]" * depth
                + (b"}" if inside else b"")
            ),
            st.integers(100, 20_000),
            st.booleans(),
        ),
        st.builds(lambda depth: b'{"a": ' * depth + b"1" + b"}" * depth, st.integers(100, 20_000)),
    )

    def encode(data: Any, how: str) -> bytes:
        if how == "ascii":
            return json.dumps(data).encode()
        if how == "surrogatepass":  # not UTF-8 where it holds surrogates
            return json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogatepass")
        return json.dumps(data, ensure_ascii=False).encode("utf-16", "surrogatepass")

    how = st.sampled_from(["ascii", "ascii", "surrogatepass", "utf-16"])
    body = st.one_of(
        st.binary(max_size=300),
        st.builds(encode, value, how),
        st.builds(encode, command, how),
        st.builds(encode, command, how),
        st.builds(encode, command, how),
        st.builds(lambda data, cut: json.dumps(data).encode()[:cut], command, st.integers(0, 200)),  # truncated
        st.builds(lambda data: json.dumps(data).encode(), valid),
        deep,
    )
    utf8 = st.characters(codec="utf-8")  # what an AMQP client can send in properties and headers
    short = st.one_of(st.text(utf8, max_size=50), st.binary(max_size=50))  # AMQP short strings: 255 bytes
    header_value = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False, width=32),  # as pamqp and RabbitMQ take them
        st.text(utf8, max_size=40),
        st.lists(st.integers(-100, 100), max_size=3),
        st.dictionaries(st.text(utf8, max_size=10), st.text(utf8, max_size=10), max_size=2),
    )
    return st.builds(
        Case,
        body=body,
        reply_to=st.one_of(
            st.sampled_from([OUR_QUEUE, OUR_QUEUE, None, "", "no-such-queue", "amq.rabbitmq.reply-to.x"]),
            short,
        ),
        message_id=st.one_of(st.none(), st.sampled_from(["", "dup-1", "dup-2"]), short),
        correlation_suffix=short,
        content_type=st.one_of(
            st.none(), st.sampled_from(["application/json", "text/plain", "application/octet-stream", ""]), short
        ),
        content_encoding=st.one_of(st.none(), st.sampled_from(["gzip", "utf-16", ""]), short),
        # Not "x-" headers: RabbitMQ reads those itself, and a malformed x-death crashes the
        # dead-letter worker of RabbitMQ 3.10's quorum queues, for every queue on the node.
        headers=st.dictionaries(
            st.text(utf8, max_size=20).filter(lambda k: not k.startswith("x-")), header_value, max_size=4
        ),
        delivery_mode=st.sampled_from([1, 2]),
        priority=st.one_of(st.none(), st.integers(0, 255)),
    )


def generate(count: int, users: list[str], run_seed: int) -> list[Case]:
    """``count`` cases, drawn by hypothesis (generation only: the property is checked over all)."""
    cases: list[Case] = []

    @seed(run_seed)
    @hypothesis_settings(
        max_examples=count,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategies(users))
    def collect(case: Case) -> None:
        cases.append(case)

    collect()
    return cases


def huge_cases(users: list[str]) -> list[Case]:
    """A few big bodies, around and past the 1 MiB a command may have (not left to chance)."""

    def case(body: bytes) -> Case:
        return Case(body, OUR_QUEUE, None, "huge", "application/json", None, {}, 2, None)

    mib = 1024 * 1024
    filler = lambda n: json.dumps({"action": "launch", "username": users[0], "image": "x" * n}).encode()
    return [
        case(filler(mib - 100)),
        case(filler(mib + 1)),
        case(b'{"action": "read", "username": "' + b"a" * (3 * mib) + b'"}'),
        case(os.urandom(2 * mib)),
    ]


def correlation_id(index: int, suffix: str | bytes) -> tuple[str | bytes, str]:
    """The correlation id to publish, and as the launcher reads it back (bytes that are not UTF-8
    become U+FFFD)."""
    prefix = f"fz{index}|"
    if isinstance(suffix, bytes):
        raw = prefix.encode() + suffix[: 255 - len(prefix)]
        return raw, raw.decode("utf-8", "replace")
    cut = suffix.encode()[: 255 - len(prefix)].decode("utf-8", "ignore")
    return prefix + cut, prefix + cut


def case_of(correlation: str | None) -> int | None:
    if not correlation or not correlation.startswith("fz") or "|" not in correlation:
        return None
    return int(correlation[2 : correlation.index("|")])


async def test_thousands_of_hostile_messages_are_each_answered_or_dead_lettered_and_a_launch_still_works(
    service: None, client: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Let this publisher send bytes that are not UTF-8 in short strings, as other AMQP clients can.
    strict = pamqp.encode._string
    monkeypatch.setattr(
        pamqp.encode,
        "_string",
        lambda encoder, value: encoder.pack(len(value)) + value if isinstance(value, bytes) else strict(encoder, value),
    )
    run_seed = int(os.environ.get("FUZZ_SEED", random.randrange(2**32)))
    print(f"FUZZ_SEED={run_seed}")
    users = [unique("fz-") for _ in range(3)]
    started = time.monotonic()
    cases = await asyncio.to_thread(generate, EXAMPLES, users, run_seed)
    cases += huge_cases(users)
    generated = time.monotonic()

    dead: set[int] = set()
    dead_connection = await aio_pika.connect(AMQP_URL)
    dead_channel = await dead_connection.channel()
    dead_queue = await dead_channel.get_queue(settings.dead_letter_queue)

    async def on_dead(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        index = (message.headers or {}).get(FUZZ_HEADER)
        if isinstance(index, int):
            dead.add(index)
        await message.ack()

    await dead_queue.consume(on_dead)
    loop = asyncio.get_running_loop()
    launched: dict[str, Any] = {"ok": "no reply"}
    try:
        expect_reply: dict[int, str] = {}

        underlay = await client.channel.get_underlay_channel()

        async def publish(index: int, case: Case) -> None:
            correlation, read_back = correlation_id(index, case.correlation_suffix)
            reply_to = client.reply_queue.name if case.reply_to == OUR_QUEUE else case.reply_to
            if reply_to == client.reply_queue.name:
                expect_reply[index] = read_back
                client.replies[read_back] = loop.create_future()
            properties = aiormq.spec.Basic.Properties(
                content_type=case.content_type,
                content_encoding=case.content_encoding,
                headers={**case.headers, FUZZ_HEADER: index},
                delivery_mode=case.delivery_mode,
                priority=case.priority,
                correlation_id=correlation,
                reply_to=reply_to,
                message_id=case.message_id,
            )
            await underlay.basic_publish(
                case.body, routing_key=settings.command_queue, properties=properties, mandatory=True
            )

        for start in range(0, len(cases), 200):  # confirmed in batches
            await asyncio.gather(*(publish(i, case) for i, case in enumerate(cases) if start <= i < start + 200))
        published = time.monotonic()

        # Behind all of them, a valid launch must still succeed.
        launch = await client.send({"action": "launch", "username": unique("u"), "image": "standin"})

        def answered() -> set[int]:
            return {i for _, body in client.results if (i := case_of(body["_correlation_id"])) is not None}

        def replied() -> set[int]:
            return {i for i, c in expect_reply.items() if client.replies[c].done()}

        everything = set(range(len(cases)))
        with contextlib.suppress(TimeoutError):  # what is missing then is reported below
            async with asyncio.timeout(120):
                while not (everything <= answered() | dead and replied() == set(expect_reply)):
                    await asyncio.sleep(0.2)
                launched = await client.reply(launch)
        finished = time.monotonic()

        lost = everything - answered() - dead
        results = answered()
        print(
            f"{len(cases)} messages: {len(results)} answered (result event), {len(replied())} of "
            f"{len(expect_reply)} replies to the test's queue, {len(dead)} dead-lettered, "
            f"{len(results - dead)} acked, {len(lost)} lost; generated in {generated - started:.1f} s, "
            f"published in {published - generated:.1f} s, all settled {finished - published:.1f} s later"
        )
        codes = collections.Counter(
            (body.get("error") or {}).get("code", "ok")
            for _, body in client.results
            if case_of(body["_correlation_id"]) is not None
        )
        print(f"outcomes: {dict(codes)}")
        assert not lost
        assert not codes["internal_error"]  # the last-resort answer means a bug in the launcher
        assert replied() == set(expect_reply)  # every delivery with a reply_to was answered
        # Invalid ones are dead-lettered; the rest ran (read, remove, a few launches) and were acked.
        assert len(dead) > len(cases) // 2
        assert launched["ok"] is True, launched
    finally:
        await dead_connection.close()
        # Stop the servers the valid launches among the cases started (not waited for long: when
        # the test failed because the consumer is stuck, they would never be answered).
        removes = [
            await client.send({"action": "remove", "username": user, "server_name": server_name})
            for user in users
            for server_name in ("", "fz-1")
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(60):
                for correlation in removes:
                    await client.reply(correlation)

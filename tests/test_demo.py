"""``make demo`` runs end to end and, stopped with Ctrl-C, leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aio_pika
import pytest

from tests.conftest import AMQP_URL, unique
from tests.support.localhub import ROOT


async def exists(kind: str, name: str) -> bool:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()  # a failed passive declare closes its channel
        try:
            if kind == "queue":
                await channel.declare_queue(name, passive=True)
            else:
                await channel.declare_exchange(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        return True


async def delete(prefix: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for queue in (f"{prefix}.commands", f"{prefix}.commands.dead"):
            await channel.queue_delete(queue)
        for exchange in (f"{prefix}.replies", f"{prefix}.events", f"{prefix}.commands.dlx"):
            await channel.exchange_delete(exchange)


async def test_the_demo_launches_a_server_and_on_ctrl_c_removes_its_queues_exchanges_and_hub_state(
    tmp_path: Path,
) -> None:
    prefix = unique("test-demo-")
    env = {**os.environ, "DEMO_PREFIX": prefix, "PYTHONPATH": str(ROOT)}
    env.pop("LAUNCHER_AMQP_URL", None)
    with (tmp_path / "demo.err").open("wb") as errors:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.support.demo",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=errors,
        )
        out: list[str] = []
        try:
            assert process.stdout is not None
            async with asyncio.timeout(180):
                while not any("Ctrl-C to stop" in line for line in out):
                    line = await process.stdout.readline()
                    if not line:
                        pytest.fail("the demo exited early:\n" + "".join(out) + (tmp_path / "demo.err").read_text())
                    out.append(line.decode())
            names = {
                "queue": [f"{prefix}.commands", f"{prefix}.commands.dead"],
                "exchange": [f"{prefix}.replies", f"{prefix}.events", f"{prefix}.commands.dlx"],
            }
            assert all([await exists(kind, n) for kind, ns in names.items() for n in ns])  # made while running
            process.send_signal(signal.SIGINT)
            rest, _ = await asyncio.wait_for(process.communicate(), 120)
            out.append(rest.decode())
        finally:
            if process.returncode is None:  # the test failed: stop the demo, its launcher and hub too
                process.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(process.wait(), 60)
                except TimeoutError:
                    process.kill()
                    await process.wait()
                await delete(prefix)  # in case the demo could not
    text = "".join(out)
    print(text)
    assert process.returncode == 0, (tmp_path / "demo.err").read_text()
    assert ">>> notebook URL: " in text and "(answered 200)" in text
    assert "'action': 'remove'" in text and "'ok': True" in text
    for kind, ns in names.items():
        for name in ns:
            assert not await exists(kind, name), (kind, name)
    log = re.search(r"\(log: (.+)/jupyterhub\.log\)", text)
    assert log is not None
    assert not Path(log.group(1)).exists()  # the hub's state directory

"""Start-up mistakes, seen as an operator sees them: the launcher's command line, its exit code and
its log, against the real broker and hub (and, for a broker that never answers, a silent listener)."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import pytest

from consumer import __version__
from consumer.config import Settings
from consumer.hub import HubClient
from consumer.hubcheck import HubCheck
from tests.conftest import make_settings
from tests.support.launcher_process import launcher_env, launcher_process, settings_env
from tests.support.localhub import ROOT, LocalHub, free_port

PASSWORD = "s3cret-pw-4711"
HUB_TOKEN_MARK = "wrong-s3cret-token"


def run_launcher(env: dict[str, str], cwd: Path, timeout: float = 120) -> tuple[int, list[str], float]:
    """Exit code, stderr lines, seconds taken (printed, not asserted: the machine is shared)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "consumer", "run"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    took = time.monotonic() - started
    print(f"launcher exited {done.returncode} after {took:.2f} s:\n{done.stderr}")
    return done.returncode, done.stderr.splitlines(), took


def error_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if " ERROR " in line or " CRITICAL " in line]


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("notaurl", "must start with amqp:// or amqps://"),
        (f"amqp//user:{PASSWORD}@host/", "must start with amqp:// or amqps://"),
        (f"http://user:{PASSWORD}@127.0.0.1:5672/", "(found http://)"),
        (f"amqp://user:{PASSWORD}@/", "names no host"),
        (f"amqp://user:{PASSWORD}@host:port/", "is not a URL"),
    ],
)
def test_a_malformed_amqp_url_stops_start_up_at_once_with_one_line_and_no_password(
    tmp_path: Path, url: str, says: str
) -> None:
    code, lines, _ = run_launcher(launcher_env(amqp_url=url, jupyterhub_url="http://127.0.0.1:9"), tmp_path, timeout=60)
    assert code == 2
    assert len(lines) == 1, lines
    assert "amqp_url" in lines[0] and says in lines[0]
    assert PASSWORD not in lines[0] and "Traceback" not in lines[0]


def test_an_unreachable_broker_fails_start_up_with_one_error_line_and_exit_1(hub: LocalHub, tmp_path: Path) -> None:
    port = free_port()  # bound once and released: nothing listens there
    settings = make_settings(hub, amqp_url=f"amqp://guest:{PASSWORD}@127.0.0.1:{port}/")
    code, lines, _ = run_launcher(settings_env(settings, amqp_startup_timeout=3), tmp_path)
    assert code == 1
    errors = error_lines(lines)
    assert len(errors) == 1, lines
    assert "cannot start: RabbitMQ at" in errors[0] and f"127.0.0.1:{port}" in errors[0]
    # Tried again after 1 s, then given up: the next pause (2 s) would end past amqp_startup_timeout.
    assert "cannot connect" in errors[0] and re.search(r"\(gave up after \d+ attempts in \d+ s\)$", errors[0])
    assert [line for line in lines if "trying again in 1 s" in line], lines
    log = "\n".join(lines)
    assert PASSWORD not in log and "Traceback" not in log
    # The AMQP libraries' own lines for each attempt stay out of it at INFO; start-up says it once.
    assert "Reconnecting" not in log and "aiormq" not in log


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"amqp://guest:{PASSWORD}@127.0.0.1:5672/", "the login was refused"),
        ("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "does the vhost exist"),
    ],
)
def test_a_refused_login_fails_start_up_at_once_with_one_error_line_and_exit_1(
    hub: LocalHub, tmp_path: Path, url: str, says: str
) -> None:
    settings = make_settings(hub, amqp_url=url)
    code, lines, _ = run_launcher(settings_env(settings), tmp_path)
    assert code == 1
    errors = error_lines(lines)
    assert len(errors) == 1, lines
    assert "127.0.0.1:5672" in errors[0] and says in errors[0]
    assert "attempts" not in errors[0]  # a refused login is not tried again
    log = "\n".join(lines)
    assert PASSWORD not in log and "Traceback" not in log


class SilentBroker:
    """Accepts TCP connections and never says a word, like a wrong port or a hung broker."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connected.set()
        await reader.read()  # until the client goes away
        writer.close()

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_while_the_broker_does_not_answer_stops_start_up_promptly(
    hub: LocalHub, tmp_path: Path, sig: signal.Signals
) -> None:
    async with SilentBroker() as broker:
        settings = make_settings(hub, amqp_url=f"amqp://guest:{PASSWORD}@127.0.0.1:{broker.port}/")
        # Without the signal it would wait 300 s.
        env = settings_env(settings, amqp_connect_timeout=300)
        async with launcher_process(env, tmp_path, stderr=subprocess.PIPE) as process:
            await asyncio.wait_for(broker.connected.wait(), 60)
            signalled = time.monotonic()
            process.send_signal(sig)
            code = await asyncio.wait_for(process.wait(), 60)
            print(f"exited {code} {time.monotonic() - signalled:.2f} s after {sig.name}")
    assert process.stderr is not None
    log = (await process.stderr.read()).decode()
    print(log)
    assert code == 0
    assert "stopped during start-up" in log
    assert "Traceback" not in log and PASSWORD not in log


async def test_a_broker_that_never_answers_fails_start_up_after_amqp_connect_timeout(
    hub: LocalHub, tmp_path: Path
) -> None:
    async with SilentBroker() as broker:
        settings = make_settings(hub, amqp_url=f"amqp://guest:{PASSWORD}@127.0.0.1:{broker.port}/")
        env = settings_env(settings, amqp_connect_timeout=1, amqp_startup_timeout=0)
        code, lines, _ = await asyncio.to_thread(run_launcher, env, tmp_path)
    assert code == 1
    errors = error_lines(lines)
    assert len(errors) == 1, lines
    assert "no answer within 1 s (amqp_connect_timeout)" in errors[0] and "(gave up after 1 attempt in " in errors[0]
    assert PASSWORD not in "\n".join(lines)


class LateBroker:
    """The real broker, reachable on a port of its own only once ``open`` is called (a forwarder)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: asyncio.Server | None = None

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", 5672)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, broker_writer), pipe(broker_reader, writer))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_start_up_waits_for_a_broker_that_comes_up_within_amqp_startup_timeout(
    hub: LocalHub, settings: Settings, tmp_path: Path
) -> None:
    late = LateBroker()
    env = settings_env(settings, amqp_url=f"amqp://guest:guest@127.0.0.1:{late.port}/", amqp_startup_timeout=60)
    seen: list[str] = []
    try:
        async with launcher_process(env, tmp_path, stderr=subprocess.PIPE) as process:
            assert process.stderr is not None
            await read_until(process.stderr, seen, "trying again in 1 s")  # refused: nothing listens yet
            await late.open()
            await read_until(process.stderr, seen, "consuming " + settings.command_queue)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        await late.close()
    assert not error_lines(seen), seen  # a broker that came in time is no error


async def read_until(
    stream: asyncio.StreamReader, seen: list[str], wanted: str, count: int = 1, timeout: float = 60
) -> None:
    """Read lines into ``seen`` until ``count`` of them contain ``wanted``."""
    async with asyncio.timeout(timeout):
        while sum(wanted in line for line in seen) < count:
            line = await stream.readline()
            if not line:
                raise AssertionError("the launcher exited:\n" + "\n".join(seen))
            seen.append(line.decode().rstrip())


@pytest.mark.parametrize("problem", ["token", "unreachable"])
async def test_a_wrong_hub_token_or_an_unreachable_hub_is_logged_at_start_up_and_the_service_runs_on(
    hub: LocalHub, settings: Settings, tmp_path: Path, problem: str
) -> None:
    if problem == "token":
        values = {"jupyterhub_api_token": HUB_TOKEN_MARK + "-" + hub.token[:8]}
        expected = ["the launcher's token was refused (403", "check jupyterhub_api_token"]
    else:
        values = {"jupyterhub_url": f"http://127.0.0.1:{free_port()}"}
        expected = ["unreachable (GET /: ", "Connect"]
    env = settings_env(settings, hub_check_interval=1)
    env.update({f"LAUNCHER_{k.upper()}": v for k, v in values.items()})
    seen: list[str] = []
    async with launcher_process(env, tmp_path, stderr=subprocess.PIPE) as process:
        assert process.stderr is not None
        await read_until(process.stderr, seen, "ERROR consumer.hubcheck")
        first = next(line for line in seen if "ERROR consumer.hubcheck" in line)
        assert all(part in first for part in expected), first
        assert "checking again every 1 s" in first
        # The service runs on (consuming), and checks and logs again.
        await read_until(process.stderr, seen, "consuming " + settings.command_queue)
        await read_until(process.stderr, seen, "ERROR consumer.hubcheck", count=3)
        assert process.returncode is None
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
        seen += (await process.stderr.read()).decode().splitlines()
    log = "\n".join(seen)
    assert HUB_TOKEN_MARK not in log and hub.token[:8] not in log and "Traceback" not in log


async def test_the_hub_check_logs_recovery_once_the_hub_answers(caplog: pytest.LogCaptureFixture) -> None:
    import aiohttp

    later = LocalHub()
    settings = make_settings(later, hub_check_interval=0.5)
    try:
        async with aiohttp.ClientSession() as session:
            check = HubCheck(HubClient(session, settings.hub_api_url, later.token), settings)
            with caplog.at_level(logging.INFO, logger="consumer.hubcheck"):
                assert await check.check() is False
                assert check.problem is not None and check.problem.startswith("unreachable")
                await asyncio.to_thread(later.start)
                running = asyncio.create_task(check.run())
                try:
                    async with asyncio.timeout(30):
                        while not check.ok:
                            await asyncio.sleep(0.1)
                    await asyncio.sleep(1.5)  # a few more checks, all fine
                finally:
                    running.cancel()
    finally:
        later.close()
    assert not later.state_dir.exists()  # the hub's state is removed with it
    messages = [r.getMessage() for r in caplog.records if r.name == "consumer.hubcheck"]
    accepted = [m for m in messages if "token accepted (service 'launcher')" in m]
    assert len(accepted) == 1, messages  # recovery is logged once, not at every check
    assert messages[0].startswith(f"JupyterHub at {settings.hub_api_url}: unreachable")
    assert later.token not in "\n".join(messages)


async def test_the_hub_check_names_the_scopes_the_token_lacks(caplog: pytest.LogCaptureFixture) -> None:
    import aiohttp

    # The launcher's service, with a role that may read users but not start servers or issue tokens.
    role = {"name": "launcher", "scopes": ["admin:users"], "services": ["launcher"]}
    with LocalHub(extra={"load_roles": [role]}) as limited:
        settings = make_settings(limited)
        async with aiohttp.ClientSession() as session:
            check = HubCheck(HubClient(session, settings.hub_api_url, limited.token), settings)
            with caplog.at_level(logging.INFO, logger="consumer.hubcheck"):
                assert await check.check() is False
    assert check.problem == "the token of service 'launcher' lacks the scopes servers, tokens: commands will be refused"
    [record] = [r for r in caplog.records if r.name == "consumer.hubcheck"]
    assert record.levelno == logging.ERROR and check.problem in record.getMessage()


def test_version_and_help_are_plain_text() -> None:
    version = subprocess.run(
        [sys.executable, "-m", "consumer", "--version"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert version.stdout.strip() == f"jupyterhub-launcher {__version__}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{__version__}"' in pyproject
    for argv in (["--help"], ["run", "--help"]):
        shown = subprocess.run(
            [sys.executable, "-m", "consumer", *argv], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        assert "``" not in shown and ":class:" not in shown, shown  # no reStructuredText
        assert shown.startswith("usage: jupyterhub-launcher")

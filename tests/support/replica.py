"""Launcher replicas as real processes (``python -m consumer run``), as a Deployment runs them."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from consumer.config import Settings
from tests.support.launcher_process import settings_env
from tests.support.localhub import ROOT

ACTIVE_LINE = "active consumer of"  # logged by the broker layer on a replica's first delivery


class Replica:
    """One launcher process with the test's settings; its log (stderr) goes to ``log_path``."""

    def __init__(self, settings: Settings, log_path: Path, amqp_url: str | None = None, **env: str) -> None:
        self.settings = settings
        self.log_path = log_path
        self.amqp_url = amqp_url or settings.amqp_url.get_secret_value()
        self.env = env
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> Replica:
        s = self.settings
        env = (
            settings_env(
                s,
                amqp_url=self.amqp_url,
                shutdown_grace=s.shutdown_grace,
                launch_timeout=s.launch_timeout,
                status_check_interval=s.status_check_interval,
            )
            | self.env
        )
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "consumer",
                "run",
                cwd=ROOT / "tests",
                env=env,
                stderr=log,
                stdout=log,
            )
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def wait_for_log(self, text: str, timeout: float = 60) -> None:
        give_up = time.monotonic() + timeout
        while text not in self.log():
            if self.process is not None and self.process.returncode is not None:
                raise AssertionError(f"replica exited {self.process.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > give_up:
                raise AssertionError(f"replica did not log {text!r} in {timeout} s:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.1)

    async def consuming(self) -> Replica:
        await self.wait_for_log("consuming " + self.settings.command_queue)
        return self

    @property
    def active(self) -> bool:
        return ACTIVE_LINE in self.log()

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait(self, timeout: float = 60) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 60)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

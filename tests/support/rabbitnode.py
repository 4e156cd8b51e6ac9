"""A RabbitMQ node of a test's own (own name, port, data and HOME with its own Erlang cookie), so
that a test can restart a broker without touching the shared one on 127.0.0.1:5672."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from tests.support.localhub import free_port

BIN = Path("/usr/lib/rabbitmq/bin")  # the scripts themselves: /usr/sbin's wrappers switch user and cookie


def available() -> bool:
    return (BIN / "rabbitmq-server").exists()


@dataclass
class RabbitNode:
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    name: str = field(default_factory=lambda: f"test{uuid.uuid4().hex[:8]}@localhost")
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rabbitnode-")))

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.base),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
        }

    def start(self, timeout: float = 120) -> RabbitNode:
        (self.base / "enabled_plugins").write_text("[].\n")
        # Its own listener only (not the system config's 5672).
        (self.base / "rabbitmq.conf").write_text(f"listeners.tcp.default = {self.port}\n")
        subprocess.run([BIN / "rabbitmq-server", "-detached"], env=self._env(), check=True, capture_output=True)
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            try:  # the AMQP listener opens last in the node's boot
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"RabbitMQ node {self.name} did not listen on {self.port} within {timeout} s")

    def stop(self) -> None:
        subprocess.run(
            [BIN / "rabbitmqctl", "-n", self.name, "stop", str(self.base / "pid")],
            env=self._env(),
            capture_output=True,
            timeout=120,
            check=False,
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

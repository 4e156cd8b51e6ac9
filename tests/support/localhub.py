"""Start and stop a real local JupyterHub (with configurable-http-proxy) for tests and the demo."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("jupyterhub_config.py")


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now and not returned before by this process: the kernel may hand the same free
    port to two binds in a row, and a hub whose proxy got one port for both its public side and its
    API exits at start (seen once, in a benchmark run)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def find_proxy() -> str:
    local = ROOT / "node_modules" / ".bin" / "configurable-http-proxy"
    found = str(local) if local.exists() else shutil.which("configurable-http-proxy")
    if not found:
        raise RuntimeError("configurable-http-proxy not found: run 'npm install' in the project root")
    return found


@dataclass
class LocalHub:
    """A running hub: ``url`` is the public (proxy) URL, ``api_url`` its REST API."""

    extra: dict[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)
    # The spawner's launcher_signing_key (LAUNCHER_SIGNING_KEY in the hub's environment); "" for none.
    signing_key: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)
    state_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="localhub-")))
    process: subprocess.Popen[bytes] | None = None
    # Another JupyterHub config file that reads the same LOCALHUB_* variables (the benchmarks' hub).
    config: Path = CONFIG

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/hub/api"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "jupyterhub.log"

    def start(self, timeout: float = 60) -> LocalHub:
        env = {
            **os.environ,
            "LOCALHUB_DIR": str(self.state_dir),
            "LOCALHUB_PORT": str(self.port),
            "LOCALHUB_HUB_PORT": str(free_port()),
            "LOCALHUB_PROXY_API_PORT": str(free_port()),
            "LOCALHUB_SERVICE_TOKEN": self.token,
            "LOCALHUB_CHP": find_proxy(),
            "LOCALHUB_EXTRA": json.dumps(self.extra),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        env.pop("JUPYTERHUB_API_TOKEN", None)
        env["LAUNCHER_SIGNING_KEY"] = self.signing_key
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(self.config)],
            cwd=self.state_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            if self.process is not None and self.process.poll() is not None:
                self._end_group()
                raise RuntimeError(f"JupyterHub exited; see {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.api_url + "/", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"JupyterHub did not answer in {timeout} s:\n{self.log_tail()}")

    def _end_group(self) -> None:
        """A hub that died at start leaves the proxy it started (same session) running: end it."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def launcher_requests(self, username: str) -> list[str]:
        """The launcher's requests about ``username`` in the hub's request log, in the order
        answered: ``"<status> <method> <path>"``."""
        found = []
        for line in self.log_path.read_text().splitlines():
            match = re.search(r"\] (\d{3}) (\w+) (/hub/api/users/([^/ ?]+)\S*) \(launcher@", line)
            if match and match.group(4) == username:
                found.append(f"{match.group(1)} {match.group(2)} {match.group(3)}")
        return found

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM: the hub stops its servers and the proxy, then exits."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the hub and remove its state directory now."""
        self.stop()
        self._remove_state()

    def __post_init__(self) -> None:
        # The state directory (database, log, servers' homes) goes when this object does, or at the
        # latest when the process exits: not at ``stop``, since a stopped hub may be started again
        # on the same state, and tests read its log after it stopped. LOCALHUB_KEEP=1 keeps it.
        self._remove_state = weakref.finalize(self, _remove_state_dir, self.state_dir)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _remove_state_dir(path: Path) -> None:
    if not os.environ.get("LOCALHUB_KEEP"):
        shutil.rmtree(path, ignore_errors=True)

"""The three-node RabbitMQ cluster behind HAProxy (``scripts/rabbitmq-cluster``), for tests."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.localhub import ROOT

SCRIPT = ROOT / "scripts" / "rabbitmq-cluster"


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_block() -> int:
    """A port P with P..P+3 (HAProxy, the nodes) and P+10000+1..3 (distribution) free."""
    for _ in range(200):
        base = random.randrange(20000, 30000, 10)
        if all(_free(p) for p in (base, base + 1, base + 2, base + 3, base + 10001, base + 10002, base + 10003)):
            return base
    raise RuntimeError("no free port block for the cluster")


@dataclass
class Cluster:
    """Its own node names, ports and directory, so that it never touches another broker."""

    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="launcher-cluster-")))
    name: str = field(default_factory=lambda: "lt" + uuid.uuid4().hex[:6])
    port: int = field(default_factory=_free_port_block)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def node_url(self, n: int) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port + n}/"

    def node(self, n: int) -> str:
        return f"{self.name}{n}@localhost"

    def run(self, *args: str, check: bool = True) -> str:
        env = {
            **os.environ,
            "CLUSTER_DIR": str(self.directory),
            "CLUSTER_NAME": self.name,
            "CLUSTER_PORT": str(self.port),
            "CLUSTER_DIST_PORT": str(self.port + 10000),
        }
        done = subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"rabbitmq-cluster {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def start(self) -> Cluster:
        self.run("start")
        return self

    def stop(self) -> None:
        self.run("stop", check=False)
        shutil.rmtree(self.directory, ignore_errors=True)

    def stop_node(self, n: int) -> None:
        self.run("stop-node", str(n))

    def start_node(self, n: int) -> None:
        self.run("start-node", str(n))

    def ctl(self, *args: str, nodes: tuple[int, ...] = (1, 2, 3)) -> str:
        """rabbitmqctl against the first of ``nodes`` that answers."""
        errors = []
        for n in nodes:
            try:
                return self.run("ctl", str(n), *args)
            except RuntimeError as error:
                errors.append(str(error))
        raise RuntimeError("\n".join(errors))

    def leader(self, queue: str) -> int:
        """The node (1-3) that holds ``queue``'s Raft leader."""
        for line in self.ctl("list_queues", "name", "leader", "-q", "--no-table-headers").splitlines():
            name, _, leader = line.partition("\t")
            if name == queue:
                return self._number(leader.strip())
        raise AssertionError(f"no queue {queue!r}")

    def members(self, queue: str) -> list[str]:
        for line in self.ctl("list_queues", "name", "members", "-q", "--no-table-headers").splitlines():
            name, _, members = line.partition("\t")
            if name == queue:
                return sorted(m.strip(" []\"'") for m in members.split(","))
        raise AssertionError(f"no queue {queue!r}")

    def node_of_connection(self, connection_name: str) -> int:
        """The node (1-3) a named client connection goes to (by the node's listener port)."""
        listing = self.ctl("list_connections", "port", "client_properties", "-q", "--no-table-headers")
        for line in listing.splitlines():
            port, _, properties = line.partition("\t")
            if f'{{"connection_name","{connection_name}"}}' in properties:
                return int(port) - self.port
        raise AssertionError(f"no connection named {connection_name!r}:\n{listing}")

    def _number(self, node: str) -> int:
        for n in (1, 2, 3):
            if node == self.node(n):
                return n
        raise AssertionError(f"unknown node {node!r}")

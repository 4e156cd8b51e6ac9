"""JupyterHub config for the benchmarks: stand-in spawns with a chosen delay, no spawn limit.

Loaded by JupyterHub through ``LocalHub(config=...)``; reads the same LOCALHUB_* variables as
``tests/support/jupyterhub_config.py`` plus ``$LOCALHUB_DIR/bench.json``:
``{"standin_port": P, "default_delay": seconds}``.

Spawns: ``BenchSpawner.start()`` sleeps the spawn delay and returns the address of the ONE shared
stand-in server (``benchmarks/standin.py``), so servers cost nothing but the hub's own work. The
delay comes from the launch's image, ``bench:delay-<seconds>``, so one hub serves every scenario.
It is the launcher's spawner (``LauncherSpawnerMixin``), as a production hub runs it: it checks and
applies the options and reports them in the progress stream. Without a signing key: the floor and
the older worker's launches send unsigned options, as they do against any hub.

Services: each traffic source has its own service and token, so that the hub's request log
(``... (<service>@127.0.0.1) ...``) tells who asked what: ``launcher`` (the consumer under test),
``observer`` (the benchmark's independent ready watcher), ``floor`` (launches straight at the hub),
``legacy`` (the older worker's algorithm), ``admin`` (set-up and clean-up).
"""

import hashlib
import json
import os

from jupyterhub.proxy import ConfigurableHTTPProxy
from jupyterhub.spawner import Spawner

from consumer.spawner import LauncherSpawnerMixin
from tests.support.hub_common import apply_local_hub_basics

c = get_config()  # noqa: F821 (JupyterHub's config loader provides it)
state = apply_local_hub_basics(c)
with open(os.path.join(state, "bench.json")) as file:
    bench = json.load(file)

SERVICES = ("launcher", "observer", "floor", "legacy", "admin")


def service_token(base: str, name: str) -> str:
    """The launcher keeps LocalHub's token; the others derive theirs (benchmarks/hub.py agrees)."""
    if name == "launcher":
        return base
    return hashlib.sha256(f"{base}:{name}".encode()).hexdigest()


def spawn_delay(image: str) -> float:
    if image.startswith("bench:delay-"):
        return float(image.rsplit("-", 1)[1])
    return float(bench.get("default_delay", 0))


class BenchSpawner(LauncherSpawnerMixin, Spawner):
    """Waits the spawn delay, then 'runs' at the shared stand-in's address."""

    _running = False

    async def start(self):
        import asyncio

        self.launcher_ensure_applied()
        await asyncio.sleep(spawn_delay(str((self.user_options or {}).get("image", ""))))
        self._running = True
        return ("127.0.0.1", int(bench["standin_port"]))

    async def poll(self):
        return None if self._running else 0  # None: running; an exit status: stopped

    async def stop(self, now=False):
        self._running = False


class BenchProxy(ConfigurableHTTPProxy):
    """Logs the moment the hub marks a server ready: its proxy route is added, the last step of a
    spawn (right after it the hub clears ``_proxy_pending``; ``ready`` turns true and the progress
    stream says so). The benchmark's hub-ready time comes from this line, on the hub's own clock."""

    async def add_user(self, user, server_name=""):
        await super().add_user(user, server_name)
        self.log.info("bench: server %s:%s ready", user.name, server_name)


c.JupyterHub.proxy_class = BenchProxy
c.JupyterHub.spawner_class = BenchSpawner
c.BenchSpawner.launcher_signing_key = ""
c.BenchSpawner.launcher_allowed_images = [r"bench:delay-[0-9.]+"]
c.JupyterHub.concurrent_spawn_limit = 0  # off: the benchmark wants up to 1,000 spawns pending
c.JupyterHub.active_server_limit = 0
c.Spawner.start_timeout = 600
c.Spawner.http_timeout = 120
_base = os.environ["LOCALHUB_SERVICE_TOKEN"]
c.JupyterHub.services = [{"name": name, "api_token": service_token(_base, name)} for name in SERVICES]
c.JupyterHub.load_roles = [
    # The launcher's documented minimum; the others need the same to do the same work.
    {"name": "bench", "scopes": ["admin:users", "servers", "tokens"], "services": list(SERVICES)}
]
for key, value in json.loads(os.environ.get("LOCALHUB_EXTRA", "{}")).items():
    setattr(c.JupyterHub, key, value)
# The observer lists a round's users in one request: no pagination below a thousand or so.
c.JupyterHub.api_page_default_limit = 5000
c.JupyterHub.api_page_max_limit = 5000

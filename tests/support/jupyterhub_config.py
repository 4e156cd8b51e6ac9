"""JupyterHub config for the tests and the demo: null authenticator, a ``launcher`` service.

Read from the environment that ``localhub.py`` sets: LOCALHUB_DIR, LOCALHUB_PORT, LOCALHUB_HUB_PORT,
LOCALHUB_PROXY_API_PORT, LOCALHUB_SERVICE_TOKEN, LOCALHUB_CHP, and optional LOCALHUB_EXTRA (JSON of
``JupyterHub`` settings, e.g. a spawn limit for the 429 test).

Images choose what runs: ``jupyter`` a real jupyterhub-singleuser; ``standin`` the stand-in server;
``standin:slow-N`` one that starts listening after N s; ``standin:crash`` a spawner that fails with a message.
"""

import json
import os
import sys

from consumer.spawner import LocalLauncherSpawner
from tests.support.hub_common import apply_local_hub_basics

c = get_config()  # noqa: F821 (JupyterHub's config loader provides it)
state = apply_local_hub_basics(c)
if os.environ.get("LOCALHUB_INCLUDE"):
    # A documented example config, loaded as a real hub loads it; the settings below override it.
    os.environ.setdefault("LAUNCHER_JUPYTERHUB_API_TOKEN", os.environ["LOCALHUB_SERVICE_TOKEN"])
    os.environ.setdefault("LAUNCHER_SPAWNER_SIGNING_KEY", os.environ["LAUNCHER_SIGNING_KEY"])
    load_subconfig(os.environ["LOCALHUB_INCLUDE"])  # noqa: F821 (provided by the config loader)
else:
    # The test images, and room for the tests' launches: the spawner's defaults are closed.
    c.TestSpawner.launcher_allowed_images = ["standin(:.*)?", "jupyter"]
    c.TestSpawner.launcher_max_cpu = 4
    c.TestSpawner.launcher_max_memory = "4G"
    c.TestSpawner.launcher_max_gpu = 2
standin = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standin.py")


class TestSpawner(LocalLauncherSpawner):
    def get_env(self):
        env = super().get_env()
        if self.launcher_image.startswith("standin:slow-"):
            env["STANDIN_DELAY"] = self.launcher_image.rsplit("-", 1)[1]
        return env

    async def start(self):
        self.launcher_ensure_applied()  # the image picks the command, so the options go first
        if self.launcher_image == "standin:crash":
            raise RuntimeError("the stand-in image is broken on purpose")
        if self.launcher_image.startswith("standin"):
            self.cmd = [sys.executable, standin]
            self.args = []
        else:
            self.cmd = [os.path.join(os.path.dirname(sys.executable), "jupyterhub-singleuser")]
            self.args = ["--allow-root"]
        return await super().start()

    def get_args(self):
        if self.launcher_image.startswith("standin"):
            return []  # the stand-in reads its port from JUPYTERHUB_SERVICE_URL
        return super().get_args()


c.JupyterHub.spawner_class = TestSpawner
c.SimpleLocalProcessSpawner.home_dir_template = f"{state}/home/{{username}}"
c.Spawner.start_timeout = 60
c.Spawner.http_timeout = 30
c.JupyterHub.services = [{"name": "launcher", "api_token": os.environ["LOCALHUB_SERVICE_TOKEN"]}]
c.JupyterHub.load_roles = [
    {"name": "launcher", "scopes": ["admin:users", "servers", "tokens"], "services": ["launcher"]}
]
for key, value in json.loads(os.environ.get("LOCALHUB_EXTRA", "{}")).items():
    setattr(c.JupyterHub, key, value)
# Spawner policy for a test hub (LOCALHUB_SPAWNER: JSON of TestSpawner settings).
for key, value in json.loads(os.environ.get("LOCALHUB_SPAWNER", "{}")).items():
    setattr(c.TestSpawner, key, value)

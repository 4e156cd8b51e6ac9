# jupyterhub_config.py: JupyterHub for the launcher (add your authenticator, proxy and TLS settings).
import os

c = get_config()  # noqa: F821 (JupyterHub's config loader provides it)

# The launcher's service and the least it needs: create users, start/stop servers, issue tokens.
c.JupyterHub.services = [{"name": "launcher", "api_token": os.environ["LAUNCHER_SERVICE_TOKEN"]}]
c.JupyterHub.load_roles = [
    {"name": "launcher", "scopes": ["admin:users", "servers", "tokens"], "services": ["launcher"]}
]
c.JupyterHub.allow_named_servers = True

# consumer/spawner.py must be importable by the hub (pip install the launcher, or copy the file
# next to this config and use "spawner.LocalLauncherSpawner"). On Kubernetes: KubeLauncherSpawner.
c.JupyterHub.spawner_class = "consumer.spawner.LocalLauncherSpawner"

# Policy: what callers may ask for. A refused launch answers `options_rejected` with the reason.
c.LauncherSpawnerMixin.launcher_allowed_images = [r"quay\.io/jupyter/[a-z-]+-notebook:[0-9-]+"]
c.LauncherSpawnerMixin.launcher_max_cpu = 4
c.LauncherSpawnerMixin.launcher_max_memory = "16G"  # K/M/G/T are powers of 1024, as in JupyterHub
c.LauncherSpawnerMixin.launcher_max_gpu = 2
# Default: the user's own claims only, claim-{username} and claim-{username}-*.
c.LauncherSpawnerMixin.launcher_allowed_pvcs = ["claim-{username}", "claim-{username}-.+"]
# Extra options callers may send under "json" (default: none); built-ins: tolerations,
# node_selector (KubeSpawner only) and default_url.
c.LauncherSpawnerMixin.launcher_allowed_options = {"default_url": "default_url"}
# Leave off unless old clients need ?token= in URLs: see "launcher_allow_token_in_url" in the README.
c.LauncherSpawnerMixin.launcher_allow_token_in_url = False

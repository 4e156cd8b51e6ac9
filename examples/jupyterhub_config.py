# jupyterhub_config.py: JupyterHub for the launcher (add your authenticator, proxy and TLS settings).
import os

c = get_config()  # noqa: F821 (JupyterHub's config loader provides it)

# The launcher's service and the least it needs: create users, start/stop servers, issue tokens.
# The variables are the launcher's own, so that both can share one environment.
c.JupyterHub.services = [{"name": "launcher", "api_token": os.environ["LAUNCHER_JUPYTERHUB_API_TOKEN"]}]
c.JupyterHub.load_roles = [
    {"name": "launcher", "scopes": ["admin:users", "servers", "tokens"], "services": ["launcher"]}
]
c.JupyterHub.allow_named_servers = True
c.JupyterHub.named_server_limit_per_user = 3  # plus the default server: launcher_user_max_servers

# consumer/spawner.py must be importable by the hub (pip install the launcher, or copy the file
# next to this config and use "spawner.LocalLauncherSpawner"). On Kubernetes: KubeLauncherSpawner.
c.JupyterHub.spawner_class = "consumer.spawner.LocalLauncherSpawner"

# Only the launcher sets options: it signs them with this key (openssl rand -hex 32). Without it,
# any user could post options for their own servers with their own token.
c.LauncherSpawnerMixin.launcher_signing_key = os.environ["LAUNCHER_SPAWNER_SIGNING_KEY"]

# Policy: what callers may ask for. A refused launch answers `options_rejected` with the reason.
c.LauncherSpawnerMixin.launcher_allowed_images = [r"quay\.io/jupyter/[a-z-]+-notebook:[0-9-]+"]
c.LauncherSpawnerMixin.launcher_max_cpu = 4
c.LauncherSpawnerMixin.launcher_max_memory = "16G"  # K/M/G/T are powers of 1024, as in JupyterHub
c.LauncherSpawnerMixin.launcher_max_gpu = 2
# Per user, over all of their running and starting servers.
c.LauncherSpawnerMixin.launcher_user_max_servers = 4
c.LauncherSpawnerMixin.launcher_user_max_cpu = 8
c.LauncherSpawnerMixin.launcher_user_max_memory = "32G"
c.LauncherSpawnerMixin.launcher_user_max_gpu = 2
# The user's own claim only (the default); read "Security model" in the README before widening it.
c.LauncherSpawnerMixin.launcher_allowed_pvcs = ["{claim}"]
# Extra options callers may send under "json" (default: none); built-ins: tolerations,
# node_selector (KubeSpawner only) and default_url.
c.LauncherSpawnerMixin.launcher_allowed_options = {"default_url": "default_url"}
# Leave off unless old clients need ?token= in URLs: see "launcher_allow_token_in_url" in the README.
c.LauncherSpawnerMixin.launcher_allow_token_in_url = False

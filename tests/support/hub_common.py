"""Settings every local hub shares (tests, demo, benchmarks): addresses and files from the
environment that ``localhub.py`` sets, a null authenticator and named servers."""

from __future__ import annotations

import os
from typing import Any


def apply_local_hub_basics(c: Any) -> str:
    """Configure ``c`` (a JupyterHub config) for a local hub; returns its state directory."""
    state = os.environ["LOCALHUB_DIR"]
    c.JupyterHub.ip = "127.0.0.1"
    c.JupyterHub.port = int(os.environ["LOCALHUB_PORT"])
    c.JupyterHub.hub_ip = "127.0.0.1"
    c.JupyterHub.hub_port = int(os.environ["LOCALHUB_HUB_PORT"])
    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{os.environ['LOCALHUB_PROXY_API_PORT']}"
    c.ConfigurableHTTPProxy.command = [os.environ["LOCALHUB_CHP"]]
    c.JupyterHub.db_url = f"sqlite:///{state}/jupyterhub.sqlite"
    c.JupyterHub.cookie_secret_file = f"{state}/jupyterhub_cookie_secret"
    c.JupyterHub.pid_file = f"{state}/jupyterhub.pid"
    c.JupyterHub.cleanup_servers = True
    c.JupyterHub.authenticator_class = "null"
    c.Authenticator.allow_all = True
    c.JupyterHub.allow_named_servers = True
    return state

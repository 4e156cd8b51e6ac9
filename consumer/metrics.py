"""Prometheus metrics: the names below are a contract for dashboards, so keep them stable.

Every label holds a bounded value: an action, an outcome (``ok`` or an error code), an HTTP method,
a route *template* (``/users/{name}/servers/{server}``, never a real user name) and a status. No
label ever holds a user name, a server name, a token or a message id.

The metrics live in prometheus-client's default registry: one launcher per process, and the
process's own collectors (CPU, memory, open files) come with them on ``/metrics``.
"""

from __future__ import annotations

import re

from prometheus_client import Counter, Gauge, Histogram

COMMANDS = Counter(
    "launcher_commands",
    "Commands answered, by action and outcome (ok or the error code).",
    ["action", "outcome"],
)
COMMAND_DURATION = Histogram(
    "launcher_command_duration_seconds",
    "Time from a command's delivery to its answer, by action.",
    ["action"],
    # Reads take milliseconds, launches seconds to minutes (spawns on Kubernetes pull images).
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
)
IN_FLIGHT = Gauge("launcher_commands_in_flight", "Commands being handled now.")
ACTIVE_CONSUMER = Gauge(
    "launcher_active_consumer",
    "1 on the replica that receives commands (RabbitMQ's single active consumer), 0 on a standby.",
)
HUB_REQUESTS = Counter(
    "launcher_hub_requests",
    "Requests to JupyterHub's REST API, by method, route template and status ('error': no answer).",
    ["method", "route", "status"],
)
HUB_REQUEST_DURATION = Histogram(
    "launcher_hub_request_duration_seconds",
    "Time JupyterHub took to answer, by method and route template (progress streams not timed).",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BROKER_RECONNECTS = Counter("launcher_broker_reconnects", "Times a connection to RabbitMQ was re-established.")
EVENTS_DROPPED = Counter("launcher_events_dropped", "Lifecycle events dropped because the event backlog was full.")

# The hub client's paths, most specific first; each user- or server-chosen segment becomes a name.
_ROUTES = [
    (re.compile(pattern), template)
    for pattern, template in (
        (r"^/users/[^/]+/servers/[^/]+/progress$", "/users/{name}/servers/{server}/progress"),
        (r"^/users/[^/]+/servers/[^/]+$", "/users/{name}/servers/{server}"),
        (r"^/users/[^/]+/server/progress$", "/users/{name}/server/progress"),
        (r"^/users/[^/]+/server$", "/users/{name}/server"),
        (r"^/users/[^/]+/tokens/[^/]+$", "/users/{name}/tokens/{token_id}"),
        (r"^/users/[^/]+/tokens$", "/users/{name}/tokens"),
        (r"^/users/[^/]+$", "/users/{name}"),
        (r"^/user$", "/user"),
        (r"^/?$", "/"),
    )
]


def hub_route(path: str) -> str:
    """The route template of a hub API path (query string ignored); ``other`` for any path not
    listed, so that a new call can never put a user name into a label."""
    path = path.split("?", 1)[0]
    for pattern, template in _ROUTES:
        if pattern.match(path):
            return template
    return "other"

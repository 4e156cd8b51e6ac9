"""Prometheus metrics: the names below are a contract for dashboards, so keep them stable.

Every label holds a bounded value: an action, an outcome (``ok`` or an error code), an HTTP method,
a route *template* (``/users/{name}/servers/{server}``, never a real user name) and a status. No
label ever holds a user name, a server name, a token or a message id.

The metrics live in prometheus-client's default registry: one launcher per process, and the
process's own collectors (CPU, memory, open files) come with them on ``/metrics``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .admission import Admission

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

# Admission control (admission.py), read from ``Admission.snapshot()`` at each scrape: what the
# launcher holds back from the hub during a class start. Name, snapshot key, help text.
_ADMISSION = (
    (
        "launcher_admission_launches_queued",
        "launches_queued",
        "Launches whose start request is not sent yet: creating their user, or held back by admission control.",
    ),
    (
        "launcher_admission_hub_requests_limit",
        "requests_limit",
        "Hub requests the launcher lets be in flight at once (adaptive unless hub_max_requests is set).",
    ),
    ("launcher_admission_hub_requests_in_flight", "requests_in_flight", "Hub requests in flight that count."),
    ("launcher_admission_hub_requests_waiting", "requests_waiting", "Hub requests waiting in the launcher."),
    (
        "launcher_admission_hub_answer_seconds",
        "hub_answer_s",
        "The hub's answer time to cheap requests, smoothed, as of the latest one (NaN: none seen yet).",
    ),
    (
        "launcher_admission_hub_idle_answer_seconds",
        "hub_idle_answer_s",
        "The hub's idle answer time: the fastest in the 5 minutes up to the latest cheap answer (NaN: none yet).",
    ),
    (
        "launcher_admission_spawns_limit",
        "spawns_limit",
        "Our spawns allowed pending at the hub, learned from its 429s or hub_max_pending_spawns (+Inf: none known).",
    ),
    (
        "launcher_admission_spawns_pending",
        "spawns_pending",
        "Our spawns pending at the hub, and our starts refused with 429 that wait for their retry.",
    ),
    ("launcher_admission_spawns_waiting", "spawns_waiting", "Launches waiting for one of our spawn slots."),
)


class _AdmissionCollector(Collector):
    """The running service's admission state, one snapshot per scrape. A collector rather than
    gauges that someone sets: the state changes on every hub request, and is read only here."""

    def __init__(self) -> None:
        self.admission: Admission | None = None

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(name, text) for name, _, text in _ADMISSION]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if self.admission is None:
            return []
        state = self.admission.snapshot()
        unknown = {"spawns_limit": math.inf}  # no limit known: unbounded
        return [
            GaugeMetricFamily(name, text, value=_number(state[key], unknown.get(key, math.nan)))
            for name, key, text in _ADMISSION
        ]


def _number(value: float | None, unknown: float) -> float:
    return unknown if value is None else float(value)


_ADMISSION_COLLECTOR = _AdmissionCollector()
REGISTRY.register(_ADMISSION_COLLECTOR)


def watch_admission(admission: Admission | None) -> Admission | None:
    """Report this admission control on /metrics (one launcher per process: the latest wins);
    returns the one reported until now."""
    previous, _ADMISSION_COLLECTOR.admission = _ADMISSION_COLLECTOR.admission, admission
    return previous


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

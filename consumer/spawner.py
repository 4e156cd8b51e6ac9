"""Hub side: spawners that apply the launcher's run-time options safely.

JupyterHub loads this module, not the consumer: it imports only JupyterHub, traitlets, tornado and
(for ``KubeLauncherSpawner``, lazily) kubespawner, and nothing else from this package, so it also
works as one file mounted into a Zero to JupyterHub hub (``hub.extraFiles``).

What a caller may ask for, in ``user_options`` as the consumer sends them::

    {"image": str, "cpu": {"request", "limit"}, "memory": {"request", "limit"},
     "gpu": {"request", "limit"}, "vols": [{"pvc", "mount", "subpath"}], "env": {str: str},
     "json": {allow-listed extra options}}

Everything else is refused, and everything is checked against the hub admin's policy traits
(``launcher_*``), whose defaults are closed: the configured image and limits are the most a caller
gets. Any user may post ``user_options`` for their own servers with their own token, so with a
signing key configured (``launcher_signing_key``) only options signed by the launcher for this user
and server, recently, are applied. Every start begins from the configured defaults, so nothing from
an earlier start leaks into the next; a start without options gets the defaults. On JupyterHub >=
5.3 the options are applied in the ``apply_user_options`` hook, so a refusal is the start request's
own 400 with the message; older hubs apply them in ``start()``, where a refusal fails the spawn with
the message in the progress stream.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import logging
import math
import os
import posixpath
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from inspect import isawaitable
from typing import TYPE_CHECKING, Any

from jupyterhub.spawner import SimpleLocalProcessSpawner
from jupyterhub.utils import url_escape_path, url_path_join
from tornado.web import HTTPError
from traitlets import Bool, Dict, Float, Integer, List, TraitError, Unicode, Union, default, validate
from traitlets.config import Configurable

if TYPE_CHECKING:
    from kubespawner import KubeSpawner

__all__ = [
    "KubeLauncherSpawner",
    "LauncherOption",
    "LauncherOptionsError",
    "LauncherSpawnerMixin",
    "LocalLauncherSpawner",
    "memory_bytes",
    "tolerations_option",
]

# Same meaning as JupyterHub's ByteSpecification: K/M/G/T are powers of 1024; Ki/Mi/Gi/Ti too.
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?")
# Variables the hub sets for the single-user server: overriding them would point the server at
# another hub or swap its identity. KubeSpawner applies `environment` after them, so only refusing
# them here protects them.
_RESERVED_ENV_PREFIXES = ("JUPYTERHUB_", "JPY_")
# Set by the spawners to describe the real limits and image; a caller's value would only lie.
_RESERVED_ENV_NAMES = frozenset(
    {"MEM_LIMIT", "MEM_GUARANTEE", "CPU_LIMIT", "CPU_GUARANTEE", "JUPYTER_IMAGE", "JUPYTER_IMAGE_SPEC"}
)
# Every pattern here and in the policy is used with fullmatch: `$` would let a trailing newline in.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_IMAGE = re.compile(r"[^\s{}]{1,512}")
# Variables a caller may not set unless the admin allows them by name (launcher_allowed_env): they
# give root in images that start as root (the Jupyter Docker Stacks' start.sh reads NB_*,
# GRANT_SUDO, CHOWN_*; Zero to JupyterHub's `uid: 0`), load code into processes started as root
# (LD_*, PYTHON*, PATH, BASH_ENV, ENV, ...), or reach past the GPU limit (the NVIDIA container
# toolkit honours NVIDIA_VISIBLE_DEVICES in unprivileged containers: all GPUs of the node).
DANGEROUS_ENV_PREFIXES = (
    "NVIDIA_",
    "CUDA_",
    "LD_",
    "NB_",
    "CHOWN_",
    "PYTHON",
    "JUPYTER",
    "DOCKER_STACKS_",
    "SUDO_",
    "BASH_",
    "KUBERNETES_",
    "ROCR_",
    "HIP_",
    "AMD_",
    "GPU_",
    "NCCL_",
    "CONDA",
    "MAMBA",
    "PERL",
    "RUBY",
    "NODE_",
    "JAVA_",
    "GCONV_",
    "MALLOC_",
    "XDG_",
)
DANGEROUS_ENV_NAMES = (
    "PATH",
    "GRANT_SUDO",
    "HOME",
    "USER",
    "SHELL",
    "ENV",
    "IFS",
    "PS4",
    "SHELLOPTS",
    "BASHOPTS",
    "GEN_CERT",
    "RESTARTABLE",
    "NOTEBOOK_ARGS",
    "LOCPATH",
    "NLSPATH",
    "HOSTALIASES",
    "RES_OPTIONS",
    "LOCALDOMAIN",
    "TZDIR",
)
# Upper-case names, none of the above.
DEFAULT_ALLOWED_ENV = (
    rf"(?!(?:{'|'.join(DANGEROUS_ENV_PREFIXES)})|(?:{'|'.join(DANGEROUS_ENV_NAMES)})\Z)[A-Z][A-Z0-9_]*"
)
# Mount points under system directories would replace what runs as root at start
# (/usr/local/bin/before-notebook.d), the Python environment (/opt/conda) or configuration (/etc).
DEFAULT_ALLOWED_MOUNT_PATHS = (
    r"/(?!(?:bin|boot|dev|etc|lib|lib32|lib64|libx32|opt|proc|root|run|sbin|srv|sys|usr|var)(?:/|\Z))[^/]+(?:/[^/]+)*"
)
# The key in user_options that carries the launcher's signature (consumer/signing.py, same form).
SIGNATURE_KEY = "launcher_signature"
_SIGNATURE = re.compile(r"v1\.([0-9]{1,12})\.([0-9a-f]{64})")
# The key of the first progress event of a spawn whose options this spawner applied: their digest
# (``options_digest``), so that the launcher can tell its own spawn from one someone else started
# without reading the server's model (consumer/signing.py has the same name and form).
OPTIONS_EVENT_KEY = "launcher_options"
# The key, in the same event, of the server's URL: what the hub's "ready" event will say, so that
# a launcher whose start request is answered 201 (the server is ready) needs no more from the hub.
URL_EVENT_KEY = "launcher_url"
log = logging.getLogger(__name__)
_TOP_LEVEL = ("image", "cpu", "memory", "gpu", "vols", "env", "json")
_VOLUME_KEYS = frozenset({"pvc", "mount", "subpath"})
_SHM_VOLUME = "launcher-shm"
_SHM_PATH = "/dev/shm"
_MAX_ENV = 100
_MAX_VOLS = 20

# Traits an option may change; each start restores them to the configured values first.
_MANAGED_TRAITS = (
    "image",
    "cpu_limit",
    "cpu_guarantee",
    "mem_limit",
    "mem_guarantee",
    "environment",
    "extra_resource_limits",
    "extra_resource_guarantees",
    "volumes",
    "volume_mounts",
    "launcher_image",
    "launcher_gpu",
    "launcher_volumes",
)


class LauncherOptionsError(ValueError):
    """The caller's options break the hub's rules; the message says which and why."""


def memory_bytes(value: Any) -> int:
    """Bytes for ``512M``, ``1G`` (powers of 1024, as JupyterHub), ``1.5Gi`` or an integer."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{value!r} is not a memory quantity: use bytes or a string like '512M'")  # noqa: TRY004
    if isinstance(value, int):
        size = value
    else:
        match = _QUANTITY.fullmatch(value.strip())
        if match is None:
            raise ValueError(
                f"{value!r} is not a memory quantity: use bytes or a number with K, M, G, T "
                "(powers of 1024, as JupyterHub) or Ki, Mi, Gi, Ti"
            )
        amount = float(match[1]) * _UNITS[match[2] or ""]
        if not math.isfinite(amount):  # hundreds of digits: float() gives inf, int() would overflow
            shown = repr(value) if len(value) <= 32 else f"{value[:16]!r}… ({len(value)} characters)"
            raise ValueError(f"{shown} is too large a memory quantity")
        size = int(amount)
    if size <= 0:
        raise ValueError(f"{value!r} must be more than 0 bytes")
    return size


class LauncherOption:
    """An extra option a caller may send under ``json``: the trait it sets and how it is checked.

    ``check(value)`` returns the value to use or raises ``ValueError`` with a message for the caller.
    ``merge`` says how it meets the configured value: ``replace`` it, ``extend`` the configured list
    (configured items stay), or ``update`` the configured dict (configured keys win).
    """

    def __init__(self, trait: str, check: Callable[[Any], Any], merge: str = "replace") -> None:
        if merge not in ("replace", "extend", "update"):
            raise ValueError(f"merge must be 'replace', 'extend' or 'update', not {merge!r}")
        self.trait = trait
        self.check = check
        self.merge = merge

    def __repr__(self) -> str:
        return f"LauncherOption({self.trait!r}, {getattr(self.check, '__name__', self.check)!r}, {self.merge!r})"


_TOLERATION_KEYS = frozenset({"key", "operator", "value", "effect", "tolerationSeconds"})
_TOLERATION_EFFECTS = frozenset({"NoSchedule", "PreferNoSchedule", "NoExecute"})


def tolerations_option(keys: list[str] | None = None, max_items: int = 10) -> LauncherOption:
    """Tolerations added to the configured ones; ``keys``: regular expressions a taint key must match.

    A toleration must name its key: a key-less ``Exists`` tolerates every taint. The spawner also
    holds every toleration to ``launcher_allowed_toleration_keys``, whatever option set it.
    """
    patterns = [re.compile(k) for k in keys or []]

    def check_tolerations(value: Any) -> list[dict[str, Any]]:
        if not isinstance(value, list) or len(value) > max_items:
            raise ValueError(f"must be a list of at most {max_items} tolerations")
        checked = []
        for index, item in enumerate(value):
            where = f"[{index}]"
            if not isinstance(item, dict):
                raise ValueError(f"{where} must be an object")  # noqa: TRY004 (callers catch ValueError)
            unknown = sorted(set(item) - _TOLERATION_KEYS)
            if unknown:
                raise ValueError(
                    f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(_TOLERATION_KEYS))}"
                )
            key, operator = item.get("key"), item.get("operator", "Equal")
            if key is None:
                raise ValueError(f"{where}.key: a toleration without a key tolerates every taint; name the taint's key")
            if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
                raise ValueError(f"{where}.key: {key!r} is not a taint key")
            if patterns and not any(p.fullmatch(key) for p in patterns):
                raise ValueError(f"{where}.key: {key!r} is not a taint this hub lets callers tolerate")
            if operator not in ("Equal", "Exists"):
                raise ValueError(f"{where}.operator: must be 'Equal' or 'Exists'")
            if "value" in item and (not isinstance(item["value"], str) or not _LABEL_VALUE.fullmatch(item["value"])):
                raise ValueError(f"{where}.value: {item['value']!r} is not a taint value")
            if operator == "Exists" and item.get("value"):
                raise ValueError(f"{where}.value: must be empty with operator 'Exists'")
            if "effect" in item and item["effect"] not in _TOLERATION_EFFECTS:
                raise ValueError(f"{where}.effect: must be one of {', '.join(sorted(_TOLERATION_EFFECTS))}")
            if "tolerationSeconds" in item:
                seconds = item["tolerationSeconds"]
                if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 0:
                    raise ValueError(f"{where}.tolerationSeconds: must be a whole number of seconds >= 0")
                if item.get("effect") != "NoExecute":
                    raise ValueError(f"{where}.tolerationSeconds: only with effect 'NoExecute'")
            checked.append(dict(item))
        return checked

    return LauncherOption("tolerations", check_tolerations, "extend")


def _check_node_selector(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > 20:
        raise ValueError("must be an object of at most 20 node labels")
    for key, label in value.items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise ValueError(f"{key!r} is not a label key")
        if not isinstance(label, str) or not _LABEL_VALUE.fullmatch(label):
            raise ValueError(f"{key}: {label!r} is not a label value")
    return dict(value)


def _check_default_url(value: Any) -> str:
    # JupyterHub formats default_url with the user's fields, so braces are refused, not escaped.
    if not isinstance(value, str) or not re.fullmatch(r"/[A-Za-z0-9._~/-]{0,255}", value):
        raise ValueError(f"{value!r} must be an absolute path of letters, digits and . _ ~ / -")
    if ".." in value.split("/"):
        raise ValueError(f"{value!r} must not contain '..'")
    return value


# The names an admin may use in ``launcher_allowed_options`` instead of a LauncherOption (YAML
# config cannot hold Python objects).
BUILTIN_OPTIONS: dict[str, Callable[[], LauncherOption]] = {
    "tolerations": tolerations_option,
    "node_selector": lambda: LauncherOption("node_selector", _check_node_selector, "update"),
    "default_url": lambda: LauncherOption("default_url", _check_default_url, "replace"),
}


def _number(value: Any, where: str, whole: bool) -> float | int:
    kind = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise LauncherOptionsError(f"{where}: {value!r} is not {'a whole number' if whole else 'a number'}")
    try:
        finite = math.isfinite(value)
    except OverflowError:
        finite = False
    if not finite or value <= 0:
        raise LauncherOptionsError(f"{where}: {value!r} must be more than 0")
    return value


def _request_limit(options: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``{"request"?, "limit"?}`` without None values; ``null`` means not given (the older bug)."""
    spec = options.get(name)
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise LauncherOptionsError(f"{name}: must be an object with 'request' and/or 'limit'")
    unknown = sorted(set(spec) - {"request", "limit"})
    if unknown:
        raise LauncherOptionsError(f"{name}: unknown field {unknown[0]!r}; use 'request' and 'limit'")
    return {k: v for k, v in spec.items() if v is not None}


def _clean_path(value: Any, where: str, absolute: bool) -> str:
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise LauncherOptionsError(f"{where}: must be a non-empty path")
    if any(c in value for c in "{}\0\n\r"):
        # KubeSpawner expands {…} templates in volumes: a caller's braces must not reach them.
        raise LauncherOptionsError(f"{where}: {value!r} must not contain braces or control characters")
    if value.startswith("/") != absolute:
        raise LauncherOptionsError(f"{where}: {value!r} must be {'absolute' if absolute else 'relative'}")
    if ".." in value.split("/"):
        raise LauncherOptionsError(f"{where}: {value!r} must not contain '..'")
    return _normal_path(value)


def _normal_path(path: str) -> str:
    """``//etc//jupyter/./`` -> ``/etc/jupyter``. normpath alone keeps a leading ``//`` (POSIX
    allows it to mean something else), while Kubernetes compares mount paths as strings."""
    return posixpath.normpath(re.sub(r"/{2,}", "/", path))


def _mount_path(mount: Mapping[str, Any]) -> str:
    return _normal_path(str(mount.get("mountPath", "")))


def _values(container: Any) -> list[Any]:
    """Items of a KubeSpawner list-or-dict trait (volumes, volume_mounts, tolerations)."""
    if isinstance(container, dict):
        return list(container.values())
    return list(container or [])


def _add(container: Any, key: str, item: Any) -> Any:
    if isinstance(container, dict):
        return {**container, key: item}
    return [*(container or []), item]


def _human_bytes(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size} bytes"


def _volume_name(pvc: str) -> str:
    # Derived from the claim alone: the same claim gets the same name at every start, and two
    # mounts of one claim share one volume.
    return "launcher-pvc-" + hashlib.sha256(pvc.encode()).hexdigest()[:12]


def launcher_apply_user_options(spawner: Any, user_options: dict[str, Any]) -> None:
    """JupyterHub's ``apply_user_options`` hook (5.3+) for launcher spawners.

    JupyterHub turns any exception other than ``HTTPError`` here into a bare "Invalid user
    options", so a refusal becomes a 400 that carries its message to the caller.
    """
    try:
        spawner.launcher_apply(user_options or {})
    except LauncherOptionsError as error:
        refusal = HTTPError(400, str(error))
        # Read by the API's error body and by the progress stream ("Spawn failed: …"), which
        # otherwise shows "HTTP 400: Bad Request (…)" when the start request answered 202 first.
        refusal.jupyterhub_message = str(error)  # type: ignore[attr-defined]
        raise refusal from None


class LauncherSpawnerMixin(Configurable):
    """Applies the launcher's ``user_options`` under the hub admin's policy, from defaults each start."""

    launcher_signing_key = Unicode(
        config=True,
        help="""The key the launcher signs options with (its ``spawner_signing_key``); default: the
        environment variable LAUNCHER_SIGNING_KEY. With a key, options without a valid signature made
        for this user and server within ``launcher_signature_max_age`` are refused, so users cannot
        post their own; without one, any user can set options for their own servers.""",
    )
    launcher_signature_max_age = Float(
        600.0,
        config=True,
        help="""Seconds a signature stays good (also the clock difference allowed the other way). It
        must cover the launcher's retries of a start request (429s ask to wait 30-60 s).""",
    )
    launcher_allowed_images = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""Regular expressions (whole match) of the images callers may ask for, besides the
        configured ``image``. Default: none, only the configured image.""",
    )
    launcher_max_cpu = Float(
        None,
        allow_none=True,
        config=True,
        help="Most cores a caller may ask for (request and limit). Default: the configured cpu_limit.",
    )
    launcher_max_memory = Union(
        [Integer(), Unicode()],
        default_value=None,
        allow_none=True,
        config=True,
        help="""Most memory a caller may ask for: bytes or '8G' (powers of 1024) / '8Gi'. Default: the
        configured mem_limit.""",
    )
    launcher_max_gpu = Integer(
        None,
        allow_none=True,
        config=True,
        help="Most GPUs a caller may ask for. Default: the configured GPU limit (extra_resource_limits), else none.",
    )
    launcher_user_max_servers = Integer(
        None, allow_none=True, config=True, help="Most servers one user may have running or starting at once."
    )
    launcher_user_max_cpu = Float(
        None, allow_none=True, config=True, help="Most cores (limits) over all of one user's active servers."
    )
    launcher_user_max_memory = Union(
        [Integer(), Unicode()],
        default_value=None,
        allow_none=True,
        config=True,
        help="Most memory (limits) over all of one user's active servers: bytes or '64G'.",
    )
    launcher_user_max_gpu = Integer(
        None, allow_none=True, config=True, help="Most GPUs over all of one user's active servers."
    )
    launcher_allowed_pvcs = List(
        Unicode(),
        default_value=["{claim}"],
        config=True,
        help="""Regular expressions (whole match) of the PVC names a caller may mount.

        ``{claim}`` stands for the user's own claim, named as the spawner names it (KubeSpawner:
        ``pvc_name_template`` for the user's default server, with its slugs), ``{username}`` for
        the user's name as the spawner writes it in names (KubeSpawner: its slug); both
        regex-escaped. Default: the user's own claim only. Patterns like ``claim-{username}-.+``
        are unsafe: slugs of other users' names start with the same letters (``alice.smith`` ->
        ``alice-smith---<hash>``); a suffix after a ``.`` cannot be part of a slug.
        """,
    )
    launcher_allowed_env = List(
        Unicode(),
        default_value=[DEFAULT_ALLOWED_ENV],
        config=True,
        help="""Regular expressions (whole match) of the environment variables callers may set.
        Default: upper-case names except DANGEROUS_ENV_PREFIXES and DANGEROUS_ENV_NAMES. JUPYTERHUB_*,
        JPY_*, the spawner's own and configured variables are refused whatever this says.""",
    )
    launcher_allowed_mount_paths = List(
        Unicode(),
        default_value=[DEFAULT_ALLOWED_MOUNT_PATHS],
        config=True,
        help="""Regular expressions (whole match) of the paths callers may mount volumes at (after
        normalisation). Default: anywhere but system directories (/etc, /usr, /opt, /var, ...).""",
    )
    launcher_allowed_toleration_keys = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""Regular expressions (whole match) of the taint keys callers may tolerate (when an option
        such as the built-in ``tolerations`` is allowed). Default: none.""",
    )
    launcher_allowed_node_selector_keys = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""Regular expressions (whole match) of the node label keys callers may select on (when an
        option such as the built-in ``node_selector`` is allowed). Default: none.""",
    )
    launcher_gpu_node_keys = List(
        Unicode(),
        default_value=[r"nvidia\.com/gpu(\..+)?", r"amd\.com/gpu(\..+)?"],
        config=True,
        help="""Regular expressions (whole match) of taint and node label keys that only a start with
        GPUs may tolerate or select (GPU nodes' taints and labels).""",
    )
    launcher_allowed_options = Dict(
        config=True,
        help="""Extra options callers may send under ``json``: key -> LauncherOption, or the name of a
        built-in (``tolerations``, ``node_selector``, ``default_url``). Default: none.""",
    )
    launcher_gpu_resource = Unicode(
        "nvidia.com/gpu", config=True, help="The extended resource that a GPU request asks for."
    )
    launcher_allow_token_in_url = Bool(
        False,
        config=True,
        help="""Let the single-user server accept ``?token=`` in URLs (JUPYTERHUB_ALLOW_TOKEN_IN_URL).

        Off by default, as in JupyterHub 5+: a token in a URL ends up in browser history, proxy and
        server logs and Referer headers, where anyone who reads them can use the server until the
        token expires.""",
    )

    launcher_image = Unicode("", help="The image the caller asked for ('' when none); informative locally.")
    launcher_gpu = Integer(0, help="GPUs the caller asked for; informative for spawners without GPUs.")
    launcher_volumes: List[dict[str, Any]] = List(
        help="The caller's checked volumes; informative for spawners without PVCs."
    )

    @default("apply_user_options")
    def _launcher_apply_user_options_default(self) -> Callable[[Any, dict[str, Any]], None]:
        # A plain function, because JupyterHub calls the trait's value as hook(spawner, options).
        return launcher_apply_user_options

    @validate("launcher_max_memory", "launcher_user_max_memory")
    def _launcher_parse_max_memory(self, proposal: Any) -> int | None:
        value = proposal["value"]
        if value is None:
            return None
        try:
            return memory_bytes(value)
        except ValueError as error:
            raise TraitError(f"{proposal['trait'].name}: {error}") from None

    @validate(
        "launcher_allowed_images",
        "launcher_allowed_pvcs",
        "launcher_allowed_env",
        "launcher_allowed_mount_paths",
        "launcher_allowed_toleration_keys",
        "launcher_allowed_node_selector_keys",
        "launcher_gpu_node_keys",
    )
    def _launcher_check_patterns(self, proposal: Any) -> list[str]:
        # A broken pattern found at spawn time would refuse every start with a bare error.
        for pattern in proposal["value"]:
            try:
                re.compile(pattern.replace("{username}", "user").replace("{claim}", "claim"))
            except re.error as error:
                raise TraitError(
                    f"{proposal['trait'].name}: {pattern!r} is not a regular expression: {error}"
                ) from None
        return list(proposal["value"])

    @validate("launcher_allowed_options")
    def _launcher_resolve_options(self, proposal: Any) -> dict[str, LauncherOption]:
        resolved: dict[str, LauncherOption] = {}
        for key, option in proposal["value"].items():
            if isinstance(option, str) and option in BUILTIN_OPTIONS:
                option = BUILTIN_OPTIONS[option]()
            if not isinstance(option, LauncherOption):
                raise TraitError(
                    f"launcher_allowed_options[{key!r}]: give a LauncherOption or one of {', '.join(BUILTIN_OPTIONS)}"
                )
            resolved[str(key)] = option
        return resolved

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Taken once the config is loaded, before any start changes anything.
        self._launcher_defaults = {name: copy.deepcopy(getattr(self, name)) for name in self._launcher_traits()}
        # "fresh": reset for the spawn under way; "applied": this spawn's options are in place.
        self._launcher_stage: str | None = None
        # The digest of the options this spawn applied, for its progress stream; None from the
        # start of the next spawn or a stop on, so that no stream reports an earlier spawn's.
        self._launcher_applied_digest: str | None = None
        if not self.launcher_signing_key and not LauncherSpawnerMixin._launcher_warned:
            # Once per process: JupyterHub makes the spawners of running servers at its start.
            LauncherSpawnerMixin._launcher_warned = True
            getattr(self, "log", log).warning(
                "%s: no launcher_signing_key (or LAUNCHER_SIGNING_KEY): any user can set options for their"
                " own servers with their own token, within the launcher_* policy. Set the key the launcher"
                " signs with (its spawner_signing_key) to let only the launcher set them.",
                type(self).__name__,
            )

    _launcher_warned = False

    @default("launcher_signing_key")
    def _launcher_signing_key_from_env(self) -> str:
        return os.environ.get("LAUNCHER_SIGNING_KEY", "")

    def _launcher_traits(self) -> list[str]:
        names = [*_MANAGED_TRAITS, *(o.trait for o in self.launcher_allowed_options.values())]
        return [name for name in dict.fromkeys(names) if self.has_trait(name)]

    def _launcher_reset(self) -> None:
        for name, value in self._launcher_defaults.items():
            setattr(self, name, copy.deepcopy(value))
        self._launcher_stage = "fresh"
        self._launcher_applied_digest = None

    async def run_auth_state_hook(self, auth_state: Any) -> Any:
        # The earliest per-spawn call into the spawner: resetting here keeps what auth_state_hook,
        # group overrides and pre_spawn_hook set afterwards for this spawn.
        self._launcher_reset()
        result = super().run_auth_state_hook(auth_state)  # type: ignore[misc]
        return await result if isawaitable(result) else result

    def launcher_apply(self, options: dict[str, Any]) -> None:
        """Check ``options`` (signature, then policy) and apply them; raises LauncherOptionsError.

        When any option is refused, none is applied.
        """
        if self._launcher_stage != "fresh":
            self._launcher_reset()
        if options and not self._launcher_options_sent():
            # JupyterHub hands a start request that carries no options the previous start's: a
            # start without options gets the defaults, and the server's model says so.
            options = {}
        unsigned = self._launcher_verified(options)
        plan = self.launcher_plan(unsigned)
        self._launcher_check_user_totals(plan)
        for name, value in plan.items():
            setattr(self, name, value)
        self._launcher_store(unsigned)
        self._launcher_stage = "applied"
        self._launcher_applied_digest = options_digest(unsigned)

    def launcher_ensure_applied(self) -> None:
        """Apply ``user_options`` unless the apply_user_options hook already did for this spawn."""
        if self._launcher_stage != "applied":
            # JupyterHub < 5.3, or an admin's own apply_user_options: the start fails with the message.
            self.launcher_apply(self.user_options or {})

    def start(self) -> Any:
        # Not async: KubeSpawner.start must set its start future synchronously.
        self.launcher_ensure_applied()
        self._launcher_stage = None
        return super().start()  # type: ignore[misc]

    def clear_state(self) -> None:
        # JupyterHub clears a spawner's state as a new spawn begins and after a stop: from then on
        # no progress stream reports the options of the spawn before.
        super().clear_state()  # type: ignore[misc]
        self._launcher_applied_digest = None

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        """First, once the options are applied, which ones (their digest); then the spawner's own.

        A start request answered 202 may be someone else's pending spawn, whose options the hub
        kept instead of ours; the launcher, which follows this stream anyway, compares the digest
        with its own options' instead of reading the server's model after the spawn. The event
        also carries the server's URL, so that a start answered 201 (ready) needs no wait for the
        stream's own "ready" event, which the hub sends a few turns of its event loop later. Any
        user may read their own server's stream: the digest says no more than the model's
        user_options, the URL no more than the "ready" event.
        """
        digest = self._launcher_applied_digest
        if digest is not None:
            event: dict[str, Any] = {"progress": 0, "message": "Server options checked", OPTIONS_EVENT_KEY: digest}
            url = self._launcher_server_url()
            if url:
                event[URL_EVENT_KEY] = url
            yield event
        async for event in super().progress():  # type: ignore[misc]
            yield event

    def _launcher_server_url(self) -> str | None:
        """The server's URL as JupyterHub's progress handler puts it in its "ready" event (the
        same expression), or None where this spawner has no hub user (outside a hub)."""
        user_url = getattr(getattr(self, "user", None), "url", None)
        if not isinstance(user_url, str):
            return None
        return str(url_path_join(user_url, url_escape_path(getattr(self, "name", "") or ""), "/"))

    def get_env(self) -> dict[str, str]:
        env: dict[str, str] = super().get_env()  # type: ignore[misc]
        if self.launcher_allow_token_in_url:
            env["JUPYTERHUB_ALLOW_TOKEN_IN_URL"] = "1"
        return env

    # -- who sent the options ---------------------------------------------------------------------

    def _launcher_options_sent(self) -> bool:
        """Did this start's request carry options? False: JupyterHub reused the stored ones."""
        handler = getattr(self, "handler", None)
        if handler is None:
            return True  # no request to look at: the options must stand on their own
        read_body = getattr(handler, "get_server_json_body", None)
        if read_body is not None:  # the REST API's start request (JupyterHub 6)
            try:
                return bool(read_body().get("user_options"))
            except Exception:  # noqa: BLE001 (the hub has parsed this body already)
                return True
        read_json = getattr(handler, "get_json_body", None)
        if read_json is not None:  # the REST API before JupyterHub 6: the body is the options
            try:
                return bool(read_json())
            except Exception:  # noqa: BLE001
                return True
        request = getattr(handler, "request", None)
        if getattr(request, "method", None) == "GET":
            # A page's start link: JupyterHub takes options from query arguments other than these.
            return any(name not in ("next", "display_name") for name in getattr(request, "query_arguments", {}))
        return True  # a form post

    def _launcher_verified(self, options: Any) -> dict[str, Any]:
        """``options`` without their signature, once it is checked (with a key configured)."""
        if not isinstance(options, dict):
            raise LauncherOptionsError("user options must be a JSON object")
        signed = options.get(SIGNATURE_KEY)
        unsigned = {k: v for k, v in options.items() if k != SIGNATURE_KEY}
        key = self.launcher_signing_key
        if not key or (signed is None and not unsigned):
            return unsigned  # no key: anyone's options; no options: the defaults, which anyone gets
        if signed is None:
            raise LauncherOptionsError(
                "this hub applies only options signed by its launcher; start without options for the defaults"
            )
        match = _SIGNATURE.fullmatch(signed) if isinstance(signed, str) else None
        if match is None:
            raise LauncherOptionsError(f"{SIGNATURE_KEY}: is not a launcher signature")
        signed_at = int(match[1])
        username, server_name = str(self.user.name), str(self.name or "")  # type: ignore[attr-defined]
        expected = _signature_mac(key, username, server_name, signed_at, unsigned)
        if not hmac.compare_digest(expected, match[2]):
            raise LauncherOptionsError(
                f"{SIGNATURE_KEY}: does not match these options for {username}'s server {server_name!r}"
                " (signed for other options, another user or server, or with another key)"
            )
        age = time.time() - signed_at
        if abs(age) > self.launcher_signature_max_age:
            raise LauncherOptionsError(
                f"{SIGNATURE_KEY}: made {age:.0f} s ago; this hub accepts signatures up to"
                f" {self.launcher_signature_max_age:g} s old (are the launcher's and the hub's clocks right?)"
            )
        return unsigned

    def _launcher_store(self, options: dict[str, Any]) -> None:
        """Keep what was applied as the server's options: the model shows them, unsigned."""
        self.user_options = options
        orm_spawner = getattr(self, "orm_spawner", None)
        if orm_spawner is not None and getattr(orm_spawner, "user_options", None) != options:
            orm_spawner.user_options = options

    # -- checking -------------------------------------------------------------------------------

    def _launcher_extra_keys(self, options: Mapping[str, Any]) -> set[str]:
        """Other top-level keys this spawner understands itself (KubeSpawner: its profiles)."""
        return set()

    def _launcher_pvc_username(self) -> str:
        return str(self.user.name)  # type: ignore[attr-defined]

    def _launcher_own_claim(self) -> str:
        return f"claim-{self.user.name}"  # type: ignore[attr-defined]

    def _launcher_env_value(self, value: str) -> str:
        return value

    def launcher_plan(self, options: Any) -> dict[str, Any]:
        """The trait values ``options`` lead to, from the current (reset) ones; nothing is set."""
        if not isinstance(options, dict):
            raise LauncherOptionsError("user options must be a JSON object")
        extra = self._launcher_extra_keys(options)
        for key in options:
            if key not in _TOP_LEVEL and key not in extra:
                raise LauncherOptionsError(
                    f"unknown option {key!r}: this hub accepts {', '.join(_TOP_LEVEL)}"
                    " (extra spawner settings only under 'json', if the hub allows them)"
                )
        plan: dict[str, Any] = {}
        self._plan_image(options, plan)
        self._plan_cpu(options, plan)
        self._plan_memory(options, plan)
        gpus = self._plan_gpu(options, plan)
        self._plan_volumes(options, plan)
        self._plan_env(options, plan)
        self._plan_extras(options, plan, gpus)
        return {name: value for name, value in plan.items() if self.has_trait(name)}

    # Without launcher_max_*, the configured limits are the maxima: callers may only ask for less.

    def _launcher_max_cpu(self) -> float | None:
        return self.launcher_max_cpu if self.launcher_max_cpu is not None else getattr(self, "cpu_limit", None)

    def _launcher_max_memory(self) -> int | None:
        return self.launcher_max_memory if self.launcher_max_memory is not None else getattr(self, "mem_limit", None)

    def _launcher_configured_gpus(self) -> int:
        configured = getattr(self, "extra_resource_limits", {}).get(self.launcher_gpu_resource) or 0
        try:
            return int(configured)
        except ValueError:
            return 0

    def _launcher_max_gpu(self) -> int:
        return self.launcher_max_gpu if self.launcher_max_gpu is not None else self._launcher_configured_gpus()

    def _plan_image(self, options: Mapping[str, Any], plan: dict[str, Any]) -> None:
        image = options.get("image")
        if image is None:
            return
        if not isinstance(image, str) or not _IMAGE.fullmatch(image):
            raise LauncherOptionsError(f"image: {image!r} is not an image name")
        configured = getattr(self, "image", None) if self.has_trait("image") else None
        if image != configured and not any(re.fullmatch(pattern, image) for pattern in self.launcher_allowed_images):
            only = "" if self.launcher_allowed_images else " (it runs only its configured image)"
            raise LauncherOptionsError(f"image: {image!r} is not one of the images this hub allows{only}")
        plan["launcher_image"] = image
        plan["image"] = image

    def _plan_cpu(self, options: Mapping[str, Any], plan: dict[str, Any]) -> None:
        spec = _request_limit(options, "cpu")
        maximum = self._launcher_max_cpu()
        for field in ("request", "limit"):
            if field in spec:
                cores = float(_number(spec[field], f"cpu.{field}", whole=False))
                if maximum is None:
                    raise LauncherOptionsError(
                        f"cpu.{field}: this hub sets no CPU maximum (launcher_max_cpu or cpu_limit), so callers cannot choose CPUs"
                    )
                if cores > maximum:
                    raise LauncherOptionsError(
                        f"cpu.{field}: {cores:g} is more than this hub's maximum of {maximum:g} cores"
                    )
                plan["cpu_guarantee" if field == "request" else "cpu_limit"] = cores
        request = plan.get("cpu_guarantee", getattr(self, "cpu_guarantee", None))
        limit = plan.get("cpu_limit", getattr(self, "cpu_limit", None))
        if spec and request and limit and request > limit:
            raise LauncherOptionsError(f"cpu: request ({request:g}) is more than limit ({limit:g})")

    def _plan_memory(self, options: Mapping[str, Any], plan: dict[str, Any]) -> None:
        spec = _request_limit(options, "memory")
        maximum = self._launcher_max_memory()
        for field in ("request", "limit"):
            if field in spec:
                try:
                    size = memory_bytes(spec[field])
                except ValueError as error:
                    raise LauncherOptionsError(f"memory.{field}: {error}") from None
                if maximum is None:
                    raise LauncherOptionsError(
                        f"memory.{field}: this hub sets no memory maximum (launcher_max_memory or mem_limit),"
                        " so callers cannot choose memory"
                    )
                if size > maximum:
                    raise LauncherOptionsError(
                        f"memory.{field}: {spec[field]!r} is more than this hub's maximum of {_human_bytes(maximum)}"
                    )
                plan["mem_guarantee" if field == "request" else "mem_limit"] = size
        request = plan.get("mem_guarantee", getattr(self, "mem_guarantee", None))
        limit = plan.get("mem_limit", getattr(self, "mem_limit", None))
        if spec and request and limit and request > limit:
            raise LauncherOptionsError(f"memory: request ({request} bytes) is more than limit ({limit} bytes)")

    def _plan_gpu(self, options: Mapping[str, Any], plan: dict[str, Any]) -> int:
        spec = _request_limit(options, "gpu")
        if not spec:
            return self._launcher_configured_gpus()
        counts = {field: int(_number(value, f"gpu.{field}", whole=True)) for field, value in spec.items()}
        if len(set(counts.values())) > 1:
            raise LauncherOptionsError(
                f"gpu: request ({counts['request']}) and limit ({counts['limit']}) must be equal;"
                " Kubernetes requires it for GPUs"
            )
        gpus = next(iter(counts.values()))
        maximum = self._launcher_max_gpu()
        if not maximum:
            raise LauncherOptionsError("gpu: this hub gives callers no GPUs (launcher_max_gpu)")
        if gpus > maximum:
            raise LauncherOptionsError(f"gpu: {gpus} is more than this hub's maximum of {maximum}")
        resource = self.launcher_gpu_resource
        plan["launcher_gpu"] = gpus
        plan["extra_resource_limits"] = {**getattr(self, "extra_resource_limits", {}), resource: str(gpus)}
        plan["extra_resource_guarantees"] = {**getattr(self, "extra_resource_guarantees", {}), resource: str(gpus)}
        return gpus

    def _launcher_check_user_totals(self, plan: Mapping[str, Any]) -> None:
        """Sums over the user's active servers (running or starting), this one included."""
        caps = (
            self.launcher_user_max_servers,
            self.launcher_user_max_cpu,
            self.launcher_user_max_memory,
            self.launcher_user_max_gpu,
        )
        if all(cap is None for cap in caps):
            return
        user = self.user  # type: ignore[attr-defined]
        others = [
            s for s in list(getattr(user, "spawners", {}).values()) if s is not self and getattr(s, "active", False)
        ]
        names = ", ".join(repr(s.name) for s in others) or "none"
        if self.launcher_user_max_servers is not None and len(others) + 1 > self.launcher_user_max_servers:
            raise LauncherOptionsError(
                f"servers: {user.name} already has {len(others)} active servers ({names}); this hub allows"
                f" {self.launcher_user_max_servers} per user: stop one first"
            )
        for what, cap, unit, own_max in (
            ("cpu", self.launcher_user_max_cpu, "cores", self._launcher_max_cpu()),
            ("memory", self.launcher_user_max_memory, "", self._launcher_max_memory()),
            ("gpu", self.launcher_user_max_gpu, "GPUs", None),
        ):
            if cap is None:
                continue
            # A server without a limit counts as the per-server maximum; without one it cannot be counted.
            counted = [_usage(self, what, plan), *(_usage(s, what, {}) for s in others)]
            counted = [own_max if used is None else used for used in counted]
            if None in counted:
                which = "this one" if counted[0] is None else "another of them"
                raise LauncherOptionsError(
                    f"{what}: this hub limits the {what} of each user's servers in all, so every server needs a"
                    f" {what} limit, and {which} has none"
                )
            amounts = [used for used in counted if used is not None]  # all of them, by the check above
            mine, total = amounts[0], sum(amounts)
            if total > cap:

                def show(amount: float, what: str = what, unit: str = unit) -> str:
                    return _human_bytes(int(amount)) if what == "memory" else f"{amount:g} {unit}"

                raise LauncherOptionsError(
                    f"{what}: {show(total - mine)} on {user.name}'s other active servers ({names}) and {show(mine)}"
                    f" on this one are more than this hub's per-user total of {show(cap)}"
                )

    def _plan_volumes(self, options: Mapping[str, Any], plan: dict[str, Any]) -> None:
        vols = options.get("vols")
        if vols is not None and (not isinstance(vols, list) or len(vols) > _MAX_VOLS):
            raise LauncherOptionsError(f"vols: must be a list of at most {_MAX_VOLS} volumes")
        volumes = getattr(self, "volumes", [])
        mounts = getattr(self, "volume_mounts", [])
        taken = {_mount_path(m) for m in _values(mounts) if isinstance(m, dict)}
        if plan.get("launcher_gpu") and _SHM_PATH not in taken:
            # GPU frameworks (NCCL, PyTorch data loaders) need more than the runtime's 64 MB /dev/shm.
            volumes = _add(volumes, _SHM_VOLUME, {"name": _SHM_VOLUME, "emptyDir": {"medium": "Memory"}})
            mounts = _add(mounts, _SHM_VOLUME, {"name": _SHM_VOLUME, "mountPath": _SHM_PATH})
            taken.add(_SHM_PATH)
        names = {
            "{claim}": re.escape(self._launcher_own_claim()),
            "{username}": re.escape(self._launcher_pvc_username()),
        }
        allowed = [re.sub(r"\{claim\}|\{username\}", lambda m: names[m[0]], p) for p in self.launcher_allowed_pvcs]
        checked = []
        named: set[str] = set()
        for index, vol in enumerate(vols or []):
            where = f"vols[{index}]"
            if not isinstance(vol, dict):
                raise LauncherOptionsError(f"{where}: must be an object with 'pvc', 'mount' and optional 'subpath'")
            unknown = sorted(set(vol) - _VOLUME_KEYS)
            if unknown:
                raise LauncherOptionsError(
                    f"{where}: unknown field {unknown[0]!r}; only persistent volume claims ('pvc', 'mount',"
                    " 'subpath') can be mounted"
                )
            pvc = vol.get("pvc")
            if not isinstance(pvc, str) or not _DNS_SUBDOMAIN.fullmatch(pvc):
                raise LauncherOptionsError(f"{where}.pvc: {pvc!r} is not a PVC name")
            if not any(re.fullmatch(pattern, pvc) for pattern in allowed):
                raise LauncherOptionsError(f"{where}.pvc: {pvc!r} is not a claim this user may mount")
            mount = _clean_path(vol.get("mount"), f"{where}.mount", absolute=True)
            if mount == "/":
                raise LauncherOptionsError(f"{where}.mount: cannot mount over '/'")
            if mount in taken:
                raise LauncherOptionsError(f"{where}.mount: {mount} is already mounted")
            if not any(re.fullmatch(pattern, mount) for pattern in self.launcher_allowed_mount_paths):
                raise LauncherOptionsError(
                    f"{where}.mount: {mount} is not a path this hub lets callers mount at (not in system directories)"
                )
            taken.add(mount)
            subpath = vol.get("subpath") or ""
            if subpath:
                subpath = _clean_path(subpath, f"{where}.subpath", absolute=False)
            name = _volume_name(pvc)
            if name not in named:
                named.add(name)
                volumes = _add(volumes, name, {"name": name, "persistentVolumeClaim": {"claimName": pvc}})
            mount_spec: dict[str, Any] = {"name": name, "mountPath": mount}
            if subpath:
                mount_spec["subPath"] = subpath
            mounts = _add(mounts, f"{name}-{index}", mount_spec)
            checked.append({"pvc": pvc, "mount": mount, "subpath": subpath})
        plan["volumes"], plan["volume_mounts"], plan["launcher_volumes"] = volumes, mounts, checked

    def _plan_env(self, options: Mapping[str, Any], plan: dict[str, Any]) -> None:
        env = options.get("env")
        environment = dict(getattr(self, "environment", {}))
        if env is not None:
            if not isinstance(env, dict) or len(env) > _MAX_ENV:
                raise LauncherOptionsError(f"env: must be an object of at most {_MAX_ENV} variables")
            for name, value in env.items():
                if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                    raise LauncherOptionsError(f"env: {name!r} is not a valid environment variable name")
                if name.startswith(_RESERVED_ENV_PREFIXES):
                    raise LauncherOptionsError(f"env.{name}: is set by JupyterHub and cannot be overridden")
                if name in _RESERVED_ENV_NAMES:
                    raise LauncherOptionsError(f"env.{name}: is set by the spawner and cannot be overridden")
                if name in environment:
                    raise LauncherOptionsError(
                        f"env.{name}: is set by the hub's configuration and cannot be overridden"
                    )
                if not any(re.fullmatch(pattern, name) for pattern in self.launcher_allowed_env):
                    raise LauncherOptionsError(f"env.{name}: is not a variable this hub lets callers set")
                if not isinstance(value, str) or "\0" in value:
                    raise LauncherOptionsError(f"env.{name}: the value must be a string")
                environment[name] = self._launcher_env_value(value)
        image = plan.get("launcher_image")
        if image and not self.has_trait("image"):
            # Spawners without images still tell the server what was asked for, as KubeSpawner does.
            environment["JUPYTER_IMAGE"] = image
        plan["environment"] = environment

    def _plan_extras(self, options: Mapping[str, Any], plan: dict[str, Any], gpus: int) -> None:
        extras = options.get("json")
        if extras is None:
            return
        if not isinstance(extras, dict):
            raise LauncherOptionsError("json: must be an object")
        allowed = self.launcher_allowed_options
        for key, value in extras.items():
            if key == "transparent":
                continue  # the older API's switch; accepted and ignored
            option = allowed.get(key)
            if option is None:
                names = ", ".join(sorted(allowed)) or "none"
                raise LauncherOptionsError(f"json.{key}: is not an option this hub allows (allowed: {names})")
            if not self.has_trait(option.trait):
                raise LauncherOptionsError(f"json.{key}: this spawner has no {option.trait!r} setting")
            try:
                checked = option.check(value)
            except (ValueError, TypeError) as error:
                raise LauncherOptionsError(f"json.{key}: {error}") from None
            self._launcher_check_scheduling(key, option.trait, checked, gpus)
            current = plan.get(option.trait, getattr(self, option.trait))
            if option.merge == "extend":
                for item in checked:
                    current = _add(current, f"launcher-{key}-{len(_values(current))}", item)
                checked = current
            elif option.merge == "update":
                checked = {**checked, **(current or {})}
            plan[option.trait] = checked

    def _launcher_check_scheduling(self, key: str, trait: str, value: Any, gpus: int) -> None:
        """Tolerations and node selectors, whichever option sets them: only allowed keys, and GPU
        nodes' keys only for starts with GPUs."""
        if trait == "tolerations":
            items = _values(value)
            keys = [
                (f"json.{key}[{i}].key", item.get("key") if isinstance(item, dict) else None)
                for i, item in enumerate(items)
            ]
            allowed, what, verb, setting = (
                self.launcher_allowed_toleration_keys,
                "taint",
                "tolerate",
                "launcher_allowed_toleration_keys",
            )
        elif trait == "node_selector":
            keys = [(f"json.{key}.{name}", name) for name in (value or {})]
            allowed, what, verb, setting = (
                self.launcher_allowed_node_selector_keys,
                "node label",
                "select",
                "launcher_allowed_node_selector_keys",
            )
        else:
            return
        for where, name in keys:
            if not isinstance(name, str) or not name:
                raise LauncherOptionsError(
                    f"{where}: a toleration without a key tolerates every taint; name the taint's key"
                )
            if not any(re.fullmatch(pattern, name) for pattern in allowed):
                raise LauncherOptionsError(
                    f"{where}: {name!r} is not a {what} this hub lets callers {verb} ({setting})"
                )
            if not gpus and any(re.fullmatch(pattern, name) for pattern in self.launcher_gpu_node_keys):
                raise LauncherOptionsError(
                    f"{where}: {name!r} is for GPU nodes; only a start that asks for GPUs may {verb} it"
                )


def _usage(spawner: Any, what: str, plan: Mapping[str, Any]) -> float | None:
    """What a server has (or, with ``plan``, will have) of ``what``: its limit, else its guarantee."""

    def value(name: str) -> Any:
        return plan[name] if name in plan else getattr(spawner, name, None)

    if what == "gpu":
        gpus = value("launcher_gpu")
        if not gpus:
            resource = getattr(spawner, "launcher_gpu_resource", "nvidia.com/gpu")
            gpus = (value("extra_resource_limits") or {}).get(resource) or 0
        return float(gpus)
    prefix = "cpu" if what == "cpu" else "mem"
    found = value(f"{prefix}_limit") or value(f"{prefix}_guarantee")
    return None if found is None else float(found)


def _canonical_json(value: Any) -> bytes:
    """The JSON form consumer/signing.py signs and digests: sorted keys, no spaces, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def options_digest(options: Mapping[str, Any]) -> str:
    """A short digest of applied options: SHA-256 over their canonical JSON, as consumer/signing.py
    computes it for the options it sends."""
    return hashlib.sha256(_canonical_json(options)).hexdigest()[:32]


def _signature_mac(key: str, username: str, server_name: str, signed_at: int, options: dict[str, Any]) -> str:
    """HMAC-SHA256 over the canonical form that consumer/signing.py signs."""
    document = {"options": options, "server": server_name, "time": signed_at, "user": username}
    return hmac.new(key.encode(), _canonical_json(document), hashlib.sha256).hexdigest()


class LocalLauncherSpawner(LauncherSpawnerMixin, SimpleLocalProcessSpawner):
    """JupyterHub's local process spawner with the launcher's options (tests and demos).

    CPU and memory reach the process as CPU_LIMIT, MEM_LIMIT, …; the image, GPUs and volumes are
    checked but only recorded (``launcher_image``, ``launcher_gpu``, ``launcher_volumes``).
    """


class _DefaultServer:
    """A spawner seen as its user's default server (KubeSpawner names things after ``name``)."""

    name = ""

    def __init__(self, spawner: Any) -> None:
        self._spawner = spawner

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._spawner, attr)


def _kube_launcher_spawner() -> type:
    from kubespawner import KubeSpawner

    class KubeLauncherSpawner(LauncherSpawnerMixin, KubeSpawner):
        """KubeSpawner (jupyterhub-kubespawner 7.x) with the launcher's options."""

        def _launcher_extra_keys(self, options: Mapping[str, Any]) -> set[str]:
            # KubeSpawner 7.1 reads "profile", and for each option of the chosen (or default) profile
            # "<option>" (a choice) and "<option>--unlisted-choice" (the user's own value).
            slug = options.get("profile")
            profiles = self.profile_list
            if callable(profiles):
                if slug is not None:
                    raise LauncherOptionsError(
                        "profile: this hub's profiles come from a function; choose them in the hub's form"
                    )
                return set()
            profile_list = self._get_initialized_profile_list(self._sorted_dict_values(profiles))
            if not profile_list:
                if slug is not None:
                    raise LauncherOptionsError("profile: this hub has no profiles")
                return set()
            if slug is not None and not isinstance(slug, str):
                raise LauncherOptionsError(f"profile: {slug!r} is not a profile's slug")
            try:
                profile = self._get_profile(slug or None, profile_list)
            except ValueError:
                slugs = ", ".join(p["slug"] for p in profile_list)
                raise LauncherOptionsError(f"profile: {slug!r} is not one of this hub's profiles ({slugs})") from None
            keys = {"profile"}
            for name, option in profile.get("profile_options", {}).items():
                unlisted_key = f"{name}--unlisted-choice"
                if name in _TOP_LEVEL and (name in options or unlisted_key in options):
                    raise LauncherOptionsError(
                        f"{name}: profile {profile['slug']!r} has an option named {name!r}, and KubeSpawner reads"
                        f" the {name!r} of the options as that option's choice: leave {name!r} out and choose"
                        f" with 'profile', or ask the hub's admin to rename the profile option"
                    )
                keys.update({name, unlisted_key})
                choices = option.get("choices") or {}
                if name in options and (not isinstance(options[name], str) or options[name] not in choices):
                    raise LauncherOptionsError(
                        f"{name}: {options[name]!r} is not a choice of profile {profile['slug']!r}"
                        f" ({', '.join(choices) or 'none'})"
                    )
                if unlisted_key in options:
                    self._launcher_check_unlisted_choice(unlisted_key, options[unlisted_key], option)
            return keys

        def _launcher_check_unlisted_choice(self, key: str, value: Any, option: Mapping[str, Any]) -> None:
            unlisted = option.get("unlisted_choice") or {}
            if not unlisted.get("enabled"):
                raise LauncherOptionsError(f"{key}: this profile option takes only its listed choices")
            if not isinstance(value, str) or not value or any(c in value for c in "{}\0\n\r"):
                raise LauncherOptionsError(f"{key}: must be a non-empty string without braces or control characters")
            pattern = unlisted.get("validation_regex")
            # KubeSpawner itself checks with re.match, a prefix; the whole value must match here.
            if pattern and not re.fullmatch(pattern, value):
                raise LauncherOptionsError(f"{key}: {value!r} does not match {pattern!r}")

        def _launcher_pvc_username(self) -> str:
            return str(self._expand_user_properties("{username}"))

        def _launcher_own_claim(self) -> str:
            # The claim KubeSpawner makes for the user's default server: pvc_name_template with the
            # configured slug scheme, as for a server named "".
            return str(KubeSpawner._expand_user_properties(_DefaultServer(self), self.pvc_name_template))

        def _launcher_env_value(self, value: str) -> str:
            # KubeSpawner formats `environment` values as templates: double braces keep them literal.
            return value.replace("{", "{{").replace("}", "}}")

    KubeLauncherSpawner.__module__ = __name__
    KubeLauncherSpawner.__qualname__ = "KubeLauncherSpawner"
    return KubeLauncherSpawner


def __getattr__(name: str) -> Any:
    # Lazy, so that local hubs and the consumer's tests do not need kubespawner installed.
    if name == "KubeLauncherSpawner":
        cls = _kube_launcher_spawner()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:

    class KubeLauncherSpawner(LauncherSpawnerMixin, KubeSpawner): ...

"""Hub side: spawners that apply the launcher's run-time options safely.

JupyterHub loads this module, not the consumer: it imports only JupyterHub, traitlets, tornado and
(for ``KubeLauncherSpawner``, lazily) kubespawner, and nothing else from this package, so it also
works as one file mounted into a Zero to JupyterHub hub (``hub.extraFiles``).

What a caller may ask for, in ``user_options`` as the consumer sends them::

    {"image": str, "cpu": {"request", "limit"}, "memory": {"request", "limit"},
     "gpu": {"request", "limit"}, "vols": [{"pvc", "mount", "subpath"}], "env": {str: str},
     "json": {allow-listed extra options}}

Everything else is refused, and everything is checked against the hub admin's policy traits
(``launcher_*``). Every start begins from the configured defaults, so nothing from an earlier start
leaks into the next. On JupyterHub >= 5.3 the options are applied in the ``apply_user_options``
hook, so a refusal is the start request's own 400 with the message; older hubs apply them in
``start()``, where a refusal fails the spawn with the message in the progress stream.
"""

from __future__ import annotations

import copy
import hashlib
import math
import posixpath
import re
from collections.abc import Callable, Mapping
from inspect import isawaitable
from typing import TYPE_CHECKING, Any

from jupyterhub.spawner import SimpleLocalProcessSpawner
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
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
# Variables the hub sets for the single-user server: overriding them would point the server at
# another hub or swap its identity. KubeSpawner applies `environment` after them, so only refusing
# them here protects them.
_RESERVED_ENV_PREFIXES = ("JUPYTERHUB_", "JPY_")
# Set by the spawners to describe the real limits and image; a caller's value would only lie.
_RESERVED_ENV_NAMES = frozenset(
    {"MEM_LIMIT", "MEM_GUARANTEE", "CPU_LIMIT", "CPU_GUARANTEE", "JUPYTER_IMAGE", "JUPYTER_IMAGE_SPEC"}
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_IMAGE = re.compile(r"^[^\s{}]{1,512}$")
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
        raise ValueError(f"{value!r} is not a memory quantity: use bytes or a string like '512M'")
    if isinstance(value, int):
        size = value
    else:
        match = _QUANTITY.match(value.strip())
        if match is None:
            raise ValueError(
                f"{value!r} is not a memory quantity: use bytes or a number with K, M, G, T "
                "(powers of 1024, as JupyterHub) or Ki, Mi, Gi, Ti"
            )
        size = int(float(match[1]) * _UNITS[match[2] or ""])
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

    With ``keys`` set, a toleration must name its key: a key-less ``Exists`` tolerates every taint.
    """
    patterns = [re.compile(k) for k in keys or []]

    def check_tolerations(value: Any) -> list[dict[str, Any]]:
        if not isinstance(value, list) or len(value) > max_items:
            raise ValueError(f"must be a list of at most {max_items} tolerations")
        checked = []
        for index, item in enumerate(value):
            where = f"[{index}]"
            if not isinstance(item, dict):
                raise ValueError(f"{where} must be an object")
            unknown = sorted(set(item) - _TOLERATION_KEYS)
            if unknown:
                raise ValueError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(_TOLERATION_KEYS))}")
            key, operator = item.get("key"), item.get("operator", "Equal")
            if key is not None and (not isinstance(key, str) or not _LABEL_KEY.match(key)):
                raise ValueError(f"{where}.key: {key!r} is not a taint key")
            if patterns and (key is None or not any(p.fullmatch(key) for p in patterns)):
                raise ValueError(f"{where}.key: {key!r} is not a taint this hub lets callers tolerate")
            if operator not in ("Equal", "Exists"):
                raise ValueError(f"{where}.operator: must be 'Equal' or 'Exists'")
            if "value" in item and (not isinstance(item["value"], str) or not _LABEL_VALUE.match(item["value"])):
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
        if not _LABEL_KEY.match(str(key)):
            raise ValueError(f"{key!r} is not a label key")
        if not isinstance(label, str) or not _LABEL_VALUE.match(label):
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
    return posixpath.normpath(value) if absolute else value


def _mount_path(mount: Mapping[str, Any]) -> str:
    return posixpath.normpath(str(mount.get("mountPath", "")))


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

    launcher_allowed_images = List(
        Unicode(),
        default_value=[".*"],
        config=True,
        help="Regular expressions (whole match) of the images callers may ask for. Default: any.",
    )
    launcher_max_cpu = Float(
        None, allow_none=True, config=True, help="Most cores a caller may ask for (request and limit)."
    )
    launcher_max_memory = Union(
        [Integer(), Unicode()],
        default_value=None,
        allow_none=True,
        config=True,
        help="Most memory a caller may ask for: bytes or '8G' (powers of 1024) / '8Gi'.",
    )
    launcher_max_gpu = Integer(None, allow_none=True, config=True, help="Most GPUs a caller may ask for.")
    launcher_allowed_pvcs = List(
        Unicode(),
        default_value=["claim-{username}", "claim-{username}-.+"],
        config=True,
        help="""Regular expressions (whole match) of the PVC names a caller may mount.

        ``{username}`` stands for the user's name as the spawner writes it in its own claim names
        (KubeSpawner: its ``{username}`` slug; local spawners: the user name), regex-escaped.
        """,
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
    launcher_volumes = List(help="The caller's checked volumes; informative for spawners without PVCs.")

    @default("apply_user_options")
    def _launcher_apply_user_options_default(self) -> Callable[[Any, dict[str, Any]], None]:
        # A plain function, because JupyterHub calls the trait's value as hook(spawner, options).
        return launcher_apply_user_options

    @validate("launcher_max_memory")
    def _launcher_parse_max_memory(self, proposal: Any) -> int | None:
        value = proposal["value"]
        if value is None:
            return None
        try:
            return memory_bytes(value)
        except ValueError as error:
            raise TraitError(f"launcher_max_memory: {error}") from None

    @validate("launcher_allowed_images", "launcher_allowed_pvcs")
    def _launcher_check_patterns(self, proposal: Any) -> list[str]:
        # A broken pattern found at spawn time would refuse every start with a bare error.
        for pattern in proposal["value"]:
            try:
                re.compile(pattern.replace("{username}", "user"))
            except re.error as error:
                raise TraitError(f"{proposal['trait'].name}: {pattern!r} is not a regular expression: {error}") from None
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

    def _launcher_traits(self) -> list[str]:
        names = [*_MANAGED_TRAITS, *(o.trait for o in self.launcher_allowed_options.values())]
        return [name for name in dict.fromkeys(names) if self.has_trait(name)]

    def _launcher_reset(self) -> None:
        for name, value in self._launcher_defaults.items():
            setattr(self, name, copy.deepcopy(value))
        self._launcher_stage = "fresh"

    async def run_auth_state_hook(self, auth_state: Any) -> Any:
        # The earliest per-spawn call into the spawner: resetting here keeps what auth_state_hook,
        # group overrides and pre_spawn_hook set afterwards for this spawn.
        self._launcher_reset()
        result = super().run_auth_state_hook(auth_state)  # type: ignore[misc]
        return await result if isawaitable(result) else result

    def launcher_apply(self, options: dict[str, Any]) -> None:
        """Check ``options`` against the policy and apply them; raises LauncherOptionsError.

        When any option is refused, none is applied.
        """
        if self._launcher_stage != "fresh":
            self._launcher_reset()
        plan = self.launcher_plan(options)
        for name, value in plan.items():
            setattr(self, name, value)
        self._launcher_stage = "applied"

    def launcher_ensure_applied(self) -> None:
        """Apply ``user_options`` unless the apply_user_options hook already did for this spawn."""
        if self._launcher_stage != "applied":
            # JupyterHub < 5.3, or an admin's own apply_user_options: the start fails with the message.
            self.launcher_apply(self.user_options or {})  # type: ignore[attr-defined]

    def start(self) -> Any:
        # Not async: KubeSpawner.start must set its start future synchronously.
        self.launcher_ensure_applied()
        self._launcher_stage = None
        return super().start()  # type: ignore[misc]

    def get_env(self) -> dict[str, str]:
        env: dict[str, str] = super().get_env()  # type: ignore[misc]
        if self.launcher_allow_token_in_url:
            env["JUPYTERHUB_ALLOW_TOKEN_IN_URL"] = "1"
        return env

    # -- checking -------------------------------------------------------------------------------

    def _launcher_extra_top_level(self, key: str) -> bool:
        """Other top-level keys this spawner understands itself (KubeSpawner: its profiles)."""
        return False

    def _launcher_pvc_username(self) -> str:
        return str(self.user.name)  # type: ignore[attr-defined]

    def _launcher_env_value(self, value: str) -> str:
        return value

    def launcher_plan(self, options: Any) -> dict[str, Any]:
        """The trait values ``options`` lead to, from the current (reset) ones; nothing is set."""
        if not isinstance(options, dict):
            raise LauncherOptionsError("user options must be a JSON object")
        for key in options:
            if key not in _TOP_LEVEL and not self._launcher_extra_top_level(key):
                raise LauncherOptionsError(
                    f"unknown option {key!r}: this hub accepts {', '.join(_TOP_LEVEL)}"
                    " (extra spawner settings only under 'json', if the hub allows them)"
                )
        plan: dict[str, Any] = {}
        self._plan_image(options, plan)
        self._plan_cpu(options, plan)
        self._plan_memory(options, plan)
        gpus = self._plan_gpu(options, plan)
        self._plan_volumes(options, plan, gpus)
        self._plan_env(options, plan)
        self._plan_extras(options, plan)
        return {name: value for name, value in plan.items() if self.has_trait(name)}

    def _plan_image(self, options: Mapping[str, Any], plan: dict[str, Any]) -> None:
        image = options.get("image")
        if image is None:
            return
        if not isinstance(image, str) or not _IMAGE.match(image):
            raise LauncherOptionsError(f"image: {image!r} is not an image name")
        if not any(re.fullmatch(pattern, image) for pattern in self.launcher_allowed_images):
            raise LauncherOptionsError(f"image: {image!r} is not one of the images this hub allows")
        plan["launcher_image"] = image
        plan["image"] = image

    def _plan_cpu(self, options: Mapping[str, Any], plan: dict[str, Any]) -> None:
        spec = _request_limit(options, "cpu")
        for field in ("request", "limit"):
            if field in spec:
                cores = float(_number(spec[field], f"cpu.{field}", whole=False))
                if self.launcher_max_cpu is not None and cores > self.launcher_max_cpu:
                    raise LauncherOptionsError(
                        f"cpu.{field}: {cores:g} is more than this hub's maximum of {self.launcher_max_cpu:g} cores"
                    )
                plan["cpu_guarantee" if field == "request" else "cpu_limit"] = cores
        request = plan.get("cpu_guarantee", getattr(self, "cpu_guarantee", None))
        limit = plan.get("cpu_limit", getattr(self, "cpu_limit", None))
        if spec and request and limit and request > limit:
            raise LauncherOptionsError(f"cpu: request ({request:g}) is more than limit ({limit:g})")

    def _plan_memory(self, options: Mapping[str, Any], plan: dict[str, Any]) -> None:
        spec = _request_limit(options, "memory")
        maximum = self.launcher_max_memory
        for field in ("request", "limit"):
            if field in spec:
                try:
                    size = memory_bytes(spec[field])
                except ValueError as error:
                    raise LauncherOptionsError(f"memory.{field}: {error}") from None
                if maximum is not None and size > maximum:
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
            return 0
        counts = {field: int(_number(value, f"gpu.{field}", whole=True)) for field, value in spec.items()}
        if len(set(counts.values())) > 1:
            raise LauncherOptionsError(
                f"gpu: request ({counts['request']}) and limit ({counts['limit']}) must be equal;"
                " Kubernetes requires it for GPUs"
            )
        gpus = next(iter(counts.values()))
        if self.launcher_max_gpu is not None and gpus > self.launcher_max_gpu:
            raise LauncherOptionsError(f"gpu: {gpus} is more than this hub's maximum of {self.launcher_max_gpu}")
        resource = self.launcher_gpu_resource
        plan["launcher_gpu"] = gpus
        plan["extra_resource_limits"] = {**getattr(self, "extra_resource_limits", {}), resource: str(gpus)}
        plan["extra_resource_guarantees"] = {**getattr(self, "extra_resource_guarantees", {}), resource: str(gpus)}
        return gpus

    def _plan_volumes(self, options: Mapping[str, Any], plan: dict[str, Any], gpus: int) -> None:
        vols = options.get("vols")
        if vols is not None and (not isinstance(vols, list) or len(vols) > _MAX_VOLS):
            raise LauncherOptionsError(f"vols: must be a list of at most {_MAX_VOLS} volumes")
        volumes = getattr(self, "volumes", [])
        mounts = getattr(self, "volume_mounts", [])
        taken = {_mount_path(m) for m in _values(mounts) if isinstance(m, dict)}
        if gpus and _SHM_PATH not in taken:
            # GPU frameworks (NCCL, PyTorch data loaders) need more than the runtime's 64 MB /dev/shm.
            volumes = _add(volumes, _SHM_VOLUME, {"name": _SHM_VOLUME, "emptyDir": {"medium": "Memory"}})
            mounts = _add(mounts, _SHM_VOLUME, {"name": _SHM_VOLUME, "mountPath": _SHM_PATH})
            taken.add(_SHM_PATH)
        allowed = [p.replace("{username}", re.escape(self._launcher_pvc_username())) for p in self.launcher_allowed_pvcs]
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
            if not isinstance(pvc, str) or not _DNS_SUBDOMAIN.match(pvc):
                raise LauncherOptionsError(f"{where}.pvc: {pvc!r} is not a PVC name")
            if not any(re.fullmatch(pattern, pvc) for pattern in allowed):
                raise LauncherOptionsError(f"{where}.pvc: {pvc!r} is not a claim this user may mount")
            mount = _clean_path(vol.get("mount"), f"{where}.mount", absolute=True)
            if mount == "/":
                raise LauncherOptionsError(f"{where}.mount: cannot mount over '/'")
            if mount in taken:
                raise LauncherOptionsError(f"{where}.mount: {mount} is already mounted")
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
                if not _ENV_NAME.match(name):
                    raise LauncherOptionsError(f"env: {name!r} is not a valid environment variable name")
                if name.startswith(_RESERVED_ENV_PREFIXES):
                    raise LauncherOptionsError(f"env.{name}: is set by JupyterHub and cannot be overridden")
                if name in _RESERVED_ENV_NAMES:
                    raise LauncherOptionsError(f"env.{name}: is set by the spawner and cannot be overridden")
                if name in environment:
                    raise LauncherOptionsError(f"env.{name}: is set by the hub's configuration and cannot be overridden")
                if not isinstance(value, str) or "\0" in value:
                    raise LauncherOptionsError(f"env.{name}: the value must be a string")
                environment[name] = self._launcher_env_value(value)
        image = plan.get("launcher_image")
        if image and not self.has_trait("image"):
            # Spawners without images still tell the server what was asked for, as KubeSpawner does.
            environment["JUPYTER_IMAGE"] = image
        plan["environment"] = environment

    def _plan_extras(self, options: Mapping[str, Any], plan: dict[str, Any]) -> None:
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
            current = plan.get(option.trait, getattr(self, option.trait))
            if option.merge == "extend":
                for item in checked:
                    current = _add(current, f"launcher-{key}-{len(_values(current))}", item)
                checked = current
            elif option.merge == "update":
                checked = {**checked, **(current or {})}
            plan[option.trait] = checked


class LocalLauncherSpawner(LauncherSpawnerMixin, SimpleLocalProcessSpawner):
    """JupyterHub's local process spawner with the launcher's options (tests and demos).

    CPU and memory reach the process as CPU_LIMIT, MEM_LIMIT, …; the image, GPUs and volumes are
    checked but only recorded (``launcher_image``, ``launcher_gpu``, ``launcher_volumes``).
    """


def _kube_launcher_spawner() -> type:
    from kubespawner import KubeSpawner

    class KubeLauncherSpawner(LauncherSpawnerMixin, KubeSpawner):
        """KubeSpawner (jupyterhub-kubespawner 7.x) with the launcher's options."""

        def _launcher_extra_top_level(self, key: str) -> bool:
            # KubeSpawner's own profile form; it checks these against its profile_list itself.
            return key == "profile" or key.startswith("profile-option-")

        def _launcher_pvc_username(self) -> str:
            return str(self._expand_user_properties("{username}"))

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
    class KubeLauncherSpawner(LauncherSpawnerMixin, KubeSpawner):  # noqa: D101
        ...

"""KubeLauncherSpawner against the real KubeSpawner class, without a cluster: the pod it would create.

A "start" here runs what JupyterHub runs before ``Spawner.start`` (auth-state hook, group overrides,
the ``apply_user_options`` hook) and then asks KubeSpawner for its pod manifest.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import yaml
from kubernetes_asyncio.client import ApiClient, V1Pod
from jupyterhub.utils import format_exception
from tornado.web import HTTPError
from traitlets import TraitError
from traitlets.config import Config

import kubespawner.spawner
from consumer.spawner import KubeLauncherSpawner, LauncherOptionsError, tolerations_option

ROOT = Path(__file__).resolve().parents[1]
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@pytest.fixture(autouse=True)
def no_cluster() -> Iterator[None]:
    with mock.patch.object(kubespawner.spawner, "load_config"), mock.patch.object(kubespawner.spawner, "shared_client"):
        yield


@pytest.fixture(autouse=True)
def no_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spawner reads LAUNCHER_SIGNING_KEY; tests that want a key configure one."""
    monkeypatch.delenv("LAUNCHER_SIGNING_KEY", raising=False)


def make_spawner(
    config: Config | None = None,
    username: str = "alice",
    spawner_class: type | None = None,
    server_name: str = "",
    user: Any = None,
) -> Any:
    """A spawner for ``username``'s server ``server_name``; give ``user`` to share one user's servers."""
    if user is None:
        user = SimpleNamespace(
            name=username, id=7, url=f"/user/{username}/", escaped_name=username, groups=[], spawners={}
        )
    hub = SimpleNamespace(
        url="http://hub:8081/hub/", api_url="http://hub:8081/hub/api", base_url="/hub/", public_host="", server=None
    )
    orm_spawner = SimpleNamespace(name=server_name, server=None, user_options=None, state=None)
    spawner = (spawner_class or KubeLauncherSpawner)(
        user=user, hub=hub, orm_spawner=orm_spawner, config=config or Config(), _mock=True
    )
    spawner.server = None
    spawner.api_token = "hub-made-token"
    user.spawners[server_name] = spawner
    return spawner


class StartRequest:
    """What the spawner sees of JupyterHub's REST API start request (``spawner.handler``)."""

    def __init__(self, sent: dict[str, Any] | None) -> None:
        self.sent = sent

    def get_server_json_body(self) -> dict[str, Any]:
        return {"display_name": None, "user_options": self.sent}


async def start(spawner: Any, options: dict[str, Any], sent: bool = True) -> V1Pod:
    """JupyterHub's steps before Spawner.start, then the pod KubeSpawner would create.

    ``sent=False``: the start request carried no options and JupyterHub passes the stored ones.
    """
    spawner.handler = StartRequest(options if sent else None)
    spawner.user_options = spawner.orm_spawner.user_options = options
    await spawner.run_auth_state_hook(None)
    await spawner.apply_group_overrides()
    await spawner._run_apply_user_options(options)
    spawner.launcher_ensure_applied()
    return await spawner.get_pod_manifest()


def policy() -> Config:
    config = Config()
    config.LauncherSpawnerMixin.launcher_allowed_images = [r"quay\.io/jupyter/.+"]
    config.LauncherSpawnerMixin.launcher_max_cpu = 8
    config.LauncherSpawnerMixin.launcher_max_memory = "32G"
    config.LauncherSpawnerMixin.launcher_max_gpu = 2
    config.LauncherSpawnerMixin.launcher_allowed_options = {
        "tolerations": tolerations_option(keys=[r"nvidia\.com/gpu"]),
        "node_selector": "node_selector",
    }
    config.LauncherSpawnerMixin.launcher_allowed_pvcs = ["{claim}", r"{claim}\.[a-z0-9-]+"]
    config.LauncherSpawnerMixin.launcher_allowed_toleration_keys = [r"nvidia\.com/gpu"]
    config.LauncherSpawnerMixin.launcher_allowed_node_selector_keys = ["gpu-type"]
    return config


def container(pod: V1Pod) -> Any:
    return pod.spec.containers[0]


def env_of(pod: V1Pod) -> dict[str, str]:
    return {e.name: e.value for e in container(pod).env}


def mounts_of(pod: V1Pod) -> dict[str, tuple[str, str | None]]:
    return {m.mount_path: (m.name, m.sub_path) for m in container(pod).volume_mounts}


def volumes_of(pod: V1Pod) -> dict[str, dict[str, Any]]:
    """name -> the volume as Kubernetes JSON (KubeSpawner keeps nested parts as plain dicts)."""
    return {v.name: ApiClient().sanitize_for_serialization(v) for v in pod.spec.volumes}


def claim(volume: dict[str, Any]) -> str:
    return volume["persistentVolumeClaim"]["claimName"]


FULL = {
    "image": "quay.io/jupyter/pytorch-notebook:2024-12-09",
    "cpu": {"request": 0.5, "limit": 2},
    "memory": {"request": "512M", "limit": "1.5Gi"},
    "gpu": {"request": 1, "limit": 1},
    "vols": [
        {"pvc": "claim-alice", "mount": "/home/jovyan/work", "subpath": "projects"},
        {"pvc": "claim-alice.data", "mount": "/data"},
    ],
    "env": {"COURSE": "ml-101", "BRACES": "{username}"},
    "json": {"tolerations": [GPU_TAINT], "node_selector": {"gpu-type": "a100"}},
}


async def test_pod_manifest_carries_image_resources_gpu_volumes_env_and_tolerations() -> None:
    pod = await start(make_spawner(policy()), FULL)

    assert container(pod).image == "quay.io/jupyter/pytorch-notebook:2024-12-09"
    resources = container(pod).resources
    assert resources.requests["cpu"] == 0.5 and resources.limits["cpu"] == 2.0
    # JupyterHub's meaning: 512M = 512 * 2**20 bytes; Gi is accepted too.
    assert resources.requests["memory"] == 536870912
    assert resources.limits["memory"] == 1610612736
    assert resources.requests["nvidia.com/gpu"] == "1" and resources.limits["nvidia.com/gpu"] == "1"

    volumes, mounts = volumes_of(pod), mounts_of(pod)
    work_volume, work_subpath = mounts["/home/jovyan/work"]
    assert work_subpath == "projects"
    assert claim(volumes[work_volume]) == "claim-alice"
    data_volume, data_subpath = mounts["/data"]
    assert data_subpath is None
    assert claim(volumes[data_volume]) == "claim-alice.data"
    shm_volume, _ = mounts["/dev/shm"]
    assert volumes[shm_volume]["emptyDir"] == {"medium": "Memory"}

    env = env_of(pod)
    assert env["COURSE"] == "ml-101"
    assert env["BRACES"] == "{username}"  # KubeSpawner's template expansion does not touch callers' values
    assert env["JUPYTERHUB_API_URL"] == "http://hub:8081/hub/api"
    assert "JUPYTERHUB_ALLOW_TOKEN_IN_URL" not in env
    assert [t.key for t in pod.spec.tolerations] == ["nvidia.com/gpu"]
    assert pod.spec.tolerations[0].operator == "Exists" and pod.spec.tolerations[0].effect == "NoSchedule"
    assert pod.spec.node_selector == {"gpu-type": "a100"}


async def test_volume_names_are_stable_and_one_claim_mounted_twice_is_one_volume() -> None:
    options = {
        "vols": [
            {"pvc": "claim-alice", "mount": "/a", "subpath": "x"},
            {"pvc": "claim-alice", "mount": "/b", "subpath": "y"},
        ]
    }
    first = await start(make_spawner(), options)
    second = await start(make_spawner(), {"vols": list(reversed(options["vols"]))})

    assert mounts_of(first)["/a"] == mounts_of(second)["/a"]
    assert mounts_of(first)["/a"][0] == mounts_of(first)["/b"][0]
    assert [v.name for v in first.spec.volumes] == [v.name for v in second.spec.volumes]
    assert len(first.spec.volumes) == 1


async def test_two_starts_in_a_row_give_independent_manifests() -> None:
    config = policy()
    config.KubeSpawner.image = "quay.io/jupyter/base-notebook:default"
    config.KubeSpawner.environment = {"SITE": "hub"}
    config.KubeSpawner.tolerations = [
        {"key": "hub.jupyter.org/dedicated", "operator": "Equal", "value": "user", "effect": "NoSchedule"}
    ]
    spawner = make_spawner(config)

    first = await start(spawner, FULL)
    second = await start(spawner, {"cpu": {"limit": 1}, "env": {"OTHER": "1"}})

    assert container(second).image == "quay.io/jupyter/base-notebook:default"
    assert container(second).resources.limits == {"cpu": 1.0}
    assert container(second).resources.requests == {}
    assert set(mounts_of(second)) == set()
    assert second.spec.volumes == []
    env = env_of(second)
    assert env["OTHER"] == "1" and env["SITE"] == "hub"
    assert "COURSE" not in env and "MEM_LIMIT" not in env
    assert [t.key for t in second.spec.tolerations] == ["hub.jupyter.org/dedicated"]
    assert not second.spec.node_selector
    # the earlier manifest is its own object, unchanged by the later start
    assert container(first).resources.limits["nvidia.com/gpu"] == "1"
    assert spawner.tolerations == config.KubeSpawner.tolerations


async def test_what_the_auth_state_hook_sets_survives_the_reset_at_every_start() -> None:
    def auth_state_hook(spawner: Any, auth_state: Any) -> None:
        spawner.environment = {**spawner.environment, "FROM_AUTH": "1"}

    config = Config()
    config.Spawner.auth_state_hook = auth_state_hook
    spawner = make_spawner(config)
    first = await start(spawner, {"env": {"CALLER": "1"}})
    second = await start(spawner, {})

    assert env_of(first)["FROM_AUTH"] == "1" and env_of(first)["CALLER"] == "1"
    assert env_of(second)["FROM_AUTH"] == "1" and "CALLER" not in env_of(second)


async def test_gpu_starts_in_a_row_mount_shm_once() -> None:
    spawner = make_spawner(policy())
    for _ in range(3):
        pod = await start(spawner, {"gpu": {"limit": 2}})
    shm = [m for m in container(pod).volume_mounts if m.mount_path == "/dev/shm"]
    assert len(shm) == 1
    assert len(pod.spec.volumes) == 1
    assert container(pod).resources.requests["nvidia.com/gpu"] == "2"


async def test_configured_shm_mount_is_kept_and_not_doubled() -> None:
    config = Config()
    config.KubeSpawner.volumes = {"shm": {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}}
    config.KubeSpawner.volume_mounts = {"shm": {"name": "shm", "mountPath": "/dev/shm"}}
    config.LauncherSpawnerMixin.launcher_max_gpu = 1
    pod = await start(make_spawner(config), {"gpu": {"request": 1}})
    assert mounts_of(pod) == {"/dev/shm": ("shm", None)}


async def test_gpu_resource_name_is_configurable() -> None:
    config = Config()
    config.LauncherSpawnerMixin.launcher_gpu_resource = "amd.com/gpu"
    config.LauncherSpawnerMixin.launcher_max_gpu = 1
    pod = await start(make_spawner(config), {"gpu": {"request": 1, "limit": 1}})
    assert container(pod).resources.limits == {"amd.com/gpu": "1"}


async def test_null_resources_keep_the_configured_defaults() -> None:
    config = Config()
    config.KubeSpawner.cpu_limit = 1.5
    config.KubeSpawner.mem_limit = "2G"
    pod = await start(make_spawner(config), {"cpu": None, "memory": {"request": None, "limit": None}, "gpu": None})
    assert container(pod).resources.limits == {"cpu": 1.5, "memory": 2147483648}


async def test_allow_token_in_url_reaches_the_server_environment() -> None:
    config = Config()
    config.LauncherSpawnerMixin.launcher_allow_token_in_url = True
    pod = await start(make_spawner(config), {})
    assert env_of(pod)["JUPYTERHUB_ALLOW_TOKEN_IN_URL"] == "1"


HOSTILE = [
    pytest.param({"privileged": True}, "unknown option 'privileged'", id="privileged"),
    pytest.param(
        {"json": {"privileged": True}}, "json.privileged: is not an option this hub allows", id="json-privileged"
    ),
    pytest.param({"cmd": ["/bin/sh"]}, "unknown option 'cmd'", id="cmd"),
    pytest.param({"json": {"cmd": ["/bin/sh"]}}, "json.cmd: is not an option", id="json-cmd"),
    pytest.param({"uid": 0}, "unknown option 'uid'", id="uid"),
    pytest.param({"json": {"uid": 0}}, "json.uid: is not an option", id="json-uid"),
    pytest.param({"json": {"extra_pod_config": {"hostNetwork": True}}}, "json.extra_pod_config", id="extra_pod_config"),
    pytest.param(
        {"vols": [{"hostPath": "/", "mount": "/host"}]}, "vols[0]: unknown field 'hostPath'", id="hostPath-vol"
    ),
    pytest.param(
        {"json": {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}},
        "json.volumes: is not an option",
        id="hostPath-json",
    ),
    pytest.param(
        {"vols": [{"pvc": "claim-bob", "mount": "/bob"}]},
        "'claim-bob' is not a claim this user may mount",
        id="other-pvc",
    ),
    pytest.param(
        {"vols": [{"pvc": "claim-alice", "mount": "/a/{username}"}]}, "must not contain braces", id="braces-in-mount"
    ),
    pytest.param(
        {"vols": [{"pvc": "claim-alice", "mount": "/a", "subpath": "../bob"}]},
        "must not contain '..'",
        id="subpath-escape",
    ),
    pytest.param(
        {"env": {"JUPYTERHUB_API_URL": "http://evil/"}},
        "env.JUPYTERHUB_API_URL: is set by JupyterHub",
        id="api-url-env",
    ),
    pytest.param({"env": {"JPY_API_TOKEN": "x"}}, "env.JPY_API_TOKEN: is set by JupyterHub", id="jpy-env"),
    pytest.param({"env": {"MEM_LIMIT": "1"}}, "env.MEM_LIMIT: is set by the spawner", id="mem-limit-env"),
    pytest.param({"image": "docker.io/evil/miner:latest"}, "is not one of the images this hub allows", id="image"),
    pytest.param({"cpu": {"limit": 64}}, "cpu.limit: 64 is more than this hub's maximum of 8 cores", id="cpu-max"),
    pytest.param({"cpu": {"request": 4, "limit": 2}}, "cpu: request (4) is more than limit (2)", id="cpu-order"),
    pytest.param(
        {"memory": {"limit": "64G"}}, "memory.limit: '64G' is more than this hub's maximum of 32G", id="memory-max"
    ),
    pytest.param({"memory": {"limit": "{username}G"}}, "'{username}G' is not a memory quantity", id="quantity-brace"),
    pytest.param({"memory": {"limit": "1G{"}}, "is not a memory quantity", id="quantity-trailing-brace"),
    pytest.param({"cpu": {"limit": "{2}"}}, "cpu.limit: '{2}' is not a number", id="cpu-brace"),
    pytest.param({"gpu": {"request": 1, "limit": 2}}, "must be equal", id="gpu-unequal"),
    pytest.param({"gpu": {"limit": 4}}, "gpu: 4 is more than this hub's maximum of 2", id="gpu-max"),
    pytest.param(
        {"json": {"tolerations": [{"operator": "Exists"}]}},
        "a toleration without a key tolerates every taint",
        id="tolerate-all",
    ),
]


@pytest.mark.parametrize(("options", "message"), HOSTILE)
async def test_hostile_options_are_refused_with_a_400_that_says_why(options: dict[str, Any], message: str) -> None:
    spawner = make_spawner(policy())
    with pytest.raises(HTTPError) as raised:
        await start(spawner, options)
    assert raised.value.status_code == 400
    assert message in raised.value.log_message
    # nothing of the refused options was applied
    assert spawner.image == make_spawner(policy()).image
    assert spawner.volumes == [] and spawner.environment == {}


async def test_a_refusal_reads_the_same_in_the_progress_stream_as_in_the_400() -> None:
    """When the start request answered 202 first, the progress stream shows format_exception(error)."""
    with pytest.raises(HTTPError) as raised:
        await start(make_spawner(policy()), {"cpu": {"limit": 64}})
    message, _ = format_exception(raised.value)
    assert message == "cpu.limit: 64 is more than this hub's maximum of 8 cores"


async def test_env_cannot_override_what_the_hub_configuration_sets() -> None:
    config = Config()
    config.KubeSpawner.environment = {"GRANT_SUDO": "no"}
    with pytest.raises(HTTPError, match="env.GRANT_SUDO: is set by the hub's configuration"):
        await start(make_spawner(config), {"env": {"GRANT_SUDO": "yes"}})


def test_a_broken_policy_pattern_is_refused_when_the_spawner_is_configured() -> None:
    config = Config()
    config.LauncherSpawnerMixin.launcher_allowed_images = ["quay.io/(unclosed"]
    with pytest.raises(TraitError, match="launcher_allowed_images: 'quay.io/\\(unclosed' is not a regular expression"):
        make_spawner(config)


async def test_refused_options_leave_the_previous_good_start_out_of_the_next() -> None:
    spawner = make_spawner(policy())
    await start(spawner, FULL)
    with pytest.raises(HTTPError):
        await start(spawner, {"cpu": {"limit": 99}})
    pod = await start(spawner, {})
    assert container(pod).resources.limits == {}
    assert pod.spec.volumes == []


async def test_without_the_hook_start_refuses_before_talking_to_kubernetes() -> None:
    """JupyterHub < 5.3 has no apply_user_options: start() applies, and a refusal fails the spawn."""
    config = policy()
    config.Spawner.apply_user_options = None
    spawner = make_spawner(config)
    spawner.user_options = {"cpu": {"limit": 64}}
    await spawner.run_auth_state_hook(None)
    with pytest.raises(LauncherOptionsError, match="cpu.limit: 64 is more than"):
        spawner.start()

    spawner.user_options = {"image": "quay.io/jupyter/r-notebook:2024-12-09"}
    await spawner.run_auth_state_hook(None)
    spawner.launcher_ensure_applied()
    assert container(await spawner.get_pod_manifest()).image == "quay.io/jupyter/r-notebook:2024-12-09"


async def test_pvc_patterns_use_the_kubespawner_username_slug() -> None:
    pod = await start(
        make_spawner(username="bob.smith@x.org"), {"vols": [{"pvc": make_slug_claim("bob.smith@x.org"), "mount": "/w"}]}
    )
    assert claim(volumes_of(pod)[mounts_of(pod)["/w"][0]]) == make_slug_claim("bob.smith@x.org")


def make_slug_claim(username: str) -> str:
    return "claim-" + make_spawner(username=username)._expand_user_properties("{username}")


async def test_profile_options_are_left_to_kubespawner() -> None:
    config = Config()
    config.KubeSpawner.profile_list = [
        {"display_name": "Small", "slug": "small", "default": True, "kubespawner_override": {"cpu_limit": 1}}
    ]
    spawner = make_spawner(config)
    await start(spawner, {"profile": "small"})
    await spawner.load_user_options()
    assert spawner.cpu_limit == 1


# -- Zero to JupyterHub example -------------------------------------------------------------------


def test_z2jh_example_loads_the_single_file_spawner_with_its_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = yaml.safe_load((ROOT / "examples" / "z2jh-values.yaml").read_text())
    hub = values["hub"]
    assert hub["services"]["launcher"]["apiToken"]
    assert hub["loadRoles"]["launcher"] == {"scopes": ["admin:users", "servers", "tokens"], "services": ["launcher"]}
    assert hub["allowNamedServers"] is True

    # What the chart does: mount the file, then run extraConfig with the hub's `c`.
    mount = Path(hub["extraFiles"]["launcher-spawner"]["mountPath"])
    (tmp_path / mount.name).write_text((ROOT / "consumer" / "spawner.py").read_text())
    monkeypatch.setattr(sys, "path", list(sys.path))
    c = Config()
    exec(compile(hub["extraConfig"]["launcher"], "extraConfig", "exec"), {"c": c})  # noqa: S102 (our own chart values)
    assert sys.path[0] == str(mount.parent)
    assert c.JupyterHub.tornado_settings.get_value({"slow_spawn_timeout": 0}) == {"slow_spawn_timeout": 10}
    module_name, class_name = c.JupyterHub.spawner_class.rsplit(".", 1)
    sys.path[0] = str(tmp_path)  # where this test mounted it
    monkeypatch.delitem(sys.modules, module_name, raising=False)
    with contextlib.ExitStack() as stack:
        stack.callback(sys.modules.pop, module_name, None)
        module = __import__(module_name)
        spawner_class = getattr(module, class_name)
        assert issubclass(spawner_class, kubespawner.KubeSpawner)

        for section, settings in hub["config"].items():
            c[section].update(settings)
        spawner = make_spawner(c, spawner_class=spawner_class)
        assert spawner.launcher_max_memory == 32 * 2**30
        assert spawner.launcher_max_cpu == 8 and spawner.launcher_max_gpu == 2
        assert spawner.launcher_allow_token_in_url is False
        assert sorted(spawner.launcher_allowed_options) == ["default_url", "node_selector", "tolerations"]
        assert set(hub["extraEnv"]) == {"LAUNCHER_SIGNING_KEY"}
        assert hub["namedServerLimitPerUser"] + 1 == spawner.launcher_user_max_servers


async def test_z2jh_example_policy_refuses_and_applies_as_documented() -> None:
    values = yaml.safe_load((ROOT / "examples" / "z2jh-values.yaml").read_text())
    config = Config()
    for section, settings in values["hub"]["config"].items():
        config[section].update(settings)
    spawner = make_spawner(config)
    with pytest.raises(HTTPError, match="maximum of 8 cores"):
        await start(spawner, {"cpu": {"limit": 9}})
    with pytest.raises(HTTPError, match="'nvidia.com/gpu' is for GPU nodes; only a start that asks for GPUs"):
        await start(spawner, {"json": {"tolerations": [GPU_TAINT]}})
    with pytest.raises(HTTPError, match="'node-role.kubernetes.io/control-plane' is not a node label this hub"):
        await start(spawner, {"json": {"node_selector": {"node-role.kubernetes.io/control-plane": ""}}})
    pod = await start(
        spawner,
        {
            "image": "quay.io/jupyter/scipy-notebook:2024-12-09",
            "gpu": {"limit": 1},
            "json": {"tolerations": [GPU_TAINT], "node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100"}},
        },
    )
    assert container(pod).image == "quay.io/jupyter/scipy-notebook:2024-12-09"
    assert [t.key for t in pod.spec.tolerations] == ["nvidia.com/gpu"]
    assert pod.spec.node_selector == {"nvidia.com/gpu.product": "NVIDIA-A100"}


# -- the module itself --------------------------------------------------------------------------

LOADED = "import json, sys; {imports}; print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"


def loaded_modules(imports: str, cwd: Path) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-I", "-c", LOADED.format(imports=imports)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(json.loads(out))


def test_module_loads_without_the_consumer_dependencies_and_kubespawner_only_when_asked() -> None:
    hub_itself = loaded_modules("import jupyterhub.spawner, tornado.web, traitlets", ROOT)
    local = loaded_modules("sys.path.insert(0, '.'); import consumer.spawner as s; s.LocalLauncherSpawner", ROOT)
    assert "kubespawner" not in local
    assert not (local - hub_itself) - {"consumer"}
    kube = loaded_modules("sys.path.insert(0, '.'); from consumer.spawner import KubeLauncherSpawner", ROOT)
    assert "kubespawner" in kube


def test_module_works_as_one_file_outside_the_package(tmp_path: Path) -> None:
    (tmp_path / "launcher_spawner.py").write_text((ROOT / "consumer" / "spawner.py").read_text())
    loaded = loaded_modules(
        "sys.path.insert(0, '.'); from launcher_spawner import KubeLauncherSpawner, LocalLauncherSpawner", tmp_path
    )
    assert "launcher_spawner" in loaded
    assert not loaded & {"consumer", "schemas", "pydantic", "aio_pika"}


async def test_the_readmes_launch_command_runs_against_the_z2jh_example_policy() -> None:
    from schemas import LaunchCommand
    from tests.test_spawner_local import readme_commands

    values = yaml.safe_load((ROOT / "examples" / "z2jh-values.yaml").read_text())
    config = Config()
    for section, settings in values["hub"]["config"].items():
        config[section].update(settings)
    launch = next(c for c in readme_commands() if c["action"] == "launch")
    command = LaunchCommand.model_validate(launch)
    pod = await start(
        make_spawner(config, username=command.username, server_name=command.server_name), command.user_options()
    )
    assert container(pod).image == launch["image"]
    assert container(pod).resources.limits["nvidia.com/gpu"] == "1"
    assert env_of(pod)["COURSE"] == "ml-101"

"""The spawner as the security boundary, against the real KubeSpawner 7.1 ``get_pod_manifest()``.

Each finding of the security review is a test here (the local hub's side is in
``test_spawner_local.py``): options that got past the spawner before, and must not now.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from kubespawner.slugs import safe_slug
from tornado.web import HTTPError
from traitlets.config import Config

from consumer import spawner as spawner_module
from consumer.signing import SIGNATURE_KEY, SignedOptions, signed_options
from tests.test_spawner_kube import (
    GPU_TAINT,
    ROOT,
    claim,
    container,
    env_of,
    make_slug_claim,
    make_spawner,
    mounts_of,
    no_cluster,  # noqa: F401 (autouse fixture: no Kubernetes client)
    no_key_from_the_environment,  # noqa: F401 (autouse fixture)
    start,
    volumes_of,
)

KEY = "k" * 64


def slug_claim(username: str) -> str:
    """KubeSpawner 7's claim name for ``username``'s default server (checked against the spawner below)."""
    return "claim-" + safe_slug(username, max_length=48)


def z2jh_policy() -> Config:
    values = yaml.safe_load((ROOT / "examples" / "z2jh-values.yaml").read_text())
    config = Config()
    for section, settings in values["hub"]["config"].items():
        config[section].update(settings)
    return config


async def refused(spawner: Any, options: dict[str, Any], sent: bool = True) -> str:
    """The 400's message for a start with ``options``."""
    with pytest.raises(HTTPError) as raised:
        await start(spawner, options, sent)
    assert raised.value.status_code == 400
    return str(raised.value.log_message)


# -- signed options: only the launcher applies them ----------------------------------------------


def keyed(config: Config | None = None) -> Config:
    config = config or Config()
    config.LauncherSpawnerMixin.launcher_signing_key = KEY
    config.LauncherSpawnerMixin.launcher_max_cpu = 4
    return config


async def test_signed_options_are_applied_and_stored_without_their_signature() -> None:
    spawner = make_spawner(keyed())
    options = signed_options(KEY, "alice", "", {"cpu": {"limit": 2}, "env": {"COURSE": "x"}})
    assert SIGNATURE_KEY in options
    pod = await start(spawner, options)
    assert container(pod).resources.limits == {"cpu": 2.0}
    assert env_of(pod)["COURSE"] == "x"
    # The model shows what was applied; the launcher's "same options?" check holds however signed.
    assert spawner.user_options == spawner.orm_spawner.user_options == {"cpu": {"limit": 2}, "env": {"COURSE": "x"}}
    assert spawner.orm_spawner.user_options == signed_options(
        KEY, "alice", "", {"cpu": {"limit": 2}, "env": {"COURSE": "x"}}, now=1
    )
    assert spawner.orm_spawner.user_options != signed_options(KEY, "alice", "", {"cpu": {"limit": 1}})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"cpu": {"limit": 4}}, "this hub applies only options signed by its launcher", id="unsigned"),
        pytest.param(
            {"cpu": {"limit": 4}, SIGNATURE_KEY: "v1.1.deadbeef"},
            f"{SIGNATURE_KEY}: is not a launcher signature",
            id="garbage",
        ),
        pytest.param(
            signed_options(KEY, "bob", "", {"cpu": {"limit": 4}}),
            "does not match these options for alice's server ''",
            id="other-user",
        ),
        pytest.param(
            signed_options(KEY, "alice", "gpu", {"cpu": {"limit": 4}}),
            "does not match these options",
            id="other-server",
        ),
        pytest.param(
            {**signed_options(KEY, "alice", "", {"cpu": {"limit": 1}}), "cpu": {"limit": 4}},
            "does not match",
            id="tampered",
        ),
        pytest.param(
            signed_options("another-key", "alice", "", {"cpu": {"limit": 4}}), "does not match", id="other-key"
        ),
        pytest.param(
            signed_options(KEY, "alice", "", {"cpu": {"limit": 4}}, now=time.time() - 3600),
            "s ago; this hub accepts signatures up to 600 s old",
            id="stale",
        ),
        pytest.param(
            signed_options(KEY, "alice", "", {"cpu": {"limit": 4}}, now=time.time() + 3600),
            "s old",
            id="from-the-future",
        ),
    ],
)
async def test_options_without_a_valid_fresh_signature_for_this_user_and_server_are_refused(
    options: dict[str, Any], message: str
) -> None:
    spawner = make_spawner(keyed())
    assert message in await refused(spawner, options)
    assert spawner.cpu_limit is None


async def test_the_key_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAUNCHER_SIGNING_KEY", KEY)
    config = Config()
    config.LauncherSpawnerMixin.launcher_max_cpu = 4
    assert "signed by its launcher" in await refused(make_spawner(config), {"cpu": {"limit": 4}})
    pod = await start(make_spawner(config), signed_options(KEY, "alice", "", {"cpu": {"limit": 4}}))
    assert container(pod).resources.limits == {"cpu": 4.0}


async def test_a_start_without_options_gets_the_defaults_not_the_stored_options() -> None:
    """JupyterHub passes the last start's stored options to a start request that carries none."""
    spawner = make_spawner(keyed())
    await start(spawner, signed_options(KEY, "alice", "", {"cpu": {"limit": 4}, "env": {"COURSE": "x"}}))
    stored = signed_options(KEY, "alice", "", {"cpu": {"limit": 4}}, now=time.time() - 3600)  # stale by now

    pod = await start(spawner, stored, sent=False)

    assert container(pod).resources.limits == {}
    assert "COURSE" not in env_of(pod)
    assert spawner.user_options == spawner.orm_spawner.user_options == {}
    # Posting the same stale set is refused, and so are unsigned options stored by a PATCH or PUT
    # and then posted.
    assert "s old" in await refused(spawner, stored)
    assert "signed by its launcher" in await refused(spawner, {"cpu": {"limit": 4}})
    # Empty options need no signature: anyone may start with the defaults.
    assert container(await start(spawner, {})).resources.limits == {}


class OlderApiRequest:
    """JupyterHub 5's REST API handler: the whole body is the options."""

    def __init__(self, body: dict[str, Any] | None) -> None:
        self.body = body

    def get_json_body(self) -> dict[str, Any] | None:
        return self.body


class PageRequest:
    """The hub's spawn page (``GET /hub/spawn/<user>``): options only from query arguments."""

    def __init__(self, **query: list[bytes]) -> None:
        self.request = SimpleNamespace(method="GET", query_arguments={"next": [b"/"], **query})


@pytest.mark.parametrize(
    ("handler", "applied"),
    [
        pytest.param(OlderApiRequest(None), False, id="jupyterhub-5-api-no-body"),
        pytest.param(OlderApiRequest({}), False, id="jupyterhub-5-api-empty"),
        pytest.param(PageRequest(), False, id="spawn-page"),
        pytest.param(None, True, id="no-request"),
    ],
)
async def test_stored_options_are_not_reused_whichever_way_a_start_without_options_comes(
    handler: Any, applied: bool
) -> None:
    spawner = make_spawner(keyed())
    stored = signed_options(KEY, "alice", "", {"cpu": {"limit": 4}})
    await spawner.run_auth_state_hook(None)
    spawner.handler = handler
    spawner.user_options = spawner.orm_spawner.user_options = stored
    spawner.launcher_apply(stored)
    assert spawner.cpu_limit == (4 if applied else None)
    assert spawner.orm_spawner.user_options == ({"cpu": {"limit": 4}} if applied else {})


async def test_without_a_key_the_spawner_warns_once_that_any_user_can_set_options(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spawner_module.LauncherSpawnerMixin, "_launcher_warned", False)
    with caplog.at_level(logging.WARNING):
        first = make_spawner()
        make_spawner()
    warnings = [r.getMessage() for r in caplog.records if "any user can set options" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "launcher_signing_key" in warnings[0]
    # Without a key, unsigned options are applied, and a signature (from a launcher with a key) is dropped.
    config = Config()
    config.LauncherSpawnerMixin.launcher_max_cpu = 2
    pod = await start(make_spawner(config), signed_options(KEY, "alice", "", {"cpu": {"limit": 2}}))
    assert container(pod).resources.limits == {"cpu": 2.0}
    assert first.launcher_signing_key == ""


def test_signed_options_compare_equal_to_the_same_options_however_signed() -> None:
    options = {"cpu": {"limit": 1}}
    first, later = signed_options(KEY, "a", "", options, now=1), signed_options(KEY, "a", "", options, now=2)
    assert isinstance(first, SignedOptions) and first[SIGNATURE_KEY] != later[SIGNATURE_KEY]
    assert first == later and first == options and options == first
    assert not (first != options) and not (options != first)  # noqa: SIM202 (tests __ne__ itself)
    assert first != {"cpu": {"limit": 2}} and {"cpu": {"limit": 2}} != first
    assert signed_options("", "a", "", options) is options  # no key: unchanged


# -- finding 1: other users' claims ----------------------------------------------------------------


def test_kubespawner_slugs_of_the_findings_users_are_what_the_review_saw() -> None:
    assert make_slug_claim("alice.smith") == "claim-alice-smith---63425827"
    assert make_slug_claim("20231234") == "claim-x-20231234---f630b487"
    for name in ("alice@example.org", "alice_b", "alice+test", "Alice"):
        assert make_slug_claim(name) == slug_claim(name) != "claim-alice"


@pytest.mark.parametrize(
    ("username", "other_claim"),
    [
        pytest.param("alice", "claim-alice-smith---63425827", id="alice.smith"),
        pytest.param("alice", slug_claim("alice@example.org"), id="alice@example.org"),
        pytest.param("alice", slug_claim("alice_b"), id="alice_b"),
        pytest.param("alice", slug_claim("alice+test"), id="alice+test"),
        pytest.param("alice", slug_claim("Alice"), id="Alice"),
        pytest.param("alice", "claim-alice--gpu", id="named-server-claim"),
        pytest.param("x", "claim-x-20231234---f630b487", id="x-reaches-numeric-users"),
    ],
)
async def test_by_default_a_user_mounts_no_other_users_claim(username: str, other_claim: str) -> None:
    message = await refused(make_spawner(username=username), {"vols": [{"pvc": other_claim, "mount": "/other"}]})
    assert f"{other_claim!r} is not a claim this user may mount" in message


@pytest.mark.parametrize("username", ["alice", "alice.smith", "20231234", "Alice"])
async def test_by_default_a_user_mounts_their_own_claim_as_kubespawner_names_it(username: str) -> None:
    spawner = make_spawner(username=username)
    own = spawner.pvc_name  # the claim KubeSpawner makes for this (default) server
    pod = await start(spawner, {"vols": [{"pvc": own, "mount": "/home/jovyan/work"}]})
    assert claim(volumes_of(pod)[mounts_of(pod)["/home/jovyan/work"][0]]) == own


async def test_the_own_claim_follows_the_configured_pvc_name_template_and_serves_named_servers() -> None:
    config = Config()
    config.KubeSpawner.pvc_name_template = "home-{username}"
    user_spawner = make_spawner(config, username="alice.smith", server_name="gpu")
    pod = await start(user_spawner, {"vols": [{"pvc": "home-alice-smith---63425827", "mount": "/w"}]})
    assert claim(volumes_of(pod)[mounts_of(pod)["/w"][0]]) == "home-alice-smith---63425827"
    # With KubeSpawner's default template, a named server mounts the home of the default server.
    named = make_spawner(username="alice.smith", server_name="gpu")
    assert named.pvc_name == "claim-alice-smith---63425827--gpu"
    pod = await start(named, {"vols": [{"pvc": "claim-alice-smith---63425827", "mount": "/w"}]})
    assert claim(volumes_of(pod)[mounts_of(pod)["/w"][0]]) == "claim-alice-smith---63425827"


# -- finding 2: around the GPU maximum ---------------------------------------------------------------


def gpu_policy() -> Config:
    config = Config()
    config.LauncherSpawnerMixin.launcher_max_gpu = 2
    config.LauncherSpawnerMixin.launcher_allowed_options = {
        "tolerations": "tolerations",
        "node_selector": "node_selector",
    }
    config.LauncherSpawnerMixin.launcher_allowed_toleration_keys = [r"nvidia\.com/gpu"]
    config.LauncherSpawnerMixin.launcher_allowed_node_selector_keys = [r"nvidia\.com/gpu\.product"]
    return config


GPU_NODE = {"nvidia.com/gpu.product": "NVIDIA-A100"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(
            {"env": {"NVIDIA_VISIBLE_DEVICES": "all"}, "json": {"tolerations": [GPU_TAINT], "node_selector": GPU_NODE}},
            "env.NVIDIA_VISIBLE_DEVICES: is not a variable this hub lets callers set",
            id="all-gpus-by-env",
        ),
        pytest.param(
            {"gpu": {"limit": 2}, "env": {"NVIDIA_VISIBLE_DEVICES": "all"}, "json": {"tolerations": [GPU_TAINT]}},
            "env.NVIDIA_VISIBLE_DEVICES: is not a variable",
            id="all-gpus-by-env-with-2",
        ),
        pytest.param(
            {"env": {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}}, "env.CUDA_VISIBLE_DEVICES: is not a variable", id="cuda-env"
        ),
        pytest.param(
            {"json": {"tolerations": [GPU_TAINT]}},
            "json.tolerations[0].key: 'nvidia.com/gpu' is for GPU nodes; only a start that asks for GPUs may tolerate it",
            id="gpu-taint-without-gpus",
        ),
        pytest.param(
            {"json": {"node_selector": GPU_NODE}},
            "json.node_selector.nvidia.com/gpu.product: 'nvidia.com/gpu.product' is for GPU nodes",
            id="gpu-node-without-gpus",
        ),
    ],
)
async def test_no_way_around_the_gpu_maximum(options: dict[str, Any], message: str) -> None:
    assert message in await refused(make_spawner(gpu_policy()), options)


async def test_a_gpu_start_may_tolerate_and_select_gpu_nodes() -> None:
    pod = await start(
        make_spawner(gpu_policy()),
        {"gpu": {"limit": 1}, "json": {"tolerations": [GPU_TAINT], "node_selector": GPU_NODE}},
    )
    assert container(pod).resources.limits == {"nvidia.com/gpu": "1"}
    assert [t.key for t in pod.spec.tolerations] == ["nvidia.com/gpu"]
    assert pod.spec.node_selector == GPU_NODE


# -- finding 3: tolerate everything ----------------------------------------------------------------


@pytest.mark.parametrize(
    "config", [pytest.param(z2jh_policy, id="z2jh-example"), pytest.param(gpu_policy, id="built-ins")]
)
@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(
            {"json": {"tolerations": [{"operator": "Exists"}]}},
            "a toleration without a key tolerates every taint",
            id="all",
        ),
        pytest.param(
            {"json": {"tolerations": [{"operator": "Exists", "effect": "NoExecute"}]}},
            "without a key",
            id="all-noexecute",
        ),
        pytest.param(
            {"json": {"tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}},
            "'node-role.kubernetes.io/control-plane' is not a taint this hub lets callers tolerate",
            id="control-plane-taint",
        ),
        pytest.param(
            {"json": {"node_selector": {"node-role.kubernetes.io/control-plane": ""}}},
            "'node-role.kubernetes.io/control-plane' is not a node label this hub lets callers select",
            id="control-plane-node",
        ),
    ],
)
async def test_tolerations_and_node_selectors_are_limited_by_key_also_from_yaml(
    config: Any, options: dict[str, Any], message: str
) -> None:
    assert message in await refused(make_spawner(config()), options)


async def test_built_in_tolerations_allow_no_key_until_the_admin_lists_keys() -> None:
    config = Config()
    config.LauncherSpawnerMixin.launcher_allowed_options = {"tolerations": "tolerations"}
    message = await refused(
        make_spawner(config), {"json": {"tolerations": [{"key": "dedicated", "operator": "Exists"}]}}
    )
    assert "(launcher_allowed_toleration_keys)" in message


# -- finding 4: closed defaults ----------------------------------------------------------------------


def configured_only() -> Config:
    config = Config()
    config.KubeSpawner.image = "quay.io/jupyter/base-notebook:2024-12-09"
    config.KubeSpawner.cpu_limit = 1
    config.KubeSpawner.mem_limit = "1G"
    return config


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(
            {"image": "docker.io/evil/miner:latest"},
            "'docker.io/evil/miner:latest' is not one of the images this hub allows (it runs only its configured image)",
            id="image",
        ),
        pytest.param(
            {"cpu": {"request": 512, "limit": 512}},
            "cpu.request: 512 is more than this hub's maximum of 1 cores",
            id="cpu",
        ),
        pytest.param(
            {"memory": {"limit": "4T"}}, "memory.limit: '4T' is more than this hub's maximum of 1G", id="memory"
        ),
        pytest.param({"gpu": {"limit": 64}}, "gpu: this hub gives callers no GPUs", id="gpu"),
    ],
)
async def test_without_launcher_maxima_the_configured_values_are_the_most_a_caller_gets(
    options: dict[str, Any], message: str
) -> None:
    assert message in await refused(make_spawner(configured_only()), options)


async def test_a_caller_may_ask_for_the_configured_image_and_less_than_the_configured_limits() -> None:
    pod = await start(
        make_spawner(configured_only()),
        {"image": "quay.io/jupyter/base-notebook:2024-12-09", "cpu": {"limit": 0.5}, "memory": {"limit": "512M"}},
    )
    assert container(pod).resources.limits == {"cpu": 0.5, "memory": 512 * 2**20}


async def test_with_no_configured_limit_callers_cannot_choose_it() -> None:
    assert "this hub sets no CPU maximum" in await refused(make_spawner(), {"cpu": {"limit": 1}})
    assert "this hub sets no memory maximum" in await refused(make_spawner(), {"memory": {"limit": "1G"}})


async def test_a_configured_gpu_limit_is_the_gpu_maximum() -> None:
    config = Config()
    config.KubeSpawner.extra_resource_limits = {"nvidia.com/gpu": "1"}
    assert "gpu: 2 is more than this hub's maximum of 1" in await refused(make_spawner(config), {"gpu": {"limit": 2}})


# -- finding 5: per-user totals across named servers -----------------------------------------------


def totals() -> Config:
    config = Config()
    config.LauncherSpawnerMixin.launcher_max_cpu = 8
    config.LauncherSpawnerMixin.launcher_max_memory = "32G"
    config.LauncherSpawnerMixin.launcher_max_gpu = 2
    config.LauncherSpawnerMixin.launcher_user_max_servers = 3
    config.LauncherSpawnerMixin.launcher_user_max_cpu = 16
    config.LauncherSpawnerMixin.launcher_user_max_memory = "48G"
    config.LauncherSpawnerMixin.launcher_user_max_gpu = 2
    return config


async def running(user: Any, name: str, options: dict[str, Any]) -> Any:
    """One of the user's servers, started with ``options`` and now starting (active)."""
    server = make_spawner(totals(), server_name=name, user=user)
    await start(server, options)
    server._spawn_pending = True  # JupyterHub's own flag while a spawn is pending
    return server


async def test_six_named_servers_at_the_maximum_are_refused_by_the_per_user_totals() -> None:
    first = make_spawner(totals(), server_name="s1")
    user = first.user
    big = {"cpu": {"limit": 6}, "memory": {"limit": "16G"}, "gpu": {"limit": 1}}
    await start(first, big)
    first._spawn_pending = True
    await running(user, "s2", big)

    third = make_spawner(totals(), server_name="s3", user=user)
    assert (
        "cpu: 12 cores on alice's other active servers ('s1', 's2') and 5 cores on this one are more than"
        in await refused(third, {"cpu": {"limit": 5}})
    )
    small = {"cpu": {"limit": 1}, "memory": {"limit": "1G"}}
    assert (
        "gpu: 2 GPUs on alice's other active servers ('s1', 's2') and 1 GPUs on this one are more than"
        in await refused(third, {**small, "gpu": {"limit": 1}})
    )
    # No memory limit asked for or configured: this one counts as the per-server maximum (32G).
    assert (
        "memory: 32G on alice's other active servers ('s1', 's2') and 32G on this one are more than this hub's per-user total of 48G"
        in await refused(third, {"cpu": {"limit": 1}})
    )
    await running(user, "s3", {"cpu": {"request": 0.5, "limit": 0.5}, "memory": {"limit": "1G"}})
    fourth = make_spawner(totals(), server_name="s4", user=user)
    assert (
        "servers: alice already has 3 active servers ('s1', 's2', 's3'); this hub allows 3 per user"
        in await refused(fourth, {})
    )

    first._spawn_pending = False  # stopped: no longer counted
    pod = await start(fourth, {"cpu": {"limit": 7}, "memory": {"limit": "8G"}})
    assert container(pod).resources.limits == {"cpu": 7.0, "memory": 8 * 2**30}


async def test_a_server_without_a_limit_counts_as_the_per_server_maximum() -> None:
    config = totals()
    config.LauncherSpawnerMixin.launcher_user_max_cpu = 12
    first = make_spawner(config, server_name="s1")
    await start(first, {"memory": {"limit": "1G"}})  # no CPU limit configured or asked for: counts as 8
    first._spawn_pending = True
    second = make_spawner(config, server_name="s2", user=first.user)
    message = await refused(second, {"cpu": {"limit": 5}, "memory": {"limit": "1G"}})
    assert (
        "cpu: 8 cores on alice's other active servers ('s1') and 5 cores on this one are more than this hub's per-user total of 12 cores"
        in message
    )
    await start(second, {"cpu": {"limit": 4}, "memory": {"limit": "1G"}})  # 8 + 4: at the total, not over it


# -- finding 6: // mount paths ---------------------------------------------------------------------


def admin_mounts() -> Config:
    config = Config()
    config.KubeSpawner.volumes = [
        {"name": "jupyter-config", "configMap": {"name": "user-config"}},
        {"name": "shared", "persistentVolumeClaim": {"claimName": "shared", "readOnly": True}},
    ]
    config.KubeSpawner.volume_mounts = [
        {"name": "jupyter-config", "mountPath": "/etc/jupyter"},
        {"name": "shared", "mountPath": "/home/jovyan/shared", "readOnly": True},
    ]
    return config


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        pytest.param("//home/jovyan/shared", "/home/jovyan/shared is already mounted", id="leading-double-slash"),
        pytest.param("/home//jovyan/./shared/", "/home/jovyan/shared is already mounted", id="inner-double-slash"),
        pytest.param("//etc/jupyter", "/etc/jupyter is already mounted", id="admin-configmap"),
    ],
)
async def test_mount_paths_are_compared_after_full_normalisation(mount: str, message: str) -> None:
    assert message in await refused(make_spawner(admin_mounts()), {"vols": [{"pvc": "claim-alice", "mount": mount}]})


async def test_the_pod_gets_the_normalised_mount_path() -> None:
    pod = await start(make_spawner(admin_mounts()), {"vols": [{"pvc": "claim-alice", "mount": "//home//jovyan/work/"}]})
    assert "/home/jovyan/work" in mounts_of(pod)


# -- finding 7: full matches -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"env": {"MEM_LIMIT\n": "1"}}, "is not a valid environment variable name", id="env-name"),
        pytest.param({"json": {"node_selector": {"gpu-type\n": "a100"}}}, "is not a label key", id="label-key"),
        pytest.param({"json": {"node_selector": {"gpu-type": "a100\n"}}}, "is not a label value", id="label-value"),
        pytest.param(
            {"json": {"tolerations": [{"key": "gpu-type", "operator": "Equal", "value": "x\n"}]}},
            "is not a taint value",
            id="taint-value",
        ),
        pytest.param(
            {"json": {"tolerations": [{"key": "gpu-type\n", "operator": "Exists"}]}},
            "is not a taint key",
            id="taint-key",
        ),
        pytest.param({"vols": [{"pvc": "claim-alice\n", "mount": "/w"}]}, "is not a PVC name", id="pvc"),
        pytest.param({"image": "quay.io/jupyter/base-notebook:2024-12-09\n"}, "is not an image name", id="image"),
    ],
)
async def test_a_trailing_newline_gets_past_no_pattern(options: dict[str, Any], message: str) -> None:
    config = gpu_policy()
    config.LauncherSpawnerMixin.launcher_allowed_node_selector_keys = ["gpu-type"]
    config.LauncherSpawnerMixin.launcher_allowed_toleration_keys = ["gpu-type"]
    config.LauncherSpawnerMixin.launcher_allowed_images = [r"quay\.io/jupyter/.+"]
    assert message in await refused(make_spawner(config), options)


# -- finding 8: profiles as KubeSpawner 7.1 reads them ----------------------------------------------


def profiles() -> Config:
    """A profile option named ``image``, as in the Zero to JupyterHub docs."""
    config = Config()
    config.LauncherSpawnerMixin.launcher_allowed_images = [r"quay\.io/jupyter/.+"]
    config.KubeSpawner.profile_list = [
        {
            "display_name": "Data science",
            "slug": "datascience",
            "default": True,
            "profile_options": {
                "image": {
                    "display_name": "Image",
                    "choices": {
                        "scipy": {
                            "display_name": "SciPy",
                            "kubespawner_override": {"image": "quay.io/jupyter/scipy-notebook:2024-12-09"},
                        },
                        "r": {
                            "display_name": "R",
                            "kubespawner_override": {"image": "quay.io/jupyter/r-notebook:2024-12-09"},
                        },
                    },
                },
                "size": {
                    "display_name": "Size",
                    "choices": {
                        "small": {"display_name": "Small", "kubespawner_override": {"cpu_limit": 1}},
                        "large": {"display_name": "Large", "kubespawner_override": {"cpu_limit": 4}},
                    },
                    "unlisted_choice": {
                        "enabled": True,
                        "validation_regex": "[0-9]",
                        "kubespawner_override": {"mem_limit": "{value}G"},
                    },
                },
            },
        },
        {"display_name": "Plain", "slug": "plain"},
    ]
    return config


async def test_the_launchers_image_is_refused_clearly_where_a_profile_option_is_named_image() -> None:
    message = await refused(make_spawner(profiles()), {"image": "quay.io/jupyter/r-notebook:2024-12-09"})
    assert "profile 'datascience' has an option named 'image'" in message
    # With a profile that has no such option, the launcher's image is the image.
    spawner = make_spawner(profiles())
    pod = await start(spawner, {"profile": "plain", "image": "quay.io/jupyter/r-notebook:2024-12-09"})
    await spawner.load_user_options()
    assert spawner.image == "quay.io/jupyter/r-notebook:2024-12-09"
    assert container(pod).image == "quay.io/jupyter/r-notebook:2024-12-09"


async def test_profile_choices_use_the_keys_kubespawner_reads() -> None:
    spawner = make_spawner(profiles())
    await start(spawner, {"profile": "datascience", "size": "large"})
    await spawner.load_user_options()
    assert spawner.cpu_limit == 4
    assert spawner.image == "quay.io/jupyter/scipy-notebook:2024-12-09"  # the option's default choice

    spawner = make_spawner(profiles())
    await start(spawner, {"size--unlisted-choice": "2"})
    await spawner.load_user_options()
    assert spawner.mem_limit == 2 * 2**30


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(
            {"profile": "gpu"},
            "profile: 'gpu' is not one of this hub's profiles (datascience, plain)",
            id="unknown-profile",
        ),
        pytest.param(
            {"size": "huge"},
            "size: 'huge' is not a choice of profile 'datascience' (small, large)",
            id="unknown-choice",
        ),
        pytest.param({"size--unlisted-choice": "2; rm"}, "does not match '[0-9]'", id="unlisted-prefix-match"),
        pytest.param(
            {"profile-option-datascience--size": "large"},
            "unknown option 'profile-option-datascience--size'",
            id="form-field-name",
        ),
        pytest.param({"profile": "plain", "size": "large"}, "unknown option 'size'", id="option-of-another-profile"),
    ],
)
async def test_profile_keys_kubespawner_would_not_read_or_would_fail_on_are_refused(
    options: dict[str, Any], message: str
) -> None:
    assert message in await refused(make_spawner(profiles()), options)


async def test_profiles_on_a_hub_without_them_are_refused() -> None:
    assert "profile: this hub has no profiles" in await refused(make_spawner(), {"profile": "small"})


# -- root in the container ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "GRANT_SUDO",
        "NB_UID",
        "NB_GID",
        "NB_USER",
        "CHOWN_EXTRA",
        "CHOWN_HOME",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "PATH",
        "BASH_ENV",
        "ENV",
        "NVIDIA_VISIBLE_DEVICES",
        "CUDA_VISIBLE_DEVICES",
        "DOCKER_STACKS_JUPYTER_CMD",
        "JUPYTER_CONFIG_DIR",
        "http_proxy",
    ],
)
async def test_variables_that_give_root_in_the_container_are_refused_by_default(name: str) -> None:
    assert f"env.{name}: is not a variable this hub lets callers set" in await refused(
        make_spawner(), {"env": {name: "0"}}
    )


@pytest.mark.parametrize(
    "mount",
    [
        "/usr/local/bin/before-notebook.d",
        "/usr/local/bin/start-notebook.d",
        "/etc/sudoers.d",
        "/opt/conda/lib",
        "/root",
        "//usr/local/bin",
    ],
)
async def test_mounts_over_system_directories_are_refused_by_default(mount: str) -> None:
    message = await refused(make_spawner(), {"vols": [{"pvc": "claim-alice", "mount": mount}]})
    assert "is not a path this hub lets callers mount at" in message


async def test_an_admin_may_allow_a_variable_by_name() -> None:
    config = Config()
    config.LauncherSpawnerMixin.launcher_allowed_env = [spawner_module.DEFAULT_ALLOWED_ENV, "CUDA_VISIBLE_DEVICES"]
    pod = await start(make_spawner(config), {"env": {"CUDA_VISIBLE_DEVICES": "0", "COURSE": "x"}})
    assert env_of(pod)["CUDA_VISIBLE_DEVICES"] == "0" and env_of(pod)["COURSE"] == "x"

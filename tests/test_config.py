"""Configuration: one model from YAML and the environment, with clear start-up errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from consumer.cli import CHATTY_LOGGERS, configure_logging, main
from consumer.config import ConfigError, Settings, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_match_the_older_worker_and_the_issue(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ""), environ={})
    assert settings.jupyterhub_api_prefix == "/hub/api"
    assert settings.user_token_lifetime == 1800
    assert settings.status_check_interval == 2 and settings.status_check_count == 150
    assert settings.amqp_url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/"
    assert (settings.command_queue, settings.reply_exchange, settings.events_exchange) == (
        "launcher.commands",
        "launcher.replies",
        "launcher.events",
    )
    assert (settings.max_concurrency, settings.launch_timeout, settings.shutdown_grace) == (100, 300, 30)
    assert settings.public_url == "http://127.0.0.1:8000"
    assert settings.dead_letter_queue == "launcher.commands.dead"


def test_environment_overrides_the_file_and_launcher_variables_win(tmp_path: Path) -> None:
    path = write(tmp_path, "jupyterhub_url: http://hub:8000\njupyterhub_api_token: from-file\nmax_concurrency: 5\n")
    settings = load_settings(
        path,
        environ={
            "JUPYTERHUB_API_TOKEN": "from-hub",
            "JUPYTERHUB_API_URL": "http://10.0.0.1:8081/jhub/hub/api",
            "LAUNCHER_MAX_CONCURRENCY": "7",
            "LAUNCHER_JUPYTERHUB_PUBLIC_URL": "https://hub.example.org/",
        },
    )
    assert settings.jupyterhub_api_token.get_secret_value() == "from-hub"
    assert settings.hub_api_url == "http://10.0.0.1:8081/jhub/hub/api"
    assert settings.max_concurrency == 7
    assert settings.public_url == "https://hub.example.org"
    overridden = load_settings(path, environ={"JUPYTERHUB_API_TOKEN": "a", "LAUNCHER_JUPYTERHUB_API_TOKEN": "b"})
    assert overridden.jupyterhub_api_token.get_secret_value() == "b"


def test_older_workers_keys_load_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(
        tmp_path, "host: 0.0.0.0\nport: 5000\ndebug: true\njupyterhub_service_prefix: /services/x\nlog_level: 10\n"
    )
    with caplog.at_level(logging.WARNING):
        settings = load_settings(path, environ={})
    assert settings.log_level == logging.DEBUG
    assert {"'host'", "'port'", "'debug'", "'jupyterhub_service_prefix'"} <= {
        word for record in caplog.records for word in record.getMessage().split()
    }


@pytest.mark.parametrize(
    ("text", "environ", "named"),
    [
        ("no_such_key: 1\n", {}, "no_such_key"),
        ("max_concurrency: many\n", {}, "max_concurrency"),
        ("launch_timeout: -1\n", {}, "launch_timeout"),
        ("log_level: LOUD\n", {}, "log_level"),
        ("jupyterhub_url: not a url\n", {}, "jupyterhub_url"),
        ("", {"LAUNCHER_NO_SUCH": "1"}, "LAUNCHER_NO_SUCH"),
        ("- a list\n", {}, "mapping"),
    ],
)
def test_a_bad_key_or_value_is_a_start_up_error_naming_it(tmp_path: Path, text: str, environ: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(write(tmp_path, text), environ=environ)


def test_log_level_takes_names_and_numbers(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "log_level: warning\n"), environ={}).log_level == logging.WARNING
    assert load_settings(write(tmp_path, "log_level: '20'\n"), environ={}).log_level == logging.INFO


def test_secrets_do_not_show_in_the_settings_repr_or_errors(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, "jupyterhub_api_token: s3cret-token\namqp_url: amqp://u:s3cret-pw@h/\n"), environ={}
    )
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, "jupyterhub_api_token: [s3cret-token]\n"), environ={})
    assert "s3cret" not in str(caught.value)


def test_the_amqp_loggers_never_go_below_info_where_they_would_dump_bodies() -> None:
    configure_logging(Settings(log_level=logging.DEBUG))
    try:
        assert all(logging.getLogger(name).getEffectiveLevel() == logging.INFO for name in CHATTY_LOGGERS)
        assert logging.getLogger("consumer").getEffectiveLevel() == logging.DEBUG
    finally:
        logging.getLogger().setLevel(logging.WARNING)


def test_cli_exits_2_with_the_error_for_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", str(write(tmp_path, "max_concurrency: 0\n"))]) == 2
    assert "max_concurrency" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_the_cli_freezes_what_start_up_made_out_of_the_collectors_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    from consumer import service

    seen: dict[str, int] = {}

    async def serve(settings: Settings) -> None:
        seen["frozen"] = gc.get_freeze_count()

    monkeypatch.setattr(service, "serve", serve)
    try:
        assert main(["run", "--config", str(write(tmp_path, "log_level: WARNING\n"))]) == 0
    finally:
        gc.unfreeze()
        logging.getLogger().setLevel(logging.WARNING)
    # Modules, classes and schemas: tens of thousands of objects a full collection no longer walks.
    assert seen["frozen"] > 10_000, seen

"""config.yaml and policy files: what is read, what overrides it, and how a mistake is reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.core.config import load_settings
from proxy.core.errors import ConfigError
from proxy.core.policy import Action
from tests.support import REPO

REPO_CONFIG = REPO / "config.yaml"


def write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def config_error(path: Path, **overrides: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={}, **overrides)
    return caught.value.message


def test_the_shipped_config_loads_its_three_policies() -> None:
    settings = load_settings(REPO_CONFIG, env={})

    assert set(settings.policies) == {"default", "strict", "permissive"}
    assert settings.policy().name == "default"
    assert settings.policy().holdback_tokens == 24
    assert settings.policy().detectors.marker.enabled
    assert settings.policy("permissive").action_for("anything") is Action.TRUNCATE
    assert settings.upstream.url is None  # the built-in demo upstream
    assert settings.redis_url is None


def test_no_config_file_means_the_defaults_with_a_marker_policy() -> None:
    settings = load_settings(None, env={})

    assert list(settings.policies) == ["default"]
    assert settings.policy().detectors.marker.enabled
    assert settings.server.port == 8080


def test_paths_are_relative_to_the_config_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "deploy" / "rules" / "calm.yaml", {"holdback_tokens": 7})
    config = write(
        tmp_path / "deploy" / "config.yaml",
        {"policies": {"calm": "rules/calm.yaml"}, "default_policy": "calm", "guard": {"checkpoint": "ckpt"}},
    )
    monkeypatch.chdir(tmp_path)

    settings = load_settings(Path("deploy/config.yaml"), env={})

    assert settings.policy().holdback_tokens == 7
    assert settings.policy().name == "calm"
    assert settings.guard_checkpoint is not None
    assert settings.guard_checkpoint.resolve() == (tmp_path / "deploy" / "ckpt").resolve()
    assert config.exists()


def test_backtrack_redis_url_overrides_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "config.yaml", {"redis": {"url": "redis://from-config:6379/0"}})

    assert load_settings(config, env={}).redis_url == "redis://from-config:6379/0"
    assert load_settings(config, env={"BACKTRACK_REDIS_URL": "redis://env:6379/1"}).redis_url == (
        "redis://env:6379/1"
    )
    monkeypatch.setenv("BACKTRACK_REDIS_URL", "redis://process-env:6379/2")
    assert load_settings(config).redis_url == "redis://process-env:6379/2"


def test_command_line_upstream_host_and_port_override_the_config(tmp_path: Path) -> None:
    config = write(
        tmp_path / "config.yaml",
        {
            "server": {"host": "0.0.0.0", "port": 9000},
            "upstream": {"url": "http://config:1/", "api_key": "k"},
        },
    )

    settings = load_settings(config, upstream="http://cli:2/", port=9001, env={})

    assert settings.upstream.url == "http://cli:2"  # the root, without a trailing slash
    assert settings.upstream.key() == "k"  # the rest of the upstream section stays
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 9001)
    assert load_settings(config, env={}).upstream.url == "http://config:1"


def test_an_upstream_that_is_not_a_url_is_reported_as_the_command_line_option(tmp_path: Path) -> None:
    config = write(tmp_path / "config.yaml", {})

    message = config_error(config, upstream="localhost:8000")

    assert (
        message
        == "--upstream: 'url' has value 'localhost:8000'. Value error, must start with http:// or https://"
    )


def test_the_upstream_key_can_come_from_an_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path / "config.yaml", {"upstream": {"api_key_env": "UPSTREAM_KEY"}})
    settings = load_settings(config, env={})

    assert settings.upstream.key() is None
    monkeypatch.setenv("UPSTREAM_KEY", "sk-from-env")
    assert settings.upstream.key() == "sk-from-env"
    assert "sk-from-env" not in repr(settings)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"servr": {"port": 1}}, "'servr' Extra inputs are not permitted"),
        ({"server": {"prot": 1}}, "'server.prot' has value 1. Extra inputs are not permitted"),
        ({"server": {"port": "eighty"}}, "'server.port' has value 'eighty'. Input should be a valid integer"),
        (
            {"server": {"port": 70000}},
            "'server.port' has value 70000. Input should be less than or equal to 65535",
        ),
        ({"server": {"max_body_bytes": 10}}, "'server.max_body_bytes' has value 10. Input should be greater"),
        (
            {"upstream": {"read_timeout_seconds": 0}},
            "'upstream.read_timeout_seconds' has value 0. Input should",
        ),
        (
            {"upstream": {"url": "ftp://x"}},
            "'upstream.url' has value 'ftp://x'. Value error, must start with http",
        ),
        (
            {"policies": ["default.yaml"]},
            "'policies' has value ['default.yaml']. Input should be a valid dict",
        ),
    ],
)
def test_a_config_mistake_names_the_file_the_key_the_value_and_why(
    tmp_path: Path, data: dict[str, object], expected: str
) -> None:
    config = write(tmp_path / "config.yaml", data)

    message = config_error(config)

    assert message.startswith(f"{config}: {expected}")


def test_every_mistake_in_a_config_is_reported_at_once(tmp_path: Path) -> None:
    config = write(tmp_path / "config.yaml", {"server": {"port": -1, "host": 7}})

    lines = config_error(config).splitlines()

    assert len(lines) == 2
    assert all(line.startswith(f"{config}: 'server.") for line in lines)


def test_an_unknown_default_policy_lists_the_known_ones(tmp_path: Path) -> None:
    write(tmp_path / "p" / "calm.yaml", {})
    config = write(tmp_path / "config.yaml", {"policies": {"calm": "p/calm.yaml"}, "default_policy": "stern"})

    assert (
        config_error(config) == f"{config}: 'default_policy' has value 'stern'. Not one of the policies: calm"
    )


def test_a_config_that_is_not_a_mapping_or_not_yaml_is_reported(tmp_path: Path) -> None:
    listed = write(tmp_path / "list.yaml", "- server\n- upstream\n")
    broken = write(tmp_path / "broken.yaml", "server: {port: 1\n")

    assert config_error(listed) == f"{listed}: the config must be a mapping of keys to values"
    assert config_error(broken).startswith(f"{broken}: not valid YAML")
    assert config_error(tmp_path / "missing.yaml").startswith(f"{tmp_path / 'missing.yaml'}: cannot read")


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            {"holdback_tokens": -1},
            "'holdback_tokens' has value -1. Input should be greater than or equal to 0",
        ),
        ({"holdback_tokens": "many"}, "'holdback_tokens' has value 'many'. Input should be a valid integer"),
        ({"threshold": 1.5}, "'threshold' has value 1.5. Input should be less than 1"),
        ({"holdbak_tokens": 8}, "'holdbak_tokens' has value 8. Extra inputs are not permitted"),
        (
            {"actions": {"default": "explode"}},
            "'actions.default' has value 'explode'. Input should be 'refuse',",
        ),
        (
            {"actions": {"violence": "refuse"}},
            "'actions' Value error, must have a 'default' entry",
        ),
        (
            {"actions": {"default": "continue"}},
            "'actions' Value error, 'continue' is only for 'upstream_reset', not for 'default'",
        ),
        ({"fail_mode": "sideways"}, "'fail_mode' has value 'sideways'. Input should be 'open' or 'closed'"),
        ({"detectors": {"patterns": [{"category": "x", "regex": ["("]}]}}, "'detectors.patterns.0.regex'"),
        (
            {"detectors": {"patterns": [{"words": ["bomb"]}]}},
            "'detectors.patterns.0.category' Field required",
        ),
    ],
)
def test_a_policy_mistake_names_the_policy_file_the_key_the_value_and_why(
    tmp_path: Path, policy: dict[str, object], expected: str
) -> None:
    policy_file = write(tmp_path / "policies" / "mine.yaml", policy)
    config = write(
        tmp_path / "config.yaml", {"policies": {"mine": "policies/mine.yaml"}, "default_policy": "mine"}
    )

    message = config_error(config)

    assert message.startswith(f"{policy_file}: {expected}")


def test_a_missing_policy_file_is_named(tmp_path: Path) -> None:
    config = write(
        tmp_path / "config.yaml", {"policies": {"gone": "policies/gone.yaml"}, "default_policy": "gone"}
    )

    assert config_error(config).startswith(f"{tmp_path / 'policies' / 'gone.yaml'}: cannot read")

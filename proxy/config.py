"""Settings: `config.yaml`, validated into frozen objects. Paths in it are relative to the file.

server:   host, port, body size limit
upstream: the LLM server's root URL (or none: the built-in demo upstream), its key, timeouts
guard:    the guard model's checkpoint and batching
policies: name -> policy file; `default_policy` names the one used when nothing selects another
redis:    url (BACKTRACK_REDIS_URL overrides it); none = in-memory state
admin:    the environment variable holding the admin token
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator

from proxy.errors import ConfigError
from proxy.policy import Policy, _Frozen, load_policy, parse_model, read_yaml


class ServerConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)


class UpstreamConfig(_Frozen):
    url: str | None = None  # None: serve in front of the built-in demo upstream
    api_key: SecretStr | None = None  # when set, replaces the client's Authorization
    api_key_env: str | None = None  # or: the environment variable holding it
    connect_timeout_seconds: float = Field(10.0, gt=0)
    read_timeout_seconds: float = Field(120.0, gt=0)  # longest silence between two upstream chunks

    @field_validator("url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value

    def key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None


class GuardConfig(_Frozen):
    checkpoint: str | None = None  # None: the checkpoint bundled in guard/checkpoint
    base: str | None = None  # the base model folder; None: the one the checkpoint names
    max_batch_tokens: int = Field(2048, ge=1)
    queue_size: int = Field(4096, ge=1)


class RedisConfig(_Frozen):
    url: str | None = None


class AdminConfig(_Frozen):
    token_env: str = "BACKTRACK_ADMIN_TOKEN"


class ConfigFile(_Frozen):
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    guard: GuardConfig = GuardConfig()
    policies: dict[str, str] = Field(default_factory=dict)
    default_policy: str = "default"
    redis: RedisConfig = RedisConfig()
    admin: AdminConfig = AdminConfig()


@dataclass(frozen=True)
class Settings:
    """Everything `create_app` needs, resolved: policies loaded, paths absolute, overrides applied."""

    path: Path | None
    server: ServerConfig
    upstream: UpstreamConfig
    guard: GuardConfig
    policies: dict[str, Policy]
    default_policy: str
    redis_url: str | None
    admin: AdminConfig
    guard_checkpoint: Path | None

    def policy(self, name: str | None = None) -> Policy:
        return self.policies[name or self.default_policy]

    @property
    def needs_model(self) -> bool:
        return any(p.detectors.model.enabled for p in self.policies.values())


def load_settings(
    path: Path | None,
    *,
    host: str | None = None,
    port: int | None = None,
    upstream: str | None = None,
    env: dict[str, str] | None = None,
) -> Settings:
    """Read and validate `path` (None: built-in defaults with a marker-only policy)."""
    env = dict(os.environ) if env is None else env
    data: Any = {} if path is None else read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    cfg = parse_model(ConfigFile, data, str(path or "<defaults>"))
    base = path.parent if path is not None else Path.cwd()

    policies: dict[str, Policy] = {}
    for name, rel in cfg.policies.items():
        policy = load_policy(base / rel)
        policies[name] = policy.model_copy(update={"name": name}) if policy.name != name else policy
    if not policies:
        policies["default"] = Policy(name="default")
    if cfg.default_policy not in policies:
        raise ConfigError(
            f"{path}: 'default_policy' has value {cfg.default_policy!r}. "
            f"Not one of the policies: {', '.join(sorted(policies))}"
        )

    server = cfg.server.model_copy(
        update={k: v for k, v in (("host", host), ("port", port)) if v is not None}
    )
    up = cfg.upstream
    if upstream is not None:
        up = parse_model(UpstreamConfig, {**up.model_dump(), "url": upstream}, "--upstream")
    checkpoint = base / cfg.guard.checkpoint if cfg.guard.checkpoint else None
    return Settings(
        path=path,
        server=server,
        upstream=up,
        guard=cfg.guard,
        policies=policies,
        default_policy=cfg.default_policy,
        redis_url=env.get("BACKTRACK_REDIS_URL") or cfg.redis.url,
        admin=cfg.admin,
        guard_checkpoint=checkpoint,
    )

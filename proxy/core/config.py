"""Settings: `config.yaml`, validated into frozen objects. Paths in it are relative to the file.

server:   host, port, body size limit, and the /playground page (off unless `playground: true`)
upstream: the LLM server's root URL (or none: the built-in demo upstream), its key, timeouts
guard:    the guard model's checkpoint and batching
policies: name -> policy file; `default_policy` names the one used when nothing selects another
tenants:  proxy API keys (as sha256 digests), each with its policy, rules and the policies it may ask for
rules:    model and route globs -> policy (see `proxy.core.selection` for the precedence)
reload:   how often the config and policy files are checked for changes
redis:    url (BACKTRACK_REDIS_URL overrides it; none = in-memory state), key prefix, audit bounds
admin:    the environment variable holding the admin token

A reload (`proxy.server.reload`) re-reads the file and takes the policies and the selection (`PolicySet`); the
other sections are read once, at start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator

from proxy.core.errors import ConfigError
from proxy.core.policy import Policy, _Frozen, load_policy, parse_model, read_yaml
from proxy.core.selection import PolicySet, Rule, Tenant


class ServerConfig(_Frozen):
    """Where the proxy listens, and what one client may hold of it.

    The timeouts bound clients that hold connections without making progress (slowloris, a client that
    stops reading); the stream caps bound an upstream that never stops. A stream cut by a cap or by the
    shutdown ends with an in-band error in its dialect's format.
    """

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # From a connection's first byte (or a kept-alive connection's next) to the end of the request head.
    header_timeout_seconds: float = Field(10.0, gt=0)
    # Reading the request body once its head is in.
    body_timeout_seconds: float = Field(30.0, gt=0)
    # An idle kept-alive connection is closed after this long (aiohttp's run_app default).
    keepalive_timeout_seconds: float = Field(75.0, gt=0)
    # A client whose reading stalls this long (writes paused, nothing drained) is dropped; its
    # upstream request is closed.
    write_timeout_seconds: float = Field(30.0, gt=0)
    # One stream's upstream bytes, and its age; the same 64 MiB bounds a non-streamed upstream answer.
    max_stream_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_stream_seconds: float = Field(3600.0, gt=0)
    # After SIGTERM, streams get this long to finish, then end in-band. Below Kubernetes' default
    # terminationGracePeriodSeconds of 30, so the in-band error goes out before a SIGKILL.
    shutdown_grace_seconds: float = Field(25.0, ge=0)
    # Processes serving the one port (`backtrack serve --workers` overrides it); each loads its own
    # guard, so memory grows with it. See `proxy.cli.workers`.
    workers: int = Field(1, ge=1, le=256)
    # The /playground page and its debug channel (held text and per-verdict scores, for the page only).
    # Off by default: a demo and debugging aid, not for a proxy that serves clients it does not trust.
    playground: bool = False
    # `auto`: uvloop when it is installed (requirements.txt has it), else asyncio's own loop. Most of a
    # relayed chunk's cost is the loop's polling and socket calls, which uvloop makes cheaper.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"


class UpstreamConfig(_Frozen):
    url: str | None = None  # None: serve in front of the built-in demo upstream
    api_key: SecretStr | None = None  # when set, replaces the client's Authorization
    api_key_env: str | None = None  # or: the environment variable holding it
    connect_timeout_seconds: float = Field(10.0, gt=0)
    read_timeout_seconds: float = Field(120.0, gt=0)  # longest silence between two upstream chunks
    # The longest SSE or NDJSON line the proxy buffers; past it the stream ends with an in-band error.
    max_line_bytes: int = Field(1024 * 1024, ge=1024)

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


class ScorerConfig(_Frozen):
    checkpoint: str | None = None  # None: the checkpoint bundled in guard/checkpoint
    base: str | None = None  # the base model folder; None: the one the checkpoint names
    max_batch_tokens: int = Field(2048, ge=1)
    queue_size: int = Field(4096, ge=1)
    # bf16: the guard's matmuls in bfloat16, ~2x faster on a CPU with bfloat16 instructions (avx512_bf16,
    # AMX) but slower than fp32 on one without; decisions match fp32 on 99.9% of dev rows. fp32: the
    # reference. int8: as fast, but 4% of dev decisions differ (README: The guard model).
    precision: Literal["fp32", "bf16", "int8"] = "bf16"
    # torch threads for the guard's forward pass. 1: the event loop keeps the other core of two; at 32
    # streams x 50 tokens/s the passes just grow to absorb the load. None: one per core.
    threads: int | None = Field(1, ge=1)


# One server (TLS: rediss), Sentinel, Cluster; `proxy.state.redis_url` reads the rest of the URL.
REDIS_SCHEMES = (
    "redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster",
)  # fmt: skip


class RedisConfig(_Frozen):
    url: str | None = None
    # Keys and channels start with it: replicas that share it share state; tests keep apart by it.
    prefix: str = Field("backtrack", pattern=r"^[A-Za-z0-9_.:-]+$")
    audit_maxlen: int = Field(100_000, ge=100)  # the audit stream keeps about this many events
    # Audit events held in memory while Redis is unreachable; past it the oldest are dropped (counted).
    spool_size: int = Field(10_000, ge=1)
    health_seconds: float = Field(1.0, gt=0.0, le=60.0)  # how often an outage is checked for its end


class AdminConfig(_Frozen):
    token_env: str = "BACKTRACK_ADMIN_TOKEN"


class ReloadConfig(_Frozen):
    # Checking a few mtimes costs nothing; 0 turns polling off (SIGHUP and /admin/reload still work).
    poll_seconds: float = Field(2.0, ge=0.0, le=3600.0)


class ConfigFile(_Frozen):
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    guard: ScorerConfig = ScorerConfig()
    policies: dict[str, str] = Field(default_factory=dict)
    default_policy: str = "default"
    tenants: list[Tenant] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=list)
    # Policies a request may ask for by header when no tenants are configured.
    anonymous_allowed_policies: list[str] = Field(default_factory=list)
    reload: ReloadConfig = ReloadConfig()
    redis: RedisConfig = RedisConfig()
    admin: AdminConfig = AdminConfig()


@dataclass(frozen=True)
class Settings:
    """Everything `create_app` needs, resolved: policies loaded, paths absolute, overrides applied."""

    path: Path | None
    file: ConfigFile  # the file as read, for a reload to tell what changed
    server: ServerConfig
    upstream: UpstreamConfig
    guard: ScorerConfig
    policy_set: PolicySet
    redis_url: str | None
    admin: AdminConfig
    admin_token: SecretStr | None
    guard_checkpoint: Path | None

    @property
    def policies(self) -> Mapping[str, Policy]:
        return self.policy_set.policies

    @property
    def default_policy(self) -> str:
        return self.policy_set.default_policy

    def policy(self, name: str | None = None) -> Policy:
        return self.policies[name or self.default_policy]

    @property
    def needs_model(self) -> bool:
        return needs_model(self.policy_set)


def needs_model(policy_set: PolicySet) -> bool:
    """Whether any policy enables the guard model."""
    return any(p.detectors.model.enabled for p in policy_set.policies.values())


def load_settings(
    path: Path | None,
    *,
    host: str | None = None,
    port: int | None = None,
    upstream: str | None = None,
    workers: int | None = None,
    event_loop: str | None = None,
    env: dict[str, str] | None = None,
) -> Settings:
    """Read and validate `path` (None: built-in defaults with a marker-only policy)."""
    env = dict(os.environ) if env is None else env
    cfg = read_config(path)
    policy_set = load_policy_set(cfg, path)
    base = path.parent if path is not None else Path.cwd()

    given = (("host", host), ("port", port), ("workers", workers), ("event_loop", event_loop))
    overrides = {k: v for k, v in given if v is not None}
    server = parse_model(ServerConfig, {**cfg.server.model_dump(), **overrides}, "the command line")
    up = cfg.upstream
    if upstream is not None:
        up = parse_model(UpstreamConfig, {**up.model_dump(), "url": upstream}, "--upstream")
    checkpoint = base / cfg.guard.checkpoint if cfg.guard.checkpoint else None
    token = env.get(cfg.admin.token_env)
    redis_url = env.get("BACKTRACK_REDIS_URL") or cfg.redis.url
    if redis_url is not None and redis_url.partition("://")[0] not in REDIS_SCHEMES:
        where = "BACKTRACK_REDIS_URL" if env.get("BACKTRACK_REDIS_URL") else f"{path}: 'redis.url'"
        # The value is not repeated: a Redis URL may carry a password.
        *first, last = (s + "://" for s in REDIS_SCHEMES)
        raise ConfigError(f"{where} must start with {', '.join(first)} or {last}")
    return Settings(
        path=path,
        file=cfg,
        server=server,
        upstream=up,
        guard=cfg.guard,
        policy_set=policy_set,
        redis_url=redis_url,
        admin=cfg.admin,
        admin_token=SecretStr(token) if token else None,
        guard_checkpoint=checkpoint,
    )


def read_config(path: Path | None) -> ConfigFile:
    """The config file, validated as a whole (None: the defaults)."""
    data: Any = {} if path is None else read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    return parse_model(ConfigFile, data, str(path or "<defaults>"))


def load_policy_set(cfg: ConfigFile, path: Path | None) -> PolicySet:
    """The policy files `cfg` names (relative to `path`), and the selection, checked against them."""
    base = path.parent if path is not None else Path.cwd()
    policies: dict[str, Policy] = {}
    for name, rel in cfg.policies.items():
        policy = load_policy(base / rel)
        policies[name] = policy.model_copy(update={"name": name}) if policy.name != name else policy
    if not policies:
        policies["default"] = Policy(name="default")
    policy_set = PolicySet(
        policies=policies,
        default_policy=cfg.default_policy,
        tenants=tuple(cfg.tenants),
        rules=tuple(cfg.rules),
        anonymous_allowed_policies=tuple(cfg.anonymous_allowed_policies),
    )
    errors = policy_set.reference_errors(str(path or "<defaults>"))
    if errors:
        raise ConfigError("\n".join(errors))
    return policy_set


def policy_files(cfg: ConfigFile, path: Path) -> list[Path]:
    """The files a reload reads: the config and every policy file it names."""
    return [path, *(path.parent / rel for rel in cfg.policies.values())]

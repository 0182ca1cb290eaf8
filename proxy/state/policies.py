"""Live policies, swapped whole: on a file change (polled mtimes), on SIGHUP, on `POST /admin/reload`.

Theory of operation:
- `PolicyRegistry.live` is one immutable `Live` snapshot: the policy set, its selector and one guard per
  policy. A request reads it once and keeps the `Policy` and `Guard` it chose for its whole life, so a
  stream in flight finishes on the policy it started with, and a new request sees the newest snapshot.
- A reload reads and validates everything (config file, every policy file, the references between
  them) before it builds the new snapshot's guards and swaps it in with one assignment. Any error leaves
  the old snapshot serving; it is logged and counted in `backtrack_policy_reloads_total{result="error"}`.
- Only the policies and the selection (`PolicySet`) are reloaded. The server, upstream, guard, redis
  and admin sections are read at start; a changed one is logged as waiting for a restart. The guard
  model is loaded once: an edit that enables it where it was not loaded is refused.
- The watcher polls every `reload.poll_seconds` what each file's path resolves to: the real path (through
  symlinks), the inode, mtime and size. Kubernetes updates a mounted ConfigMap by writing a new
  directory and swapping one `..data` symlink (each file is `name -> ..data/name`), and tools such as
  `tar` or `rsync -a` keep mtimes; a new real path or inode is a change even where mtime and size
  are not. A failed reload remembers the files it saw, so a broken edit is reported once, and the next
  edit is tried again.
- A reload reads several files; one that changed while they were read (a symlink swapped between two
  of them) may have mixed two versions, so the read is taken again until it saw one version, and only
  then validated, swapped in or counted as refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from proxy.core.config import ConfigFile, Settings, load_policy_set, needs_model, policy_files, read_config
from proxy.core.detectors import Guard
from proxy.core.errors import ConfigError
from proxy.core.policy import Policy
from proxy.core.selection import POLICY_HEADER, PolicySet, Selector, Tenant, presented_key
from proxy.state.metrics import Metrics

log = logging.getLogger("backtrack")

# Sections read once, at start: a reload leaves them as they were.
RESTART_SECTIONS = ("server", "upstream", "guard", "redis", "admin", "reload")

# path -> (real path, device, inode, mtime_ns, size) of the file it resolves to; None when missing
Snapshot = dict[Path, tuple[str, int, int, int, int] | None]
# How often a reload reads the files while they keep changing under it; then it takes the last read as
# it is (the next poll sees the change). A read takes milliseconds; Kubernetes swaps once per update.
READ_ATTEMPTS = 5


@dataclass(frozen=True)
class Live:
    """One generation of policies: what a request reads once and keeps."""

    policy_set: PolicySet
    selector: Selector
    guards: dict[str, Guard]
    generation: int

    def authenticate(self, headers: Mapping[str, str]) -> Tenant | None:
        """The request's tenant (None without tenants); raises `Unauthorized` for a missing or unknown key."""
        return self.selector.authenticate(presented_key(headers))

    def choose(
        self, tenant: Tenant | None, model: str, route: str, headers: Mapping[str, str]
    ) -> tuple[Policy, Guard]:
        """The policy the request gets (see `proxy.core.selection`) and that policy's guard."""
        requested = headers.get(POLICY_HEADER, "").strip() or None  # an empty header asks for nothing
        choice = self.selector.choose(tenant, model, route, requested)
        log.debug("policy %s by %s for tenant %s", choice.policy.name, choice.reason, choice.tenant)
        return choice.policy, self.guards[choice.policy.name]


# Told of every reload attempt, after it: (reason, the snapshot serving now, the error if refused).
ReloadListener = Callable[[str, Live, ConfigError | None], None]


class PolicyRegistry:
    def __init__(
        self,
        settings: Settings,
        build_guard: Callable[[Policy], Guard],
        metrics: Metrics,
        *,
        model_loaded: bool,
    ) -> None:
        self.settings = settings
        self.build_guard = build_guard
        self.metrics = metrics
        self.model_loaded = model_loaded
        self._live = self._make(settings.policy_set, generation=1)
        self._lock = asyncio.Lock()
        self._seen: Snapshot = self._stat(self._files(settings.file))
        self.listeners: list[ReloadListener] = []  # e.g. `proxy.state.shared` tells the other replicas

    @property
    def live(self) -> Live:
        return self._live

    async def reload(self, reason: str) -> Live:
        """Read, validate and swap in the policies; raises `ConfigError` and keeps the old ones on error."""
        async with self._lock:
            before, read = await self._read_steady()
            try:
                if isinstance(read, ConfigError):
                    raise read
                cfg, policy_set = read
                live = self._make(policy_set, generation=self._live.generation + 1)
            except ConfigError as exc:
                # Watch what the broken edit names too: creating a policy file it lacks is the next edit.
                self._seen = {**self._stat(self._named_files()), **before}
                self.metrics.policy_reloads.labels("error").inc()
                log.error(
                    "policy reload (%s) refused; generation %d keeps serving:\n%s",
                    reason, self._live.generation, exc.message,
                )  # fmt: skip
                self._tell(reason, exc)
                raise
            seen = self._stat(self._files(cfg))
            self._seen = {path: before.get(path, stamp) for path, stamp in seen.items()}
            self._live = live
            self.metrics.policy_reloads.labels("ok").inc()
            log.info(
                "policies reloaded (%s): generation %d, policies %s",
                reason, live.generation, ", ".join(sorted(policy_set.policies)),
            )  # fmt: skip
            self._tell(reason, None)
            return live

    def _tell(self, reason: str, error: ConfigError | None) -> None:
        for listener in self.listeners:
            listener(reason, self._live, error)

    async def reload_logged(self, reason: str) -> None:
        """`reload` for callers with no one to answer (the watcher, SIGHUP): errors are logged only."""
        with contextlib.suppress(ConfigError):
            await self.reload(reason)

    async def watch(self, interval: float) -> None:
        """Reload whenever a watched file changes (what it resolves to, or its mtime or size); runs until
        cancelled."""
        while True:
            await asyncio.sleep(interval)
            if self._stat(self._seen) != self._seen:
                await self.reload_logged("file change")

    async def _read_steady(self) -> tuple[Snapshot, tuple[ConfigFile, PolicySet] | ConfigError]:
        """`_read` again while the watched files change under it: (the files as they were before the
        read that counts, what it gave). An edit after that stat shows at the next poll."""
        for _ in range(READ_ATTEMPTS):
            before = self._stat(self._seen)
            try:
                read: tuple[ConfigFile, PolicySet] | ConfigError = await asyncio.to_thread(self._read)
            except ConfigError as exc:
                read = exc
            if self._stat(before) == before:
                break
            log.info("policy files changed while they were read; reading them again")
        return before, read

    def _read(self) -> tuple[ConfigFile, PolicySet]:
        path = self.settings.path
        if path is None:
            raise ConfigError("started without a config file: there is nothing to reload")
        cfg = read_config(path)
        policy_set = load_policy_set(cfg, path)
        if needs_model(policy_set) and not self.model_loaded:
            enabling = sorted(n for n, p in policy_set.policies.items() if p.detectors.model.enabled)
            raise ConfigError(
                f"{path}: policy {', '.join(enabling)} enables the guard model, which was not loaded at "
                "start (no policy enabled it then); restart the proxy to load it"
            )
        changed = [s for s in RESTART_SECTIONS if getattr(cfg, s) != getattr(self.settings.file, s)]
        if changed:
            log.warning("%s: changes to %s take effect at the next start", path, ", ".join(changed))
        return cfg, policy_set

    def _named_files(self) -> list[Path]:
        """The files the config file names now, if it can be read; else none."""
        try:
            return self._files(read_config(self.settings.path))
        except ConfigError:
            return []

    def _make(self, policy_set: PolicySet, generation: int) -> Live:
        guards = {name: self.build_guard(policy) for name, policy in policy_set.policies.items()}
        return Live(policy_set, Selector(policy_set), guards, generation)

    def _files(self, cfg: ConfigFile) -> list[Path]:
        return [] if self.settings.path is None else policy_files(cfg, self.settings.path)

    @staticmethod
    def _stat(paths: list[Path] | Snapshot) -> Snapshot:
        out: Snapshot = {}
        for path in paths:
            try:
                real = os.path.realpath(path)
                st = os.stat(real)
            except OSError:
                out[path] = None
            else:
                out[path] = (real, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        return out

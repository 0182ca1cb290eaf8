"""Policies from a Kubernetes ConfigMap: the mounted volume is updated as the kubelet updates it (a new
directory, then one `..data` symlink swapped; `tests/kubelet.py`), never by writing the files, and every
replica that polls it picks the new policies up while streams run."""

from __future__ import annotations

import asyncio
import os
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

import proxy.state.policies
from proxy.core.config import load_settings
from proxy.server.app import create_app
from tests.harness import Harness, metric, policy, serving
from tests.kubelet import ConfigMapVolume
from tests.server.test_reload import (
    ACTIVE,
    ADMIN,
    ENV,
    RELOAD_ERROR,
    RELOAD_OK,
    ROWS,
    SLOW_UNSAFE,
    chat,
    first_text,
    read_stream,
    refusal,
)
from tests.support import eventually


def configmap(upstream: str, policies: dict[str, dict[str, Any]], **config: Any) -> dict[str, str]:
    """The volume's files, as the Deployment's items lay them: `config.yaml` and `policies/NAME.yaml`."""
    files = {f"policies/{name}.yaml": yaml.safe_dump(data) for name, data in policies.items()}
    names = {name: f"policies/{name}.yaml" for name in policies}
    body = {"upstream": {"url": upstream}, "policies": names, "default_policy": "test", **config}
    return {"config.yaml": yaml.safe_dump(body), **files}


async def test_every_replica_takes_a_swapped_configmap_and_streams_in_flight_keep_their_policy(
    harness: Harness,
) -> None:
    upstream = await harness.replay(ROWS, tokens_per_second=10)
    volume = ConfigMapVolume(harness.tmp_path / "etc-backtrack")
    polled = {"reload": {"poll_seconds": 0.1}}
    first = volume.write(configmap(upstream, {"test": policy(refusal_message="OLD refusal.")}, **polled))
    config = volume.mount / "config.yaml"
    assert config.is_symlink() and (volume.mount / "policies").is_symlink()
    session = await harness.session()

    async with AsyncExitStack() as replicas:
        roots = [
            root
            for root, _ in await asyncio.gather(
                *(replicas.enter_async_context(serving("--config", config)) for _ in range(2))
            )
        ]
        responses = [
            await harness.stack.enter_async_context(
                session.post(f"{root}/v1/chat/completions", json=chat(SLOW_UNSAFE["prompt"]))
            )
            for root in roots
            for _ in range(2)
        ]
        starts = await asyncio.gather(*(first_text(r) for r in responses))

        second = volume.write(configmap(upstream, {"test": policy(refusal_message="NEW refusal.")}, **polled))
        assert not first.exists() and (volume.mount / "..data").resolve() == second

        for root in roots:
            await eventually(lambda root=root: reloaded(session, root, RELOAD_OK, 1), f"{root} to reload")
            assert await metric(session, root, ACTIVE) == 2  # the reload landed while both streamed
        rests = await asyncio.gather(*(read_stream(r) for r in responses))
        for start, rest in zip(starts, rests, strict=True):  # begun on generation 1: ended on it
            assert (start + rest).endswith("OLD refusal.")
        for root in roots:
            assert await refusal(session, root) == ("test", "NEW refusal.")

        # A broken version (a threshold out of range) is refused and counted by each replica; the one
        # loaded keeps serving.
        volume.write(
            configmap(upstream, {"test": policy(refusal_message="BAD refusal.", threshold=2)}, **polled)
        )
        for root in roots:
            await eventually(lambda root=root: reloaded(session, root, RELOAD_ERROR, 1), f"{root} to refuse")
            assert await refusal(session, root) == ("test", "NEW refusal.")
            assert await metric(session, root, RELOAD_OK) == 1


async def reloaded(session: Any, root: str, series: str, n: int) -> bool:
    return await metric(session, root, series) == n


async def test_a_swap_that_keeps_every_mtime_and_size_is_still_a_change(harness: Harness) -> None:
    """`tar`/`rsync -a` style: the new version's files carry the old mtimes and the edit keeps the size,
    so only what the paths resolve to (another directory, another inode) tells the versions apart."""
    upstream = await harness.replay(ROWS)
    volume = ConfigMapVolume(harness.tmp_path / "etc-backtrack")
    polled = {"reload": {"poll_seconds": 0.02}}
    volume.write(configmap(upstream, {"test": policy(refusal_message="OLD refusal.")}, **polled))
    config = volume.mount / "config.yaml"
    root = await harness.serve(create_app(load_settings(config, env={})))
    session = await harness.session()
    assert await refusal(session, root) == ("test", "OLD refusal.")

    before = {p: os.stat(volume.mount / p) for p in ("config.yaml", "policies/test.yaml")}
    volume.write(
        configmap(upstream, {"test": policy(refusal_message="NEW refusal.")}, **polled), keep_mtimes=True
    )
    after = {p: os.stat(volume.mount / p) for p in before}
    assert {p: (s.st_mtime_ns, s.st_size) for p, s in after.items()} == {
        p: (s.st_mtime_ns, s.st_size) for p, s in before.items()
    }
    assert {p: s.st_ino for p, s in after.items()} != {p: s.st_ino for p, s in before.items()}

    await eventually(lambda: reloaded(session, root, RELOAD_OK, 1), "the reload")
    assert await refusal(session, root) == ("test", "NEW refusal.")


async def test_a_swap_in_the_middle_of_a_reload_is_read_again_not_refused(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reload reads config.yaml, then the policy files it names; the kubelet swaps between the two
    reads to a version whose config names other files. The mix of the two is no version at all (the
    old config's policy file is gone): it is read again, not counted as a broken ConfigMap."""
    upstream = await harness.replay(ROWS)
    volume = ConfigMapVolume(harness.tmp_path / "etc-backtrack")
    no_poll = {"reload": {"poll_seconds": 0}}
    volume.write(configmap(upstream, {"test": policy(refusal_message="ONE refusal.")}, **no_poll))
    config = volume.mount / "config.yaml"
    app = create_app(load_settings(config, env=ENV))
    root = await harness.serve(app)
    session = await harness.session()

    renamed = configmap(
        upstream, {"calm": policy(refusal_message="TWO refusal.")}, **no_poll, default_policy="calm"
    )
    # `load_settings` above kept the real function; only the reload's read sees the swap.
    real_read_config = proxy.state.policies.read_config
    swaps: list[Path] = []

    def read_config_then_swap(path: Path | None) -> Any:
        cfg = real_read_config(path)
        if not swaps:
            swaps.append(volume.write(renamed))
        return cfg

    monkeypatch.setattr(proxy.state.policies, "read_config", read_config_then_swap)
    async with session.post(f"{root}/admin/reload", headers=ADMIN) as resp:
        assert (resp.status, await resp.json()) == (
            200,
            {"result": "ok", "generation": 2, "policies": ["calm"]},
        )
    assert len(swaps) == 1
    assert await metric(session, root, RELOAD_ERROR) == 0
    assert await refusal(session, root) == ("calm", "TWO refusal.")

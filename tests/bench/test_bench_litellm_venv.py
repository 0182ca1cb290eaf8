"""`backtrack bench all` on a machine without LiteLLM's virtualenv: it installs step by step, and an
install that fails is a one-line error that says what to do, not a traceback.

Nothing is installed: the install commands (`python -m venv`, `pip install`) are stubbed to fail, or to
lay out a fake virtualenv; every other command runs for real.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench.command import BenchError
from bench.litellm_peer import ensure_litellm, litellm_guard_installed, litellm_installed
from proxy.cli.main import main


def children() -> set[str]:
    """Process ids of this process's children that still exist."""
    return {
        pid for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()
    }


def is_install(command: list[str]) -> bool:
    return command[1:3] == ["-m", "venv"] or command[1:4] == ["-m", "pip", "install"]


def stub_installs(monkeypatch: pytest.MonkeyPatch, answer: Any) -> list[list[str]]:
    """Route install commands to `answer(command)`; returns the install commands seen, in order."""
    real_run = subprocess.run
    seen: list[list[str]] = []

    def run(command: list[str], *args: Any, **kwargs: Any) -> Any:
        if not is_install(command):
            return real_run(command, *args, **kwargs)
        seen.append(command)
        return answer(command)

    monkeypatch.setattr(subprocess, "run", run)
    return seen


def failed(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(command, 1, "", "ERROR: no network here (stub)\n")


def test_a_missing_virtualenv_has_neither_litellm_nor_the_guard_packages(tmp_path: Path) -> None:
    venv = tmp_path / "missing"

    assert litellm_installed(venv) is False
    assert litellm_guard_installed(venv) is False  # was: FileNotFoundError for venv/bin/python


def test_bench_all_with_a_missing_virtualenv_that_cannot_be_installed_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    venv = tmp_path / "litellm-venv"
    seen = stub_installs(monkeypatch, failed)
    before = children()

    # The checkpoint is only named, never loaded: the run ends at the install, before any server starts.
    code = main(
        ["bench", "all", "--concurrency", "1", "--rates", "0", "--seconds", "0.1", "--max-seconds", "1",
         "--checkpoint", str(tmp_path / "checkpoint"), "--litellm-venv", str(venv)]
    )  # fmt: skip

    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("backtrack bench all: error:")]
    assert code == 1
    assert children() <= before
    assert "Traceback" not in err
    assert len(errors) == 1
    assert str(venv) in errors[0] and "--skip-litellm" in errors[0]
    assert [command[1:3] for command in seen] == [["-m", "venv"]]  # stopped at the first failed step
    assert not venv.exists()


def test_the_guard_packages_are_probed_only_once_the_virtualenv_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = tmp_path / "litellm-venv"

    def fake_install(command: list[str]) -> subprocess.CompletedProcess[str]:
        if command[1:3] == ["-m", "venv"]:  # a virtualenv whose python imports nothing
            (venv / "bin").mkdir(parents=True)
            (venv / "bin" / "python").write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
            (venv / "bin" / "python").chmod(0o755)
            return subprocess.CompletedProcess(command, 0, "", "")
        if "litellm[proxy]" in command[-1]:
            return subprocess.CompletedProcess(command, 0, "", "")
        return failed(command)  # the guard's packages

    seen = stub_installs(monkeypatch, fake_install)

    with pytest.raises(BenchError, match="--skip-litellm-guard"):
        ensure_litellm(venv, guard=True)

    assert [command[1:3] for command in seen] == [["-m", "venv"], ["-m", "pip"], ["-m", "pip"]]
    assert "torch" in " ".join(seen[-1])

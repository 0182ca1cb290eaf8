"""The set-up contract, as the installed package shows it: the command, its data, and the pins."""

from __future__ import annotations

import re
import subprocess
from importlib import metadata, resources

from tests.support import REPO

COMMANDS = ("serve", "replay-upstream", "train", "eval", "tune", "bench", "audit", "hash-key")


def test_the_backtrack_command_is_installed_with_every_contract_command() -> None:
    (script,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "backtrack"]
    assert callable(script.load())
    venv_bin = REPO / ".venv" / "bin" / "backtrack"
    out = subprocess.run([str(venv_bin), "--help"], capture_output=True, text=True, check=True).stdout
    listed = set(re.search(r"\{([^}]*)\}", out).group(1).split(","))  # type: ignore[union-attr]
    assert set(COMMANDS) <= listed


def test_the_demo_corpus_and_the_bundled_checkpoint_ship_as_package_data() -> None:
    corpus = resources.files("proxy.replay") / "demo" / "corpus.jsonl"
    assert corpus.is_file() and corpus.read_text(encoding="utf-8").strip()
    checkpoint = resources.files("guard") / "checkpoint"
    assert (checkpoint / "guard.json").is_file() and (checkpoint / "guard.safetensors").is_file()


def test_the_environment_runs_the_exact_runtime_pins() -> None:
    """What is installed is what requirements.txt pins (torch exactly: a looser pin pulls CUDA)."""
    pins = {}
    for line in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"requirements.txt: {line!r} is not pinned exactly"
            pins[name] = version
    assert pins["torch"] == "2.13.0"
    wrong = {n: (v, metadata.version(n)) for n, v in pins.items() if metadata.version(n).split("+")[0] != v}
    assert wrong == {}

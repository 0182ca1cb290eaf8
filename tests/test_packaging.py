"""The set-up contract: the Makefile and the Dockerfile install the same pinned requirements."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def requirement_files(text: str) -> set[str]:
    return set(re.findall(r"-r\s+(\S+\.txt)", text))


def test_makefile_and_dockerfile_install_from_the_same_runtime_requirements():
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "requirements.txt" in requirement_files(makefile)
    assert requirement_files(dockerfile) == {"requirements.txt"}
    assert re.search(r"^COPY requirements\.txt", dockerfile, re.M)


def test_torch_is_pinned_exactly_and_dev_requirements_build_on_runtime():
    runtime = (ROOT / "requirements.txt").read_text().splitlines()
    assert "torch==2.13.0" in runtime
    pins = [line for line in runtime if line and not line.startswith("#")]
    assert all("==" in line for line in pins), "every runtime requirement is pinned"
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in dev


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make run" in readme

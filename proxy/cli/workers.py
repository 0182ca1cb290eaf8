"""`backtrack serve --workers N`: N worker processes on one port, under a small supervisor.

Each worker is an ordinary `serve` (its own event loop, guard model, upstream pool and store
connection) listening on its own SO_REUSEPORT socket: the kernel hands each new connection to one of
the sockets by a hash of its addresses, rather than to whichever process wakes first on one shared
accept socket, and each worker drains and stops exactly as a single `serve` does. The supervisor
serves nothing itself:

    start      it binds the address once (without listening) to fail early on a taken port and to
               hold it, empties the Prometheus multiprocess directory (or makes a temporary one), and
               starts the workers (spawned: a fresh interpreter each, nothing inherited from a fork)
    run        a worker that dies after it listened is restarted (its live gauges leave the sums); a
               worker that dies before it listened (bad model, port refused) ends the supervisor with
               exit code 1, since every worker would fail the same way, and so do more than
               `MAX_RESTARTS` restarts within `RESTART_WINDOW_SECONDS` (a crash loop)
    SIGHUP     forwarded to every worker (each reloads its policies)
    SIGTERM    (or SIGINT) forwarded to every worker; each drains its streams for
               `server.shutdown_grace_seconds` as a single `serve` does; the supervisor exits 0 once
               all of them exited 0, else 1 (a worker still running past the grace period and
               `KILL_MARGIN_SECONDS` is killed)
    parent     a worker whose supervisor disappears (SIGKILL) drains and exits by itself
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from proxy.core.config import Settings, load_settings
from proxy.state.metrics import MULTIPROC_ENV

log = logging.getLogger("backtrack")

MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 60.0
KILL_MARGIN_SECONDS = 10.0  # past the grace period: the streams have had their in-band ending by then
POLL_SECONDS = 0.2


@dataclass
class Worker:
    index: int
    process: SpawnProcess
    listening: Event
    announced: bool = False


@dataclass
class Supervisor:
    """The workers of one `serve --workers N`; see the module docstring."""

    args: argparse.Namespace
    settings: Settings
    port: int
    context: multiprocessing.context.SpawnContext = field(
        default_factory=lambda: multiprocessing.get_context("spawn")
    )
    workers: dict[int, Worker] = field(default_factory=dict)
    restarts: list[float] = field(default_factory=list)
    stopping: bool = False
    code: int = 0

    def start(self, index: int) -> None:
        listening = self.context.Event()
        process = self.context.Process(
            target=worker_main,
            args=(self.args, self.port, listening),
            name=f"backtrack-worker-{index}",
            daemon=False,  # a daemonic process may not start children: the guard's loaders do
        )
        process.start()
        self.workers[index] = Worker(index, process, listening)

    def signal(self, signum: int, *, listening_only: bool = False) -> None:
        for worker in self.workers.values():
            if listening_only and not worker.listening.is_set():
                continue  # SIGHUP's default action would end a worker not yet handling it
            if worker.process.is_alive() and worker.process.pid is not None:
                os.kill(worker.process.pid, signum)

    def reap(self, worker: Worker) -> None:
        """A worker exited while the others serve: restart it, or end everything."""
        process = worker.process
        process.join()
        assert process.pid is not None
        mark_process_dead(process.pid, os.environ[MULTIPROC_ENV])  # type: ignore[no-untyped-call]
        if not worker.listening.is_set():
            log.error(
                "worker %d (pid %d) exited with code %s before it listened; stopping",
                worker.index, process.pid, process.exitcode,
            )  # fmt: skip
            self.fail()
            return
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if t > now - RESTART_WINDOW_SECONDS] + [now]
        if len(self.restarts) > MAX_RESTARTS:
            log.error(
                "worker %d (pid %d) exited with code %s: more than %d restarts in %g s; stopping",
                worker.index, process.pid, process.exitcode, MAX_RESTARTS, RESTART_WINDOW_SECONDS,
            )  # fmt: skip
            self.fail()
            return
        log.warning(
            "worker %d (pid %d) exited with code %s; restarting it",
            worker.index,
            process.pid,
            process.exitcode,
        )
        self.start(worker.index)

    def fail(self) -> None:
        self.code = 1
        self.stopping = True

    def run(self, count: int, banner: str) -> int:
        for index in range(count):
            self.start(index)
        announced = False
        while not self.stopping:
            sentinels = [w.process.sentinel for w in self.workers.values()]
            ended = set(multiprocessing.connection.wait(sentinels, timeout=POLL_SECONDS))
            for worker in list(self.workers.values()):
                if worker.process.sentinel in ended and not self.stopping:
                    self.reap(worker)
            if not announced and all(w.listening.is_set() for w in self.workers.values()):
                print(banner, flush=True)  # once every worker listens, as a single `serve` prints it
                announced = True
        return self.drain()

    def drain(self) -> int:
        """Stop every worker (each drains its streams) and wait for them."""
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.server.shutdown_grace_seconds + KILL_MARGIN_SECONDS
        for worker in self.workers.values():
            process = worker.process
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error(
                    "worker %d (pid %s) did not finish draining in time; killed", worker.index, process.pid
                )
                process.kill()
                process.join()
                self.code = 1
            elif process.exitcode != 0 and worker.listening.is_set():
                log.error(
                    "worker %d (pid %s) exited with code %s", worker.index, process.pid, process.exitcode
                )
                self.code = 1
        return self.code


def supervise(args: argparse.Namespace, settings: Settings) -> int:
    """Run `settings.server.workers` workers until SIGTERM or SIGINT; the exit code of the whole."""
    from proxy.cli.main import banner

    if not hasattr(socket, "SO_REUSEPORT"):
        print("backtrack: --workers needs SO_REUSEPORT, which this platform lacks", file=sys.stderr)
        return 1
    server = settings.server
    try:
        holder = bind(server.host, server.port)
    except OSError as exc:
        print(
            f"backtrack: cannot listen on {server.host}:{server.port}: {exc.strerror or exc}", file=sys.stderr
        )
        return 1
    port = holder.getsockname()[1]
    own_dir = MULTIPROC_ENV not in os.environ
    metrics_dir = prepare_metrics_dir()
    supervisor = Supervisor(args, settings, port)

    def on_stop(signum: int, frame: FrameType | None) -> None:
        supervisor.stopping = True

    def on_hup(signum: int, frame: FrameType | None) -> None:
        supervisor.signal(signal.SIGHUP, listening_only=True)

    previous = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    try:
        return supervisor.run(server.workers, banner(settings, port))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        holder.close()
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            del os.environ[MULTIPROC_ENV]


def bind(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to the address: it holds the port for the workers' own sockets."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def prepare_metrics_dir() -> Path:
    """The workers' shared Prometheus directory: the configured one emptied of old values, or a new one."""
    configured = os.environ.get(MULTIPROC_ENV)
    if configured is None:
        folder = Path(tempfile.mkdtemp(prefix="backtrack-metrics-"))
        os.environ[MULTIPROC_ENV] = str(folder)  # the spawned workers inherit it
        return folder
    folder = Path(configured)
    folder.mkdir(parents=True, exist_ok=True)
    # Values left by an earlier run would be summed with this one's (prometheus-client's own rule).
    for stale in folder.glob("*.db"):
        stale.unlink()
    return folder


def worker_main(args: argparse.Namespace, port: int, listening: Event) -> None:
    """One worker: `serve` on its own SO_REUSEPORT socket; exits with `serve`'s code."""
    from proxy.cli.main import run_server

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Read again, not pickled across: the supervisor checked the same file a moment ago.
    settings = load_settings(
        args.config, host=args.host, port=port, upstream=args.upstream, workers=1, event_loop=args.loop
    )
    parent = multiprocessing.parent_process()

    def on_listening(stop: asyncio.Event) -> None:
        listening.set()
        if parent is not None:  # the supervisor's death (even SIGKILL) makes this readable
            asyncio.get_running_loop().add_reader(parent.sentinel, stop.set)

    sys.exit(run_server(settings, on_listening=on_listening, reuse_port=True))

"""Real Redis in the shapes production runs it in, started by the tests: one server with a password,
Sentinel with a master and a replica to fail over to, and a three-master Cluster; each also over TLS.

Each is made of `redis-server` processes on free ports in a test folder, always killed; the TLS
certificates are made with `openssl` for the run (a CA, and a server certificate it signed for
127.0.0.1).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import free_port

PASSWORD = "s3cret-pw"  # what the servers require; never expected in an error or a log
START_SECONDS = 20.0


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (`make test` installs redis-server)")
    return found


@dataclass
class Node:
    """One `redis-server` process (a data node or a Sentinel) and how `redis-cli` reaches it."""

    folder: Path
    port: int
    cli: list[str]  # redis-cli and the options that reach this node (port, TLS, password)
    proc: subprocess.Popen[bytes] | None = None
    args: list[str] = field(default_factory=list)  # as last started: `restart` starts it so again

    def start(self, args: Sequence[str]) -> None:
        self.args = list(args)
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [binary("redis-server"), *args], stdout=log, stderr=subprocess.STDOUT
            )

    def run(self, *command: str) -> str:
        done = subprocess.run([*self.cli, *command], capture_output=True, text=True, timeout=10)
        return done.stdout.strip()

    def wait(self, ready: str = "PONG", *command: str) -> None:
        """Until `command` (PING) answers with `ready` in it."""
        deadline = time.monotonic() + START_SECONDS
        while ready not in self.run(*(command or ("PING",))):
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"redis on port {self.port} did not become ready:\n{log}")
            time.sleep(0.05)

    def restart(self) -> None:
        """Start again as before (a Cluster node finds its slots in its nodes.conf; the data is gone)."""
        self.start(self.args)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@dataclass
class Shape:
    url: str
    nodes: list[Node] = field(default_factory=list)


@dataclass(frozen=True)
class Certificates:
    """A CA, and a server certificate it signed for 127.0.0.1 (every node uses the one certificate)."""

    ca: Path
    cert: Path
    key: Path

    def server_args(self) -> list[str]:
        # Replication and the cluster bus over TLS too: no plain port is open anywhere.
        return [
            "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no",
            "--tls-replication", "yes", "--tls-cluster", "yes",
        ]  # fmt: skip

    def cli_args(self) -> list[str]:
        return ["--tls", "--cacert", str(self.ca)]


def make_certificates(folder: Path) -> Certificates:
    """A CA and a certificate it signed for 127.0.0.1, made with openssl for this run."""
    folder.mkdir(parents=True, exist_ok=True)
    ssl = binary("openssl")
    ca, ca_key = folder / "ca.crt", folder / "ca.key"
    cert, key, csr = folder / "server.crt", folder / "server.key", folder / "server.csr"
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n", encoding="utf-8")
    for command in (
        [ssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "2", "-subj", "/CN=backtrack-test-ca"],
        [ssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        [ssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", "2", "-extfile", ext],
    ):  # fmt: skip
        subprocess.run([str(c) for c in command], check=True, capture_output=True, timeout=60)
    return Certificates(ca, cert, key)


AUTH = ("-a", PASSWORD, "--no-auth-warning")


def data_node(folder: Path, certs: Certificates | None, *extra: str) -> Node:
    """A started data node on a free port that requires the password (and speaks only TLS with `certs`)."""
    port = free_port()
    node = Node(folder, port, cli(port, *(certs.cli_args() if certs else ()), *AUTH))
    listen = (
        ["--port", "0", "--tls-port", str(port), *certs.server_args()] if certs else ["--port", str(port)]
    )
    node.start([
        *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no",
        "--dir", str(folder), "--requirepass", PASSWORD, "--masterauth", PASSWORD, *extra,
    ])  # fmt: skip
    return node


def cli(port: int, *extra: str) -> list[str]:
    return [binary("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *extra]


def scheme(base: str, certs: Certificates | None) -> str:
    return base.replace("redis", "rediss", 1) if certs else base


def query(certs: Certificates | None) -> str:
    return f"?ssl_ca_certs={certs.ca}" if certs else ""


@contextmanager
def server(folder: Path, *, tls: bool = False) -> Iterator[Shape]:
    """One server that requires a password; with `tls`, one that speaks only TLS."""
    certs = make_certificates(folder / "certs") if tls else None
    node = data_node(folder / "server", certs)
    try:
        node.wait()
        url = f"{scheme('redis', certs)}://:{PASSWORD}@127.0.0.1:{node.port}/0{query(certs)}"
        yield Shape(url, [node])
    finally:
        node.kill()


@contextmanager
def sentinel(folder: Path, *, tls: bool = False) -> Iterator[Shape]:
    """A master, its replica, and one Sentinel watching them as `mymaster` (quorum 1); with `tls`, all of
    them speak only TLS. `nodes` is [master, replica, sentinel]."""
    certs = make_certificates(folder / "certs") if tls else None
    with ExitStack() as stack:
        master = data_node(folder / "master", certs)
        stack.callback(master.kill)
        master.wait()
        replica = data_node(folder / "replica", certs, "--replicaof", "127.0.0.1", str(master.port))
        stack.callback(replica.kill)
        replica.wait("master_link_status:up", "INFO", "replication")
        port = free_port()
        watcher = Node(folder / "sentinel", port, cli(port, *(certs.cli_args() if certs else ())))
        stack.callback(watcher.kill)
        watcher.folder.mkdir(parents=True, exist_ok=True)
        listen = [f"port {port}"]
        if certs is not None:
            options = certs.server_args()
            listen = ["port 0", f"tls-port {port}"]
            listen += [
                f"{k.removeprefix('--')} {v}" for k, v in zip(options[::2], options[1::2], strict=True)
            ]
        conf = watcher.folder / "sentinel.conf"  # Sentinel rewrites its file: one of its own
        conf.write_text(
            "\n".join([
                *listen, "bind 127.0.0.1", f"dir {watcher.folder}",
                f"sentinel monitor mymaster 127.0.0.1 {master.port} 1",
                f"sentinel auth-pass mymaster {PASSWORD}",
                "sentinel down-after-milliseconds mymaster 1000",
                "sentinel failover-timeout mymaster 10000",
            ]) + "\n",
            encoding="utf-8",
        )  # fmt: skip
        watcher.start([str(conf), "--sentinel"])
        watcher.wait(str(master.port), "SENTINEL", "get-master-addr-by-name", "mymaster")
        # The replica must be known to the Sentinel before a failover can choose it.
        watcher.wait(str(replica.port), "SENTINEL", "replicas", "mymaster")
        url = f"{scheme('redis+sentinel', certs)}://:{PASSWORD}@127.0.0.1:{port}/mymaster/0{query(certs)}"
        yield Shape(url, [master, replica, watcher])


@contextmanager
def cluster(folder: Path, *, tls: bool = False, replicas: int = 0) -> Iterator[Shape]:
    """A Cluster of three masters (each with `replicas` replicas), every slot assigned, every node
    requiring the password; with `tls`, the clients and the cluster bus speak only TLS."""
    certs = make_certificates(folder / "certs") if tls else None
    with ExitStack() as stack:
        nodes = []
        for n in range(3 * (1 + replicas)):
            bus = free_port()
            where = folder / f"node{n}"
            node = data_node(
                where, certs, "--cluster-enabled", "yes", "--cluster-port", str(bus),
                "--cluster-config-file", str(where / "nodes.conf"), "--cluster-node-timeout", "5000",
            )  # fmt: skip
            stack.callback(node.kill)
            nodes.append(node)
        for node in nodes:
            node.wait()
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        created = subprocess.run(
            [binary("redis-cli"), *(certs.cli_args() if certs else ()), *AUTH, "--cluster", "create",
             *addresses, "--cluster-replicas", str(replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert created.returncode == 0, created.stdout + created.stderr
        for node in nodes:
            node.wait("cluster_state:ok", "CLUSTER", "INFO")
            node.wait(f"cluster_known_nodes:{len(nodes)}", "CLUSTER", "INFO")
            if "role:slave" in node.run("INFO", "replication"):
                node.wait("master_link_status:up", "INFO", "replication")  # synced: it can take over
        # Two seeds, as a deployment names a few: the client learns the rest from them.
        url = f"{scheme('redis+cluster', certs)}://:{PASSWORD}@{addresses[0]},{addresses[1]}{query(certs)}"
        yield Shape(url, nodes)

"""`free_port`: the ports handed to child servers keep out of the range outgoing connections draw from."""

from __future__ import annotations

import socket
from pathlib import Path

from bench.servers import free_port


def test_ports_come_from_below_the_ephemeral_range_bindable_and_never_twice() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= port < low for port in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # free when handed out

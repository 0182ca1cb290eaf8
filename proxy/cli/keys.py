"""`backtrack hash-key`: the sha256 digest of a proxy API key, as config.yaml's tenants name keys."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from proxy.core.selection import hash_key


def register(subparsers: Any) -> None:
    """Add `hash-key` to the `backtrack` command."""
    p = subparsers.add_parser(
        "hash-key", help="print the sha256 digest of a proxy API key (read from stdin) for config.yaml"
    )
    p.set_defaults(func=_hash_key_command)


def _hash_key_command(args: argparse.Namespace) -> int:
    # From stdin, not the command line, so that the key stays out of shell history and `ps`.
    key = sys.stdin.readline().strip()
    if not key:
        print("backtrack hash-key: give the key on stdin", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0

"""Helpers for transcript tests: feed the same bytes whole, split at every byte, and byte by byte."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def splits(data: bytes) -> Iterator[list[bytes]]:
    """The whole transcript, every two-part split, and one byte at a time."""
    yield [data]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]
    yield [data[i : i + 1] for i in range(len(data))]


def feed_all(make: Callable[[], object], parts: list[bytes]) -> list[object]:
    """Feed `parts` to a fresh decoder (with `feed` and `flush`), collecting every event."""
    decoder = make()
    events: list[object] = []
    for part in parts:
        events += decoder.feed(part)  # type: ignore[attr-defined]
    events += decoder.flush()  # type: ignore[attr-defined]
    return events

"""What the `backtrack bench` commands share: the repository root, the error that ends a run, the
comma-separated number options, and running a report in a temporary folder and writing it out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import proxy
from proxy.core.errors import BacktrackError

PACKAGE_ROOT = Path(proxy.__file__).resolve().parent.parent

Report = dict[str, Any]


class BenchError(BacktrackError):
    """The benchmark could not run: a server did not start, or the options are wrong."""


def number_list(kind: type[float] | type[int], minimum: float, numbers: str, rule: str) -> Any:
    """An argparse type for `1,16,64`: one or more `kind`s, none below `minimum`.

    `numbers` names them in the error for text that does not parse, `rule` is the error for too few or
    too small ones.
    """

    def parse(text: str) -> list[Any]:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {numbers}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: {rule}")
        return values

    return parse


def add_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    description: str | None,
) -> argparse.ArgumentParser:
    """`backtrack bench NAME`, its module docstring as its `--help` text, as written."""
    return subparsers.add_parser(
        name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def run_in_workdir(
    command: str, run: Callable[[Path], Coroutine[Any, Any, Report]], prefix: str
) -> Report | None:
    """`run` in a temporary folder, on a new event loop; None, the error printed, when it cannot run."""
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as workdir:
            return asyncio.run(run(Path(workdir)))
    except BacktrackError as exc:
        print(f"backtrack bench {command}: error: {exc.message}", file=sys.stderr)
        return None


def publish(report: Report, table: str, out: Path | None, stem: str) -> None:
    """Print the table; with `out`, write it as STEM.md and the report as STEM.json there."""
    print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (out / f"{stem}.md").write_text(table + "\n", encoding="utf-8")

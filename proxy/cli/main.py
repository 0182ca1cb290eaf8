"""The `backtrack` command: serve, replay-upstream, guard-serve, hash-key, audit, tune, train, eval, bench."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bench import cli as bench_cli
from guard import cli as guard_cli
from guard import tune
from proxy.cli import audit, guard_serve, keys, replay
from proxy.core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from aiohttp import web

    from proxy.core.config import ServerConfig, Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backtrack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", type=Path, help="config.yaml (default: built-in defaults)")
    serve.add_argument("--host", help="address to listen on (default: from config, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: from config, 8080)")
    serve.add_argument("--upstream", help="the upstream LLM server's root URL, e.g. http://127.0.0.1:8001")
    serve.add_argument(
        "--workers", type=int, help="worker processes sharing the port (default: from config, 1)"
    )
    serve.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        help="event loop (default: from config, auto: uvloop when installed, else asyncio's)",
    )
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(func=serve_command)

    audit.register(sub)
    replay.register(sub)
    guard_serve.register(sub)
    keys.register(sub)
    guard_cli.register(sub)
    tune.register(sub)
    bench_cli.register(sub)
    return parser


def serve_command(args: argparse.Namespace) -> int:
    from proxy.core.config import load_settings

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = load_settings(
        args.config,
        host=args.host,
        port=args.port,
        upstream=args.upstream,
        workers=args.workers,
        event_loop=args.loop,
    )
    if settings.redis_url is not None:
        from proxy.state.redis_url import check

        check(settings.redis_url)  # a malformed URL stops `serve` here, once, not in each worker
    loop_factory(settings.server.event_loop)  # uvloop asked for and missing stops `serve` here, once
    if settings.server.workers > 1:
        from proxy.cli.workers import supervise

        return supervise(args, settings)
    return run_server(settings, on_listening=lambda _: print(banner(settings), flush=True))


def banner(settings: Settings, port: int | None = None) -> str:
    """What `serve` prints once it listens (`port`: the one taken, when the config asked for 0)."""
    server = settings.server
    workers = f"; {server.workers} workers" if server.workers > 1 else ""
    return (
        f"backtrack: serving on http://{server.host}:{server.port if port is None else port} "
        f"(upstream: {settings.upstream.url or 'built-in demo'}; policies: {', '.join(settings.policies)}"
        f"{workers})"
    )


def run_server(
    settings: Settings,
    *,
    on_listening: Callable[[asyncio.Event], None],
    reuse_port: bool = False,
) -> int:
    """Build the app and serve it until SIGTERM or SIGINT (one process: a worker, or all of `serve`)."""
    from proxy.server.app import create_app
    from proxy.server.reload import sighup_ctx

    app = create_app(settings)
    app.cleanup_ctx.append(sighup_ctx)  # a signal handler is the process's: only the command installs it
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.server.event_loop)) as runner:
            runner.run(serve(app, settings.server, on_listening, reuse_port=reuse_port))
    except OSError as exc:  # the address is taken or not ours to listen on
        where = f"{settings.server.host}:{settings.server.port}"
        print(f"backtrack: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `server.event_loop` asks for (None: asyncio's default)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("'server.event_loop' has value 'uvloop', which is not installed") from None
        return None
    return uvloop.new_event_loop


async def serve(
    app: web.Application,
    server: ServerConfig,
    on_listening: Callable[[asyncio.Event], None],
    *,
    reuse_port: bool = False,
) -> None:
    """Serve `app` until SIGTERM or SIGINT; then streams get `shutdown_grace_seconds` to finish.

    `on_listening` is called once the socket listens, with the event that stops the server.
    """
    from aiohttp import web

    from proxy.server.app import ProxyRunner

    # aiohttp waits this long for handlers before cancelling them; streams end in-band at the grace
    # period, so a little more leaves them time to write their error.
    runner = ProxyRunner(app, access_log=None, shutdown_timeout=server.shutdown_grace_seconds + 5.0)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        site = web.TCPSite(runner, server.host, server.port, reuse_port=reuse_port or None)
        await site.start()
        # Called once it listens, so the banner never announces a port it could not take.
        on_listening(stop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"backtrack: configuration error:\n{exc.message}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"backtrack {args.command}: bad data: {exc.message}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())

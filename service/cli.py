"""`basehold` command line: `serve` starts the HTTP service."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys

from service.commands import add_commands, run
from service.settings import Settings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.handles.fdpass import SocketUnsafe, check_folder
    from service.server import serve
    from service.state.lock import StateDirLocked, StateLock

    logging.getLogger().setLevel(args.log_level.upper())
    settings = Settings()
    if (
        not settings.auth_enabled
        and not _is_loopback(args.host)
        and not (settings.allow_unauthenticated_remote)
    ):
        print(
            f"basehold: refusing to serve on {args.host} without API keys. Set "
            "BASEHOLD_API_KEYS, bind 127.0.0.1, or set BASEHOLD_ALLOW_UNAUTHENTICATED_REMOTE=true.",
            file=sys.stderr,
        )
        return 2
    settings.ensure_dirs()
    lock = StateLock(settings.state_dir)
    try:
        lock.acquire()
        check_folder(settings.socket.parent)
    except (StateDirLocked, SocketUnsafe) as exc:
        print(f"basehold: refusing to start: {exc}", file=sys.stderr)
        return 2
    if args.demo:
        _write_demo(settings, args.host, args.port)
    serve(create_app(settings, lock=lock), args.host, args.port, args.log_level)
    return 0


def _write_demo(settings: Settings, host: str, port: int) -> None:
    from service.demo import write_demo_checkpoint

    settings.ensure_dirs()
    path = write_demo_checkpoint(settings.model_roots[0])
    body = json.dumps({"source": str(path), "name": "demo", "dtype": "float32"})
    auth = ' -H "Authorization: Bearer $KEY"' if settings.auth_enabled else ""
    print(
        f"basehold: demo checkpoint at {path}\n"
        f"  load it:   curl -s -X POST http://{host}:{port}/v1/models{auth} "
        f"-H 'Content-Type: application/json' -d '{body}'\n"
        f"  status:    curl -s http://{host}:{port}/v1/models/demo{auth}\n"
        f"  unload:    curl -s -X DELETE http://{host}:{port}/v1/models/demo{auth}",
        flush=True,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="basehold", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service (uvicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.add_argument(
        "--demo",
        action="store_true",
        help="write a small generated checkpoint into the models root and print how to load it",
    )
    serve.set_defaults(func=_serve)
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        result: int = args.func(args)
        return result
    return run(args)

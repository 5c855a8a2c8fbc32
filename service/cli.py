"""`basehold` command line: `serve` starts the HTTP service."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.commands import add_commands, run
from service.common.logsafe import configure
from service.serving.settings import Settings


def _serve(args: argparse.Namespace) -> int:
    # What can refuse to start is checked before torch and the app are imported: a bad
    # setting answers in a fraction of a second.
    from service.common.private_dir import FolderUnsafe
    from service.serving.api.guards import is_loopback
    from service.serving.loaders.template import check_template
    from service.serving.socket.server import check_folder, resolve_group
    from service.serving.state.lock import StateDirLocked, StateLock

    logging.getLogger().setLevel(args.log_level.upper())
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"basehold: invalid settings: {describe_settings_error(exc)}", file=sys.stderr)
        return 2
    except SettingsError as exc:  # a value that is not even JSON; the message names no value
        print(f"basehold: invalid settings: {exc}", file=sys.stderr)
        return 2
    if (
        not settings.auth_enabled
        and not is_loopback(args.host)
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
        check_folder(settings.socket.parent, resolve_group(settings.socket_group))
        check_template(settings.loader_template)
    except (StateDirLocked, FolderUnsafe) as exc:
        print(f"basehold: refusing to start: {exc}", file=sys.stderr)
        return 2
    if args.demo:
        _write_demo(settings, args.host, args.port)
    from service.serving.app import create_app
    from service.serving.server import serve

    try:  # the node-features folder, a shared loader template: checked as the app is built
        app = create_app(settings, lock=lock)
    except FolderUnsafe as exc:
        lock.release()
        print(f"basehold: refusing to start: {exc}", file=sys.stderr)
        return 2
    serve(app, args.host, args.port, args.log_level)
    return 0


def describe_settings_error(exc: ValidationError) -> str:
    """Which setting is wrong and why, never its value (BASEHOLD_API_KEYS holds secrets)."""
    parts = []
    for error in exc.errors():
        name = "BASEHOLD_" + str(error["loc"][0]).upper() if error["loc"] else "settings"
        parts.append(f"{name}: {error['msg']}")
    return "; ".join(parts)


def _write_demo(settings: Settings, host: str, port: int) -> None:
    """Written by a child process (torch and transformers stay out of the serving one)."""
    from service.demo import DEMO_NAME, written

    settings.ensure_dirs()
    path = settings.model_roots[0] / DEMO_NAME
    if not written(path):
        subprocess.run([sys.executable, "-m", "service.demo", str(path.parent)], check=True)
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
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="client commands: show library log lines (each HTTP request, ...) too",
    )
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
    args = build_parser().parse_args(argv)
    # Client commands print progress and results; library log lines only with -v.
    configure(logging.INFO if args.command == "serve" or args.verbose else logging.WARNING)
    if args.command == "serve":
        result: int = args.func(args)
        return result
    return run(args)

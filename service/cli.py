"""`basehold` command line: `serve` starts the HTTP service; the other commands talk to one
(global options --url, --token, --json, -v before or after the command)."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.commands import add_commands, add_global_options, run
from service.common.logsafe import configure
from service.serving.settings import Settings

if TYPE_CHECKING:
    from service.demo import DemoWriter
    from service.serving.handover.kept import KeeperLink


def _serve(args: argparse.Namespace) -> int:
    from service.common.protocol.keeper import FD_SETTING

    if (args.keeper or _true(os.environ.get("BASEHOLD_KEEPER"))) and FD_SETTING not in os.environ:
        # The keeper: a fresh interpreter of the standard library alone, which starts this
        # command again as its child (see service/keeper.py).
        os.execv(sys.executable, [sys.executable, "-m", "service.keeper", *sys.argv[1:]])
    # Our loader template imports torch and friends (seconds) in its own process: started
    # first, before this process imports the app, both import side by side (two cores). A
    # refusal to start ends it at once.
    from service.serving.loaders.keeper import start_early
    from service.serving.loaders.template import SETTING

    early = None if os.environ.get(SETTING) else start_early()
    try:
        started = _start(args)
    except BaseException:
        if early is not None:
            early.abandon()
        raise
    if isinstance(started, int):
        if early is not None:
            early.abandon()
        return started
    return _run(*started, args)


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _start(
    args: argparse.Namespace,
) -> tuple[Any, Settings, socket.socket | Callable[[], socket.socket]] | int:
    """The app, its settings and its bound port; or the exit code of a refusal to start.
    What can refuse is checked before the app is imported: a bad setting answers in a
    fraction of a second."""
    from service.common.private_dir import FolderUnsafe
    from service.serving.api.guards import is_loopback
    from service.serving.loaders.template import check_template
    from service.serving.server import PortUnavailable, bind
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
    from service.serving.handover.kept import KeeperLink
    from service.serving.handover.taker import HandoverRefused

    link = KeeperLink.from_env()  # started by a keeper: what it kept of a crashed one
    try:
        kept = link.take(_gpu_uuids()) if link is not None else None
    except HandoverRefused as exc:
        print(f"basehold: refusing to start: the keeper's offer: {exc}", file=sys.stderr)
        return 2
    if (args.take_over or settings.take_over) and kept is None:  # kept: it crashed
        return _take_over(args, settings, link)
    # A second instance on this machine stops here, on one line, before anything else
    # starts (the demo writer; the early template is ended): its port, state directory or
    # worker socket is in use.
    try:
        listener = kept.http if kept is not None and kept.http else bind(args.host, args.port)
    except PortUnavailable as exc:
        if kept is not None:
            kept.close()
        print(f"basehold: {exc}", file=sys.stderr)
        return 2
    lock = StateLock(settings.state_dir)
    try:
        lock.acquire()
        check_folder(settings.socket.parent, resolve_group(settings.socket_group))
        if kept is None or kept.worker is None:  # else the keeper holds it for us
            check_socket_free(settings.socket)
        check_template(settings.loader_template)
        from service.serving.app import create_app

        # the node-features folder, a shared loader template: checked as the app is built
        app = create_app(settings, lock=lock, keeper=link)
    except (StateDirLocked, FolderUnsafe) as exc:
        listener.close()
        if kept is not None:
            kept.close()
        lock.release()
        print(f"basehold: refusing to start: {exc}", file=sys.stderr)
        return 2
    if kept is not None:
        logging.getLogger("basehold").info(
            "started again by the keeper: %d model(s) kept", len(kept.models)
        )
    app.state.handed = kept
    app.state.http_listener = listener
    return app, settings, listener


EXITING = 5.0  # seconds a predecessor that died midway may take to let go of its port


def _bind_soon(host: str, port: int) -> socket.socket:
    """`bind`, tried again for a few seconds while the port is in use: a predecessor
    that went away during a handover closes its sockets one by one as it exits."""
    from service.serving.server import PortUnavailable, bind

    deadline = time.monotonic() + EXITING
    while True:
        try:
            return bind(host, port)
        except PortUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _gpu_uuids() -> list[str]:
    """The GPUs this process sees, by NVML (never CUDA: the serving process has none)."""
    from service.serving.memory.nvml import Nvml

    return [gpu.uuid for gpu in Nvml().gpus()]


class StartRefused(RuntimeError):
    """A successor that will not start (exit 2); the message says why."""


def _take_over(
    args: argparse.Namespace, settings: Settings, link: KeeperLink | None
) -> tuple[Any, Settings, Callable[[], socket.socket]] | int:
    """Build the app first (its imports take the time); the server, once built and running,
    calls the returned `take` to take what the basehold running on this state directory
    holds (its sockets, models and leases) and serve on its listener. With none running,
    start as usual. Everything that does not need what is handed over is ready before the
    running one is asked: what comes after its offer is only what needs it."""
    from service.common.private_dir import FolderUnsafe
    from service.serving.handover.messages import SOCKET_NAME
    from service.serving.handover.taker import HandoverRefused, take_over
    from service.serving.loaders.template import check_template
    from service.serving.server import PortUnavailable
    from service.serving.socket.server import check_folder, resolve_group
    from service.serving.state.lock import StateDirLocked, StateLock

    lock = StateLock(settings.state_dir)  # taken once the predecessor lets go
    try:
        check_folder(settings.socket.parent, resolve_group(settings.socket_group))
        check_template(settings.loader_template)
        from service.serving.app import create_app

        app = create_app(settings, lock=lock, keeper=link)
        gpus = [gpu.uuid for gpu in app.state.gpus.gpus()]  # NVML: no CUDA here
    except FolderUnsafe as exc:
        print(f"basehold: refusing to take over: {exc}", file=sys.stderr)
        return 2
    log = logging.getLogger("basehold")

    def take() -> socket.socket:
        gc.collect()  # what the app's start does, done before the running one is asked
        gc.freeze()
        try:
            handed = take_over(
                settings.state_dir / SOCKET_NAME, settings.handover_load_wait_seconds + 60, gpus
            )
        except HandoverRefused as exc:
            raise StartRefused(f"refusing to take over: {exc}") from None
        listener = handed.http if handed is not None else None
        if handed is None:
            log.info("--take-over: no basehold serves this state directory; starting as usual")
        try:
            if listener is None:  # nothing running; or one in another network namespace (a pod)
                listener = _bind_soon(args.host, args.port)
            if handed is None:  # one that went away midway may still be exiting: its lock too
                lock.acquire(wait=EXITING)
                check_socket_free(settings.socket)
        except (PortUnavailable, StateDirLocked, FolderUnsafe) as exc:
            if handed is not None:
                handed.close()
            if listener is not None:
                listener.close()
            lock.release()
            raise StartRefused(f"refusing to start: {exc}") from None
        if handed is not None:
            log.info(
                "taking over from pid %d: %d model(s) handed over", handed.pid, len(handed.models)
            )
        app.state.handed = handed
        app.state.taken_over_from = handed.pid if handed is not None else None
        app.state.http_listener = listener
        return listener

    return app, settings, take


def _run(
    app: Any,
    settings: Settings,
    listener: socket.socket | Callable[[], socket.socket],
    args: argparse.Namespace,
) -> int:
    """Serve until stopped; the start block prints once the server answers, the demo's
    lines once its checkpoint (written in the background meanwhile) is there."""
    from service.demo import DEMO_NAME, DemoWriter
    from service.serving.reload import Reloader, notify_systemd
    from service.serving.server import serve

    base = display_url(args.host, args.port)
    demo = None
    if args.demo:
        path = settings.model_roots[0] / DEMO_NAME
        demo = DemoWriter(path, lambda: print(demo_lines(path, base, settings), flush=True))
    app.state.demo = demo  # /readyz: `demo_preparing` until it is written

    def started() -> None:
        for hook in app.state.when_serving:
            hook()
        print(start_lines(base, settings, demo), flush=True)
        if app.state.keeper is None:  # a successor is the main process now
            notify_systemd(READY=1, MAINPID=os.getpid())
        else:  # the keeper is, and stays
            notify_systemd(READY=1)
        if demo is not None:
            demo.start()

    # SIGHUP: hand over to a fresh copy of basehold (our keeper's to start, if we have one)
    reloader = Reloader(sys.argv[1:], keeper=app.state.keeper is not None)
    reloader.install()

    try:
        serve(
            app,
            args.host,
            args.port,
            args.log_level,
            listener=listener,
            on_started=started,
            on_stopping=demo.stop if demo is not None else lambda: None,
        )
    except StartRefused as exc:
        print(f"basehold: {exc}", file=sys.stderr)
        return 2
    finally:
        # Every way out, also a failed start: nothing this process started outlives it.
        if demo is not None:
            demo.stop()
        app.state.loaders.close()  # a no-op after a normal shutdown (it closed them)
    code = reloader.stay_as_parent()  # PID 1 that handed over on SIGHUP: the container stays
    return 0 if code is None else code


def check_socket_free(path: Path) -> None:
    """SocketUnsafe when a live process serves the worker socket (a stale file from a
    process that died is fine: the socket server replaces it)."""
    from service.serving.socket.server import SocketUnsafe

    if not (path.exists() or path.is_symlink()):
        return
    if not (_listed_listening(path) or _answers(path)):
        return
    raise SocketUnsafe(
        f"the worker socket {path} is in use (another basehold?): set BASEHOLD_SOCKET to "
        "another path"
    )


def _listed_listening(path: Path) -> bool:
    """Whether /proc/net/unix lists a listening socket bound to `path` (this network
    namespace): found without connecting, so the serving one logs nothing about it."""
    try:
        table = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return False
    for row in table:
        fields = row.split(maxsplit=7)  # Num RefCount Protocol Flags Type St Inode Path
        if len(fields) == 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
            return True
    return False


def _answers(path: Path) -> bool:
    """Whether something accepts a connection on `path` (a server in another network
    namespace, sharing the folder, is not in our /proc/net/unix)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def display_url(host: str, port: int) -> str:
    """The base URL to print: a wildcard bind is shown with this machine's name."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def start_lines(base: str, settings: Settings, demo: DemoWriter | None) -> str:
    lines = [
        f"basehold: serving on {base}",
        f"  dashboard: {base}/",
        f"  API docs:  {base}/docs",
        f"  API base:  {base}/v1",
    ]
    if settings.auth_enabled:
        lines.append(
            '  API keys:  send "Authorization: Bearer <key>" with a key of BASEHOLD_API_KEYS '
            "(the dashboard asks for one)"
        )
    if demo is not None and demo.preparing:
        lines.append(
            f"  demo:      writing its checkpoint to {demo.target} (GET /readyz answers "
            "demo_preparing until it is there)"
        )
    return "\n".join(lines)


def describe_settings_error(exc: ValidationError) -> str:
    """Which setting is wrong and why, never its value (BASEHOLD_API_KEYS holds secrets)."""
    parts = []
    for error in exc.errors():
        name = "BASEHOLD_" + str(error["loc"][0]).upper() if error["loc"] else "settings"
        parts.append(f"{name}: {error['msg']}")
    return "; ".join(parts)


def demo_lines(path: Path, base: str, settings: Settings) -> str:
    body = json.dumps({"source": str(path), "name": "demo", "dtype": "float32"})
    auth = ' -H "Authorization: Bearer $KEY"' if settings.auth_enabled else ""
    return (
        f"basehold: demo checkpoint at {path}\n"
        f"  load it:   curl -s -X POST {base}/v1/models{auth} "
        f"-H 'Content-Type: application/json' -d '{body}'\n"
        f"  status:    curl -s {base}/v1/models/demo{auth}\n"
        f"  unload:    curl -s -X DELETE {base}/v1/models/demo{auth}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="basehold", description=__doc__)
    parser.add_argument(
        "--version", action="version", version=f"basehold {_version()}", help="print the version"
    )
    add_global_options(parser, defaults=True)
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help="`basehold COMMAND -h` tells its options",
    )
    serve = sub.add_parser("serve", help="run the HTTP service (uvicorn)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)"
    )
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="the service's log level (default info)",
    )
    serve.add_argument(
        "--take-over",
        action="store_true",
        help="take the models, leases and sockets of the basehold running on this state "
        "directory (an upgrade without reloading); with none running, start as usual",
    )
    serve.add_argument(
        "--keeper",
        action="store_true",
        help="run under a small keeper process that holds the models' memory and starts "
        "the service again if it dies, without loading anything again (BASEHOLD_KEEPER)",
    )
    serve.add_argument(
        "--demo",
        action="store_true",
        help="write a small generated checkpoint into the models root and print how to load it",
    )
    serve.set_defaults(func=_serve)
    add_commands(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("basehold")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Client commands print progress and results; library log lines only with -v.
    configure(logging.INFO if args.command == "serve" or args.verbose else logging.WARNING)
    if args.command == "serve":
        result: int = args.func(args)
        return result
    return run(args)

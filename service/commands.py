"""Client-side CLI commands over HTTP: load, estimate, ls, show, rm (unload), leases,
memory. Global options (`--url`, `--token`, `--json`, `-v`) go before or after the
command."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.worker.client import DEFAULT_URL, BaseholdError, Client, ServiceUnreachable


def _console(stderr: bool) -> Console:
    """A terminal gets rich's width; a pipe or a log gets lines as long as they are (ids
    whole, never cut at 80 columns)."""
    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=1_000_000)


# Made on first use, not at import: a process forked from a template that imported this
# module decides by its own stdout whether it writes to a terminal.
@functools.cache
def out() -> Console:
    return _console(stderr=False)


@functools.cache
def err() -> Console:
    return _console(stderr=True)


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{nbytes} B"


def _json(value: Any) -> None:
    """--json: one JSON document on stdout, plain (no colors, no wrapping)."""
    print(json.dumps(value, indent=2, sort_keys=True))


def local_or_hub(source: str) -> str:
    """A path (`./x`, `../x`, `~/x`, `/x`, or an existing directory such as `models/x`)
    becomes an absolute local directory; anything else is a hub id. The service takes
    only absolute paths as local sources, so a relative one is never sent as a hub id."""
    if source.startswith((".", "/", "~")) or Path(source).is_dir():
        return str(Path(source).expanduser().resolve())
    return source


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {"dtype": args.dtype, "device_map": _device_map(args.device_map)}
    for field in ("task", "name", "revision", "num_labels"):
        if getattr(args, field, None) is not None:
            spec[field] = getattr(args, field)
    if args.offload:
        spec["offload"] = True
    if getattr(args, "pinned", False):
        spec["pinned"] = True
    if getattr(args, "base_model", None):
        base: dict[str, str] = {"hub_id": args.base_model}
        if args.base_revision:
            base["revision"] = args.base_revision
        spec["base_model"] = base
    if args.four_bit:
        spec["quantization"] = {
            "method": "bnb-4bit",
            "quant_type": args.quant_type,
            "double_quant": args.double_quant,
        }
    elif args.eight_bit:
        spec["quantization"] = {"method": "bnb-8bit"}
    return spec


def _device_map(value: str) -> str | dict[str, str]:
    return json.loads(value) if value.startswith("{") else value


def load(client: Client, args: argparse.Namespace) -> int:
    source = local_or_hub(args.source)
    status = client.load(source, hf_token=os.environ.get("HF_TOKEN"), **_spec(args))
    if not args.json:
        out().print(f"[bold]{escape(status['id'])}[/]: {status['state']}")
    if args.wait:
        progress = _lines if args.json or not out().is_terminal else _bar
        status = progress(client, status, quiet=args.json)
    if args.json:
        _json(status)
        return 0 if status["state"] != "failed" else 1
    if not args.wait:
        return 0
    if status["state"] != "ready":
        error = status.get("error") or {}
        err().print(
            f"[red]{escape(status['id'])} {status['state']}[/]: "
            f"{escape(str(error.get('code')))}: {escape(str(error.get('message')))}"
        )
        return 1
    out().print(
        f"[green]{escape(status['id'])} ready[/] in {status['timings']['load_seconds']:.1f}s, "
        f"{_size(status['memory']['footprint_bytes'])}"
    )
    return 0


def _polls(client: Client, status: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The model's status every 0.25 s while it is queued or loading; the last one ends it."""
    while status["state"] in ("queued", "loading"):
        time.sleep(0.25)
        status = client.get(status["id"])
        yield status


def _bar(client: Client, first: dict[str, Any], *, quiet: bool = False) -> dict[str, Any]:
    """A terminal: one live bar (phase, bytes, elapsed), gone when the load ends."""
    status = first
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    with Progress(*columns, console=out(), transient=True) as bar:
        task = bar.add_task("queued", total=None)
        for status in _polls(client, first):
            p = status["progress"]
            bar.update(
                task,
                description=escape(f"{status['state']}: {p['phase']}"),
                completed=p["bytes_done"],
                total=p["bytes_total"] or None,
            )
    return status


def _lines(client: Client, first: dict[str, Any], *, quiet: bool = False) -> dict[str, Any]:
    """Not a terminal (a job's log, a pipe): a line per phase and per tenth of its bytes
    (on stderr with --json, so stdout stays one JSON document)."""
    show = err() if quiet else out()
    status = first
    last: tuple[str, int] | None = None
    for status in _polls(client, first):
        p = status["progress"]
        total = p["bytes_total"] or 0
        step = (p["phase"], 10 * p["bytes_done"] // total if total else 0)
        if status["state"] in ("queued", "loading") and step != last:
            last = step
            done = f" {_size(p['bytes_done'])} of {_size(total)}" if total else ""
            percent = f" ({100 * p['bytes_done'] // total}%)" if total else ""
            show.print(escape(f"{status['id']} {status['state']}: {p['phase']}{done}{percent}"))
    return status


def _table(*columns: str) -> Table:
    # Ids are never cut or folded: a wide table scrolls in a terminal and stays whole in a pipe.
    table = Table(box=box.HEAVY_HEAD if out().is_terminal else None, pad_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=True, overflow="ignore")
    return table


def ls(client: Client, args: argparse.Namespace) -> int:
    models = client.models()
    if args.json:
        _json(models)
        return 0
    table = _table("id", "state", "task", "precision", "footprint", "devices", "leases")
    for m in models:
        quant = m.get("quantization") or {}
        precision = quant.get("quant_type") or ("int8" if quant else m.get("dtype") or "-")
        devices = ", ".join(sorted(m["memory"]["by_device"])) or "-"
        table.add_row(
            escape(m["id"] + (" (pinned)" if m.get("pinned") else "")),
            m["state"],
            m.get("task") or "-",
            str(precision),
            _size(m["memory"]["footprint_bytes"]),
            escape(devices),
            str(m["leases"]),
        )
    out().print(table)
    return 0


def show(client: Client, args: argparse.Namespace) -> int:
    _json(client.get(args.id))
    return 0


def rm(client: Client, args: argparse.Namespace) -> int:
    client.unload(args.id, force=args.force)
    if args.json:
        _json({"id": args.id, "unloaded": True})
    else:
        out().print(f"{escape(args.id)}: unloaded")
    return 0


def leases(client: Client, args: argparse.Namespace) -> int:
    if args.leases_command == "revoke":
        client.release(args.lease_id)  # an admin key, no secret: a revoke
        if args.json:
            _json({"lease_id": args.lease_id, "revoked": True})
        else:
            out().print(f"{escape(args.lease_id)}: revoked")
        return 0
    listed = client.leases()
    if args.json:
        _json(listed)
        return 0
    table = _table("lease", "model", "holder", "ttl", "expires")
    for lease in listed:
        table.add_row(
            escape(lease["lease_id"]),
            escape(lease["model_id"]),
            escape(lease["holder"]),
            f"{lease['ttl_seconds']}s",
            escape(str(lease["expires_at"])),
        )
    out().print(table)
    return 0


def memory(client: Client, args: argparse.Namespace) -> int:
    report = client.memory()
    if args.json:
        _json(report)
        return 0
    table = _table("device", "name", "held", "used", "total")
    for d in report["devices"]:
        table.add_row(
            escape(d["id"]),
            escape(d["name"]),
            _size(d["held_bytes"]),
            _size(d["used_bytes"]),
            _size(d["total_bytes"]),
        )
    host = report["host"]
    table.add_row(
        "host",
        f"arena {_size(host['shared_arena_bytes'])}",
        _size(host["held_bytes"]),
        _size(host["total_bytes"] - host["available_bytes"]),
        _size(host["total_bytes"]),
    )
    out().print(table)
    return 0


def estimate(client: Client, args: argparse.Namespace) -> int:
    result = client.estimate(local_or_hub(args.source), **_spec(args))
    if args.json:
        _json(result)
        return 0 if result["fits"] else 3
    table = _table("device", "needed", "free")
    for device, nbytes in result["by_device"].items():
        table.add_row(escape(device), _size(nbytes), _size(result["free_bytes"].get(device)))
    out().print(table)
    verdict = "[green]fits[/]" if result["fits"] else "[red]does not fit[/]"
    out().print(
        f"total {_size(result['total_bytes'])}, largest layer "
        f"{_size(result['largest_layer_bytes'])}: {verdict}"
    )
    if result.get("download_bytes"):
        out().print(f"downloads {_size(result['download_bytes'])} into the HF cache first")
    return 0 if result["fits"] else 3


def add_global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every client command takes, before or after its name. The top-level
    parser holds the defaults; a subcommand's copy leaves a value unset unless given
    there (SUPPRESS), so `basehold --json ls` and `basehold ls --json` both count."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--url",
        default=default(os.environ.get("BASEHOLD_URL") or DEFAULT_URL),
        help=f"the service's base URL (default: $BASEHOLD_URL, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        default=default(os.environ.get("BASEHOLD_TOKEN")),
        help="an API key, sent as a bearer token (default: $BASEHOLD_TOKEN)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the result as JSON (full ids, no colors), for scripts",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default(False),
        help="show library log lines (each HTTP request, ...) too",
    )


def add_commands(sub: Any) -> None:
    def command(name: str, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text, **kwargs
        )
        add_global_options(parser, defaults=False)
        return parser

    def spec_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "source",
            help="a hub repo id (org/name), or a local checkpoint directory: a path with "
            "/, ./, ../ or ~, or an existing directory (sent as an absolute path)",
        )
        parser.add_argument(
            "--task",
            choices=["causal-lm", "seq-cls", "token-cls", "seq2seq-lm", "base"],
            help="the head to load (default: the checkpoint's own architecture)",
        )
        parser.add_argument(
            "--dtype",
            default="auto",
            choices=["auto", "float32", "float16", "bfloat16"],
            help="weights' dtype (default: auto, the checkpoint's)",
        )
        quant = parser.add_mutually_exclusive_group()
        quant.add_argument(
            "--4bit", dest="four_bit", action="store_true", help="quantize with bitsandbytes 4-bit"
        )
        quant.add_argument(
            "--8bit", dest="eight_bit", action="store_true", help="quantize with bitsandbytes 8-bit"
        )
        parser.add_argument(
            "--quant-type", default="nf4", choices=["nf4", "fp4"], help="4-bit type (default nf4)"
        )
        parser.add_argument(
            "--double-quant", action="store_true", help="4-bit: quantize the quantization scales"
        )
        parser.add_argument(
            "--device-map",
            default="auto",
            help="auto, balanced, balanced_low_0, sequential, cpu, cuda:N, or JSON: module -> "
            "device",
        )
        parser.add_argument(
            "--offload",
            action="store_true",
            help="allow layers to stay on the CPU if GPUs are full",
        )
        parser.add_argument("--num-labels", type=int, help="seq-cls/token-cls: number of labels")
        parser.add_argument("--revision", help="hub sources: a commit, tag or branch to load")
        parser.add_argument("--name", help="the model's id on the service (default: derived)")
        parser.add_argument(
            "--base-model",
            metavar="HUB_ID",
            help="local sources: the hub model this checkpoint is a copy of (adapters name it)",
        )
        parser.add_argument(
            "--base-revision",
            metavar="COMMIT",
            help="with --base-model: the hub commit the copy was taken from",
        )
        parser.add_argument(
            "--pinned", action="store_true", help="never evict it to make room for another load"
        )

    p = command("load", "load a model (with --wait: progress until ready)")
    spec_args(p)
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait until it is ready (a bar in a terminal, a line per tenth in a log)",
    )
    p.set_defaults(func=load)
    p = command("estimate", "what a load would need, per device (exit 3: does not fit)")
    spec_args(p)
    p.set_defaults(func=estimate)
    p = command("ls", "list models")
    p.set_defaults(func=ls)
    p = command("show", "one model's status (JSON)")
    p.add_argument("id", help="model id or alias")
    p.set_defaults(func=show)
    p = command("rm", "unload a model", aliases=["unload"])
    p.add_argument("id", help="model id or alias (an alias drops only that name)")
    p.add_argument(
        "--force", action="store_true", help="revoke its active leases (else 409 model_leased)"
    )
    p.set_defaults(func=rm)
    p = command("leases", "list active leases; `leases revoke ID` ends one (admin key)")
    lease_sub = p.add_subparsers(
        dest="leases_command", metavar="{revoke}", help="without one: list the active leases"
    )
    revoke = lease_sub.add_parser("revoke", help="revoke a lease: its holder hears `revoked`")
    revoke.add_argument("lease_id", help="the lease's id (from `basehold leases`)")
    add_global_options(revoke, defaults=False)
    p.set_defaults(func=leases, leases_command=None)
    p = command("memory", "memory per device and the host's arena")
    p.set_defaults(func=memory)


def run(args: argparse.Namespace) -> int:
    client = Client(args.url, token=args.token or "")
    try:
        result: int = args.func(client, args)
        return result
    except BaseholdError as exc:
        if args.json:
            print(
                json.dumps({"status": exc.status, "code": exc.code, "detail": exc.detail}),
                file=sys.stderr,
            )
        else:
            err().print(f"[red]error[/] {exc.status} {escape(exc.code)}: {escape(exc.detail)}")
        return 1
    except ServiceUnreachable as exc:
        err().print(f"[red]error[/] {escape(str(exc))}")
        return 2
    except Exception as exc:  # a connection lost midway and the like
        err().print(f"[red]error[/] talking to {escape(args.url)}: {escape(str(exc))}")
        return 2
    finally:
        client.close()

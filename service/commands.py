"""Client-side CLI commands: load, ls, show, unload, memory, estimate (over HTTP)."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.worker.client import BaseholdError, Client

console = Console()


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{nbytes} B"


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {"dtype": args.dtype, "device_map": _device_map(args.device_map)}
    for field in ("task", "name", "revision", "num_labels"):
        if getattr(args, field, None) is not None:
            spec[field] = getattr(args, field)
    if args.offload:
        spec["offload"] = True
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
    status = client.load(args.source, hf_token=os.environ.get("HF_TOKEN"), **_spec(args))
    console.print(f"[bold]{status['id']}[/]: {status['state']}")
    if not args.wait:
        return 0
    status = (_bar if console.is_terminal else _lines)(client, status)
    if status["state"] != "ready":
        error = status.get("error") or {}
        console.print(
            f"[red]{status['id']} {status['state']}[/]: {error.get('code')}: {error.get('message')}"
        )
        return 1
    console.print(
        f"[green]{status['id']} ready[/] in {status['timings']['load_seconds']:.1f}s, "
        f"{_size(status['memory']['footprint_bytes'])}"
    )
    return 0


def _polls(client: Client, status: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The model's status every 0.25 s while it is queued or loading; the last one ends it."""
    while status["state"] in ("queued", "loading"):
        time.sleep(0.25)
        status = client.get(status["id"])
        yield status


def _bar(client: Client, first: dict[str, Any]) -> dict[str, Any]:
    """A terminal: one live bar (phase, bytes, elapsed), gone when the load ends."""
    status = first
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("queued", total=None)
        for status in _polls(client, first):
            p = status["progress"]
            bar.update(
                task,
                description=f"{status['state']}: {p['phase']}",
                completed=p["bytes_done"],
                total=p["bytes_total"] or None,
            )
    return status


def _lines(client: Client, first: dict[str, Any]) -> dict[str, Any]:
    """Not a terminal (a job's log, a pipe): a line per phase and per tenth of its bytes."""
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
            console.print(f"{status['id']} {status['state']}: {p['phase']}{done}{percent}")
    return status


def ls(client: Client, args: argparse.Namespace) -> int:
    table = Table("id", "state", "task", "precision", "footprint", "devices", "leases")
    for m in client.models():
        quant = m.get("quantization") or {}
        precision = quant.get("quant_type") or ("int8" if quant else m.get("dtype") or "-")
        devices = ", ".join(sorted(m["memory"]["by_device"])) or "-"
        table.add_row(
            m["id"] + (" (pinned)" if m.get("pinned") else ""),
            m["state"],
            m.get("task") or "-",
            str(precision),
            _size(m["memory"]["footprint_bytes"]),
            devices,
            str(m["leases"]),
        )
    console.print(table)
    return 0


def show(client: Client, args: argparse.Namespace) -> int:
    console.print_json(json.dumps(client.get(args.id)))
    return 0


def unload(client: Client, args: argparse.Namespace) -> int:
    client.unload(args.id, force=args.force)
    console.print(f"{args.id}: unloaded")
    return 0


def memory(client: Client, args: argparse.Namespace) -> int:
    report = client.memory()
    table = Table("device", "name", "held", "used", "total")
    for d in report["devices"]:
        table.add_row(
            d["id"],
            d["name"],
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
    console.print(table)
    return 0


def estimate(client: Client, args: argparse.Namespace) -> int:
    result = client.estimate(args.source, **_spec(args))
    table = Table("device", "needed", "free")
    for device, nbytes in result["by_device"].items():
        table.add_row(device, _size(nbytes), _size(result["free_bytes"].get(device)))
    console.print(table)
    verdict = "[green]fits[/]" if result["fits"] else "[red]does not fit[/]"
    console.print(
        f"total {_size(result['total_bytes'])}, largest layer "
        f"{_size(result['largest_layer_bytes'])}: {verdict}"
    )
    if result.get("download_bytes"):
        console.print(f"downloads {_size(result['download_bytes'])} into the HF cache first")
    return 0 if result["fits"] else 3


def add_commands(sub: Any) -> None:
    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--url", default=os.environ.get("BASEHOLD_URL", "http://127.0.0.1:8000")
        )
        parser.add_argument("--token", default=os.environ.get("BASEHOLD_TOKEN"))

    def spec_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source", help="hub repo id or absolute local directory")
        parser.add_argument(
            "--task", choices=["causal-lm", "seq-cls", "token-cls", "seq2seq-lm", "base"]
        )
        parser.add_argument(
            "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"]
        )
        quant = parser.add_mutually_exclusive_group()
        quant.add_argument("--4bit", dest="four_bit", action="store_true")
        quant.add_argument("--8bit", dest="eight_bit", action="store_true")
        parser.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
        parser.add_argument("--double-quant", action="store_true")
        parser.add_argument("--device-map", default="auto", help="strategy, cuda:N or JSON")
        parser.add_argument("--offload", action="store_true")
        parser.add_argument("--num-labels", type=int)
        parser.add_argument("--revision")
        parser.add_argument("--name")
        common(parser)

    p = sub.add_parser("load", help="load a model (with --wait: progress bar until ready)")
    spec_args(p)
    p.add_argument("--wait", action="store_true")
    p.set_defaults(func=load)
    p = sub.add_parser("estimate", help="what a load would need, per device")
    spec_args(p)
    p.set_defaults(func=estimate)
    p = sub.add_parser("ls", help="list models")
    common(p)
    p.set_defaults(func=ls)
    p = sub.add_parser("show", help="one model's status (JSON)")
    p.add_argument("id")
    common(p)
    p.set_defaults(func=show)
    p = sub.add_parser("unload", help="unload a model")
    p.add_argument("id")
    p.add_argument("--force", action="store_true", help="revoke active leases")
    common(p)
    p.set_defaults(func=unload)
    p = sub.add_parser("memory", help="memory per device")
    common(p)
    p.set_defaults(func=memory)


def run(args: argparse.Namespace) -> int:
    client = Client(args.url, token=args.token)
    try:
        result: int = args.func(client, args)
        return result
    except BaseholdError as exc:
        console.print(f"[red]error[/] {exc.status} {exc.code}: {exc.detail}")
        return 1
    except Exception as exc:  # connection refused and the like
        console.print(f"[red]error[/] cannot reach {args.url}: {exc}")
        return 2
    finally:
        client.close()

"""gpu_check's stage runner: every stage runs and prints one JSON line, whatever the others
did, and a summary line ends the run.

A stage line is `{"stage", "ok", "figures", "error"}` (plus `"skipped": reason` when it
did not run; `ok` is then null). A stage that needs another stage's product is skipped
when that stage failed or was skipped; a stage that would start past the budget is
skipped with "budget". `BASEHOLD_GPU_CHECK_FAIL=name[,name]` makes the named stages fail
after they ran (rehearsal only: it shows one failure hides nothing else).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

FAIL_SWITCH = "BASEHOLD_GPU_CHECK_FAIL"


class Deadline:
    """The time one stage may take: its own limit, within what is left of the budget."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, at_most: float = 1e9) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the stage ran out of its time (see --budget)")
        return min(remaining, at_most)


class Skip(Exception):
    """Raised by a stage that cannot run here (no second uid, no CAP_SYS_ADMIN, no GPU):
    it is reported skipped with this reason, not failed."""


@dataclass
class Outcome:
    """What a stage found: figures to record, named checks (all must hold for ok), and a
    product later stages may need (dropped if any check failed)."""

    figures: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    product: Any = None


@dataclass
class Stage:
    name: str
    run: Callable[[dict[str, Any], Deadline], Outcome]  # (products of `needs`, deadline)
    needs: tuple[str, ...] = ()
    seconds: float = 60  # the most it may take
    at_least: float = 1  # skipped ("budget") when less than this is left


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


@dataclass
class Runner:
    budget: float
    out: TextIO = sys.stdout
    fail: frozenset[str] = frozenset()
    lines: list[dict[str, Any]] = field(default_factory=list)
    products: dict[str, Any] = field(default_factory=dict)
    began: float = field(default_factory=time.monotonic)

    @classmethod
    def from_env(cls, budget: float, out: TextIO = sys.stdout) -> Runner:
        names = os.environ.get(FAIL_SWITCH, "")
        return cls(budget, out, frozenset(n.strip() for n in names.split(",") if n.strip()))

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.began)

    def _print(self, line: dict[str, Any]) -> None:
        self.lines.append(line)
        print(json.dumps(line), file=self.out, flush=True)

    def _unmet(self, stage: Stage) -> str | None:
        by_name = {line["stage"]: line for line in self.lines}
        for need in stage.needs:
            line = by_name.get(need)
            if line is None:
                return f"needs {need}, which did not run before it"
            if need not in self.products:
                why = "was skipped" if line["ok"] is None else "failed"
                return f"needs {need}, which {why}"
        return None

    def run(self, stage: Stage, chosen: set[str] | None = None) -> None:
        reason = self._unmet(stage)
        if chosen is not None and stage.name not in chosen:
            reason = "not chosen (--stages)"
        left = self.left()
        if reason is None and left < stage.at_least:
            reason = f"budget: {max(left, 0):.0f} s left, it needs {stage.at_least:.0f} s or more"
        if reason is not None:
            self._print(
                {"stage": stage.name, "ok": None, "figures": {}, "error": None, "skipped": reason}
            )
            return
        started = time.monotonic()
        deadline = Deadline(min(stage.seconds, left))
        figures: dict[str, Any] = {}
        error: str | None = None
        try:
            outcome = stage.run({n: self.products[n] for n in stage.needs}, deadline)
        except Skip as skip:
            skipped: dict[str, Any] = {"stage": stage.name, "ok": None, "figures": {}}
            self._print({**skipped, "error": None, "skipped": str(skip)})
            return
        except Exception as exc:  # one stage's failure must not stop the others
            tail = traceback.format_exc().strip().splitlines()[-6:]
            error = f"{type(exc).__name__}: {exc}"[:2000]
            figures = {"traceback": tail}
        else:
            figures = {**outcome.figures, "checks": outcome.checks}
            failed = [what for what, ok in outcome.checks.items() if not ok]
            if failed:
                error = "failed: " + "; ".join(failed)
            elif stage.name in self.fail:
                error = f"failed on purpose: {FAIL_SWITCH} names this stage (rehearsal only)"
            else:
                self.products[stage.name] = outcome.product
        figures["seconds"] = round(time.monotonic() - started, 3)
        self._print(
            {
                "stage": stage.name,
                "ok": error is None,
                "figures": _jsonable(figures),
                "error": error,
            }
        )

    def summary(self) -> int:
        """Print the summary line; the exit code (1 if any stage failed)."""
        failed = [line["stage"] for line in self.lines if line["ok"] is False]
        summary = {
            "ok": not failed,
            "passed": [line["stage"] for line in self.lines if line["ok"] is True],
            "failed": {line["stage"]: line["error"] for line in self.lines if line["ok"] is False},
            "skipped": {
                line["stage"]: line["skipped"] for line in self.lines if line["ok"] is None
            },
            "targets_missed": [
                f"{line['stage']}: {what}"
                for line in self.lines
                for what, met in line["figures"].get("targets", {}).items()
                if met is False
            ],
            "seconds": round(time.monotonic() - self.began, 1),
        }
        print(json.dumps({"summary": summary}), file=self.out, flush=True)
        return 1 if failed else 0

"""bench/gpu_check.py cannot run here (no GPU), but its flow can: the CPU rehearsal runs
every stage with the host stand-in for device segments (a real server, its loader
template, forked loaders, independent workers, segment fds across uids and PID
namespaces, read-only mappings, forced unloads); only the CUDA calls and the GPU-only
figures are left to a GPU. Each stage prints one JSON line whatever the others did."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from types import ModuleType
from typing import Any

import pytest
import torch

from tests.serving.test_server_e2e import ROOT
from tests.spawn import run_module, worker_env

BENCH = ROOT / "bench"
STAGES = [
    "versions",
    "loader-template-cuda-free",
    "worker-template-cuda-free",
    "vmm-export",
    "survives-loader-exit",
    "import-same-uid",
    "import-other-uid",
    "import-pid-namespace",
    "read-only",
    "freed-after-last-fd",
    "checkpoints",
    "server",
    "load-fp32",
    "load-bf16",
    "load-nf4",
    "load-int8",
    "placement-peak",
    "attach-time",
    "four-workers",
    "forced-unload",
]
# Where this machine may not allow them (no root, no CAP_SYS_ADMIN): skipped, with why.
MAY_SKIP = {"import-other-uid", "import-pid-namespace"}


def _load(name: str) -> ModuleType:
    """A bench module by path, as a GPU machine runs it (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, **env: str) -> tuple[int, str, str]:
    """`python bench/gpu_check.py ARGS` in bench/, forked from the workers' template (it
    imported torch and transformers, which the script's main process would import again):
    its exit code, stdout and stderr."""
    proc = run_module(str(BENCH / "gpu_check.py"), list(args), env=worker_env(**env), cwd=BENCH)
    out, err = proc.communicate(timeout=600)
    return proc.wait(), out, err


def parse(stdout: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The stage lines and the summary (other output, if any, is not JSON)."""
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    stages = [line for line in lines if "stage" in line]
    for line in stages:
        assert set(line) - {"skipped"} == {"stage", "ok", "figures", "error"}, line
    summaries = [line["summary"] for line in lines if "summary" in line]
    assert len(summaries) == 1 and lines[-1].get("summary") == summaries[0], stdout[-3000:]
    return stages, summaries[0]


@pytest.mark.e2e
def test_rehearsal_runs_every_stage_when_one_fails() -> None:
    """One rehearsal, with `versions` made to fail after it ran: every other stage still
    runs and passes (its line printed), the summary names the failure, the exit code is 1."""
    code, stdout, stderr = run_script(
        "--rehearse-on-cpu", "--tiny", "--steps", "3", BASEHOLD_GPU_CHECK_FAIL="versions"
    )
    stages, summary = parse(stdout)
    assert [line["stage"] for line in stages] == STAGES, stdout[-3000:] + stderr[-3000:]
    by_name = {line["stage"]: line for line in stages}
    assert by_name["versions"]["ok"] is False
    assert "BASEHOLD_GPU_CHECK_FAIL" in by_name["versions"]["error"]
    assert by_name["versions"]["figures"]["torch"] == torch.__version__  # it ran first
    assert by_name["placement-peak"]["skipped"].startswith("GPU only")
    for name in set(STAGES) - {"versions", "placement-peak"}:
        line = by_name[name]
        if name in MAY_SKIP and line["ok"] is None:
            assert line["skipped"], line
            continue
        assert line["ok"] is True, json.dumps(line)[-3000:] + stderr[-6000:]
    assert code == 1
    assert list(summary["failed"]) == ["versions"]
    # What the rehearsal proves on the CPU, stage by stage.
    assert by_name["loader-template-cuda-free"]["figures"]["initialized"] is False
    assert by_name["worker-template-cuda-free"]["figures"]["peft_or_bitsandbytes_preloaded"] == []
    assert by_name["read-only"]["figures"]["write"] == "refused"
    assert by_name["freed-after-last-fd"]["figures"]["holders"] == []
    checks = by_name["forced-unload"]["figures"]["checks"]
    assert checks["the worker's next forward raised LeaseLost"] is True
    assert checks["the segments were freed after the TTL"] is True
    assert by_name["four-workers"]["figures"]["added_on_device_bytes"] == [0, 0, 0, 0]


@pytest.mark.e2e
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_says_it_needs_a_gpu() -> None:
    code, _, stderr = run_script()
    assert code == 2
    assert "needs a CUDA GPU" in stderr


def test_worker_template_preloads_nothing_that_initializes_cuda() -> None:
    """gpu_check.py loads without side effects; its workers' template imports neither
    bitsandbytes (it calls torch.cuda.get_device_capability at import) nor peft (it
    imports bitsandbytes)."""
    preload = _load("gpu_check").WORKER_PRELOAD
    assert "torch" in preload
    assert not {"peft", "bitsandbytes", "transformers.integrations.bitsandbytes"} & set(preload)


# -- the runner: fast, in this process --------------------------------------------------------
def _runner(budget: float = 60, fail: frozenset[str] = frozenset()) -> Any:
    module = _load("gpu_check_runner")
    return module, module.Runner(budget, io.StringIO(), fail)


def test_a_failing_stage_stops_nothing_and_its_dependents_say_why() -> None:
    module, runner = _runner()
    Stage, Outcome = module.Stage, module.Outcome

    def boom(_: Any, __: Any) -> Any:
        raise RuntimeError("no driver")

    def made(_: Any, __: Any) -> Any:
        return Outcome({"bytes": 3}, {"made": True}, product="segment")

    def uses(inputs: dict[str, Any], _: Any) -> Any:
        return Outcome({"got": inputs["made"]}, {"got it": inputs["made"] == "segment"})

    def cannot(_: Any, __: Any) -> Any:
        raise module.Skip("unshare not permitted")

    def wrong(_: Any, __: Any) -> Any:
        return Outcome({}, {"bytes match": False, "exited": True})

    for stage in (
        Stage("boom", boom),
        Stage("needs-boom", uses, ("boom",)),
        Stage("made", made),
        Stage("uses", uses, ("made",)),
        Stage("cannot", cannot),
        Stage("needs-cannot", uses, ("cannot",)),
        Stage("wrong", wrong),
        Stage("needs-wrong", uses, ("wrong",)),
    ):
        runner.run(stage)
    assert runner.summary() == 1
    stages, summary = parse(runner.out.getvalue())
    by_name = {line["stage"]: line for line in stages}
    assert by_name["boom"]["ok"] is False and by_name["boom"]["error"] == "RuntimeError: no driver"
    assert by_name["needs-boom"]["skipped"] == "needs boom, which failed"
    assert by_name["uses"]["ok"] is True and by_name["uses"]["figures"]["got"] == "segment"
    assert by_name["cannot"] == {
        "stage": "cannot",
        "ok": None,
        "figures": {},
        "error": None,
        "skipped": "unshare not permitted",
    }
    assert by_name["needs-cannot"]["skipped"] == "needs cannot, which was skipped"
    assert by_name["wrong"]["error"] == "failed: bytes match"
    assert by_name["needs-wrong"]["skipped"] == "needs wrong, which failed"
    assert set(summary["failed"]) == {"boom", "wrong"}
    assert summary["passed"] == ["made", "uses"]


def test_budget_and_the_fail_switch() -> None:
    module, runner = _runner(budget=5, fail=frozenset({"fine"}))
    Stage, Outcome = module.Stage, module.Outcome

    def fine(_: Any, __: Any) -> Any:
        return Outcome({"figure": 1}, {"ok": True}, product=1)

    def late(_: Any, deadline: Any) -> Any:
        return Outcome({"left": deadline.left()}, {})

    runner.run(Stage("fine", fine))
    runner.run(Stage("after-fine", late, ("fine",)))
    runner.run(Stage("big", late, at_least=30))
    runner.run(Stage("small", late, seconds=2))
    assert runner.summary() == 1
    stages, _ = parse(runner.out.getvalue())
    by_name = {line["stage"]: line for line in stages}
    assert by_name["fine"]["ok"] is False and by_name["fine"]["figures"]["figure"] == 1
    assert "BASEHOLD_GPU_CHECK_FAIL" in by_name["fine"]["error"]
    assert by_name["after-fine"]["skipped"] == "needs fine, which failed"
    assert by_name["big"]["skipped"].startswith("budget: ")
    assert by_name["small"]["ok"] is True and by_name["small"]["figures"]["left"] <= 2


def test_the_fail_switch_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _load("gpu_check_runner")
    monkeypatch.setenv(module.FAIL_SWITCH, "versions, server")
    assert module.Runner.from_env(10).fail == frozenset({"versions", "server"})

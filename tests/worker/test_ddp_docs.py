"""docs/ddp.md's snippets run as written, in order, against a live server: `client`, `MODEL`
and `ADAPTERS` are what the page says they are. The `python torchrun` ones need ranks:
they compile here, and tests/worker/ddp_worker.py makes the same calls on 2 ranks
(tests/worker/test_torchrun.py)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from service.worker.client import Client
from tests.serving.test_server_e2e import Server, wait_ready

pytestmark = pytest.mark.e2e

PAGE = Path(__file__).resolve().parents[2] / "docs" / "ddp.md"
FENCE = re.compile(r"^```python( torchrun)?\n(.*?)^```$", re.M | re.S)


def snippets() -> list[tuple[bool, str]]:
    return [(bool(ranks), code) for ranks, code in FENCE.findall(PAGE.read_text())]


def test_the_page_has_a_snippet_for_each_case() -> None:
    found = snippets()
    text = "\n".join(code for _, code in found)
    assert sum(ranks for ranks, _ in found) == 2
    for call in (
        "DistributedDataParallel(lora)",
        "accelerator.prepare(",
        "FullyShardedDataParallel(model)",
        "ACCELERATE_USE_DEEPSPEED",
        "add_adapter(",
        "PeftModel.from_pretrained(",
        ".generate(",
    ):
        assert call in text, call


def test_the_ranked_snippets_make_the_calls_the_torchrun_test_runs() -> None:
    worker = (Path(__file__).parent / "ddp_worker.py").read_text()
    for ranks, code in snippets():
        if ranks:
            compile(code, str(PAGE), "exec")
    for call in ("DistributedDataParallel(lora)", "accelerator.prepare(lora, optimizer)"):
        assert call in worker, call


def test_the_snippets_run(
    live_server: Server, models_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {"source": str(models_root / "llama"), "name": "docs", "dtype": "float32"}
    httpx.post(f"{live_server.url}/v1/models", json=body).raise_for_status()
    assert wait_ready(live_server.url, "docs")["state"] == "ready"
    adapters = tmp_path / "adapters"
    namespace = {"client": Client(live_server.url), "MODEL": "docs", "ADAPTERS": adapters}
    for ranks, code in snippets():
        if not ranks:
            exec(compile(code, str(PAGE), "exec"), namespace)  # the page's own code
    printed = capsys.readouterr().out
    assert "use DistributedDataParallel instead" in printed  # FSDP refused
    assert "ACCELERATE_USE_DEEPSPEED is set" in printed  # the launcher refused
    assert "perplexity" in printed
    assert (adapters / "legal" / "adapter_config.json").is_file()
    assert httpx.get(f"{live_server.url}/v1/leases").json()["leases"] == []

"""An attached base stays on the service's pages: moves to the device it is on copy
nothing, a move that copies warns once, and DDP's ignore list names the frozen base."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model

from service.worker.client import Client, keep_base_out_of_ddp
from tests.serving.test_server_e2e import Server, wait_ready

pytestmark = pytest.mark.e2e


def pointers(model: torch.nn.Module) -> dict[str, int]:
    return {n: t.data_ptr() for n, t in model.named_parameters() if "lora_" not in n}


def test_moves_to_where_the_base_is_copy_nothing_and_a_real_copy_warns_once(
    live_server: Server, models_root: Path
) -> None:
    body = {"source": str(models_root / "llama"), "name": "moves", "dtype": "float32"}
    httpx.post(f"{live_server.url}/v1/models", json=body).raise_for_status()
    assert wait_ready(live_server.url, "moves")["state"] == "ready"
    with Client(live_server.url).attach("moves", ttl_seconds=30) as attached:
        model: torch.nn.Module = attached  # (transformers types its `.to` oddly)
        before = pointers(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # not one warning
            model.to("cpu:0")
            model.to(torch.device("cpu"), dtype=torch.float32)
            model.cpu()
            model.float()
        assert pointers(model) == before
        lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        lora.to("cpu:0")  # the Trainer's move, through the PEFT wrapper
        wrapped = {
            n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in pointers(lora).items()
        }
        assert wrapped == before
        ignored = keep_base_out_of_ddp(lora)
        parameters = dict(lora.named_parameters())
        assert len([n for n in ignored if n in parameters]) == len(before)  # + the buffers
        assert not any("lora_" in n for n in ignored)
        assert lora._ddp_params_and_buffers_to_ignore == ignored
        with pytest.warns(UserWarning, match=r"copies its \d+ MiB out of the service"):
            model.to(torch.float64)
        assert all(p != before.get(n) for n, p in pointers(model).items())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.to(torch.float32)  # its own copies now: no warning


def test_ddp_leaves_the_ignored_base_alone(
    live_server: Server, models_root: Path, tmp_path: Path
) -> None:
    """A real (one-rank, gloo) DistributedDataParallel over a LoRA-wrapped attached base
    syncs the adapter only."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    body = {"source": str(models_root / "llama"), "name": "ddp", "dtype": "float32"}
    httpx.post(f"{live_server.url}/v1/models", json=body).raise_for_status()
    wait_ready(live_server.url, "ddp")
    init = f"file://{tmp_path / 'rendezvous'}"
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        with Client(live_server.url).attach("ddp", ttl_seconds=30) as model:
            lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
            ignored = set(keep_base_out_of_ddp(lora))
            ddp = DistributedDataParallel(lora)
            assert ddp.parameters_to_ignore == ignored
            synced = {n for n, p in lora.named_parameters() if n not in ignored}
            assert synced and all("lora_" in n for n in synced)
            assert json.dumps(sorted(synced))  # adapters only
    finally:
        dist.destroy_process_group()

"""What DDP, FSDP and the launchers do with an attached base, in this process: DDP built
around a PEFT wrapper skips every base tensor under the wrapper's names (and no adapter),
FSDP and an FSDP/DeepSpeed launch are refused before any copy, and a write into the base
warns once with the copied bytes."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel

from service.worker import ddp
from service.worker.attach import AttachError
from service.worker.client import Client
from tests.serving.test_server_e2e import Server, wait_ready

pytestmark = pytest.mark.e2e


@pytest.fixture
def held(live_server: Server, models_root: Path) -> str:
    body = {"source": str(models_root / "llama"), "name": "ddp", "dtype": "float32"}
    httpx.post(f"{live_server.url}/v1/models", json=body).raise_for_status()
    assert wait_ready(live_server.url, "ddp")["state"] == "ready"
    return live_server.url


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[None]:
    """A gloo process group of one rank, this process."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def copied(model: nn.Module) -> int:
    return ddp.copied_bytes(*cast(tuple[int, int], model.basehold_arena))


def tokens() -> torch.Tensor:
    return torch.arange(3, 19)[None]


def test_ddp_around_peft_skips_the_base_under_the_wrappers_names(held: str, one_rank: None) -> None:
    with Client(held).attach("ddp", ttl_seconds=30) as model:
        base = {n for n, _ in [*model.named_parameters(), *model.named_buffers()]}
        lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        wrapped = DistributedDataParallel(lora)
        ignored = wrapped.parameters_to_ignore
        unprefixed = {
            n.removeprefix("base_model.model.").replace(".base_layer", "") for n in ignored
        }
        assert unprefixed == base  # every base parameter and buffer, as the wrapper names it
        assert not any("lora_" in n for n in ignored)
        trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
        assert trainable and trainable.isdisjoint(ignored)  # the adapters still sync
        assert copied(model) == 0
        head = cast(torch.Tensor, lora.get_output_embeddings().weight)
        head.requires_grad_(True)  # a job training part of the base: that part must sync
        trained = [n for n, p in lora.named_parameters() if p is head]
        assert trained and not set(trained) & set(ddp.ignore_base(lora))


def test_fsdp_is_refused_before_any_copy(held: str) -> None:
    with Client(held).attach("ddp", ttl_seconds=30) as model:
        lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        with pytest.raises(ddp.ShardedBaseError, match="use DistributedDataParallel instead"):
            FullyShardedDataParallel(lora)
        assert copied(model) == 0


@pytest.mark.parametrize(
    ("variable", "what"),
    [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")],
)
def test_a_sharding_launch_is_refused_before_mapping(
    held: str, monkeypatch: pytest.MonkeyPatch, variable: str, what: str
) -> None:
    monkeypatch.setenv(variable, "true")  # what `accelerate launch --use_fsdp` ... exports
    refused = pytest.raises(AttachError, match=f"{variable} is set: {what} .* instead")
    with refused, Client(held).attach("ddp", ttl_seconds=30):
        pass
    assert httpx.get(f"{held}/v1/leases").json()["leases"] == []  # released


def test_a_write_into_the_base_warns_once_with_the_bytes(
    held: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ddp, "CHECK_EVERY_S", 0.0)  # check at every forward, not every 30 s
    with Client(held).attach("ddp", ttl_seconds=30) as model:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(input_ids=tokens())  # nothing copied: no warning
        weight = cast(torch.Tensor, model.get_input_embeddings().weight)
        with torch.no_grad():
            weight.mul_(1.0)  # an in-place write: every page of it becomes this process's
        nbytes = weight.numel() * weight.element_size()
        assert copied(model) >= nbytes
        with pytest.warns(UserWarning, match=r"\d+\.\d MiB of the attached base ddp were copied"):
            model(input_ids=tokens())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(input_ids=tokens())  # once

"""What makes an attach fast must not change what it returns: the timing seam records
phases only while a collector is open; the per-process config cache never hands out a model of
an older load (a model unloaded and loaded again under the same id); every attach is a
model of its own; and an attach by id leases at once, yet still waits for a model that
does not exist yet."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from service.worker import timing
from service.worker.client import Client, lease_of
from tests.conftest import until
from tests.serving.test_server_e2e import Server


def test_phases_are_recorded_only_inside_a_collector_and_per_thread() -> None:
    with timing.phase("outside"):
        pass  # no collector: nothing to record into, and no error
    other: dict[str, float] = {}

    def elsewhere() -> None:
        with timing.collect() as spent, timing.phase("theirs"):
            pass
        other.update(spent)

    with timing.collect() as spent:
        with timing.phase("ours"):
            thread = threading.Thread(target=elsewhere)
            thread.start()
            thread.join()
        with timing.phase("ours"):
            pass
    assert set(spent) == {"ours"} and spent["ours"] >= 0
    assert set(other) == {"theirs"}
    with timing.phase("after"):
        pass
    assert set(spent) == {"ours"}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.e2e
def test_a_model_loaded_again_under_its_id_is_attached_on_its_new_arena(
    live_server: Server, models_root: Path
) -> None:
    """Attached, force-unloaded, loaded again under the same id from another checkpoint
    (tied embeddings: another config) and attached again in the same process: the second
    model is the new load's, the first keeps the old one's weights, and the two share no
    tensor, parameter or config."""
    client = Client(live_server.url)
    untied, tied = _weights(models_root / "llama"), _weights(models_root / "llama-tied")
    client.ensure({"source": str(models_root / "llama"), "name": "again", "dtype": "float32"})
    with client.attach("again", ttl_seconds=5) as first:
        with pytest.warns(UserWarning, match="was lost"):
            client.unload("again", force=True)
            until(lambda: lease_of(first).lost, "the first lease was lost to the unload")
        request = {"source": str(models_root / "llama-tied"), "name": "again"}
        client.ensure({**request, "dtype": "float32"})
        with client.attach("again", ttl_seconds=5) as second:
            assert second.lm_head.weight is second.model.embed_tokens.weight
            assert first.lm_head.weight is not first.model.embed_tokens.weight
            assert torch.equal(second.lm_head.weight, tied["model.embed_tokens.weight"])
            assert torch.equal(first.lm_head.weight, untied["lm_head.weight"])
            a, b = dict(first.named_parameters()), dict(second.named_parameters())
            for name, tensor in b.items():
                assert torch.equal(tensor, tied[name]), name
                assert tensor is not a.get(name)
            arenas: list[Any] = [first.basehold_arena, second.basehold_arena]
            assert arenas[0][0] != arenas[1][0]  # two mappings (the first is still mapped)
            assert first.config is not second.config
            assert second.config.tie_word_embeddings and not first.config.tie_word_embeddings


@pytest.mark.e2e
def test_two_attaches_of_one_model_are_independent_models(
    live_server: Server, models_root: Path
) -> None:
    client = Client(live_server.url)
    client.ensure({"source": str(models_root / "llama"), "name": "twice", "dtype": "float32"})
    tokens = torch.tensor([[1, 5, 9, 2]])
    with client.attach("twice") as one, client.attach("twice") as two:
        ids = {id(p) for p in one.parameters()}
        assert not ids & {id(p) for p in two.parameters()}
        assert not {id(b) for b in one.buffers()} & {id(b) for b in two.buffers()}
        one.config.use_cache = not two.config.use_cache
        assert one.config.use_cache != two.config.use_cache
        assert one.generation_config is not two.generation_config
        with torch.no_grad(), pytest.warns(UserWarning, match="were copied into this process"):
            one.lm_head.weight.mul_(0)  # this process's own pages now, for `one` only
            assert two.lm_head.weight.abs().sum() > 0
            assert not torch.equal(one(tokens).logits, two(tokens).logits)


@pytest.mark.e2e
def test_an_attach_by_id_waits_for_a_model_that_does_not_exist_yet(
    live_server: Server, models_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The attach leases at once; refused (no such model yet) it waits, then leases."""
    got: dict[str, Any] = {}

    def job() -> None:
        with Client(live_server.url).attach("not-yet", wait=120) as model:
            got["lease"] = lease_of(model).model_id
            got["weight"] = model.lm_head.weight.clone()

    caplog.set_level(logging.WARNING, logger="basehold.client")
    thread = threading.Thread(target=job)
    thread.start()
    until(lambda: "'not-yet' does not exist yet" in caplog.text, "the job waits for it")
    client = Client(live_server.url)
    client.load(source=str(models_root / "llama"), name="not-yet", dtype="float32")
    thread.join(timeout=120)
    assert got["lease"] == "not-yet"
    assert torch.equal(got["weight"], _weights(models_root / "llama")["lm_head.weight"])

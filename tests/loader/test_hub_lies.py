"""A hub that lies (a mirror or proxy that is not the Hub): nothing it says becomes a path
outside the HF cache, what it sends is counted against what it listed, and a lie fails the
estimate or load with a stable code while the service keeps serving. Against the stand-in
hub (`tests.hub.Lies`), real HTTP, the real huggingface_hub in real loader processes."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.common.load.hub_checks import CONFIG_MAX_BYTES
from tests.conftest import ClientFactory, until, wait_for
from tests.hub import Lies, LocalHub
from tests.loader.test_hub import HEADER_READ, WEIGHTS, weight_reads

CANARY = b'{"model_type": "canary"}\n'
MiB = 1 << 20


@pytest.fixture
def liar_client(make_client: ClientFactory, hub: LocalHub) -> TestClient:
    return make_client(hf_endpoint=hub.url, download_retries=2, download_backoff_seconds=0.2)


@pytest.fixture
def canary(tmp_path: Path) -> Callable[[], None]:
    """A checkpoint folder beside the HF cache (`tmp_path/hf-cache`); the returned check
    asserts it still holds exactly its own bytes (nothing written, created or replaced)."""
    folder = tmp_path / "canary"
    folder.mkdir()
    (folder / "config.json").write_bytes(CANARY)

    def intact() -> None:
        found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        assert found == ["config.json"], found
        assert (folder / "config.json").read_bytes() == CANARY

    return intact


def outside(tmp_path: Path, how: str, name: str) -> str:
    """A path to `canary/<name>` from a folder two below the cache's repo folder
    (`models--acme--liar/blobs`, `/trees`, `/.no_exist/<commit>`), or absolute."""
    return f"../../../canary/{name}" if how == "relative" else str(tmp_path / "canary" / name)


def problem(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    detail: str = body["detail"]
    return detail


def still_serving(client: TestClient) -> None:
    response = client.post("/v1/estimate", json={"source": "acme/llama", "dtype": "float32"})
    assert response.status_code == 200, response.text


def load_error(client: TestClient, source: str) -> tuple[str, str]:
    """The code and message a load of `source` fails with (at POST, or later)."""
    response = client.post("/v1/models", json={"source": source})
    if response.status_code != 202:
        return response.json()["code"], response.json()["detail"]
    status = wait_for(client, response.json()["id"])
    assert status["state"] == "failed", status
    return status["error"]["code"], status["error"]["message"]


def failed_load(client: TestClient, source: str, code: str) -> str:
    found, message = load_error(client, source)
    assert found == code, message
    return message


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_a_commit_that_is_not_a_sha_writes_nothing_outside_the_cache(
    liar_client: TestClient,
    hub: LocalHub,
    models_root: Path,
    tmp_path: Path,
    canary: Callable[[], None],
    how: str,
) -> None:
    """The repo info's `sha` became the tree cache's file name (`trees/<sha>.json`)."""
    lie = outside(tmp_path, how, "config")  # + ".json"
    hub.add("acme/liar", models_root / "llama", lies=Lies(commit=lie))
    response = liar_client.post("/v1/estimate", json={"source": "acme/liar"})
    canary()
    detail = problem(response, 502, "download_failed")
    assert "commit" in detail and "HF_ENDPOINT" in detail
    assert "commit" in failed_load(liar_client, "acme/liar", "download_failed")
    canary()
    still_serving(liar_client)


@pytest.mark.parametrize("how", ["relative", "absolute"])
@pytest.mark.parametrize("name", ["config.json", WEIGHTS])
def test_an_etag_that_is_a_path_writes_nothing_outside_the_cache(
    liar_client: TestClient,
    hub: LocalHub,
    models_root: Path,
    tmp_path: Path,
    canary: Callable[[], None],
    how: str,
    name: str,
) -> None:
    """huggingface_hub names the blob after the HEAD's ETag (X-Linked-Etag for LFS files)."""
    lies = Lies(etags={name: outside(tmp_path, how, "config.json")})
    hub.add("acme/liar", models_root / "llama", lies=lies)
    if name == "config.json":  # an estimate fetches config.json
        response = liar_client.post("/v1/estimate", json={"source": "acme/liar"})
        canary()
        assert "ETag" in problem(response, 502, "download_failed")
    else:
        code, message = load_error(liar_client, "acme/liar")
        canary()
        assert code == "download_failed" and "ETag" in message, message
    canary()
    still_serving(liar_client)


@pytest.mark.parametrize(
    "name",
    [
        "../../../canary/config.json",
        "ABSOLUTE",
        "sub\\..\\..\\x.json",
        "nul\x00.json",
    ],
)
def test_a_listed_name_that_leaves_the_repo_fails_before_any_file_is_fetched(
    liar_client: TestClient,
    hub: LocalHub,
    models_root: Path,
    tmp_path: Path,
    canary: Callable[[], None],
    name: str,
) -> None:
    name = str(tmp_path / "canary" / "config.json") if name == "ABSOLUTE" else name
    hub.add("acme/liar", models_root / "llama", lies=Lies(names={"generation_config.json": name}))
    response = liar_client.post("/v1/estimate", json={"source": "acme/liar"})
    assert "file name" in problem(response, 502, "download_failed")
    assert hub.bytes_served("acme/liar") == 0
    assert "file name" in failed_load(liar_client, "acme/liar", "download_failed")
    assert hub.bytes_served("acme/liar") == 0
    canary()
    still_serving(liar_client)


def test_a_config_json_over_the_cap_is_refused_before_it_is_fetched(
    liar_client: TestClient, hub: LocalHub, models_root: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "big-config"
    shutil.copytree(models_root / "llama", folder)
    with (folder / "config.json").open("ab") as fh:  # still valid JSON: trailing spaces
        fh.write(b" " * (CONFIG_MAX_BYTES + MiB))
    hub.add("acme/big-config", folder)
    response = liar_client.post("/v1/estimate", json={"source": "acme/big-config"})
    detail = problem(response, 400, "invalid_checkpoint")
    assert "config.json" in detail and f"{CONFIG_MAX_BYTES // MiB} MiB" in detail
    assert hub.bytes_served("acme/big-config") == 0
    still_serving(liar_client)


@pytest.mark.parametrize("length", ["with-length", "no-length"])
def test_a_config_json_longer_than_listed_is_cut_off(
    liar_client: TestClient, hub: LocalHub, models_root: Path, length: str
) -> None:
    """It lists config.json at its size and sends 20 MiB more: the estimate fails at the
    first bytes over, not after the hub has sent them all."""
    lies = Lies(extra={"config.json": 20 * MiB})
    if length == "no-length":
        lies.no_length.add("config.json")
    hub.add("acme/liar", models_root / "llama", lies=lies)
    hub.faults.rate = 20 * MiB  # a second for the whole body, if it were read
    response = liar_client.post("/v1/estimate", json={"source": "acme/liar"})
    detail = problem(response, 502, "download_failed")
    assert "more than" in detail and "config.json" in detail
    assert hub.bytes_served("acme/liar", "config.json") < MiB
    hub.faults.rate = None
    still_serving(liar_client)


@pytest.mark.parametrize("length", ["with-length", "no-length"])
def test_weights_longer_than_listed_fail_the_load_download_failed(
    liar_client: TestClient, hub: LocalHub, bigger: Path, tmp_path: Path, length: str
) -> None:
    """It lists the weights at 200 KB and sends 21 MB: the load fails at the first bytes
    over (once: a lie is not retried), and nothing of it stays in the cache."""
    claimed = 200_000
    lies = Lies(no_length={WEIGHTS} if length == "no-length" else set())
    repo = hub.add("acme/liar", bigger, claimed={WEIGHTS: claimed}, lies=lies)
    hub.faults.rate = 20 * MiB
    message = failed_load(liar_client, "acme/liar", "download_failed")
    assert "more than" in message and WEIGHTS in message
    assert weight_reads(hub, "acme/liar").count(None) == 1
    assert hub.bytes_served("acme/liar", WEIGHTS) - HEADER_READ < MiB
    blobs = tmp_path / "hf-cache" / "models--acme--liar" / "blobs"
    sha = repo.files[WEIGHTS].sha256
    assert sha is not None
    until(lambda: not [b for b in blobs.iterdir() if b.name.startswith(sha)], "partial removed")
    hub.faults.rate = None
    still_serving(liar_client)


@pytest.mark.parametrize("commit", ["../../../canary/made", "f" * 40])
def test_an_x_repo_commit_that_is_not_the_commit_is_refused(
    liar_client: TestClient,
    hub: LocalHub,
    models_root: Path,
    canary: Callable[[], None],
    commit: str,
) -> None:
    """A HEAD's X-Repo-Commit names the snapshot folder, and on a 404 the `.no_exist`
    folder huggingface_hub creates."""
    lies = Lies(header_commit=commit, missing={"config.json"} if "/" in commit else set())
    hub.add("acme/liar", models_root / "llama", lies=lies)
    response = liar_client.post("/v1/estimate", json={"source": "acme/liar"})
    canary()
    assert "X-Repo-Commit" in problem(response, 502, "download_failed")
    still_serving(liar_client)


def test_a_cached_file_of_another_size_than_listed_is_fetched_again(
    liar_client: TestClient, hub: LocalHub, tmp_path: Path
) -> None:
    """What the download leaves is checked against the listing (a blob written by a path
    the HTTP checks do not see, such as Xet, or damaged since): a file of another size is
    removed and fetched again."""
    first = wait_for(
        liar_client, liar_client.post("/v1/models", json={"source": "acme/llama"}).json()["id"]
    )
    assert first["state"] == "ready", first
    assert liar_client.delete(f"/v1/models/{first['id']}").status_code in (202, 204)
    until(lambda: liar_client.get(f"/v1/models/{first['id']}").status_code == 404, "unloaded")
    listed = hub.repos["acme/llama"].files["generation_config.json"]
    blob = tmp_path / "hf-cache" / "models--acme--llama" / "blobs" / listed.blob_id
    with blob.open("ab") as fh:  # still valid JSON
        fh.write(b" " * 4096)
    hub.reset_counts()
    again = wait_for(
        liar_client, liar_client.post("/v1/models", json={"source": "acme/llama"}).json()["id"]
    )
    assert again["state"] == "ready", again
    assert blob.read_bytes() == listed.path.read_bytes()
    assert hub.bytes_served("acme/llama", "generation_config.json") == listed.size


def test_a_hub_that_redirects_on_its_own_host_still_loads(
    liar_client: TestClient, hub: LocalHub
) -> None:
    """What huggingface_hub does not read is not held against the hub: the headers of a
    redirect it follows on the hub's own host (the Hub's `resolve-cache`)."""
    hub.faults.resolve_cache = True
    still_serving(liar_client)
    status = wait_for(
        liar_client, liar_client.post("/v1/models", json={"source": "acme/llama"}).json()["id"]
    )
    assert status["state"] == "ready", status
    assert any(r.status == 307 and r.method == "HEAD" for r in hub.requests), hub.requests


def test_an_endpoint_that_is_not_the_hub_gets_no_xet_download(
    liar_client: TestClient, hub: LocalHub, models_root: Path
) -> None:
    """hf_xet's bytes do not pass through the HTTP checks: from an endpoint that is not
    the Hub over TLS, a file announced as Xet comes over HTTP, counted like any other."""
    hub.add("acme/xet", models_root / "llama", lies=Lies(xet={WEIGHTS}))
    status = wait_for(
        liar_client, liar_client.post("/v1/models", json={"source": "acme/xet"}).json()["id"]
    )
    assert status["state"] == "ready", status
    assert weight_reads(hub, "acme/xet").count(None) == 1
    assert not [r for r in hub.requests if "xet-read-token" in r.path]

"""The inputs an outsider tried, each answered with a 4xx problem and nothing worse."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from tests.conftest import Answer, ClientFactory, CopyFactory, until
from tests.serving.api.test_auth import KEYS, bearer
from tests.serving.test_server_e2e import Server, start
from tests.spawn import run_basehold


def problem(response: Answer, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, object] = response.json()
    assert body["code"] == code and body["detail"], body
    return body


@pytest.fixture
def copy_llama(checkpoint_copy: CopyFactory) -> Path:
    return checkpoint_copy("llama")


def test_symlinked_weight_file_outside_the_roots_is_refused(
    client: TestClient, copy_llama: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    (copy_llama / "model.safetensors").rename(outside)
    (copy_llama / "model.safetensors").symlink_to(outside)
    response = client.post("/v1/models", json={"source": str(copy_llama)})
    assert "leaves the allowed model roots" in str(
        problem(response, 403, "source_not_allowed")["detail"]
    )
    assert client.get("/v1/models").json()["models"] == []


def test_index_entry_outside_the_folder_is_refused(client: TestClient, copy_llama: Path) -> None:
    (copy_llama / "model.safetensors").rename(copy_llama.parent / f"{copy_llama.name}.st")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": f"../{copy_llama.name}.st"}}
    (copy_llama / "model.safetensors.index.json").write_text(json.dumps(index))
    response = client.post("/v1/models", json={"source": str(copy_llama)})
    problem(response, 403, "source_not_allowed")
    (copy_llama.parent / f"{copy_llama.name}.st").unlink()


def test_estimate_with_remote_code_needs_admin(
    make_client: ClientFactory, models_root: Path
) -> None:
    client = make_client(api_keys=KEYS, allow_remote_code=True)
    body = {"source": str(models_root / "llama"), "trust_remote_code": True}
    response = client.post("/v1/estimate", json=body, headers=bearer("reader-key-123"))
    assert "admin" in str(problem(response, 403, "forbidden")["detail"])
    admin = client.post("/v1/estimate", json=body, headers=bearer("admin-key-123"))
    assert admin.status_code == 200, admin.text


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"device_map": "cuda:\u0663"}, 400),  # an Arabic-Indic digit
        ({"device_map": "cuda:\u00b2"}, 400),  # a superscript two
        ({"device_map": {"model.layers.0": "cuda:\u0663"}}, 400),
        ({"device_map": {"": -1}}, 422),
        ({"device_map": "auto", "max_memory": {"9" * 5000: "1GiB"}}, 422),
        ({"device_map": "auto", "max_memory": {"cpu": "inf GiB"}}, 400),
        ({"device_map": "auto", "max_memory": {"cpu": "1e400GiB"}}, 400),
        ({"device_map": {f"model.layers.{i}": "cpu" for i in range(5000)}}, 422),
        ({"quantization": {"method": "bnb-4bit", "skip_modules": ["x"] * 2000}}, 422),
    ],
)
def test_bad_values_are_4xx_problems(
    client: TestClient, models_root: Path, body: dict[str, object], status: int
) -> None:
    response = client.post("/v1/models", json={"source": str(models_root / "llama"), **body})
    code = "invalid_spec"
    problem(response, status, code)


@pytest.mark.parametrize("value", ["abc", "\u0663", "1" * 40, "-1", "1.5"])
def test_last_event_id_must_be_a_small_number(client: TestClient, value: str) -> None:
    response = client.get("/v1/events", headers={b"Last-Event-ID": value.encode()})
    problem(response, 422, "invalid_spec")


def test_foreign_host_is_refused_without_keys(client: TestClient) -> None:
    for host in ("evil.example", "127.0.0.1.nip.io", "localhost.evil.example"):
        problem(client.get("/v1/models", headers={"Host": host}), 400, "invalid_host")
    for host in ("localhost", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"):
        assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_and_keyed_servers_take_other_names(make_client: ClientFactory) -> None:
    listed = make_client(allowed_hosts=["basehold.internal"])
    assert listed.get("/v1/models", headers={"Host": "basehold.internal:8000"}).status_code == 200
    keyed = make_client(api_keys=KEYS)
    headers = {"Host": "basehold.internal", **bearer("reader-key-123")}
    assert keyed.get("/v1/models", headers=headers).status_code == 200


@pytest.fixture
def live(tmp_path: Path, models_root: Path) -> Iterator[Server]:
    env = {
        "BASEHOLD_MODEL_ROOTS": json.dumps([str(models_root)]),
        "BASEHOLD_API_KEYS": json.dumps(KEYS),
    }
    server = start(tmp_path, [], env=env)
    yield server
    server.stop()


def test_a_huge_body_without_a_key_is_refused_before_it_is_read(live: Server) -> None:
    rss_before = psutil.Process(live.pid).memory_info().rss
    big = b'{"source": "' + b"x" * (23 << 20) + b'"}'
    started = time.monotonic()
    answer = httpx.post(
        f"{live.url}/v1/models", content=big, headers={"Content-Type": "application/json"}
    )
    problem(answer, 413, "payload_too_large")
    # Streamed, with no Content-Length: refused once the limit is passed.
    chunks = (b"x" * (1 << 20) for _ in range(23))
    streamed = httpx.post(f"{live.url}/v1/models", content=chunks, timeout=60)
    problem(streamed, 413, "payload_too_large")
    assert time.monotonic() - started < 10
    assert psutil.Process(live.pid).memory_info().rss - rss_before < 50 << 20
    assert httpx.get(f"{live.url}/healthz").status_code == 200


def test_no_control_characters_reach_the_log(live: Server) -> None:
    sock = json.loads(httpx.get(f"{live.url}/openapi.json").text)  # any request: the server is up
    assert sock
    socket_path = str(live.socket)
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(socket_path)
        conn.sendall(
            json.dumps({"lease_id": "x\nERROR forged line", "secret": "s"}).encode() + b"\n"
        )
        conn.recv(4096)
    deadline = time.monotonic() + 30
    while "forged line" not in (log := live.output()):
        assert time.monotonic() < deadline, "the refusal was never logged"
        time.sleep(0.05)
    assert not any(line.startswith("ERROR forged") for line in log.splitlines())


def test_bad_api_keys_never_show_a_key(tmp_path: Path) -> None:
    secret = "sk-live-0123456789abcdef"
    values = [json.dumps({secret: []}), json.dumps({secret[:5]: ["admin"]}), "{" + secret]
    for value in values:
        env = {**os.environ, "BASEHOLD_STATE_DIR": str(tmp_path), "BASEHOLD_API_KEYS": value}
        result = run_basehold(["serve", "--port", "1"], env, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "BASEHOLD_API_KEYS" in result.stderr or "api_keys" in result.stderr
        for fragment in (secret[:5], secret[-4:], "sk-li"):
            assert fragment not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "source",
    ["/models/a\x00b", "/models/" + "x" * 256, "/models/" + "é" * 128],
    ids=["nul", "long-component", "long-component-in-bytes"],
)
@pytest.mark.parametrize("route", ["/v1/models", "/v1/estimate"])
def test_paths_the_kernel_cannot_take_answer_400(
    client: TestClient, source: str, route: str
) -> None:
    detail = problem(client.post(route, json={"source": source}), 400, "invalid_spec")["detail"]
    assert "path" in str(detail)


# Every route with a path parameter, with a control character in the parameter.
CONTROL_PATHS = [
    ("GET", "/v1/models/{id}/files/tokenizer{c}.json"),  # answered 500 (embedded null byte)
    ("GET", "/v1/models/{id}/files/sub{c}/config.json"),
    ("GET", "/v1/models/{id}{c}/files"),
    ("GET", "/v1/models/{id}{c}"),
    ("DELETE", "/v1/models/{id}{c}"),
    ("POST", "/v1/models/{id}{c}/leases"),
    ("POST", "/v1/leases/lease-x{c}/renew"),
    ("DELETE", "/v1/leases/lease-x{c}"),
]


def test_control_characters_in_a_path_parameter_answer_400(live: Server, models_root: Path) -> None:
    admin = bearer("admin-key-123")
    answer = httpx.post(
        f"{live.url}/v1/models",
        json={"source": str(models_root / "gpt2"), "dtype": "float32"},
        headers=admin,
    )
    assert answer.status_code == 202, answer.text
    model_id = answer.json()["id"]
    until(
        lambda: (
            httpx.get(f"{live.url}/v1/models/{model_id}", headers=admin).json()["state"] == "ready"
        ),
        "the model to be ready",
    )
    for character in ("%00", "%01", "%0A", "%0d", "%1F", "%7F"):
        for method, template in CONTROL_PATHS:
            url = live.url + template.format(id=model_id, c=character)
            body = {"holder": "h"} if template.endswith("/leases") else None
            answer = httpx.request(method, url, headers=admin, json=body)
            detail = str(problem(answer, 400, "invalid_path")["detail"])
            assert "control character" in detail, (method, url, detail)
    assert "unhandled error" not in live.output()
    # The same names without the character are served as before.
    got = httpx.get(f"{live.url}/v1/models/{model_id}/files/config.json", headers=admin)
    assert got.status_code == 200

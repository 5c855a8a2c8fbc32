"""docs/api.md says what the code does: every path the service serves is in it and every
path it names is served; its error codes are exactly the service's. No link in the
repository's docs points outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from service.common import errors
from tests.conftest import ClientFactory

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"
# Served outside the OpenAPI document (pages and static assets).
NOT_IN_OPENAPI = {"/", "/docs", "/redoc", "/openapi.json"}
# Every literal `problem(STATUS, "code", ...)` the service sends (/readyz, the guards'
# `_answer`), beside the domain errors' codes and the HTTP layer's.
PROBLEM_CALL = re.compile(
    r'(?:problem\(|_answer\(\s*scope,\s*receive,\s*send,)\s*(\d+),\s*"([a-z_]+)"'
)
HTTP_LAYER_CODES = {"not_found", "method_not_allowed", "unauthorized", "forbidden"}
HTTP_LAYER_CODES |= {"unsupported_media_type", "http_error"}


def documented_paths() -> set[str]:
    text = API.read_text()
    found = set(re.findall(r"`(?:GET|POST|DELETE|PUT|PATCH) (/[^` ?]*)", text))
    return found


def test_every_served_path_is_documented_and_every_documented_one_served(
    client: TestClient,
) -> None:
    served = set(client.get("/openapi.json").json()["paths"])
    documented = documented_paths()
    assert served - documented == set(), "served but not in docs/api.md"
    assert documented - served - NOT_IN_OPENAPI == set(), "in docs/api.md but not served"
    for page in NOT_IN_OPENAPI & documented:
        assert client.get(page).status_code == 200, page


def test_error_codes_are_exactly_the_services() -> None:
    """Both ways: every code the service can answer is in the table with its status, and
    every code in the table is one the service answers."""
    rows = re.findall(r"^\| `([a-z_]+)` \| ([0-9x, ]+) \|", API.read_text(), flags=re.M)
    table = {code: status for code, status in rows}
    assert len(rows) == len(table), "a code is listed twice"
    sent: dict[str, set[str]] = {}
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.BaseholdError):
            sent.setdefault(cls.code, set()).add(str(cls.status))
    source = "\n".join(p.read_text() for p in (ROOT / "service").rglob("*.py"))
    for status, code in PROBLEM_CALL.findall(source):
        sent.setdefault(code, set()).add(status)
    problems = (ROOT / "service" / "serving" / "api" / "problems.py").read_text()
    for code in HTTP_LAYER_CODES:
        assert f'"{code}"' in problems, f"{code} is no longer sent by the HTTP layer"
        sent.setdefault(code, set())
    assert set(table) == set(sent), "docs/api.md's codes differ from the service's"
    for code, statuses in sent.items():
        listed = {s.strip() for s in table[code].split(",")}
        assert statuses <= listed or "4xx" in listed, (code, statuses, listed)


def test_every_route_behind_a_key_lists_401_and_403(make_client: ClientFactory) -> None:
    client = make_client(api_keys={"reader-key-123": ["read"]})
    paths = client.get("/openapi.json").json()["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            asked = client.request(method.upper(), path.replace("{", "x").replace("}", ""))
            if asked.status_code != 401:  # open (health), or not behind a key
                continue
            assert {"401", "403"} <= set(operation["responses"]), (method, path)


def test_no_link_leaves_the_repository() -> None:
    markdown = [p for p in ROOT.rglob("*.md") if ".venv" not in p.parts and ".git" not in p.parts]
    assert API in markdown
    for page in markdown:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a URL, not a file
            resolved = (page.parent / target).resolve()
            assert ROOT in resolved.parents or resolved == ROOT, f"{page}: {target}"
            assert resolved.exists(), f"{page}: {target} does not exist"

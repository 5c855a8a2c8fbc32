"""docs/api.md says what the code does: every path the service serves is in it and every
path it names is served; its error codes are exactly the service's. No link in the
repository's docs points outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from service.common import errors

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"
# Served outside the OpenAPI document (pages and static assets).
NOT_IN_OPENAPI = {"/", "/docs", "/redoc", "/openapi.json"}
# Problems sent by the request guards and /readyz rather than raised as domain errors.
GUARD_CODES = {"payload_too_large", "invalid_host", "not_ready", "restoring", "socket_down"}


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
    table = re.findall(r"^\| `([a-z_]+)` \| [0-9, ]+ \|", API.read_text(), flags=re.M)
    assert len(table) == len(set(table)), "a code is listed twice"
    raised = {
        cls.code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.BaseholdError)
    }
    source = "\n".join(p.read_text() for p in (ROOT / "service").rglob("*.py"))
    for code in GUARD_CODES:
        assert f'"{code}"' in source, f"{code} is no longer sent by the service"
    assert set(table) == raised | GUARD_CODES


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

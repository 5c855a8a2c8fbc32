"""The dashboard in headless Chromium (Debian's /usr/bin/chromium via Playwright)."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.hub import LocalHub
from tests.serving.test_server_e2e import Server, start

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium"),
]
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE_HOLDER = """trainer "on" the 'board' <img src=x onerror="window.pwned=1">"""
ADMIN = "dash-admin-key-1"
WORKER = "dash-worker-key-1"


@pytest.fixture
def secured(tmp_path: Path, models_root: Path) -> Iterator[Server]:
    env = {
        "BASEHOLD_MODEL_ROOTS": json.dumps([str(models_root)]),
        "BASEHOLD_API_KEYS": json.dumps({ADMIN: ["admin"], WORKER: ["worker"]}),
    }
    running = start(tmp_path, [], env=env)
    yield running
    running.stop()


def test_dashboard_shows_model_and_unloads(
    secured: Server, models_root: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    auth = {"Authorization": f"Bearer {ADMIN}"}
    created = httpx.post(
        f"{secured.url}/v1/models",
        headers=auth,
        json={
            "source": str(models_root / "llama"),
            "name": "dash",
            "quantization": {"method": "bnb-4bit", "double_quant": True},
        },
    )
    assert created.status_code == 202
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        violations: list[str] = []
        page.on(
            "console",
            lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
        )
        page.goto(secured.url + "/")
        # Auth is on: the page asks for a key before it shows anything.
        expect(page.locator("#auth")).to_be_visible()
        page.fill("#key", ADMIN)
        page.click("#auth button")
        row = page.locator('tr[data-model="dash"]')
        expect(row.locator(".state")).to_have_text("ready", timeout=30_000)
        status = httpx.get(f"{secured.url}/v1/models/dash", headers=auth).json()
        mib = status["memory"]["footprint_bytes"] / 1024
        expect(row.locator(".footprint")).to_have_text(f"{mib:.0f} KiB")
        expect(row).to_contain_text("4-bit nf4 + dq")
        expect(page.locator('.device[data-device="host"]')).to_be_visible()
        # Nothing leased: the arena bar is empty, not full; a lease fills its share.
        arena = page.locator('.device[data-device="shared arena"]')
        expect(arena).to_contain_text(
            re.compile(r"(?<![\d.])0 B leased of [1-9][\d.]* \w+ lendable")
        )
        assert arena.locator("span.leased").get_attribute("style") == "width:0%"
        lease = httpx.post(
            f"{secured.url}/v1/models/dash/leases",
            headers={"Authorization": f"Bearer {WORKER}"},
            json={"holder": HOSTILE_HOLDER, "ttl_seconds": 600},
        ).json()
        leased = page.locator(f'tr[data-lease="{lease["lease_id"]}"]')
        expect(leased.locator(".holder")).to_have_text(HOSTILE_HOLDER)  # text, not markup
        assert page.evaluate("window.pwned") is None
        assert page.evaluate("""esc(`<a href="x" title='y'>&`)""") == (
            "&lt;a href=&quot;x&quot; title=&#39;y&#39;&gt;&amp;"
        )
        expect(leased).to_contain_text("dash")
        expect(leased.locator(".expiry")).to_contain_text(" s")
        expect(arena).not_to_contain_text("0 B leased")
        width = arena.locator("span.leased").get_attribute("style") or ""
        assert float(width.removeprefix("width:").removesuffix("%")) > 0, width
        # The memory chart keeps a point per sampling interval: after a few the host line
        # has several.
        chart = page.locator('.chart[data-chart="host"] polyline.line-held')
        page.wait_for_function(
            """() => {
              const line = document.querySelector('.chart[data-chart="host"] .line-held');
              return line && line.getAttribute("points").split(" ").length >= 3;
            }""",
            timeout=30_000,
        )
        expect(chart).to_have_count(1)
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        page.once("dialog", lambda dialog: dialog.accept())  # "revoke its leases?"
        row.locator("button").click()
        expect(page.locator('tr[data-model="dash"]')).to_have_count(0, timeout=30_000)
        browser.close()
    assert violations == [], violations  # the page works under its own policy
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert httpx.get(f"{secured.url}/v1/models/dash", headers=auth).status_code == 404


def test_api_docs_render_offline(secured: Server) -> None:
    """/docs and /redoc load Swagger UI and ReDoc from the service itself: with every
    other host unreachable (and forbidden by the policy) the docs still render."""
    from playwright.sync_api import Route, expect, sync_playwright

    for path in ("/docs", "/redoc"):
        page = httpx.get(secured.url + path)
        assert page.status_code == 200
        assert "cdn." not in page.text and "https://" not in page.text.replace(
            "https://fastapi.tiangolo.com", ""
        )
        assert "connect-src 'self'" in page.headers["content-security-policy"]
    asset = httpx.get(secured.url + "/static/docs/swagger-ui-bundle.js")
    assert asset.status_code == 200 and len(asset.content) > 100_000
    outside: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        docs = browser.new_page()

        def only_local(route: Route) -> None:
            url = route.request.url
            if url.startswith(secured.url):
                route.continue_()
            else:
                outside.append(url)
                route.abort()

        docs.route("**/*", only_local)
        docs.goto(secured.url + "/docs")
        expect(docs.locator(".swagger-ui .info .title")).to_contain_text("basehold", timeout=30_000)
        expect(docs.locator(".opblock-summary-path").first).to_be_visible()
        docs.goto(secured.url + "/redoc")
        expect(docs.locator("h1").first).to_contain_text("basehold", timeout=30_000)
        browser.close()
    assert outside == [], outside


def test_every_answer_carries_the_security_headers(secured: Server) -> None:
    for path in ("/", "/healthz", "/v1/models", "/openapi.json", "/docs"):
        answer = httpx.get(secured.url + path)
        assert answer.headers["x-content-type-options"] == "nosniff", path
        assert answer.headers["x-frame-options"] == "DENY", path
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"], path
    dashboard = httpx.get(secured.url + "/").headers["content-security-policy"]
    script_src = next(d for d in dashboard.split(";") if d.strip().startswith("script-src"))
    assert "'sha256-" in script_src and "unsafe" not in script_src


def test_dashboard_shows_a_hub_download_in_percent(hub_server: Server, hub: LocalHub) -> None:
    """A hub load's row shows phase `downloading` and the share of its bytes on disk."""
    from playwright.sync_api import expect, sync_playwright

    hub.faults.rate = sum(f.size for f in hub.repos["acme/bigger"].files.values()) / 6
    body = {"source": "acme/bigger", "name": "dl", "dtype": "float32"}
    assert httpx.post(f"{hub_server.url}/v1/models", json=body).status_code == 202
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.goto(hub_server.url + "/")
        row = page.locator('tr[data-model="dl"]')
        progress = row.locator("td").nth(2)
        expect(progress).to_contain_text(re.compile(r"downloading [1-9]\d*%"), timeout=60_000)
        # Nothing is placed while it loads: not "(private)" (only a ready model can be).
        expect(row.locator(".state")).to_have_text("loading")
        expect(row).not_to_contain_text("(private)")
        expect(row.locator(".state")).to_have_text("ready", timeout=120_000)
        browser.close()


def test_a_fresh_page_draws_the_last_minutes_on_axes(
    live_server: Server, models_root: Path
) -> None:
    """A tab opened now starts from the service's history (samples older than the page),
    on a time axis and a byte axis scaled to what is held (KiB for this tiny model, while
    the node uses GiB), both labelled."""
    from playwright.sync_api import expect, sync_playwright

    body = {"source": str(models_root / "llama"), "name": "axes", "dtype": "float32"}
    assert httpx.post(f"{live_server.url}/v1/models", json=body).status_code == 202
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=live_server.url) as http:
        # Two samples with the model held: one sampling interval (1 s here) apart.
        while True:
            samples = http.get("/v1/memory/history").json()["samples"]
            if sum(1 for s in samples if s["host"]["held_bytes"] > 0) >= 2:
                break
            assert time.monotonic() < deadline, samples[-1:]
            time.sleep(0.2)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        opened = time.time() * 1000
        page.goto(live_server.url + "/")
        chart = page.locator('.chart[data-chart="host"]')
        expect(chart.locator("polyline.line-held")).to_have_count(1, timeout=30_000)
        older = page.evaluate(f"series.host.points.filter((p) => p.t < {opened}).length")
        assert older >= 2, older
        x_ticks = chart.locator(".x-axis text.tick")
        y_ticks = chart.locator(".y-axis text.tick")
        assert x_ticks.count() >= 2 and y_ticks.count() >= 2
        assert all(re.fullmatch(r"\d\d:\d\d(:\d\d)?", t) for t in x_ticks.all_text_contents())
        labels = y_ticks.all_text_contents()
        assert labels[0] == "0 KiB" and all(t.endswith(" KiB") for t in labels), labels
        expect(chart.locator(".y-axis .title")).to_have_text("bytes")
        expect(chart.locator(".x-axis .title")).to_have_text("time (local)")
        browser.close()

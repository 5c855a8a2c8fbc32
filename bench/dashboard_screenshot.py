"""docs/dashboard.png from a running service: two models held (one leased), a few minutes of
memory history, taken in headless Chromium (Debian's /usr/bin/chromium via Playwright).

    .venv/bin/python bench/dashboard_screenshot.py [--out docs/dashboard.png] [--step 20]

`--step`: seconds between the scenes (start, first load, lease and second load, shot), so
that the chart shows the history the service kept.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import ROOT, discard, server, wait_ready, workspace

ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--step", type=float, default=20.0)
    args = parser.parse_args()
    work, checkpoint = workspace(params_m=80)
    try:
        env = {"BASEHOLD_MODEL_ROOTS": f'["{checkpoint.parent}"]'}
        with server(work, env=env) as served:
            http = served.http
            time.sleep(args.step)  # an idle stretch first: the chart starts flat
            bf16 = {"source": str(checkpoint), "name": "llama-80m-bf16", "dtype": "bfloat16"}
            assert http.post("/v1/models", json=bf16).status_code == 202
            wait_ready(http, "llama-80m-bf16", process=served.process)
            time.sleep(args.step)
            lease = {"holder": "trainer-0 (lora r=16)", "ttl_seconds": 3600}
            assert http.post("/v1/models/llama-80m-bf16/leases", json=lease).status_code == 201
            nf4 = {
                "source": str(checkpoint),
                "name": "llama-80m-nf4",
                "quantization": {"method": "bnb-4bit", "double_quant": True},
            }
            assert http.post("/v1/models", json=nf4).status_code == 202
            wait_ready(http, "llama-80m-nf4", process=served.process)
            time.sleep(args.step)
            shoot(f"http://127.0.0.1:{served.port}/", args.out)
    finally:
        discard(work)
    print(f"wrote {args.out}")


def shoot(url: str, out: Path) -> None:
    """A fresh page: what it draws comes from the service's history, then live polls."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        expect(page.locator('.chart[data-chart="host"] .line-held')).to_have_count(1)
        expect(page.locator("tr[data-lease]")).to_have_count(1)
        page.screenshot(path=str(out), full_page=True)
        browser.close()


if __name__ == "__main__":
    main()

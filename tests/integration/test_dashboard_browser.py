"""The dashboard in a real browser: served by `gpuledger dashboard`'s command line over a
published catalog, loaded in headless Chromium, its headline figure and charts checked.

The catalog is the one the demo's pipeline publishes (a small simulated fleet through
the real stack, Dagster, dbt and the invoice runs); the expected figure is computed from
the catalog file itself.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import pytest

from pipelines.cli.dashboard import dashboard_command
from tests.conftest import EfficiencyPipeline, build_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
HEALTH_TIMEOUT_S = 60.0
#: Altair charts in Streamlit 1.67 render as SVG inside this element.
CHART = '[data-testid="stVegaLiteChart"]'


@pytest.fixture(scope="module")
def published_catalog(efficiency_pipeline: EfficiencyPipeline) -> Path:
    """The snapshot the demo's pipeline published: simulated fleet, Dagster runs of the
    allocation and the invoices (tests/conftest.py)."""
    return efficiency_pipeline.settings.analytics_path


def fleet_j_per_output_token(catalog: Path) -> float:
    """All metered energy over all output tokens (the dashboard's definition), read
    from the catalog."""
    con = duckdb.connect(str(catalog), read_only=True)
    try:
        rows = con.sql(
            "select sum(energy_j) / sum(output_tokens) from marts.mart_efficiency_hourly"
        ).fetchall()
    finally:
        con.close()
    return float(rows[0][0])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _output(process: subprocess.Popen[bytes], log: Path) -> str:
    return f"exit status {process.poll()}; streamlit output:\n{log.read_text(errors='replace')}"


@pytest.fixture(scope="module")
def dashboard_url(
    published_catalog: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    work = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    argv = dashboard_command(build_settings(work / "state"), published_catalog, "127.0.0.1", port)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GPULEDGER_")}
    log = work / "streamlit.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            argv, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        healthy = False
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/_stcore/health", timeout=2).text.strip() == "ok":
                    healthy = True
                    break
            time.sleep(0.25)
        assert healthy, f"dashboard not healthy within {HEALTH_TIMEOUT_S:.0f} s; " + _output(
            process, log
        )
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def distinct_colours(png: bytes) -> tuple[int, float]:
    """How many colours an image has, and the share of pixels not the background
    (the most common colour)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=rgb.width * rgb.height) or []
    total = sum(count for count, _ in colours)
    background = max(count for count, _ in colours)
    return len(colours), 1 - background / total


def test_dashboard_shows_headline_and_charts(published_catalog: Path, dashboard_url: str) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    expected = f"{fleet_j_per_output_token(published_catalog):.4f}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.goto(dashboard_url, wait_until="domcontentloaded")
            page.get_by_text("Fleet J/output token").first.wait_for(timeout=60_000)
            charts = page.locator(CHART)
            charts.first.wait_for(timeout=30_000)
            # Every chart drawn: each holds a rendered Vega SVG or canvas with marks.
            page.wait_for_function(
                """(selector) => {
                    const charts = [...document.querySelectorAll(selector)];
                    return charts.length >= 5 && charts.every(chart =>
                        chart.querySelector('svg .mark-group, canvas'));
                }""",
                arg=CHART,
                timeout=30_000,
            )
            page.wait_for_timeout(1_500)  # let the last transitions settle
            exceptions = page.locator('[data-testid="stException"]')
            assert exceptions.count() == 0, exceptions.first.inner_text()

            metric = page.locator('[data-testid="stMetric"]').filter(
                has_text="Fleet J/output token"
            )
            assert expected in metric.inner_text(), metric.inner_text()
            assert expected in page.inner_text("body")

            # Streamlit scrolls inside its own container: grow the viewport to the page.
            height = page.evaluate(
                """() => Math.max(document.body.scrollHeight, ...[...document.querySelectorAll(
                    '[data-testid="stMain"], [data-testid="stAppViewContainer"]')]
                    .map(e => e.scrollHeight))"""
            )
            page.set_viewport_size({"width": 1400, "height": int(height) + 40})
            page.wait_for_timeout(1_500)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            count = charts.count()
            assert count >= 5, f"{count} charts on the page"
            for index in range(count):
                chart = charts.nth(index)
                chart.scroll_into_view_if_needed()
                colours, drawn = distinct_colours(chart.screenshot())
                assert colours > 8, f"chart {index} has {colours} colours: empty?"
                assert drawn > 0.01, f"chart {index}: {drawn:.1%} of its pixels drawn"
        finally:
            browser.close()

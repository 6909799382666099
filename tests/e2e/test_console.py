"""The coordinator's console in a real browser, beside a real two-site federation.

`cxr-fl-server start` serves the console on 127.0.0.1 and prints its address (with the token);
headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium) opens it and
the test asserts on what a person sees: both sites online, the round counter advancing, the
global train-loss curve with one point per finished round; after the run, `cxr-fl-server
console` shows the final state. The sites' address must not serve the console. A screenshot is
saved under the test's temporary folder. Every process is stopped by its PID tree (fixture).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.harness import SERVER, Federation

pytestmark = pytest.mark.slow  # make test-slow: a three-round federation followed in a browser

CONSOLE_URL = re.compile(r"console \([^)]*\): (http://127\.0\.0\.1:\d+/\?token=\S+)")
ROUNDS = 3
# One read of the page, so that the counter and the curve come from the same refresh.
READ_PAGE = """
const text = (id) => (document.getElementById(id) || {}).textContent || "";
const online = {};
document.querySelectorAll(".online[data-site]").forEach((e) => { online[e.dataset.site] = e.textContent; });
const chart = document.querySelector('svg[data-curve="train loss"] g[data-series="_global"]');
return {
  phase: text("phase"),
  done: text("rounds-done"),
  total: text("rounds-total"),
  online: online,
  points: chart ? chart.querySelectorAll("circle.point").length : 0,
  connection: text("connection"),
};
"""


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium through the system's chromedriver (never a downloaded browser)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip(
            "no chromium/chromedriver on PATH: install Debian's chromium and chromium-driver "
            "(bash .ci/run does) to run the console's browser test"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def console_url(output: str) -> str | None:
    match = CONSOLE_URL.search(output)
    return match[1] if match else None


def wait_for(what: str, timeout: float, probe: Any) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def assert_sites_address_serves_no_console(federation: Federation) -> None:
    with httpx.Client(verify=str(federation.certs / "ca.crt"), timeout=30) as client:
        for path in ("/", "/live", "/metrics", "/console.js"):
            reply = client.get(f"https://127.0.0.1:{federation.port}{path}")
            assert reply.status_code == 404, (path, reply.status_code)
            assert "Fleet API" in reply.text
            assert "console" not in reply.text.lower()


def follow_live_run(server: subprocess.Popen[bytes], browser: Any, shot: Path) -> list[dict[str, Any]]:
    """Read the page every second until the coordinator ends; every read must be consistent.
    The page is saved as ``shot`` once the last teacher round is done (while the run goes on)."""
    reads = []
    deadline = time.monotonic() + 900
    while server.poll() is None and time.monotonic() < deadline:
        seen = browser.execute_script(READ_PAGE)
        if seen["connection"] == "live" and seen["done"]:
            # as many points on the global train-loss curve as finished rounds, at every moment
            assert seen["points"] == int(seen["done"]), seen
            reads.append(seen)
            if seen["done"] == str(ROUNDS) and not shot.exists():
                browser.save_screenshot(str(shot))
        time.sleep(1.0)
    return reads


@pytest.mark.timeout(1800)  # a whole federation with distillation, on a possibly busy machine
def test_the_console_shows_a_two_site_federation_live_and_after_it(
    federation: Federation, browser: Any, tmp_path: Path
) -> None:
    # Prepare: a coordinator (its console on by default) and the console open in the browser.
    federation.prepare("site-a", "site-b")
    server = federation.start_server("--config", str(federation.write_config(f"num-rounds = {ROUNDS}\n")))
    federation.wait_listening()
    url = wait_for("the console's address", 60, lambda: console_url(federation.output("server")))
    assert_sites_address_serves_no_console(federation)
    browser.get(url)
    assert "token=" not in browser.current_url  # the token left the address bar (a cookie holds it)
    assert browser.find_element("id", "rounds-done").text == "0"

    # Execute: the sites join; follow the page while the run goes on.
    clients = [federation.start_client(site) for site in ("site-a", "site-b")]
    wait_for(
        "both sites online on the page",
        300,
        lambda: browser.execute_script(READ_PAGE)["online"] == {"site-a": "online", "site-b": "online"},
    )
    reads = follow_live_run(server, browser, tmp_path / "console-live.png")

    # Assert: the counter advanced to the last round, never backwards.
    assert federation.wait(server, "server", 60) == 0, federation.output("server")
    counted = [int(r["done"]) for r in reads]
    assert counted == sorted(counted), counted
    assert counted[-1] == ROUNDS, counted
    assert len(set(counted)) >= 2, counted  # seen advancing
    # the total is "?" only until the coordinator's ServerApp has written the run's settings
    assert {r["total"] for r in reads} <= {"?", str(ROUNDS)}, reads
    assert reads[-1]["total"] == str(ROUNDS), reads
    for client, site in zip(clients, ("site-a", "site-b"), strict=True):
        federation.wait(client, site, 120)

    # After the run: `cxr-fl-server console` shows its final state.
    viewer = federation.spawn("viewer", SERVER, "console", "--run-dir", str(federation.run_dir))
    url = wait_for("the console command's address", 60, lambda: console_url(federation.output("viewer")))
    browser.get(url)
    final = browser.execute_script(READ_PAGE)
    assert final["phase"] == "finished", final
    assert final["done"] == str(ROUNDS), final
    assert final["points"] == ROUNDS, final
    validated = browser.find_elements(
        "css selector", 'svg[data-curve="validation macro-AUROC"] g[data-series="_global"] circle.point'
    )
    assert len(validated) == ROUNDS
    checked = [
        e.text
        for e in browser.find_elements("css selector", "#delivery table.delivery tbody tr td:first-child")
    ]
    assert checked == ["site-a", "site-b"]
    keys = [e.text for e in browser.find_elements("css selector", "#door table.keys tbody tr td:first-child")]
    assert keys == ["site-a", "site-b"]
    browser.save_screenshot(str(tmp_path / "console.png"))
    assert (tmp_path / "console.png").stat().st_size > 0
    viewer.terminate()

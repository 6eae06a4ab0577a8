"""The local console in a real browser: headless Chromium, driven over the DevTools protocol, starts a
sample run from the page and sees the session, its hub log lines and its image appear by themselves.

Needs Debian's ``chromium`` (``make chromium`` installs it as root; the test skips without it). Set
``UPDATE_CONSOLE_SCREENSHOT=1`` to refresh docs/console.png from the run.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time

import pytest
import requests
import websocket

from local_stack.template import PROJECT_ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.stack
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (run `make chromium` as root, or apt-get install chromium)",
)

SCREENSHOT = PROJECT_ROOT / "docs" / "console.png"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
    "--hide-scrollbars",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    # nothing but loopback, whatever the page or the browser itself would like to reach
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--window-size=1280,900",
]


class Page:
    """Just enough of the DevTools protocol: evaluate JavaScript and take a screenshot."""

    def __init__(self, ws_url: str):
        self._ws = websocket.create_connection(ws_url, timeout=10, suppress_origin=True)
        self._ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        images = self.evaluate("[...document.images].map(i => [i.src, i.complete, i.naturalWidth])")
        raise AssertionError(
            f"timed out waiting for {what}; images {images}; page text:\n"
            f"{self.evaluate('document.body.innerText')}"
        )

    def close(self) -> None:
        self._ws.close()


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "profile"
    process = subprocess.Popen(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 120
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
        page = Page(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        yield page
        page.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@needs_chromium
def test_a_sample_started_from_the_console_shows_its_progress_logs_and_image(stack, browser, openai_emulator):
    browser.call("Page.navigate", url=f"{stack.api_url}/")
    browser.wait_for("document.querySelectorAll('#sample option').length > 0", 120, "the sample list")
    fox = browser.evaluate(
        "[...document.querySelectorAll('#sample option')].findIndex(o => o.textContent.includes('fox'))"
    )
    assert fox >= 0

    # the user's part: pick the fox sample and press Start
    browser.evaluate(f"document.querySelector('#sample').selectedIndex = {fox}")
    browser.evaluate("document.querySelector('#start').click()")
    session = browser.wait_for(
        "document.querySelector('#start-status').dataset.started", 120, "the started session's id"
    )
    assert "POST /plugin → 202" in browser.evaluate("document.querySelector('#start-status').textContent")

    card = f"document.querySelector('article[data-session=\"{session}\"]')"
    browser.wait_for(f"{card} !== null", 120, "the session to be listed")
    # the page follows the run to its end by itself, and the image is really loaded
    image = browser.wait_for(
        f"(() => {{ const img = {card}.querySelector('img.thumb');"
        f" return {card}.dataset.status === 'SUCCEEDED' && img && img.complete && img.naturalWidth > 0"
        f" && img.src; }})()",
        300,
        "the run to succeed and its image to load in the page",
    )

    # the image beside its prompt is the one the hub stores and shows beside the asset
    view = requests.get(
        f"{stack.api_url}/sessions/{session}", headers={"Secret": stack.plugin_secret}, timeout=60
    ).json()
    run = view["runs"][0]
    assert run["status"] == "SUCCEEDED" and image == run["image"]["hubUrl"]
    assert browser.evaluate(f"{card}.querySelector('blockquote.prompt').textContent") == run["prompt"]["text"]
    # the hub's Plugin Sessions log lines, as the plugin wrote them (the last one may land a poll later)
    deadline = time.monotonic() + 60
    while True:
        shown_logs = browser.evaluate(f"[...{card}.querySelectorAll('ol.logs li')].map(li => li.textContent)")
        hub_logs = [line["msg"] for line in stack.hub.plugin_logs(session)]
        if len(shown_logs) == len(hub_logs) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(hub_logs) >= 3 and len(shown_logs) == len(hub_logs)
    assert all(msg in shown for msg, shown in zip(hub_logs, shown_logs, strict=True))

    # never a secret on the page or in what it reads
    page_html = browser.evaluate("document.documentElement.outerHTML")
    listing = requests.get(f"{stack.api_url}/_console/sessions", timeout=60).text
    for secret in (stack.plugin_secret, "ango-local-key", "sk-local-shared-default-key"):
        assert secret not in page_html and secret not in listing

    browser.call(
        "Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False
    )
    browser.evaluate(f"{card}.scrollIntoView({{block: 'start'}}); window.scrollBy(0, -80)")
    png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    assert png.startswith(b"\x89PNG") and len(png) < 500_000
    if os.environ.get("UPDATE_CONSOLE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(png)


def test_runs_can_only_be_started_from_the_page(stack):
    refused = requests.post(f"{stack.api_url}/_console/runs?sample=0", timeout=10)
    assert refused.status_code == 403
    assert requests.post(f"{stack.api_url}/_console/runs?sample=0&token=guess", timeout=10).status_code == 403

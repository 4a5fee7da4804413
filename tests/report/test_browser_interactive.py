"""The interactive report in a real browser: hover the timeline, click the overlay toggle.

Headless Chromium is driven through the DevTools protocol (a websocket): the mouse events are
real input events, so `:hover` and the checkbox behave as they do for a user.
"""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from memwise.report.html import render_html
from memwise.report.plot import timeline_png

pytestmark = pytest.mark.integration


def _chromium() -> str | None:
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


class _Page:
    """One page of a headless Chromium, over the DevTools protocol."""

    def __init__(self, chromium: str, url: str, profile_dir: Path) -> None:
        websocket = pytest.importorskip("websocket", reason="needs websocket-client (pip install memwise[dev])")
        self.process = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--remote-debugging-port=0", "--window-size=1200,1600",
             f"--user-data-dir={profile_dir}", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                pytest.fail("Chromium did not open its DevTools port")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        import urllib.request

        while True:
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
            pages = [t for t in targets if t.get("type") == "page" and t.get("url", "").startswith("file:")]
            if pages:
                break
            time.sleep(0.1)
        self.socket = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        # Wait for the layout to settle: the page parsed and the embedded plot decoded (it moves what follows).
        while not self.evaluate("document.readyState === 'complete' && !!document.getElementById('peak-bytes')"
                                " && [...document.images].every(image => image.complete)"):
            time.sleep(0.1)

    def send(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.socket.recv())
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply["result"]

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def center(self, selector: str) -> tuple[float, float]:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).scrollIntoView({{block: 'center'}})")
        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                            " return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        return box[0], box[1]

    def hover(self, selector: str) -> None:
        x, y = self.center(selector)
        hit = self.evaluate(f"document.querySelector({json.dumps(selector)}) === document.elementFromPoint({x}, {y})")
        assert hit, f"{selector} is not the element under its own center"
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def click(self, selector: str) -> None:
        x, y = self.center(selector)
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def style(self, selector: str, prop: str) -> str:
        return self.evaluate(f"getComputedStyle(document.querySelector({json.dumps(selector)})).{prop}")

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def watched():
    from tests.doctor.planted import plant_graph_kept

    return plant_graph_kept(fixed=False)


def test_hover_shows_operator_module_and_line_and_click_overlays(watched, profile_result, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("headless Chromium not found (/usr/bin/chromium or chromium on PATH); apt-get install -y chromium")
    result = watched.result
    notes = result.timeline_allocations
    peak = result.timeline.peak_index
    assert len(notes) == len(result.timeline.x)
    path = tmp_path / "report.html"
    path.write_text(render_html(result, timeline_png(result), compare=profile_result))
    page = _Page(chromium, path.as_uri(), tmp_path / "chromium-profile")
    try:
        tip = f"#sample-{peak} .tip"
        assert page.style(tip, "visibility") == "hidden"
        page.hover(f"#sample-{peak} rect.hit")
        assert page.style(tip, "visibility") == "visible"
        shown = page.evaluate(f"document.querySelector({json.dumps(tip)}).textContent")
        note = notes[peak]
        assert (note.op or "no operator") in shown and (note.module or "no module") in shown
        if note.file:
            assert f"{note.file}:{note.line}" in shown
        # Another point: the first panel hides again.
        other = next(i for i in range(len(notes)) if page.evaluate(f"!!document.querySelector('#sample-{i}')") and i != peak)
        page.hover(f"#sample-{other} rect.hit")
        assert page.style(tip, "visibility") == "hidden"

        assert page.style("#timeline-overlay", "display") == "none"
        page.click("label[for=overlay-toggle]")
        assert page.evaluate("document.getElementById('overlay-toggle').checked") is True
        assert page.style("#timeline-overlay", "display") == "inline"
        assert page.evaluate("document.querySelectorAll('.hazard').length") == len(result.hazards) == 1
    finally:
        page.close()


def test_what_if_bars_against_the_budget(hostile_estimate, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("headless Chromium not found (/usr/bin/chromium or chromium on PATH); apt-get install -y chromium")
    path = tmp_path / "report.html"
    path.write_text(render_html(hostile_estimate, None))
    page = _Page(chromium, path.as_uri(), tmp_path / "chromium-profile")
    try:
        bars = page.evaluate("document.querySelectorAll('#what-if-svg .bar').length")
        assert bars == 1 + sum(item.peak_bytes is not None for item in hostile_estimate.what_if)
        over = page.evaluate("document.querySelectorAll('#what-if-svg .bar.over').length")
        assert over == sum(peak > hostile_estimate.budget_bytes for peak in
                           [hostile_estimate.peak_bytes] + [i.peak_bytes for i in hostile_estimate.what_if if i.peak_bytes is not None])
        page.hover("#what-if-svg .bar rect.value")
        assert page.style("#what-if-svg .bar rect.value", "opacity") == "0.8"
        # The hostile what-if change is shown as text, not markup.
        assert page.evaluate("document.querySelectorAll('#what-if-svg script').length") == 0
    finally:
        page.close()


def test_report_files_carry_the_overlay(watched, estimate_result, tmp_path):
    from memwise.report.output import write_report

    page = write_report(watched.result, tmp_path / "out", stem="watch", compare=estimate_result)["html"].read_text()
    assert 'id="timeline-overlay"' in page and 'id="overlay-toggle"' in page
    assert "<script" not in page.lower()
    plain = write_report(watched.result, tmp_path / "plain", stem="watch")["html"].read_text()
    assert 'id="timeline-overlay"' not in plain and 'id="timeline-svg"' in plain

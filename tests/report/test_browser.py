"""The HTML report as a real browser sees it (headless Chromium)."""

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from memwise.report.output import write_report
from memwise.report.tables import peak_text

pytestmark = pytest.mark.integration


def _chromium() -> str | None:
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


class _ElementText(HTMLParser):
    """Collects the text inside the element with a given id, and every tag name seen."""

    def __init__(self, element_id: str) -> None:
        super().__init__()
        self.element_id = element_id
        self.depth = 0
        self.text = ""
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if self.depth:
            self.depth += 1
        elif dict(attrs).get("id") == self.element_id:
            self.depth = 1

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.text += data


def test_chromium_shows_the_peak(hostile_profile, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("headless Chromium not found (/usr/bin/chromium or chromium on PATH); install it to run this test")
    paths = write_report(hostile_profile, tmp_path / "out")

    completed = subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", paths["html"].resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 0, completed.stderr[-2000:]
    parser = _ElementText("peak-bytes")
    parser.feed(completed.stdout)
    assert parser.text == peak_text(hostile_profile)
    assert "img" in parser.tags
    # The workload name held a <script> tag; the browser must have parsed it as text.
    assert "script" not in parser.tags

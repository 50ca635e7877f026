"""The study report in headless Chromium (Debian's /usr/bin/chromium through Playwright), from file://: the
answer paragraph comes first and the warning block is shown; a screenshot is saved for a person to look at."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hpcwalk.cli import app

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("HPCWALK_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_report_states_its_answer_and_warnings(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"the report test needs Chromium at {CHROMIUM}: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    text = (ROOT / "examples" / "study.toml").read_text()
    for old, new in {"steps = 30": "steps = 2", "guidance = 7.5": "guidance = 1.0", "pairs = 4 ": "pairs = 3 ",
                     "frames = 9 ": "frames = 5 ", "batch_size = 9": "batch_size = 5", "shard_size = 27": "shard_size = 15"
                     }.items():
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "s.toml").write_text(text)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["study", str(tmp_path / "s.toml"), "--out", str(out), "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1250, "height": 1100})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto("file://" + str(out / "report.html"))
        first = page.locator("body > p").first
        assert first.get_attribute("id") == "answer" and first.is_visible()
        answer = first.inner_text()
        assert answer.startswith("With 3 seed pairs nothing can resolve: ") and "needs at least 7 pairs" in answer
        assert "Rankings over 3 seed pairs (best first;" in answer
        for label in ("InterpScore (CLIP tiny-clip/none): ", "sharpness: ", "pixel step (1 - SSIM): ", "LPIPS step: ",
                      "KID (CLIP features): ", "KID (tiny-dinov2 features): "):
            assert re.search(re.escape(label) + r"\w+ > \w+ > \w+, ", answer), label
        assert "CLIP's ranking of the methods, pair by pair" in answer
        warn = page.locator("#warnings")
        assert warn.is_visible()
        items = warn.locator("li").all_inner_texts()
        assert any("Only 3 seed pairs" in w and "10 distinct resamples" in w for w in items)
        assert any(w.startswith("Random weights:") for w in items)
        assert page.locator("table.yardsticks tr[data-yardstick]").count() == 6
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 20_000
        print(f"screenshot: {shot}")
        assert errors == []
        browser.close()

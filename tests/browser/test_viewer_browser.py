"""Drive the static viewer in headless Chromium (Debian's /usr/bin/chromium through Playwright), from file://.

Needs the `playwright` Python package (dev extra) and Debian's chromium (`apt-get install -y chromium`, done
by .ci/run); no `playwright install` and no network. A screenshot is saved under the test's temp folder.
"""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from hpcwalk.cli import app
from synthetic_run import LATENT3, make_run

CHROMIUM = os.environ.get("HPCWALK_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"the viewer test needs Chromium at {CHROMIUM}: apt-get install -y chromium "
                    "(or set HPCWALK_CHROMIUM to a Chromium binary)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _viewer(tmp_path, name: str, clip: bool, drop: tuple[int, ...] = ()) -> str:
    run = str(tmp_path / name)
    make_run(run, [dict(LATENT3, frames=30),
                   {"name": "sweep", "kind": "std", "prompt": "a cat", "seed": 1, "frames": 5},
                   {"name": "story", "kind": "keyframes", "easing": "ease-in", "easing_exponent": 3.0,
                    "keyframes": [{"prompt": "a cat", "seed": 1, "frames": 5}, {"prompt": "a dog", "seed": 2}]}],
             size=(128, 128), shard_size=16, clip=clip, drop=drop)
    res = CliRunner().invoke(app, ["view", run, "--thumb-size", "64"])
    assert res.exit_code == 0, res.output
    return "file://" + os.path.join(run, "viewer", "index.html")


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    return page, errors


def _loaded(page, selector: str) -> None:
    page.wait_for_function("s => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0; }",
                           arg=selector, timeout=10_000)


def test_slider_keys_and_strip_change_frame_and_provenance(browser, tmp_path):
    # 3 methods x 30 frames, shards of 16: shard 1 holds linear 16-29 and normalized 0-1
    url = _viewer(tmp_path, "run", clip=True, drop=(1,))
    page, errors = _open(browser, url)
    img0 = "#walk-0 .panel[data-track='2'] .frame img"  # slerp: every frame committed
    prov0 = "#walk-0 .panel[data-track='2'] .prov"
    _loaded(page, img0)
    src_a, prov_a = page.get_attribute(img0, "src"), page.inner_text(prov0)
    marker_a = page.get_attribute("#walk-0 .chart line.marker", "x1")
    assert src_a.endswith("/00000.png") and "seeds/slerp/00000" in prov_a and "gamma 0.000" in prov_a
    assert "seeds 1 → 2" in prov_a and "clip_score (vs prompt)" in prov_a
    assert "shard-00001" in page.inner_text("#gaps")
    from hpcwalk.see.colors import METHOD_COLORS  # one colour table, passed to the page in data.js

    strokes = {m: page.get_attribute(f"#walk-0 .chart path[data-method='{m}']", "stroke") for m in METHOD_COLORS}
    assert strokes == METHOD_COLORS

    # 1. move the slider: drag its thumb to the far right, then step back with the keyboard on it
    box = page.locator("#walk-0 input.slider").bounding_box()
    page.mouse.click(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2)
    assert page.get_attribute("#walk-0", "data-pos") == "29"
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    assert page.get_attribute("#walk-0", "data-pos") == "27"
    _loaded(page, img0)
    src_b, prov_b = page.get_attribute(img0, "src"), page.inner_text(prov0)
    assert src_b.endswith("/00027.png") and src_b != src_a
    assert "seeds/slerp/00027" in prov_b and "gamma 0.931" in prov_b and prov_b != prov_a
    assert page.get_attribute("#walk-0 .chart line.marker", "x1") != marker_a
    # linear lacks 16-29 (shard 1): its panel says so instead of showing a stale frame
    assert page.is_visible("#walk-0 .panel[data-track='0'] .gap")
    assert "not committed" in page.inner_text("#walk-0 .panel[data-track='0'] .prov")

    # 2. keyboard arrows step frames once the walk (not an input) has focus
    page.click("#walk-0 h2")
    page.keyboard.press("Home")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert page.get_attribute("#walk-0", "data-pos") == "3"
    assert "gamma 0.103" in page.inner_text("#walk-0 .param")
    _loaded(page, "#walk-0 .panel[data-track='0'] .frame img")
    assert page.get_attribute("#walk-0 .panel[data-track='0'] .frame img", "src").endswith("frames/w0/m0/00003.png")

    # 3. the strip: lazily loaded thumbnails; a click jumps there
    thumbs = page.locator("#walk-0 .strip img")
    assert thumbs.count() == 30 and thumbs.first.get_attribute("loading") == "lazy"
    assert thumbs.nth(10).get_attribute("src").startswith("thumbs/")
    thumbs.nth(10).click()
    assert page.get_attribute("#walk-0", "data-pos") == "10"

    page.keyboard.press("ArrowLeft")  # the last walk clicked takes the keys
    assert page.get_attribute("#walk-0", "data-pos") == "9"
    page.click("#walk-1 h2")
    page.keyboard.press("End")
    assert page.get_attribute("#walk-1", "data-pos") == "4" and page.get_attribute("#walk-0", "data-pos") == "9"
    assert "std 1.500" in page.inner_text("#walk-1 .panel .prov")

    # 4. a keyframes walk (prompt and seed together, eased): its frames' placement is part of the provenance
    page.click("#walk-2 h2")
    page.keyboard.press("Home")
    page.keyboard.press("ArrowRight")
    assert page.get_attribute("#walk-2", "data-pos") == "1"
    assert "keyframes walk" in page.inner_text("#walk-2 .about")
    prov = page.inner_text("#walk-2 .panel .prov")
    assert "story/slerp/00001" in prov and "gamma 0.016" in prov  # ease-in, exponent 3: (1/4)^3
    assert 'prompt "a cat" → "a dog"' in prov and "seeds 1 → 2" in prov
    assert "easing ease-in (exponent 3) of position 0.250" in prov and "text slerp" in prov
    _loaded(page, "#walk-2 .panel .frame img")

    page.evaluate("document.getElementById('walk-0').scrollIntoView()")
    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot))
    page.locator("#figures img").scroll_into_view_if_needed()
    _loaded(page, "#figures img")  # lazily loaded figure, from file://
    page.screenshot(path=str(tmp_path / "figures.png"), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    assert errors == []
    page.close()


def test_run_without_clip_says_so(browser, tmp_path):
    page, errors = _open(browser, _viewer(tmp_path, "noclip", clip=False))
    assert page.inner_text("#walk-0 .chart .none") == "no CLIP scores in this run"
    assert page.locator("#walk-0 .chart svg").count() == 0
    assert "CLIP score: none in this run" in page.inner_text("#walk-0 .panel .prov")
    assert page.is_hidden("#gaps")
    assert errors == []
    page.close()


def test_prompts_and_names_are_shown_as_text_never_as_markup(browser, tmp_path):
    """HTML in a prompt or a walk name is data: the page shows it literally and runs none of it; `$` pairs
    (matplotlib's math syntax) reach the contact sheet as plain text."""
    evil = "<img src=x onerror=\"window.__xss=1\"><b>bold</b> $\\frac{a$"
    run = str(tmp_path / "run")
    name = "one <img src=x onerror=window.__xss=2><i>latent $x$"  # a walk name cannot hold '/'
    make_run(run, [{"name": name, "kind": "prompts", "seed": 1, "prompts": [evil, "a cat"]}],
             size=(64, 64))
    res = CliRunner().invoke(app, ["view", run])
    assert res.exit_code == 0, res.output
    page, errors = _open(browser, "file://" + os.path.join(run, "viewer", "index.html"))
    _loaded(page, "#walk-0 .panel .frame img")
    assert page.evaluate("window.__xss") is None
    assert page.locator("img[src='x'], b, i").count() == 0  # no element made from the text
    assert name in page.inner_text("#walk-0 h2")
    assert evil in page.inner_text("#walk-0")
    assert errors == []
    page.close()

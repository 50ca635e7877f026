"""The static viewer's files and data (the browser test in tests/browser/ drives the page itself)."""

from __future__ import annotations

import json
import os
import re

import pytest
from typer.testing import CliRunner

from hpcwalk.cli import app
from hpcwalk.store.runindex import open_run
from hpcwalk.store.reader import read_frames
from hpcwalk.see.viewer.build import build_viewer
from synthetic_run import LATENT3, make_run

runner = CliRunner()
TEXT = {"name": "cat-to-dog", "kind": "text", "prompts": ["a cat", "a dog"], "seed": 1, "methods": ["linear", "slerp"],
        "frames": 6}


def load_data(viewer: str) -> dict:
    """data.js is `window.HPCWALK = {json};`: a script, so the page works from file://."""
    text = open(os.path.join(viewer, "data.js"), encoding="utf-8").read()
    assert text.startswith("window.HPCWALK = ") and text.rstrip().endswith(";")
    return json.loads(text[len("window.HPCWALK = "):].rstrip().rstrip(";"))


def test_viewer_files_match_the_run(tmp_path):
    run = str(tmp_path / "run")
    make_run(run, [dict(LATENT3, frames=12), TEXT, {"name": "sweep", "kind": "std", "prompt": "a cat", "seed": 1,
                                                  "frames": 5}], size=(96, 96), clip=True)
    res = runner.invoke(app, ["view", run, "--thumb-size", "48"])
    assert res.exit_code == 0, res.output
    viewer = os.path.join(run, "viewer")
    for f in ("index.html", "viewer.js", "viewer.css", "data.js", ".hpcwalk-viewer", "figures/trajectories.png",
              "figures/w0-latent-norm.png", "figures/w2-contact.png"):
        assert os.path.isfile(os.path.join(viewer, f)), f
    html = open(os.path.join(viewer, "index.html")).read()
    js = open(os.path.join(viewer, "viewer.js")).read()
    assert '<script src="data.js"></script>' in html
    assert not re.search(r"(?<![\w.])fetch\(|XMLHttpRequest", js)  # file:// forbids fetching data files
    data = load_data(viewer)
    assert [w["name"] for w in data["walks"]] == ["seeds", "cat-to-dog", "sweep"] and data["missing"] == []
    # every frame file holds the run's bytes for that frame
    frames = {r["frame_id"]: r["image"] for r in read_frames(run, columns=["frame_id", "image"]).to_pylist()}
    n = 0
    for w in data["walks"]:
        for t in w["tracks"]:
            for fid, i in zip(t["frame_id"], t["index"]):
                with open(os.path.join(viewer, t["dir"], f"{i:05d}.{t['ext']}"), "rb") as f:
                    assert f.read() == frames[fid]
                n += 1
        strip = w["tracks"][w["strip_track"]]  # frames (96 px) exceed --thumb-size 48: the strip gets thumbnails
        assert strip["thumbs"] and all(os.path.isfile(os.path.join(viewer, strip["thumbs"], f"{i:05d}.jpg"))
                                       for i in w["strip"])
    assert n == len(frames) == 3 * 12 + 2 * 6 + 5
    seeds, text, sweep = data["walks"]
    assert seeds["params"][:2] == ["gamma 0.000", "gamma 0.091"] and sweep["params"][0] == "std 0.500"
    # CLIP score columns: clip_score_b only where the walk has an end prompt (text walks)
    assert seeds["scores"] == ["clip_score"] and text["scores"] == ["clip_score", "clip_score_b"]
    assert text["tracks"][1]["prompt_b"][0] == "a dog" and seeds["tracks"][0]["seeds"][0] == "1 → 2"


def test_no_clip_columns_means_no_scores(tmp_path):
    run = str(tmp_path / "run")
    make_run(run, [dict(LATENT3, frames=4)])
    data = load_data(os.path.dirname(build_viewer(open_run(run)).path))
    assert data["walks"][0]["scores"] == []
    assert all(t["scores"] == {} for t in data["walks"][0]["tracks"])


def test_large_walk_strip_is_capped_and_evenly_spaced(tmp_path):
    run = str(tmp_path / "run")
    make_run(run, [dict(LATENT3, frames=300, methods=["slerp"])], shard_size=64)
    r = build_viewer(open_run(run), str(tmp_path / "v"), strip_max=50)
    w = load_data(str(tmp_path / "v"))["walks"][0]
    assert len(w["strip"]) == 50 and w["strip"][0] == 0 and w["strip"][-1] == 299
    assert w["tracks"][0]["thumbs"] == ""  # 64 px frames are no larger than a thumbnail: the strip shows them
    assert r.frames == 300 and len(os.listdir(tmp_path / "v" / "frames" / "w0" / "m0")) == 300


def test_partial_run_view_says_what_is_missing(tmp_path):
    run = str(tmp_path / "run")
    make_run(run, [dict(LATENT3, frames=40)], shard_size=16, drop=(2, 7))
    res = runner.invoke(app, ["view", run])
    assert res.exit_code == 0, res.output
    assert "missing 2 of 8 shards: shard-00002, shard-00007" in res.output
    assert "linear: 8 of 40 frames missing (indices 32-39)" in res.output
    data = load_data(os.path.join(run, "viewer"))
    assert data["missing"][0] == "missing 2 of 8 shards: shard-00002, shard-00007"
    slerp = data["walks"][0]["tracks"][2]
    assert slerp["missing"] == list(range(32, 40)) and len(slerp["index"]) == 32


def test_rebuild_over_a_previous_viewer(tmp_path):
    run = str(tmp_path / "run")
    make_run(run, [dict(LATENT3, frames=3)])
    assert runner.invoke(app, ["view", run]).exit_code == 0
    assert runner.invoke(app, ["view", run]).exit_code == 0


@pytest.mark.parametrize("setup, msg", [
    ("notempty", "is not empty and is not an hpcwalk viewer"),
    ("file", "is a file, not a folder"),
])
def test_bad_out_exits_2_and_writes_nothing(tmp_path, setup, msg):
    run = str(tmp_path / "run")
    make_run(run, [dict(LATENT3, frames=3)])
    out = tmp_path / "out"
    if setup == "notempty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        out.write_text("a file")
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(run))
    res = runner.invoke(app, ["view", run, "--out", str(out)])
    assert res.exit_code == 2 and msg in res.output, res.output
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(run))) == before
    if setup == "notempty":
        assert os.listdir(out) == ["keep.txt"]


def test_not_a_run_exits_2(tmp_path):
    res = runner.invoke(app, ["view", str(tmp_path)])
    assert res.exit_code == 2 and "not an hpcwalk run folder" in res.output

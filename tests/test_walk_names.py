"""Per-walk file names: one rule (core/fsio.walk_file) that gives distinct walks distinct files, so two walks
never share a pacing plan or a video; names that one filesystem would still take for one file are refused
when the job is parsed. End to end on the built-in tiny model."""

from __future__ import annotations

import json
import os

import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hpcwalk.cli import app
from hpcwalk.core.errors import JobError
from hpcwalk.core.fsio import walk_file, walk_stem
from hpcwalk.job.parse import parse_job
from hpcwalk.store.reader import read_frames
from jobs import tiny_job_toml, walk

KINDS = ("json", "steps.json", "mp4", "slerp.webm", "linear-slerp.gif")
names = st.text(min_size=1, max_size=300).filter(lambda s: "/" not in s)


def _job(*walk_names: str) -> dict:
    return {"model": {"id": "tiny"}, "sampling": {"steps": 1, "height": 16, "width": 16},
            "walk": [{"name": n, "kind": "latent", "prompt": "p", "seeds": [1, 2], "methods": ["slerp"], "frames": 3}
                     for n in walk_names]}


@settings(max_examples=400, deadline=None)
@given(a=names, b=names, ka=st.sampled_from(KINDS), kb=st.sampled_from(KINDS))
def test_walk_file_is_injective(a, b, ka, kb):
    """Two (walk, kind) pairs get one file name only when they are the same pair; no stem holds a `.`, so a
    kind (`.steps.json`) never reads as part of another walk's name, and no file is hidden."""
    fa, fb = walk_file(a, ka), walk_file(b, kb)
    assert (fa == fb) == ((a, ka) == (b, kb))
    assert "." not in walk_stem(a) and not fa.startswith(".") and "/" not in fa
    assert len(fa.encode()) <= 255


@settings(max_examples=200, deadline=None)
@given(a=names)
def test_walk_file_keeps_plain_names_and_escapes_the_rest(a):
    stem = walk_stem(a)
    if all(c.isascii() and (c.isalnum() or c in "_-") for c in a) and len(a) <= 96:
        assert stem == a
    assert walk_stem(a + ".steps") != walk_stem(a) and walk_file(a + ".steps", "json") != walk_file(a, "steps.json")


def test_formerly_colliding_names_get_distinct_files():
    assert walk_file("a b", "json") == "a~20b.json"
    assert walk_file("a_b-c8687a08", "json") == "a_b-c8687a08.json"
    assert walk_file("x", "steps.json") == "x.steps.json" != walk_file("x.steps", "json") == "x~2esteps.json"
    long_a, long_b = "n" * 500 + "a", "n" * 500 + "b"
    assert walk_stem(long_a) != walk_stem(long_b) and "~~" in walk_stem(long_a)


def test_names_one_file_on_a_case_insensitive_filesystem_are_refused_at_parse():
    """`Cat` and `cat` write Cat.json and cat.json: one file on macOS and Windows."""
    with pytest.raises(JobError) as e:
        parse_job(_job("w", "Cat", "cat"))
    msg = str(e.value)
    assert "\n" not in msg and "'Cat'" in msg and "'cat'" in msg and "rename one" in msg
    parse_job(_job("a b", "a_b-c8687a08", "x", "x.steps"))  # distinct files: accepted


EVEN = dict(prompt="a cat", methods=["slerp"], frames=5, pace="even", pace_coarse=3, pace_measure="pixel")
NAMES = {"a b": [1, 2], "a_b-c8687a08": [3, 4], "x": [5, 6], "x.steps": [7, 8]}


@pytest.fixture(scope="module")
def even_run(tmp_path_factory):
    """Four evenly paced walks whose files collided under the former rule (a safe name plus a hash that
    another walk could be named; `x.steps` beside the steps file of `x`)."""
    tmp = tmp_path_factory.mktemp("names")
    job = tmp / "job.toml"
    job.write_text(tiny_job_toml(*(walk(n, "latent", seeds=s, **EVEN) for n, s in NAMES.items()),
                                 steps=2, size=16, shard_size=3))
    out = tmp / "run"
    res = CliRunner().invoke(app, ["render", str(job), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    return out


def test_each_even_walk_has_its_own_pacing_files_and_gammas(even_run):
    files = sorted(os.listdir(even_run / "pacing"))
    assert len(files) == 2 * len(NAMES), files
    frames = read_frames(str(even_run))
    for name in NAMES:
        plan = json.loads((even_run / "pacing" / walk_file(name, "json")).read_text())
        steps = json.loads((even_run / "pacing" / walk_file(name, "steps.json")).read_text())
        assert plan["walk"] == steps["walk"] == name
        mine = frames.filter(pc.and_(pc.equal(frames["walk"], name), pc.equal(frames["pace_pass"], "final")))
        got = [g for _, g in sorted(zip(mine["index"].to_pylist(), mine["gamma"].to_pylist()))]
        assert got == plan["methods"]["slerp"]["final_gammas"], name


def test_video_writes_one_file_per_walk(even_run):
    res = CliRunner().invoke(app, ["video", str(even_run)])
    assert res.exit_code == 0, res.output
    videos = sorted(os.listdir(even_run / "videos"))
    assert videos == sorted(walk_file(n, "mp4") for n in NAMES), videos
    res = CliRunner().invoke(app, ["video", str(even_run), "--walk", "x", "--method", "slerp"])
    assert res.exit_code == 0 and (even_run / "videos" / walk_file("x", "slerp.mp4")).is_file(), res.output

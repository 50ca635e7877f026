"""Outputs never land on a run's own files: `video`, `view`, `score`, `study` and `render` refuse (one line,
exit 2, nothing written) a path on or inside a run folder's run.json, frames/, commits/, inversions/, pacing/,
quarantine/ or lock file, symlinks followed; and a study whose last run stopped before its report says so
when the next run writes it. Run folders rendered with the built-in tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hpcwalk.cli import app
from hpcwalk.core.errors import StoreError
from hpcwalk.store.runfolder import check_output_path
from jobs import tiny_job_toml, tiny_study_toml, walk

RESERVED = ["run.json", "frames", "commits", "inversions", "pacing", "quarantine", ".hpcwalk.lock"]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under root: file bytes, symlink targets, folders."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath, n)
            rel = str(p.relative_to(root))
            out[rel] = ("-> " + os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outputs")
    job = tmp / "job.toml"
    job.write_text(tiny_job_toml(walk("w", "latent", prompt="a cat", seeds=[1, 2], methods=["slerp"], frames=3),
                                 steps=1, size=16, shard_size=3))
    res = invoke("render", job, "--out", tmp / "run", "--no-progress")
    assert res.exit_code == 0, res.output
    return tmp


@pytest.fixture
def run(rendered, tmp_path):
    """A fresh copy of the rendered run (tests add symlinks and must see their own tree only)."""
    import shutil

    shutil.copytree(rendered / "run", tmp_path / "run")
    return tmp_path / "run"


def refused(res, run: Path, before) -> str:
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert tree(run.parent) == before
    return lines[0]


@pytest.mark.parametrize("entry", RESERVED)
def test_video_out_on_a_run_entry_is_refused(run, entry):
    target = run / entry if entry == "run.json" else run / entry / "w.mp4"
    before = tree(run.parent)
    line = refused(invoke("video", run, "--walk", "w", "--out", target), run, before)
    assert repr(str(target)) in line and entry in line and "choose another path" in line


def test_video_out_through_a_symlink_into_frames_is_refused(run):
    (run.parent / "link").symlink_to(run / "frames")
    before = tree(run.parent)
    refused(invoke("video", run, "--walk", "w", "--out", run.parent / "link" / "w.mp4"), run, before)


def test_video_default_path_through_a_symlinked_videos_folder_is_refused(run):
    (run / "videos").symlink_to(run / "commits")
    before = tree(run.parent)
    refused(invoke("video", run), run, before)


@pytest.mark.parametrize("entry", ["frames", "pacing"])
def test_view_out_inside_a_run_entry_is_refused(run, entry):
    before = tree(run.parent)
    refused(invoke("view", run, "--out", run / entry / "viewer"), run, before)


def test_score_folder_inside_a_run_entry_is_refused(run):
    (run / "scores").symlink_to(run / "frames")
    before = tree(run.parent)
    refused(invoke("score", run, "--clip-model", "tiny-clip", "--device", "cpu", "--no-progress"), run, before)


@pytest.mark.parametrize("command", ["study", "render"])
def test_study_and_render_out_inside_a_run_entry_are_refused(run, tmp_path, command):
    f = tmp_path / "job.toml"
    f.write_text(tiny_study_toml("a cat", "lpips = \"none\"") if command == "study" else
                 tiny_job_toml(walk("v", "latent", prompt="a dog", seeds=[1, 2], methods=["slerp"], frames=3),
                               steps=1, size=16))
    before = tree(run.parent)
    refused(invoke(command, f, "--out", run / "frames" / "inner", "--device", "cpu", "--no-progress"), run, before)


def test_check_output_path_allows_what_is_not_a_runs_own(run, tmp_path):
    for ok in (run / "videos" / "w.mp4", run / "viewer", run / "scores" / "m", run, tmp_path / "elsewhere" / "x",
               run / "framesx" / "a", run / "run.json.bak"):
        check_output_path(str(ok))
    (tmp_path / "plain" / "frames").mkdir(parents=True)  # a folder named frames in a folder that is not a run
    check_output_path(str(tmp_path / "plain" / "frames" / "x.mp4"))
    with pytest.raises(StoreError):
        check_output_path(str(run / "frames" / "deep" / "er" / "x.mp4"))


# ---------------------------------------------------------------------------------------------
# A study stopped after its render, before its report
# ---------------------------------------------------------------------------------------------

def test_study_rerun_says_the_missing_report_is_written_now(tmp_path):
    f = tmp_path / "study.toml"
    f.write_text(tiny_study_toml("a cat", "bootstrap = 200", "lpips = \"none\""))
    out = tmp_path / "study"
    args = ("study", f, "--out", out, "--device", "cpu", "--no-progress")
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert "report" not in " ".join(line for line in first.output.splitlines() if line.startswith("warning:"))
    outputs = ("study.json", "study.parquet", "report.html")
    assert invoke("verify", out).exit_code == 0
    for n in outputs:  # what a kill after the render, before the report, leaves
        (out / n).unlink()
    said = invoke("verify", out)  # every shard is ok, but the folder owes its report: verify says so
    assert said.exit_code == 1 and said.stdout.splitlines()[-1] == "1 of 1 shards ok (full)", said.output
    owed = [line for line in said.stderr.splitlines() if line.startswith("study: ")]
    assert len(owed) == 1 and all(n in owed[0] for n in outputs) and f"hpcwalk study {f} --out {out}" in owed[0]
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    said = [line for line in again.output.splitlines() if line.startswith("warning:") and "report" in line]
    assert len(said) == 1 and all(n in said[0] for n in outputs) and "writing" in said[0], again.output
    assert all((out / n).is_file() for n in outputs)
    third = invoke(*args)  # nothing missing: nothing said
    assert third.exit_code == 0 and not [line for line in third.output.splitlines()
                                         if line.startswith("warning:") and "report" in line], third.output
    assert invoke("verify", out).exit_code == 0

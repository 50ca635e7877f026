"""A run folder held against its plan: a shard copied or linked from another job's run, a copy of one of the
run's own shards under another name, a shard the plan does not have, a planned shard deleted with its marker,
run.json copied from another run, a marker whose rows or shard number lie, a folder where a shard belongs.
Each is its own state in `hpcwalk verify`, is left out by every reader with a warning, is moved into
quarantine/ (never deleted) by --repair and by the next render, which then renders the shard again."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from hpcwalk.cli import app
from hpcwalk.store.reader import read_frames, verify_run
from hpcwalk.store.runindex import open_run
from hpcwalk.store.verify import RunWarning
from jobs import cat_walk, tiny_job_toml, walk

runner = CliRunner()
JOB = tiny_job_toml(cat_walk(methods=["linear", "slerp"], frames=5), steps=1, size=16)  # 10 frames, 5 shards
DOG = tiny_job_toml(walk("w", "latent", prompt="a dog", seeds=[1, 2], methods=["linear", "slerp"], frames=5),
                    steps=1, size=16)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(cat job file, clean cat run, dog job file, dog run): two jobs with the same shape, other frames."""
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for name, text in (("cat", JOB), ("dog", DOG)):
        (tmp / f"{name}.toml").write_text(text)
        res = runner.invoke(app, ["render", str(tmp / f"{name}.toml"), "--out", str(tmp / name), "--no-progress"])
        assert res.exit_code == 0, res.output
        out[name] = (str(tmp / f"{name}.toml"), str(tmp / name))
    return out["cat"][0], out["cat"][1], out["dog"][0], out["dog"][1]


@pytest.fixture
def run(runs, tmp_path):
    """A fresh copy of the clean cat run, to damage."""
    path = str(tmp_path / "run")
    shutil.copytree(runs[1], path)
    return path


def _f(run: str, i: int) -> str:
    return os.path.join(run, "frames", f"shard-{i:05d}.parquet")


def _m(run: str, i: int) -> str:
    return os.path.join(run, "commits", f"shard-{i:05d}.done.json")


def _frames(out: str) -> pa.Table:
    return read_frames(out).sort_by("frame_id").replace_schema_metadata(None)


def _copy(run: str, i: int, j: int, src: str | None = None) -> None:
    """Shard i (of `src`, else of the run itself) and its marker copied in as shard j."""
    for path in (_f, _m):
        shutil.copy(path(src or run, i), path(run, j))


def _verify(run: str, *flags: str):
    res = runner.invoke(app, ["verify", run, *flags])
    return res.exit_code, res.stdout.splitlines()


def _renders_back(job_file: str, run: str, clean: str, rendered: int) -> None:
    """The next render renders exactly the bad shards again and the run equals the clean one."""
    res = runner.invoke(app, ["render", job_file, "--out", run, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"in {rendered} shards rendered" in res.stdout, res.stdout
    code, lines = _verify(run)
    assert code == 0 and lines[-1] == "5 of 5 shards ok (full)", lines
    assert _frames(run).equals(_frames(clean))


def test_a_shard_copied_from_another_jobs_run_is_foreign(runs, run):
    job_file, clean, _, dog = runs
    _copy(run, 2, 2, src=dog)
    for level in ("quick", "full"):
        code, lines = _verify(run, "--verify", level)
        assert code == 1 and lines[2].startswith("shard-00002: foreign (it carries job "), lines
        assert lines[-1] == f"4 of 5 shards ok ({level}), 1 foreign"
    with pytest.warns(RunWarning, match=r"shard-00002: foreign .*left out"):
        t = read_frames(run, columns=["frame_id", "prompt"])
    assert t.num_rows == 8 and set(t.column("prompt").to_pylist()) == {"a cat"}
    res = runner.invoke(app, ["render", job_file, "--out", run, "--no-progress"])
    assert res.exit_code == 0 and "1 shards rendered" in res.stdout, res.output
    assert "moved shard-00002.parquet into" in res.stderr and "quarantine" in res.stderr
    assert sorted(os.listdir(os.path.join(run, "quarantine"))) == ["shard-00002.done.json", "shard-00002.parquet"]
    assert open(os.path.join(run, "quarantine", "shard-00002.parquet"), "rb").read() == open(_f(dog, 2), "rb").read()
    assert _verify(run)[0] == 0 and _frames(run).equals(_frames(clean))


@pytest.mark.parametrize("target", ["dog", "own"])
def test_a_symlink_where_a_shard_belongs_is_not_the_runs_own(runs, run, target):
    """A link to another run's shard, or to another of this run's (which a render may rewrite under it)."""
    job_file, clean, _, dog = runs
    os.remove(_f(run, 1))
    os.symlink(_f(dog, 1) if target == "dog" else _f(run, 2), _f(run, 1))
    shutil.copy(_m(dog, 1) if target == "dog" else _m(run, 2), _m(run, 1))
    code, lines = _verify(run)
    assert code == 1 and lines[1] == "shard-00001: not a file (frames/shard-00001.parquet is a symbolic link)", lines
    _renders_back(job_file, run, clean, 1)
    assert os.path.islink(os.path.join(run, "quarantine", "shard-00001.parquet"))  # the link moved, its target kept
    assert os.path.isfile(_f(dog, 1)) and os.path.isfile(_f(run, 2))


@pytest.mark.parametrize("j, line, rendered", [
    (2, "shard-00002: duplicate (a copy of shard-00001)", 1),  # a copy under a planned name: that shard renders again
    (99999, "shard-99999: extra (the plan has 5 shards and no shard 99999)", 0)])  # outside the plan: moved aside
def test_a_copy_of_a_shard_under_another_name_is_a_duplicate_or_extra(runs, run, j, line, rendered):
    job_file, clean, _, _ = runs
    _copy(run, 1, j)
    code, lines = _verify(run)
    assert code == 1 and line in lines, lines
    with pytest.warns(RunWarning, match=line.split(" (")[0]):
        ids = read_frames(run, columns=["frame_id"]).column("frame_id").to_pylist()
    assert len(ids) == len(set(ids)) == (8 if j == 2 else 10)
    _renders_back(job_file, run, clean, rendered)
    assert sorted(os.listdir(os.path.join(run, "quarantine"))) == [f"shard-{j:05d}.done.json", f"shard-{j:05d}.parquet"]


def test_swapped_shards_are_both_misplaced(runs, run):
    job_file, clean, _, _ = runs
    for path in (_f, _m):
        os.rename(path(run, 1), path(run, 9))
        os.rename(path(run, 2), path(run, 1))
        os.rename(path(run, 9), path(run, 2))
    code, lines = _verify(run)
    assert lines[1] == "shard-00001: misplaced (it holds shard-00002's frames)", lines
    assert lines[2] == "shard-00002: misplaced (it holds shard-00001's frames)"
    _renders_back(job_file, run, clean, 2)


def test_a_planned_shard_deleted_with_its_marker_is_missing(runs, run):
    job_file, clean, _, _ = runs
    os.remove(_f(run, 3))
    os.remove(_m(run, 3))
    code, lines = _verify(run)
    assert code == 1 and lines[3] == "shard-00003: missing (planned, but neither its file nor its marker is there)"
    assert lines[-1] == "4 of 5 shards ok (full), 1 missing"
    with pytest.warns(RunWarning, match=r"1 planned shards are not there \(shard-00003\)"):
        assert read_frames(run).num_rows == 8
    assert open_run(run).missing_shards == [3]
    _renders_back(job_file, run, clean, 1)


def test_a_run_json_copied_from_another_run_is_refused_naming_both_jobs(runs, run):
    _, _, dog_file, dog = runs
    shutil.copy(os.path.join(dog, "run.json"), os.path.join(run, "run.json"))
    dog_fp = json.load(open(os.path.join(dog, "run.json")))["job_fingerprint"]
    cat_fp = json.load(open(os.path.join(runs[1], "run.json")))["job_fingerprint"]
    before = {n: open(os.path.join(run, "frames", n), "rb").read() for n in os.listdir(os.path.join(run, "frames"))}
    res = runner.invoke(app, ["render", dog_file, "--out", run, "--no-progress"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and dog_fp in lines[0] and cat_fp in lines[0], lines
    assert {n: open(os.path.join(run, "frames", n), "rb").read() for n in os.listdir(os.path.join(run, "frames"))} == before
    code, out = _verify(run)
    assert code == 1 and all(x.endswith(f"foreign (it carries job {cat_fp}, this run is job {dog_fp})")
                             for x in out[:5]), out
    res = runner.invoke(app, ["verify", run, "--repair"])
    assert res.exit_code == 1 and "run.json says job" in res.stderr  # repair moves nothing: run.json is the liar
    assert not os.path.exists(os.path.join(run, "quarantine"))


@pytest.mark.parametrize("field, value, said", [("rows", 3, "the marker says 3 rows, the plan 2"),
                                                ("shard", 4, "the marker names shard 4")])
def test_a_marker_whose_rows_or_shard_number_lie_is_a_bad_marker(runs, run, field, value, said):
    job_file, clean, _, _ = runs
    m = json.load(open(_m(run, 2)))
    m[field] = value
    json.dump(m, open(_m(run, 2), "w"))
    for level in ("quick", "full"):
        code, lines = _verify(run, "--verify", level)
        assert code == 1 and lines[2] == f"shard-00002: bad marker ({said})", lines
    _renders_back(job_file, run, clean, 1)


def test_markers_written_before_the_plan_check_are_checked_from_the_parquet_footer(runs, run):
    """Older markers carry no job_fingerprint or frames digest: both levels read the footer and frame ids."""
    _, _, _, dog = runs
    _copy(run, 0, 0, src=dog)
    for i in range(5):
        m = json.load(open(_m(run, i)))
        del m["job_fingerprint"], m["frames"]
        json.dump(m, open(_m(run, i), "w"))
    for level in ("quick", "full"):
        code, lines = _verify(run, "--verify", level)
        assert lines[0].startswith("shard-00000: foreign") and lines[-1] == f"4 of 5 shards ok ({level}), 1 foreign"


def test_a_folder_where_a_shard_belongs_is_moved_aside(runs, run):
    job_file, clean, _, _ = runs
    os.remove(_f(run, 2))
    os.mkdir(_f(run, 2))
    open(os.path.join(_f(run, 2), "keep.txt"), "w").write("someone's notes")
    code, lines = _verify(run)
    assert code == 1 and lines[2] == "shard-00002: not a file (frames/shard-00002.parquet is not a regular file)", lines
    _renders_back(job_file, run, clean, 1)
    assert open(os.path.join(run, "quarantine", "shard-00002.parquet", "keep.txt")).read() == "someone's notes"


def test_repair_moves_what_is_not_ours_and_removes_what_is_damaged(runs, run):
    job_file, clean, _, dog = runs
    _copy(run, 1, 1, src=dog)
    _copy(run, 0, 7)
    open(_f(run, 3), "wb").write(open(_f(run, 3), "rb").read()[:50])  # truncated: ours, removed
    res = runner.invoke(app, ["verify", run, "--repair"])
    assert res.exit_code == 0, res.output
    assert "removed 2 files, moved 4 files that are not this run's into" in res.stdout
    assert sorted(os.listdir(os.path.join(run, "quarantine"))) == [
        "shard-00001.done.json", "shard-00001.parquet", "shard-00007.done.json", "shard-00007.parquet"]
    code, lines = _verify(run)
    assert code == 1 and lines[-1] == "3 of 5 shards ok (full), 2 missing"
    _renders_back(job_file, run, clean, 2)


def test_the_plan_is_checked_for_the_shards_asked_for_only(runs, run):
    os.remove(_f(run, 3))
    os.remove(_m(run, 3))
    assert [c.state for c in verify_run(run, only={1, 3}).checks] == ["ok", "missing"]
    assert [c.state for c in verify_run(run, only={1}).checks] == ["ok"]

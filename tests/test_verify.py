"""Shards checked against their commit markers: `hpcwalk verify` lists each shard's state and `--repair`
removes the damage; every reader leaves a damaged shard out with a warning naming it; resume renders
exactly the damaged shards again; one driver per run folder (the lock)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from hpcwalk.cli import app
from hpcwalk.store.runindex import open_run
from hpcwalk.store.verify import RunWarning
from hpcwalk.store.reader import read_frames
from jobs import cat_walk, tiny_job_toml
from synthetic_run import LATENT3, make_run

runner = CliRunner()
DAMAGE = ("truncated", "checksum mismatch", "missing", "file without marker", "stray temp file")


def damage(run: str, kind: str, shard: int = 1) -> None:
    """Damage one shard of a run folder the way the issue found it: truncated, one flipped byte, its
    Parquet file deleted (marker kept), its marker deleted (file kept), or a stray temporary file."""
    f = os.path.join(run, "frames", f"shard-{shard:05d}.parquet")
    marker = os.path.join(run, "commits", f"shard-{shard:05d}.done.json")
    if kind == "truncated":
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2])
    elif kind == "checksum mismatch":
        data = bytearray(open(f, "rb").read())
        data[len(data) // 2] ^= 0x40
        open(f, "wb").write(bytes(data))
    elif kind == "missing":
        os.remove(f)
    elif kind == "file without marker":
        os.remove(marker)
    else:
        open(os.path.join(run, "frames", f".shard-{shard:05d}.parquet.tmp"), "wb").write(b"half a parquet file")


@pytest.fixture
def run(tmp_path) -> str:
    """A synthetic run: one 12-frame walk in 3 shards of 4 frames (shard 1 holds indices 4-7)."""
    path = str(tmp_path / "run")
    make_run(path, [dict(LATENT3, frames=12, methods=["linear"])], shard_size=4)
    return path


def test_verify_lists_every_state_and_repair_removes_exactly_the_damage(tmp_path):
    run = str(tmp_path / "run")
    make_run(run, [dict(LATENT3, frames=24, methods=["linear"])], shard_size=4)  # shards 0-5
    for k, kind in enumerate(DAMAGE):
        damage(run, kind, shard=k)
    res = runner.invoke(app, ["verify", run])
    assert res.exit_code == 1, res.output
    lines = res.stdout.splitlines()
    assert lines[:6] == ["shard-00000: truncated (" + lines[0].split("(", 1)[1],
                         "shard-00001: checksum mismatch (" + lines[1].split("(", 1)[1],
                         "shard-00002: missing (its Parquet file is gone)",
                         "shard-00003: file without marker (renamed into place but never committed)",
                         "shard-00004: ok", "shard-00005: ok"]
    assert lines[6].startswith(".shard-00004.parquet.tmp: stray temp file")
    assert lines[7] == ("2 of 6 shards ok (full), 1 truncated, 1 checksum mismatch, 1 missing, 1 file without marker, "
                        "1 stray temp file")
    assert "hpcwalk verify" in res.stderr and "--repair" in res.stderr
    # the quick level (size only) cannot see a flipped byte: it says ok there
    quick = runner.invoke(app, ["verify", run, "--verify", "quick"])
    assert "shard-00001: ok" in quick.stdout and "shard-00000: truncated" in quick.stdout
    # --repair removes markers and files of the damaged shards and the temp file; the good ones stay
    before = {n: os.path.getmtime(os.path.join(run, "commits", n)) for n in ("shard-00004.done.json", "shard-00005.done.json")}
    res = runner.invoke(app, ["verify", run, "--repair"])
    assert res.exit_code == 0, res.output
    assert "repaired: removed 7 files" in res.stdout
    assert sorted(os.listdir(os.path.join(run, "frames"))) == ["shard-00004.parquet", "shard-00005.parquet"]
    assert sorted(os.listdir(os.path.join(run, "commits"))) == sorted(before)
    assert {n: os.path.getmtime(os.path.join(run, "commits", n)) for n in before} == before
    again = runner.invoke(app, ["verify", run])  # the removed shards are planned: missing until rendered again
    assert again.exit_code == 1 and again.stdout.splitlines()[-1] == "2 of 6 shards ok (full), 4 missing"
    assert again.stdout.splitlines()[0] == "shard-00000: missing (planned, but neither its file nor its marker is there)"
    assert runner.invoke(app, ["verify", str(tmp_path)]).exit_code == 2  # not a run folder


@pytest.mark.parametrize("kind", ["truncated", "checksum mismatch", "missing"])
def test_readers_leave_a_damaged_shard_out_and_name_it(run, tmp_path, kind):
    damage(run, kind)
    # 1. read_frames: the other shards' frames, and a warning naming the shard and the repair
    with pytest.warns(RunWarning, match=rf"shard-00001: {kind}.*left out; repair: .*hpcwalk verify .* --repair"):
        t = read_frames(run, columns=["frame_id", "index", "image"])
    assert sorted(t.column("index").to_pylist()) == [0, 1, 2, 3, 8, 9, 10, 11]
    # 2. open_run (video, view, figures): the shard counts as missing
    with pytest.warns(RunWarning, match="shard-00001"):
        index = open_run(run)
    assert index.missing_shards == [1] and index.tracks("seeds")[0].missing == [4, 5, 6, 7]
    # 3. the commands: exit 0, the warning as one line, the gap reported, never a traceback
    for args in (["video", run, "--walk", "seeds", "--out", str(tmp_path / "v.mp4")],
                 ["view", run, "--out", str(tmp_path / "viewer")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        warned = [line for line in res.stderr.splitlines() if line.startswith(f"warning: shard-00001: {kind}")]
        assert len(warned) == 1 and "hpcwalk verify" in warned[0], res.stderr
        assert "missing 1 of 3 shards: shard-00001" in res.stderr
    viewer = os.path.join(tmp_path, "viewer", "frames", "w0", "m0")
    assert sorted(os.listdir(viewer)) == [f"{i:05d}.png" for i in (0, 1, 2, 3, 8, 9, 10, 11)]


def test_score_leaves_a_damaged_shard_out(run):
    damage(run, "checksum mismatch")
    res = runner.invoke(app, ["score", run, "--clip-model", "tiny-clip", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "warning: shard-00001: checksum mismatch" in res.stderr
    assert "8 frames in 2 shards scored" in res.stdout
    assert sorted(os.listdir(os.path.join(run, "scores", "tiny-clip__none", "data"))) == [
        "shard-00000.parquet", "shard-00002.parquet"]


def test_a_corrupted_score_shard_is_scored_again(run):
    args = ["score", run, "--clip-model", "tiny-clip", "--device", "cpu", "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    f = os.path.join(run, "scores", "tiny-clip__none", "data", "shard-00002.parquet")
    open(f, "wb").write(open(f, "rb").read()[:100])
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "4 frames in 1 shards scored with tiny-clip/none, 2 shards already scored" in res.stdout


# -- resume: exactly the damaged shards are rendered again ------------------------------------------

JOB = tiny_job_toml(cat_walk(methods=["linear", "slerp"], frames=5), steps=1, size=16)  # 10 frames, 5 shards


def _frames(out: str) -> pa.Table:
    return read_frames(out).sort_by("frame_id").replace_schema_metadata(None)


def test_resume_renders_exactly_the_damaged_shards_again(job_file, tmp_path):
    ref = str(tmp_path / "ref")
    assert runner.invoke(app, ["render", job_file, "--out", ref, "--no-progress"]).exit_code == 0
    out = str(tmp_path / "run")
    shutil.copytree(ref, out)
    for k, kind in enumerate(DAMAGE):
        damage(out, kind, shard=k)
    kept = os.path.getmtime(os.path.join(out, "commits", "shard-00004.done.json"))
    res = runner.invoke(app, ["render", job_file, "--out", out, "--no-progress"])
    assert res.exit_code == 0, res.output
    for k, kind in enumerate(DAMAGE[:3]):  # the ones that were committed: named as they are rendered again
        assert f"warning: shard-{k:05d}: {kind}" in res.stderr and "rendering it again" in res.stderr, res.stderr
    assert "done: 8 frames in 4 shards rendered, 1 shards already committed" in res.stdout
    assert "3 damaged shards were rendered again" in res.stdout
    assert os.path.getmtime(os.path.join(out, "commits", "shard-00004.done.json")) == kept
    assert _frames(out).equals(_frames(ref))
    assert runner.invoke(app, ["verify", out]).stdout.splitlines()[-1] == "5 of 5 shards ok (full)"


# -- one driver per run folder ----------------------------------------------------------------------


def _lock(out: str, **holder) -> str:
    path = os.path.join(out, ".hpcwalk.lock")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"started_at": time.time(), "token": "t", **holder}, f)
    return path


def test_a_live_driver_refuses_a_second_one(job_file, tmp_path):
    import platform

    from hpcwalk.store.runlock import _pid_start

    out = str(tmp_path / "run")
    assert runner.invoke(app, ["render", job_file, "--out", out, "--no-progress"]).exit_code == 0
    os.remove(os.path.join(out, "commits", "shard-00002.done.json"))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live process on this host
    try:
        lock = _lock(out, host=platform.node(), pid=other.pid, pid_start=_pid_start(other.pid))
        for args in (["render", job_file, "--out", out, "--no-progress"], ["verify", out, "--repair"]):
            res = runner.invoke(app, args)
            assert res.exit_code == 2, res.output
            [line] = res.stderr.strip().splitlines()
            assert line.startswith(f"error: {out!r} is being rendered by pid {other.pid} on {platform.node()}")
            assert "refusing to start a second driver" in line
        assert not os.path.exists(os.path.join(out, "commits", "shard-00002.done.json"))  # nothing rendered
        note = runner.invoke(app, ["verify", out])  # read-only: says a render is running
        assert f"note: pid {other.pid} on" in note.stderr
        # from another host with a fresh heartbeat: refused; with none for over 10 minutes: taken over
        _lock(out, host="elsewhere.example", pid=1)
        assert runner.invoke(app, ["render", job_file, "--out", out, "--no-progress"]).exit_code == 2
        os.utime(lock, (time.time() - 700, time.time() - 700))
        res = runner.invoke(app, ["render", job_file, "--out", out, "--no-progress"])
        assert res.exit_code == 0, res.output
        assert "warning: took over the lock of" in res.stderr and "no heartbeat from elsewhere.example" in res.stderr
        assert "done: 2 frames in 1 shards rendered" in res.stdout and not os.path.exists(lock)
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("content", [b"[1, 2]", b"7", b"\xff\xfe"], ids=["a list", "a number", "odd bytes"])
def test_a_lock_that_is_not_a_json_object_is_taken_as_unreadable(job_file, tmp_path, content):
    """A lock file holding a JSON list or number gave AttributeError (a traceback) in every render; it is now an
    unreadable lock like odd bytes: refused while young, taken over once older than the grace period."""
    out = str(tmp_path / "run")
    assert runner.invoke(app, ["render", job_file, "--out", out, "--no-progress"]).exit_code == 0
    os.remove(os.path.join(out, "commits", "shard-00001.done.json"))
    lock = os.path.join(out, ".hpcwalk.lock")
    open(lock, "wb").write(content)
    res = runner.invoke(app, ["render", job_file, "--out", out, "--no-progress"])
    assert res.exit_code == 2 and "its lock file is being written" in res.stderr, res.output
    os.utime(lock, (time.time() - 60, time.time() - 60))
    res = runner.invoke(app, ["render", job_file, "--out", out, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "the lock file is unreadable and 60 s old" in res.stderr and "done: 2 frames in 1 shards" in res.stdout


def test_a_dead_drivers_lock_is_taken_over_with_a_message(job_file, tmp_path):
    import platform

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = str(tmp_path / "run")
    _lock(out, host=platform.node(), pid=gone.pid, pid_start=None)  # a new folder holding only a stale lock
    res = runner.invoke(app, ["render", job_file, "--out", out, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"warning: took over the lock of {out!r} from pid {gone.pid}" in res.stderr
    assert f"pid {gone.pid} is no longer running on this host" in res.stderr
    assert "done: 10 frames in 5 shards rendered" in res.stdout
    assert sorted(os.listdir(out)) == ["commits", "frames", "run.json"]  # the lock is gone after the run


_KILLED_WRITING_THE_LOCK = r"""
import os, signal, sys
from hpcwalk.store import runlock

def write_then_die(fd, data):  # SIGKILL at the moment the lock's content is written
    os.kill(os.getpid(), signal.SIGKILL)

runlock.os.write = write_then_die
runlock.RunLock(sys.argv[1]).acquire(create=True)
"""


def test_a_driver_killed_while_writing_its_lock_does_not_block_the_rerun(job_file, tmp_path):
    """The lock was created empty (O_EXCL) and then written: a driver killed in between left an empty lock,
    which refused every rerun for its first 10 s ("its lock file is being written"). The lock now appears
    whole or not at all (written beside it, then hard-linked into place)."""
    out = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITING_THE_LOCK, out], capture_output=True)
    assert proc.returncode == -9, proc.stderr
    res = runner.invoke(app, ["render", job_file, "--out", out, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "done: 10 frames in 5 shards rendered" in res.stdout
    assert sorted(os.listdir(out)) == ["commits", "frames", "run.json"]  # the half-written lock's file removed


@pytest.mark.parametrize("left", [["frames/"], ["frames/", "commits/"], ["frames/", "commits/", ".run.json.tmp"]])
def test_a_driver_killed_while_opening_a_new_folder_leaves_one_the_rerun_starts(job_file, tmp_path, left):
    """A driver SIGKILLed after creating the new folder's frames/ and commits/ but before run.json was in place
    (found by the SIGKILL trials) left a folder the rerun refused as "not an hpcwalk run". What it leaves (the
    lock, the empty folders, a partial .run.json.tmp) is ours: the same command starts the run."""
    import platform

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = str(tmp_path / "run")
    _lock(out, host=platform.node(), pid=gone.pid, pid_start=None)
    for name in left:
        path = os.path.join(out, name)
        os.makedirs(path) if name.endswith("/") else open(path, "wb").write(b'{"job_fing')
    res = runner.invoke(app, ["render", job_file, "--out", out, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "done: 10 frames in 5 shards rendered" in res.stdout
    assert sorted(os.listdir(out)) == ["commits", "frames", "run.json"]


@pytest.mark.parametrize("extra", ["frames/shard-00000.parquet", "commits/notes.txt", "notes.txt", ".run.json.tmp/"])
def test_a_folder_with_anything_more_is_still_refused(job_file, tmp_path, extra):
    out = str(tmp_path / "run")
    os.makedirs(os.path.join(out, "frames"))
    os.makedirs(os.path.join(out, "commits"))
    path = os.path.join(out, extra)
    os.makedirs(path) if extra.endswith("/") else open(path, "wb").write(b"user data")
    res = runner.invoke(app, ["render", job_file, "--out", out, "--no-progress"])
    assert res.exit_code == 2 and "is not empty and is not an hpcwalk run" in res.stderr, res.output
    assert os.path.exists(path)


def test_verify_run_only_checks_the_shards_asked_for(run):
    """`only`: the shards a reader of a few shards needs (even pacing's coarse or final pass), checked in full;
    the others are not read at all (shard 1's flipped byte and shard 2's stray temp file go unseen)."""
    from hpcwalk.store.reader import verify_run

    damage(run, "checksum mismatch", shard=1)
    damage(run, "stray temp file", shard=2)
    some = verify_run(run, "full", only={0})
    assert [(c.name, c.state) for c in some.checks] == [("shard-00000", "ok")] and some.checks[0].sha256
    marker = json.load(open(os.path.join(run, "commits", "shard-00000.done.json")))
    assert some.checks[0].sha256 == marker["sha256"]
    assert {c.state for c in verify_run(run, "full", only={1, 2}).checks} == {"checksum mismatch", "ok", "stray temp file"}


_KILLED_REPLACING = r"""
import os, signal, sys
import pyarrow.fs as pafs
from hpcwalk.cli import app
from hpcwalk.store import reader, writer

class KilledWhileReplacing(pafs.LocalFileSystem):
    # lists run.json first (as ext4's hashed folders may), and SIGKILLs when the old run.json is removed,
    # or else once the old contents are gone (the next step)
    def get_file_info(self, what):
        got = super().get_file_info(what)
        return sorted(got, key=lambda i: i.base_name != "run.json") if isinstance(what, pafs.FileSelector) else got

    def delete_file(self, path):
        super().delete_file(path)
        if path.endswith("/run.json"):
            os.kill(os.getpid(), signal.SIGKILL)

    def create_dir(self, path, recursive=True):
        os.kill(os.getpid(), signal.SIGKILL)

writer.filesystem = reader.filesystem = lambda uri: (KilledWhileReplacing(), os.path.abspath(uri))
app(["render", sys.argv[1], "--out", sys.argv[2], "--no-progress", "--overwrite"])
"""


def test_an_overwrite_killed_midway_can_be_run_again(job_file, tmp_path):
    """--overwrite removed the old run's files in listing order, run.json among them: killed after run.json
    went but before frames/ did, it left a folder of frames without run.json, which every later render,
    --overwrite included, refused as "not an hpcwalk run". run.json now stays until the new one replaces it."""
    out = str(tmp_path / "run")
    other = tmp_path / "other.toml"
    other.write_text(open(job_file).read().replace("steps = 1", "steps = 2"))
    assert other.read_text() != open(job_file).read()
    assert runner.invoke(app, ["render", str(other), "--out", out, "--no-progress"]).exit_code == 0
    proc = subprocess.run([sys.executable, "-c", _KILLED_REPLACING, job_file, out], capture_output=True)
    assert proc.returncode == -9, proc.stderr
    res = runner.invoke(app, ["render", job_file, "--out", out, "--no-progress"])
    assert res.exit_code == 2 and "holds another job" in res.stderr and "--overwrite" in res.stderr, res.output
    res = runner.invoke(app, ["render", job_file, "--out", out, "--no-progress", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert "done: 10 frames in 5 shards rendered" in res.stdout


# -- a damaged run.json ----------------------------------------------------------------------------

BAD_RUN_JSON = {"odd bytes": b"\xff\xfe\x00garbage", "empty": b"", "cut short": b'{"job_fingerprint": "ab',
                "a list": b"[1, 2]", "null": b"null", "another tool's": b'{"run_id": 7, "metrics": {}}'}


@pytest.mark.parametrize("content", BAD_RUN_JSON.values(), ids=BAD_RUN_JSON.keys())
def test_a_damaged_run_json_is_one_line_and_exit_2_everywhere_and_loses_nothing(run, job_file, tmp_path, content):
    """A run.json that is not JSON, not an object, or not hpcwalk's: every command gave a traceback (exit 1),
    and `render --overwrite` would have deleted a folder holding another tool's run.json. Now one line naming
    run.json and the fix, exit 2 (verify: the shards' states and that line, exit 1), and nothing in the folder
    is touched."""
    open(os.path.join(run, "run.json"), "wb").write(content)
    before = sorted((d, f, os.path.getsize(os.path.join(d, f))) for d, _, fs in os.walk(run) for f in fs)
    for args in (["verify", run], ["verify", run, "--repair"]):  # verify still checks the shards: exit 1
        res = runner.invoke(app, args)
        assert res.exit_code == 1, (args, res.output)
        lines = res.stdout.splitlines()
        assert lines[:4] == ["shard-00000: ok", "shard-00001: ok", "shard-00002: ok", "3 of 3 shards ok (full)"]
        assert lines[4].startswith("run.json: damaged or not hpcwalk's (") and "rerun the render" in lines[4], lines
    for args in (["view", run, "--out", str(tmp_path / "v")],
                 ["video", run, "--out", str(tmp_path / "x.mp4")], ["score", run],
                 ["render", job_file, "--out", run, "--no-progress"],
                 ["render", job_file, "--out", run, "--no-progress", "--overwrite"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "run.json" in lines[0], (args, res.stderr)
        assert "choose a new --out" in lines[0] or "restore" in lines[0], lines[0]
    assert sorted((d, f, os.path.getsize(os.path.join(d, f))) for d, _, fs in os.walk(run) for f in fs) == before
    assert not os.path.exists(tmp_path / "v") and not os.path.exists(tmp_path / "x.mp4")


@pytest.mark.parametrize("content,left", [(b"\xff\xfe\x00garbage", 1), (b'{"job_fingerprint": "ab', 0)],
                         ids=["odd bytes, a shard left", "cut short, none left"])
def test_the_runs_own_job_writes_a_damaged_run_json_again(job_file, tmp_path, content, left):
    """The shards carry the job's fingerprint and the run's metadata: rerunning the render with the run's own
    job file writes run.json again, byte for byte as it was (another job is still refused)."""
    out = str(tmp_path / "run")
    assert runner.invoke(app, ["render", job_file, "--out", out, "--no-progress"]).exit_code == 0
    path = os.path.join(out, "run.json")
    good = open(path, "rb").read()
    if left:
        os.remove(os.path.join(out, "commits", "shard-00003.done.json"))  # and one shard still to render
    open(path, "wb").write(content)
    other = tmp_path / "other.toml"
    other.write_text(open(job_file).read().replace("steps = 1", "steps = 2"))
    res = runner.invoke(app, ["render", str(other), "--out", out, "--no-progress"])
    assert res.exit_code == 2 and "damaged or not hpcwalk's" in res.stderr and open(path, "rb").read() == content
    res = runner.invoke(app, ["render", job_file, "--out", out, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "warning: " in res.stderr and f"its {5 - left} committed shards carry this job's fingerprint" in res.stderr
    assert f"done: {2 * left} frames in {left} shards rendered, {5 - left} shards already committed" in res.stdout
    assert open(path, "rb").read() == good
    assert runner.invoke(app, ["verify", out]).stdout.splitlines()[-1] == "5 of 5 shards ok (full)"


BAD_MARKERS = {"odd bytes": b"notjson\xff", "a list": b"[]", "no sha256": b'{"rows": 4, "bytes": 10}',
               "huge bytes": b'{"shard": 1, "rows": 4, "sha256": "ab", "bytes": 1e400}',
               "NaN rows": b'{"shard": 1, "rows": NaN, "sha256": "ab", "bytes": 10}',
               "infinite rows": b'{"shard": 1, "rows": Infinity, "sha256": "ab", "bytes": 10}',
               "negative rows": b'{"shard": 1, "rows": -4, "sha256": "ab", "bytes": 10}',
               "a string for bytes": b'{"shard": 1, "rows": 4, "sha256": "ab", "bytes": "ten"}'}


@pytest.mark.parametrize("content", BAD_MARKERS.values(), ids=BAD_MARKERS.keys())
def test_a_hostile_marker_is_a_bad_marker_never_a_traceback(run, content):
    """A commit marker with odd bytes, the wrong shape or out-of-range numbers (1e400 gave OverflowError:
    a traceback) is named "bad marker"; --repair removes it with its file; the readers leave the shard out."""
    open(os.path.join(run, "commits", "shard-00001.done.json"), "wb").write(content)
    res = runner.invoke(app, ["verify", run])
    assert res.exit_code == 1, res.output
    assert res.stdout.splitlines()[1].startswith("shard-00001: bad marker (unreadable marker: "), res.stdout
    with pytest.warns(RunWarning, match="shard-00001: bad marker"):
        assert sorted(read_frames(run, columns=["index"]).column("index").to_pylist()) == [0, 1, 2, 3, 8, 9, 10, 11]
    res = runner.invoke(app, ["verify", run, "--repair"])
    assert res.exit_code == 0 and "repaired: removed 2 files" in res.stdout, res.output
    assert sorted(os.listdir(os.path.join(run, "commits"))) == ["shard-00000.done.json", "shard-00002.done.json"]


def test_verify_refuses_a_folder_with_only_another_tools_run_json(tmp_path):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "run.json").write_text('{"run_id": 7}')
    res = runner.invoke(app, ["verify", str(folder)])
    assert res.exit_code == 2 and "damaged or not hpcwalk's" in res.stderr, res.output


def test_the_lock_on_a_filesystem_without_hard_links(tmp_path, monkeypatch):
    """Where link() is refused (EPERM, as on some FUSE and SMB mounts) the lock is created in place (O_EXCL,
    then written): still exactly one holder, and a whole lock file that is removed at release."""
    import errno

    from hpcwalk.store import runlock

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted", src)

    monkeypatch.setattr(runlock.os, "link", no_links)
    out = tmp_path / "run"
    first = runlock.RunLock(str(out))
    first.acquire(create=True)
    try:
        holder, _ = first.read()
        assert holder["pid"] == os.getpid() and holder["token"] == first.info["token"]
        assert sorted(os.listdir(out)) == [".hpcwalk.lock"]  # no content file left beside it
        with pytest.raises(runlock.RunLocked, match="is being rendered by pid"):
            runlock.RunLock(str(out)).acquire()
    finally:
        first.release()
    assert os.listdir(out) == []

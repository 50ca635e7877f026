"""A run folder that cannot lie (items 4-6): hostile job files, audio and lock files refused in one line,
SIGTERM/SIGINT stopping at a safe point, and outputs that never land on a run's reserved files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hpcwalk.cli import app
from jobs import cat_walk, tiny_job_toml


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output


# -- 4. parsers with bounds ----------------------------------------------------------------------

HOSTILE = "extra." + ".".join(["a"] * 50_000) + " = 1\n"  # 100 KB: tomllib alone took 14.5 GB


@pytest.mark.parametrize("text, needle", [
    (tiny_job_toml(cat_walk(["slerp"], 3)) + HOSTILE, "parts per key"),
    (tiny_job_toml(cat_walk(["slerp"], 3)) + "[x." + ".".join(["b"] * 40) + "]\n", "at most 32 parts per key"),
    ("x = " + "[" * 40 + "]" * 40 + "\n", "nested more than 32"),
    ('x = "' + "p" * 200_001 + '"\n', "characters: at most 200,000 per line"),
    ("[t]\n" * 100_001, "[table] headers"),
])
def test_hostile_job_file_refused_before_tomllib(tmp_path, text, needle):
    job = tmp_path / "job.toml"
    job.write_text(text)
    _one_line_error(invoke("render", str(job), "--out", str(tmp_path / "run"), "--no-progress"), needle)
    assert not (tmp_path / "run").exists()


PEAK = ("import atexit, sys\n"
        "atexit.register(lambda: print('peak', open('/proc/self/status').read().split('VmHWM:')[1].split()[0],"
        " 'torch' in sys.modules, file=sys.stderr))\n"
        "from hpcwalk.cli import main\n"
        "sys.argv = ['hpcwalk', 'render', sys.argv[1], '--out', sys.argv[2]]\n"
        "main()\n")


def test_a_hostile_job_file_is_refused_before_torch_is_imported(tmp_path):
    """`render` reads the job file before the heavy imports: the 100 KB hostile file is one line, exit 2, in a
    process that never imported torch and peaked far below 200 MB (the measured time is in the README)."""
    import subprocess

    job = tmp_path / "job.toml"
    job.write_text(tiny_job_toml(cat_walk(["slerp"], 3)) + HOSTILE)
    r = subprocess.run([sys.executable, "-c", PEAK, str(job), str(tmp_path / "run")], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    peak = [line.split() for line in r.stderr.splitlines() if line.startswith("peak ")]
    assert len(errors) == 1 and "parts per key" in errors[0], r.stderr
    assert peak and int(peak[0][1]) < 200 * 1024 and peak[0][2] == "False", r.stderr  # kB; torch not imported
    assert not (tmp_path / "run").exists()


def test_shape_scan_skips_strings_and_comments(tmp_path):
    from hpcwalk.job.parse import scan_toml

    dots = ".".join(["a"] * 100)
    scan_toml(f'x = "{dots}"\ny = \'{dots}\'\n# {dots}\nz = """\n{dots}\n[[[[[\n"""\nk = [\n  [1, 2],\n]\n'
              + "[w]\n" * 10 + 'v = 1.5\n"quoted".b.c = 1\n', "job")
    with pytest.raises(Exception, match="line 2"):
        scan_toml(f'x = "ok"\n{dots} = 1\n', "job")


# -- 4. lock files with wrong field types -----------------------------------------------------------

BAD_LOCKS = [{"pid": None}, {"pid": "abc"}, {"pid": 1e20}, {"pid": 10**30}, {"started_at": "yesterday"},
             {"started_at": 1e300}, {"host": 5}, {"pid_start": "x"}]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    job = tmp / "job.toml"
    job.write_text(tiny_job_toml(cat_walk(["slerp"], 3), steps=1, size=16))
    assert invoke("render", str(job), "--out", str(tmp / "run"), "--no-progress").exit_code == 0
    return job, tmp / "run"


def _lock_of(fields: dict) -> bytes:
    import platform

    base = {"host": platform.node(), "pid": os.getpid(), "pid_start": None, "started_at": 1.7e9, "token": "t"}
    return json.dumps({**base, **fields}).encode()


@pytest.mark.parametrize("fields", BAD_LOCKS, ids=[next(iter(f)) + "=" + repr(next(iter(f.values()))) for f in BAD_LOCKS])
def test_lock_with_wrong_field_types_is_unreadable_not_a_traceback(rendered, fields):
    from hpcwalk.store.runlock import RunLock

    job, run = rendered
    lock = run / ".hpcwalk.lock"
    lock.write_bytes(_lock_of(fields))
    try:
        holder, age = RunLock(str(run)).read()
        assert holder is None and age is not None
        for args in (["render", str(job), "--out", str(run), "--no-progress"], ["verify", str(run)]):
            r = invoke(*args)  # young: refused in one line (render) or noted (verify), never a traceback
            assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.output)
            assert "Traceback" not in r.output
        assert invoke("render", str(job), "--out", str(run), "--no-progress").exit_code == 2
        old = 1.0e9
        os.utime(lock, (old, old))  # stale: taken over
        r = invoke("verify", str(run), "--repair")
        assert r.exit_code == 0 and not lock.exists(), r.output
        lock.write_bytes(_lock_of(fields))
        os.utime(lock, (old, old))
        assert invoke("render", str(job), "--out", str(run), "--no-progress").exit_code == 0
        assert not lock.exists()
    finally:
        lock.unlink(missing_ok=True)


def test_lock_path_that_is_a_folder(rendered):
    job, run = rendered
    lock = run / ".hpcwalk.lock"
    lock.mkdir()
    (lock / "x").write_text("x")
    try:
        r = invoke("render", str(job), "--out", str(run), "--no-progress")
        _one_line_error(r, "refusing to start a second driver")
        r = invoke("verify", str(run))
        assert r.exception is None or isinstance(r.exception, SystemExit), r.output
        os.utime(lock, (1.0e9, 1.0e9))
        r = invoke("render", str(job), "--out", str(run), "--no-progress")
        assert r.exit_code == 0 and not lock.exists(), r.output
    finally:
        if lock.is_dir():
            import shutil

            shutil.rmtree(lock)


def test_lock_of_this_slurm_job_before_its_requeue_is_taken_over_at_once(rendered, monkeypatch):
    """A requeued job's next run ($SLURM_RESTART_COUNT one higher) takes over the lock its previous run left
    (here even with a live pid); a sibling driver of the same run of the job (same count) is judged as any
    driver: alive on this host, refused."""
    import subprocess

    job, run = rendered
    lock = run / ".hpcwalk.lock"
    render = ["render", str(job), "--out", str(run), "--no-progress"]
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for fields in ({"slurm_job_id": "4242"}, {"slurm_job_id": "4242", "slurm_restart_count": 0}):
        lock.write_bytes(_lock_of(fields))  # our own pid: alive, yet the same job before its requeue
        r = invoke(*render)
        assert r.exit_code == 0 and not lock.exists(), r.output
        assert "before it was requeued (restart count 0, now 1)" in r.output, r.output
    try:
        lock.write_bytes(_lock_of({"slurm_job_id": "4242", "slurm_restart_count": 1}))  # a live sibling
        _one_line_error(invoke(*render), "refusing to start a second driver")
        lock.write_bytes(_lock_of({"slurm_job_id": "17", "slurm_restart_count": 0}))  # another job's
        _one_line_error(invoke(*render), "refusing to start a second driver")
        monkeypatch.delenv("SLURM_RESTART_COUNT")  # the job's first run: count 0, as the lock's
        lock.write_bytes(_lock_of({"slurm_job_id": "4242"}))
        _one_line_error(invoke(*render), "refusing to start a second driver")
        dead = subprocess.Popen(["true"])
        dead.wait()
        lock.write_bytes(_lock_of({"slurm_job_id": "4242", "pid": dead.pid}))  # a sibling that died: stale
        r = invoke(*render)
        assert r.exit_code == 0 and not lock.exists() and "is no longer running" in r.output, r.output
    finally:
        lock.unlink(missing_ok=True)


def test_lock_records_the_slurm_restart_count(tmp_path, monkeypatch):
    from hpcwalk.store.runlock import RunLock, valid_holder

    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    with RunLock(str(tmp_path / "run")).hold(create=True) as lock:
        holder, _ = lock.read()
        assert holder["slurm_job_id"] == "7" and holder["slurm_restart_count"] == 3
    assert not (tmp_path / "run" / ".hpcwalk.lock").exists()
    for bad in ("3", -1, 1.5, None):
        assert valid_holder({**holder, "slurm_restart_count": bad}) is None

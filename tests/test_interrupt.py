"""SIGTERM (a SLURM time limit) and SIGINT (Ctrl-C) stop every command at a safe point: exit 143 / 130, one
`interrupted (...)` line on stderr saying what is committed and how to resume, the lock released, no file
half-written; the same command again completes and equals a clean run.

The random-moment trials run as in tests/test_sigkill.py: one fresh interpreter (this file as a script)
builds the tiny model once and forks each victim, which runs the `hpcwalk` entry point itself
(`hpcwalk.cli.main`: argument parsing, the handlers, the lock, the executor; only the model build is the
prebuilt one). The signal moment is drawn uniformly over the first 85% of an undisturbed run (seeded). The
commands that read a run (verify --repair, score, video, view) and the study are stopped at a chosen
moment in this process: a patched step sends this process the signal. One render runs as a real
`python -m hpcwalk.cli` subprocess. Every wait is bounded by generous hang guards only."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import run_trials

ROOT = Path(__file__).resolve().parent.parent
TERM_TRIALS, INT_TRIALS, DOUBLE_TRIALS = 10, 3, 2


def _stop_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("interrupted")]


@pytest.mark.slow
def test_sigterm_and_sigint_at_random_moments_during_render(tmp_path):
    res = run_trials(__file__, tmp_path, 20260518)
    assert res["hpcwalk"] == str(ROOT / "hpcwalk" / "__init__.py")  # the code under test, not another checkout
    # a signal sent to a child that then exits 0 arrived after its command had ended (ignored then, by
    # design); at most one trial of each kind may be that close to the end
    late = {kind: next((t for t in res[kind] if t["sent"] and t["exit"] == 0), None) for kind in ("sigterm", "sigint", "twice")}
    for kind, code, n in (("sigterm", 143, TERM_TRIALS), ("sigint", 130, INT_TRIALS), ("twice", 143, DOUBLE_TRIALS)):
        trials = res[kind]
        assert len(trials) == n
        for t in trials:
            assert t["exit"] in (code, 0), t  # 0: it finished before the signal
            assert t["exit"] == code or not t["sent"] or t is late.get(kind), t  # (one may land as it exits)
            if t["exit"] == code:
                assert t["stop_lines"] == 1 and t["stop_line"].startswith(f"interrupted ({kind != 'sigint' and 'SIGTERM' or 'SIGINT'})"), t
                assert "resume with: hpcwalk render" in t["stop_line"], t
            assert not t["traceback"] and not t["lock_after_stop"], t
            if "stopped at once" not in t["stop_line"]:  # (a second signal may leave a shard's temporary file)
                assert t["temp_files_after_stop"] == 0, t
            assert t["rerun_exit"] == 0 and t["verify_exit"] == 0, t
            assert t["equal_to_clean_run"] and t["frames_once"], t
    stopped = [t for t in res["sigterm"] if t["exit"] == 143]
    assert len(stopped) >= TERM_TRIALS // 2, res["sigterm"]  # most signals landed while it ran
    assert len({t["committed_at_stop"] for t in stopped}) >= 2, stopped  # at different moments
    for t in stopped:  # the line counts what a quick check finds committed when it stopped
        assert f"{t['committed_at_stop']} of 6 shards committed" in t["stop_line"] or "stopped before" in t["stop_line"], t


@pytest.mark.slow
def test_sigterm_to_the_console_command_releases_the_lock(tmp_path):
    """The installed entry point in a real subprocess: SIGTERM once a shard is committed."""
    from hpcwalk.store.reader import committed_shards, read_frames

    job = tmp_path / "job.toml"
    job.write_text(_JOB)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hpcwalk.cli", "render", str(job), "--out", str(out), "--no-progress"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240  # hang guard only
        while not committed_shards(str(out)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode in (143, 0), err
    if proc.returncode == 143:
        assert len(_stop_lines(err)) == 1 and "Traceback" not in err, err
        assert f"committed in {out}; resume with: hpcwalk render {job} --out {out} --no-progress" in err, err
    assert not (out / ".hpcwalk.lock").exists()
    from typer.testing import CliRunner

    from hpcwalk.cli import app

    r = CliRunner().invoke(app, ["render", str(job), "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert read_frames(str(out)).num_rows == 12


# -- stopped at a chosen moment, in this process -----------------------------------------------------------

def _job_text(clip: bool = False) -> str:
    from jobs import cat_walk, tiny_job_toml

    return (tiny_job_toml(cat_walk(methods=["linear", "slerp"], frames=6), steps=1, size=16)
            + ("" if clip else "[clip]\nenabled = false\n"))


_JOB = _job_text()


def invoke(*args: str):
    from typer.testing import CliRunner

    from hpcwalk.cli import app

    return CliRunner().invoke(app, list(args))


def _signal_on(monkeypatch, target, name: str, call: int, signum: int = signal.SIGTERM) -> None:
    """Patch target.name so that its `call`-th call (1-based) sends this process `signum` before running."""
    real = getattr(target, name)
    calls = [0]

    def patched(*a, **k):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signum)
        return real(*a, **k)

    monkeypatch.setattr(target, name, patched)


def _assert_stopped(r, code: int = 143, needle: str = "") -> str:
    assert r.exit_code == code, r.output
    lines = _stop_lines(r.output)
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """A complete run of a 12-frame job (6 shards of 2) with tiny-clip scores, and its frames."""
    from hpcwalk.store.reader import read_frames

    tmp = tmp_path_factory.mktemp("clean")
    job = tmp / "job.toml"
    job.write_text(_job_text(clip=True))
    r = invoke("render", str(job), "--out", str(tmp / "run"), "--no-progress")
    assert r.exit_code == 0, r.output
    return job, tmp / "run", read_frames(str(tmp / "run")).sort_by("frame_id").replace_schema_metadata(None)


def _frames(run) -> object:
    from hpcwalk.store.reader import read_frames

    return read_frames(str(run)).sort_by("frame_id").replace_schema_metadata(None)


def _temp_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if ".tmp" in p.name]


def test_sigterm_during_render_in_process_stops_between_shards(clean_run, tmp_path, monkeypatch):
    import hpcwalk.store.writer as writer

    job, _, ref = clean_run
    out = tmp_path / "run"
    _signal_on(monkeypatch, writer.ShardStore, "write", 3)  # from the commit thread, as the third shard is written
    line = _assert_stopped(invoke("render", str(job), "--out", str(out), "--no-progress"), 143,
                           f"of 6 shards committed in {out}; resume with: hpcwalk render {job} --out {out} --no-progress")
    assert line.startswith("interrupted (SIGTERM): 3 of 6") or line.startswith("interrupted (SIGTERM): 4 of 6"), line
    assert not (out / ".hpcwalk.lock").exists() and not _temp_files(out)
    monkeypatch.undo()
    assert invoke("render", str(job), "--out", str(out), "--no-progress").exit_code == 0
    assert _frames(out).equals(ref)


def test_sigint_during_render_exits_130_with_one_line(clean_run, tmp_path, monkeypatch):
    import hpcwalk.render.engine as engine

    job, _, ref = clean_run
    out = tmp_path / "run"
    _signal_on(monkeypatch, engine.Renderer, "render", 2, signal.SIGINT)  # while the second shard renders
    _assert_stopped(invoke("render", str(job), "--out", str(out), "--no-progress"), 130, "interrupted (SIGINT): ")
    assert not (out / ".hpcwalk.lock").exists() and not _temp_files(out)
    monkeypatch.undo()
    assert invoke("render", str(job), "--out", str(out), "--no-progress").exit_code == 0
    assert _frames(out).equals(ref)


@pytest.mark.parametrize("when", ["while verifying", "while removing"])
def test_sigterm_during_verify_repair_leaves_the_folder_whole(clean_run, tmp_path, monkeypatch, when):
    import hpcwalk.store.reader as reader
    import hpcwalk.store.verify as verify
    from test_verify import damage

    job, run0, ref = clean_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    for k, kind in enumerate(("truncated", "checksum mismatch", "file without marker")):
        damage(str(run), kind, shard=k + 1)
    if when == "while verifying":
        _signal_on(monkeypatch, reader, "verify_run", 1)
    else:  # the removals, once begun, all finish (a few unlinks), then it stops
        _signal_on(monkeypatch, verify, "repair", 1)
    _assert_stopped(invoke("verify", str(run), "--repair"), 143, f"resume with: hpcwalk verify {run} --repair")
    monkeypatch.undo()
    assert not (run / ".hpcwalk.lock").exists() and not _temp_files(run)
    shards = reader.verify_run(str(run))
    if when == "while verifying":  # nothing removed yet
        assert len(shards.damaged) == 3
    else:  # every damaged shard removed, marker and file
        assert len(shards.ok) == 3 and shards.damaged and all(  # removed: planned shards missing until rendered
            c.state == "missing" and c.marker is None and c.parquet is None for c in shards.damaged)
    assert invoke("verify", str(run), "--repair").exit_code == 0
    assert invoke("render", str(job), "--out", str(run), "--no-progress").exit_code == 0
    assert invoke("verify", str(run)).exit_code == 0 and _frames(run).equals(ref)


def test_sigterm_during_score_keeps_each_scored_shard_whole(clean_run, tmp_path, monkeypatch):
    import hpcwalk.analyse.score as score
    from hpcwalk.store.verify import check_shards
    from hpcwalk.core.fsio import filesystem

    _, run0, _ = clean_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    real = score.write_atomic
    writes = [0]

    def write_atomic(fs, path, data):  # SIGTERM as the second score shard's data file is written
        writes[0] += path.endswith(".parquet")
        if writes[0] == 2 and path.endswith(".parquet"):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(fs, path, data)

    monkeypatch.setattr(score, "write_atomic", write_atomic)
    line = _assert_stopped(invoke("score", str(run), "--device", "cpu", "--no-progress"), 143,
                           "interrupted (SIGTERM): 2 of 6 shards scored in ")
    assert f"resume with: hpcwalk score {run} --device cpu --no-progress" in line
    monkeypatch.undo()
    scores = next((run / "scores").iterdir())
    checks = check_shards(filesystem(str(scores))[0], str(scores), "full", data_dir="data")
    assert len(checks) == 2 and all(c.ok for c in checks), [c.describe() for c in checks]  # its marker came too
    assert not _temp_files(run)
    r = invoke("score", str(run), "--device", "cpu", "--no-progress")
    assert r.exit_code == 0 and "4 shards" in r.output, r.output


def test_sigterm_during_video_leaves_no_partial_file(clean_run, tmp_path, monkeypatch):
    import hpcwalk.see.video as video

    _, run0, _ = clean_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    _signal_on(monkeypatch, video, "_to_frame", 3)
    _assert_stopped(invoke("video", str(run)), 143, "interrupted (SIGTERM): 0 of 1 videos written")
    monkeypatch.undo()
    assert not list((run / "videos").iterdir())  # neither the video nor its temporary file
    r = invoke("video", str(run))
    assert r.exit_code == 0 and (run / "videos" / "w.mp4").stat().st_size > 0, r.output


def test_sigterm_during_view_leaves_no_partial_file(clean_run, tmp_path, monkeypatch):
    """`hpcwalk view` writes a static viewer (no server): it stops like the other writers, 143 / 130."""
    import hpcwalk.see.viewer.build as build

    _, run0, _ = clean_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    _signal_on(monkeypatch, build, "_write", 1)
    _assert_stopped(invoke("view", str(run)), 143, f"the viewer in {run / 'viewer'} is not finished")
    monkeypatch.undo()
    assert not _temp_files(run) and not (run / "viewer" / "index.html").exists()
    r = invoke("view", str(run))
    assert r.exit_code == 0 and (run / "viewer" / "index.html").exists(), r.output


def test_sigterm_during_study_then_rerun_completes(tmp_path, monkeypatch):
    import hpcwalk.store.writer as writer
    from test_study import _study_file

    study = _study_file(tmp_path, pairs=2)  # examples/study.toml, 2 steps, 2 seed pairs: 2 shards
    out = tmp_path / "out"
    _signal_on(monkeypatch, writer.ShardStore, "write", 1)
    line = _assert_stopped(invoke("study", str(study), "--out", str(out), "--device", "cpu", "--no-progress"), 143,
                           f"of 2 shards committed in {out}; resume with: hpcwalk study {study}")
    monkeypatch.undo()
    assert not (out / ".hpcwalk.lock").exists() and not _temp_files(out) and not (out / "study.json").exists(), line
    r = invoke("study", str(study), "--out", str(out), "--device", "cpu", "--no-progress")
    assert r.exit_code == 0 and (out / "report.html").exists(), r.output
    assert "1 shards already committed" in r.output or "2 shards already committed" in r.output, r.output


def test_sigterm_during_the_study_analysis_says_the_shards_are_committed(tmp_path, monkeypatch):
    import hpcwalk.study as study_mod
    from test_study import _study_file

    study = _study_file(tmp_path, pairs=2, lpips="none")
    out = tmp_path / "out"
    _signal_on(monkeypatch, study_mod, "write_outputs", 1)
    _assert_stopped(invoke("study", str(study), "--out", str(out), "--device", "cpu", "--no-progress"), 143,
                    f"all 2 shards committed in {out}; the analysis was not finished")
    monkeypatch.undo()
    assert not (out / "study.json").exists() and not _temp_files(out)
    r = invoke("study", str(study), "--out", str(out), "--device", "cpu", "--no-progress")
    assert r.exit_code == 0 and "2 shards already committed" in r.output, r.output


# -- the mechanism -------------------------------------------------------------------------------------


def test_a_signal_inside_deferred_waits_for_its_end_and_a_second_stops_at_once(tmp_path):
    """Taking the lock is deferred; a second signal while stopping exits 143 at once, lock removed."""
    script = f"""
import os, signal, sys
from hpcwalk.core import interrupt
from hpcwalk.store.runlock import RunLock
with interrupt.handling():
    try:
        with interrupt.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            print("deferred block finished", flush=True)
    except interrupt.Interrupted as e:
        print("raised at its end", e.exit_code, flush=True)
lock = RunLock({str(tmp_path / 'run')!r})
with interrupt.handling(lambda s: "interrupted (SIGTERM): stopped at once"):
    lock.acquire(create=True)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
    except interrupt.Interrupted:
        assert os.path.exists(lock.path)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal while stopping (before the finally)
    print("not reached", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 143, proc.stderr
    assert proc.stdout.splitlines() == ["deferred block finished", "raised at its end 143"], proc.stdout
    assert proc.stderr.strip() == "interrupted (SIGTERM): stopped at once", proc.stderr
    assert not (tmp_path / "run" / ".hpcwalk.lock").exists()


def test_ray_init_does_not_keep_its_sigterm_handler(monkeypatch):
    """ray.init installs a SIGTERM handler that exits with code 15 and no line; the driver puts its own back."""
    ray = pytest.importorskip("ray")
    from hpcwalk.core import interrupt
    from hpcwalk.run.options import ExecutorOptions
    from hpcwalk.run.ray import RayExecutor

    def fake_init(**kw):
        signal.signal(signal.SIGTERM, lambda s, f: sys.exit(s))

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    with interrupt.handling():
        ours = signal.getsignal(signal.SIGTERM)
        RayExecutor(ExecutorOptions(ray="local"))._connect()
        assert signal.getsignal(signal.SIGTERM) is ours


# -- the trials (run as a script) ---------------------------------------------------------------------

CHILD_HANG_S = 120  # a waited-for child (about a second of work) still running after this is hung


def _fork(args: list[str], log: str, delay_s: float | None = None, signums: tuple[int, ...] = ()) -> tuple[int, bool]:
    """`hpcwalk ARGS` (hpcwalk.cli.main) in a forked child, stderr to `log`; sends it `signums` (1 ms apart)
    after delay_s unless it finished first. Returns its exit code (negative: killed by that signal) and
    whether the signals were sent."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            from hpcwalk.cli import main

            sys.argv = ["hpcwalk", *args]
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            os._exit(code)
    t0 = time.monotonic()
    sent = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), sent
        waited = time.monotonic() - t0
        if delay_s is not None and not sent and waited >= delay_s:
            for k, s in enumerate(signums):
                if k:
                    time.sleep(0.001)
                os.kill(pid, s)
            sent = True
        if waited > CHILD_HANG_S:
            os.kill(pid, signal.SIGABRT)  # faulthandler prints its stacks to the log
            os.waitpid(pid, 0)
            raise RuntimeError(f"a forked child hung for {CHILD_HANG_S} s: {open(log).read()[-3000:]}")
        time.sleep(0.0005)


def main(tmp: str, seed: int) -> dict:
    import warnings

    import torch

    import hpcwalk
    import hpcwalk.cli  # noqa: F401  (imported here, once: a child starts at the command line, not at imports)
    import hpcwalk.run.local  # noqa: F401
    import hpcwalk.run.preflight  # noqa: F401
    from hpcwalk.job.parse import load_job
    from hpcwalk.render.engine import Renderer
    from hpcwalk.store.reader import committed_shards, read_frames
    from test_sigkill import watchdog

    warnings.simplefilter("ignore")
    watchdog()
    torch.set_num_threads(1)
    for s in (signal.SIGTERM, signal.SIGINT):  # the children start ignoring them until main() installs its handlers
        signal.signal(s, signal.SIG_IGN)
    rng = random.Random(seed)
    job_file = os.path.join(tmp, "job.toml")  # 12 frames in 6 shards of 2, no CLIP
    with open(job_file, "w") as f:
        f.write(_JOB)
    renderer = Renderer.from_job(load_job(job_file))
    Renderer.from_job = classmethod(lambda cls, job: renderer)  # the children skip the model build (only)
    log = os.path.join(tmp, "stderr.txt")
    render = lambda out, *a, **k: _fork(["render", job_file, "--out", out, "--no-progress"], log, *a, **k)[0]  # noqa: E731

    # 1. a clean run, and how long an undisturbed one takes (the shortest of 3, in forked children)
    ref_dir = os.path.join(tmp, "ref")
    assert render(ref_dir) == 0, open(log).read()
    ref = read_frames(ref_dir).sort_by("frame_id").replace_schema_metadata(None)
    times = []
    for k in range(3):
        t0 = time.perf_counter()
        assert render(os.path.join(tmp, f"timing{k}")) == 0
        times.append(time.perf_counter() - t0)
    out: dict = {"seed": seed, "hpcwalk": hpcwalk.__file__, "render_s": min(times)}

    # 2. signals at random moments, then the same command again, then `hpcwalk verify`: drawn over the first
    # 85% of the fastest undisturbed run, so that a machine that speeds up after the timing runs (CI's did) still
    # gets most signals while the command runs; the end of a run is covered by the trials that land late anyway
    window = 0.85 * min(times)
    plan = ([("sigterm", (signal.SIGTERM,))] * TERM_TRIALS + [("sigint", (signal.SIGINT,))] * INT_TRIALS
            + [("twice", (signal.SIGTERM, signal.SIGTERM))] * DOUBLE_TRIALS)
    for i, (kind, signums) in enumerate(plan):
        run = os.path.join(tmp, f"{kind}{i}")
        delay = rng.uniform(0, window)
        code, sent = _fork(["render", job_file, "--out", run, "--no-progress"], log, delay, signums)
        err = open(log).read()
        files = [f for d in ("frames", "commits") if os.path.isdir(os.path.join(run, d))
                 for f in os.listdir(os.path.join(run, d))]
        stops = _stop_lines(err)
        trial = {"delay_s": round(delay, 4), "sent": sent, "exit": code, "stop_lines": len(stops), "stop_line": stops[0] if stops else "",
                 "traceback": "Traceback" in err, "committed_at_stop": len(committed_shards(run)),
                 "lock_after_stop": os.path.exists(os.path.join(run, ".hpcwalk.lock")),
                 "temp_files_after_stop": sum(".tmp" in f for f in files)}
        trial["rerun_exit"] = render(run)
        trial["verify_exit"] = _fork(["verify", run], log)[0]
        got = read_frames(run).sort_by("frame_id").replace_schema_metadata(None)
        ids = got.column("frame_id").to_pylist()
        trial.update(equal_to_clean_run=got.equals(ref), frames_once=len(ids) == len(set(ids)))
        out.setdefault(kind, []).append(trial)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))

"""SIGKILL at random moments: 10 renders and 10 `verify --repair` runs killed mid-way, each followed by
the same command again; the final output holds every frame exactly once and equals a clean run.

The trials run in one fresh interpreter (this file run as a script), which builds the tiny model once
and forks each victim from there: a render is the driver (`executors.run_render`, lock, resume,
commit) on the already-built Renderer, a repair is the `hpcwalk verify --repair` command itself. The
kill moment is drawn uniformly over the victim's measured duration (seeded: the seed is printed); a
victim that finishes first shrinks that window to what it took. Every wait is bounded: a hung child is
sent SIGABRT (faulthandler prints its stacks) and a hung script prints its own before pytest's timeout."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time

import pytest

from jobs import run_trials

TRIALS = 10


@pytest.mark.slow
def test_sigkill_during_render_and_repair_loses_nothing(tmp_path):
    res = run_trials(__file__, tmp_path, 20261127)
    for kind in ("render", "repair"):
        trials = res[kind]
        assert len(trials) == TRIALS
        for t in trials:
            assert t["rerun_exit"] == 0 and t["equal_to_clean_run"] and t["frames_once"], t
            assert t["all_shards_ok"] and t["temp_files_after"] == 0 and not t["lock_after"], t
    # the kills landed at different moments: different numbers of shards were committed when they did
    assert len({t["committed_at_kill"] for t in res["render"]}) >= 2, res["render"]
    assert any(t["killed"] for t in res["repair"]), res["repair"]
    assert len(res["repair_prefixes"]) == 10  # 4 damaged shards with marker and file, 1 marker alone, 1 file alone
    for t in res["repair_prefixes"]:
        assert t["repair_exit"] == 0 and t["equal_to_clean_run"] and t["frames_once"] and t["all_shards_ok"], t


# -- the trials (run as a script) ---------------------------------------------------------------------


CHILD_HANG_S = 60  # a waited-for child (about 0.1 s of work) still running after this is hung
TRIALS_HANG_S = 240  # the same for the whole script, before pytest-timeout's 300 s would hide where it hung


def watchdog() -> None:
    """A trial script still running after TRIALS_HANG_S prints every thread's stack and exits 1, and a hung
    child prints its stacks on the SIGABRT `_fork` sends it: the test's failure then shows where it hung.
    (faulthandler's fatal-signal handlers survive fork; its timer must not be touched in a child, whose
    copy of the timer's lock belongs to a thread that was not forked.)"""
    import faulthandler

    from tqdm import tqdm

    faulthandler.enable()
    faulthandler.dump_traceback_later(TRIALS_HANG_S, exit=True)
    tqdm.monitor_interval = 0  # no tqdm monitor thread to hold tqdm's lock at the moment of a fork


def _fork(fn, delay_s: float | None) -> bool:
    """fn() in a forked child, SIGKILLed after delay_s unless it finished (None: waited for, at most
    CHILD_HANG_S); True when it was killed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 3
        try:
            code = int(fn() or 0)
        finally:
            os._exit(code)
    t0 = time.monotonic()
    while os.waitpid(pid, os.WNOHANG)[0] == 0:  # returns as soon as the child ends (timings use that)
        waited = time.monotonic() - t0
        if delay_s is not None and waited >= delay_s:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return True
        if waited > CHILD_HANG_S:
            os.kill(pid, signal.SIGABRT)  # faulthandler prints its stacks to stderr
            os.waitpid(pid, 0)
            raise RuntimeError(f"a forked child hung for {CHILD_HANG_S} s (its stacks are above)")
        time.sleep(0.001 if delay_s is None else min(0.001, max(0.0, delay_s - waited)))
    return False


def _state(out: str) -> dict:
    from hpcwalk.store.reader import committed_shards

    files = [f for d in ("frames", "commits") if os.path.isdir(os.path.join(out, d))
             for f in os.listdir(os.path.join(out, d))]
    return {"committed_at_kill": len(committed_shards(out)), "temp_files_at_kill": sum(".tmp" in f for f in files),
            "lock_at_kill": os.path.exists(os.path.join(out, ".hpcwalk.lock"))}


def _check(out: str, ref, rerun_exit: int) -> dict:
    from hpcwalk.store.reader import read_frames, verify_run

    got = read_frames(out).sort_by("frame_id").replace_schema_metadata(None)
    ids = got.column("frame_id").to_pylist()
    shards = verify_run(out, "full")
    files = [f for d in ("frames", "commits") for f in os.listdir(os.path.join(out, d))]
    return {"rerun_exit": rerun_exit, "equal_to_clean_run": got.equals(ref), "frames_once": len(ids) == len(set(ids)),
            "all_shards_ok": not shards.damaged and len(shards.ok) == 6,
            "temp_files_after": sum(".tmp" in f for f in files), "lock_after": os.path.exists(os.path.join(out, ".hpcwalk.lock"))}


def main(tmp: str, seed: int) -> dict:
    import warnings

    import torch
    from typer.testing import CliRunner

    from hpcwalk.cli import app
    from hpcwalk.run.local import run_render
    from hpcwalk.job.parse import load_job
    from hpcwalk.job.plan import plan, shard
    from hpcwalk.store.reader import read_frames, verify_run
    from jobs import cat_walk, tiny_job_toml
    from test_verify import DAMAGE, damage

    warnings.simplefilter("ignore")
    watchdog()
    torch.set_num_threads(1)
    rng = random.Random(seed)
    runner = CliRunner()
    job_file = os.path.join(tmp, "job.toml")  # 12 frames in 6 shards of 2, no CLIP: about 10 ms a shard
    with open(job_file, "w") as f:
        f.write(tiny_job_toml(cat_walk(methods=["linear", "slerp"], frames=6), steps=1, size=16)
                + "[clip]\nenabled = false\n")
    job = load_job(job_file)
    shards = shard(plan(job), job.output.shard_size)
    from hpcwalk.render.engine import Renderer

    renderer = Renderer.from_job(job)

    def render(out: str) -> int:
        s = run_render(job, out, shards, progress=False, factory=lambda j: renderer)
        return 1 if s.failed else 0

    # 1. a clean run, and how long an undisturbed render takes (in a forked child, as the victims)
    ref_dir = os.path.join(tmp, "ref")
    assert render(ref_dir) == 0
    ref = read_frames(ref_dir).sort_by("frame_id").replace_schema_metadata(None)
    render_s = _duration(lambda k: render(os.path.join(tmp, f"timing{k}")))
    out = {"seed": seed, "render_s": render_s, "render": [], "repair": []}
    # 2. renders killed at random moments, then the same render again
    window = render_s
    for i in range(TRIALS):
        run = os.path.join(tmp, f"render{i}")
        delay = rng.uniform(0, window)
        t0 = time.perf_counter()
        killed = _fork(lambda: render(run), delay)
        if not killed:  # finished first: the window shrinks to what it took
            window = min(window, time.perf_counter() - t0)
        state = _state(run)
        out["render"].append({"delay_s": round(delay, 4), "killed": killed, **state,
                              **_check(run, ref, render(run))})
    # 3. `hpcwalk verify --repair` killed at random moments, then repair and render again
    template = os.path.join(tmp, "damaged")
    shutil.copytree(ref_dir, template)
    for k in range(6):
        damage(template, DAMAGE[k % len(DAMAGE)], shard=k)
    repair = lambda run: runner.invoke(app, ["verify", run, "--repair"]).exit_code  # noqa: E731
    for k in range(3):
        shutil.copytree(template, os.path.join(tmp, f"probe{k}"))
    repair_s = _duration(lambda k: repair(os.path.join(tmp, f"probe{k}")))
    out["repair_s"] = repair_s
    window = repair_s
    for i in range(TRIALS):
        run = os.path.join(tmp, f"repair{i}")
        shutil.copytree(template, run)
        before = sum(len(os.listdir(os.path.join(run, d))) for d in ("frames", "commits"))
        delay = rng.uniform(0, window)
        t0 = time.perf_counter()
        killed = _fork(lambda: repair(run), delay)
        if not killed:  # it finished first (the machine got faster than when timed): later kills come sooner
            window = min(window, time.perf_counter() - t0)
        left = sum(len(os.listdir(os.path.join(run, d))) for d in ("frames", "commits"))
        code = repair(run)  # the same command again, then the render renders what it removed
        out["repair"].append({"delay_s": round(delay, 4), "killed": killed, "files_removed_at_kill": before - left,
                              "repair_exit": code, **_check(run, ref, render(run))})
    # 4. every point a kill can leave a repair at: the first n of its removals done (each one unlink)
    removals = [p for c in verify_run(template).checks if not c.ok for p in (c.marker, c.parquet) if p]
    out["repair_prefixes"] = []
    for n in range(len(removals) + 1):
        run = os.path.join(tmp, f"prefix{n}")
        shutil.copytree(template, run)
        for path in removals[:n]:
            os.remove(path.replace(template, run, 1))
        code = repair(run)
        out["repair_prefixes"].append({"removed": n, "repair_exit": code, **_check(run, ref, render(run))})
    return out


def _duration(fn) -> float:
    """The shortest of 3 undisturbed runs of fn(k) in a forked child, in seconds (the kill window)."""
    times = []
    for k in range(3):
        t0 = time.perf_counter()
        _fork(lambda: fn(k), None)
        times.append(time.perf_counter() - t0)
    return min(times)


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))

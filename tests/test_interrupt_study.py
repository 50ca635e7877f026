"""SIGTERM at random moments during `hpcwalk study` (a SLURM time limit landing anywhere: while the frames
render, while the analysis reads them, while the outputs are written): exit 143 with one `interrupted
(SIGTERM)` line naming what is committed and the command that resumes, the lock released, no file
half-written; the same command again completes, `hpcwalk verify` exits 0, and the frames, study.parquet and
study.json equal those of a study never interrupted.

Run as tests/test_interrupt.py's render trials are: one fresh interpreter (this file as a script) builds the
tiny models once and forks each victim, which runs the `hpcwalk` entry point itself (hpcwalk.cli.main); only
the model build is the prebuilt one. The moment is drawn uniformly over the first 85% of the fastest of
three undisturbed studies (seeded)."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

import pytest

from jobs import run_trials

TRIALS = 10


@pytest.mark.slow
def test_sigterm_at_random_moments_during_study(tmp_path):
    res = run_trials(__file__, tmp_path, 20261207)
    trials = res["trials"]
    assert len(trials) == TRIALS
    late = next((t for t in trials if t["sent"] and t["exit"] == 0), None)
    for t in trials:
        assert t["exit"] in (143, 0), t  # 0: it finished before the signal (at most one may land as it exits)
        assert t["exit"] == 143 or not t["sent"] or t is late, t
        if t["exit"] == 143:
            assert t["stop_lines"] == 1 and t["stop_line"].startswith("interrupted (SIGTERM)"), t
            assert "; resume with: hpcwalk study " in t["stop_line"], t
        assert not t["traceback"] and not t["lock_after_stop"] and t["temp_files_after_stop"] == 0, t
        assert t["rerun_exit"] == 0 and t["verify_exit"] == 0, t
        assert t["frames_equal"] and t["frames_once"] and t["walks_equal"] and t["summary_equal"], t
    stopped = [t for t in trials if t["exit"] == 143]
    assert len(stopped) >= TRIALS // 2, trials  # most signals landed while it ran
    # at different stages: while rendering (some shard not committed) and after (the analysis)
    assert len({t["stage"] for t in stopped}) == 2, stopped


# -- the trials (run as a script) ---------------------------------------------------------------------

def _comparable(summary_path: str) -> dict:
    """study.json without what legitimately differs between two runs of one study (wall-clock fields)."""
    with open(summary_path) as f:
        data = json.load(f)

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not any(w in k for w in ("time", "_at", "elapsed", "seconds"))}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip(data)


def main(tmp: str, seed: int) -> dict:
    import warnings
    from pathlib import Path

    import pyarrow.parquet as pq
    import torch

    import hpcwalk.cli  # noqa: F401  (imported once: a child starts at the command line, not at imports)
    import hpcwalk.run.local  # noqa: F401
    import hpcwalk.study  # noqa: F401
    from hpcwalk.job.studyspec import load_study
    from hpcwalk.render.engine import Renderer
    from hpcwalk.store.reader import committed_shards, read_frames
    from test_interrupt import _fork, _stop_lines
    from test_sigkill import watchdog
    from test_study import _study_file

    warnings.simplefilter("ignore")
    watchdog()
    torch.set_num_threads(1)
    for s in (signal.SIGTERM, signal.SIGINT):  # the children ignore them until main() installs its handlers
        signal.signal(s, signal.SIG_IGN)
    rng = random.Random(seed)
    study_file = str(_study_file(Path(tmp), pairs=2, lpips="none", bootstrap=2000))  # 2 shards of 27 frames
    renderer = Renderer.from_job(load_study(study_file).job)
    Renderer.from_job = classmethod(lambda cls, job: renderer)  # the children skip the model build (only)
    log = os.path.join(tmp, "stderr.txt")
    args = lambda out: ["study", study_file, "--out", out, "--device", "cpu", "--no-progress"]  # noqa: E731

    def outputs(run: str):
        frames = read_frames(run).sort_by("frame_id").replace_schema_metadata(None)
        walks = pq.read_table(os.path.join(run, "study.parquet")).replace_schema_metadata(None)
        return frames, walks, _comparable(os.path.join(run, "study.json"))

    ref_dir = os.path.join(tmp, "ref")
    code, _ = _fork(args(ref_dir), log)
    assert code == 0, open(log).read()[-3000:]
    ref_frames, ref_walks, ref_summary = outputs(ref_dir)
    times = []
    for k in range(3):
        t0 = time.perf_counter()
        assert _fork(args(os.path.join(tmp, f"timing{k}")), log)[0] == 0
        times.append(time.perf_counter() - t0)
    out: dict = {"seed": seed, "study_s": min(times), "trials": []}
    window = 0.85 * min(times)
    for i in range(TRIALS):
        run = os.path.join(tmp, f"sigterm{i}")
        delay = rng.uniform(0, window)
        code, sent = _fork(args(run), log, delay, (signal.SIGTERM,))
        err = open(log).read()
        files = [f for root, _, names in os.walk(run) for f in names]
        stops = _stop_lines(err)
        committed = len(committed_shards(run)) if os.path.isdir(run) else 0
        trial = {"delay_s": round(delay, 4), "sent": sent, "exit": code, "stop_lines": len(stops),
                 "stop_line": stops[0] if stops else "", "traceback": "Traceback" in err,
                 "committed_at_stop": committed, "stage": "analysis" if committed == 2 else "render",
                 "lock_after_stop": os.path.exists(os.path.join(run, ".hpcwalk.lock")),
                 "temp_files_after_stop": sum(".tmp" in f for f in files)}
        trial["rerun_exit"] = _fork(args(run), log)[0]
        trial["verify_exit"] = _fork(["verify", run], log)[0]
        frames, walks, summary = outputs(run)
        ids = frames.column("frame_id").to_pylist()
        trial.update(frames_equal=frames.equals(ref_frames), frames_once=len(ids) == len(set(ids)),
                     walks_equal=walks.equals(ref_walks), summary_equal=summary == ref_summary)
        out["trials"].append(trial)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))

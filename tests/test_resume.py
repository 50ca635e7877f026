"""Resume with the local executor: `hpcwalk render` SIGKILLed mid-run, a shard that fails on the rerun
(exit 1, listed, committed shards kept), then a rerun that renders only what is missing."""

from __future__ import annotations

import os
import shutil

import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from hpcwalk.cli import app
from hpcwalk.run.local import run_render
from hpcwalk.job.plan import plan, shard
from hpcwalk.store.reader import committed_shards, read_frames
from jobs import cat_walk, sigkill_render, tiny_job_toml

JOB = tiny_job_toml(cat_walk(methods=["linear", "slerp"], frames=6))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every render here on one torch thread (the killed CLI too), so all runs give the same bytes; on a
    shared 2-core host one thread per process is also far faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _frames(out: str) -> pa.Table:
    return read_frames(out).sort_by("frame_id").replace_schema_metadata(None)


def _marker_times(out: str, shards: set[int]) -> dict[int, float]:
    return {i: os.path.getmtime(os.path.join(out, "commits", f"shard-{i:05d}.done.json")) for i in shards}


def test_sigkilled_driver_resumes_with_only_the_rest(job, job_file, renderer, tmp_path):
    shards = shard(plan(job), job.output.shard_size)
    out = str(tmp_path / "run")
    # 1. the driver is SIGKILLed once some shards are committed
    sigkill_render(job_file, out, poll_s=0.02, env={**os.environ, "OMP_NUM_THREADS": "1"})
    before = committed_shards(out)
    assert 2 <= len(before) < len(shards) - 1, "the driver must die mid-run"
    first = _marker_times(out, before)

    # 2. the same command again, with one remaining shard's temporary name blocked by a directory (a folder
    #    at its final name is not the run's own: moved into quarantine/ and rendered): that shard fails (a
    #    deterministic write error), is listed, exit 1; all else is committed
    bad = min({s.index for s in shards} - before)
    blocker = os.path.join(out, "frames", f".shard-{bad:05d}.parquet.tmp")
    os.makedirs(os.path.join(blocker, "in-the-way"))
    r = CliRunner().invoke(app, ["render", job_file, "--out", out, "--no-progress"])
    assert r.exit_code == 1, r.output
    left = len(shards) - len(before)
    assert f"{left - 1} shards rendered, {len(before)} shards already committed, 1 failed" in r.stdout
    assert f"failed: shard-{bad:05d}: " in r.stderr and "committed shards are kept" in r.stderr
    assert committed_shards(out) == {s.index for s in shards} - {bad}
    assert _marker_times(out, before) == first  # nothing committed was rendered again

    # 3. with the blocker gone, a rerun renders that one shard only
    shutil.rmtree(blocker)
    again = run_render(job, out, shards, progress=False, factory=lambda j: renderer)
    assert again.already_committed == len(shards) - 1 and [x.shard for x in again.results] == [bad]
    assert _marker_times(out, before) == first

    # 4. the result equals an undisturbed run, every frame id once, no temporary file left
    ref = str(tmp_path / "ref")
    assert not run_render(job, ref, shards, progress=False, factory=lambda j: renderer).failed
    got = _frames(out)
    assert got.num_rows == len(set(got.column("frame_id").to_pylist())) == len(plan(job))
    assert got.equals(_frames(ref))
    assert sorted(os.listdir(os.path.join(out, "frames"))) == [f"{s.name}.parquet" for s in shards]

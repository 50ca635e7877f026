"""Executors without Ray: option checks, pool sizing, the --ray flag, failed shards, the summary."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pyarrow.dataset as ds
import pytest
from typer.testing import CliRunner

from hpcwalk.cli import app, expand_ray_flag
from hpcwalk.render.engine import Renderer
from hpcwalk.run.base import render_shard
from hpcwalk.run.options import ExecutorError, ExecutorOptions, check_ray_address
from hpcwalk.run.local import LocalExecutor, run_render
from hpcwalk.job.spec import FrameRow
from hpcwalk.job.plan import plan, shard
from hpcwalk.run.rayworker import WorkerPlan, plan_workers, worker_job
from hpcwalk.store.writer import ShardStore
from hpcwalk.store.reader import committed_shards, read_frames
from jobs import cat_walk, tiny_job_toml

JOB = tiny_job_toml(cat_walk(methods=["slerp"], frames=6), steps=3)  # `job`, `renderer`: conftest.py


class RaisingRenderer:
    """The real renderer, except that rows of `bad` frame ids raise (a deterministic failure, like a NaN guard)."""

    def __init__(self, inner: Renderer, bad: set[str]):
        self.inner, self.bad, self.c, self.device = inner, bad, inner.c, inner.device

    def render(self, rows: list[FrameRow], on_batch=None):
        if {r.frame_id for r in rows} & self.bad:
            raise FloatingPointError("NaN in the denoised latents")
        return self.inner.render(rows, on_batch)


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts, msg", [
    (ExecutorOptions(ray="default", workers=0), "--workers must be >= 1, got 0"),
    (ExecutorOptions(workers=2), "--workers and --gpus-per-worker need --ray"),
    (ExecutorOptions(gpus_per_worker=1), "need --ray"),
    (ExecutorOptions(ray="auto", gpus_per_worker=0), "--gpus-per-worker must be"),
    (ExecutorOptions(ray="auto", gpus_per_worker=1.5), "--gpus-per-worker must be"),
    (ExecutorOptions(ray="auto", max_retries=-1), "--retries must be >= 0"),
    (ExecutorOptions(ray="head"), "is not a Ray address"),
    (ExecutorOptions(ray="head:99999"), "is not a Ray address"),
    (ExecutorOptions(ray="http://head:6379"), "is not a Ray address"),
])
def test_bad_options_name_the_flag(opts, msg):
    with pytest.raises(ExecutorError, match=msg.replace("(", r"\(")):
        opts.check()


@pytest.mark.parametrize("addr", ["default", "local", "auto", "10.0.0.5:6379", "head-0.cluster:6379", "ray://head:10001"])
def test_good_addresses(addr):
    assert check_ray_address(addr) == addr


def test_bare_ray_flag_means_default():
    assert expand_ray_flag(["render", "j.toml", "--ray"]) == ["render", "j.toml", "--ray", "default"]
    assert expand_ray_flag(["render", "j.toml", "--ray", "--workers", "2"]) == [
        "render", "j.toml", "--ray", "default", "--workers", "2"]
    assert expand_ray_flag(["render", "j.toml", "--ray", "auto"]) == ["render", "j.toml", "--ray", "auto"]


# -- sizing the pool -------------------------------------------------------------------------------


def test_plan_workers_gpu_cluster():
    o = ExecutorOptions(ray="auto")
    assert plan_workers(o, "auto", 4, [2]) == WorkerPlan(4, 1.0, None)  # one per GPU, whatever the CPUs
    assert plan_workers(dataclasses.replace(o, gpus_per_worker=2), "cuda", 4, [2]) == WorkerPlan(2, 2.0, None)
    assert plan_workers(dataclasses.replace(o, gpus_per_worker=0.5), "auto", 4, [2]) == WorkerPlan(8, 0.5, None)
    assert plan_workers(dataclasses.replace(o, workers=3), "auto", 4, [2]) == WorkerPlan(3, 1.0, None)
    with pytest.raises(ExecutorError, match="need 5 GPUs but the Ray cluster has 4"):
        plan_workers(dataclasses.replace(o, workers=5), "auto", 4, [2])
    with pytest.raises(ExecutorError, match="need 8 GPUs"):
        plan_workers(dataclasses.replace(o, gpus_per_worker=8), "auto", 4, [2])
    # --device cpu on a GPU cluster: CPU workers, one per node with all its cores
    assert plan_workers(o, "cpu", 4, [16, 8]) == WorkerPlan(2, 0.0, 8.0)


def test_plan_workers_cpu_cluster():
    o = ExecutorOptions(ray="auto")
    assert plan_workers(o, "auto", 0, [2]) == WorkerPlan(1, 0.0, 2.0)
    assert plan_workers(dataclasses.replace(o, workers=2), "auto", 0, [2]) == WorkerPlan(2, 0.0, 1.0)
    assert plan_workers(dataclasses.replace(o, workers=3), "cpu", 0, [8, 8]) == WorkerPlan(3, 0.0, 4.0)
    with pytest.raises(ExecutorError, match="--workers 3 CPU workers need a CPU each but the Ray cluster has 2"):
        plan_workers(dataclasses.replace(o, workers=3), "auto", 0, [2])
    with pytest.raises(ExecutorError, match="no GPUs: pass --device cpu"):
        plan_workers(o, "cuda:1", 0, [2])
    with pytest.raises(ExecutorError, match="drop --gpus-per-worker"):
        plan_workers(dataclasses.replace(o, gpus_per_worker=1), "auto", 0, [2])


def test_gpu_worker_renders_on_its_own_device(job):
    on = job.with_overrides(device="cuda:3")
    assert worker_job(on, WorkerPlan(2, 1.0, None)).render.device == "cuda"
    assert worker_job(on, WorkerPlan(2, 0.0, 1.0)).render.device == "cuda:3"
    assert worker_job(on, WorkerPlan(2, 1.0, None)).fingerprint() == job.fingerprint()


# -- the command line: bad flags exit 2 with one line and write nothing ---------------------------


@pytest.mark.parametrize("flags, msg", [
    (["--ray", "--workers", "0"], "error: --workers must be >= 1, got 0"),
    (["--workers", "2"], "error: --workers and --gpus-per-worker need --ray"),
    (["--ray", "not an address"], "error: --ray 'not an address' is not a Ray address"),
    (["--ray", "127.0.0.1:1"], "error: cannot reach the Ray head at 127.0.0.1:1"),
    (["--ray", "--gpus-per-worker", "-1"], "error: --gpus-per-worker must be"),
])
def test_bad_flags_exit_2(job, tmp_path, flags, msg):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, expand_ray_flag(["render", job.source, "--out", str(out), *flags]))
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(msg), r.stderr
    assert not out.exists()


def test_bare_ray_flag_through_the_console_script(job, tmp_path):
    """`main()` expands a bare --ray; here the pool check refuses before Ray starts."""
    r = subprocess.run([sys.executable, "-m", "hpcwalk.cli", "render", job.source, "--out", str(tmp_path / "o"),
                        "--ray", "--workers", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --workers must be >= 1, got 0", r.stderr


# -- shards: committed once, failures reported, the summary ----------------------------------------


def test_deterministic_failure_is_reported_once_and_committed_shards_stay(job, renderer, tmp_path):
    shards = shard(plan(job), job.output.shard_size)
    bad = {r.frame_id for r in shards[1].rows}
    calls = []
    summary = run_render(job, str(tmp_path / "run"), shards, progress=False,
                         factory=lambda j: calls.append(j) or RaisingRenderer(renderer, bad))
    assert len(calls) == 1  # one Renderer for the whole run
    [failed] = summary.failed
    assert (failed.shard, failed.attempts) == (1, 1)
    assert failed.error == "FloatingPointError: NaN in the denoised latents"
    assert committed_shards(str(tmp_path / "run")) == {0, 2}
    text = summary.describe()
    assert text.startswith("done: 4 frames in 2 shards rendered, 0 shards already committed, 1 failed")
    assert "executor local: 1 workers, 0 retries" in text
    assert "  worker local (this process, cpu): 2 shards, 4 frames, " in text and ", 1 failed" in text
    # a rerun with the fault gone renders only the failed shard
    again = run_render(job, str(tmp_path / "run"), shards, progress=False, factory=lambda j: renderer)
    assert (again.already_committed, [r.shard for r in again.results]) == (2, [1])
    assert sorted(read_frames(str(tmp_path / "run")).column("frame_id").to_pylist()) == sorted(
        r.frame_id for r in plan(job))


def test_retried_shard_overwrites_only_its_own_leftover(job, renderer, tmp_path):
    """A killed attempt leaves `.shard-N.parquet.tmp`; readers skip it and the retry replaces it."""
    shards = shard(plan(job), job.output.shard_size)
    store = ShardStore(str(tmp_path / "run"), job)
    leftover = tmp_path / "run" / "frames" / ".shard-00000.parquet.tmp"
    leftover.write_bytes(b"half a parquet file")
    assert ds.dataset(str(tmp_path / "run" / "frames"), format="parquet").files == []
    r = render_shard(renderer, job, shards[0], store)
    assert r.status == "committed"
    assert sorted(p.name for p in (tmp_path / "run" / "frames").iterdir()) == ["shard-00000.parquet"]
    assert not leftover.exists()
    # the same shard rendered again (a retry after a lost worker) still yields each frame once
    assert LocalExecutor(renderer).run(job, shards[:1], store)[0].status == "committed"
    ids = read_frames(str(tmp_path / "run")).column("frame_id").to_pylist()
    assert sorted(ids) == sorted(r.frame_id for r in shards[0].rows)


class SlowSecondBatch:
    """The real renderer, reporting two progress steps per shard; from the second shard on, the
    second step waits until the previous shard's commit marker is on disk (then a little more)."""

    def __init__(self, inner: Renderer, out: str):
        self.inner, self.out, self.c, self.device = inner, out, inner.c, inner.device
        self.shard = -1

    def render(self, rows: list[FrameRow], on_batch=None):
        import time

        self.shard += 1
        result = self.inner.render(rows)
        on_batch(len(rows) - 1)
        deadline = time.monotonic() + 30
        while self.shard and self.shard - 1 not in committed_shards(self.out) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # the commit's future completes right after its marker is written
        on_batch(1)
        return result


def test_local_executor_reports_a_commit_at_the_next_batch_boundary(job, renderer, tmp_path):
    """Shard k is written while shard k + 1 renders; its result is reported as soon as the write is done
    (at the next micro-batch), not only after shard k + 1 has finished rendering."""
    out = str(tmp_path / "run")
    shards = shard(plan(job), job.output.shard_size)
    events: list[tuple[str, int]] = []
    fake = SlowSecondBatch(renderer, out)
    ex = LocalExecutor(renderer=fake)
    try:
        results = ex.run(job, shards, ShardStore(out, job), progress=lambda n: events.append(("batch", fake.shard)),
                         on_result=lambda r: events.append(("committed", r.shard)))
    finally:
        ex.close()
    assert [r.status for r in results] == ["committed"] * len(shards) and [r.shard for r in results] == [0, 1, 2]
    # shard 0's result comes before shard 1's second (last) batch, shard 1's before shard 2's
    assert events.index(("committed", 0)) < len(events) - 1 - events[::-1].index(("batch", 1))
    assert events.index(("committed", 1)) < len(events) - 1 - events[::-1].index(("batch", 2))


_KILLED_HOLDING_TQDM = r"""
import os, signal, sys
from tqdm import tqdm
from hpcwalk.run.local import run_render
from hpcwalk.job import load_job, plan, shard

lock = tqdm.get_lock()  # a threading RLock and a multiprocessing RLock, the latter shared with forked children
pid = os.fork()
if pid == 0:  # a forked sibling (a killed render, a worker pool's child) dies while it holds tqdm's lock
    lock.acquire()
    os.kill(os.getpid(), signal.SIGKILL)
os.waitpid(pid, 0)
job = load_job(sys.argv[1])
summary = run_render(job, sys.argv[2], shard(plan(job), job.output.shard_size), progress=False)
assert not summary.failed, summary.failed
"""


def test_render_without_progress_never_waits_on_tqdms_process_shared_lock(tmp_path):
    """run_render(progress=False) made a disabled tqdm bar, which still takes tqdm's multiprocessing lock: after
    a forked process was SIGKILLed holding it, every later render in the parent hung (seen in CI, in the
    SIGKILL trials). Without a bar, no tqdm lock is touched."""
    import os

    job_file = tmp_path / "job.toml"
    job_file.write_text(tiny_job_toml(cat_walk(methods=["linear"], frames=2), steps=1, size=16)
                        + "[clip]\nenabled = false\n")
    script = tmp_path / "victim.py"
    script.write_text(_KILLED_HOLDING_TQDM)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, str(script), str(job_file), str(tmp_path / "run")],
                              capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("run_render(progress=False) hung on tqdm's lock, held by a killed forked process")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ds.dataset(str(tmp_path / "run" / "frames")).count_rows() == 2

"""RayExecutor on a real local Ray instance (2 CPUs, 4 logical GPUs): equality with the local
executor, GPU placement, a worker killed mid-run, failures reported, the driver killed and resumed.

One Ray instance for the module; every run uses the tiny model with 2 workers, on `JOB` (the
`job_file`, `job` fixtures: conftest.py).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest
import ray
import torch

from hpcwalk.render.engine import Renderer
from hpcwalk.run.options import ExecutorError, ExecutorOptions
from hpcwalk.run.local import run_render
from hpcwalk.job.spec import FrameRow, RenderJob
from hpcwalk.job.plan import plan, shard
from hpcwalk.run.ray import RayExecutor
from hpcwalk.store.writer import ShardStore
from hpcwalk.store.reader import committed_shards, read_frames
from hpcwalk.store.schema import run_metadata
from jobs import cat_walk, sigkill_render, tiny_job_toml, walk

pytestmark = pytest.mark.ray

JOB = tiny_job_toml(
    cat_walk(methods=["slerp"], frames=8),
    walk("p", "prompts", seed=3,
         prompts=["a cat", "a dog", "a lighthouse", "a city at night", "a red car", "a bowl of fruit"]),
    device="auto")


@dataclass(frozen=True)
class FaultyFactory:
    """Builds the real Renderer; rows in `exit_on` kill the worker process, rows in `raise_on` raise,
    rows in `hang_on` hang the worker every time, rows in `hang_once_on` the first time (a flag file
    in `flag_dir` remembers it across worker processes)."""

    exit_on: frozenset[str] = frozenset()
    raise_on: frozenset[str] = frozenset()
    hang_on: frozenset[str] = frozenset()
    hang_once_on: frozenset[str] = frozenset()
    flag_dir: str = ""

    def __call__(self, job: RenderJob) -> "FaultyRenderer":
        return FaultyRenderer(Renderer.from_job(job), self)


class FaultyRenderer:
    def __init__(self, inner: Renderer, faults: FaultyFactory):
        self.inner, self.faults, self.c, self.device = inner, faults, inner.c, inner.device

    def render(self, rows: list[FrameRow], on_batch=None):
        ids = {r.frame_id for r in rows}
        if ids & self.faults.exit_on:
            os._exit(17)  # the worker process dies as if OOM-killed
        if ids & self.faults.raise_on:
            raise FloatingPointError("NaN in the denoised latents")
        if ids & self.faults.hang_on:
            time.sleep(3600)  # a hung GPU call: the process lives, nothing returns
        if ids & self.faults.hang_once_on:
            flag = os.path.join(self.faults.flag_dir, "hung-" + min(ids).replace("/", "_"))
            if not os.path.exists(flag):
                open(flag, "w").close()
                time.sleep(3600)
        return self.inner.render(rows, on_batch)


@pytest.fixture(scope="module")
def shards(job):
    return shard(plan(job), job.output.shard_size)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with 2 CPUs and 4 logical GPUs (no GPU hardware: workers render on the CPU)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test factories reach the workers
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(job, shards, tmp_path_factory) -> pa.Table:
    """An undisturbed run with the local executor, in this process, on one thread as the workers.

    (CPU matmuls are blocked by thread count: 2 threads against 1 moves a pixel or two by 1/255.)
    """
    out = str(tmp_path_factory.mktemp("local") / "run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_render(job, out, shards, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert not summary.failed
    return _sorted(read_frames(out))


def _all_gpus_free_soon(timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("GPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    return ray.available_resources().get("GPU", 0) == 4


def _sorted(t: pa.Table) -> pa.Table:
    return t.sort_by("frame_id").replace_schema_metadata(None)


def test_ray_equals_local_even_when_a_worker_is_killed(cluster, job, shards, reference, tmp_path):
    """SIGKILL a worker mid-shard: the shard moves to another worker; every frame id once, and every
    column (images byte for byte) equal to the local executor's undisturbed run.

    A shard here takes ~0.1 s, so the kill can land just after the victim finished it (its result already on
    the way): then nothing was lost and the scenario is run again in a fresh folder, up to 4 times."""
    for attempt in range(4):
        out = str(tmp_path / f"run{attempt}")
        ex = RayExecutor(ExecutorOptions(ray="auto", workers=2, gpus_per_worker=2, max_retries=2))
        try:
            store = ShardStore(out, job, metadata=run_metadata(job, ex.start(job)))
            devices = sorted(w.cuda_visible_devices for w in ex.workers.values())
            assert [len(d.split(",")) for d in devices] == [2, 2] and len(set(",".join(devices).split(","))) == 4
            killed: dict[str, int] = {}

            def kill_a_busy_worker(r):
                busy = {w: s for w, s in ex.running().items() if w != r.worker} or ex.running()
                if not killed and busy:
                    name, s = next(iter(busy.items()))
                    os.kill(ex.workers[name].pid, signal.SIGKILL)
                    killed[name] = s

            results = ex.run(job, shards, store, on_result=kill_a_busy_worker)
            [(victim, lost_shard)] = killed.items()
            assert victim in ex.dead and ex.retries >= 1
            assert all(r.status == "committed" for r in results), [r.error for r in results]
            retried = next(r for r in results if r.shard == lost_shard)
        finally:
            ex.close()
        if retried.attempts == 1 and retried.worker == victim:  # finished before the kill: nothing was lost
            continue
        assert retried.attempts == 2 and retried.worker != victim
        break
    else:
        pytest.fail("in 4 runs every kill landed after the victim had finished its shard")
    got = _sorted(read_frames(out))
    ids = got.column("frame_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(plan(job))
    assert got.equals(reference)
    assert sorted(os.listdir(os.path.join(out, "frames"))) == [f"{s.name}.parquet" for s in shards]


def test_failures_are_bounded_and_reported(cluster, job, shards, reference, tmp_path):
    """A shard that kills its worker every time is tried 1 + max_retries times; one that raises, once.

    The poison shard is the last one handed out, so the run need not wait for replacement workers.
    The output is a pyarrow.fs URI (file://), as s3:// or gs:// would be on a cluster."""
    out = f"file://{tmp_path}/run"
    last = shards[-1].index
    faults = FaultyFactory(exit_on=frozenset(r.frame_id for r in shards[-1].rows),
                           raise_on=frozenset(r.frame_id for r in shards[3].rows))
    summary = run_render(job, out, shards, progress=False, factory=faults,
                         executor=ExecutorOptions(ray="auto", workers=2, max_retries=1))
    failed = {r.shard: r for r in summary.failed}
    assert sorted(failed) == [3, last]
    assert failed[last].attempts == 2 and failed[last].error.startswith("worker died 2 times rendering it")
    assert failed[3].attempts == 1 and failed[3].error == "FloatingPointError: NaN in the denoised latents"
    assert summary.retries == 1
    assert committed_shards(out) == {s.index for s in shards} - {3, last}
    kept = reference.filter(pa.compute.invert(pa.compute.is_in(
        reference.column("shard"), value_set=pa.array([3, last], pa.int32()))))
    assert _sorted(read_frames(out)).equals(kept)
    # the summary: one throughput line per worker that rendered (here the shards are so short that
    # one worker may do them all), each worker on its own logical GPU
    text = summary.describe()
    lines = [ln for ln in text.splitlines() if ln.startswith("  worker w")]
    assert f"executor ray: {len(lines)} workers, 1 retries" in text, text
    assert lines and all(" frames/s busy" in ln for ln in lines)
    assert sum(int(ln.split(": ")[1].split(" shards")[0]) for ln in lines) == len(shards) - 2
    first_two = [summary.worker_labels[w] for w in ("w0", "w1")]
    assert len({lbl.split(", GPU ")[1] for lbl in first_two}) == 2, first_two


def test_hung_worker_is_killed_and_its_shard_retried(cluster, job, shards, reference, tmp_path):
    """--shard-timeout: a worker hung on a shard (alive, never returning) is killed and replaced; a
    shard that hangs once is rendered on retry, one that hangs every time fails after 1 + retries
    attempts with a message naming the timeout; every other frame equals the local run."""
    out = str(tmp_path / "run")
    once, always = shards[1], shards[-1]
    faults = FaultyFactory(hang_on=frozenset(r.frame_id for r in always.rows),
                           hang_once_on=frozenset(r.frame_id for r in once.rows), flag_dir=str(tmp_path))
    summary = run_render(job, out, shards, progress=False, factory=faults,
                         executor=ExecutorOptions(ray="auto", workers=2, max_retries=1, shard_timeout_s=5))
    failed = {r.shard: r for r in summary.failed}
    assert sorted(failed) == [always.index]
    assert failed[always.index].attempts == 2
    assert "still rendering after" in failed[always.index].error and "--shard-timeout 5" in failed[always.index].error
    assert summary.retries == 2  # once for each hung shard's first attempt
    assert committed_shards(out) == {s.index for s in shards} - {always.index}
    kept = reference.filter(pa.compute.invert(pa.compute.is_in(
        reference.column("shard"), value_set=pa.array([always.index], pa.int32()))))
    assert _sorted(read_frames(out)).equals(kept)


def test_shard_timeout_needs_ray_and_a_positive_value():
    with pytest.raises(ExecutorError, match="--shard-timeout needs --ray"):
        ExecutorOptions(shard_timeout_s=10).check()
    with pytest.raises(ExecutorError, match="--shard-timeout must be > 0"):
        ExecutorOptions(ray="auto", shard_timeout_s=0).check()


def test_worker_that_cannot_load_the_model_stops_the_run_before_any_write(cluster, job, shards, tmp_path):
    """The driver does not check the device (it may be a CPU-only head); a worker that cannot load fails
    the start, which the CLI turns into exit 2, with nothing written."""
    out = str(tmp_path / "run")
    with pytest.raises(ExecutorError, match=r"worker w0 on \S+ could not load the model: ModelLoadError: .*CUDA"):
        run_render(job.with_overrides(device="cuda"), out, shards, progress=False,
                   executor=ExecutorOptions(ray="auto", workers=1))
    assert not os.path.exists(out)
    assert _all_gpus_free_soon()  # the worker was released


def test_driver_sigkill_then_rerun_renders_only_the_rest(cluster, job, job_file, shards, reference, tmp_path):
    """`hpcwalk render --ray HOST:PORT` SIGKILLed after some commits: Ray frees its workers, and a
    rerun renders only the shards without a commit marker."""
    out = str(tmp_path / "run")
    sigkill_render(job_file, out, "--ray", cluster, "--workers", "1", poll_s=0.05)
    before = committed_shards(out)
    assert 2 <= len(before) < len(shards), "the driver must die mid-run"
    markers = {i: os.path.getmtime(os.path.join(out, "commits", f"shard-{i:05d}.done.json")) for i in before}
    assert _all_gpus_free_soon()  # the dead driver's workers were reaped
    again = run_render(job, out, shards, progress=False, executor=ExecutorOptions(ray="auto", workers=1))
    assert again.already_committed == len(before) and not again.failed
    assert sorted(r.shard for r in again.results) == sorted({s.index for s in shards} - before)
    assert all(os.path.getmtime(os.path.join(out, "commits", f"shard-{i:05d}.done.json")) == t
               for i, t in markers.items())  # committed shards were not rendered again
    assert _sorted(read_frames(out)).equals(reference)


def test_images_walk_is_inverted_once_and_read_by_every_worker(cluster, tmp_path):
    """Image endpoints on Ray: one worker inverts before any shard is handed out, both workers read the cache
    from the run folder, and every frame equals the local executor's (one torch thread, as the workers)."""
    import json

    from hpcwalk.job.parse import load_job
    from test_walks import pictures

    folder = tmp_path / "job"
    pictures(folder / "in")
    (folder / "job.toml").write_text(tiny_job_toml(
        walk("img", "images", images=["in/a.png", "in/b.png"], prompt="a photo", methods=["slerp"], frames=6,
             invert_refine=1), steps=3, guidance=1.0, size=32, device="cpu").replace("steps = 3", 'scheduler = "ddim"\nsteps = 3'))
    job = load_job(folder / "job.toml")
    cut = shard(plan(job), job.output.shard_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert not run_render(job, str(tmp_path / "local"), cut, progress=False).failed
    finally:
        torch.set_num_threads(threads)
    out = str(tmp_path / "ray")
    summary = run_render(job, out, cut, progress=False, executor=ExecutorOptions(ray="auto", workers=2))
    assert not summary.failed, [r.error for r in summary.failed]
    assert len({r.worker for r in summary.results}) == 2  # both workers rendered shards of the walk
    index = json.load(open(os.path.join(out, "inversions", "index.json")))
    assert [r["inverted_now"] for r in index] == [True, True]
    assert sorted(f for f in os.listdir(os.path.join(out, "inversions")) if f.endswith(".safetensors")) == \
        sorted(os.path.basename(r["file"]) for r in index)
    assert _sorted(read_frames(out)).equals(_sorted(read_frames(str(tmp_path / "local"))))

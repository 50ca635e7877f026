"""Scaling of the Ray executor on one machine: frames/s with 1 and 2 CPU workers, and what the driver
costs per shard.

1. Render: one tiny-model latent walk rendered by the local executor (in-process, all cores) and by
   RayExecutor with 1 worker (all cores) and 2 workers (one core each). Workers are started and have
   loaded the model before the clock starts (start-up is reported apart), so frames/s is steady state.
2. Driver overhead: the same pool with a null renderer (no model: black frames, real PNG + Parquet +
   marker writes), one frame per shard, so the time per shard is dispatch + write, not rendering.
   Reported: driver CPU seconds per shard (process_time of this process during `run`), wall seconds
   per shard, and the idle gap a worker sees between the end of one shard and the start of the next.
3. The pool's per-shard scan: one `ray.wait(num_returns=1)` over 10, 100 and 1,000 pending results
   (an async actor stands in for busy workers), the cost that grows with the number of workers.
4. Manifest: bytes per plan row in the driver's memory and pickled, of one shard task and of one
   ShardResult (what crosses the network per shard), to size the driver at 100 and 1,000 GPUs.

    python benchmarks/scaling.py                      # writes benchmarks/results/scaling-cpu-<date>.json
    python benchmarks/scaling.py --frames 48 --steps 10 --null-shards 100   # quicker
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from hpcwalk.render.engine import Renderer, RenderOutput  # noqa: E402
from hpcwalk.run.base import ShardResult
from hpcwalk.run.options import ExecutorOptions
from hpcwalk.run.local import LocalExecutor  # noqa: E402
from hpcwalk.job.spec import FrameRow, RenderJob, Sampling, Walk
from hpcwalk.job.plan import plan, shard  # noqa: E402
from hpcwalk.job.spec import NoiseKey, OutputSpec, RenderSettings  # noqa: E402
from hpcwalk.store.writer import ShardStore
from hpcwalk.store.schema import run_metadata  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=96, help="frames of the rendered walk")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64, help="height = width in pixels")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--shard-size", type=int, default=8)
    p.add_argument("--null-shards", type=int, default=200, help="one-frame shards of the overhead run")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per configuration (median reported)")
    p.add_argument("--one-thread-only", action="store_true",
                   help="skip the runs with all cores in one process (slow on a shared host)")
    p.add_argument("--out", default=str(common.RESULTS))
    p.add_argument("--tag", default="", help="suffix of the result name: scaling-cpu-DATE[-TAG].json")
    return p.parse_args(argv)


def make_job(a: argparse.Namespace, frames: int, shard_size: int) -> RenderJob:
    walk = Walk(name="w", kind="latent", prompt="A high resolution photo of a cat",
                seeds=(NoiseKey(1), NoiseKey(2)), methods=("slerp",), frames=frames)
    return RenderJob(sampling=Sampling(steps=a.steps, height=a.size, width=a.size),
                     render=RenderSettings(batch_size=a.batch, device="cpu"),
                     output=OutputSpec(shard_size=shard_size), walks=(walk,), source="benchmarks/scaling.py")


class NullRenderer:
    """No model: black frames at once, so a run measures dispatch and writes only."""

    def __init__(self, job: RenderJob):
        self.h, self.w = job.sampling.height, job.sampling.width
        self.device = torch.device("cpu")
        self.c = types.SimpleNamespace(scheduler_config={})

    def render(self, rows: list[FrameRow], on_batch=None) -> RenderOutput:
        n = len(rows)
        return RenderOutput(list(rows), np.zeros((n, self.h, self.w, 3), np.uint8), np.ones(n, np.float32))


@dataclasses.dataclass(frozen=True)
class Threads:
    """Renderer.from_job with torch held to `n` threads (1 worker x 1 thread separates workers from threads)."""

    n: int

    def __call__(self, job: RenderJob) -> Renderer:
        torch.set_num_threads(self.n)
        return Renderer.from_job(job)


def _say(name: str, f: dict[str, Any]) -> None:
    print(f"{name}: {f['frames_per_s']:.2f} frames/s (start {f['start_s']:.1f} s)", file=sys.stderr)


def worker_gaps(results: list[ShardResult]) -> list[float]:
    """Seconds each worker sat idle between finishing one shard and starting its next."""
    gaps = []
    by: dict[str, list[ShardResult]] = {}
    for r in results:
        by.setdefault(r.worker, []).append(r)
    for rs in by.values():
        rs.sort(key=lambda r: r.started_at)
        gaps += [b.started_at - (a.started_at + a.seconds) for a, b in zip(rs, rs[1:])]
    return gaps


def timed_run(executor: Any, job: RenderJob, out: str) -> dict[str, Any]:
    """Start the executor (timed apart), then render every shard of `job` into `out`."""
    shards = shard(plan(job), job.output.shard_size)
    t0 = time.perf_counter()
    store = ShardStore(out, job, overwrite=True, metadata=run_metadata(job, executor.start(job)))
    start_s = time.perf_counter() - t0
    cpu0, t1 = time.process_time(), time.perf_counter()
    results = executor.run(job, shards, store)
    wall, cpu = time.perf_counter() - t1, time.process_time() - cpu0
    assert all(r.status == "committed" for r in results), [r.error for r in results if r.error]
    frames = sum(r.rows for r in results)
    gaps = worker_gaps(results)
    return {"start_s": start_s, "wall_s": wall, "frames": frames, "shards": len(shards), "frames_per_s": frames / wall,
            "driver_cpu_s_per_shard": cpu / len(shards), "wall_s_per_shard": wall / len(shards),
            "worker_gap_s_median": statistics.median(gaps) if gaps else None,
            "worker_gap_s_p90": common.summary(gaps)["p90_s"] if len(gaps) > 1 else None,
            "busy_frames_per_s": {w: sum(r.rows for r in results if r.worker == w)
                                  / sum(r.seconds for r in results if r.worker == w)
                                  for w in sorted({r.worker for r in results})}}


class Sleeper:
    """An async actor whose calls stay pending: stands in for busy workers when timing ray.wait."""

    async def sleep(self, s: float) -> None:
        import asyncio

        await asyncio.sleep(s)


def wait_cost(in_flight: int, calls: int = 50) -> float:
    """Seconds one `ray.wait(num_returns=1)` over `in_flight` pending results takes (the pool's per-shard scan)."""
    import ray

    actor = ray.remote(Sleeper).options(max_concurrency=in_flight, num_cpus=0).remote()
    refs = [actor.sleep.remote(120) for _ in range(in_flight)]
    ray.wait(refs, num_returns=1, timeout=0)
    t0 = time.perf_counter()
    for _ in range(calls):
        ray.wait(refs, num_returns=1, timeout=0)
    cost = (time.perf_counter() - t0) / calls
    ray.kill(actor)
    return cost


def plan_memory(job: RenderJob) -> dict[str, float]:
    """Driver memory of the plan: bytes per row as Python objects (tracemalloc) and pickled."""
    import tracemalloc

    tracemalloc.start()
    rows = plan(job)
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"rows": len(rows), "bytes_per_row_in_memory": size / len(rows),
            "bytes_per_row_pickled": len(pickle.dumps(rows)) / len(rows)}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = sorted(runs, key=lambda r: r["frames_per_s"])[len(runs) // 2]
    return {**best, "start_s": runs[0]["start_s"], "frames_per_s_all": [r["frames_per_s"] for r in runs]}


def main(argv: list[str] | None = None) -> Path:
    import ray

    from hpcwalk.run.ray import RayExecutor

    a = parse_args(argv)
    cores = os.cpu_count() or 1
    result: dict[str, Any] = {
        "benchmark": "scaling", "date": datetime.date.today().isoformat(),
        "device": common.device_info(torch.device("cpu")), "versions": {**common.versions(), "ray": ray.__version__},
        "load_average_before": common.load_average(), "config": vars(a), "figures": {}}
    tmp = tempfile.mkdtemp(prefix="hpcwalk-scaling-")
    render_job = make_job(a, a.frames, a.shard_size)
    # 1. rendering: local executor, then Ray with 1 and 2 CPU workers; torch threads named, because on
    #    a shared host 2 threads per process can be far slower than 1 (OpenMP threads wait on each other)
    threads = torch.get_num_threads()
    for n in [1] if a.one_thread_only else sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n)
        t0 = time.perf_counter()
        local = LocalExecutor(Renderer.from_job(render_job))
        load_s = time.perf_counter() - t0
        runs = [timed_run(local, render_job, f"{tmp}/local") for _ in range(a.repeats)]
        result["figures"][f"local_{n}_threads"] = {**median_of(runs), "start_s": load_s, "torch_threads": n}
        _say(f"local, {n} threads", result["figures"][f"local_{n}_threads"])
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING")
    result["ray_init_s"] = time.perf_counter() - t0
    try:
        for workers, per_thread in ((1, 1), (2, None)) if a.one_thread_only else ((1, None), (1, 1), (2, None)):
            ex = RayExecutor(ExecutorOptions(ray="auto", workers=workers), factory=per_thread and Threads(per_thread))
            try:
                runs = [timed_run(ex, render_job, f"{tmp}/ray{workers}") for _ in range(a.repeats)]
                n = per_thread or int(ex.plan.num_cpus)
            finally:
                ex.close()
            name = f"ray_{workers}_workers_{n}_threads"
            result["figures"][name] = {**median_of(runs), "torch_threads_per_worker": n}
            _say(name, result["figures"][name])
        # 2. the driver's cost per shard: null renderer, one-frame shards
        null_job = make_job(a, a.null_shards, 1)
        for workers in (1, 2):
            ex = RayExecutor(ExecutorOptions(ray="auto", workers=workers), factory=NullRenderer)
            try:
                result["figures"][f"overhead_{workers}_workers"] = timed_run(ex, null_job, f"{tmp}/null{workers}")
            finally:
                ex.close()
            f = result["figures"][f"overhead_{workers}_workers"]
            print(f"overhead {workers} workers: {1e3 * f['wall_s_per_shard']:.1f} ms wall/shard, "
                  f"{1e3 * f['driver_cpu_s_per_shard']:.2f} ms driver CPU/shard", file=sys.stderr)
        # 3. the pool's scan of in-flight results per shard, at 100 and 1,000 workers
        result["ray_wait_s"] = {str(n): wait_cost(n) for n in (10, 100, 1000)}
        print(f"ray.wait: {result['ray_wait_s']}", file=sys.stderr)
    finally:
        ray.shutdown()
    # 4. what the driver holds and what crosses the network per shard
    result["plan_memory"] = plan_memory(make_job(a, 100_000, 64))
    shards64 = shard(plan(make_job(a, 640, 64)), 64)
    result["manifest_bytes"] = {
        "plan_row": len(pickle.dumps(shards64[0].rows[0])),
        "shard_task_64_rows": len(pickle.dumps(shards64[0])),
        "shard_result": len(pickle.dumps(ShardResult(0, "committed", 64, 12.5, worker="w17", started_at=time.time()))),
        "job": len(pickle.dumps(render_job)),
    }
    result["load_average_after"] = common.load_average()
    shutil.rmtree(tmp, ignore_errors=True)
    return common.write_result(result, a.out, f"scaling-cpu-{result['date']}{'-' + a.tag if a.tag else ''}")


if __name__ == "__main__":
    print(main())

"""The worker side of the Ray executor (hpcwalk/run/ray.py): how many `RenderWorker` actors a cluster
gets and on which resources (`plan_workers`, pure: tested without Ray), and the actor itself, which
builds one Renderer in `__init__` and then renders one shard at a time with the same `render_shard`
the local executor calls, writing its Parquet file and commit marker itself."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from hpcwalk.job.spec import RenderJob, Shard
from hpcwalk.run.base import EncodePool, RendererFactory, ShardResult, render_shard
from hpcwalk.run.options import ExecutorError, ExecutorOptions
from hpcwalk.run.preflight import check_worker
from hpcwalk.store.schema import run_metadata
from hpcwalk.store.writer import ShardStore

# ---------------------------------------------------------------------------------------------
# 1. Sizing the pool (pure: tested without Ray)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers, and what each asks Ray for."""

    count: int
    num_gpus: float  # 0: a CPU worker
    num_cpus: float | None  # None: Ray's actor default (needs 1 CPU to be placed, holds none)

    def describe(self) -> str:
        each = f"{self.num_gpus:g} GPU" if self.num_gpus else f"{self.num_cpus:g} CPU"
        return f"{self.count} workers x {each}"


def plan_workers(options: ExecutorOptions, device: str, gpus: float, node_cpus: Sequence[float]) -> WorkerPlan:
    """One worker per GPU (or per `gpus_per_worker`); without GPUs, CPU workers (default one per node)."""
    if gpus > 0 and device != "cpu":
        per = options.gpus_per_worker or 1.0
        fit = int(gpus / per + 1e-9)
        n = options.workers or fit
        if n > fit or fit < 1:
            raise ExecutorError(f"{max(n, 1)} workers x {per:g} GPUs need {max(n, 1) * per:g} GPUs but the Ray "
                                f"cluster has {gpus:g}: lower --workers or --gpus-per-worker")
        return WorkerPlan(n, per, None)
    if device.startswith("cuda"):
        raise ExecutorError(f"the job renders on {device!r} but the Ray cluster has no GPUs: "
                            "pass --device cpu, or add GPU nodes")
    if options.gpus_per_worker is not None:
        why = "the job renders on the CPU" if device == "cpu" else "the Ray cluster has no GPUs"
        raise ExecutorError(f"--gpus-per-worker {options.gpus_per_worker:g} given but {why}: drop --gpus-per-worker")
    cpus = [int(c) for c in node_cpus if c >= 1]
    if not cpus:
        raise ExecutorError("the Ray cluster has no CPUs to run workers on: start nodes with `ray start`")
    if options.workers is None:
        return WorkerPlan(len(cpus), 0.0, float(min(cpus)))
    for per in range(max(cpus), 0, -1):  # the most CPUs per worker with which all workers fit
        if sum(c // per for c in cpus) >= options.workers:
            return WorkerPlan(options.workers, 0.0, float(per))
    raise ExecutorError(f"--workers {options.workers} CPU workers need a CPU each but the Ray cluster has "
                        f"{sum(cpus)}: lower --workers")


def worker_job(job: RenderJob, plan: WorkerPlan) -> RenderJob:
    """The job as a worker renders it: a GPU worker sees only its own devices, so cuda:N becomes cuda."""
    if plan.num_gpus and job.render.device.startswith("cuda:"):
        return job.with_overrides(device="cuda")
    return job


# ---------------------------------------------------------------------------------------------
# 2. The worker: a Ray actor around one Renderer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerInfo:
    """Where a worker runs and what it loaded; `error` is set when it could not build its Renderer."""

    name: str
    actor_id: str
    pid: int
    host: str
    gpu_ids: tuple[str, ...]
    cuda_visible_devices: str
    device: str
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    def label(self) -> str:
        gpus = f", GPU {','.join(self.gpu_ids)}" if self.gpu_ids else ""
        return f"{self.host} pid {self.pid}, {self.device}{gpus}"


class RenderWorker:
    """A Ray actor: builds one Renderer in `__init__`, then renders the shards it is handed."""

    def __init__(self, job: RenderJob, factory: RendererFactory, name: str, num_cpus: float | None):
        import ray
        import torch

        if num_cpus:
            torch.set_num_threads(int(num_cpus))
        self.job, self.renderer, self._stores = job, None, {}
        # PNG encoding on threads (Pillow releases the GIL): serially, 512x512 frames at ~25 ms each
        # would leave a GPU rendering ~7 frames/s idle for a sixth of the time
        self.pool = EncodePool(int(num_cpus) if num_cpus else None)
        error = ""
        try:
            check_worker(job)  # device, dtype, [compile], CLIP weights, memory: here, where the frames render
            self.renderer = factory(job)
        except Exception as e:  # reported by ready(); the driver stops before writing anything
            error = f"{type(e).__name__}: {e}"
        self.info = WorkerInfo(
            name, ray.get_runtime_context().get_actor_id(), os.getpid(), platform.node(),
            tuple(str(g) for g in ray.get_gpu_ids()), os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            str(self.renderer.device) if self.renderer else "",
            dict(self.renderer.c.scheduler_config) if self.renderer else {}, error)

    def ready(self) -> WorkerInfo:
        return self.info

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(renderer, *args) on this worker (once-per-run work such as inverting image endpoints)."""
        return fn(self.renderer, *args)

    def render(self, shard: Shard, uri: str) -> ShardResult:
        """Render and commit one shard into the run folder at `uri` (opened by the driver)."""
        try:
            if uri not in self._stores:
                meta = run_metadata(self.job, self.renderer.c.scheduler_config)
                self._stores[uri] = ShardStore.attach(uri, self.job, meta)
        except Exception as e:
            return ShardResult(shard.index, "failed", len(shard.rows), 0.0, f"{type(e).__name__}: {e}",
                               self.info.name, started_at=time.time())
        return render_shard(self.renderer, self.job, shard, self._stores[uri], worker=self.info.name, pool=self.pool)



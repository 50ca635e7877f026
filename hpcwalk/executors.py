"""Executors run shards; every executor calls the same `render_shard(renderer, job, shard, store)`.

`LocalExecutor` renders in this process (the default: no start-up cost for one GPU or a laptop).
`RayExecutor` (hpcwalk/ray_executor.py, Ray imported only when used) spreads shards over a pool of
Ray actors across GPUs and nodes. Both have the same life cycle, driven by `run_render`:

    start(job) -> scheduler config   load the models (workers ready) before anything is written
    run(job, shards, store, ...)     render the shards; one ShardResult per shard, never raises per shard
    close()                          release workers

A shard is the unit of work, of retry and of output: one Parquet file and one commit marker, written
by whoever rendered it. Only `ShardResult`s (a few numbers) travel back to the driver.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol, Sequence

from hpcwalk.engine import Renderer, RenderOutput
from hpcwalk.job import RenderJob, Shard
from hpcwalk.store import ShardStore, committed_shards, encode_image, frames_table, run_metadata

ProgressFn = Callable[[int], None]  # called with the number of frames just rendered
RendererFactory = Callable[[RenderJob], Renderer]  # builds a worker's one Renderer (default Renderer.from_job)


class ExecutorError(ValueError):
    """Executor options or the cluster cannot run this job; the message names the fix."""


@dataclass
class ShardResult:
    """What happened to one shard. `status` is committed or failed, never a silent None."""

    shard: int
    status: Literal["committed", "failed"]
    rows: int
    seconds: float
    error: str = ""
    worker: str = "local"
    attempts: int = 1  # > 1 when a worker died mid-shard and the shard was retried
    started_at: float = 0.0  # wall clock (time.time) when the worker began the shard


# ---------------------------------------------------------------------------------------------
# 1. One shard: the function every executor calls
# ---------------------------------------------------------------------------------------------


def render_shard(renderer: Renderer, job: RenderJob, shard: Shard, store: ShardStore,
                 progress: ProgressFn | None = None, worker: str = "local", pool: "EncodePool | None" = None
                 ) -> ShardResult:
    """Render one shard's rows, encode the images, commit the shard. Errors become a failed result."""
    return commit_shard(render_rows(renderer, shard, progress), job, shard, store, pool, worker)


@dataclass
class RenderedShard:
    """A shard's frames between rendering and commit, or the error that stopped its render."""

    out: RenderOutput | None
    device: str
    started: float  # wall clock (time.time)
    t0: float  # perf_counter at the start of the render
    render_s: float
    error: str = ""


def render_rows(renderer: Renderer, shard: Shard, progress: ProgressFn | None = None) -> RenderedShard:
    """The render half of `render_shard`: frames on the host, nothing written."""
    started, t0 = time.time(), time.perf_counter()
    try:
        out = renderer.render(shard.rows, on_batch=progress)
    except Exception as e:  # deterministic per shard: reported, not retried; the run goes on and ends non-zero
        return RenderedShard(None, str(renderer.device), started, t0, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
    return RenderedShard(out, str(renderer.device), started, t0, time.perf_counter() - t0)


def commit_shard(r: RenderedShard, job: RenderJob, shard: Shard, store: ShardStore,
                 pool: "EncodePool | None" = None, worker: str = "local") -> ShardResult:
    """The commit half of `render_shard`: encode the images (on `pool` if given), write, commit."""
    try:
        if r.out is None:
            raise _RenderFailed(r.error)
        t1 = time.perf_counter()
        fmt = job.output.image_format
        images = pool.encode(r.out.images, fmt) if pool else [encode_image(f, fmt) for f in r.out.images]
        t2 = time.perf_counter()
        table = frames_table(list(shard.rows), images, r.out.latent_norm, shard.index,
                             job.sampling.height, job.sampling.width, extra=r.out.extra)
        store.write(shard, table, {"render_s": r.render_s, "encode_s": t2 - t1}, device=r.device)
    except Exception as e:  # deterministic per shard: reported, not retried; the run goes on and ends non-zero
        error = str(e) if isinstance(e, _RenderFailed) else f"{type(e).__name__}: {e}"
        return ShardResult(shard.index, "failed", len(shard.rows), time.perf_counter() - r.t0, error, worker,
                           started_at=r.started)
    return ShardResult(shard.index, "committed", len(shard.rows), time.perf_counter() - r.t0, worker=worker,
                       started_at=r.started)


class _RenderFailed(Exception):
    """The render half failed; its message is already `Type: message`."""


class EncodePool:
    """Background threads that encode frames to PNG/WebP/JPEG (Pillow releases the GIL while compressing)."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="hpcwalk-encode")

    def encode(self, frames: Sequence[Any], fmt: str = "png") -> list[bytes]:
        """Encoded bytes of each uint8 (H, W, 3) frame, in order."""
        return list(self._pool.map(partial(encode_image, fmt=fmt), frames))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# 2. Executor options: one place for --ray / --workers / --gpus-per-worker / --retries
# ---------------------------------------------------------------------------------------------

RAY_DEFAULT = "default"  # bare `--ray`: RAY_ADDRESS if set (as under `ray job submit`), else a new local instance
ADDRESS_RE = re.compile(r"(ray://)?([A-Za-z0-9_.\-]+):(\d{1,5})")


@dataclass(frozen=True)
class ExecutorOptions:
    """Where shards run: this process (`ray` None) or a Ray cluster, and how many workers of what size."""

    ray: str | None = None  # None | "default" | "local" | "auto" | "HOST:PORT" | "ray://HOST:PORT"
    workers: int | None = None  # None: one per GPU of the cluster (without GPUs: one CPU worker per node)
    gpus_per_worker: float | None = None  # None: 1 on a cluster with GPUs
    max_retries: int = 2  # re-runs of a shard whose worker died under it; then it is reported failed
    start_timeout_s: float = 600.0  # how long workers may take to start and load the model
    shard_timeout_s: float | None = None  # Ray: a shard running longer is treated as a hung worker (killed, retried)

    def check(self) -> "ExecutorOptions":
        """Validate every option before any work; raise ExecutorError with one line naming the fix."""
        if self.ray is None:
            if self.workers is not None or self.gpus_per_worker is not None:
                raise ExecutorError("--workers and --gpus-per-worker need --ray (the local executor is one worker)")
        else:
            check_ray_address(self.ray)
        if self.workers is not None and self.workers < 1:
            raise ExecutorError(f"--workers must be >= 1, got {self.workers}")
        g = self.gpus_per_worker
        if g is not None and (g <= 0 or (g > 1 and g != int(g))):
            raise ExecutorError(f"--gpus-per-worker must be a fraction in (0, 1] or a whole number, got {g:g}")
        if self.max_retries < 0:
            raise ExecutorError(f"--retries must be >= 0, got {self.max_retries}")
        if self.shard_timeout_s is not None:
            if self.ray is None:
                raise ExecutorError("--shard-timeout needs --ray: a hung render in this process cannot be stopped "
                                    "safely; run with --ray (a local Ray instance works) or drop --shard-timeout")
            if not self.shard_timeout_s > 0:
                raise ExecutorError(f"--shard-timeout must be > 0 seconds, got {self.shard_timeout_s:g}")
        return self


def check_ray_address(address: str) -> str:
    """`default`, `local`, `auto`, `HOST:PORT` or `ray://HOST:PORT`; anything else raises ExecutorError."""
    if address in (RAY_DEFAULT, "local", "auto"):
        return address
    m = ADDRESS_RE.fullmatch(address)
    if not m or not 0 < int(m.group(3)) < 65536:
        raise ExecutorError(
            f"--ray {address!r} is not a Ray address: use auto, HOST:PORT of the head (port 6379 by default), "
            "ray://HOST:10001, or --ray with no value (put it after the job file) for a local instance")
    return address


# ---------------------------------------------------------------------------------------------
# 3. Executors
# ---------------------------------------------------------------------------------------------


class Executor(Protocol):
    """What `run_render` needs from an executor (LocalExecutor, RayExecutor)."""

    name: str
    retries: int

    def start(self, job: RenderJob) -> dict[str, Any]: ...

    def run(self, job: RenderJob, shards: Sequence[Shard], store: ShardStore, progress: ProgressFn | None = None,
            on_result: Callable[[ShardResult], None] | None = None) -> list[ShardResult]: ...

    @property
    def workers_alive(self) -> int: ...

    def worker_labels(self) -> dict[str, str]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Renders shards one after another in this process with one Renderer."""

    name = "local"
    retries = 0  # nothing to retry: a crash here ends the driver, and a rerun resumes

    def __init__(self, renderer: Renderer | None = None, factory: RendererFactory | None = None):
        self.renderer = renderer
        self.factory = factory or Renderer.from_job
        self.pool: EncodePool | None = None  # PNG encoding off the render thread, made by run()

    def start(self, job: RenderJob) -> dict[str, Any]:
        """Load the model (unless a Renderer was given); returns its scheduler config for the run metadata."""
        if self.renderer is None:
            self.renderer = self.factory(job)
        return self.renderer.c.scheduler_config

    @property
    def workers_alive(self) -> int:
        return 1

    def worker_labels(self) -> dict[str, str]:
        return {"local": f"this process, {self.renderer.device if self.renderer else '?'}"}

    def run(self, job: RenderJob, shards: Sequence[Shard], store: ShardStore,
            progress: ProgressFn | None = None, on_result: Callable[[ShardResult], None] | None = None
            ) -> list[ShardResult]:
        self.start(job)
        if self.pool is None:
            self.pool = EncodePool()
        results: list[ShardResult] = []

        def collect(f: Future | None) -> None:
            if f is not None:
                results.append(f.result())
                if on_result:
                    on_result(results[-1])

        # shard k is encoded and written on a background thread while shard k + 1 renders; its result
        # is reported at the first micro-batch boundary after the write finished, on this thread
        pending: Future | None = None

        def on_batch(n: int) -> None:
            nonlocal pending
            if pending is not None and pending.done():
                collect(pending)
                pending = None
            if progress:
                progress(n)

        with ThreadPoolExecutor(1, thread_name_prefix="hpcwalk-commit") as bg:
            for s in shards:
                rendered = render_rows(self.renderer, s, on_batch)
                collect(pending)
                pending = bg.submit(commit_shard, rendered, job, s, store, self.pool)
            collect(pending)
        return results

    def close(self) -> None:
        """Stop the encode threads; the Renderer lives as long as this object."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def make_executor(options: ExecutorOptions | None = None, factory: RendererFactory | None = None) -> Executor:
    """LocalExecutor without `--ray`, else a RayExecutor (Ray is imported only then)."""
    options = (options or ExecutorOptions()).check()
    if options.ray is None:
        return LocalExecutor(factory=factory)
    from hpcwalk.ray_executor import RayExecutor

    return RayExecutor(options, factory)


# ---------------------------------------------------------------------------------------------
# 4. The run: summary, progress, entry point
# ---------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    """The outcome of one `run_render` call."""

    out: str
    results: list[ShardResult] = field(default_factory=list)
    already_committed: int = 0
    load_s: float = 0.0
    render_s: float = 0.0
    total_shards: int = 0
    executor: str = "local"
    retries: int = 0
    worker_labels: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[ShardResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def frames(self) -> int:
        return sum(r.rows for r in self.results if r.status == "committed")

    def worker_lines(self) -> list[str]:
        """One throughput line per worker: shards, frames, frames/s while busy."""
        by: dict[str, list[ShardResult]] = defaultdict(list)
        for r in self.results:
            by[r.worker].append(r)
        lines = []
        for w in sorted(by, key=lambda w: (len(w), w)):
            ok = [r for r in by[w] if r.status == "committed"]
            frames, busy = sum(r.rows for r in ok), sum(r.seconds for r in by[w])
            label = self.worker_labels.get(w, "")
            lines.append(f"  worker {w}{f' ({label})' if label else ''}: {len(ok)} shards, {frames} frames, "
                         f"{frames / busy if busy else 0.0:.2f} frames/s busy"
                         + (f", {len(by[w]) - len(ok)} failed" if len(ok) < len(by[w]) else ""))
        return lines

    def describe(self) -> str:
        fps = self.frames / self.render_s if self.render_s else 0.0
        head = (f"done: {self.frames} frames in {len(self.results) - len(self.failed)} shards rendered, "
                f"{self.already_committed} shards already committed, {len(self.failed)} failed; "
                f"{self.render_s:.1f} s ({fps:.2f} frames/s), "
                f"{'model load' if self.executor == 'local' else 'Ray start + model load'} {self.load_s:.1f} s")
        lines = [head]
        if self.results:
            lines.append(f"executor {self.executor}: {len(self.worker_lines())} workers, {self.retries} retries")
            lines += self.worker_lines()
        lines.append(f"frames: {self.out}")
        return "\n".join(lines)


class RunProgress:
    """The driver's one progress bar: frames, frames/s and ETA (tqdm), workers alive and retries."""

    def __init__(self, total: int, executor: Executor, enabled: bool = True):
        from tqdm import tqdm

        self.executor = executor
        self.failed = 0
        self.bar = tqdm(total=total, unit="frame", disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                        smoothing=0.1)

    def frames(self, n: int) -> None:
        """Count `n` rendered frames (0 only refreshes workers and retries)."""
        self.bar.set_postfix(workers=self.executor.workers_alive, retries=self.executor.retries,
                             failed=self.failed, refresh=False)
        self.bar.update(n)

    def shard_done(self, r: ShardResult) -> None:
        self.failed += r.status == "failed"
        self.frames(0)

    def close(self) -> None:
        self.bar.close()


def run_render(job: RenderJob, out: str, shards: Sequence[Shard], overwrite: bool = False,
               progress: bool = True, executor: ExecutorOptions | None = None,
               factory: RendererFactory | None = None) -> RunSummary:
    """Render the shards of `job` not yet committed in `out`, locally or on Ray (`executor`)."""
    ex = make_executor(executor, factory)  # options are checked before anything else
    # 1. what is left (a resumed run skips committed shards)
    done = set() if overwrite else committed_shards(out)
    todo = [s for s in shards if s.index not in done]
    summary = RunSummary(out, already_committed=len(done & {s.index for s in shards}), total_shards=len(shards),
                         executor=ex.name)
    if not todo:
        return summary
    try:
        # 2. load the model on every worker before writing anything, then open the store
        t0 = time.perf_counter()
        store = ShardStore(out, job, overwrite=overwrite, metadata=run_metadata(job, ex.start(job)))
        summary.load_s = time.perf_counter() - t0
        # 3. render, one bar for the whole run
        bar = RunProgress(sum(len(s.rows) for s in todo), ex, enabled=progress)
        t1 = time.perf_counter()
        try:
            summary.results = ex.run(job, todo, store, progress=bar.frames, on_result=bar.shard_done)
        finally:
            bar.close()
        summary.render_s = time.perf_counter() - t1
        summary.retries, summary.worker_labels = ex.retries, ex.worker_labels()
    finally:
        ex.close()
    return summary

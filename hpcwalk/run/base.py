"""What every executor shares: one shard's render and commit (`render_shard`), its `ShardResult`, the
PNG encode pool, and the executor options (`ExecutorOptions`, checked before any work).

`hpcwalk.run.local` (the local executor and `run_render`) and `hpcwalk.run.ray` (the Ray actor
pool) both build on this module and on nothing of each other's: the local module imports the Ray one
only when `--ray` asks for it. The public names stay importable from `hpcwalk.run.local`.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal, Sequence

import numpy as np

from hpcwalk.job.spec import RenderJob, Shard
from hpcwalk.render.engine import Renderer, RenderOutput
from hpcwalk.store.schema import encode_image, frames_table
from hpcwalk.store.writer import ShardStore

ProgressFn = Callable[[int], None]  # called with the number of frames just rendered
RendererFactory = Callable[[RenderJob], Renderer]  # builds a worker's one Renderer (default Renderer.from_job)


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
    bind_run(renderer, job, store)
    return commit_shard(render_rows(renderer, shard, progress), job, shard, store, pool, worker)


def bind_run(renderer: Renderer, job: RenderJob, store: ShardStore) -> None:
    """What a renderer needs from the run folder before it renders the job's rows: the inverted image
    endpoints (hpcwalk/run/endpoints.py; none without images walks)."""
    from hpcwalk.run.endpoints import bind

    bind(renderer, job, store.location)


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
    """The render half of `render_shard`: frames on the host, nothing written. Rows that reuse a coarse frame
    (even pacing: `reused_from`) are not rendered; `commit_shard` copies them."""
    started, t0 = time.time(), time.perf_counter()
    rows = [r for r in shard.rows if r.reused_from is None]
    try:
        out = (renderer.render(rows, on_batch=progress) if rows else
               RenderOutput([], np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0, np.float32)))
    except Exception as e:  # deterministic per shard: reported, not retried; the run goes on and ends non-zero
        return RenderedShard(None, str(renderer.device), started, t0, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
    if progress and len(rows) < len(shard.rows):
        progress(len(shard.rows) - len(rows))
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
        h, w = job.sampling.height, job.sampling.width
        table = frames_table(list(r.out.rows), images, r.out.latent_norm, shard.index, h, w, extra=r.out.extra)
        if len(r.out.rows) < len(shard.rows):  # even pacing: frames at a coarse frame's gamma are copies of it
            from hpcwalk.run.evenpace import with_reused

            table = with_reused(store, shard, table, h, w)
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

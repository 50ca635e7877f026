"""Executors run shards; every executor calls the same `render_shard(renderer, job, shard, store)`.

`LocalExecutor` renders in this process (the default: no start-up cost for one GPU or a laptop).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

from hpcwalk.engine import Renderer
from hpcwalk.job import RenderJob, Shard
from hpcwalk.store import ShardStore, committed_shards, encode_image, frames_table, run_metadata


@dataclass
class ShardResult:
    """What happened to one shard. `status` is committed or failed, never a silent None."""

    shard: int
    status: Literal["committed", "failed"]
    rows: int
    seconds: float
    error: str = ""
    worker: str = "local"


ProgressFn = Callable[[int], None]  # called with the number of frames just rendered


def render_shard(renderer: Renderer, job: RenderJob, shard: Shard, store: ShardStore,
                 progress: ProgressFn | None = None, worker: str = "local") -> ShardResult:
    """Render one shard's rows, encode the images, commit the shard. Errors become a failed result."""
    t0 = time.perf_counter()
    try:
        out = renderer.render(shard.rows, on_batch=progress)
        t1 = time.perf_counter()
        images = [encode_image(f, job.output.image_format) for f in out.images]
        t2 = time.perf_counter()
        table = frames_table(list(shard.rows), images, out.latent_norm, shard.index,
                             job.sampling.height, job.sampling.width, extra=out.extra)
        store.write(shard, table, {"render_s": t1 - t0, "encode_s": t2 - t1}, device=str(renderer.device))
    except Exception as e:  # reported per shard; the run goes on and ends non-zero
        return ShardResult(shard.index, "failed", len(shard.rows), time.perf_counter() - t0,
                           f"{type(e).__name__}: {e}", worker)
    return ShardResult(shard.index, "committed", len(shard.rows), time.perf_counter() - t0, worker=worker)


class LocalExecutor:
    """Renders shards one after another in this process with one Renderer."""

    def __init__(self, renderer: Renderer):
        self.renderer = renderer

    def run(self, job: RenderJob, shards: Sequence[Shard], store: ShardStore,
            progress: ProgressFn | None = None, on_result: Callable[[ShardResult], None] | None = None
            ) -> list[ShardResult]:
        results = []
        for s in shards:
            r = render_shard(self.renderer, job, s, store, progress)
            results.append(r)
            if on_result:
                on_result(r)
        return results


@dataclass
class RunSummary:
    """The outcome of one `run_render` call."""

    out: str
    results: list[ShardResult] = field(default_factory=list)
    already_committed: int = 0
    load_s: float = 0.0
    render_s: float = 0.0

    @property
    def failed(self) -> list[ShardResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def frames(self) -> int:
        return sum(r.rows for r in self.results if r.status == "committed")

    def describe(self) -> str:
        fps = self.frames / self.render_s if self.render_s else 0.0
        return (f"done: {self.frames} frames in {len(self.results) - len(self.failed)} shards rendered, "
                f"{self.already_committed} shards already committed, {len(self.failed)} failed; "
                f"{self.render_s:.1f} s ({fps:.2f} frames/s), model load {self.load_s:.1f} s\n"
                f"frames: {self.out}")


def run_render(job: RenderJob, out: str, shards: Sequence[Shard], overwrite: bool = False,
               progress: bool = True) -> RunSummary:
    """Render the shards of `job` not yet committed in `out` with a LocalExecutor."""
    from tqdm import tqdm

    # 1. what is left (a resumed run skips committed shards)
    done = set() if overwrite else committed_shards(out)
    todo = [s for s in shards if s.index not in done]
    summary = RunSummary(out, already_committed=len(done & {s.index for s in shards}))
    if not todo:
        return summary
    # 2. load the model before writing anything, then open the store
    t0 = time.perf_counter()
    renderer = Renderer.from_job(job)
    store = ShardStore(out, job, overwrite=overwrite, metadata=run_metadata(job, renderer.c.scheduler_config))
    summary.load_s = time.perf_counter() - t0
    # 3. render
    bar = tqdm(total=sum(len(s.rows) for s in todo), unit="frame", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    t1 = time.perf_counter()
    summary.results = LocalExecutor(renderer).run(job, todo, store, progress=bar.update)
    bar.close()
    summary.render_s = time.perf_counter() - t1
    return summary

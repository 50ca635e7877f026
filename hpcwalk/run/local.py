"""Executors run shards; every executor calls the same `render_shard(renderer, job, shard, store)`.

`LocalExecutor` renders in this process (the default: no start-up cost for one GPU or a laptop).
`RayExecutor` (hpcwalk/run/ray.py, Ray imported only when used) spreads shards over a pool of
Ray actors across GPUs and nodes. Both have the same life cycle, driven by `run_render`:

    start(job) -> scheduler config   load the models (workers ready) before anything is written
    run(job, shards, store, ...)     render the shards; one ShardResult per shard, never raises per shard
    close()                          release workers

A shard is the unit of work, of retry and of output: one Parquet file and one commit marker, written
by whoever rendered it. Only `ShardResult`s (a few numbers) travel back to the driver.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from hpcwalk.core import interrupt
from hpcwalk.core.fsio import filesystem
from hpcwalk.job.spec import RenderJob, Shard
from hpcwalk.render.engine import Renderer
from hpcwalk.run import evenpace
from hpcwalk.run.base import (
    EncodePool,
    ProgressFn,
    RendererFactory,
    ShardResult,
    bind_run,
    commit_shard,
    render_rows,
)
from hpcwalk.run.options import ExecutorOptions
from hpcwalk.run.endpoints import check_settings, describe, invert_missing, prepare, write_index
from hpcwalk.store.reader import verify_run
from hpcwalk.store.runfolder import rewrite_damaged_run_json
from hpcwalk.store.runlock import RunLock
from hpcwalk.store.schema import run_metadata
from hpcwalk.store.verify import DEFAULT_LEVEL, NOT_OURS, RunWarning, VerifyLevel, quarantine, repair
from hpcwalk.store.writer import ShardStore

# ---------------------------------------------------------------------------------------------
# 1. Executors (what they share, one shard's render and commit and the options, is in executor_base)
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

    def call(self, fn: Callable[..., Any], *args: Any) -> Any: ...

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

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(renderer, *args) with this executor's Renderer (after `start`): work done once per run."""
        return fn(self.renderer, *args)

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

        bind_run(self.renderer, job, store)
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
    from hpcwalk.run.ray import RayExecutor

    return RayExecutor(options, factory)


# ---------------------------------------------------------------------------------------------
# 2. The run: summary, progress, entry point
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
    damaged: list[str] = field(default_factory=list)  # committed shards that failed verification: rendered again
    notes: list[str] = field(default_factory=list)  # image endpoints and even pacing: one line each

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
        if self.damaged:
            lines.append(f"{len(self.damaged)} damaged shards were rendered again: {'; '.join(self.damaged)}")
        lines += self.notes
        if self.results:
            lines.append(f"executor {self.executor}: {len(self.worker_lines())} workers, {self.retries} retries")
            lines += self.worker_lines()
        lines.append(f"frames: {self.out}")
        return "\n".join(lines)


class RunProgress:
    """The driver's one progress bar: frames, frames/s and ETA (tqdm), workers alive and retries."""

    def __init__(self, total: int, executor: Executor, enabled: bool = True):
        self.executor = executor
        self.failed = 0
        self.bar = None  # disabled: no tqdm at all, whose lock is shared with forked processes (one killed holding
        if enabled:  # it would hang this one)
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="frame", dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

    def frames(self, n: int) -> None:
        """Count `n` rendered frames (0 only refreshes workers and retries)."""
        if self.bar is None:
            return
        self.bar.set_postfix(workers=self.executor.workers_alive, retries=self.executor.retries,
                             failed=self.failed, refresh=False)
        self.bar.update(n)

    def shard_done(self, r: ShardResult) -> None:
        self.failed += r.status == "failed"
        self.frames(0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_render(job: RenderJob, out: str, shards: Sequence[Shard], overwrite: bool = False,
               progress: bool = True, executor: ExecutorOptions | None = None,
               factory: RendererFactory | None = None, verify: VerifyLevel = DEFAULT_LEVEL) -> RunSummary:
    """Render the shards of `job` not yet committed in `out`, locally or on Ray (`executor`).

    A committed shard counts only when it passes verification at level `verify` (quick: size, full:
    sha256); one that does not is named (a RunWarning) and rendered again. One driver per folder: a
    live driver's lock refuses this one (RunLocked); a stale lock is taken over with a RunWarning."""
    ex = make_executor(executor, factory)  # options are checked before anything else
    lock = RunLock(out)
    with interrupt.reporting(lambda: committed_line(out, shards)):  # SIGTERM/SIGINT: what the stop line says
        return _run(job, out, shards, overwrite, progress, ex, lock, verify)


def committed_line(out: str, shards: Sequence[Shard]) -> str:
    """How much of the plan is committed in `out` (quick check: marker and size), for a stopped run's line."""
    planned = {s.index for s in shards}
    done = verify_run(out, "quick").indices & planned if os.path.isdir(out) or "://" in out else set()
    return f"{len(done)} of {len(planned)} shards committed in {out}"


def _run(job: RenderJob, out: str, shards: Sequence[Shard], overwrite: bool, progress: bool, ex: Executor,
         lock: RunLock, verify: VerifyLevel) -> RunSummary:
    try:
        # 1. one driver per run folder: an existing folder is locked first (a new one once it is created)
        if lock.folder_exists():
            lock.acquire()
            if not overwrite:
                rewrite_damaged_run_json(out, job)  # a damaged run.json, when the shards prove this job's
        # 2. what is left: committed shards verified against their markers; damaged ones render again
        todo, summary = _left_to_render(out, job, shards, overwrite, verify, ex.name, lock.held)
        if not todo:
            return summary
        try:
            # 3. read the images walks' files (before the minutes of model loading), load the model on every
            #    worker before writing anything, then lock a new folder, open the store
            inputs = prepare(job)
            t0 = time.perf_counter()
            scheduler_config = ex.start(job)
            if inputs is not None:
                ex.call(check_settings, job)
            if not lock.held:
                lock.acquire(create=True)
            store = ShardStore(out, job, overwrite=overwrite, metadata=run_metadata(job, scheduler_config))
            # 4. image endpoints: inverted once, on one worker, before any shard (cached in RUN/inversions)
            if inputs is not None:
                uri = store.location
                records = ex.call(invert_missing, job, uri, inputs)
                write_index(out, records)
                summary.notes += describe(records)
            summary.load_s = time.perf_counter() - t0
            # 5. render, one bar for the whole run: stage 0, then the final rows placed from it (even pacing)
            bar = RunProgress(sum(len(s.rows) for s in todo), ex, enabled=progress)
            t1 = time.perf_counter()
            try:
                summary.results = ex.run(job, [s for s in todo if not _stage(s)], store, progress=bar.frames,
                                         on_result=bar.shard_done)
                late = [s for s in todo if _stage(s)]
                if late or evenpace.even_walks(job):
                    summary.results += _final_pass(job, out, shards, late, store, ex, bar, verify, summary)
            finally:
                bar.close()
            summary.render_s = time.perf_counter() - t1
            summary.retries, summary.worker_labels = ex.retries, ex.worker_labels()
        finally:
            ex.close()
    finally:
        lock.release()
    return summary


def _stage(s: Shard) -> int:
    return s.rows[0].stage if s.rows else 0


def _final_pass(job: RenderJob, out: str, shards: Sequence[Shard], late: list[Shard], store: ShardStore, ex: Executor,
                bar: "RunProgress", verify: VerifyLevel, summary: RunSummary) -> list[ShardResult]:
    """Even pacing's second pass: place the final rows from the committed coarse pass (RUN/pacing), render
    them; shards whose coarse pass is incomplete fail with the reason (a rerun renders them)."""
    placed = evenpace.place_final(job, out, shards, late, verify)
    summary.notes += placed.lines
    results = ex.run(job, placed.ready, store, progress=bar.frames, on_result=bar.shard_done)
    for s in late:
        if s.index in placed.waiting:
            results.append(ShardResult(s.index, "failed", len(s.rows), 0.0, placed.waiting[s.index], ex.name))
            bar.shard_done(results[-1])
    rendered = {r.shard for r in results if r.status == "committed"}
    summary.notes += evenpace.measure_after(job, out, shards, rendered, verify)
    return results


def _left_to_render(out: str, job: RenderJob, shards: Sequence[Shard], overwrite: bool, verify: VerifyLevel,
                    executor: str, locked: bool) -> tuple[list[Shard], RunSummary]:
    """The shards to render (all with overwrite; else those not committed or not passing verification against
    their markers and the plan). Holding the lock, stray temporary files are a killed writer's leftovers: they
    are removed; what is not this run's own (another job's shard, a copy, one the plan does not have, a folder
    where a shard belongs) is moved into quarantine/ with a warning, never written over."""
    planned = {s.index for s in shards}
    done: set[int] = set()
    damaged: list[str] = []
    if not overwrite:
        checked = verify_run(out, verify, job=job)
        done = checked.indices & planned
        for c in checked.damaged:
            if c.index in planned and (c.marker is not None or c.state in NOT_OURS):  # committed once: say so
                damaged.append(c.describe())
                warnings.warn(RunWarning(f"{c.describe()}: rendering it again"), stacklevel=3)
        if locked:
            fs, root = filesystem(out)
            repair(fs, [c for c in checked.checks if c.state == "stray temp file"])
            for path in quarantine(fs, root, checked.checks):
                warnings.warn(RunWarning(f"moved {path.rpartition('/')[2]} into {out}/quarantine/: it is not this "
                                         "run's own (hpcwalk verify said why); delete it there once you are sure"),
                              stacklevel=3)
    todo = [s for s in shards if s.index not in done]
    return todo, RunSummary(out, already_committed=len(done), total_shards=len(shards), executor=executor,
                            damaged=damaged)

"""`RayExecutor`: shards pulled by a pool of Ray actors across GPUs and nodes, one Renderer per actor.

Each actor (`RenderWorker`) loads the model once in `__init__` and then renders one shard at a time
with the same `render_shard` the local executor calls, writing the shard's Parquet file and commit
marker itself to the output filesystem; only a `ShardResult` comes back to the driver.

Why `ray.util.ActorPool` and not Ray Data: a shard is already our unit of work, output and retry,
and a worker writes its own file, so there are no blocks to stream back. ActorPool gives dynamic
pulling as it is (a shard goes to whichever actor frees up first, so a slow GPU takes fewer
shards), drops actors that died, and accepts replacements (`push`). Failures stay visible per shard,
which lets the driver count retries, bound them and name the shard that failed; Ray Data would
retry inside its executor, fail the whole dataset on an error it cannot attribute, and reserve
CPUs for its own operators.

Faults: actors run with `max_restarts=0, max_task_retries=0`, so a worker that dies (killed, OOM,
node lost) surfaces at once as an ActorDiedError. The driver then starts a replacement actor
(bounded), and hands the shard back to the pool, where the next free worker takes it, up to
`max_retries` times. With `shard_timeout_s`, a worker whose shard runs longer is taken as hung: the
driver kills it (`ray.kill`), and from there it is a dead worker like any other. An error inside
`render_shard` (NaN guard, bad input, write error) is a
failed result: reported with its shard id, never retried. Writes are idempotent (one file name
per shard, temporary name + rename, then marker), so a retried shard cannot duplicate frames.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict, deque
from typing import Any, Callable, Sequence

from hpcwalk.core import interrupt
from hpcwalk.core.errors import first_line
from hpcwalk.job.spec import RenderJob, Shard
from hpcwalk.run.base import (
    ProgressFn,
    RendererFactory,
    ShardResult,
)
from hpcwalk.run.options import RAY_DEFAULT, ExecutorError, ExecutorOptions, check_reachable  # noqa: F401
from hpcwalk.run.rayworker import RenderWorker, WorkerInfo, WorkerPlan, plan_workers, worker_job
from hpcwalk.store.writer import ShardStore

# ---------------------------------------------------------------------------------------------
# The executor: connect, start workers, run the pool, close
# ---------------------------------------------------------------------------------------------


class RayExecutor:
    """Runs shards on a pool of RenderWorker actors: dynamic pulling, bounded retries, replacements."""

    name = "ray"

    def __init__(self, options: ExecutorOptions, factory: RendererFactory | None = None):
        from hpcwalk.render.engine import Renderer

        self.options = options.check()
        self.factory = factory or Renderer.from_job
        self.retries = 0
        self.plan: WorkerPlan | None = None
        self.workers: dict[str, WorkerInfo] = {}  # live, ready workers by name
        self.dead: dict[str, WorkerInfo] = {}
        self._handles: dict[str, Any] = {}  # name -> actor handle (live or starting)
        self._names: dict[int, str] = {}  # id(handle) -> name
        self._starting: dict[Any, str] = {}  # ready() ref -> name
        self._running: dict[str, tuple[Shard, float]] = {}  # actor id -> (shard in flight, monotonic time handed out)
        self._timed_out: dict[str, float] = {}  # actor id -> seconds its shard ran before the worker was killed
        self._next_id = 0
        self._replacements_left = 0
        self._owns_ray = False
        self._actor_cls: Any = None
        self._job: RenderJob | None = None
        self._scheduler_config: dict[str, Any] | None = None

    @property
    def workers_alive(self) -> int:
        return len(self.workers)

    def worker_labels(self) -> dict[str, str]:
        return {n: i.label() for n, i in {**self.dead, **self.workers}.items()}

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(renderer, *args) on the first live worker, waited for (after `start`). A worker that dies
        meanwhile stops the run with ExecutorError (nothing is half-written: the work stores atomically)."""
        import ray

        name = min(self.workers, key=lambda n: (len(n), n))
        try:
            return ray.get(self._handles[name].call.remote(fn, *args))
        except ray.exceptions.RayActorError as e:
            raise ExecutorError(f"worker {name} died while preparing the run ({first_line(e)}): rerun the command") from None
        except ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None

    def running(self) -> dict[str, int]:
        """Worker name -> index of the shard it is rendering now."""
        by_id = {i.actor_id: n for n, i in self.workers.items()}
        return {by_id[a]: s.index for a, (s, _) in self._running.items() if a in by_id}

    # -- start -----------------------------------------------------------------------------------

    def start(self, job: RenderJob) -> dict[str, Any]:
        """Connect to Ray, size the pool, start every worker and wait until each has loaded the model."""
        if self._scheduler_config is not None:
            return self._scheduler_config
        import ray

        # 1. connect to the cluster (or start a local instance)
        self._connect()
        # 2. size the pool from the cluster's resources
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.plan = plan_workers(self.options, job.render.device, ray.cluster_resources().get("GPU", 0.0),
                                 [n["Resources"].get("CPU", 0.0) for n in nodes])
        self._job = worker_job(job, self.plan)
        self._replacements_left = self.plan.count * max(1, self.options.max_retries)
        # 3. start the workers; none may fail (a bad model fails here, before anything is written)
        for _ in range(self.plan.count):
            self._spawn()
        deadline = time.monotonic() + self.options.start_timeout_s
        while self._starting:
            ready, _ = ray.wait(list(self._starting), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise ExecutorError(
                    f"{len(self._starting)} of {self.plan.count} workers did not start within "
                    f"{self.options.start_timeout_s:.0f} s ({self.plan.describe()} asked of a cluster with "
                    f"{_resources(ray.cluster_resources())}): lower --workers or free resources")
            info = self._admit(ready[0])
            if info.error:
                raise ExecutorError(f"worker {info.name} on {info.host} could not load the model: {info.error}")
        self._scheduler_config = next(iter(self.workers.values())).scheduler_config
        return self._scheduler_config

    def _connect(self) -> None:
        import ray

        if ray.is_initialized():  # a session the caller opened (tests, notebooks): used as it is
            return
        addr = self.options.ray
        check_reachable(addr)
        try:
            ray.init(address=None if addr == RAY_DEFAULT else addr, include_dashboard=False,
                     logging_level="WARNING")
        except (ConnectionError, ValueError, RuntimeError) as e:
            if _auth_failure(e):
                mode = os.environ.get("RAY_AUTH_MODE", "") or "unset"
                raise ExecutorError(
                    f"cannot connect to Ray ({addr}): the cluster refused this driver's authentication token "
                    f"(RAY_AUTH_MODE is {mode}); Ray 2.59+ starts clusters with token authentication: export "
                    "RAY_AUTH_MODE=token here and give it the head's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or "
                    "~/.ray/auth_token; `ray get-auth-token` on the head prints it)") from None
            raise ExecutorError(f"cannot connect to Ray ({addr}): {str(e).splitlines()[0]}; start a head with "
                                "`ray start --head`, or fix --ray") from None
        finally:
            interrupt.install()  # ray.init replaces the SIGTERM handler (sys.exit): ours stops at a safe point
        self._owns_ray = True

    def _spawn(self) -> None:
        import ray

        name = f"w{self._next_id}"
        self._next_id += 1
        opts: dict[str, Any] = {"num_gpus": self.plan.num_gpus, "max_restarts": 0, "max_task_retries": 0}
        if self.plan.num_cpus is not None:
            opts["num_cpus"] = self.plan.num_cpus
        if self._actor_cls is None:
            self._actor_cls = ray.remote(RenderWorker)
        handle = self._actor_cls.options(**opts).remote(self._job, self.factory, name, self.plan.num_cpus)
        self._handles[name] = handle
        self._names[id(handle)] = name
        self._starting[handle.ready.remote()] = name

    def _admit(self, ref: Any) -> WorkerInfo:
        """A started worker reported in: record it (or, if it died while starting, note that)."""
        import ray

        name = self._starting.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as e:
            info = WorkerInfo(name, "", 0, "?", (), "", "", error=f"{type(e).__name__}: {first_line(e)}")
        (self.dead if info.error else self.workers)[name] = info
        return info

    # -- run -------------------------------------------------------------------------------------

    def run(self, job: RenderJob, shards: Sequence[Shard], store: ShardStore, progress: ProgressFn | None = None,
            on_result: Callable[[ShardResult], None] | None = None) -> list[ShardResult]:
        """Hand each shard to whichever worker frees up first; retry shards whose worker died."""
        import ray
        from ray.util import ActorPool

        self.start(job)
        uri = store.location  # workers do not share our cwd
        attempts: dict[int, int] = defaultdict(int)
        results: dict[int, ShardResult] = {}

        def submit(handle: Any, shard: Shard) -> Any:  # the pool calls this when `handle` is free
            attempts[shard.index] += 1
            actor_id = self.workers[self._names[id(handle)]].actor_id
            self._running[actor_id] = (shard, time.monotonic())
            return handle.render.remote(shard, uri)

        def record(r: ShardResult) -> None:
            r.attempts = max(attempts[r.shard], 1)
            results[r.shard] = r
            if progress:
                progress(r.rows if r.status == "committed" else 0)
            if on_result:
                on_result(r)

        pool = ActorPool([self._handles[n] for n in self.workers])
        queue = deque(shards)  # handed to the pool only as workers free up; a retried shard goes first
        while len(results) < len(shards):
            ready = ray.wait(list(self._starting), num_returns=len(self._starting), timeout=0)[0] if self._starting else []
            for ref in ready:
                info = self._admit(ref)
                if not info.error:  # a replacement finished loading: it joins the pool
                    pool.push(self._handles[info.name])
            while queue and pool.has_free():
                pool.submit(submit, queue.popleft())
            if not pool.has_next():  # nothing in flight: every worker is dead or still starting
                if not self._starting or not ray.wait(list(self._starting), timeout=self.options.start_timeout_s)[0]:
                    break
                continue
            try:
                poll = self._starting or self.options.shard_timeout_s is not None
                r = pool.get_next_unordered(timeout=1.0 if poll else None)
            except TimeoutError:
                self._kill_overdue()
                continue
            except ray.exceptions.RayActorError as e:
                hung = self._timed_out.pop(getattr(e, "actor_id", None) or "", None)
                shard, who = self._lost(e)
                host = (self.dead.get(who) or self.workers[who]).host
                if attempts[shard.index] <= self.options.max_retries:
                    self.retries += 1
                    queue.appendleft(shard)
                    if progress:
                        progress(0)
                    continue
                why = (f"still rendering after {hung:.0f} s (--shard-timeout {self.options.shard_timeout_s:g}), "
                       f"{attempts[shard.index]} times (last: {who} on {host}, killed)") if hung is not None else (
                       f"worker died {attempts[shard.index]} times rendering it (last: {who} on {host}): {first_line(e)}")
                r = ShardResult(shard.index, "failed", len(shard.rows), 0.0, why, who)
            else:
                actor_id = self.workers[r.worker].actor_id
                if actor_id in self._running and self._running[actor_id][0].index == r.shard:
                    del self._running[actor_id]
            record(r)
        for s in shards:  # left only when no worker is alive and none could be started
            if s.index not in results:
                record(ShardResult(s.index, "failed", len(s.rows), 0.0,
                                   f"no live worker: {len(self.dead)} died and no replacement could start", ""))
        return [results[s.index] for s in shards]

    def _kill_overdue(self) -> None:
        """Kill each worker whose shard has run past --shard-timeout; its pending result then fails as a
        dead worker's does (ActorDiedError), so the shard is retried elsewhere and a replacement starts."""
        import ray

        limit = self.options.shard_timeout_s
        if limit is None:
            return
        now = time.monotonic()
        for actor_id, (_, since) in list(self._running.items()):
            if actor_id not in self._timed_out and now - since > limit:
                name = self._name_of(actor_id)
                if name is not None and name in self._handles:
                    self._timed_out[actor_id] = now - since
                    ray.kill(self._handles[name], no_restart=True)

    def _name_of(self, actor_id: str | None) -> str | None:
        """The name of the live worker with this actor id (None if it is not one)."""
        return next((n for n, i in self.workers.items() if i.actor_id == actor_id), None)

    def _lost(self, e: Exception) -> tuple[Shard, str]:
        """The worker behind `e` died: retire it, start a replacement (bounded); return its shard and name."""
        import ray

        actor_id = getattr(e, "actor_id", None)
        shard = self._running.pop(actor_id, (None, 0.0))[0] if actor_id else None
        name = self._name_of(actor_id)
        if shard is None or name is None:
            raise RuntimeError(f"a Ray worker failed and its shard cannot be told: {first_line(e)}") from e
        if isinstance(e, ray.exceptions.ActorDiedError):  # gone for good (not just unreachable for a moment)
            self.dead[name] = self.workers.pop(name)
            self._handles.pop(name, None)
            if self._replacements_left > 0:
                self._replacements_left -= 1
                self._spawn()
        return shard, name

    # -- close -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every worker; shut Ray down if this executor started or connected it."""
        import ray

        if not ray.is_initialized():
            return
        for h in self._handles.values():
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # already dead: nothing to release
                pass
        self._handles.clear()
        self._starting.clear()
        self.workers.clear()
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False


def _auth_failure(e: BaseException) -> bool:
    """True when a failed ray.init was refused for its token (the reason sits in the chained errors)."""
    seen: BaseException | None = e
    while seen is not None:
        text = f"{type(seen).__name__} {seen}"
        if "AuthenticationError" in text or "InvalidAuthToken" in text or "Unauthenticated" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _resources(res: dict[str, float]) -> str:
    return ", ".join(f"{res[k]:g} {k}" for k in ("CPU", "GPU") if k in res) or "no CPUs or GPUs"


"""The executor options (--ray, --workers, --retries, ...): checked before any work, without torch, so a bad
flag or job file is one line before the heavy imports (hpcwalk/run/base.py re-exports them)."""

from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass

from hpcwalk.core.errors import HpcwalkError


class ExecutorError(HpcwalkError, ValueError):
    """Executor options or the cluster cannot run this job; the message names the fix."""


MAX_WORKERS = 100_000  # --workers (one driver sustains about 330-400 shards/s: README "Scaling")
MAX_RETRIES = 100  # --retries
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
        if self.workers is not None and self.workers > MAX_WORKERS:
            raise ExecutorError(f"--workers must be <= {MAX_WORKERS:,}, got {self.workers:,}")
        g = self.gpus_per_worker
        if g is not None and (not math.isfinite(g) or g <= 0 or g > 64 or (g > 1 and g != int(g))):
            raise ExecutorError(f"--gpus-per-worker must be a fraction in (0, 1] or a whole number up to 64, got {g:g}")
        if self.max_retries < 0:
            raise ExecutorError(f"--retries must be >= 0, got {self.max_retries}")
        if self.max_retries > MAX_RETRIES:
            raise ExecutorError(f"--retries must be <= {MAX_RETRIES}, got {self.max_retries:,}")
        if self.shard_timeout_s is not None:
            if self.ray is None:
                raise ExecutorError("--shard-timeout needs --ray: a hung render in this process cannot be stopped "
                                    "safely; run with --ray (a local Ray instance works) or drop --shard-timeout")
            if not self.shard_timeout_s > 0:
                raise ExecutorError(f"--shard-timeout must be > 0 seconds, got {self.shard_timeout_s:g}")
            if not math.isfinite(self.shard_timeout_s):
                raise ExecutorError("--shard-timeout must be a finite number of seconds (omit it for no limit)")
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


def check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast (ExecutorError) when nothing listens at the head's HOST:PORT: ray.init would retry for minutes."""
    if address in (RAY_DEFAULT, "auto"):
        address = os.environ.get("RAY_ADDRESS", "")
    m = ADDRESS_RE.fullmatch(address or "")
    if not m:  # no address to probe: a local instance, or Ray's own lookup
        return
    host, port = m.group(2), int(m.group(3))
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise ExecutorError(f"cannot reach the Ray head at {address} ({e.strerror or e}): start it with "
                            "`ray start --head` on that host, or fix --ray") from None

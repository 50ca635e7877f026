"""One driver per run folder: a lock file `RUN/.hpcwalk.lock` naming the host, pid and start time.

    with RunLock(out).hold():        # raises RunLocked when another live driver holds it
        ...render...

On a local or shared filesystem the lock's content is written to a file beside it and hard-linked into
place (link fails when the name exists), so of two drivers starting at once exactly one gets it, and a
driver killed at any moment leaves either a whole lock or none (filesystems without hard links: an
O_CREAT | O_EXCL create, then the write). The holder refreshes the file's mtime every `HEARTBEAT_S` seconds. A lock
is stale, and is taken over with a `RunWarning` saying whose it was, when
  - it names this host and its pid is no longer running (or the pid now belongs to another process:
    the process start time recorded beside the pid differs), or
  - it names another host and its heartbeat is older than `STALE_AFTER_S` (10 minutes): that
    driver died without removing it, or cannot reach the folder any more.
  - it records a `slurm_job_id` (from $SLURM_JOB_ID when the driver ran under SLURM) equal to this
    process's $SLURM_JOB_ID and a lower `slurm_restart_count` ($SLURM_RESTART_COUNT, 0 when unset): the
    job was requeued and this is its next run. With an equal count it is another driver of the same run
    of the job (two `hpcwalk render` in one allocation): judged by the rules above, so a live one refuses.
A driver stopped by SIGTERM or SIGINT removes its lock on the way out (hpcwalk/core/interrupt.py).
A lock whose fields have the wrong types, or a folder where the lock goes, is unreadable: refused for
`UNREADABLE_GRACE_S` after its last change, then taken over (`valid_holder`).
A takeover renames the stale file away first (one rename wins), so two drivers cannot both take it.

Object stores (s3://, gs://) have no exclusive create: there the lock is advisory (checked, then
written; two drivers started within the same second can both pass). What still holds there: one file
name per shard, whole-object writes and markers checked against their checksum, so a shard written
twice is still whole and counted once, and a marker that does not match its file is re-rendered.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import platform
import shutil
import sys
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import pyarrow.fs as pafs

from hpcwalk.core import interrupt
from hpcwalk.core.errors import StoreError
from hpcwalk.core.fsio import filesystem
from hpcwalk.store.verify import LOCK_NAME, RunWarning, parse_json_object

HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
NEW_SUFFIX = ".new-"  # RUN/.hpcwalk.lock.new-XXXXXXXX: a lock's content before it is linked into place
UNREADABLE_GRACE_S = 10.0  # an empty or unreadable lock younger than this is taken as being written


class RunLocked(StoreError):
    """Another live driver holds the run folder's lock; the message names it."""


class RunLock:
    """The lock of one run folder (local path or pyarrow.fs URI)."""

    def __init__(self, uri: str, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S):
        self.uri = uri
        self.fs, self.root = filesystem(uri)
        self.path = f"{self.root}/{LOCK_NAME}"
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.held = False
        self.info: dict[str, Any] = {}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- the life cycle ------------------------------------------------------------------------

    def folder_exists(self) -> bool:
        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def acquire(self, create: bool = False) -> None:
        """Take the lock (creating the folder when `create`); RunLocked when a live driver holds it. A SIGTERM
        or SIGINT meanwhile (Interrupted) is raised once the lock is taken, and the lock released again: it
        is held after acquire returns, or not at all."""
        if self.held:
            return
        try:
            with interrupt.deferred():
                self._acquire(create)
        except interrupt.Interrupted:
            self.release()
            raise

    def _acquire(self, create: bool) -> None:
        if create:
            self.fs.create_dir(self.root, recursive=True)
        self.info = _my_info()
        for _ in range(5):  # each pass either creates the lock, refuses, or removes a stale one and retries
            if self._create():
                self.held = True
                interrupt.cleanup(self, self.abandon)  # a stopped command removes it even where no finally reaches
                self._sweep()
                self._start_heartbeat()
                return
            holder, age = self.read()
            why = self.stale_reason(holder, age)
            if why is None:
                raise RunLocked(f"{self.uri!r} is being rendered by {describe(holder)} (lock {self.path}): "
                                "refusing to start a second driver; wait for it to finish (a rerun then renders only "
                                "what is left), or stop it first")
            if self._remove_stale(holder):
                warnings.warn(RunWarning(f"took over the lock of {self.uri!r} from {describe(holder)}: {why}"),
                              stacklevel=2)
        raise RunLocked(f"could not take the lock {self.path}: other drivers keep taking it; try again")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        if not self.held:
            return
        with interrupt.deferred():
            self._stop.set()
            if self._beat is not None:
                self._beat.join(5)
            self.abandon()

    def abandon(self) -> None:
        """Remove the lock file if it is still ours, without waiting for the heartbeat thread (which finds it
        gone); what a second signal, stopping at once, does."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        interrupt.cleanup(self, None)
        holder, _ = self.read()
        if holder is not None and _same(holder, self.info):
            try:
                self.fs.delete_file(self.path)
            except FileNotFoundError:
                pass

    @contextmanager
    def hold(self, create: bool = False) -> Iterator["RunLock"]:
        self.acquire(create)
        try:
            yield self
        finally:
            self.release()

    # -- reading and judging a lock ----------------------------------------------------------------

    def read(self) -> tuple[dict[str, Any] | None, float | None]:
        """(holder info or None when unreadable, seconds since its last heartbeat); (None, None) when absent.
        A lock whose fields have the wrong types (pid null or "abc", started_at "yesterday", numbers out
        of range), or a lock path that is a folder, is unreadable: refused while young, then taken over."""
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            return None, None
        age = max(0.0, time.time() - info.mtime.timestamp()) if info.mtime else 0.0
        if info.type != pafs.FileType.File:  # a folder (or another kind of entry) where the lock goes
            return None, age
        try:
            with self.fs.open_input_stream(self.path) as f:
                return valid_holder(parse_json_object(f.read())[0]), age  # not a JSON object: unreadable
        except OSError:
            return None, age

    def live_holder(self) -> dict[str, Any] | None:
        """The holder when a live driver holds the lock (not us), else None. Writes nothing."""
        holder, age = self.read()
        if age is None or self.held or self.stale_reason(holder, age) is not None:
            return None
        return holder or {}

    def stale_reason(self, holder: dict[str, Any] | None, age: float | None) -> str | None:
        """Why this lock is stale, or None when its driver may still be alive."""
        if age is None:
            return "it is gone"
        if holder is None:
            return f"the lock file is unreadable and {age:.0f} s old" if age > UNREADABLE_GRACE_S else None
        slurm = os.environ.get("SLURM_JOB_ID")
        if slurm and holder.get("slurm_job_id") == slurm:  # this job's run before it was requeued: it is gone
            theirs, mine = holder.get("slurm_restart_count", 0), _restart_count()
            if theirs < mine:  # (an equal count is a sibling driver in the same run of the job: judged below)
                return (f"it was written by this SLURM job ({slurm}) before it was requeued (restart count "
                        f"{theirs}, now {mine})")
        if holder.get("host") == platform.node():
            pid = holder["pid"]
            if not _pid_alive(pid):
                return f"pid {pid} is no longer running on this host"
            start = _pid_start(pid)
            if holder.get("pid_start") is not None and start is not None and start != holder["pid_start"]:
                return f"pid {pid} now belongs to another process"
            return None
        if age > self.stale_after_s:
            return f"no heartbeat from {holder.get('host')} for {age:.0f} s (stale after {self.stale_after_s:.0f} s)"
        return None

    # -- internals -------------------------------------------------------------------------------

    def _create(self) -> bool:
        data = json.dumps(self.info).encode()
        if self.local:  # written beside, then hard-linked into place: the lock appears whole or not at all
            new = f"{self.path}{NEW_SUFFIX}{uuid.uuid4().hex[:8]}"
            fd = os.open(new, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.link(new, self.path)
            except (FileExistsError, FileNotFoundError):  # another driver holds it (or swept our file): lost
                return False
            except OSError as e:  # a filesystem without hard links: create it in place
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                return self._create_in_place(data)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(new)
            return True
        if self.fs.get_file_info(self.path).type == pafs.FileType.File:  # object store: advisory
            return False
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)
        return True

    def _create_in_place(self, data: bytes) -> bool:
        """O_EXCL create, then write: a driver killed in between leaves an empty lock (refused for
        UNREADABLE_GRACE_S, then taken over)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _sweep(self) -> None:
        """Remove the lock-content files that drivers killed before linking them left (we hold the lock: a
        driver writing one now finds it gone and stops, as it would on finding our lock)."""
        if not self.local:
            return
        prefix = os.path.basename(self.path) + NEW_SUFFIX
        for name in os.listdir(self.root):
            if name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.root, name))

    def _remove_stale(self, holder: dict[str, Any] | None) -> bool:
        """Move the stale lock away; True when it was the one judged (not a fresh lock taken meanwhile)."""
        if not self.local:
            self.fs.delete_file(self.path)
            return True
        grave = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:  # another driver removed it first; try to create ours
            return False
        if os.path.isdir(grave):  # a folder where the lock goes, judged stale: removed like a stale lock
            shutil.rmtree(grave, ignore_errors=True)
            return holder is None
        try:
            with open(grave, "rb") as f:
                moved = valid_holder(parse_json_object(f.read())[0])
        except OSError:
            moved = None
        if holder is not None and (moved is None or not _same(moved, holder)):
            try:  # we moved a live driver's fresh lock: give it back, unless yet another appeared
                os.link(grave, self.path)
            except FileExistsError:
                pass
            os.unlink(grave)
            return False
        os.unlink(grave)
        return True

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="hpcwalk-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self.local:
                    os.utime(self.path)
                else:
                    with self.fs.open_output_stream(self.path) as f:
                        f.write(json.dumps(self.info).encode())
            except OSError:  # the folder went away or is unreachable for a moment: the next beat retries
                pass


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another driver (its lock file is being written or cannot be read)"
    try:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started_at", 0))))
    except (TypeError, ValueError, OverflowError, OSError):
        started = "at an unknown time"
    return f"pid {holder.get('pid')} on {holder.get('host')} (started {started})"


_MAX_PID = 2**31 - 1  # pid_t (Linux allows at most 2**22)
_MAX_TIME = 1e11  # seconds since 1970: the year 5138


def valid_holder(holder: dict[str, Any] | None) -> dict[str, Any] | None:
    """The lock's holder when its fields have their types and ranges, else None (an unreadable lock):
    host a string, pid an int in 1..2**31-1, started_at a finite number of seconds in 0..1e11, pid_start
    an int or null, token a string, slurm_job_id (when there) a string, slurm_restart_count (when there) an
    int in 0..10**9-1."""
    if holder is None:
        return None
    pid, started, pid_start = holder.get("pid"), holder.get("started_at"), holder.get("pid_start")
    ok = (isinstance(holder.get("host"), str) and type(pid) is int and 0 < pid <= _MAX_PID
          and type(started) in (int, float) and math.isfinite(started) and 0 <= started <= _MAX_TIME
          and (pid_start is None or type(pid_start) is int) and isinstance(holder.get("token"), str)
          and isinstance(holder.get("slurm_job_id", ""), str)
          and type(holder.get("slurm_restart_count", 0)) is int and 0 <= holder.get("slurm_restart_count", 0) < 10**9)
    return holder if ok else None


def _my_info() -> dict[str, Any]:
    pid = os.getpid()
    info = {"host": platform.node(), "pid": pid, "pid_start": _pid_start(pid), "started_at": time.time(),
            "token": uuid.uuid4().hex, "command": " ".join(sys.argv)[:300]}
    if os.environ.get("SLURM_JOB_ID"):  # a requeued job's next run takes its own lock over at once
        info["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        info["slurm_restart_count"] = _restart_count()
    return info


def _restart_count() -> int:
    """$SLURM_RESTART_COUNT: how many times SLURM has requeued this job (unset before the first requeue: 0)."""
    value = os.environ.get("SLURM_RESTART_COUNT", "").strip()
    return int(value) if value.isdigit() and len(value) < 10 else 0


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("token") == b.get("token") and a.get("pid") == b.get("pid")


def _pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, killed and not yet reaped, counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return _proc_stat(pid)[:1] != ["Z"]


def _proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state first (Linux); [] elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().decode(errors="replace").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _pid_start(pid: int) -> int | None:
    """The process start time in clock ticks since boot (Linux /proc), to tell a reused pid; None elsewhere."""
    fields = _proc_stat(pid)
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None  # field 22 of stat

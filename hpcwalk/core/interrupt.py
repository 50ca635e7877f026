"""SIGTERM (a SLURM time limit, `kill`) and SIGINT (Ctrl-C) stop a command at a safe point.

    with handling():                      # the command line, around every command (hpcwalk/cli/common.py)
        with reporting(lambda: "3 of 5 shards committed in RUN"):   # what the stop line says is committed
            ...
            with deferred():              # a few steps that must finish once begun (taking the lock, a
                ...                       # score shard's file and its marker, a repair's removals)

While `handling` is active, the first SIGTERM or SIGINT raises `Interrupted(signum)` in the main thread at
once, or when the outermost `deferred` block ends. Nothing is half-written by that: every file is written
under a temporary name and renamed (the temporary file is removed on the way out), and a shard being
committed on a background thread finishes its commit while the executor shuts down. The callers' `finally`
blocks and context managers release what they hold (the run lock); `cleanup` registers what must be
released even where no `finally` reaches (a lock taken but not yet inside its `try`).

`Interrupted` derives from BaseException, as KeyboardInterrupt does, so the per-shard `except Exception`
handlers do not take it for a failed shard. A second signal while stopping stops at once: the registered
cleanups run (removing the lock), one line is printed, and the process exits 128 + signum.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived while a command ran; `state()` says what is committed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.states: list[Callable[[], str]] = []  # innermost first, added as the exception leaves `reporting`

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 143 for SIGTERM, 130 for SIGINT, as a shell reports a process they killed

    def state(self, default: str = "stopped before it finished; no file is left half-written") -> str:
        """The innermost `reporting` description (evaluated now, after the callers have released what they
        held); `default` when none was given or it fails."""
        for fn in self.states:
            try:
                return fn()
            except Exception:  # a folder that cannot be read now: the next one out, or the default
                continue
        return default


class _State:
    active = 0  # nesting depth of `handling`
    deferred = 0  # nesting depth of `deferred` (main thread only)
    pending: int | None = None  # a signal received inside `deferred`
    stopping = False  # Interrupted has been raised: a second signal stops at once
    previous: dict[int, Any] = {}
    cleanups: dict[int, Callable[[], None]] = {}
    last_words: Callable[[int], str] = staticmethod(lambda signum: "")  # type: ignore[assignment]


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _on_signal(signum: int, frame: Any) -> None:
    if _State.stopping or _State.pending is not None:  # a second signal while stopping: at once
        stop_now(signum)
    if _State.deferred:
        _State.pending = signum
        return
    _State.stopping = True
    raise Interrupted(signum)


def install() -> None:
    """(Re)install the handlers, e.g. after a library replaced them (ray.init sets its own SIGTERM handler);
    does nothing outside `handling` or off the main thread."""
    if _State.active and _main_thread():
        for s in SIGNALS:
            signal.signal(s, _on_signal)


@contextmanager
def handling(last_words: Callable[[int], str] | None = None) -> Iterator[None]:
    """SIGTERM and SIGINT raise Interrupted while inside (main thread; elsewhere, or nested, this does
    nothing). `last_words(signum)` is the line printed when a second signal stops the process at once."""
    if not _main_thread():
        yield
        return
    if last_words is not None:  # nested too: the innermost caller knows the command
        _State.last_words = last_words  # type: ignore[assignment]
    if _State.active:
        yield
        return
    _State.previous = {s: signal.getsignal(s) for s in SIGNALS}
    _State.active, _State.stopping, _State.pending = 1, False, None
    try:
        install()
        yield
    finally:
        for s, h in _State.previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _State.active, _State.stopping, _State.pending = 0, False, None
        _State.last_words = staticmethod(lambda signum: "")  # type: ignore[assignment]


@contextmanager
def deferred() -> Iterator[None]:
    """A signal received inside is held until the outermost `deferred` block ends, then raised there (also
    when the block raised: the interruption replaces that exception). Off the main thread: no effect
    (signals interrupt only the main thread)."""
    if not _main_thread():
        yield
        return
    _State.deferred += 1
    try:
        yield
    finally:
        _State.deferred -= 1
        if not _State.deferred and _State.pending is not None:
            signum, _State.pending = _State.pending, None
            _State.stopping = True
            raise Interrupted(signum)


@contextmanager
def reporting(describe: Callable[[], str]) -> Iterator[None]:
    """An Interrupted leaving this block carries `describe` (called once the command has unwound), the
    state its stop line reports, unless a block nearer to where it was raised gave one."""
    try:
        yield
    except Interrupted as e:
        e.states.append(describe)
        raise


def cleanup(key: Any, fn: Callable[[], None] | None) -> None:
    """Register fn (None: unregister) under key: run by `run_cleanups` when a command stops (held locks)."""
    if fn is None:
        _State.cleanups.pop(id(key), None)
    else:
        _State.cleanups[id(key)] = fn


def run_cleanups() -> None:
    for fn in list(_State.cleanups.values()):
        try:
            fn()
        except Exception:  # best effort: a folder gone away; what stays is judged stale later
            pass
    _State.cleanups.clear()


def stop_now(signum: int) -> None:
    """A second signal: run the cleanups, print the last line, exit 128 + signum without unwinding further."""
    run_cleanups()
    line = _State.last_words(signum)
    if line:
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except Exception:
            pass
    os._exit(128 + signum)

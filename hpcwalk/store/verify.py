"""Shard verification: does each committed shard match its commit marker, and what is left over.

A marker (`commits/shard-NNNNN.done.json`) records the shard's Parquet size (`bytes`) and `sha256`;
it is the shard's truth. Two levels check it:

    quick   the Parquet file is there and has the marker's size (one listing, no reads)
    full    quick, then the sha256 of the whole file (every byte read once, streamed)

Each shard ends in one state: ok, missing (a marker whose Parquet file is gone), truncated (shorter
than the marker says), size mismatch (longer), checksum mismatch, bad marker (unreadable), file
without marker (renamed into place, never committed: a crash between the two steps), stray temp file
(a hidden `.NAME.tmp` left by a killed write), not a file (a folder or other non-file where a shard or
marker belongs). hpcwalk/store/plancheck.py then checks each shard that passed against the run's plan
(foreign, extra, duplicate, misplaced; a planned shard with neither file nor marker is missing). Only
ok shards count as committed: resume renders the others again and every reader leaves them out with a
`RunWarning` naming them. `repair` removes what is bad and ours (the marker first, so a kill mid-repair
leaves at worst a file without marker) and moves what is not ours into `quarantine/`; the next render
redoes exactly those shards.

This module knows the folder layout only; the store (hpcwalk/store/writer.py) builds on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Collection, Literal

import pyarrow.fs as pafs

FRAMES_DIR = "frames"
COMMITS_DIR = "commits"
LOCK_NAME = ".hpcwalk.lock"  # one driver per run folder (hpcwalk/store/runlock.py)
MARKER_SUFFIX = ".done.json"
TMP_SUFFIX = ".tmp"
QUARANTINE_DIR = "quarantine"  # where repair and render move what a run folder holds that is not its own

VerifyLevel = Literal["quick", "full"]
VERIFY_LEVELS: tuple[str, ...] = ("quick", "full")
DEFAULT_LEVEL: VerifyLevel = "full"  # the cost is measured in README ("Verification"): small next to rendering

ShardState = Literal["ok", "missing", "truncated", "size mismatch", "checksum mismatch", "bad marker",
                     "file without marker", "stray temp file", "not a file",
                     "foreign", "extra", "duplicate", "misplaced"]  # the last four: against the plan (plancheck.py)
NOT_OURS: tuple[str, ...] = ("not a file", "foreign", "extra", "duplicate", "misplaced")  # moved, never deleted
_CHUNK = 8 << 20  # bytes per read while hashing


class RunWarning(UserWarning):
    """Something about a run folder a user must hear (a damaged shard left out, a stale lock taken over).
    The command line prints each as one `warning: ...` line."""


@dataclass(frozen=True)
class ShardCheck:
    """The verified state of one shard (or of one stray temporary file)."""

    name: str  # shard-00003, or the temporary file's name
    state: ShardState
    index: int | None  # None for a temporary file that names no shard
    parquet: str | None  # path of the Parquet file, when there is one
    marker: str | None  # path of the marker, when there is one
    rows: int = 0  # rows the marker records
    detail: str = ""
    sha256: str = ""  # the marker's sha256 (an ok shard's)
    claims: dict[str, Any] | None = None  # what the marker says of its shard: shard, job_fingerprint, frames

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    def describe(self) -> str:
        return f"{self.name}: {self.state}" + (f" ({self.detail})" if self.detail else "")


def check_level(level: str) -> VerifyLevel:
    """`quick` or `full`; anything else raises ValueError naming the choices."""
    if level not in VERIFY_LEVELS:
        raise ValueError(f"--verify {level!r} is not a level: choose quick (size) or full (sha256)")
    return level  # type: ignore[return-value]


def check_shards(fs: pafs.FileSystem, root: str, level: VerifyLevel = DEFAULT_LEVEL,
                 data_dir: str = FRAMES_DIR, commits_dir: str = COMMITS_DIR,
                 only: Collection[int] | None = None) -> list[ShardCheck]:
    """Every shard of the folder at `root` (markers and Parquet files), in shard order, then stray files;
    `only`: just the shards with these indices (and their stray files), for a reader of a few shards."""
    check_level(level)
    data, data_odd = _listing(fs, f"{root}/{data_dir}")
    markers, markers_odd = _listing(fs, f"{root}/{commits_dir}")
    shards = {n[: -len(".parquet")] for n in data if n.startswith("shard-") and n.endswith(".parquet")}
    marked = {n[: -len(MARKER_SUFFIX)] for n in markers if n.startswith("shard-") and n.endswith(MARKER_SUFFIX)}
    odd = {n[: -len(".parquet")]: f"{root}/{data_dir}/{n}" for n in data_odd if n.endswith(".parquet")}
    odd.update({n[: -len(MARKER_SUFFIX)]: f"{root}/{commits_dir}/{n}" for n in markers_odd if n.endswith(MARKER_SUFFIX)})
    out = []
    for name in sorted(shards | marked | set(odd), key=_index_key):
        if only is not None and _index(name) not in only:
            continue
        if name in odd:  # a folder, a link (a run's shards are its own files: a linked one changes with its
            what = "a symbolic link" if os.path.islink(odd[name]) else "not a regular file"  # target), a device
            marker = f"{root}/{commits_dir}/{name}{MARKER_SUFFIX}" if name in marked else None
            out.append(ShardCheck(name, "not a file", _index(name), odd[name], marker if marker != odd[name] else None,
                                  detail=f"{odd[name][len(root) + 1:]} is {what}"))
            continue
        parquet = f"{root}/{data_dir}/{name}.parquet" if name in shards else None
        marker = f"{root}/{commits_dir}/{name}{MARKER_SUFFIX}" if name in marked else None
        out.append(_check_one(fs, name, parquet, data.get(f"{name}.parquet"), marker, level))
    for folder, names in ((data_dir, data), (commits_dir, markers)):
        for n in sorted(names):
            if n.startswith(".") and TMP_SUFFIX in n:
                target = n[1:].split(TMP_SUFFIX)[0]
                if only is not None and _index(target) not in only:
                    continue
                out.append(ShardCheck(n, "stray temp file", _index(target), f"{root}/{folder}/{n}", None,
                                      detail=f"{folder}/{n}, {names[n]} bytes"))
    return out


def repair(fs: pafs.FileSystem, checks: list[ShardCheck]) -> list[str]:
    """Remove every bad shard's marker, then its file (and every stray temp file); returns what was removed.
    What is not ours (NOT_OURS) is left for `quarantine`."""
    removed = []
    for c in checks:
        if c.ok or c.state in NOT_OURS:
            continue
        for path in (c.marker, c.parquet):  # marker first: a kill in between leaves a file without marker
            if path is not None:
                try:
                    fs.delete_file(path)
                except FileNotFoundError:  # gone already (a repair killed midway, or a concurrent one)
                    continue
                removed.append(path)
    return removed


def quarantine(fs: pafs.FileSystem, root: str, checks: list[ShardCheck]) -> list[str]:
    """Move the file and marker of every shard that is not this run's own (NOT_OURS) into `quarantine/`
    (never deleted: it may be another run's work), marker first; returns the new paths."""
    moved = []
    for c in checks:
        if c.state not in NOT_OURS:
            continue
        for path in (c.marker, c.parquet):
            if path is None:
                continue
            fs.create_dir(f"{root}/{QUARANTINE_DIR}", recursive=True)
            base, k = path.rpartition("/")[2], 0
            dest = f"{root}/{QUARANTINE_DIR}/{base}"
            while fs.get_file_info(dest).type != pafs.FileType.NotFound:
                k += 1
                dest = f"{root}/{QUARANTINE_DIR}/{base}.{k}"
            try:
                fs.move(path, dest)
            except FileNotFoundError:  # gone already
                continue
            moved.append(dest)
    return moved


def file_sha256(fs: pafs.FileSystem, path: str) -> tuple[str, int]:
    """sha256 hex digest and size of one file, read in 8 MiB pieces."""
    h, n = hashlib.sha256(), 0
    with fs.open_input_stream(path) as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


# ---------------------------------------------------------------------------------------------


def parse_json_object(data: bytes) -> tuple[dict[str, Any] | None, str]:
    """(the JSON object in `data`, "") or (None, why it is not one): the reader of files hpcwalk wrote that may
    have been damaged since (commit markers, run.json, score.json, the pacing files)."""
    try:
        d = json.loads(data)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        return None, f"not JSON: {type(e).__name__} at byte {getattr(e, 'pos', getattr(e, 'start', '?'))}"
    return (d, "") if isinstance(d, dict) else (None, f"a JSON {type(d).__name__}, not an object")


class _BadMarker(ValueError):
    """A marker that is not one hpcwalk writes (not a JSON object, or a field out of range): the message says how."""


def _marker_fields(data: bytes) -> tuple[int, str, int | None, dict[str, Any]]:
    """(rows, sha256, bytes, claims) of a marker's bytes: a JSON object, whole numbers >= 0 (not NaN, infinite
    or 1e400) and 64 hex digits, else _BadMarker; claims: its `shard`, and the `job_fingerprint` and `frames`
    digest markers carry since they are checked against the plan (absent in older markers)."""
    m, why = parse_json_object(data)
    if m is None:
        raise _BadMarker(why)
    rows, sha, size = m["rows"], m["sha256"], m.get("bytes")
    for key, v in (("rows", rows), ("bytes", size), ("shard", m.get("shard"))):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise _BadMarker(f"{key} is {str(v)[:20]!r}, not a whole number >= 0")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise _BadMarker("sha256 is not 64 hex digits")
    claims = {k: m[k] for k in ("shard", "job_fingerprint", "frames") if isinstance(m.get(k), (int, str))}
    return rows, sha, size, claims


def _check_one(fs: pafs.FileSystem, name: str, parquet: str | None, size: int | None, marker: str | None,
               level: VerifyLevel) -> ShardCheck:
    index = _index(name)
    if marker is None:
        return ShardCheck(name, "file without marker", index, parquet, None,
                          detail="renamed into place but never committed")
    try:
        with fs.open_input_stream(marker) as f:
            rows, want_sha, want_bytes, claims = _marker_fields(f.read())
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = type(e).__name__ if not isinstance(e, _BadMarker) else str(e)
        return ShardCheck(name, "bad marker", index, parquet, marker, detail=f"unreadable marker: {why}")
    if parquet is None:
        return ShardCheck(name, "missing", index, None, marker, rows, "its Parquet file is gone")
    if want_bytes is not None and size != want_bytes:
        state: ShardState = "truncated" if (size or 0) < want_bytes else "size mismatch"
        return ShardCheck(name, state, index, parquet, marker, rows, f"{size:,} of {want_bytes:,} bytes")
    if level == "full":
        try:
            got, _ = file_sha256(fs, parquet)
        except OSError as e:
            return ShardCheck(name, "missing", index, None, marker, rows, f"cannot be read: {e}")
        if got != want_sha:
            return ShardCheck(name, "checksum mismatch", index, parquet, marker, rows,
                              f"sha256 {got[:12]}..., marker says {want_sha[:12]}...")
    return ShardCheck(name, "ok", index, parquet, marker, rows, sha256=want_sha, claims=claims)


def _listing(fs: pafs.FileSystem, folder: str) -> tuple[dict[str, int], list[str]]:
    """(file name -> size of the files directly in `folder`, names of shard-* entries there that are not files);
    both empty when the folder does not exist."""
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    odd = [i.base_name for i in infos if i.base_name.startswith("shard-") and (
        i.type != pafs.FileType.File or (isinstance(fs, pafs.LocalFileSystem) and os.path.islink(i.path)))]
    files = {i.base_name: i.size or 0 for i in infos if i.type == pafs.FileType.File and i.base_name not in odd}
    return files, odd


def _index(name: str) -> int | None:
    digits = name[len("shard-"):].split(".")[0] if name.startswith("shard-") else ""
    return int(digits) if digits.isdigit() else None


def _index_key(name: str) -> tuple[int, str]:
    i = _index(name)
    return (i if i is not None else -1, name)

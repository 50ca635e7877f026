"""pyarrow.fs paths: filesystem, write_atomic, target_error, and walk_file (the one name rule of per-walk files)"""

from __future__ import annotations

import hashlib
import os
import re

import pyarrow.fs as pafs


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A run URI (local path or pyarrow.fs URI such as s3://bucket/run) as (filesystem, root path)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """`data` to the hidden `.NAME.tmp` beside `path`, then renamed into place; a failed write (a full
    disk) removes the temporary file and raises the OSError.

    The temporary name is fixed per target (`.shard-00003.parquet.tmp`): a retried shard overwrites only its
    own leftover, and a killed attempt leaves at most one hidden file that readers (pyarrow.dataset,
    DuckDB/Polars globs on *.parquet) skip."""
    head, _, tail = path.rpartition("/")
    tmp = f"{head}/.{tail}.tmp"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException as e:
        try:
            fs.delete_file(tmp)
        except OSError:  # never created, or the folder itself is gone
            pass
        if isinstance(e, OSError):
            raise target_error(e, path) from e
        raise


def target_error(e: OSError, path: str) -> OSError:
    """The OSError of a failed write, naming the file meant (not its temporary name) and the plain reason."""
    return OSError(e.errno, os.strerror(e.errno) if e.errno else str(e), path)


STEM_CHARS = 96  # an escaped name longer than this is cut and hashed (file names stay far below 255 bytes)
_KEPT = re.compile(r"[A-Za-z0-9_-]")


def walk_stem(name: str) -> str:
    """The file stem of walk `name`, distinct for distinct names: its letters, digits, `_` and `-` as they are,
    every other character as `~` and two lowercase hex digits per UTF-8 byte (` ` -> `~20`, `.` -> `~2e`,
    `~` -> `~7e`), so the name reads back from its stem. Past STEM_CHARS the stem keeps its first whole
    characters up to 64, then `~~` and 32 hex digits of the name's sha256 (an escaped stem never holds `~~`).
    A stem never holds `.` (a file's kind, after the first `.`, is never part of a name) and is never empty."""
    pieces = [c if _KEPT.fullmatch(c) else "".join(f"~{b:02x}" for b in c.encode("utf-8", "surrogatepass"))
              for c in name]
    stem = "".join(pieces)
    if len(stem) > STEM_CHARS:
        head = ""
        for p in pieces:
            if len(head) + len(p) > 64:
                break
            head += p
        stem = f"{head}~~{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}"
    return stem or "~"


def walk_file(name: str, kind: str) -> str:
    """The one name of walk `name`'s file of kind `kind` (`json`, `steps.json`, `mp4`, `slerp.webm`):
    STEM.KIND, with STEM = walk_stem(name). Two distinct (name, kind) pairs never get one file name: the
    stem holds no `.`, so the first `.` ends it. The data keeps the name itself."""
    return f"{walk_stem(name)}.{kind}"

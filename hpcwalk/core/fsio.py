"""pyarrow.fs paths: filesystem, write_atomic, target_error, safe_filename"""

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


def safe_filename(name: str, max_chars: int = 80) -> str:
    """A file name for `name` that every filesystem takes: letters, digits, `.`, `_`, `-` kept, the rest
    `_`, at most `max_chars`, never hidden; when anything changed, `-` and 8 hex digits of its sha256 are
    added, so distinct names stay distinct. The data keeps the name itself."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:max_chars].lstrip(".") or "walk"
    if safe == name:
        return safe
    return f"{safe}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"

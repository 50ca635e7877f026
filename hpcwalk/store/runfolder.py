"""A run folder's own entries (RESERVED), which no output may land on (`check_output_path`); and a run folder
whose run.json is damaged: still a run for `verify` (the shards need no job), and written again by the run's
own job when every readable shard carries that job's fingerprint (store.py refuses such a folder everywhere
else with one line: `read_run`, `preflight`)."""

from __future__ import annotations

import os
import warnings

import pyarrow.fs as pafs

from hpcwalk.core.errors import StoreError
from hpcwalk.core.fsio import filesystem, write_atomic
from hpcwalk.job.spec import RenderJob
from hpcwalk.store.reader import INVERSIONS_DIR, DamagedRunJson, read_run_json, shards_of
from hpcwalk.store.schema import run_metadata
from hpcwalk.store.verify import COMMITS_DIR, FRAMES_DIR, LOCK_NAME, QUARANTINE_DIR, RunWarning
from hpcwalk.store.writer import run_json_bytes

PACING_DIR = "pacing"  # evenly paced walks' plans (run/evenpace.py)
STUDY_MARK = ".hpcwalk-study.json"  # written by a study once its render is done: the folder owes its report
RESERVED = {"run.json": "its job", FRAMES_DIR: "its frame shards", COMMITS_DIR: "its commit markers",
            INVERSIONS_DIR: "its inverted endpoints", PACING_DIR: "its pacing plans",
            QUARANTINE_DIR: "its quarantined shards", LOCK_NAME: "its lock",
            STUDY_MARK: "its study mark"}


def check_output_path(path: str, what: str = "--out") -> None:
    """StoreError when an output written to `path` (a file, or a folder it fills) would land on a run folder's
    own entry (RESERVED) of any run folder above it (a folder holding run.json): run.json itself, or anything
    under frames/, commits/, ... Symlinks are followed for local paths; names compare case-insensitively (one
    entry on macOS and Windows). Writes nothing."""
    if "://" in path and not path.startswith("file://"):
        fs, root = filesystem(path)
        parts, sep = root.rstrip("/").split("/"), "/"
    else:
        fs, root = pafs.LocalFileSystem(), os.path.realpath(path.removeprefix("file://"))
        parts, sep = root.split(os.sep), os.sep
    for k in range(len(parts) - 1, 0, -1):
        entry = parts[k].lower()
        if entry not in RESERVED:
            continue
        run = sep.join(parts[:k]) or sep
        if fs.get_file_info(run.rstrip(sep) + sep + "run.json").type == pafs.FileType.File:
            raise StoreError(f"{what} {path!r} lands on {parts[k]} of the run in {run!r} ({RESERVED[entry]}): "
                             f"writing there would damage the run; choose another path (a run keeps "
                             f"{', '.join(n if '.' in n else n + '/' for n in RESERVED)} for itself)")


def rewrite_damaged_run_json(uri: str, job: RenderJob) -> bool:
    """When run.json is damaged and every readable committed shard carries this job's fingerprint, write it
    again (its metadata read back from a shard, where the run wrote the same), with a RunWarning; True then.
    The caller holds the run's lock."""
    fs, root = filesystem(uri)
    if fs.get_file_info(f"{root}/run.json").type != pafs.FileType.File:
        return False
    try:
        read_run_json(fs, root, uri)
        return False
    except DamagedRunJson as e:
        why = e.why
    metas = shards_of(uri, job.fingerprint())
    meta = next((d for d in map(_decoded, metas) if d is not None), None)
    if meta is None:
        return False
    keys = run_metadata(job).keys()
    write_atomic(fs, f"{root}/run.json", run_json_bytes(job, {k: v for k, v in meta.items() if k in keys}))
    warnings.warn(RunWarning(f"{uri!r} has a run.json that is damaged or not hpcwalk's ({why}); its {len(metas)} "
                             "committed shards carry this job's fingerprint: run.json written again from this job "
                             "and their metadata"), stacklevel=2)
    return True


def _decoded(meta: dict[bytes, bytes]) -> dict[str, str] | None:
    try:
        return {k.decode(): v.decode() for k, v in meta.items()}
    except UnicodeDecodeError:
        return None


def damaged_run_folder(uri: str) -> bool:
    """A folder whose run.json is a file (damaged) beside the frames/ or commits/ hpcwalk writes: still a run
    for `verify`, which checks shards against markers and needs no job."""
    fs, root = filesystem(uri)
    kinds = [i.type for i in fs.get_file_info([f"{root}/run.json", f"{root}/{FRAMES_DIR}", f"{root}/{COMMITS_DIR}"])]
    return kinds[0] == pafs.FileType.File and pafs.FileType.Directory in kinds[1:]

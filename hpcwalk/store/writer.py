"""Parquet output: one file per shard, written to a temporary name and renamed, then a commit marker.

Layout of a run folder (a local path or any `pyarrow.fs` URI such as s3://bucket/run):

    run.json                       the job, its fingerprint, the hpcwalk version
    frames/shard-00000.parquet     frames of shard 0 (provenance columns + image bytes)
    commits/shard-00000.done.json  commit marker: rows, sha256, timings, device

frames/ holds only Parquet, so pyarrow.dataset, DuckDB and Polars read it as it is.

A shard counts only once its marker exists and the Parquet file matches it (hpcwalk/store/verify.py: size,
and at the `full` level the sha256); readers read verified shards only and leave the others out with a
warning, and a rerun renders every shard that is not verified. A folder holding another job's
fingerprint is refused without overwrite.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import hpcwalk
from hpcwalk.core.errors import StoreError
from hpcwalk.core.fsio import filesystem, write_atomic
from hpcwalk.job.spec import RenderJob, Shard
from hpcwalk.store.plancheck import frames_digest
from hpcwalk.store.reader import DamagedRunJson, read_run_json, shards_of, verify_run
from hpcwalk.store.schema import run_metadata
from hpcwalk.store.verify import COMMITS_DIR, FRAMES_DIR, LOCK_NAME

# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


def preflight(uri: str, job: RenderJob, overwrite: bool = False) -> Literal["new", "resume", "replace"]:
    """Check an output folder before any work, writing nothing; raise StoreError naming the fix."""
    fs, root = filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise StoreError(f"output {uri!r} is a file, not a folder: choose another --out")
    if info.type == pafs.FileType.Directory:
        if fs.get_file_info(f"{root}/run.json").type == pafs.FileType.File:
            try:
                prev = read_run_json(fs, root, uri)["job_fingerprint"]
            except DamagedRunJson:  # this job's run when its shards say so (run.json is then written
                if not overwrite and shards_of(uri, job.fingerprint()):  # again), else refused, even with
                    return "resume"  # --overwrite (never delete a folder we cannot tell is ours)
                raise
            if overwrite:
                return "replace"
            if prev != job.fingerprint():
                raise StoreError(
                    f"output {uri!r} holds another job (fingerprint {prev}, this job {job.fingerprint()}): "
                    "choose another --out, or pass --overwrite to replace it"
                )
            mismatch = verify_run(uri, "quick", job=job).run_mismatch
            if mismatch:
                raise StoreError(f"output {uri!r}: {mismatch}: restore the run's own run.json (or render that "
                                 "job's file into it), choose another --out, or pass --overwrite to replace it")
            return "resume"
        if [i for i in fs.get_file_info(pafs.FileSelector(root)) if not _opening_leftover(fs, i)]:
            # never delete a folder we did not write, even with --overwrite
            raise StoreError(f"output {uri!r} exists, is not empty and is not an hpcwalk run: choose a new --out")
    if isinstance(fs, pafs.LocalFileSystem):
        anc = root
        while not os.path.exists(anc):
            anc = os.path.dirname(anc)
        if not os.path.isdir(anc) or not os.access(anc, os.W_OK | os.X_OK):
            raise StoreError(f"output {uri!r} is not writable ({anc!r} is not a writable folder): choose another --out")
    return "new"


def _opening_leftover(fs: pafs.FileSystem, info: pafs.FileInfo) -> bool:
    """What a driver killed while opening a new folder leaves before run.json is in place (its lock, the empty
    frames/ and commits/, a partial .run.json.tmp): ours, so the rerun starts the run there."""
    if info.base_name.startswith(LOCK_NAME):
        return True
    if info.type == pafs.FileType.File:
        return info.base_name == ".run.json.tmp"
    return (info.type == pafs.FileType.Directory and info.base_name in (FRAMES_DIR, COMMITS_DIR)
            and not fs.get_file_info(pafs.FileSelector(info.path)))


@dataclass
class CommitMarker:
    shard: int
    rows: int
    sha256: str
    bytes: int
    timings: dict[str, float] = field(default_factory=dict)
    device: str = ""
    host: str = field(default_factory=platform.node)
    committed_at: float = field(default_factory=time.time)
    job_fingerprint: str = ""  # the run's job: a shard copied into another run is told apart (plancheck.py)
    frames: str = ""  # frames_digest of the shard's frame ids: a shard under another shard's name is told apart


class ShardStore:
    """Writes committed shards of one job into one run folder."""

    def __init__(self, uri: str, job: RenderJob, overwrite: bool = False, metadata: dict[str, str] | None = None,
                 create: bool = True):
        self.uri = uri
        self.job = job
        self.fs, self.root = filesystem(uri)
        self.frames = f"{self.root}/{FRAMES_DIR}"
        self.commits = f"{self.root}/{COMMITS_DIR}"
        self.metadata = metadata or run_metadata(job)
        if create:
            self._open(overwrite)
        elif self.fs.get_file_info(f"{self.root}/run.json").type != pafs.FileType.File:
            raise StoreError(f"output {uri!r} is not visible from {platform.node()} (no run.json): put --out on "
                             "storage every node reaches (a shared mount at the same path, or s3://, gs://)")

    @classmethod
    def attach(cls, uri: str, job: RenderJob, metadata: dict[str, str] | None = None) -> "ShardStore":
        """A worker's view of a run folder the driver already opened: checks it is visible, writes nothing."""
        return cls(uri, job, metadata=metadata, create=False)

    # -- 1. open: validate the folder before any work -------------------------------------------

    def _open(self, overwrite: bool) -> None:
        if preflight(self.uri, self.job, overwrite) == "replace":  # everything but the driver's lock and
            for i in self.fs.get_file_info(pafs.FileSelector(self.root)):  # run.json, which stays until the
                if i.base_name in (LOCK_NAME, "run.json"):  # new one replaces it: a driver killed midway leaves
                    continue  # a run that --overwrite replaces again
                (self.fs.delete_dir if i.type == pafs.FileType.Directory else self.fs.delete_file)(i.path)
        try:
            self.fs.create_dir(self.frames, recursive=True)
            self.fs.create_dir(self.commits, recursive=True)
            write_atomic(self.fs, f"{self.root}/run.json", run_json_bytes(self.job, self.metadata))
        except OSError as e:
            raise StoreError(f"cannot write to output {self.uri!r}: {e}. Choose a writable --out") from None

    @property
    def location(self) -> str:
        """The run as another process names it: the URI of an object store, the absolute path of a local folder
        (Ray workers and the inversion step do not share this process's working directory)."""
        return self.uri if "://" in self.uri else self.root

    # -- 3. write ------------------------------------------------------------------------------

    def write(self, shard: Shard, table: pa.Table, timings: dict[str, float] | None = None,
              device: str = "") -> CommitMarker:
        """Commit one shard: Parquet to a temporary name, rename, then the marker."""
        if table.num_rows != len(shard.rows):
            raise StoreError(f"{shard.name}: table has {table.num_rows} rows, shard has {len(shard.rows)}")
        ids = table.column("frame_id").to_pylist()
        if ids != [r.frame_id for r in shard.rows]:
            raise StoreError(f"{shard.name}: the table's frames are not the shard's (first {ids[:1]}, planned "
                             f"{shard.rows[0].frame_id!r})")
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{
            k.encode(): v.encode() for k, v in self.metadata.items()}})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        write_atomic(self.fs, f"{self.frames}/{shard.name}.parquet", data)
        marker = CommitMarker(shard.index, table.num_rows, hashlib.sha256(data).hexdigest(), len(data),
                              timings or {}, device, job_fingerprint=self.job.fingerprint(), frames=frames_digest(ids))
        write_atomic(self.fs, f"{self.commits}/{shard.name}.done.json",
                           json.dumps(dataclasses.asdict(marker), indent=2).encode())
        return marker

    def close(self) -> None:
        """Nothing is buffered: every write is committed when `write` returns."""


def run_json_bytes(job: RenderJob, metadata: dict[str, str]) -> bytes:
    """The run.json a run of `job` writes (its metadata: the shards' schema metadata)."""
    return json.dumps({"job_fingerprint": job.fingerprint(), "hpcwalk_version": hpcwalk.__version__,
                       "source": job.source, "job": dataclasses.asdict(job), "metadata": metadata},
                      indent=2, default=str).encode()

"""Parquet output: one file per shard, written to a temporary name and renamed, then a commit marker.

Layout of a run folder (a local path or any `pyarrow.fs` URI such as s3://bucket/run):

    run.json                       the job, its fingerprint, the hpcwalk version
    frames/shard-00000.parquet     frames of shard 0 (provenance columns + image bytes)
    commits/shard-00000.done.json  commit marker: rows, sha256, timings, device

frames/ holds only Parquet, so pyarrow.dataset, DuckDB and Polars read it as it is.

A shard counts only once its marker exists and the Parquet file matches it (hpcwalk/verify.py: size,
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
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Collection, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import hpcwalk
from hpcwalk.job import FrameRow, RenderJob, Shard
from hpcwalk.verify import (  # noqa: F401  (FRAMES_DIR, COMMITS_DIR, parse_json_object: importable from here)
    COMMITS_DIR,
    DEFAULT_LEVEL,
    FRAMES_DIR,
    LOCK_NAME,
    RunWarning,
    ShardCheck,
    VerifyLevel,
    check_shards,
    parse_json_object,
)


class StoreError(RuntimeError):
    """The output folder cannot be used; the message says why and what to do."""


class DamagedRunJson(StoreError):
    """run.json is there but damaged or not hpcwalk's; `why` says how (e.g. "not JSON: JSONDecodeError at
    byte 0, 10 bytes")."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------

PROVENANCE_FIELDS = [
    pa.field("frame_id", pa.string(), nullable=False),
    pa.field("walk", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("index", pa.int32(), nullable=False),
    pa.field("segment", pa.int32(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("draw", pa.int32(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("seed_b", pa.int64()),
    pa.field("draw_b", pa.int32()),
    pa.field("prompt_b", pa.string()),
    pa.field("gamma", pa.float64()),
    pa.field("t", pa.int32()),
    pa.field("std", pa.float64()),
    pa.field("score_prompt", pa.string(), nullable=False),  # the text clip_score is scored against
    pa.field("score_prompt_b", pa.string()),  # text walks: the text clip_score_b is scored against
    pa.field("position", pa.float64()),  # the uniform place along the segment before easing or pacing
    pa.field("easing", pa.string(), nullable=False),
    pa.field("easing_exponent", pa.float64()),
    pa.field("pace", pa.string(), nullable=False),
    pa.field("pace_pass", pa.string(), nullable=False),  # even pacing: coarse | final
    pa.field("reused_from", pa.string()),  # even pacing: the coarse frame id this frame copies
    pa.field("time_s", pa.float64()),  # audio pacing: when the frame shows
    pa.field("text_method", pa.string()),  # keyframes walks
    pa.field("image_path", pa.string()),  # images walks: the segment's endpoint files as written in the job
    pa.field("image_path_b", pa.string()),
    pa.field("image_sha256", pa.string()),
    pa.field("image_sha256_b", pa.string()),
]
FRAME_FIELDS = [
    pa.field("shard", pa.int32(), nullable=False),
    pa.field("latent_norm", pa.float32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
]


def run_metadata(job: RenderJob, scheduler_config: dict[str, Any] | None = None) -> dict[str, str]:
    """Schema metadata carried by every shard: what produced these frames."""
    s = job.sampling
    return {
        "hpcwalk_version": hpcwalk.__version__,
        "model_id": job.model.id,
        "model_revision": job.model.revision or "",
        **_model_metadata(job, scheduler_config),  # model_format/_path/_config/_config_rule/_variant, prediction_type
        "scheduler": s.scheduler,
        "scheduler_config": json.dumps(scheduler_config or {}, sort_keys=True, default=str),
        "steps": str(s.steps),
        "guidance": str(s.guidance),
        "negative_prompt": s.negative_prompt,
        "dtype": job.render.dtype,
        "quantize": job.compile.describe_quantize(),  # "none", or the FP8 path (not exact) and its torchao version
        "clip_model": "",  # "" = no CLIP columns; else the model behind clip_* (and clip2_model: clip2_*)
        **{f"{prefix}_model": f"{m}/{p}" for prefix, m, p in job.clip.models(job.model.id)},
        "encoder_model": job.encoder.resolved(job.model.id),  # "" = no encoder_image column (hpcwalk/encoder.py)
        "image_format": job.output.image_format,
        "job_fingerprint": job.fingerprint(),
    }


def _model_metadata(job: RenderJob, scheduler_config: dict[str, Any] | None) -> dict[str, str]:
    """How the model loads (hpcwalk.weights.describe; needs no torch), and its prediction type."""
    from hpcwalk.weights import describe

    m = job.model
    return {**describe(m.id, m.revision, m.config, m.variant),
            "prediction_type": str((scheduler_config or {}).get("prediction_type", "epsilon"))}


def encode_image(frame: np.ndarray, fmt: str = "png") -> bytes:
    """uint8 (H, W, 3) -> PNG (default), lossless WebP, or JPEG q95 bytes; deterministic."""
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(frame)
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif fmt == "webp":
        img.save(buf, format="WEBP", lossless=True)
    else:
        img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def frames_table(rows: list[FrameRow], images: list[bytes], latent_norm: np.ndarray, shard: int,
                 height: int, width: int, extra: dict[str, pa.Array] | None = None,
                 metadata: dict[str, str] | None = None) -> pa.Table:
    """Provenance columns + frame columns (+ extra columns, e.g. CLIP) as one Arrow table."""
    n = len(rows)
    cols: dict[str, pa.Array] = {}
    for f in PROVENANCE_FIELDS:
        cols[f.name] = pa.array([getattr(r, f.name) for r in rows], type=f.type)
    cols["shard"] = pa.array([shard] * n, pa.int32())
    cols["latent_norm"] = pa.array(np.asarray(latent_norm, np.float32))
    cols["width"] = pa.array([width] * n, pa.int32())
    cols["height"] = pa.array([height] * n, pa.int32())
    cols["image"] = pa.array(images, pa.binary())
    fields = PROVENANCE_FIELDS + FRAME_FIELDS
    for name, arr in (extra or {}).items():
        cols[name] = arr
        fields = fields + [pa.field(name, arr.type)]
    schema = pa.schema(fields, metadata=metadata)
    return pa.Table.from_pydict(cols, schema=schema)


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


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A run URI (local path or pyarrow.fs URI such as s3://bucket/run) as (filesystem, root path)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


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
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{
            k.encode(): v.encode() for k, v in self.metadata.items()}})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        write_atomic(self.fs, f"{self.frames}/{shard.name}.parquet", data)
        marker = CommitMarker(shard.index, table.num_rows, hashlib.sha256(data).hexdigest(), len(data),
                              timings or {}, device)
        write_atomic(self.fs, f"{self.commits}/{shard.name}.done.json",
                           json.dumps(dataclasses.asdict(marker), indent=2).encode())
        return marker

    def close(self) -> None:
        """Nothing is buffered: every write is committed when `write` returns."""


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


# ---------------------------------------------------------------------------------------------
# Readers: verified shards only (hpcwalk/verify.py); a damaged shard is left out with a warning
# ---------------------------------------------------------------------------------------------


@dataclass
class RunShards:
    """A run's shards as verified against their markers at one level."""

    uri: str
    level: VerifyLevel
    checks: list[ShardCheck]

    @property
    def ok(self) -> list[ShardCheck]:
        return [c for c in self.checks if c.ok]

    @property
    def damaged(self) -> list[ShardCheck]:
        """Shards that are not committed as they should be (stray temporary files are not shards)."""
        return [c for c in self.checks if not c.ok and c.state != "stray temp file"]

    @property
    def indices(self) -> set[int]:
        return {c.index for c in self.ok if c.index is not None}

    @property
    def files(self) -> list[str]:
        return [c.parquet for c in self.ok if c.parquet]

    def warn(self, action: str = "left out") -> None:
        """One RunWarning per damaged shard that had a marker, naming it and the repair."""
        for c in self.damaged:
            if c.marker is not None:
                warnings.warn(RunWarning(damage_message(self.uri, c.describe(), action)), stacklevel=3)


def damage_message(uri: str, what: str, action: str = "left out") -> str:
    """'shard-00003: truncated (...): left out; repair: ...' (one line)."""
    return (f"{what}: {action}; repair: rerun the render or study into {uri} (it renders damaged "
            f"shards again), or remove them now with `hpcwalk verify {uri} --repair`")


def verify_run(uri: str, level: VerifyLevel = DEFAULT_LEVEL, only: Collection[int] | None = None) -> RunShards:
    """Check every shard of a run against its marker (`quick`: present and size; `full`: also sha256);
    `only`: just the shards with these indices."""
    fs, root = filesystem(uri)
    return RunShards(uri, level, check_shards(fs, root, level, only=only))


def read_shard(uri: str, path: str, columns: list[str] | None = None) -> pa.Table | None:
    """One verified shard's table, or None (with a RunWarning) when it cannot be parsed after all."""
    fs, _ = filesystem(uri)
    try:
        return pq.read_table(path, columns=columns, filesystem=fs)
    except (pa.ArrowException, OSError) as e:  # damaged in a way the chosen level does not see
        name = path.rpartition("/")[2][: -len(".parquet")]
        first = (str(e).strip().splitlines() or [""])[0][:120]
        warnings.warn(RunWarning(damage_message(uri, f"{name}: unreadable ({type(e).__name__}: {first})")),
                      stacklevel=3)
        return None


def committed_shards(uri: str) -> set[int]:
    """Indices of a run's committed shards (those with a marker); empty for a new folder."""
    fs, root = filesystem(uri)
    sel = pafs.FileSelector(f"{root}/{COMMITS_DIR}", allow_not_found=True)
    return {int(i.base_name[len("shard-"):-len(".done.json")]) for i in fs.get_file_info(sel)
            if i.base_name.startswith("shard-") and i.base_name.endswith(".done.json")}


def committed_files(uri: str, level: VerifyLevel = DEFAULT_LEVEL) -> list[str]:
    """Paths of a run's verified shard files, in shard order; each damaged shard is left out with a RunWarning."""
    shards = verify_run(uri, level)
    shards.warn()
    return shards.files


def read_frames(uri: str, columns: list[str] | None = None, level: VerifyLevel = DEFAULT_LEVEL) -> pa.Table:
    """All verified frames of a run as one Arrow table; uncommitted files are ignored and damaged shards
    left out, each with a RunWarning naming it and the repair."""
    shards = verify_run(uri, level)
    shards.warn()
    return read_verified(shards, columns)


def read_verified(shards: RunShards, columns: list[str] | None = None) -> pa.Table:
    """The verified shards' frames as one table (StoreError when none is left)."""
    tables = [t for t in (read_shard(shards.uri, f, columns) for f in shards.files) if t is not None]
    if not tables:
        raise StoreError(f"{shards.uri!r} has no committed shards that pass verification: render into it first")
    return pa.concat_tables(tables, promote_options="default")


def shard_columns(shards: RunShards) -> list[str]:
    """Column names of the first readable verified shard ([] when none is)."""
    fs, _ = filesystem(shards.uri)
    for f in shards.files:
        try:
            return pq.read_schema(f, filesystem=fs).names
        except (pa.ArrowException, OSError):  # read_verified warns about it
            continue
    return []


def read_run(uri: str) -> dict[str, Any]:
    """The run.json of a run folder; StoreError naming the fix when it is missing, damaged or not hpcwalk's."""
    return read_run_json(*filesystem(uri), uri)


def run_json_bytes(job: RenderJob, metadata: dict[str, str]) -> bytes:
    """The run.json a run of `job` writes (its metadata: the shards' schema metadata)."""
    return json.dumps({"job_fingerprint": job.fingerprint(), "hpcwalk_version": hpcwalk.__version__,
                       "source": job.source, "job": dataclasses.asdict(job), "metadata": metadata},
                      indent=2, default=str).encode()


def shards_of(uri: str, fingerprint: str) -> list[dict[bytes, bytes]]:
    """The schema metadata of each readable committed shard (size-checked) when every one carries
    `fingerprint`; [] when there is none or one carries another: whether a run whose run.json is damaged is
    provably this job's."""
    fs, _ = filesystem(uri)
    metas = []
    for f in verify_run(uri, "quick").files:
        try:
            meta = pq.read_schema(f, filesystem=fs).metadata or {}
        except (pa.ArrowException, OSError):
            continue  # damaged: rendered again by the resume
        if meta.get(b"job_fingerprint") != fingerprint.encode():
            return []
        metas.append(meta)
    return metas


def read_run_json(fs: pafs.FileSystem, root: str, uri: str) -> dict[str, Any]:
    """`read_run` on an open filesystem; `uri` names the run in the messages."""
    try:
        with fs.open_input_stream(f"{root}/run.json") as f:
            data = f.read()
    except FileNotFoundError:
        raise StoreError(f"{uri!r} is not an hpcwalk run folder (no run.json)") from None
    except OSError as e:
        raise StoreError(f"cannot read {uri!r}'s run.json ({e}): check the folder's permissions, or choose a "
                         "new --out") from None
    run, why = parse_json_object(data)
    if run is not None and not isinstance(run.get("job_fingerprint"), str):
        run, why = None, "no job_fingerprint"
    if run is None:
        why = f"{why}, {len(data):,} bytes"
        raise DamagedRunJson(f"{uri!r} has a run.json that is damaged or not hpcwalk's ({why}): rerun the render "
                             "with the run's own job file (it writes run.json again when the shards carry that "
                             "job's fingerprint), restore it from a copy, or choose a new --out (hpcwalk never "
                             "deletes a folder it cannot tell is its own)", why)
    return run


def safe_filename(name: str, max_chars: int = 80) -> str:
    """A file name for `name` that every filesystem takes: letters, digits, `.`, `_`, `-` kept, the rest
    `_`, at most `max_chars`, never hidden; when anything changed, `-` and 8 hex digits of its sha256 are
    added, so distinct names stay distinct. The data keeps the name itself."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:max_chars].lstrip(".") or "walk"
    if safe == name:
        return safe
    return f"{safe}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"

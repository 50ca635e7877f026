"""verified reads of a run folder"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any, Collection

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hpcwalk.core.errors import StoreError
from hpcwalk.core.fsio import filesystem
from hpcwalk.job.spec import RenderJob
from hpcwalk.store.verify import (
    COMMITS_DIR,
    DEFAULT_LEVEL,
    RunWarning,
    ShardCheck,
    VerifyLevel,
    check_shards,
    parse_json_object,
)

INVERSIONS_DIR = "inversions"
INDEX_NAME = "index.json"


def cache_uri(uri: str) -> str:
    return f"{uri.rstrip('/')}/{INVERSIONS_DIR}"


def read_index(uri: str) -> list[dict[str, Any]]:
    """The run's inversion records ([] when it has none, or the index cannot be read)."""
    from hpcwalk.core.fsio import filesystem

    fs, root = filesystem(cache_uri(uri))
    try:
        with fs.open_input_stream(f"{root}/{INDEX_NAME}") as f:
            return list(json.loads(f.read()))
    except (FileNotFoundError, OSError, ValueError):
        return []


def endpoint_images(uri: str, walk: str) -> list[tuple[dict[str, Any], np.ndarray, np.ndarray]]:
    """(record, fitted input, reconstruction) of each image of `walk` whose cache file holds both (torch-free)."""
    from safetensors.numpy import load

    from hpcwalk.core.fsio import filesystem

    fs, root = filesystem(uri)
    out = []
    for r in read_index(uri):
        if r.get("walk") != walk:
            continue
        try:
            with fs.open_input_stream(f"{root}/{r['file']}") as f:
                t = load(f.read())
        except Exception:  # a damaged or vanished cache file: that endpoint is not shown
            continue
        if "image" in t and "reconstruction" in t:
            out.append((r, t["image"], t["reconstruction"]))
    return out


class DamagedRunJson(StoreError):
    """run.json is there but damaged or not hpcwalk's; `why` says how (e.g. "not JSON: JSONDecodeError at
    byte 0, 10 bytes")."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


# ---------------------------------------------------------------------------------------------
# Readers: verified shards only (hpcwalk/store/verify.py); a damaged shard is left out with a warning
# ---------------------------------------------------------------------------------------------


@dataclass
class RunShards:
    """A run's shards as verified against their markers at one level."""

    uri: str
    level: VerifyLevel
    checks: list[ShardCheck]
    plan_note: str = ""  # why the shards could not be held against the plan ('' when they were)
    run_mismatch: str = ""  # run.json names another job than its shards carry (plancheck.against_plan)

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

    @property
    def not_rendered(self) -> list[int]:
        """Planned shards with neither file nor marker (not rendered yet, or deleted)."""
        return [c.index for c in self.checks if c.state == "missing" and c.marker is None and c.index is not None]

    def warn(self, action: str = "left out") -> None:
        """One RunWarning per damaged shard that had a marker or a file, naming it and the repair."""
        if self.run_mismatch:
            warnings.warn(RunWarning(f"{self.uri}: {self.run_mismatch}: every shard is left out; restore the run's "
                                     "own run.json, or render its job again"), stacklevel=3)
        for c in self.damaged:
            if c.marker is not None or (c.parquet is not None and c.state != "file without marker"):
                warnings.warn(RunWarning(damage_message(self.uri, c.describe(), action)), stacklevel=3)


def damage_message(uri: str, what: str, action: str = "left out") -> str:
    """'shard-00003: truncated (...): left out; repair: ...' (one line)."""
    return (f"{what}: {action}; repair: rerun the render or study into {uri} (it renders damaged "
            f"shards again), or remove them now with `hpcwalk verify {uri} --repair`")


def verify_run(uri: str, level: VerifyLevel = DEFAULT_LEVEL, only: Collection[int] | None = None,
               job: RenderJob | None = None) -> RunShards:
    """Check every shard of a run against its marker (`quick`: present and size; `full`: also sha256), then
    against the plan of the run's job (`job`, else the one in run.json: hpcwalk/store/plancheck.py);
    `only`: just the shards with these indices."""
    from hpcwalk.store.plancheck import against_plan, job_from_run, planned_shards

    fs, root = filesystem(uri)
    checks = check_shards(fs, root, level, only=only)
    try:
        run = read_run_json(fs, root, uri)
    except StoreError as e:  # no or a damaged run.json: the shards against their markers only
        return RunShards(uri, level, checks, plan_note=str(e))
    given = job
    if job is None:
        job, note = job_from_run(run)
        if job is None:
            return RunShards(uri, level, checks, plan_note=note)
    fingerprint = run["job_fingerprint"] if given is None else given.fingerprint()
    checks, mismatch = against_plan(fs, checks, planned_shards(job, fingerprint), level, only)
    return RunShards(uri, level, checks, run_mismatch=mismatch)


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
    if shards.not_rendered:
        names = ", ".join(f"shard-{i:05d}" for i in shards.not_rendered[:5]) + (", ..." if len(shards.not_rendered) > 5 else "")
        warnings.warn(RunWarning(f"{uri}: {len(shards.not_rendered)} planned shards are not there ({names}): their "
                                 f"frames are missing; render into {uri} to complete it"), stacklevel=2)
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

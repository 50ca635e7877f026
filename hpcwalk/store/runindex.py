"""What a run folder holds: its committed frames (without images), what its job planned, what is missing.

Readers of a run (video, viewer, figures) start here. `open_run(uri)` reads the small columns of every
verified shard (hpcwalk/store/verify.py; a damaged shard is left out with a warning) into one table and compares it with the frames the run's job plans, so a partially
rendered run is usable and says what it lacks. `iter_images` then streams one track's images in index
order, holding at most one shard's image column at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hpcwalk.core.errors import StoreError
from hpcwalk.core.fsio import filesystem
from hpcwalk.job.plan import plan, shard
from hpcwalk.job.spec import RenderJob
from hpcwalk.store.plancheck import job_from_run
from hpcwalk.store.reader import damage_message, read_run, read_shard, verify_run
from hpcwalk.store.verify import DEFAULT_LEVEL, VerifyLevel

SCORE_COLUMN = re.compile(r"clip\d*_score")  # float columns clip_score*, clip2_score*: CLIP scores


@dataclass
class Track:
    """One (walk, method) sequence of frames: the unit a slider or a video panel shows."""

    walk: str
    kind: str
    method: str  # "" for kinds without a method
    rows: pa.Table  # committed frames of this track, sorted by index (no images); columns _file, _row
    expected: list[int] | None  # indices the job plans (None: unknown)

    @property
    def label(self) -> str:
        return self.method or self.kind

    @property
    def indices(self) -> list[int]:
        return self.rows.column("index").to_pylist()

    @property
    def missing(self) -> list[int]:
        """Planned indices with no committed frame (empty when the plan is unknown)."""
        have = set(self.indices)
        return [i for i in (self.expected or []) if i not in have]


@dataclass
class RunIndex:
    """The committed frames of one run, indexed by walk and method, and what is missing."""

    uri: str
    run: dict[str, Any]  # run.json
    files: list[str]  # committed shard files, in shard order
    table: pa.Table  # every committed frame's small columns, plus _file and _row
    job: RenderJob | None  # walks, size and shard cut rebuilt from run.json (None: unreadable, see plan_note)
    missing_shards: list[int] = field(default_factory=list)
    total_shards: int | None = None
    plan_note: str = ""  # why the plan is unknown, when it is
    planned: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # walk -> method -> indices

    @property
    def score_columns(self) -> list[str]:
        """CLIP score columns present in this run (none until the run is scored)."""
        return [f.name for f in self.table.schema
                if SCORE_COLUMN.match(f.name) and pa.types.is_floating(f.type)]

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.run.get("metadata") or {})

    def walks(self) -> list[str]:
        """Walk names in job order (committed-only walks after them, in order of appearance)."""
        names = [w.name for w in self.job.walks] if self.job else []
        for n in self.table.column("walk").to_pylist():
            if n not in names:
                names.append(n)
        return names

    def tracks(self, walk: str) -> list[Track]:
        """The walk's tracks in method order, including planned tracks with nothing committed yet."""
        if walk not in self.walks():
            raise StoreError(f"run {self.uri!r} has no walk {walk!r}: choose one of {', '.join(self.walks())}")
        rows = self.table.filter(pc.equal(self.table.column("walk"), walk))
        planned = self.planned.get(walk, {})
        methods = list(planned) if planned else []
        for m in rows.column("method").to_pylist():
            if m not in methods:
                methods.append(m)
        kind = self._kind(walk, rows)
        out = []
        for m in methods:
            t = rows.filter(pc.equal(rows.column("method"), m))
            t = t.take(pc.sort_indices(t, [("index", "ascending")]))
            out.append(Track(walk, kind, m, _dedupe(t), planned.get(m) if self.job else None))
        return out

    def missing_report(self) -> list[str]:
        """One line per gap: missing shards, then per track the missing frame indices as ranges."""
        if self.job is None:
            return [f"cannot tell what is missing: {self.plan_note}"]
        lines = []
        if self.missing_shards:
            names = ", ".join(f"shard-{i:05d}" for i in self.missing_shards)
            lines.append(f"missing {len(self.missing_shards)} of {self.total_shards} shards: {names}")
        for w in self.walks():
            for t in self.tracks(w):
                if t.missing:
                    lines.append(f"walk {w!r} {t.label}: {len(t.missing)} of {len(t.expected or [])} frames missing "
                                 f"(indices {ranges(t.missing)})")
        return lines

    def _kind(self, walk: str, rows: pa.Table) -> str:
        if self.job:
            for w in self.job.walks:
                if w.name == walk:
                    return w.kind
        return rows.column("kind")[0].as_py()


def open_run(uri: str, level: VerifyLevel = DEFAULT_LEVEL) -> RunIndex:
    """Index a run folder: small columns of every verified shard, and the gaps against its plan."""
    # 1. the run and its shards, verified against their markers (damaged ones left out, with a warning)
    run = read_run(uri)
    shards = verify_run(uri, level)
    shards.warn()
    fs, _ = filesystem(uri)
    # 2. small columns only (no images, no embeddings), with each row's file and row number
    parts, files, committed = [], [], set()
    for c in shards.ok:
        t = _small_columns(uri, c.parquet, fs)
        if t is None:
            continue
        t = t.append_column("_file", pa.array([len(files)] * t.num_rows, pa.int32()))
        parts.append(t.append_column("_row", pa.array(range(t.num_rows), pa.int32())))
        files.append(c.parquet)
        committed.add(c.index)
    if not parts:
        raise StoreError(f"{uri!r} has no committed shards that pass verification yet: render into it first")
    table = pa.concat_tables(parts, promote_options="default")
    # 3. what the job planned, and which of its shards are not committed
    job, note = job_from_run(run)
    rows = plan(job) if job else []
    cut = shard(rows, job.output.shard_size) if job else []
    idx = RunIndex(uri, run, files, _final_frames(table), job, plan_note=note)
    if job is not None:
        for r in rows:
            if r.pace_pass != "coarse":
                idx.planned.setdefault(r.walk, {}).setdefault(r.method, []).append(r.index)
        expected = {s.index for s in cut}
        idx.total_shards = len(expected)
        idx.missing_shards = sorted(expected - committed)
    return idx


def _final_frames(table: pa.Table) -> pa.Table:
    """The walks as they are shown: the coarse pass of evenly paced walks (pace_pass "coarse", the frames
    their final gammas were measured on) left out; runs written before pace_pass existed keep every row."""
    if "pace_pass" not in table.column_names:
        return table
    return table.filter(pc.invert(pc.fill_null(pc.equal(table.column("pace_pass"), "coarse"), False)))


def _small_columns(uri: str, path: str, fs) -> pa.Table | None:
    """The columns of one shard without images or embeddings (None, with a warning, when unreadable)."""
    try:
        schema = pq.read_schema(path, filesystem=fs)
    except (pa.ArrowException, OSError):
        return read_shard(uri, path, [])  # warns with the reason
    cols = [x.name for x in schema if not (pa.types.is_binary(x.type) or pa.types.is_large_binary(x.type)
                                           or pa.types.is_list(x.type) or pa.types.is_fixed_size_list(x.type))]
    return read_shard(uri, path, cols)


def iter_images(index: RunIndex, track: Track) -> Iterator[tuple[int, bytes]]:
    """(index, encoded image) of a track in index order; one shard's image column in memory at a time."""
    fs, _ = filesystem(index.uri)
    files = track.rows.column("_file").to_pylist()
    rows = track.rows.column("_row").to_pylist()
    indices = track.indices
    i = 0
    while i < len(files):
        j = i
        while j < len(files) and files[j] == files[i]:
            j += 1
        try:
            images = pq.read_table(index.files[files[i]], columns=["image"], filesystem=fs).column("image")
        except (pa.ArrowException, OSError) as e:  # changed since open_run verified it
            name = index.files[files[i]].rpartition("/")[2]
            raise StoreError(damage_message(index.uri, f"{name}: unreadable ({type(e).__name__})", "stopped")) from None
        picked = images.take(pa.array(rows[i:j]))
        del images
        for k in range(j - i):
            yield indices[i + k], picked[k].as_py()
        i = j


PARAM_COLUMNS = ("index", "gamma", "t", "std", "prompt", "segment", "time_s")  # what `param_text` reads


def param_rows(rows: pa.Table) -> list[dict[str, Any]]:
    """The `param_text` columns of a track's rows (time_s only where the run has it), as dicts."""
    return rows.select([c for c in PARAM_COLUMNS if c in rows.column_names]).to_pylist()


def param_text(kind: str, row: dict[str, Any], segments: int = 1) -> str:
    """The walk parameter of one frame row: 'gamma 0.333', 'seg 2/3 gamma 0.500', 't 5', 'std 0.750', a prompt;
    an audio-timed frame adds its time ('gamma 0.412 at 1.20 s')."""
    if kind in ("latent", "text", "images", "keyframes"):
        at = f" at {row['time_s']:.2f} s" if row.get("time_s") is not None else ""
        return (f"seg {row['segment'] + 1}/{segments} " if segments > 1 else "") + f"gamma {row['gamma']:.3f}{at}"
    if kind in ("translate", "mix"):
        return f"t {row['t']}"
    if kind == "std":
        return f"std {row['std']:.3f}"
    return str(row["prompt"])


def evenly_spaced(n: int, count: int) -> list[int]:
    """Up to `count` positions in range(n), evenly spaced, first and last included."""
    count = min(count, n)
    return sorted({round(k * (n - 1) / max(1, count - 1)) for k in range(count)})


def ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, start = [], None
    for k, v in enumerate(values):
        if start is None:
            start = v
        if k + 1 == len(values) or values[k + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


def _dedupe(t: pa.Table) -> pa.Table:
    """Keep the first committed row per index (a frame committed twice is shown once)."""
    seen, keep = set(), []
    for k, i in enumerate(t.column("index").to_pylist()):
        if i not in seen:
            seen.add(i)
            keep.append(k)
    return t if len(keep) == t.num_rows else t.take(pa.array(keep))

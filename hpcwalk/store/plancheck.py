"""Shards against the plan: a run folder holds exactly the shards its job plans, each holding its own frames.

A commit marker vouches for its Parquet file's bytes (hpcwalk/store/verify.py); it says nothing of whether
those bytes belong in this run. Here each shard that passed that check is held against the plan of the job
in run.json (or the job being rendered), from what the marker claims and the Parquet footer, never decoding
an image:

    foreign     it carries another job's fingerprint (copied or linked from another run)
    extra       the plan has no shard of that number
    duplicate   it holds the frames of another planned shard that is present and ok (a copy)
    misplaced   it holds frames the plan puts in another shard, or no planned shard's frames
    bad marker  the marker's rows or shard number disagree with the file or the plan (an edited marker)
    missing     a planned shard with neither file nor marker (deleted, or not rendered yet)

A shard's frames are compared as a digest: sha256 of its frame ids in row order, one per line
(`frames_digest`). Markers written since carry `job_fingerprint` and `frames`; the `quick` level trusts
them, the `full` level (which has read every byte for the sha256 already) reads the footer and the
`frame_id` column instead. Older markers carry neither: their footer and ids are read at both levels.

When no shard carries run.json's fingerprint but some carry another, run.json is the one that lies (copied
from another run): `RunShards.run_mismatch` says so, naming both, and a render into the folder is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Collection

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hpcwalk.job.plan import plan, shard
from hpcwalk.job.spec import Keyframe, NoiseKey, OutputSpec, RenderJob, Sampling, Walk
from hpcwalk.store.verify import ShardCheck, VerifyLevel


def frames_digest(frame_ids: list[str]) -> str:
    """sha256 of a shard's frame ids in row order, one per line: what a marker's `frames` records."""
    return hashlib.sha256("\n".join(frame_ids).encode()).hexdigest()


@dataclass(frozen=True)
class Planned:
    """The shards a job plans: per shard number its row count and frames digest."""

    fingerprint: str
    shards: dict[int, tuple[int, str]]

    @property
    def by_digest(self) -> dict[str, int]:
        return {d: i for i, (_, d) in self.shards.items()}


_PLANNED: dict[tuple[str, int], Planned] = {}  # one plan per job and shard size in a process


def planned_shards(job: RenderJob, fingerprint: str) -> Planned:
    """The plan of `job` cut into its shards (computed once per job in a process)."""
    key = (fingerprint, job.output.shard_size)
    if key not in _PLANNED:
        cut = shard(plan(job), job.output.shard_size)
        _PLANNED[key] = Planned(fingerprint, {s.index: (len(s.rows), frames_digest([r.frame_id for r in s.rows]))
                                              for s in cut})
    return _PLANNED[key]


def job_from_run(run: dict[str, Any]) -> tuple[RenderJob | None, str]:
    """Rebuild from run.json the parts of the job that decide the plan (walks, size, shard cut); (None, why)
    when this version cannot read it."""
    try:
        d = run["job"]
        walks = tuple(Walk(**{**{k: tuple(v) if isinstance(v, list) else v for k, v in _known(Walk, w).items()},
                              "seeds": tuple(NoiseKey(**s) for s in w["seeds"]),
                              "keyframes": tuple(Keyframe(k["prompt"], NoiseKey(**k["seed"]), k["frames"])
                                                 for k in w.get("keyframes", ()))}) for w in d["walks"])
        return RenderJob(sampling=Sampling(**_known(Sampling, d["sampling"])),
                         output=OutputSpec(**_known(OutputSpec, d["output"])), walks=walks), ""
    except Exception as e:  # a hand-edited run.json can hold anything: the plan is then unknown, never a traceback
        return None, f"run.json's job cannot be read by this hpcwalk version ({type(e).__name__}: {str(e)[:80]})"


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def against_plan(fs: pafs.FileSystem, checks: list[ShardCheck], planned: Planned, level: VerifyLevel,
                 only: Collection[int] | None = None) -> tuple[list[ShardCheck], str]:
    """`checks` (verify.check_shards) with every ok shard held against the plan and each planned shard that
    has neither file nor marker added as missing, in shard order; and the run mismatch ('' when none)."""
    content = {c.name: _content(fs, c, level) for c in checks if c.ok}
    ok_digest = {}  # digest -> shard number, of the shards holding their own frames
    for c in checks:
        fp, rows, digest = content.get(c.name, ("", 0, ""))
        if c.ok and fp == planned.fingerprint and c.index in planned.shards and planned.shards[c.index][1] == digest:
            ok_digest[digest] = c.index
    owner = planned.by_digest
    out = []
    for c in checks:
        if c.ok:
            c = _judge(c, content[c.name], planned, owner, ok_digest, level)
        elif c.index is not None and c.index not in planned.shards and c.state != "stray temp file":
            c = dataclasses.replace(c, state="extra", detail=f"the plan has {len(planned.shards)} shards and no "
                                    f"shard {c.index}; it is {c.describe().split(': ', 1)[1]}")
        out.append(c)
    present = {c.index for c in checks if c.index is not None and c.state != "stray temp file"}
    for i in sorted(set(planned.shards) - present):
        if only is None or i in only:
            out.append(ShardCheck(f"shard-{i:05d}", "missing", i, None, None,
                                  detail="planned, but neither its file nor its marker is there"))
    out.sort(key=lambda c: (c.state == "stray temp file", c.index if c.index is not None else -1, c.name))
    carried = Counter(fp for fp, _, _ in content.values() if fp)
    mismatch = ""
    if carried and planned.fingerprint not in carried:
        other, n = carried.most_common(1)[0]
        mismatch = (f"run.json says job {planned.fingerprint} but its {n} committed shard(s) carry job {other} "
                    "(run.json copied from another run?)")
    return out, mismatch


def _judge(c: ShardCheck, content: tuple[str, int, str], planned: Planned, owner: dict[str, int],
           ok_digest: dict[str, int], level: VerifyLevel) -> ShardCheck:
    fp, rows, digest = content
    bad = lambda state, detail: dataclasses.replace(c, state=state, detail=detail)  # noqa: E731
    if not fp:
        return bad("foreign", "its Parquet footer names no hpcwalk job")
    if fp != planned.fingerprint:
        return bad("foreign", f"it carries job {fp}, this run is job {planned.fingerprint}")
    if c.index not in planned.shards:
        return bad("extra", f"the plan has {len(planned.shards)} shards and no shard {c.index}")
    want_rows, want_digest = planned.shards[c.index]
    if digest != want_digest:
        j = owner.get(digest)
        if j is not None and ok_digest.get(digest) == j:
            return bad("duplicate", f"a copy of shard-{j:05d}")
        return bad("misplaced", f"it holds shard-{j:05d}'s frames" if j is not None
                   else "it holds frames the plan does not put in any shard")
    claims = c.claims or {}
    for key, have in (("job_fingerprint", fp), ("frames", digest)):  # at the full level, from the file itself
        if claims.get(key, have) != have:
            return bad("bad marker", f"the marker's {key} is not the file's")
    if claims.get("shard", c.index) != c.index:
        return bad("bad marker", f"the marker names shard {claims['shard']}")
    if c.rows != want_rows:
        return bad("bad marker", f"the marker says {c.rows} rows, the plan {want_rows}")
    if rows != want_rows:
        return bad("bad marker", f"the file holds {rows} rows, the plan {want_rows}")
    return c


def _content(fs: pafs.FileSystem, c: ShardCheck, level: VerifyLevel) -> tuple[str, int, str]:
    """(fingerprint, rows, frames digest) of an ok shard: the marker's claims at the quick level when it has
    them, else the Parquet footer and frame_id column (('', 0, '') when they cannot be read)."""
    claims = c.claims or {}
    if level == "quick" and isinstance(claims.get("job_fingerprint"), str) and isinstance(claims.get("frames"), str):
        return claims["job_fingerprint"], c.rows, claims["frames"]
    try:
        f = pq.ParquetFile(c.parquet, filesystem=fs)
        meta = f.schema_arrow.metadata or {}
        ids = f.read(columns=["frame_id"]).column("frame_id").to_pylist()
    except (pa.ArrowException, OSError, KeyError):
        return "", 0, ""
    return meta.get(b"job_fingerprint", b"").decode(errors="replace"), f.metadata.num_rows, frames_digest(ids)

"""Even pacing in two passes: an evenly paced walk's final gammas, placed from its committed coarse pass.

    1. the coarse pass (rows with pace_pass "coarse", uniform gammas) renders with the other stage-0 shards
    2. once every coarse shard of the walk is committed and verified, its frames are read back and the
       steps between consecutive coarse frames measured: the chord sqrt(2 (1 - cos)) of their CLIP image
       embeddings (`clip`), or the RMS of their pixel differences (`pixel`): both add up along a path
    3. per method and segment, pacing.even_gammas: the final gammas cover equal shares of the path
    4. RUN/pacing/<walk>.json (walk_file's name; written once, atomically): the coarse gammas, distances, final gammas, which
       final frames reuse a coarse frame, the coarse shards' sha256 and the coarse pass's step_cv
    5. the final rows (stage 1) take their gammas from that file; a final frame at a coarse frame's gamma
       (every segment's ends, and any the snap put there) copies that frame (`reused_from`) when its shard
       is committed, instead of rendering it again
    6. after the final pass, RUN/pacing/<walk>.steps.json: the final frames' step_cv in the same measure

The file is a function of committed data only, so a rerun that finds no file computes a bit-equal one
(a kill between the passes loses nothing), and a rerun that finds it uses it as it is: the final shards
already committed were placed by it. A coarse shard re-rendered since (it failed verification) is
named in a warning when its sha256 differs from the file's, and the file is kept.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hpcwalk.core.fsio import filesystem, walk_file, write_atomic
from hpcwalk.job import pacing
from hpcwalk.job.spec import FrameRow, RenderJob, Shard, Walk
from hpcwalk.store.reader import verify_run
from hpcwalk.store.runfolder import PACING_DIR
from hpcwalk.store.schema import PROVENANCE_FIELDS, frames_table
from hpcwalk.store.verify import RunWarning, parse_json_object
from hpcwalk.store.writer import ShardStore

# End-to-end distance below which a segment's two ends count as the same image, per measure: pixel RMS under
# one grey level (8-bit rounding moves identical latents' frames by at most that), a CLIP chord under 1e-3
# (float16 embeddings of one image agree to about that). Pacing the noise between such ends would place
# frames at random (a walk from seed 1 to seed 1: step_cv 0.707 -> 1.732).
NOISE_FLOOR = {"pixel": 1.0 / 255.0, "clip": 1e-3}


def even_walks(job: RenderJob) -> list[Walk]:
    return [w for w in job.walks if w.pace == "even"]


def measure_of(job: RenderJob, w: Walk) -> str:
    """clip or pixel: the walk's pace_measure, `auto` resolved (clip when [clip] is enabled)."""
    if w.pace_measure != "auto":
        return w.pace_measure
    return "clip" if job.clip.enabled else "pixel"


def plan_path(uri: str, walk: str, kind: str = "json") -> str:
    """RUN/pacing/STEM.json (the plan) or STEM.steps.json (`kind` "steps.json"): core.fsio.walk_file."""
    _, root = filesystem(uri)
    return f"{root}/{PACING_DIR}/{walk_file(walk, kind)}"


# ---------------------------------------------------------------------------------------------
# 1. The driver, between the passes: place the final rows
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Placed:
    """What `place_final` decided: final shards that can render now, those that wait, and report lines."""

    ready: list[Shard]
    waiting: dict[int, str]  # shard index -> why it waits (its walks' coarse passes are incomplete)
    lines: list[str]


def place_final(job: RenderJob, out: str, shards: Sequence[Shard], todo: Sequence[Shard],
                level: str = "full") -> Placed:
    """The stage-1 shards of `todo` with their final gammas placed (from RUN/pacing, computed and written
    first where missing and the walk's coarse pass is committed); `shards` is the job's whole cut."""
    walks = even_walks(job)
    if not walks:
        return Placed(list(todo), {}, [])
    holders = _coarse_shards(shards)
    checked = verify_run(out, level, only=set().union(*holders.values()))  # type: ignore[arg-type]
    ok = {c.index: c for c in checked.ok}
    where = _coarse_index(shards)
    plans: dict[str, dict[str, Any]] = {}
    waits: dict[str, str] = {}
    lines: list[str] = []
    for w in walks:
        need = holders.get(w.name, set())
        lacking = sorted(need - set(ok))
        if lacking:  # also with a plan on disk: final frames are copied from the coarse shards
            waits[w.name] = (f"waits for the coarse pass of walk {w.name!r} (shard(s) "
                             f"{', '.join(f'shard-{i:05d}' for i in lacking)} not committed): rerun to render it")
            continue
        finals = [r for r in plan_rows(shards, w.name) if r.stage]
        existing = _read_json(out, plan_path(out, w.name), lambda d: _plan_fits(d, finals, where))
        if existing is not None:
            plans[w.name] = existing
            changed = [int(k) for k, sha in existing["coarse_shards"].items() if int(k) in ok and ok[int(k)].sha256 != sha]
            if changed:
                warnings.warn(RunWarning(f"walk {w.name!r}: coarse shard(s) {changed} changed since its pacing plan "
                                         f"was made ({plan_path(out, w.name)}); the plan is kept"), stacklevel=3)
        else:
            plans[w.name] = make_plan(job, w, out, {i: ok[i] for i in need})
            _write_json(out, plan_path(out, w.name), plans[w.name])
        lines += [f"walk {w.name!r} {m}: step_cv of the uniform coarse pass {_cv(p['step_cv_coarse'])} "
                  f"({p['coarse_frames']} frames, {plans[w.name]['measure']} steps)"
                  for m, p in plans[w.name]["methods"].items()]
    ready, waiting = [], {}
    for s in todo:
        why = next((waits[r.walk] for r in s.rows if r.walk in waits), None)
        if why:
            waiting[s.index] = why
        else:
            ready.append(Shard(s.index, tuple(fill(r, plans[r.walk], where) if r.stage else r for r in s.rows)))
    return Placed(ready, waiting, lines)


def plan_rows(shards: Sequence[Shard], walk: str) -> list[FrameRow]:
    return [r for s in shards for r in s.rows if r.walk == walk]


def _coarse_shards(shards: Sequence[Shard]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for s in shards:
        for r in s.rows:
            if r.pace_pass == "coarse":
                out.setdefault(r.walk, set()).add(s.index)
    return out


def _coarse_index(shards: Sequence[Shard]) -> dict[str, int]:
    """Coarse frame id -> the shard that holds it."""
    return {r.frame_id: s.index for s in shards for r in s.rows if r.pace_pass == "coarse"}


def fill(r: FrameRow, plan: dict[str, Any], where: dict[str, int]) -> FrameRow:
    """A final row with its gamma from the plan, and the coarse frame it reuses (if any)."""
    m = plan["methods"][r.method]
    c = m["reuse"][r.index]
    if c < 0:
        return dataclasses.replace(r, gamma=m["final_gammas"][r.index])
    fid = f"{r.walk}/{r.method}/c{c:05d}"
    return dataclasses.replace(r, gamma=m["final_gammas"][r.index], reused_from=fid, reuse_shard=where[fid])


# ---------------------------------------------------------------------------------------------
# 2. The plan: distances of the coarse pass -> final gammas
# ---------------------------------------------------------------------------------------------


def make_plan(job: RenderJob, w: Walk, out: str, coarse: dict[int, Any]) -> dict[str, Any]:
    """The pacing plan of walk `w` from its committed coarse shards (`coarse`: shard index -> ShardCheck)."""
    from hpcwalk.job.plan import chain_frames, coarse_frames, segment_frames

    measure = measure_of(job, w)
    frames = _coarse_frames_of(out, w.name, [coarse[i].parquet for i in sorted(coarse)], measure)
    seg_final, seg_coarse = segment_frames(w), coarse_frames(w)
    methods = {}
    for m in w.methods:
        rows = frames.get(m, [])
        if len(rows) != chain_frames(seg_coarse):
            raise RuntimeError(f"walk {w.name!r} {m}: the committed coarse pass has {len(rows)} frames, the plan "
                               f"{chain_frames(seg_coarse)}: rerun the render")
        d = _distances(rows, measure)  # (n - 1,) between consecutive coarse frames, in walk order
        gammas, reuse, dist = [], [], []
        first = 0  # walk index of the segment's first coarse frame
        for k, (f, c) in enumerate(zip(seg_final, seg_coarse)):
            g = np.array([0.0] + [i / (c - 1) for i in range(1, c)])  # the coarse rows' gammas, bit for bit
            dk = d[first : first + c - 1]
            ends = _distances([rows[first], rows[first + c - 1]], measure)[0]  # end to end, in the same measure
            if dk.sum() > 0 and ends < NOISE_FLOOR[measure]:  # the same image at both ends: steps are noise
                warnings.warn(RunWarning(
                    f"walk {w.name!r} {m} segment {k}: its two ends are the same image ({measure} distance "
                    f"{ends:.2e}, below the noise floor {NOISE_FLOOR[measure]:.1e}), so the path has no length to "
                    f"pace: its {f} frames are placed uniformly (give the segment two different ends, or pace = "
                    f"\"uniform\")"), stacklevel=2)
            out_k = pacing.even_gammas(g, dk, f, w.pace_method) if dk.sum() > 0 and ends >= NOISE_FLOOR[measure] \
                else np.array([0.0] + [i / (f - 1) for i in range(1, f)])  # no motion: any placement is even
            idx = pacing.reuse_index(out_k, g)
            keep = slice(0, f) if k == 0 else slice(1, f)
            gammas += [float(x) for x in out_k[keep]]
            reuse += [int(first + j) if j >= 0 else -1 for j in idx[keep]]
            dist.append([float(x) for x in dk])
            first += c - 1
        methods[m] = {"coarse_frames": len(rows), "distances": dist, "final_gammas": gammas, "reuse": reuse,
                      "step_cv_coarse": step_cv(d), "segment_step_cv_coarse": segment_cv(rows, d)}
    return {"walk": w.name, "job_fingerprint": job.fingerprint(), "measure": measure, "pace_method": w.pace_method,
            "coarse_shards": {str(i): coarse[i].sha256 for i in sorted(coarse)}, "methods": methods}


def step_cv(d: np.ndarray) -> float | None:
    """std / mean of a walk's steps (0: perfectly even); None when it does not move."""
    d = np.asarray(d, np.float64)
    return float(d.std() / d.mean()) if d.size and d.mean() > 0 else None


def segment_cv(rows: list[dict[str, Any]], d: np.ndarray) -> float | None:
    """The mean over segments of each segment's step_cv (what even pacing evens: the steps within a segment;
    over the whole walk, segments of other lengths or frame counts differ in step size). Step i, from frame
    i - 1 to frame i, belongs to frame i's segment."""
    seg = np.array([r["segment"] for r in rows[1:]])
    cvs = [step_cv(d[seg == k]) for k in np.unique(seg)]
    cvs = [c for c in cvs if c is not None]
    return float(np.mean(cvs)) if cvs else None


def _cv(v: float | None) -> str:
    return "n/a (no motion)" if v is None else f"{v:.3f}"


def _distances(rows: list[dict[str, Any]], measure: str) -> np.ndarray:
    if measure == "clip":
        emb = np.stack([np.asarray(r["clip_image"], np.float64) for r in rows])  # (n, D)
        from hpcwalk.core.metrics import step_distances

        return pacing.chord_distance(step_distances(emb))
    from PIL import Image

    imgs = np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows])  # (n, H, W, 3)
    return pacing.pixel_distances(imgs)


def _coarse_frames_of(out: str, walk: str, files: list[str], measure: str, pace_pass: str = "coarse"
                      ) -> dict[str, list[dict[str, Any]]]:
    """method -> the walk's frames of one pass in index order (index, gamma, and the measured column)."""
    fs, _ = filesystem(out)
    col = "clip_image" if measure == "clip" else "image"
    by: dict[str, list[dict[str, Any]]] = {}
    for f in files:
        t = pq.read_table(f, columns=["walk", "method", "index", "segment", "gamma", "pace_pass", col], filesystem=fs)
        for r in t.to_pylist():
            if r["walk"] == walk and r["pace_pass"] == pace_pass:
                by.setdefault(r["method"], []).append(r)
    return {m: sorted(rs, key=lambda r: r["index"]) for m, rs in by.items()}


def _read_json(out: str, path: str, fits: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """A pacing file, or None when it is missing or damaged (not JSON, or not what `fits` expects: then with a
    RunWarning); either way the caller computes it again from committed data."""
    fs, _ = filesystem(out)
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except FileNotFoundError:
        return None
    d, why = parse_json_object(data)
    if d is not None and not fits(d):
        why = "not the contents hpcwalk writes there"
    if why:
        warnings.warn(RunWarning(f"{path}: damaged ({why}, {len(data):,} bytes): computed again from the "
                                 "committed frames"), stacklevel=3)
        return None
    return d


def _plan_fits(plan: dict[str, Any], finals: Sequence[FrameRow], where: dict[str, int]) -> bool:
    """Whether a plan read back places every final row: reuse indices of existing coarse frames (or -1),
    finite gammas, and the figures the report lines print."""
    try:
        if not isinstance(plan["coarse_shards"], dict) or not isinstance(plan["measure"], str):
            return False
        for p in plan["methods"].values():
            if not isinstance(p["coarse_frames"], int) or not _is_cv(p["step_cv_coarse"]):
                return False
        for r in finals:
            c = plan["methods"][r.method]["reuse"][r.index]
            g = fill(r, plan, where).gamma
            if isinstance(c, bool) or not isinstance(c, int) or c < -1 or not _is_finite(g):
                return False
        return True
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return False


def _steps_fit(steps: dict[str, Any]) -> bool:
    """Whether a WALK.steps.json read back holds the figures measure_after prints."""
    methods = steps.get("methods")
    return isinstance(steps.get("measure"), str) and isinstance(methods, dict) and all(
        isinstance(v, dict) and isinstance(v.get("frames"), int)
        and all(_is_cv(v.get(k)) for k in ("step_cv_coarse", "step_cv_final", "segment_step_cv_coarse",
                                            "segment_step_cv_final"))
        for v in methods.values())


def _is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def _is_cv(v: Any) -> bool:
    return v is None or _is_finite(v)


def _write_json(out: str, path: str, data: dict[str, Any]) -> None:
    fs, _ = filesystem(out)
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    write_atomic(fs, path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------------------------------------
# 3. Reused frames (in the worker committing a final shard), step_cv after the final pass (driver)
# ---------------------------------------------------------------------------------------------


def with_reused(store: ShardStore, shard: Shard, rendered: pa.Table | None, height: int, width: int) -> pa.Table:
    """The shard's table in row order: rendered rows as they are, reused rows copied from their coarse frames
    (every column but the provenance ones, which are the final row's; `shard` is this shard)."""
    names = {f.name for f in PROVENANCE_FIELDS}
    coarse: dict[int, pa.Table] = {}
    at: dict[str, int] = {}  # coarse frame id -> its row in its shard's table
    for r in shard.rows:
        if r.reused_from is not None and r.reuse_shard not in coarse:
            t = pq.read_table(f"{store.frames}/shard-{r.reuse_shard:05d}.parquet", filesystem=store.fs)
            coarse[r.reuse_shard] = t
            at.update((fid, k) for k, fid in enumerate(t.column("frame_id").to_pylist()))
    template = rendered if rendered is not None and rendered.num_rows else next(iter(coarse.values()))
    rest = [n for n in template.column_names if n not in names]
    pieces, k = [], 0
    for r in shard.rows:
        if r.reused_from is None:
            pieces.append(rendered.select(rest).slice(k, 1))
            k += 1
        else:
            pieces.append(coarse[r.reuse_shard].select(rest).slice(at[r.reused_from], 1))
    body = pa.concat_tables([p.replace_schema_metadata(None) for p in pieces], promote_options="default")
    body = body.set_column(body.column_names.index("shard"), "shard", pa.array([shard.index] * body.num_rows, pa.int32()))
    head = frames_table(list(shard.rows), [b""] * len(shard.rows), np.zeros(len(shard.rows)), shard.index, height, width)
    cols = {n: head.column(n) for n in head.column_names if n in names}
    cols.update({n: body.column(n) for n in rest})
    fields = [head.schema.field(n) for n in head.column_names if n in names] + [body.schema.field(n) for n in rest]
    return pa.Table.from_pydict(cols, schema=pa.schema(fields))


def measure_after(job: RenderJob, out: str, shards: Sequence[Shard], rendered: set[int], level: str = "full"
                  ) -> list[str]:
    """step_cv of each even walk's final frames, once they are all committed: RUN/pacing/<walk>.steps.json
    (rewritten when final shards of the walk rendered in this run, or when it is missing); one line per method."""
    walks = even_walks(job)
    finals = {w.name: sorted({s.index for s in shards for r in s.rows if r.walk == w.name and r.stage}) for w in walks}
    only = {i for mine in finals.values() for i in mine}  # the shards read here: the final passes
    checked = {c.index: c for c in verify_run(out, level, only=only).ok} if only else {}  # type: ignore[arg-type]
    lines = []
    for w in walks:
        mine = finals[w.name]
        plan = _read_json(out, plan_path(out, w.name), lambda d: _plan_fits(d, [], {}))
        if plan is None or not mine or any(i not in checked for i in mine):
            continue
        path = plan_path(out, w.name, "steps.json")
        steps = _read_json(out, path, _steps_fit)
        if steps is None or set(mine) & rendered:
            frames = _coarse_frames_of(out, w.name, [checked[i].parquet for i in mine], plan["measure"], "final")
            steps = {"walk": w.name, "measure": plan["measure"], "methods": {}}
            for m, rs in frames.items():
                d, c = _distances(rs, plan["measure"]), plan["methods"][m]
                steps["methods"][m] = {"frames": len(rs), "step_cv_coarse": c["step_cv_coarse"],
                                       "step_cv_final": step_cv(d),
                                       "segment_step_cv_coarse": c.get("segment_step_cv_coarse"),
                                       "segment_step_cv_final": segment_cv(rs, d)}
            _write_json(out, path, steps)
        for m, v in steps["methods"].items():
            line = (f"walk {w.name!r} {m}: step_cv {_cv(v['step_cv_coarse'])} (uniform coarse pass) -> "
                    f"{_cv(v['step_cv_final'])} ({v['frames']} evenly paced frames, {steps['measure']} steps)")
            if len({r.segment for r in plan_rows(shards, w.name)}) > 1:
                line += (f"; within segments {_cv(v['segment_step_cv_coarse'])} -> {_cv(v['segment_step_cv_final'])}")
            lines.append(line)
    return lines

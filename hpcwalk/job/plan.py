"""Keyframe walks that move prompt and seed together: keyframes -> one (segment, local gamma) row per frame.

A keyframe walk passes through K >= 2 keyframes, each a prompt and a seed; segment k runs from
keyframe k to keyframe k + 1 in `frames` frames of its own (both ends counted, as in a latent walk),
and consecutive segments share their keyframe, so the walk has 1 + sum_k (frames_k - 1) frames. The
cut is the one `job.plan` makes for latent and text walks (`job._segments`): frame 0 is
(segment 0, gamma 0); segment k then adds gammas i / (frames_k - 1), i = 1 .. frames_k - 1, so
keyframe k + 1 is the row (segment k, gamma 1.0). With equal frame counts the rows are exactly
`job._segments(frames, K)`.

Pure and torch-free; rendering a row interpolates the latents of its two seeds and the text
embeddings of its two prompts at its gamma (hpcwalk.render.interp), which a later change wires in.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hpcwalk.core.errors import JobError
from hpcwalk.job.bounds import MAX_SEGMENT_FRAMES
from hpcwalk.job.pacing import ease
from hpcwalk.job.spec import FramePlan, FrameRow, Keyframe, NoiseKey, RenderJob, Shard, Walk


def plan(job: RenderJob) -> FramePlan:
    """Expand every walk of the job into frame rows, in walk order; the final rows of evenly paced walks
    (stage 1: placed from the coarse pass) after all the others."""
    pass  # lazily: placement imports this module

    rows: FramePlan = []
    late: FramePlan = []
    for w in job.walks:
        walk = walk_rows(w, job.latent_hw[1])
        if w.pace == "even":
            late.extend(r for r in walk if r.stage)
            walk = [r for r in walk if not r.stage]
        rows.extend(walk)
    return rows + late


def plan_size(job: RenderJob) -> int:
    """The number of rows `plan(job)` returns, counted without building them."""
    pass

    return sum(walk_size(w, job.latent_hw[1]) for w in job.walks)


def _segments(frames: int, keyframes: int, gammas: Sequence[float] = ()) -> list[tuple[int, float]]:
    """(segment, local gamma) per frame; segments share their keyframe; gamma = i / (frames - 1), or the
    walk's explicit gammas (two keyframes only). The study prints its grid as {0, 1/(n-1), 1/(n-2), ..., 1};
    read as a typo for i/(n-1): its n frames are evenly spaced and 1/(n-2) > 1/(n-1) would not increase."""
    if gammas:
        return [(0, float(g)) for g in gammas]
    out = [(0, 0.0)]
    for k in range(keyframes - 1):
        out.extend((k, i / (frames - 1)) for i in range(1, frames))
    return out


def _scoring(w: Walk, k: int) -> str:
    """The scoring text of the walk's k-th prompt (its own prompt unless score_prompt(s) say otherwise)."""
    if w.score_prompts:
        return w.score_prompts[k]
    return w.score_prompt or (w.prompts[k] if w.prompts else w.prompt)


def shard(rows: FramePlan, size: int) -> list[Shard]:
    """Cut the plan into consecutive shards of `size` rows (the last may be shorter); the stage-1 rows at the
    plan's end (final rows of evenly paced walks) start a shard of their own, numbered after the others."""
    if size < 1:
        raise JobError(f"shard size must be >= 1, got {size}")
    split = len(rows)
    while split > 0 and rows[split - 1].stage:
        split -= 1
    out = [Shard(i, tuple(rows[j : min(j + size, split)])) for i, j in enumerate(range(0, split, size))]
    return out + [Shard(len(out) + i, tuple(rows[j : j + size])) for i, j in enumerate(range(split, len(rows), size))]

COARSE = "c"  # frame-id prefix of coarse-pass rows: WALK/METHOD/c00003


def walk_rows(w: Walk, latent_w: int) -> list[FrameRow]:
    """Every row of one walk, in walk order (methods one after another; an even walk's coarse pass first)."""
    if w.kind in GAMMA_KINDS:
        return _gamma_rows(w)
    s0 = w.seeds[0]
    if w.kind in ("translate", "mix"):
        lin = list(range(0, latent_w, w.stride)) + [latent_w]
        ts = lin if w.easing == "linear" else [int(np.rint(latent_w * e)) for e in _eased(w, [t / latent_w for t in lin])]
        b = w.seeds[1]
        method = w.layout if w.kind == "mix" else ""  # a mix walk's "method" is its layout
        return [FrameRow(f"{w.name}/{w.kind}/{i:05d}", w.name, w.kind, method, i, 0, s0.seed, s0.draw, w.prompt,
                         seed_b=b.seed, draw_b=b.draw, t=t, score_prompt=_scoring(w, 0), position=t0 / latent_w,
                         **_timing(w))
                for i, (t, t0) in enumerate(zip(ts, lin))]
    if w.kind == "std":
        us = [i / (w.frames - 1) for i in range(w.frames)]
        span = w.std_max - w.std_min
        stds = ([w.std_min + span * i / (w.frames - 1) for i in range(w.frames)] if w.easing == "linear"
                else [w.std_min + span * e for e in _eased(w, us)])
        return [FrameRow(f"{w.name}/std/{i:05d}", w.name, w.kind, "", i, 0, s0.seed, s0.draw, w.prompt, std=v,
                         score_prompt=_scoring(w, 0), position=u, **_timing(w))
                for i, (v, u) in enumerate(zip(stds, us))]
    # prompts: one latent under several prompts (no positions, no easing)
    return [FrameRow(f"{w.name}/prompts/{i:05d}", w.name, w.kind, "", i, 0, s0.seed, s0.draw, p,
                     score_prompt=_scoring(w, i))
            for i, p in enumerate(w.prompts)]


def walk_size(w: Walk, latent_w: int) -> int:
    """The rows `walk_rows` gives, counted without building them."""
    if w.kind in GAMMA_KINDS:
        per = chain_frames(segment_frames(w))
        if w.pace == "even":
            per += chain_frames(coarse_frames(w))
        return len(w.methods) * per
    if w.kind in ("translate", "mix"):
        return len(range(0, latent_w, w.stride)) + 1
    return w.frames if w.kind == "std" else len(w.prompts)


def auto_coarse(frames: int) -> int:
    """The default coarse pass of a segment of `frames`: ceil(frames / 4) + 1, at least 3, at most frames."""
    return min(frames, max(3, math.ceil(frames / 4) + 1))


def coarse_frames(w: Walk) -> list[int]:
    """Frames of each segment's coarse pass (both ends included): pace_coarse, or `auto_coarse` when it is 0."""
    return [min(f, w.pace_coarse) if w.pace_coarse else auto_coarse(f) for f in segment_frames(w)]


# ---------------------------------------------------------------------------------------------
# Walks along segments: latent, text, images, keyframes
# ---------------------------------------------------------------------------------------------


def _grid(w: Walk, frames: list[int]) -> list[tuple[int, float]]:
    """(segment, u) per frame for segments of `frames` frames each (the walk's explicit gammas if it has them)."""
    if w.kind == "keyframes":
        keys = [dataclasses.replace(k, frames=f) for k, f in zip(w.keyframes, frames)] + [w.keyframes[-1]]
        return [(s.segment, s.gamma) for s in keyframe_steps(keys)]
    return _segments(frames[0], len(frames) + 1, w.gammas)


def _gamma_rows(w: Walk) -> list[FrameRow]:
    seg = segment_frames(w)
    final = _grid(w, seg)
    placed = _placed(w, [u for _, u in final])
    coarse = _grid(w, coarse_frames(w)) if w.pace == "even" else []  # the coarse pass: uniform, measured; the
    rows = []                                                         # final gammas come from it (evenpace.py)
    for m in w.methods:
        rows += [_row(w, m, i, k, u, u, "coarse") for i, (k, u) in enumerate(coarse)]
        rows += [_row(w, m, i, k, u, g, "final") for i, ((k, u), g) in enumerate(zip(final, placed))]
    return rows


def _placed(w: Walk, us: list[float]) -> list[float | None]:
    """The gamma of each final frame: u, ease(u), the walk's audio gammas, or None (even: placed later)."""
    if w.pace == "even":
        return [None] * len(us)
    if w.pace == "audio":
        return list(w.audio_gammas)
    return us if w.easing == "linear" else _eased(w, us)


def _eased(w: Walk, us: list[float]) -> list[float]:
    return [float(x) for x in ease(np.asarray(us, dtype=np.float64), w.easing, w.easing_exponent)]


def _timing(w: Walk) -> dict:
    return {"easing": w.easing, "easing_exponent": None if w.easing == "linear" else w.easing_exponent}


def _row(w: Walk, m: str, i: int, k: int, u: float, gamma: float | None, pace_pass: str) -> FrameRow:
    """Row i of method m: segment k at position u, gamma placed; endpoints by kind."""
    coarse = pace_pass == "coarse"
    common = dict(gamma=gamma, position=u, pace=w.pace, pace_pass=pace_pass, **_timing(w))
    if w.pace == "audio":
        common["time_s"] = w.audio_start + i / w.audio_fps
    fid = f"{w.name}/{m}/{COARSE if coarse else ''}{i:05d}"
    if w.kind == "latent":
        a, b = w.seeds[k], w.seeds[k + 1]
        return FrameRow(fid, w.name, w.kind, m, i, k, a.seed, a.draw, w.prompt, seed_b=b.seed, draw_b=b.draw,
                        score_prompt=_scoring(w, k), **common)
    if w.kind == "text":
        s0 = w.seeds[0]
        return FrameRow(fid, w.name, w.kind, m, i, k, s0.seed, s0.draw, w.prompts[k], prompt_b=w.prompts[k + 1],
                        score_prompt=_scoring(w, k), score_prompt_b=_scoring(w, k + 1), **common)
    if w.kind == "images":  # no seeds: seed 0 (the column is not null); the endpoints are the images
        return FrameRow(fid, w.name, w.kind, m, i, k, 0, 0, w.prompt, score_prompt=_scoring(w, 0),
                        image_path=w.images[k], image_path_b=w.images[k + 1], image_sha256=w.image_sha256[k],
                        image_sha256_b=w.image_sha256[k + 1], **common)
    a, b = w.keyframes[k], w.keyframes[k + 1]  # keyframes: prompt and seed move together
    return FrameRow(fid, w.name, w.kind, m, i, k, a.seed.seed, a.seed.draw, a.prompt, seed_b=b.seed.seed,
                    draw_b=b.seed.draw, prompt_b=b.prompt, score_prompt=w.score_prompt or a.prompt,
                    score_prompt_b=w.score_prompt or b.prompt, text_method=w.text_method, **common)
GAMMA_KINDS = ("latent", "text", "images", "keyframes")  # kinds whose frames sit at gammas along segments


def chain_frames(seg: list[int]) -> int:
    """Frames of a chain of segments with `seg` frames each, both ends included: consecutive segments share
    their keyframe, so 1 + sum(f - 1)."""
    return 1 + sum(f - 1 for f in seg)


def segment_frames(w: "Walk") -> list[int]:
    """Frames of each segment, both ends included (consecutive segments share their keyframe)."""
    if w.kind == "keyframes":
        return [k.frames for k in w.keyframes[:-1]]
    keys = {"latent": len(w.seeds), "text": len(w.prompts), "images": len(w.images)}[w.kind]
    return [w.frames] * (keys - 1)


@dataclass(frozen=True)
class KeyframeStep:
    """Where frame `index` of a keyframe walk sits: between keyframes `segment` and `segment + 1`."""

    index: int
    segment: int
    gamma: float  # local: 0.0 at keyframe `segment`, 1.0 at keyframe `segment + 1`
    prompt: str  # keyframe `segment`
    seed: NoiseKey
    prompt_b: str  # keyframe `segment + 1`
    seed_b: NoiseKey


def keyframe_steps(keyframes: Sequence[Keyframe]) -> list[KeyframeStep]:
    """frame 0 = (0, 0.0); segment k adds (k, i / (F_k - 1)) for i = 1 .. F_k - 1; N = 1 + sum (F_k - 1)"""
    keys = list(keyframes)
    if len(keys) < 2:
        raise ValueError(f"a keyframe walk needs at least 2 keyframes, got {len(keys)}")
    for k, key in enumerate(keys):
        if not isinstance(key, Keyframe):
            raise ValueError(f"keyframe {k + 1} must be a Keyframe, got {type(key).__name__}")
        f = key.frames
        last = k == len(keys) - 1
        if isinstance(f, bool) or not isinstance(f, int):
            raise ValueError(f"keyframe {k + 1}: frames must be an int, got {f!r}")
        if last and f != 0:
            raise ValueError(f"keyframe {k + 1} is the last one and starts no segment: drop its frames ({f})")
        if not last and not 2 <= f <= MAX_SEGMENT_FRAMES:
            raise ValueError(f"keyframe {k + 1}: frames (of the segment to keyframe {k + 2}, both ends "
                             f"included) must be an int in 2..{MAX_SEGMENT_FRAMES}, got {f}")
    out = [_step(keys, 0, 0, 0.0)]
    for k, key in enumerate(keys[:-1]):
        out.extend(_step(keys, len(out), k, i / (key.frames - 1)) for i in range(1, key.frames))
    return out


def _step(keys: list[Keyframe], index: int, k: int, gamma: float) -> KeyframeStep:
    a, b = keys[k], keys[k + 1]
    return KeyframeStep(index, k, gamma, a.prompt, a.seed, b.prompt, b.seed)

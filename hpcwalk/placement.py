"""Where a walk's frames sit: one plan row per frame for every walk kind, eased, audio-timed or evenly paced.

    position u   i / (n - 1) along the frame's segment (or the walk's explicit gammas): the
                 uniform place, recorded in every row as `position`
    gamma        latent, text, images, keyframes walks: u itself; ease(u) with `easing`
                 (hpcwalk.pacing.ease); the walk's audio_gammas with pace = "audio" (placed from
                 the audio file when the job was parsed, hpcwalk/walkparse.py)
    t, std       translate / mix: t = round(W ease(t_0 / W)); std: std_min + (std_max - std_min) ease(u)

With pace = "even" a walk has two passes: a coarse pass of M uniform frames per segment (rows with
pace_pass "coarse", frame ids WALK/METHOD/cNNNNN), rendered first, and its N final frames per segment
(pace_pass "final"), planned here with gamma None and placed from the committed coarse frames by
hpcwalk/evenpace.py before they render. `job.plan` puts every final row of an even walk after all
other rows and `job.shard` cuts them into shards of their own, so no shard waits on itself.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from hpcwalk.job import FrameRow, Walk, _scoring, _segments
from hpcwalk.keyframes import keyframe_steps
from hpcwalk.pacing import ease
from hpcwalk.walkparse import GAMMA_KINDS, chain_frames, segment_frames

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

"""Where a walk's frames sit: easing curves, even pacing from a measured coarse pass, pacing by audio onsets.

Pure numpy, array in, array out (float64). Every function returns gammas for the frames of one walk
(or one keyframe segment), in frame order, with the walk's endpoints exact, and never looks at a
tensor, a file of frames or the job: the caller renders the frames and passes what it measured.

    ease(g, curve, p)                     g in [0, 1] -> [0, 1]; monotone, ease(0) = 0, ease(1) = 1
    even_gammas(coarse, d, n)             n gammas, each step an equal share of the measured path
    audio_gammas(onset_strength(y), n)    n gammas moving fastest where the music has its onsets

Audio is decoded with PyAV and its onset strength (a numpy STFT's spectral flux) computed in bounded
memory in `hpcwalk.job.audiofile` (`audio_onsets`, `decode_audio`, `onset_strength`), re-exported here.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from hpcwalk.job.audiofile import (  # noqa: F401 (re-exported: the audio names documented here first)
    AUDIO_RATE, BANDS_FMIN, BANDS_PER_OCTAVE, HOP, LOG_SCALE, MAX_AUDIO_S, N_FFT, AudioError, Onsets, audio_onsets,
    decode_audio, onset_strength, stft_magnitude)
from hpcwalk.job.bounds import EXPONENT_RANGE
from hpcwalk.job.bounds import MAX_AUDIO_FPS as MAX_FPS

EASINGS = ("linear", "ease-in", "ease-out", "ease-in-out")
Easing = Literal["linear", "ease-in", "ease-out", "ease-in-out"]

PACE_METHODS = ("pchip", "linear")
PaceMethod = Literal["pchip", "linear"]
MAX_FRAMES = 1_000_000  # gammas asked of one call (the job's plan bound is far lower)
PCHIP_DENSITY = 256  # points per coarse step at which the PCHIP curve is evaluated and inverted


def _finite(x: float, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a number, got {x!r}")
    v = float(x)
    if not np.isfinite(v):
        raise ValueError(f"{what} must be finite, got {x!r}")
    return v


def _frames(n: int, what: str = "frames") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 2 <= n <= MAX_FRAMES:
        raise ValueError(f"{what} must be an int in 2..{MAX_FRAMES} (both ends are frames), got {n!r}")
    return int(n)


# ---------------------------------------------------------------------------------------------
# 1. Easing
# ---------------------------------------------------------------------------------------------


def ease(gamma: np.ndarray | float, curve: Easing = "linear", exponent: float = 2.0) -> np.ndarray:
    """e(g): linear g | ease-in g^p | ease-out 1 - (1-g)^p | ease-in-out (2g)^p / 2 for g < 1/2, 1 - (2-2g)^p / 2 else

    gamma: any shape, every value finite in [0, 1] -> float64 of the same shape. p = exponent
    (2: quadratic, 3: cubic, 1: linear; any p in [1/16, 16], the "custom exponent"; linear ignores
    it). Each curve is continuous, non-decreasing, and maps 0 to 0.0 and 1 to 1.0 exactly (and 1/2
    to 1/2 for ease-in-out), so eased walks keep their keyframes. ease-in starts slow (small steps
    near g = 0), ease-out ends slow, ease-in-out does both and is fastest at the middle.
    """
    if curve not in EASINGS:
        raise ValueError(f"unknown easing {curve!r}; choose one of {', '.join(EASINGS)}")
    p = _finite(exponent, "easing exponent")
    lo, hi = EXPONENT_RANGE
    if not lo <= p <= hi:
        raise ValueError(f"easing exponent must lie in [{lo:g}, {hi:g}] (2 = quadratic), got {exponent!r}")
    g = np.asarray(gamma, dtype=np.float64)
    if not np.isfinite(g).all() or (g < 0).any() or (g > 1).any():
        raise ValueError("easing needs gammas in [0, 1] (finite); got values outside")
    if curve == "linear":
        return g.copy()
    if curve == "ease-in":
        return g**p
    if curve == "ease-out":
        return 1.0 - (1.0 - g) ** p
    return np.where(g < 0.5, 0.5 * (2.0 * g) ** p, 1.0 - 0.5 * (2.0 - 2.0 * g) ** p)


# ---------------------------------------------------------------------------------------------
# 2. Even pacing from a measured coarse pass
# ---------------------------------------------------------------------------------------------


def chord_distance(cosine_distance: np.ndarray) -> np.ndarray:
    """sqrt(2 d): the chord |u - v| between unit vectors whose cosine distance d = 1 - cos(u, v); (m,) -> (m,)

    `metrics.step_distances` gives 1 - cos, which grows with the square of a small step: summed
    along a path it measures no length (halving the steps halves the sum), and pacing by it makes
    the walk more uneven, not less. Its chord adds up along the path, so it is what `even_gammas`
    takes for CLIP embeddings. Equal chords are equal cosine distances, so the walk's step_cv
    improves in either measure.
    """
    d = np.asarray(cosine_distance, dtype=np.float64)
    return np.sqrt(2.0 * np.clip(d, 0.0, None))


def pixel_distances(frames: np.ndarray) -> np.ndarray:
    """RMS(x_i - x_{i-1}) / 255 between consecutive uint8 frames: (m+1, H, W, C) -> (m,) in [0, 1]"""
    x = np.asarray(frames)
    if x.ndim != 4 or x.shape[0] < 2:
        raise ValueError(f"pixel_distances needs (frames >= 2, H, W, C) images, got shape {x.shape}")
    diff = np.diff(x.astype(np.float64), axis=0) / 255.0  # (m, H, W, C)
    return np.sqrt((diff**2).reshape(diff.shape[0], -1).mean(axis=1))


def even_gammas(coarse: np.ndarray, distances: np.ndarray, frames: int, method: PaceMethod = "pchip",
                snap_tol: float = 1e-6) -> np.ndarray:
    """gamma_j = s^-1(j L / (frames - 1)), s(g_i) = d_1 + ... + d_i, L = s(g_m): equal path length per step

    coarse: (m+1,) strictly increasing finite gammas g_0 < ... < g_m (m >= 1) of a rendered pass;
    distances: (m,) finite d_i >= 0 measured between frames i-1 and i, additive along the path
    (pixel RMS, chord of CLIP embeddings: see `chord_distance`, not 1 - cos). Returns (frames,)
    float64, non-decreasing, with gamma_0 = g_0 and gamma_{frames-1} = g_m exactly.

    The cumulative length s(g) is known at the coarse gammas and joined between them by `method`:
    "pchip" (default; scipy's PchipInterpolator, the monotone cubic of Fritsch and Carlson, evaluated
    at PCHIP_DENSITY points per coarse step, inverted piecewise linearly) or "linear" (s linear on
    each coarse step: the pace inside a step is taken as constant). Both are monotone, so the
    inverse exists; a step with d_i = 0 (identical frames) is crossed in no time. A final gamma
    within snap_tol * (g_m - g_0) of a coarse gamma is set to it exactly, so its frame can be reused
    (`reuse_index`). Deterministic: the same inputs give bit-equal outputs.
    """
    n = _frames(frames)
    if method not in PACE_METHODS:
        raise ValueError(f"unknown pacing method {method!r}; choose one of {', '.join(PACE_METHODS)}")
    tol = _finite(snap_tol, "snap_tol")
    if not 0 <= tol < 0.5:
        raise ValueError(f"snap_tol must lie in [0, 0.5), got {snap_tol!r}")
    g = np.asarray(coarse, dtype=np.float64)
    d = np.asarray(distances, dtype=np.float64)
    if g.ndim != 1 or not 2 <= g.size <= MAX_FRAMES:
        raise ValueError(f"even pacing needs a coarse pass of 2..{MAX_FRAMES} frames, got shape {g.shape}")
    if not np.isfinite(g).all() or not (np.diff(g) > 0).all():
        raise ValueError("the coarse gammas must be finite and strictly increasing")
    if d.shape != (g.size - 1,):
        raise ValueError(f"need one distance per coarse step: {g.size - 1} for {g.size} frames, got shape {d.shape}")
    if not np.isfinite(d).all() or (d < 0).any():
        raise ValueError("the distances must be finite and >= 0 (NaN or a negative distance was measured)")
    with np.errstate(over="ignore"):
        s = np.concatenate(([0.0], np.cumsum(d)))  # (m+1,) cumulative length at the coarse gammas
    if not np.isfinite(s[-1]):
        raise ValueError("the distances add up to more than a float holds: rescale them")
    if s[-1] <= 0:
        raise ValueError("every distance is 0: the coarse frames are identical, so there is no path to pace evenly")

    # 1. s(g) on a grid: the coarse knots, or PCHIP points between them
    if method == "pchip":
        from scipy.interpolate import PchipInterpolator

        u = np.arange(PCHIP_DENSITY) / PCHIP_DENSITY  # (P,) in [0, 1)
        grid = np.concatenate(((g[:-1, None] + u * np.diff(g)[:, None]).ravel(), g[-1:]))  # (m P + 1,)
        grid[::PCHIP_DENSITY] = g  # the knots themselves, bit-exact
        sg = np.maximum.accumulate(np.clip(PchipInterpolator(g, s)(grid), 0.0, s[-1]))  # guard rounding
        sg[::PCHIP_DENSITY] = s
    else:
        grid, sg = g, s

    # 2. invert: target t lies in the first grid step k with sg[k-1] < t <= sg[k] (never a flat step)
    t = s[-1] * np.arange(n) / (n - 1)  # (n,) equal shares of the length
    k = np.clip(np.searchsorted(sg, t, side="left"), 1, sg.size - 1)  # (n,)
    frac = (t - sg[k - 1]) / (sg[k] - sg[k - 1])
    out = grid[k - 1] + frac * (grid[k] - grid[k - 1])  # (n,)
    out[0], out[-1] = g[0], g[-1]

    # 3. snap to coarse gammas, keep the order
    j = np.clip(np.searchsorted(g, out), 1, g.size - 1)
    near = np.where(np.abs(out - g[j - 1]) <= np.abs(g[j] - out), j - 1, j)  # nearest coarse index
    snap = np.abs(out - g[near]) <= tol * (g[-1] - g[0])
    out = np.where(snap, g[near], out)
    return np.maximum.accumulate(out)


def reuse_index(final: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """i where final_j == coarse_i exactly, else -1: (n,), (m+1,) sorted -> (n,) int64

    The final frames whose coarse frame can be taken as it is (same gamma, bit-equal).
    """
    f = np.asarray(final, dtype=np.float64)
    c = np.asarray(coarse, dtype=np.float64)
    i = np.clip(np.searchsorted(c, f), 0, c.size - 1)
    return np.where(c[i] == f, i, -1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# 3. Audio: pacing by onsets (decoding and the onset strength: hpcwalk.job.audiofile)
# ---------------------------------------------------------------------------------------------


def audio_gammas(onsets: Onsets, frames: int, fps: float, floor: float = 0.25, start_s: float = 0.0) -> np.ndarray:
    """gamma_j = S(tau_j) / S(tau_{n-1}), S(t) = integral from tau_0 to t of floor + (1 - floor) o(t) / mean(o)

    Video frame j (of n = frames) shows from tau_j = start_s + j / fps for 1 / fps, so the n frames
    must fit in the audio: start_s + n / fps <= its duration (floor((duration - start_s) fps)
    frames at most). The walk's speed is the onset strength normalised to mean 1 over the whole
    signal, mixed with a constant floor (0 < floor <= 1): floor = 1 is an even walk in time; a
    small floor lets the walk almost stop between onsets but never freeze (speed >= floor). Each
    o_k holds over the hop that ends at times[k] (the hop it measures); after the last hop the
    speed is the floor. Silence throughout (mean o = 0) gives the even walk. Returns (frames,)
    float64, non-decreasing, 0.0 and 1.0 exactly at the ends.
    """
    n = _frames(frames)
    rate = _finite(fps, "fps")
    if not 0 < rate <= MAX_FPS:
        raise ValueError(f"fps must lie in (0, {MAX_FPS:g}], got {fps!r}")
    f = _finite(floor, "floor")
    if not 0 < f <= 1:
        raise ValueError(f"floor must lie in (0, 1] (0 would freeze the walk in silence), got {floor!r}")
    t0 = _finite(start_s, "start_s")
    o, times, dur = onsets.strength, onsets.times, onsets.duration_s
    if not 0 <= t0 or t0 + n / rate > dur + 1e-9:
        most = max(int(np.floor((dur - t0) * rate + 1e-9)), 0)
        raise ValueError(f"{n} frames at {rate:g} fps from {t0:g} s last until {t0 + n / rate:.3f} s, past the audio's "
                         f"end ({dur:.3f} s): use at most {most} frames, a lower fps or an earlier start")
    tau = t0 + np.arange(n) / rate  # (n,)
    mean = o.mean()
    speed = f + (1 - f) * (o / mean if mean > 0 else np.zeros_like(o))  # (F,)
    hop_s = times[1] - times[0] if times.size > 1 else 0.0
    s = np.concatenate(([0.0], np.cumsum(speed[1:] * hop_s)))  # (F,) S at times[k], speed_k on (t_{k-1}, t_k]
    knots = np.append(times, max(dur, times[-1]))  # (F + 1,): the floor's pace after the last full hop
    s = np.append(s, s[-1] + f * (knots[-1] - times[-1]))
    at = np.interp(tau, knots, s)  # (n,)
    out = (at - at[0]) / (at[-1] - at[0])
    out[0], out[-1] = 0.0, 1.0
    return np.maximum.accumulate(np.clip(out, 0.0, 1.0))

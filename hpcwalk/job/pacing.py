"""Where a walk's frames sit: easing curves, even pacing from a measured coarse pass, pacing by audio onsets.

Pure numpy, array in, array out (float64). Every function returns gammas for the frames of one walk
(or one keyframe segment), in frame order, with the walk's endpoints exact, and never looks at a
tensor, a file of frames or the job: the caller renders the frames and passes what it measured.

    ease(g, curve, p)                     g in [0, 1] -> [0, 1]; monotone, ease(0) = 0, ease(1) = 1
    even_gammas(coarse, d, n)             n gammas, each step an equal share of the measured path
    audio_gammas(onset_strength(y), n)    n gammas moving fastest where the music has its onsets

Audio is decoded with PyAV (`decode_audio`); the onset strength is a numpy STFT's spectral flux.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

from hpcwalk.core.errors import HpcwalkError, first_line
from hpcwalk.job.bounds import EXPONENT_RANGE
from hpcwalk.job.bounds import MAX_AUDIO_FPS as MAX_FPS

EASINGS = ("linear", "ease-in", "ease-out", "ease-in-out")
Easing = Literal["linear", "ease-in", "ease-out", "ease-in-out"]

PACE_METHODS = ("pchip", "linear")
PaceMethod = Literal["pchip", "linear"]
MAX_FRAMES = 1_000_000  # gammas asked of one call (the job's plan bound is far lower)
PCHIP_DENSITY = 256  # points per coarse step at which the PCHIP curve is evaluated and inverted

AUDIO_RATE = 22_050  # Hz: decoding rate of `decode_audio` (onsets need no more than 11 kHz of band)
N_FFT = 1024  # 46 ms window at 22.05 kHz
HOP = 256  # 11.6 ms between envelope samples at 22.05 kHz
BANDS_PER_OCTAVE = 12  # log-spaced bands of the onset strength
BANDS_FMIN = 30.0  # Hz: lowest band edge (below: rumble, DC)
LOG_SCALE = 1000.0  # log(1 + LOG_SCALE a / max a): linear about 60 dB below the loudest band, log above
MAX_AUDIO_S = 3 * 3600.0  # longest audio decoded (3 hours)


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
# 3. Audio: decoding, onset strength, pacing by onsets
# ---------------------------------------------------------------------------------------------


class AudioError(HpcwalkError, ValueError):
    """An audio file cannot be used; the message names the file and the fix."""


def decode_audio(path: str | os.PathLike, sample_rate: int = AUDIO_RATE) -> np.ndarray:
    """The file's first audio stream, mixed to mono and resampled by PyAV (FFmpeg): (N,) float32 in [-1, 1]

    Any container and codec FFmpeg reads (WAV, MP3, AAC/M4A, FLAC, Opus, a video's soundtrack).
    One-line AudioError for a missing file, a file that is not audio, a file without an audio
    stream, a damaged stream, no samples, or more than MAX_AUDIO_S seconds.
    """
    import av

    p = os.fspath(path)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or not 1000 <= sample_rate <= 192_000:
        raise AudioError(f"sample rate must be an int in 1000..192000 Hz, got {sample_rate!r}")
    if not os.path.isfile(p):
        raise AudioError(f"audio file {p!r} not found: check the path")
    try:
        container = av.open(p)
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise AudioError(f"{p!r} is not an audio file FFmpeg can read ({first_line(e)}): "
                         "pass a WAV, MP3, AAC, FLAC or Opus file") from None
    limit = int(MAX_AUDIO_S * sample_rate)
    chunks: list[np.ndarray] = []
    with container:
        if not container.streams.audio:
            raise AudioError(f"{p!r} has no audio stream: pass a file with sound (a WAV, MP3, or a video with a soundtrack)")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        total = 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))  # packed flt mono: (1, n)
                    total += chunks[-1].size
                if total > limit:
                    raise AudioError(f"{p!r} is longer than {MAX_AUDIO_S:g} s: cut it to the part the walk is timed to")
            for out in resampler.resample(None):  # flush the resampler
                chunks.append(out.to_ndarray().reshape(-1))
        except av.FFmpegError as e:
            raise AudioError(f"{p!r}: the audio stream is damaged ({first_line(e)}): re-encode or replace the file") from None
    y = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if y.size == 0:
        raise AudioError(f"{p!r} holds no audio samples: pass a file with sound")
    return y


@dataclass(frozen=True)
class Onsets:
    """Onset strength o_k of a signal, one value per hop, with the time each value ends at."""

    strength: np.ndarray  # (F,) float64 >= 0: how much louder (log, per band) frame k got than frame k-1
    times: np.ndarray  # (F,) seconds: end of frame k's window, k * hop / rate
    duration_s: float  # length of the signal


def onset_strength(y: np.ndarray, sample_rate: int = AUDIO_RATE, n_fft: int = N_FFT, hop: int = HOP) -> Onsets:
    """o_k = mean_b max(0, L_k(b) - L_{k-1}(b)), L_k(b) = log(1 + LOG_SCALE A_k(b) / max A); o_0 = 0

    y: (N,) mono samples. STFT (`stft_magnitude`): frame k is y[k hop - n_fft : k hop] (zeros before
    the start) times a periodic Hann window. A_k(b) = sqrt(sum of |X_k(f)|^2 over the bins f of band
    b): BANDS_PER_OCTAVE log-spaced bands from BANDS_FMIN Hz to Nyquist (a band narrower than a
    bin takes its bin; bins below BANDS_FMIN are left out). The log compression is linear far
    below the loudest band of the whole signal (LOG_SCALE = 1000: about 60 dB down), so faint noise
    and hiss add little flux, and logarithmic above it, so an onset counts by its relative rise in
    quiet and loud passages alike (the log-filtered spectral flux of Boeck et al.; banding keeps the
    per-bin fluctuations of noise from reading as onsets). The flux rises in the hop a sound starts,
    so o_k is stamped with the time its window ends, k hop / rate: an onset at t shows up 0-2 hops
    later (0-23 ms at the defaults), where a window-centred stamp would put it n_fft / 2 early.
    """
    x = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"onset_strength needs a non-empty finite 1-D signal, got shape {x.shape}")
    for name, v in (("sample_rate", sample_rate), ("n_fft", n_fft), ("hop", hop)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not 16 <= n_fft <= 65536:
        raise ValueError(f"n_fft must lie in 16..65536, got {n_fft}")
    if not 1 <= hop <= n_fft:
        raise ValueError(f"hop must lie in 1..n_fft ({n_fft}), got {hop}")
    mag = stft_magnitude(np.concatenate((np.zeros(n_fft), x)), n_fft, hop)  # (F, n_fft // 2 + 1), F = N // hop + 1
    amp = np.sqrt((mag**2) @ _band_matrix(n_fft, sample_rate))  # (F, B)
    top = amp.max()
    level = np.log1p(LOG_SCALE * amp / top) if top > 0 else amp  # (F, B)
    flux = np.maximum(np.diff(level, axis=0), 0.0).mean(axis=1)  # (F - 1,)
    strength = np.concatenate(([0.0], flux))  # (F,)
    times = np.arange(strength.size) * hop / sample_rate
    return Onsets(strength, times, x.size / sample_rate)


def _band_matrix(n_fft: int, sample_rate: int) -> np.ndarray:
    """W[f, b] = 1 where rfft bin f lies in band b = floor(BANDS_PER_OCTAVE log2(freq / BANDS_FMIN)): (n_fft // 2 + 1, B)"""
    freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft  # (n_bins,)
    keep = freqs >= BANDS_FMIN
    band = np.floor(BANDS_PER_OCTAVE * np.log2(np.where(keep, freqs, BANDS_FMIN) / BANDS_FMIN)).astype(np.int64)
    used, col = np.unique(band[keep], return_inverse=True)  # drop bands no bin falls in
    w = np.zeros((freqs.size, used.size))
    w[np.flatnonzero(keep), col] = 1.0
    return w


def stft_magnitude(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """|X_k(f)| = |sum_n x[k hop + n] w[n] e^(-2 pi i f n / n_fft)|, w periodic Hann: (N,) -> (1 + (N - n_fft) // hop, n_fft // 2 + 1)"""
    frames = np.lib.stride_tricks.sliding_window_view(np.asarray(x, np.float64), n_fft)[::hop]  # (F, n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # (n_fft,)
    return np.abs(np.fft.rfft(frames * window, axis=1))


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

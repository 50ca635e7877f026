"""Audio inputs of a walk: decoding with PyAV and the onset strength, both in bounded memory.

    audio_onsets(path)          the file decoded piece by piece into its onset strength (`Onsets`)
    decode_audio(path)          the whole file as one (N,) float32 array (small files, tests)
    onset_strength(y)           the onset strength of an array

A file is never held whole by `audio_onsets`: the decoder yields PyAV's frames one at a time and
`OnsetAccumulator` turns them into STFT frames a chunk at a time, keeping only the window's overlap of
samples. The log compression is relative to the loudest band of the whole signal, known only at the
end, so the per-hop band amplitudes are kept until then (75 floats per 11.6 ms hop at the defaults:
~180 MiB an hour) up to KEEP_BYTES (about 20 minutes); a longer file is decoded a second time,
normalised by the loudest band the first pass found, and its amplitudes are never kept (3 hours,
MAX_AUDIO_S: ~200 MiB in all, twice the seconds). Either way the result equals the whole-signal
formula up to float rounding (tests/test_pacing.py keeps the old whole-signal code as the reference).
`hpcwalk.job.pacing` re-exports these names, where they were first documented.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from hpcwalk.core.errors import HpcwalkError, first_line

AUDIO_RATE = 22_050  # Hz: decoding rate of `decode_audio` (onsets need no more than 11 kHz of band)
N_FFT = 1024  # 46 ms window at 22.05 kHz
HOP = 256  # 11.6 ms between envelope samples at 22.05 kHz
BANDS_PER_OCTAVE = 12  # log-spaced bands of the onset strength
BANDS_FMIN = 30.0  # Hz: lowest band edge (below: rumble, DC)
LOG_SCALE = 1000.0  # log(1 + LOG_SCALE a / max a): linear about 60 dB below the loudest band, log above
MAX_AUDIO_S = 3 * 3600.0  # longest audio decoded (3 hours)
CHUNK_HOPS = 4096  # STFT frames computed at once (about 48 s at the defaults; ~100 MiB of temporaries)
KEEP_BYTES = 64 << 20  # band amplitudes kept for one pass (~21 minutes at the defaults); longer: two passes


class AudioError(HpcwalkError, ValueError):
    """An audio file cannot be used; the message names the file and the fix."""


def audio_pieces(path: str | os.PathLike, sample_rate: int = AUDIO_RATE) -> Iterator[np.ndarray]:
    """The file's first audio stream, mixed to mono and resampled by PyAV (FFmpeg), as (n,) float32 pieces in order

    Any container and codec FFmpeg reads (WAV, MP3, AAC/M4A, FLAC, Opus, a video's soundtrack).
    One-line AudioError for a bad sample rate, a missing file, a file that is not audio (these three
    at once), and while iterating for a file without an audio stream, a damaged stream, a sample
    that is NaN or infinite (a float WAV can hold them), no samples, or more than MAX_AUDIO_S seconds.
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
    return _pieces(p, container, sample_rate)


def _pieces(p: str, container, sample_rate: int) -> Iterator[np.ndarray]:
    import av

    limit = int(MAX_AUDIO_S * sample_rate)
    total = 0

    def checked(out) -> np.ndarray:
        y = out.to_ndarray().reshape(-1).astype(np.float32, copy=False)  # packed flt mono: (1, n)
        bad = np.flatnonzero(~np.isfinite(y))
        if bad.size:
            raise AudioError(f"{p!r} holds NaN or infinite samples (the first at {(total + bad[0]) / sample_rate:.3f} s): "
                             "replace or re-export the file with finite samples")
        return y

    with container:
        if not container.streams.audio:
            raise AudioError(f"{p!r} has no audio stream: pass a file with sound (a WAV, MP3, or a video with a soundtrack)")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    y = checked(out)
                    total += y.size
                    yield y
                if total > limit:
                    raise AudioError(f"{p!r} is longer than {MAX_AUDIO_S:g} s: cut it to the part the walk is timed to")
            for out in resampler.resample(None):  # flush the resampler
                y = checked(out)
                total += y.size
                yield y
        except av.FFmpegError as e:
            raise AudioError(f"{p!r}: the audio stream is damaged ({first_line(e)}): re-encode or replace the file") from None
    if total == 0:
        raise AudioError(f"{p!r} holds no audio samples: pass a file with sound")


def decode_audio(path: str | os.PathLike, sample_rate: int = AUDIO_RATE) -> np.ndarray:
    """The whole of `audio_pieces(path, sample_rate)` as one (N,) float32 array in [-1, 1] (4 bytes a sample)."""
    return np.concatenate(list(audio_pieces(path, sample_rate)))


def audio_onsets(path: str | os.PathLike, sample_rate: int = AUDIO_RATE) -> "Onsets":
    """`onset_strength(decode_audio(path))` without holding the samples: the pieces go through an OnsetAccumulator;
    a file whose band amplitudes outgrow KEEP_BYTES is decoded again, normalised by the first pass's loudest band."""
    acc = OnsetAccumulator(sample_rate, keep_bytes=KEEP_BYTES)
    for y in audio_pieces(path, sample_rate):
        acc.add(y)
    top = acc.finish_top()  # the last frames first: they may overflow too
    if not acc.overflowed:
        return acc.finish()
    again = OnsetAccumulator(sample_rate, top=top)
    for y in audio_pieces(path, sample_rate):
        again.add(y)
    return again.finish()


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
    Computed CHUNK_HOPS frames at a time (`OnsetAccumulator`).
    """
    x = np.asarray(y)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"onset_strength needs a non-empty finite 1-D signal, got shape {x.shape}")
    acc = OnsetAccumulator(sample_rate, n_fft, hop)
    step = CHUNK_HOPS * hop
    for i in range(0, x.size, step):
        acc.add(x[i:i + step])
    return acc.finish()


class OnsetAccumulator:
    """`onset_strength` of a signal fed in pieces of any size: add(y) in order, then finish() -> Onsets

    Keeps the samples not yet in a full chunk (at most CHUNK_HOPS hops plus the window's overlap,
    n_fft - hop) and the band amplitudes A_k (F, B) float64 until finish, which normalises them by
    their maximum over the whole signal and takes the flux chunk by chunk. With keep_bytes, once the
    amplitudes would take more it drops them and only finds their maximum (`overflowed`, then
    `finish_top()`): a second accumulator given that `top` takes the flux as the chunks come.
    """

    def __init__(self, sample_rate: int = AUDIO_RATE, n_fft: int = N_FFT, hop: int = HOP, chunk_hops: int = CHUNK_HOPS,
                 keep_bytes: int | None = None, top: float | None = None):
        for name, v in (("sample_rate", sample_rate), ("n_fft", n_fft), ("hop", hop), ("chunk_hops", chunk_hops)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 16 <= n_fft <= 65536:
            raise ValueError(f"n_fft must lie in 16..65536, got {n_fft}")
        if not 1 <= hop <= n_fft:
            raise ValueError(f"hop must lie in 1..n_fft ({n_fft}), got {hop}")
        self.sample_rate, self.n_fft, self.hop, self.chunk_hops = int(sample_rate), int(n_fft), int(hop), int(chunk_hops)
        self._bands = _band_matrix(self.n_fft, self.sample_rate)  # (n_bins, B)
        self._pending: list[np.ndarray] = [np.zeros(self.n_fft)]  # the zeros before the start
        self._pending_n = self.n_fft
        self._amps: list[np.ndarray] = []  # (F_c, B) per chunk, while kept
        self._kept = 0  # bytes in _amps
        self._keep = keep_bytes
        self.overflowed = False  # amplitudes dropped: only `top` is known at the end
        self.top = 0.0 if top is None else float(top)  # the loudest band amplitude (given, or found so far)
        self._given_top = top is not None
        self._flux: list[np.ndarray] = [np.zeros(1)]  # o_0 = 0, then one piece per chunk
        self._prev: np.ndarray | None = None  # the last level row of the chunk before
        self.samples = 0

    def add(self, y: np.ndarray) -> None:
        x = np.asarray(y, dtype=np.float64)
        if x.ndim != 1 or not np.isfinite(x).all():
            raise ValueError(f"onset_strength needs a non-empty finite 1-D signal, got shape {x.shape}")
        self._pending.append(x)
        self._pending_n += x.size
        self.samples += x.size
        if self._pending_n >= self.n_fft + self.chunk_hops * self.hop:
            self._take(final=False)

    def _take(self, final: bool) -> None:
        """STFT of every whole chunk of frames in the pending samples (and, if final, of every frame left)."""
        buf = np.concatenate(self._pending)
        avail = (buf.size - self.n_fft) // self.hop + 1 if buf.size >= self.n_fft else 0
        done = 0
        while avail - done >= (1 if final else self.chunk_hops):
            m = min(self.chunk_hops, avail - done)
            part = buf[done * self.hop:(done + m - 1) * self.hop + self.n_fft]
            mag = stft_magnitude(part, self.n_fft, self.hop)  # (m, n_fft // 2 + 1)
            self._chunk(np.sqrt((mag**2) @ self._bands))  # (m, B)
            done += m
        rest = buf[done * self.hop:].copy()
        self._pending, self._pending_n = [rest], rest.size

    def _chunk(self, amp: np.ndarray) -> None:
        if self._given_top:
            self._level_flux(amp)
            return
        self.top = max(self.top, float(amp.max()))
        if self.overflowed:
            return
        self._amps.append(amp)
        self._kept += amp.nbytes
        if self._keep is not None and self._kept > self._keep:
            self._amps, self._kept, self.overflowed = [], 0, True

    def _level_flux(self, amp: np.ndarray) -> None:
        """L = log1p(LOG_SCALE A / top) of one chunk, and its flux (from the chunk before's last row on)."""
        level = np.log1p(LOG_SCALE * amp / self.top) if self.top > 0 else amp  # (F_c, B)
        if self._prev is not None:
            self._flux.append(np.maximum(level[:1] - self._prev, 0.0).mean(axis=1))
        self._flux.append(np.maximum(np.diff(level, axis=0), 0.0).mean(axis=1))
        self._prev = level[-1:]

    def _close(self) -> None:
        if self.samples == 0:
            raise ValueError("onset_strength needs a non-empty finite 1-D signal, got shape (0,)")
        self._take(final=True)

    def finish_top(self) -> float:
        """After the last add: the largest band amplitude of the whole signal (for a second, `top=` pass)."""
        self._close()
        return self.top

    def finish(self) -> Onsets:
        """After the last add: the onsets. Not after an overflow (the amplitudes are gone: see finish_top)."""
        self._close()
        if self.overflowed:
            raise RuntimeError("the band amplitudes outgrew keep_bytes: pass finish_top() as top= to a second pass")
        while self._amps:
            self._level_flux(self._amps.pop(0))  # freed as it is used
        strength = np.concatenate(self._flux)  # (F,)
        times = np.arange(strength.size) * self.hop / self.sample_rate
        return Onsets(strength, times, self.samples / self.sample_rate)


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

"""hpcwalk.job.pacing: easing curves, even pacing from a coarse pass, audio decoding, onsets and audio pacing.

Audio files are written with PyAV in real containers (WAV, FLAC, MP3, AAC in M4A) and decoded back;
the STFT is checked against scipy's ShortTimeFFT, the step measure is the study's own
(`metrics.smoothness`).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcwalk.core import metrics
from hpcwalk.job.audiofile import OnsetAccumulator, audio_onsets
from hpcwalk.job.pacing import EASINGS, AudioError, audio_gammas, chord_distance, decode_audio, ease, even_gammas, onset_strength, pixel_distances, reuse_index, stft_magnitude
from jobs import write_audio

# ---------------------------------------------------------------------------------------------
# easing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("curve", EASINGS)
@pytest.mark.parametrize("p", [1 / 16, 0.5, 1.0, 2.0, 3.0, 16.0])
def test_easing_endpoints_exact(curve, p):
    out = ease(np.array([0.0, 1.0]), curve, p)
    assert out.dtype == np.float64 and out[0] == 0.0 and out[1] == 1.0
    if curve == "ease-in-out":
        assert ease(0.5, curve, p) == 0.5


@settings(max_examples=60, deadline=None)
@given(g=st.lists(st.floats(0, 1), min_size=2, max_size=40), curve=st.sampled_from(EASINGS),
       p=st.floats(1 / 16, 16))
def test_easing_monotone_and_in_range(g, curve, p):
    g = np.sort(np.array(g))
    out = ease(g, curve, p)
    assert (np.diff(out) >= 0).all()
    assert ((out >= 0) & (out <= 1)).all()


def test_easing_known_values():
    g = np.array([0.25, 0.5, 0.75])
    np.testing.assert_array_equal(ease(g, "linear", 7.0), g)
    np.testing.assert_allclose(ease(g, "ease-in"), [0.0625, 0.25, 0.5625], rtol=0, atol=1e-15)
    np.testing.assert_allclose(ease(g, "ease-out"), [0.4375, 0.75, 0.9375], rtol=0, atol=1e-15)
    np.testing.assert_allclose(ease(g, "ease-in-out"), [0.125, 0.5, 0.875], rtol=0, atol=1e-15)
    np.testing.assert_allclose(ease(g, "ease-in", 3), [1 / 64, 1 / 8, 27 / 64], rtol=0, atol=1e-15)
    np.testing.assert_allclose(ease(g, "ease-in-out", 3), [1 / 16, 0.5, 15 / 16], rtol=0, atol=1e-15)
    np.testing.assert_allclose(ease(g, "ease-in", 0.5), np.sqrt(g), rtol=0, atol=1e-15)
    # ease-out mirrors ease-in; ease-in-out is point-symmetric about (1/2, 1/2)
    x = np.linspace(0, 1, 101)
    np.testing.assert_allclose(ease(x, "ease-out", 2.5), 1 - ease(1 - x, "ease-in", 2.5), atol=1e-15)
    np.testing.assert_allclose(ease(x, "ease-in-out", 2.5), 1 - ease(1 - x, "ease-in-out", 2.5), atol=1e-15)
    assert ease(np.zeros((2, 3)), "ease-out").shape == (2, 3)


@pytest.mark.parametrize("p, match", [(0.0, r"\[0.0625, 16\]"), (-1.0, r"\[0.0625, 16\]"), (100.0, r"\[0.0625, 16\]"),
                                      (float("nan"), "finite"), (float("inf"), "finite"), ("2", "number"), (None, "number")])
def test_easing_bad_exponent(p, match):
    with pytest.raises(ValueError, match=match):
        ease([0.5], "ease-in", p)


def test_easing_bad_curve_and_gammas():
    with pytest.raises(ValueError, match="choose one of linear, ease-in, ease-out, ease-in-out"):
        ease([0.5], "smooth")
    for bad in ([1.5], [-0.1], [float("nan")], [0.2, float("inf")]):
        with pytest.raises(ValueError, match=r"gammas in \[0, 1\]"):
            ease(bad, "ease-in")


# ---------------------------------------------------------------------------------------------
# even pacing
# ---------------------------------------------------------------------------------------------


def _circle(g: np.ndarray) -> np.ndarray:
    """A synthetic 'CLIP' path with a known uneven pace: unit vectors at angle pi/2 g^3, (n,) -> (n, 2)."""
    theta = np.pi / 2 * np.asarray(g) ** 3
    return np.stack([np.cos(theta), np.sin(theta)], axis=-1)


COARSE, FINAL = 9, 33  # coarse pass of 9 frames (8 steps), final walk of 33 frames


@pytest.mark.parametrize("method, factor", [("pchip", 30.0), ("linear", 5.0)])
def test_even_pacing_cuts_step_cv_on_embedding_path(method, factor):
    """step_cv (the study's measure: std / mean of 1 - cos between consecutive frames) of a walk at an
    uneven pace falls by the stated factor when its gammas come from a 9-frame coarse pass.
    Measured: uniform 1.331; pchip 0.019 (70x); linear 0.169 (7.9x)."""
    coarse = np.linspace(0, 1, COARSE)
    d = chord_distance(metrics.step_distances(_circle(coarse)))
    before = metrics.smoothness(_circle(np.linspace(0, 1, FINAL))).step_cv
    gam = even_gammas(coarse, d, FINAL, method)
    after = metrics.smoothness(_circle(gam)).step_cv
    print(f"{method}: step_cv {before:.3f} -> {after:.4f} ({before / after:.1f}x)")
    assert before > 1.0
    assert after * factor < before
    assert gam[0] == 0.0 and gam[-1] == 1.0 and (np.diff(gam) > 0).all()
    np.testing.assert_array_equal(gam, even_gammas(coarse.copy(), d.copy(), FINAL, method))  # bit-equal rerun


def test_even_pacing_with_pixel_distances():
    """Frames whose content is c(g) = g^3 (a brightness ramp): pixel RMS steps become even."""
    def frames(g):
        return np.broadcast_to((255.0 * np.asarray(g) ** 3)[:, None, None, None], (len(g), 4, 5, 3))

    coarse = np.linspace(0, 1, COARSE)
    gam = even_gammas(coarse, pixel_distances(frames(coarse)), FINAL)
    uneven = pixel_distances(frames(np.linspace(0, 1, FINAL)))
    even = pixel_distances(frames(gam))
    cv = lambda d: d.std() / d.mean()  # noqa: E731
    print(f"pixel steps: cv {cv(uneven):.3f} -> {cv(even):.4f}")
    assert cv(uneven) > 0.8 and cv(even) < 0.02
    np.testing.assert_allclose(gam, np.linspace(0, 1, FINAL) ** (1 / 3), atol=2e-3)  # the exact inverse of g^3


def test_even_pacing_snaps_to_coarse_gammas_for_reuse():
    coarse = np.linspace(0, 1, 5)
    for method in ("pchip", "linear"):
        gam = even_gammas(coarse, np.ones(4), 9, method)  # already even: the coarse gammas come back exactly
        np.testing.assert_allclose(gam, np.linspace(0, 1, 9), atol=1e-12)
        idx = reuse_index(gam, coarse)
        assert idx.tolist() == [0, -1, 1, -1, 2, -1, 3, -1, 4]
        assert all(gam[2 * i] == coarse[i] for i in range(5))
    # without snapping only the endpoints are guaranteed
    gam = even_gammas(coarse, np.array([1.0, 2.0, 3.0, 4.0]), 7, "linear", snap_tol=0.0)
    assert reuse_index(gam, coarse)[[0, -1]].tolist() == [0, 4]


def test_even_pacing_odd_coarse_grids():
    """Coarse gammas need not be uniform or in [0, 1] (a keyframe walk's u); a zero step is crossed at once."""
    coarse = np.array([0.0, 0.1, 0.5, 0.6, 2.0])
    d = np.array([1.0, 0.0, 2.0, 1.0])  # 0.1 -> 0.5 renders identical frames
    for method in ("pchip", "linear"):
        gam = even_gammas(coarse, d, 17, method)
        assert gam[0] == 0.0 and gam[-1] == 2.0 and (np.diff(gam) >= 0).all()
        assert not ((gam > 0.1 + 1e-9) & (gam < 0.5 - 1e-9)).any(), gam


@pytest.mark.parametrize("coarse, d, frames, match", [
    ([0.0, 1.0], [0.0], 5, "every distance is 0"),
    ([0.0, 0.5, 1.0], [1.0, float("nan")], 5, "finite and >= 0"),
    ([0.0, 0.5, 1.0], [1.0, -0.1], 5, "finite and >= 0"),
    ([0.0, 0.7, 0.5], [1.0, 1.0], 5, "strictly increasing"),
    ([0.0, 0.5, 0.5], [1.0, 1.0], 5, "strictly increasing"),
    ([0.0, float("inf")], [1.0], 5, "strictly increasing"),
    ([0.0], [], 5, "coarse pass of 2"),
    ([0.0, 0.5, 1.0], [1e308, 1e308], 5, "more than a float holds"),
    ([0.0, 0.5, 1.0], [1.0], 5, "one distance per coarse step"),
    ([0.0, 1.0], [1.0], 1, r"2\.\.1000000"),
    ([0.0, 1.0], [1.0], True, r"2\.\.1000000"),
    ([0.0, 1.0], [1.0], 10**9, r"2\.\.1000000"),
])
def test_even_pacing_refuses_degenerate_input(coarse, d, frames, match):
    with pytest.raises(ValueError, match=match):
        even_gammas(np.array(coarse), np.array(d), frames)


def test_even_pacing_bad_method_and_tolerance():
    with pytest.raises(ValueError, match="choose one of pchip, linear"):
        even_gammas([0.0, 1.0], [1.0], 3, "cubic")
    with pytest.raises(ValueError, match="snap_tol"):
        even_gammas([0.0, 1.0], [1.0], 3, snap_tol=float("nan"))


def test_chord_and_pixel_distances():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((6, 8))
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    np.testing.assert_allclose(chord_distance(metrics.step_distances(e)), np.linalg.norm(np.diff(u, axis=0), axis=1),
                               rtol=1e-12)
    frames = np.zeros((3, 2, 2, 3), np.uint8)
    frames[1] = 255
    frames[2, 0] = 255
    np.testing.assert_allclose(pixel_distances(frames), [1.0, np.sqrt(0.5)])
    with pytest.raises(ValueError, match="frames >= 2"):
        pixel_distances(frames[:1])


# ---------------------------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------------------------

RATE = 44_100
CLICKS = (0.31, 0.91, 1.46, 2.21, 2.61)  # seconds, 10 ms after a frame start at 20 fps
DURATION = 3.0
CODECS = {"wav": ("pcm_s16le", "s16p"), "flac": ("flac", "s16p"), "mp3": ("libmp3lame", "fltp"), "m4a": ("aac", "fltp")}


def _clicks() -> np.ndarray:
    """3 s of faint noise (-60 dB) with 5 ms noise bursts at CLICKS: (2, N) stereo float32."""
    rng = np.random.default_rng(0)
    y = 1e-3 * rng.standard_normal(int(DURATION * RATE))
    n = int(0.005 * RATE)
    burst = 0.5 * rng.standard_normal(n) * np.exp(-np.arange(n) / (0.001 * RATE))
    for t in CLICKS:
        i = round(t * RATE)
        y[i:i + n] += burst
    y = np.clip(y, -1, 1).astype(np.float32)
    return np.stack([y, y])


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audio")
    samples = _clicks()
    out = {}
    for ext, (codec, fmt) in CODECS.items():
        out[ext] = folder / f"clicks.{ext}"
        write_audio(out[ext], samples, RATE, codec, fmt)
    return out


def _peaks(o) -> np.ndarray:
    """Times of local maxima of the onset strength above 30% of its largest value."""
    s = o.strength
    k = np.flatnonzero((s[1:-1] >= 0.3 * s.max()) & (s[1:-1] >= s[:-2]) & (s[1:-1] > s[2:])) + 1
    return o.times[k]


# An onset stamped at its window's end shows up 0-2 hops (0-23 ms at 22.05 kHz, hop 256) after it
# starts; measured here: 7-15 ms late in WAV, FLAC and MP3 (LAME's encoder delay is trimmed by FFmpeg).
# PyAV's AAC encoder writes 1024 priming samples into the M4A without an edit list, so FFmpeg plays
# them and every onset there is 1024 / 44100 s = 23.2 ms later still (measured 31-38 ms).
LATE = {"wav": 0.0, "flac": 0.0, "mp3": 0.0, "m4a": 1024 / RATE}


@pytest.mark.parametrize("ext", list(CODECS))
def test_onsets_found_at_the_click_times(audio_files, ext):
    y = decode_audio(audio_files[ext])
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(y.size / 22_050 - DURATION) < 0.05
    o = onset_strength(y)
    found = _peaks(o)
    found = found[found > 0.05]  # the file starts loud after the zero padding: an onset at 0 s too
    print(ext, np.round(found, 4))
    assert len(found) == len(CLICKS)
    late = found - np.array(CLICKS) - LATE[ext]
    assert (late >= -0.002).all() and (late <= 0.025).all(), late


def test_audio_gammas_move_fastest_at_the_clicks(audio_files):
    o = onset_strength(decode_audio(audio_files["wav"]))
    fps, n = 20, int(DURATION * 20)  # 60 frames: the whole file
    gam = audio_gammas(o, n, fps, floor=0.25)
    assert gam[0] == 0.0 and gam[-1] == 1.0 and (np.diff(gam) > 0).all()  # the floor: never frozen
    step = np.diff(gam)  # step j: the walk from frame j (tau_j = j / fps) to frame j + 1
    hit = [int(t * fps) for t in CLICKS]  # the step whose interval holds the onset (and the 0-23 ms after it)
    rest = np.setdiff1d(np.arange(1, n - 1), hit)
    print("click steps / median other step:", np.round(step[hit] / np.median(step[rest]), 1))
    assert step[hit].min() > 3 * np.median(step[rest])
    assert set(np.argsort(step)[-len(CLICKS):]) <= set(hit) | {0}  # the largest steps hold the clicks (or the start)
    # floor = 1: an even walk in time, whatever the music
    np.testing.assert_allclose(audio_gammas(o, n, fps, floor=1.0), np.linspace(0, 1, n), atol=1e-12)


def test_audio_gammas_silence_and_limits():
    o = onset_strength(np.zeros(22_050))  # 1 s of digital silence: no onsets, the even walk
    assert not o.strength.any()
    np.testing.assert_allclose(audio_gammas(o, 10, 10), np.linspace(0, 1, 10), atol=1e-12)
    audio_gammas(o, 5, 10, start_s=0.5)  # 0.5 s + 5 frames at 10 fps = 1.0 s: fits
    with pytest.raises(ValueError, match="use at most 10 frames"):
        audio_gammas(o, 11, 10)
    with pytest.raises(ValueError, match="use at most 5 frames"):
        audio_gammas(o, 6, 10, start_s=0.5)
    for kwargs, match in (({"floor": 0.0}, "freeze"), ({"floor": 1.5}, "freeze"), ({"fps": 0}, "fps"),
                          ({"fps": float("nan")}, "finite"), ({"start_s": -1.0}, "past the audio"),
                          ({"frames": 1}, "both ends")):
        args = {"frames": 5, "fps": 10, **kwargs}
        with pytest.raises(ValueError, match=match):
            audio_gammas(o, **args)


def test_stft_matches_scipy():
    from scipy.signal import ShortTimeFFT
    from scipy.signal.windows import hann

    x = np.random.default_rng(1).standard_normal(5000)
    n_fft, hop = 512, 128
    ours = stft_magnitude(x, n_fft, hop)  # (F, n_fft // 2 + 1)
    sft = ShortTimeFFT(hann(n_fft, sym=False), hop, fs=1.0, mfft=n_fft, fft_mode="onesided", scale_to=None)
    ref = np.abs(sft.stft(x, p0=sft.lower_border_end[1], p1=sft.p_max(x.size)))  # (n_fft // 2 + 1, P)
    # scipy centres its windows: its slice p covers x[p hop - n_fft / 2 : p hop + n_fft / 2]
    first = sft.lower_border_end[1]  # first slice lying wholly inside x
    k = first * hop - n_fft // 2  # its start sample
    assert k % hop == 0
    ref = ref.T[: ours.shape[0] - k // hop]
    np.testing.assert_allclose(ours[k // hop : k // hop + ref.shape[0]], ref, rtol=1e-10, atol=1e-9)
    assert ref.shape[0] > 20


def test_onset_strength_bad_input():
    for bad in (np.zeros(0), np.zeros((2, 10)), np.array([0.0, float("nan")])):
        with pytest.raises(ValueError, match="non-empty finite 1-D"):
            onset_strength(bad)
    with pytest.raises(ValueError, match="hop must lie"):
        onset_strength(np.zeros(100), hop=2048)


def test_decode_audio_errors(tmp_path):
    from PIL import Image

    with pytest.raises(AudioError, match="not found: check the path"):
        decode_audio(tmp_path / "missing.wav")
    text = tmp_path / "notes.mp3"
    text.write_text("these are not sounds\n" * 50)
    with pytest.raises(AudioError, match="is not an audio file FFmpeg can read"):
        decode_audio(text)
    png = tmp_path / "still.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(png)
    with pytest.raises(AudioError, match="has no audio stream"):
        decode_audio(png)
    with pytest.raises(AudioError, match="sample rate"):
        decode_audio(png, sample_rate=10)
    assert issubclass(AudioError, ValueError)
    with pytest.raises(AudioError) as e:  # one line, naming the file
        decode_audio(text)
    assert "\n" not in str(e.value) and "notes.mp3" in str(e.value)


# ---------------------------------------------------------------------------------------------
# bounded memory: the onset strength chunk by chunk equals the whole-signal formula
# ---------------------------------------------------------------------------------------------


def _whole_signal_onsets(x, sample_rate=22_050, n_fft=1024, hop=256):
    """The whole-signal code onset_strength had before it was chunked (it needed ~7 GiB at 3 hours): the reference."""
    from hpcwalk.job.audiofile import LOG_SCALE, _band_matrix

    mag = stft_magnitude(np.concatenate((np.zeros(n_fft), x)), n_fft, hop)
    amp = np.sqrt((mag**2) @ _band_matrix(n_fft, sample_rate))
    top = amp.max()
    level = np.log1p(LOG_SCALE * amp / top) if top > 0 else amp
    strength = np.concatenate(([0.0], np.maximum(np.diff(level, axis=0), 0.0).mean(axis=1)))
    return strength, np.arange(strength.size) * hop / sample_rate, x.size / sample_rate


@pytest.mark.parametrize("seed", range(4))
def test_chunked_onset_strength_equals_the_whole_signal(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50_000, 400_000))
    # noise whose loudness wanders over 60 dB, clicks, a silent stretch, a length that is no multiple of the hop
    x = rng.standard_normal(n) * np.exp(np.cumsum(rng.standard_normal(n)) / 300)
    x[rng.integers(0, n, 20)] += 5.0
    x[n // 3: n // 3 + 20_000] = 0.0
    x = (x / np.abs(x).max()).astype(np.float32).astype(np.float64)
    want, times, dur = _whole_signal_onsets(x)
    chunk = int(rng.choice([1, 3, 7, 64, 1000]))  # frames per chunk: boundaries everywhere, one frame at a time too
    sizes = rng.choice([1, 255, 256, 1023, 1025, 4097, 30_001], n)  # pieces of any size, as PyAV's frames come

    def fed(acc):
        i = 0
        for k in sizes:
            if i >= n:
                return acc
            acc.add(x[i:i + k])
            i += k
        return acc

    one = fed(OnsetAccumulator(chunk_hops=chunk))
    first = fed(OnsetAccumulator(chunk_hops=chunk, keep_bytes=10_000))  # two passes: the top, then the flux
    assert first.overflowed and not one.overflowed
    second = fed(OnsetAccumulator(chunk_hops=int(rng.choice([2, 5, 4096])), top=first.finish_top()))
    with pytest.raises(RuntimeError, match="second pass"):
        first.finish()
    for got in (one.finish(), second.finish(), onset_strength(x)):
        assert got.strength.shape == want.shape and got.duration_s == dur
        np.testing.assert_array_equal(got.times, times)
        np.testing.assert_allclose(got.strength, want, rtol=0, atol=1e-12)
    o = onset_strength(x)
    fps = 24.0
    frames = int(dur * fps) - 1
    old = type(o)(want, times, dur)
    np.testing.assert_allclose(audio_gammas(o, frames, fps, 0.25, 0.01), audio_gammas(old, frames, fps, 0.25, 0.01),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("keep", [None, 1000])
def test_audio_onsets_of_a_file_equal_those_of_its_decoded_samples(audio_files, monkeypatch, keep):
    from hpcwalk.job import audiofile

    if keep:  # the amplitudes outgrow what is kept: the file is decoded twice
        monkeypatch.setattr(audiofile, "KEEP_BYTES", keep)
    for ext in ("wav", "mp3"):
        whole = decode_audio(audio_files[ext])
        want, _, dur = _whole_signal_onsets(whole.astype(np.float64))
        got = audio_onsets(audio_files[ext])
        assert got.duration_s == dur
        np.testing.assert_allclose(got.strength, want, rtol=0, atol=1e-12)


def test_onsets_of_short_signals():
    for n in (1, 255, 256, 257, 1024):
        x = np.random.default_rng(n).standard_normal(n)
        want, times, _ = _whole_signal_onsets(x)
        got = onset_strength(x)
        np.testing.assert_allclose(got.strength, want, rtol=0, atol=1e-12)
        assert got.times.size == n // 256 + 1


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child forked by pytest (torch loaded: ~500 MiB)
# would start with the parent's peak; VmHWM is the new program's own.
MEMORY_CHILD = r"""
import json, sys
from hpcwalk.job.audiofile import audio_onsets
o = audio_onsets(sys.argv[1])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"peak_mib": int(hwm.split()[1]) / 1024, "hops": int(o.strength.size)}))
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_ten_minutes_of_noise_are_analysed_in_bounded_memory(tmp_path):
    """The whole-signal code peaked at 1.14 GiB on these 10 minutes (VmHWM; 2.2 GiB on 20, MemoryError at 3 hours);
    chunked it holds the band amplitudes (~30 MiB here, ~180 MiB an hour, two passes beyond KEEP_BYTES) plus ~100 MiB
    of STFT temporaries: ~195 MiB here (3 hours, two passes: 233 MiB, benchmarks/audio_memory.py)."""
    import json
    import subprocess
    import sys
    import wave
    from pathlib import Path

    path, rate, seconds = tmp_path / "noise.wav", 22_050, 600
    rng = np.random.default_rng(0)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        for _ in range(seconds // 60):
            w.writeframes((rng.standard_normal(60 * rate) * 3000).astype("<i2").tobytes())
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(path)], cwd=root, capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(res)
    assert res["hops"] == seconds * rate // 256 + 1
    assert res["peak_mib"] < 400, res

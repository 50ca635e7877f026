"""Videos streamed from Parquet shards: decoded back with PyAV (never trusting the writer), formats,
partial runs, bad input, and flat peak memory from 100 to 1,000 frames (RSS of a subprocess)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from hpcwalk.cli import app
from hpcwalk.store.runindex import open_run
from hpcwalk.see.video import FORMATS, Layout, VideoError, VideoOptions, require_encoder, write_video
from synthetic_run import LATENT3, frame_image, make_run

runner = CliRunner()


@pytest.fixture(scope="module")
def run300(tmp_path_factory):
    """A 300-frame latent walk with three methods (900 frames), 64x64, shards of 64 frames."""
    path = str(tmp_path_factory.mktemp("run300") / "run")
    make_run(path, [dict(LATENT3, frames=300)], shard_size=64)
    return path


def _decode(path: str) -> tuple[list[np.ndarray], av.video.stream.VideoStream]:
    with av.open(path) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        return frames, s


def test_300_frame_walk_decodes_to_300_frames_side_by_side(run300, tmp_path):
    out = str(tmp_path / "seeds.mp4")
    r = write_video(open_run(run300), "seeds", out, opts=VideoOptions(fps=24, crf=18))
    with av.open(out) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert s.average_rate == 24
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
    assert len(frames) == 300 == r.frames
    assert r.panels == ["linear", "normalized", "slerp"]
    h, w, _ = frames[0].shape
    assert (w, h) == (r.width, r.height) and w % 2 == 0 and h % 2 == 0
    assert w >= 3 * 64
    # each panel shows its own method's frame at that index, in order (bar at x = 3 * index mod 64)
    bar = Layout(["linear", "normalized", "slerp"], 64, 64, True).bar
    for k in (0, 7, 150, 299):
        for m in range(3):
            x0 = m * (64 + Layout.GAP)
            panel = frames[k][bar:bar + 64, x0:x0 + 64].astype(int)
            want = frame_image(0, m, k, 64, 64).astype(int)
            other = frame_image(0, (m + 1) % 3, k, 64, 64).astype(int)
            assert np.abs(panel - want).mean() < 6, (k, m)
            assert np.abs(panel - other).mean() > 15
            assert abs(int(panel[20:40].sum(axis=(0, 2)).argmax()) - (3 * k) % 64) <= 1
    # the label bar holds text (light pixels on the dark bar)
    assert (frames[0][:bar] > 150).any()


def test_mp4_is_faststart(run300, tmp_path):
    out = str(tmp_path / "a.mp4")
    write_video(open_run(run300), "seeds", out, methods=["slerp"])
    data = open(out, "rb").read()
    assert 0 < data.find(b"moov") < data.find(b"mdat")
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # temporary name renamed away


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    run = str(tmp_path / "run")
    make_run(run, [dict(LATENT3, frames=40, methods=["linear"])], shard_size=16)
    out = tmp_path / "v" / "w.mp4"
    write_video(open_run(run), "seeds", str(out))
    before = out.read_bytes()
    # frame 20's stored image (shard 1) is undecodable, in a shard committed as it is (its marker matches:
    # verification passes, so the writer meets the bad bytes mid-video)
    f = os.path.join(run, "frames", "shard-00001.parquet")
    t = pq.read_table(f)
    images = t.column("image").to_pylist()
    images[4] = b"not an image"
    pq.write_table(t.set_column(t.schema.get_field_index("image"), "image", pa.array(images, pa.binary())), f)
    marker = os.path.join(run, "commits", "shard-00001.done.json")
    data = open(f, "rb").read()
    m = json.load(open(marker))
    json.dump({**m, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, open(marker, "w"))
    with pytest.raises(VideoError, match="'seeds' linear frame 20: its stored image cannot be decoded"):
        write_video(open_run(run), "seeds", str(out))
    assert out.read_bytes() == before and os.listdir(out.parent) == ["w.mp4"]


def test_odd_frame_size_is_padded_to_even(tmp_path):
    run = str(tmp_path / "run")
    make_run(run, [dict(LATENT3, frames=5, methods=["linear"])], image_size=(45, 63))
    r = write_video(open_run(run), "seeds", str(tmp_path / "v.mp4"), opts=VideoOptions(labels=False))
    frames, _ = _decode(r.path)
    assert len(frames) == 5 and frames[0].shape[:2] == (46, 64)


@pytest.mark.parametrize("fmt", ["webm", "webp", "gif"])
def test_other_formats(tmp_path, fmt):
    """webm and gif decode back with PyAV; FFmpeg cannot decode animated WebP, so Pillow counts it."""
    run = str(tmp_path / "run")
    make_run(run, [dict(LATENT3, frames=40)])
    out = str(tmp_path / f"v.{fmt}")
    r = write_video(open_run(run), "seeds", out, methods=["linear", "slerp"], opts=VideoOptions(format=fmt, fps=20))
    if fmt == "webp":
        with Image.open(out) as im:
            assert im.format == "WEBP" and im.n_frames == 40 and im.is_animated
    else:
        frames, s = _decode(out)
        assert len(frames) == 40
        assert s.codec_context.name == {"webm": "vp9", "gif": "gif"}[fmt]
        assert s.average_rate == 20 == r.fps
    assert r.format == fmt


def test_gif_reports_the_rate_it_plays_at(tmp_path):
    run = str(tmp_path / "run")
    make_run(run, [dict(LATENT3, frames=5, methods=["linear"])])
    r = write_video(open_run(run), "seeds", str(tmp_path / "v.gif"), opts=VideoOptions(format="gif", fps=30))
    frames, s = _decode(r.path)
    assert len(frames) == 5 and s.average_rate == Fraction(100, 3) and abs(r.fps - 100 / 3) < 1e-9


def test_unavailable_encoder_is_a_clear_error():
    with pytest.raises(VideoError, match="needs the no-such-codec encoder.*choose one of"):
        require_encoder("no-such-codec", "mp4")
    for f in FORMATS.values():  # the formats we offer are all present in this PyAV build
        require_encoder(f.codec, f.container)


def test_partial_run_video_says_what_is_missing(tmp_path):
    run = str(tmp_path / "run")
    # 3 methods x 40 frames, shards of 16: shard 2 holds linear 32-39 and normalized 0-7
    make_run(run, [dict(LATENT3, frames=40)], shard_size=16, drop=(2,))
    out = str(tmp_path / "p.mp4")
    res = runner.invoke(app, ["video", run, "--walk", "seeds", "--out", out])
    assert res.exit_code == 0, res.output
    assert "missing 1 of 8 shards: shard-00002" in res.output
    assert "linear: 8 of 40 frames missing (indices 32-39)" in res.output
    assert "normalized: 8 of 40 frames missing (indices 0-7)" in res.output
    frames, _ = _decode(out)
    assert len(frames) == 40  # slerp has every index; the gaps show as grey "missing" panels
    bar = Layout(["a", "b", "c"], 64, 64, True).bar
    gap = frames[0][bar + 5:bar + 20, 66 + 5:66 + 20].astype(int)  # normalized, index 0: missing
    assert np.abs(gap - 72).max() < 12


def test_cli_writes_one_video_per_walk(tmp_path):
    run = str(tmp_path / "run")
    make_run(run, [dict(LATENT3, frames=6), {"name": "sweep", "kind": "std", "prompt": "a cat", "seed": 1, "frames": 4}])
    res = runner.invoke(app, ["video", run, "--fps", "12"])
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(os.path.join(run, "videos"))) == ["seeds.mp4", "sweep.mp4"]
    frames, s = _decode(os.path.join(run, "videos", "sweep.mp4"))
    assert len(frames) == 4 and s.average_rate == 12


@pytest.mark.parametrize("args, msg", [
    (["--walk", "nope"], "has no walk 'nope': choose one of seeds"),
    (["--walk", "seeds", "--method", "lerp"], "has no method 'lerp': choose from linear, normalized, slerp"),
    (["--method", "lerp"], "no walk of"),
    (["--format", "avi"], "--format 'avi' is not supported: choose one of mp4, webm, webp, gif"),
    (["--fps", "0"], "--fps must be in (0, 240]"),
    (["--crf", "70"], "--crf for mp4 must be in 0..51"),
    (["--out", "OUT.mp4"], "--out names one file but"),
    (["--walk", "seeds", "--out", "OUT.gif", "--format", "mp4"], "ends in .gif but --format is mp4"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, msg):
    run = str(tmp_path / "run")
    make_run(run, [dict(LATENT3, frames=3), {"name": "sweep", "kind": "std", "prompt": "a cat", "seed": 1, "frames": 3}])
    before = sorted(os.listdir(run))
    res = runner.invoke(app, ["video", run, *[a.replace("OUT", str(tmp_path / "out")) for a in args]])
    assert res.exit_code == 2, res.output
    assert msg in res.output
    assert sorted(os.listdir(run)) == before and sorted(os.listdir(tmp_path)) == ["run"]


def test_not_a_run_exits_2(tmp_path):
    res = runner.invoke(app, ["video", str(tmp_path)])
    assert res.exit_code == 2 and "not an hpcwalk run folder" in res.output


_CHILD = textwrap.dedent("""
    import json, sys, time
    from hpcwalk.store.runindex import open_run
    from hpcwalk.see.video import VideoOptions, write_video
    def status():
        d = {}
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                d[k] = int(v.split()[0]) * 1024
        return d
    index = open_run(sys.argv[1])
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status()["VmRSS"]
    r = write_video(index, "w", sys.argv[2], opts=VideoOptions(crf=35))  # memory does not hinge on crf
    print(json.dumps({"frames": r.frames, "peak_delta": status()["VmHWM"] - before}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_peak_memory_is_flat_from_100_to_1000_frames(tmp_path):
    """Peak RSS growth while writing, in a fresh process per video. The allocators are made to return
    freed blocks (system pool for Arrow, a fixed mmap threshold for malloc), so RSS tracks live memory."""
    image_bytes, procs = {}, {}
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_MMAP_THRESHOLD_": "131072"}
    for n in (100, 1000):
        run = str(tmp_path / f"run{n}")
        make_run(run, [{"name": "w", "kind": "latent", "prompt": "a cat", "seeds": [1, 2], "methods": ["linear"],
                        "frames": n}], size=(96, 96), shard_size=64, noise=True)
        image_bytes[n] = sum(os.path.getsize(os.path.join(run, "frames", f)) for f in os.listdir(os.path.join(run, "frames")))
    for n in (100, 1000):  # one fresh process per video, both at once
        procs[n] = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / f"run{n}"), str(tmp_path / f"{n}.mp4")],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deltas = {}
    for n, p in procs.items():
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        res = json.loads(out.strip().splitlines()[-1])
        assert res["frames"] == n
        deltas[n] = res["peak_delta"]
    extra = image_bytes[1000] - image_bytes[100]  # what holding the walk's encoded frames would add
    print(f"peak RSS while writing: 100 frames +{deltas[100] / 2**20:.1f} MiB, 1000 frames "
          f"+{deltas[1000] / 2**20:.1f} MiB; the 900 extra frames are {extra / 2**20:.1f} MiB of PNG")
    assert extra > 16 * 2**20  # the check below can tell streaming from holding the walk
    assert deltas[1000] - deltas[100] < 8 * 2**20


# -- audio: an audio-paced walk plays at its audio_fps with its audio muxed in ------------------------------


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    """A walk timed to a click track: bursts at 0.5, 1.2 and 2.0 s; 20 frames at 10 fps from 0.25 s."""
    from test_walks import clicks

    folder = tmp_path_factory.mktemp("audio")
    clicks(folder / "beat.wav")
    run = str(folder / "run")
    make_run(run, [{"name": "au", "kind": "latent", "prompt": "a cat", "seeds": [1, 2], "methods": ["slerp"],
                    "frames": 20, "pace": "audio", "audio": str(folder / "beat.wav"), "audio_fps": 10,
                    "audio_start": 0.25}, {"name": "plain", "kind": "std", "prompt": "a cat", "seed": 1, "frames": 3}])
    return run, folder / "beat.wav"


def _audio(path: str) -> tuple[np.ndarray, int, str]:
    """The file's audio stream as mono float samples, its rate and codec name."""
    with av.open(path) as c:
        s = c.streams.audio[0]
        chunks = [f.to_ndarray().reshape(f.layout.nb_channels if f.format.is_planar else 1, -1).mean(0)
                  for f in c.decode(s)]
        return np.concatenate(chunks), s.rate, s.codec_context.name


@pytest.mark.parametrize("fmt, codec", [("mp4", "aac"), ("webm", "opus")])
def test_audio_paced_walk_gets_its_audio_from_its_start(audio_run, tmp_path, fmt, codec):
    run, _ = audio_run
    out = str(tmp_path / f"au.{fmt}")
    res = runner.invoke(app, ["video", run, "--walk", "au", "--out", out])
    assert res.exit_code == 0, res.output
    assert "10 fps" in res.output and "audio " in res.output
    frames, s = _decode(out)
    assert len(frames) == 20 and s.average_rate == 10
    y, rate, name = _audio(out)
    assert name == codec
    loud = np.flatnonzero(np.abs(y) > 0.2) / rate  # samples of the bursts, in the video's time
    starts = loud[np.r_[True, np.diff(loud) > 0.1]]
    print(f"{fmt}: audio {len(y) / rate:.3f} s, bursts at {np.round(starts, 4).tolist()} s (0.25, 0.95, 1.75 expected)")
    # the file's bursts at 0.5, 1.2, 2.0 s, from audio_start 0.25 s (decoders drop the encoders' priming samples)
    np.testing.assert_allclose(starts, [0.25, 0.95, 1.75], atol=0.01)
    assert abs(len(y) / rate - 2.0) < 0.05  # as long as the 20 frames at 10 fps (the file runs to 3 s)


@pytest.mark.parametrize("args, msg", [
    (["--walk", "au", "--fps", "24"], "is timed to its audio at 10 fps: drop --fps"),
    (["--walk", "au", "--format", "gif"], "has no audio track: use mp4 or webm, or pass --no-audio"),
    (["--walk", "plain", "--audio", "NOPE.wav"], "--audio: audio file"),
    (["--walk", "au", "--audio", "BEAT", "--no-audio"], "--audio and --no-audio contradict each other"),
    (["--walk", "au", "--audio-start", "-1", "--audio", "BEAT"], "--audio-start must be a finite number"),
])
def test_bad_audio_options_exit_2(audio_run, tmp_path, args, msg):
    run, beat = audio_run
    args = [a.replace("NOPE", str(tmp_path / "nope")).replace("BEAT", str(beat)) for a in args]
    res = runner.invoke(app, ["video", run, *args, "--out", str(tmp_path / ("v.gif" if "gif" in args else "v.mp4"))])
    assert res.exit_code == 2, res.output
    assert msg in res.output and not os.listdir(tmp_path)


def test_audio_is_optional_and_can_be_given(audio_run, tmp_path):
    run, beat = audio_run
    res = runner.invoke(app, ["video", run, "--walk", "au", "--format", "gif", "--no-audio", "--out",
                              str(tmp_path / "au.gif")])
    assert res.exit_code == 0 and "10 fps" in res.output, res.output  # still timed at the walk's fps
    res = runner.invoke(app, ["video", run, "--walk", "plain", "--audio", str(beat), "--out", str(tmp_path / "p.mp4")])
    assert res.exit_code == 0, res.output
    y, rate, _ = _audio(str(tmp_path / "p.mp4"))
    assert abs(len(y) / rate - 1024 / rate - 0.1) < 0.05  # 3 frames at 30 fps
    moved = str(beat) + ".moved"
    os.rename(beat, moved)
    try:
        res = runner.invoke(app, ["video", run, "--walk", "au", "--out", str(tmp_path / "x.mp4")])
        assert res.exit_code == 2 and "which is not there: pass --audio FILE, or --no-audio" in res.output
    finally:
        os.rename(moved, beat)

"""Videos of walks, streamed from a run's Parquet shards: one panel per method, side by side, labelled.

Frames are decoded, composed and encoded one at a time, and each method's images are read one shard at a
time (`runindex.iter_images`), so memory stays flat however long the walk is. The file is written under a
temporary name beside the target and renamed into place when complete. A partially rendered run gives a
video of what is committed; a frame that one method lacks shows as a grey "missing" panel.
"""

from __future__ import annotations

import io
import os
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterator, Sequence

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hpcwalk.core.errors import HpcwalkError
from hpcwalk.core.fsio import target_error, walk_file
from hpcwalk.store.runindex import RunIndex, Track, iter_images, param_rows, param_text


class VideoError(HpcwalkError, ValueError):
    """The video cannot be made as asked; the message names the option and the fix."""


@dataclass(frozen=True)
class Format:
    container: str
    codec: str
    pix_fmt: str
    container_options: dict[str, str]
    crf_max: int | None  # None: the codec has no crf (webp: quality 90, gif: a 256-colour palette per frame)


FORMATS: dict[str, Format] = {
    "mp4": Format("mp4", "libx264", "yuv420p", {"movflags": "+faststart"}, 51),
    "webm": Format("webm", "libvpx-vp9", "yuv420p", {}, 63),
    "webp": Format("webp", "libwebp_anim", "yuv420p", {"loop": "0"}, None),
    "gif": Format("gif", "gif", "pal8", {"loop": "0"}, None),
}


@dataclass(frozen=True)
class VideoOptions:
    format: str = "mp4"
    fps: float = 30.0
    crf: int = 18  # mp4 (libx264, 0-51) and webm (libvpx-vp9, 0-63): lower is better; webp and gif ignore it
    labels: bool = True  # method names above the panels, the walk parameter below
    audio: str | None = None  # an audio file muxed in (mp4: AAC, webm: Opus), from audio_start, as long as the video
    audio_start: float = 0.0  # seconds into the audio where the first frame shows


@dataclass
class VideoResult:
    """What was written."""

    path: str
    walk: str
    panels: list[str]
    frames: int
    width: int
    height: int
    fps: float  # as played (GIF rounds frame delays to 1/100 s)
    format: str
    seconds: float
    missing: list[str] = field(default_factory=list)  # gaps of the partial run, one line each
    audio: str | None = None  # the audio muxed in

    def describe(self) -> str:
        sound = f", audio {self.audio}" if self.audio else ""
        return (f"wrote {self.path}: walk {self.walk!r}, {self.frames} frames, {self.width}x{self.height}, "
                f"{self.fps:g} fps, {self.format}, panels {', '.join(self.panels)}{sound} ({self.seconds:.1f} s)")


# ---------------------------------------------------------------------------------------------
# 1. Validation
# ---------------------------------------------------------------------------------------------


def check_options(opts: VideoOptions) -> Format:
    """The Format for `opts`, or VideoError naming the bad option (or the encoder this PyAV build lacks)."""
    if opts.format not in FORMATS:
        raise VideoError(f"--format {opts.format!r} is not supported: choose one of {', '.join(FORMATS)}")
    fmt = FORMATS[opts.format]
    require_encoder(fmt.codec, opts.format)
    if not 0 < opts.fps <= 240:
        raise VideoError(f"--fps must be in (0, 240], got {opts.fps:g}")
    if fmt.crf_max is not None and not 0 <= opts.crf <= fmt.crf_max:
        raise VideoError(f"--crf for {opts.format} must be in 0..{fmt.crf_max}, got {opts.crf}")
    if opts.audio is not None:
        from hpcwalk.see.audiomux import AUDIO_CODECS, AudioMuxError, check_audio

        if opts.format not in AUDIO_CODECS:
            raise VideoError(f"--format {opts.format} has no audio track: use mp4 or webm, or --no-audio")
        if not (0 <= opts.audio_start < float("inf")):
            raise VideoError(f"--audio-start must be a finite number of seconds >= 0, got {opts.audio_start:g}")
        require_encoder(AUDIO_CODECS[opts.format][0], opts.format)
        try:
            check_audio(opts.audio)
        except AudioMuxError as e:
            raise VideoError(f"--audio: {e}") from None
    return fmt


@dataclass(frozen=True)
class WalkAudio:
    """The audio a walk is timed to (pace = "audio"), as its job recorded it."""

    path: str  # resolved against the job file's folder
    written: str  # as written in the job
    sha256: str
    fps: float
    start: float


def walk_audio(index: RunIndex, walk: str) -> WalkAudio | None:
    """The walk's audio (None unless it is audio-paced): its path relative to the job file run.json names."""
    from hpcwalk.job.walkkeys import base_dir, resolve

    w = next((x for x in (index.job.walks if index.job else ()) if x.name == walk), None)
    if w is None or w.pace != "audio":
        return None
    path = resolve(base_dir(str(index.run.get("source") or "")), w.audio)
    return WalkAudio(str(path), w.audio, w.audio_sha256, w.audio_fps, w.audio_start)


def walk_options(index: RunIndex, walk: str, opts: VideoOptions, fps: float | None = None, audio: str | None = None,
                 audio_start: float | None = None, no_audio: bool = False) -> VideoOptions:
    """The options for one walk's video: an audio-paced walk plays at its audio_fps with its audio (from its
    audio_start) unless --no-audio or another --audio; --fps must then agree with the walk's timing."""
    import dataclasses

    if no_audio and audio is not None:
        raise VideoError("--audio and --no-audio contradict each other: give one")
    timed = walk_audio(index, walk)
    if timed is not None and fps is not None and fps != timed.fps:
        raise VideoError(f"walk {walk!r} is timed to its audio at {timed.fps:g} fps: drop --fps (or pass --fps "
                         f"{timed.fps:g})")
    rate = fps if fps is not None else timed.fps if timed else 30.0
    if no_audio or (audio is None and timed is None):
        return dataclasses.replace(opts, fps=rate, audio=None)
    if audio is None:  # the walk's own audio
        if not os.path.isfile(timed.path):
            raise VideoError(f"walk {walk!r} is timed to audio {timed.written!r} ({timed.path}), which is not there: "
                             "pass --audio FILE, or --no-audio")
        if opts.format not in ("mp4", "webm"):
            raise VideoError(f"walk {walk!r} is timed to audio, and --format {opts.format} has no audio track: use "
                             "mp4 or webm, or pass --no-audio")
        from hpcwalk.job.imagefile import image_sha256

        if image_sha256(timed.path) != timed.sha256:
            import warnings

            from hpcwalk.store.verify import RunWarning

            warnings.warn(RunWarning(f"walk {walk!r}: {timed.path} is not the audio the walk was timed to (its "
                                     "sha256 differs); muxing it anyway"), stacklevel=2)
        return dataclasses.replace(opts, fps=rate, audio=timed.path,
                                   audio_start=timed.start if audio_start is None else audio_start)
    return dataclasses.replace(opts, fps=rate, audio=audio, audio_start=audio_start or 0.0)


def require_encoder(codec: str, fmt: str) -> None:
    """Raise VideoError unless this PyAV/FFmpeg build can encode with `codec`."""
    if not _has_encoder(codec):
        have = [f for f, x in FORMATS.items() if x.codec != codec and _has_encoder(x.codec)]
        raise VideoError(f"--format {fmt} needs the {codec} encoder, which this PyAV/FFmpeg build (av "
                         f"{av.__version__}) lacks: choose one of {', '.join(have) or 'none'}")


def _has_encoder(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
        return True
    except Exception:  # PyAV raises UnknownCodecError (a ValueError) or FFmpegError subclasses
        return False


def select_tracks(index: RunIndex, walk: str, methods: Sequence[str] | None = None) -> list[Track]:
    """The walk's tracks to show, in the order asked (default: every method of the walk)."""
    tracks = index.tracks(walk)  # StoreError names the walks when `walk` is unknown
    by_label = {t.label: t for t in tracks}
    if methods:
        bad = [m for m in methods if m not in by_label]
        if bad:
            raise VideoError(f"walk {walk!r} has no method {', '.join(map(repr, bad))}: choose from "
                             f"{', '.join(by_label)}")
        tracks = [by_label[m] for m in dict.fromkeys(methods)]
    if not any(t.rows.num_rows for t in tracks):
        raise VideoError(f"walk {walk!r} has no committed frames yet"
                         + (f" for {', '.join(t.label for t in tracks)}" if methods else "") + ": render it first")
    return tracks


def default_path(index: RunIndex, walk: str, methods: Sequence[str] | None, fmt: str) -> str:
    """RUN/videos/WALK[.METHOD-METHOD...].FMT for a local run (the walk's one file name: core.fsio.walk_file);
    VideoError for a remote one (pass --out)."""
    if "://" in index.uri and not index.uri.startswith("file://"):
        raise VideoError(f"run {index.uri!r} is not a local folder: pass --out with a local file path")
    kind = f"{'-'.join(methods)}.{fmt}" if methods else fmt
    return os.path.join(index.uri.removeprefix("file://"), "videos", walk_file(walk, kind))


# ---------------------------------------------------------------------------------------------
# 2. Layout: panels side by side, a label bar above, a caption bar below, padded to even sizes
# ---------------------------------------------------------------------------------------------


class Layout:
    """Composes one output frame from one image per panel."""

    GAP = 2
    BG = (16, 16, 16)

    def __init__(self, labels: list[str], w: int, h: int, show_labels: bool):
        self.w, self.h, self.n = w, h, len(labels)
        self.bar = max(12, min(40, round(0.1 * h) + 6)) if show_labels else 0
        self.width = _even(self.n * w + (self.n - 1) * self.GAP)
        self.height = _even(h + 2 * self.bar)
        self.show_labels = show_labels
        self.base = Image.new("RGB", (self.width, self.height), self.BG)
        if show_labels:
            draw = ImageDraw.Draw(self.base)
            for k, text in enumerate(labels):
                _text(draw, text, (self.x(k), 0, w, self.bar))
        self.missing = Image.new("RGB", (w, h), (72, 72, 72))
        _text(ImageDraw.Draw(self.missing), "missing", (0, 0, w, h))

    def x(self, k: int) -> int:
        return k * (self.w + self.GAP)

    def compose(self, images: list[Image.Image | None], caption: str) -> Image.Image:
        canvas = self.base.copy()
        for k, img in enumerate(images):
            if img is not None and img.size != (self.w, self.h):
                raise VideoError(f"a frame is {img.size[0]}x{img.size[1]}, the walk's frames are {self.w}x{self.h}")
            canvas.paste(img if img is not None else self.missing, (self.x(k), self.bar))
        if self.show_labels:
            _text(ImageDraw.Draw(canvas), caption, (0, self.bar + self.h, self.n * self.w + (self.n - 1) * self.GAP,
                                                    self.bar))
        return canvas


def _even(v: int) -> int:
    return v + (v % 2)


def _text(draw: ImageDraw.ImageDraw, text: str, box: tuple[int, int, int, int]) -> None:
    """Centre `text` in box (x, y, w, h), shrinking the font to fit and cutting it with '...' if needed.
    Control characters (newlines, NUL) show as spaces: a label is one line of data."""
    text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text[:400])
    x, y, w, h = box
    size = max(7, h - 4)
    font = ImageFont.load_default(size=size)
    while size > 7 and font.getlength(text) > w - 2:
        size -= 1
        font = ImageFont.load_default(size=size)
    while len(text) > 1 and font.getlength(text) > w - 2:
        text = text[:-4] + "..." if len(text) > 4 else text[:-1]
    tw = font.getlength(text)
    draw.text((x + (w - tw) / 2, y + h / 2), text, fill=(235, 235, 235), font=font, anchor="lm")


# ---------------------------------------------------------------------------------------------
# 3. Streaming frames and writing the file
# ---------------------------------------------------------------------------------------------


def write_video(index: RunIndex, walk: str, out: str | None = None, methods: Sequence[str] | None = None,
                opts: VideoOptions = VideoOptions()) -> VideoResult:
    """Stream the walk's committed frames into one video at `out` (default RUN/videos/WALK.FMT)."""
    t0 = time.perf_counter()
    # 1. validate everything before writing
    fmt = check_options(opts)
    tracks = select_tracks(index, walk, methods)
    out = out or default_path(index, walk, methods, opts.format)
    ext = os.path.splitext(out)[1].lstrip(".").lower()
    if ext in FORMATS and ext != opts.format:
        raise VideoError(f"--out {out!r} ends in .{ext} but --format is {opts.format}: make them agree")
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.exists(out) and not os.path.isfile(out):
        raise VideoError(f"--out {out!r} exists and is not a file: choose a file path")
    anc = parent
    while not os.path.exists(anc):
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc) or not os.access(anc, os.W_OK | os.X_OK):
        raise VideoError(f"--out {out!r} is not writable ({anc!r} is not a writable folder): choose another --out")
    # 2. layout and the frame positions (the union of the tracks' committed indices)
    w = max(t.rows.column("width")[0].as_py() for t in tracks if t.rows.num_rows)
    h = max(t.rows.column("height")[0].as_py() for t in tracks if t.rows.num_rows)
    layout = Layout([t.label for t in tracks], w, h, opts.labels)
    rows = {}
    for t in reversed(tracks):
        rows.update({r["index"]: r for r in param_rows(t.rows)})
    positions = sorted(rows)
    segments = 1 + max(r["segment"] for r in rows.values())
    # 3. encode under a temporary name, then rename into place
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex[:8]}")
    rate = Fraction(opts.fps).limit_denominator(1001)
    try:
        with av.open(tmp, "w", format=fmt.container, options=fmt.container_options) as container:
            stream = container.add_stream(fmt.codec, rate=rate, options=_codec_options(fmt, opts))
            stream.width, stream.height, stream.pix_fmt = layout.width, layout.height, fmt.pix_fmt
            sound = None
            if opts.audio is not None:  # interleaved: audio up to each frame's end is muxed after the frame
                from hpcwalk.see.audiomux import AudioTrack

                sound = AudioTrack(container, opts.audio, opts.format, opts.audio_start, len(positions) / float(rate))
            frames = 0
            for k, images in enumerate(_aligned(index, tracks, positions)):
                text = f"{param_text(tracks[0].kind, rows[positions[k]], segments)}  {k + 1}/{len(positions)}"
                canvas = layout.compose(images, text)
                frame = _to_frame(canvas, fmt.pix_fmt)
                frame.pts = k
                for packet in stream.encode(frame):
                    container.mux(packet)
                frames += 1
                if sound is not None:
                    sound.mux_until(container, frames / float(rate))
            for packet in stream.encode():
                container.mux(packet)
            if sound is not None:
                sound.finish(container)
        os.replace(tmp, out)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise target_error(e, out) from e  # a full disk: the file meant, not the temporary name
        if type(e).__name__ == "AudioMuxError":  # hpcwalk.see.audiomux, imported only when muxing
            raise VideoError(f"--audio {opts.audio!r}: {e}") from None
        raise
    played = 100 / round(100 / float(rate)) if fmt.container == "gif" else float(rate)  # GIF delays: 1/100 s
    return VideoResult(out, walk, [t.label for t in tracks], frames, layout.width, layout.height, played,
                       opts.format, time.perf_counter() - t0, index.missing_report(), opts.audio)


def _codec_options(fmt: Format, opts: VideoOptions) -> dict[str, str]:
    if fmt.codec == "libx264":
        return {"crf": str(opts.crf), "preset": "medium"}
    if fmt.codec == "libvpx-vp9":
        return {"crf": str(opts.crf), "b": "0"}  # constant quality needs bitrate 0
    if fmt.codec == "libwebp_anim":
        return {"quality": "90"}
    return {}


def _aligned(index: RunIndex, tracks: list[Track], positions: list[int]) -> Iterator[list[Image.Image | None]]:
    """One image per track at each position (None where the track lacks that frame), streamed."""
    streams = [iter_images(index, t) for t in tracks]
    heads: list[tuple[int, bytes] | None] = [next(s, None) for s in streams]
    for p in positions:
        out: list[Image.Image | None] = []
        for k, s in enumerate(streams):
            head = heads[k]
            if head is not None and head[0] == p:
                try:
                    out.append(Image.open(io.BytesIO(head[1])).convert("RGB"))
                except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
                    raise VideoError(f"walk {tracks[k].walk!r} {tracks[k].label} frame {p}: its stored image "
                                     f"cannot be decoded ({e}); re-render that shard") from None
                heads[k] = next(s, None)
            else:
                out.append(None)
        yield out


def _to_frame(canvas: Image.Image, pix_fmt: str) -> av.VideoFrame:
    """RGB canvas -> VideoFrame; for GIF, a per-frame 256-colour palette (fast octree)."""
    if pix_fmt != "pal8":
        return av.VideoFrame.from_ndarray(np.asarray(canvas), format="rgb24")
    q = canvas.quantize(256, method=Image.Quantize.FASTOCTREE)
    rgb = np.asarray(q.getpalette(), np.uint8).reshape(-1, 3)
    palette = np.zeros((256, 4), np.uint8)  # ARGB rows, as PyAV expects for pal8
    palette[: len(rgb), 0] = 255
    palette[: len(rgb), 1:] = rgb
    return av.VideoFrame.from_ndarray((np.asarray(q), palette), format="pal8")

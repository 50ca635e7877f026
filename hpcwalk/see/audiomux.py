"""A walk's audio as the second stream of its video: decoded, resampled, trimmed and encoded with PyAV.

    mp4   AAC (FFmpeg's native encoder), at the file's rate     webm   Opus (libopus), 48 kHz
    gif, webp: no audio stream (refused with a clear line by hpcwalk.see.video)

The track starts `start_s` into the audio file and ends with the video (its frames / fps); a file that
ends sooner leaves the rest silent. `mux_until(t)` encodes the audio up to time t, so the video writer
interleaves the two streams as it writes frames, and `finish` flushes the encoder.
"""

from __future__ import annotations

import os
from typing import Iterator

import av

from hpcwalk.core.errors import HpcwalkError

AUDIO_CODECS = {"mp4": ("aac", None, 1024), "webm": ("libopus", 48_000, 960)}  # codec, rate (None: the file's), frame


class AudioMuxError(HpcwalkError, ValueError):
    """The audio file cannot be muxed; the message names it and the fix."""


def check_audio(path: str) -> None:
    """The file is there and FFmpeg finds an audio stream in it (decoding errors surface while muxing)."""
    if not os.path.isfile(path):
        raise AudioMuxError(f"audio file {path!r} not found: check the path")
    try:
        with av.open(path) as c:
            if not c.streams.audio:
                raise AudioMuxError(f"{path!r} has no audio stream: pass a file with sound")
    except av.FFmpegError as e:
        raise AudioMuxError(f"{path!r} is not an audio file FFmpeg can read ({e}): pass a WAV, MP3, AAC, FLAC or "
                            "Opus file") from None


class AudioTrack:
    """One audio stream added to `container`, fed from the file at `path` from `start_s` for `duration_s`."""

    def __init__(self, container: av.container.OutputContainer, path: str, fmt: str, start_s: float,
                 duration_s: float):
        check_audio(path)
        codec, rate, self.frame_size = AUDIO_CODECS[fmt]
        self._src = av.open(path)
        src = self._src.streams.audio[0]
        self.rate = int(rate or src.rate or 48_000)
        layout = "mono" if src.channels == 1 else "stereo"
        self.stream = container.add_stream(codec, rate=self.rate, layout=layout)
        self._resampler = av.AudioResampler(format=self.stream.codec_context.format.name, layout=layout, rate=self.rate)
        self._fifo = av.AudioFifo()
        self._decoded: Iterator[av.AudioFrame] = self._src.decode(src)
        self._skip = round(start_s * self.rate)  # samples before the walk's first frame
        self._left = round(duration_s * self.rate)  # samples still to take from the file
        self._total = self._left
        self._pts = 0  # samples encoded so far
        self._eof = False

    def mux_until(self, container: av.container.OutputContainer, t_s: float) -> None:
        """Encode and mux the audio up to `t_s` seconds into the video (whole encoder frames)."""
        target = min(round(t_s * self.rate), self._total)
        while self._pts + self._fifo.samples < target + self.frame_size and self._pull():
            pass
        while self._fifo.samples >= self.frame_size and self._pts + self.frame_size <= target:
            self._encode(container, self._fifo.read(self.frame_size))

    def finish(self, container: av.container.OutputContainer) -> None:
        """Encode what is left of the track (the last frame may be short), flush the encoder, close the file."""
        while self._pull():
            pass
        while self._fifo.samples:
            self._encode(container, self._fifo.read(min(self.frame_size, self._fifo.samples)))
        for packet in self.stream.encode(None):
            container.mux(packet)
        self._src.close()

    def _pull(self) -> bool:
        """Decode one more source frame into the FIFO (resampled, the head skipped, the tail cut); False at the end."""
        if self._eof or self._left <= 0:
            return False
        try:
            frame = next(self._decoded)
        except StopIteration:
            self._eof = True
            frames = self._resampler.resample(None)
        except av.FFmpegError as e:
            raise AudioMuxError(f"the audio stream is damaged ({e}): re-encode or replace the file") from None
        else:
            frames = self._resampler.resample(frame)
        for f in frames:
            n = f.samples
            if self._skip >= n:
                self._skip -= n
                continue
            if self._skip or n > self._left:
                arr = f.to_ndarray()  # (channels, n) planar, or (1, n * channels) packed
                per = arr.shape[1] // n
                arr = arr[:, self._skip * per : (self._skip + min(n - self._skip, self._left)) * per]
                cut = av.AudioFrame.from_ndarray(arr, format=f.format.name, layout=f.layout.name)
                cut.sample_rate = self.rate
                f, self._skip = cut, 0
            self._left -= f.samples
            f.pts = None
            self._fifo.write(f)
        return not self._eof and self._left > 0

    def _encode(self, container: av.container.OutputContainer, frame: av.AudioFrame) -> None:
        frame.pts = self._pts
        frame.sample_rate = self.rate
        self._pts += frame.samples
        for packet in self.stream.encode(frame):
            container.mux(packet)

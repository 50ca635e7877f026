"""Writes the example inputs of examples/walks.toml: two small pictures and a click track.

    python examples/inputs/make_inputs.py      (deterministic: the committed files are its output)

sunrise.png  80x60 (landscape: `images` walks fit it to the frame by a centre crop): a sky gradient and a sun
tiles.png    60x80 (portrait): a tiled pattern
beat.flac    3 s, 8 kHz mono: short tone bursts on a 0.5 s beat, with a louder one every 1.5 s
"""

from __future__ import annotations

import os

import av
import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def sunrise() -> np.ndarray:
    yy, xx = np.mgrid[0:60, 0:80].astype(np.float64)
    sky = np.stack([200 - yy * 1.5, 120 + yy, 255 - yy * 2], -1)
    sun = (xx - 52) ** 2 + (yy - 38) ** 2 < 140
    sky[sun] = (255, 210, 90)
    sky[yy > 48] = (40, 90, 50)  # a strip of land
    return sky.clip(0, 255).astype(np.uint8)


def tiles() -> np.ndarray:
    yy, xx = np.mgrid[0:80, 0:60]
    on = ((xx // 10) + (yy // 10)) % 2 == 0
    img = np.where(on[..., None], [230, 60, 60], [40, 60, 200])
    return img.astype(np.uint8)


def beat(rate: int = 8_000, seconds: float = 3.0) -> np.ndarray:
    y = np.zeros(int(rate * seconds), np.float32)
    n = int(0.03 * rate)
    burst = np.sin(2 * np.pi * 660 * np.arange(n) / rate) * np.hanning(n)
    for k, t in enumerate(np.arange(0.25, seconds, 0.5)):
        i = int(t * rate)
        y[i : i + n] += (0.9 if k % 3 == 0 else 0.4) * burst
    return y


def write_flac(path: str, y: np.ndarray, rate: int = 8_000) -> None:
    with av.open(path, "w") as c:
        st = c.add_stream("flac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((y * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate = rate
        for p in st.encode(frame):
            c.mux(p)
        for p in st.encode():
            c.mux(p)


if __name__ == "__main__":
    Image.fromarray(sunrise()).save(os.path.join(HERE, "sunrise.png"), optimize=True)
    Image.fromarray(tiles()).save(os.path.join(HERE, "tiles.png"), optimize=True)
    write_flac(os.path.join(HERE, "beat.flac"), beat())
    for name in ("sunrise.png", "tiles.png", "beat.flac"):
        print(name, os.path.getsize(os.path.join(HERE, name)), "bytes")

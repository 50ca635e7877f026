"""Image files as walk endpoints: read, checked and fitted to the frame (torch-free).

`load_image` turns a file into the (height, width, 3) uint8 RGB frame an `images` walk inverts
(hpcwalk/render/invert.py); `image_sha256` is the file's content hash, which names the image in the job's
fingerprint and in the inversion cache. Job parsing calls both before any work (hpcwalk/job/bounds.py),
so a missing file, a file that is not an image or a mode without a faithful RGB conversion is one
line and exit 2.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hpcwalk.core.errors import HpcwalkError, first_line

# Modes PIL converts to RGB without losing meaning; the others (16/32-bit integer, float, HSV, LAB)
# would be clipped or misread by a plain conversion, so they are refused with the fix.
RGB_MODES = ("1", "L", "P", "RGB", "CMYK", "YCbCr")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
MAX_IMAGE_PIXELS = 64_000_000  # 64 MP: larger inputs are refused before decoding
PREPROCESS = "v1: exif_transpose, alpha over white, ImageOps.fit lanczos centred"  # part of the cache key


class ImageError(HpcwalkError, ValueError):
    """An image file cannot be used as a walk endpoint; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------
# 1. Loading: RGB, resized and centre-cropped to the job's size
# ---------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike, height: int, width: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """The image at `path` as (height, width, 3) uint8 RGB, covering the frame, centre-cropped.

    1. EXIF orientation applied (a phone photo stands as it was taken); the first frame of an
       animation. 2. To RGB: modes in RGB_MODES convert directly; alpha (ALPHA_MODES) is
       composited over white; any other mode is refused. 3. Fit (PIL.ImageOps.fit, Lanczos): the
       largest centred region of the target's aspect ratio is cut out and resized to (height,
       width), so nothing is stretched and the short side fills the frame; a wider image loses
       equal strips left and right, a taller one top and bottom. One-line ImageError for a missing
       file, a file that is not an image, an unsupported mode, a damaged file or more than
       max_pixels pixels.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise ImageError(f"image file {p!r} not found: check the path")
    try:
        img = Image.open(p)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise ImageError(f"{p!r} is not an image Pillow can read ({first_line(e)}): pass a PNG, JPEG or WebP file") from None
    with img:
        if img.width * img.height > max_pixels:
            raise ImageError(f"{p!r} is {img.width}x{img.height} pixels, more than {max_pixels:,}: scale it down first")
        if img.mode not in RGB_MODES + ALPHA_MODES:
            raise ImageError(f"{p!r} has pixel mode {img.mode!r}, which has no faithful RGB conversion: "
                             "save it as 8-bit RGB (or RGBA, grayscale) and pass that")
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageError(f"{p!r} is damaged ({first_line(e)}): re-export or replace the file") from None
        rgb = _to_rgb(img)
    fitted = ImageOps.fit(rgb, (int(width), int(height)), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    return np.asarray(fitted, dtype=np.uint8).copy()  # (H, W, 3)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in RGB_MODES:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def image_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of the file's bytes (read in 8 MiB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()

"""Per-frame yardsticks that are not CLIP, computed in the render's micro-batch on the device, straight
from the decoded uint8 frames (no PNG round trip), as `clip.score_frames` is:

- `sharpness`: variance of the Laplacian of the luma (no model at all): blur lowers it;
- `encoder_image`: unit-norm features of a non-CLIP encoder (hpcwalk/render/encoder.py), when one is set.

    luma      Y = 0.2125 R + 0.7154 G + 0.0721 B      (BT.709 weights on the 0..255 values, as skimage's rgb2gray)
    Laplacian L = Y[i-1, j] + Y[i+1, j] + Y[i, j-1] + Y[i, j+1] - 4 Y[i, j]   on interior pixels only
    sharpness = mean((L - mean(L))^2)                  (population variance over the (H-2)(W-2) interior pixels)

On the 0..255 scale, so the numbers read like OpenCV's variance-of-Laplacian blur measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpcwalk.job.spec import RenderJob
from hpcwalk.render.encoder import ImageEncoder

LUMA = (0.2125, 0.7154, 0.0721)  # BT.709, as skimage.color.rgb2gray


def luma(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 luma (N, H, W) on 0..255."""
    w = torch.tensor(LUMA, device=frames.device, dtype=torch.float32)
    return frames.float() @ w  # (N, H, W)


def sharpness(frames: torch.Tensor) -> torch.Tensor:
    """Variance of the 4-neighbour Laplacian of the luma over interior pixels: (N, H, W, 3) uint8 -> (N,) float32."""
    if frames.shape[1] < 3 or frames.shape[2] < 3:
        raise ValueError(f"sharpness needs frames of at least 3x3 pixels, got {tuple(frames.shape[1:3])}")
    y = luma(frames)  # (N, H, W)
    lap = (y[:, :-2, 1:-1] + y[:, 2:, 1:-1] + y[:, 1:-1, :-2] + y[:, 1:-1, 2:] - 4 * y[:, 1:-1, 1:-1])  # (N, H-2, W-2)
    return lap.flatten(1).var(dim=1, unbiased=False)  # (N,)


@dataclass
class FrameStats:
    """The per-frame yardsticks of one renderer: sharpness always, encoder features when an encoder is set."""

    encoder: "ImageEncoder | None" = None

    def columns(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-frame columns for one micro-batch of decoded uint8 frames (device tensors, no host sync)."""
        out = {"sharpness": sharpness(frames)}
        if self.encoder is not None:
            out[f"{self.encoder.prefix}_image"] = self.encoder.embed_images(frames).half()
        return out


def load_frame_stats(job: "RenderJob", device: str | torch.device, dtype: torch.dtype) -> FrameStats:
    """The job's per-frame yardsticks: sharpness, and its [encoder] when one is set."""
    from hpcwalk.render.encoder import load_encoder

    name = job.encoder.resolved(job.model.id)
    return FrameStats(load_encoder(name, device, dtype) if name else None)


def check_job_encoder(job: "RenderJob", here: bool = True) -> None:
    """The job's [encoder] checked before any work (`here=False`, a Ray driver: its name only)."""
    from hpcwalk.render.encoder import check_encoder

    check_encoder(job.encoder.resolved(job.model.id), here)

"""What an inexact path (FP8) costs in the frames: pure functions of two uint8 frame stacks.

Frames are uint8 arrays (N, H, W, 3) of the same walk rendered two ways; `ref` is the exact path.
"""

from __future__ import annotations

import numpy as np
import torch

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def psnr(ref: np.ndarray, test: np.ndarray) -> float:
    """10 log10(255^2 / MSE), the MSE over every pixel of every frame; inf for identical stacks."""
    mse = float(np.mean((ref.astype(np.float64) - test.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def sharpness(frames: np.ndarray) -> np.ndarray:
    """Variance of the Laplacian of each frame's luma (edges replicated), (N, H, W, 3) uint8 -> (N,) float."""
    y = torch.from_numpy(frames.astype(np.float64)) @ torch.tensor(LUMA, dtype=torch.float64)  # (N, H, W)
    y = torch.nn.functional.pad(y[:, None], (1, 1, 1, 1), mode="replicate")  # (N, 1, H+2, W+2)
    k = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float64).view(1, 1, 3, 3)
    lap = torch.nn.functional.conv2d(y, k)[:, 0]  # (N, H, W)
    return lap.flatten(1).var(dim=1, unbiased=False).numpy()


def frame_quality(ref: np.ndarray, test: np.ndarray) -> dict[str, float | int]:
    """PSNR (None when identical), max and mean abs difference, and the relative change of mean sharpness, test vs ref."""
    if ref.shape != test.shape or ref.dtype != np.uint8 or test.dtype != np.uint8:
        raise ValueError(f"frame stacks differ: {ref.shape} {ref.dtype} vs {test.shape} {test.dtype}")
    diff = np.abs(ref.astype(np.int16) - test.astype(np.int16))
    s_ref, s_test = float(sharpness(ref).mean()), float(sharpness(test).mean())
    p = psnr(ref, test)
    return {"psnr_db": None if p == float("inf") else p, "identical": p == float("inf"),  # JSON has no infinity
            "max_abs_diff": int(diff.max()), "mean_abs_diff": float(diff.mean()),
            "sharpness_ref": s_ref, "sharpness_delta": (s_test - s_ref) / s_ref if s_ref else float("nan")}

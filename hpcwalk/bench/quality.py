"""What an inexact path (FP8) costs in the frames: pure functions of two uint8 frame stacks.

Frames are uint8 arrays (N, H, W, 3) of the same walk rendered two ways; `ref` is the exact path.
"""

from __future__ import annotations

import numpy as np

from hpcwalk.core.metrics import psnr


def sharpness(frames: np.ndarray) -> np.ndarray:
    """The render's per-frame sharpness (hpcwalk.render.framestats.sharpness) of a uint8 stack (N, H, W, 3) -> (N,)."""
    import torch

    from hpcwalk.render.framestats import sharpness as on_device

    return on_device(torch.from_numpy(np.ascontiguousarray(frames))).double().numpy()


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

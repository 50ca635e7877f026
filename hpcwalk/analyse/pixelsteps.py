"""Step sizes between consecutive frames of a walk in pixel space (SSIM) and perceptually (LPIPS), for studies.

These compare frames, so they run in the study, over the images read back from the run's committed
shards (plan order: walk, method, index; one shard's images in memory at a time), on the device:

    ssim_step(i)  = 1 - SSIM(frame i-1, frame i)     Wang et al. 2004: 11-tap Gaussian window, sigma 1.5,
                    K1 = 0.01, K2 = 0.03, data range 255, per RGB channel, mean over the valid windows
                    (as skimage's structural_similarity with gaussian_weights=True,
                    use_sample_covariance=False, data_range=255, channel_axis=-1)
    lpips_step(i) = LPIPS(frame i-1, frame i)        the `lpips` package (Zhang et al. 2018), v0.1 linear heads

LPIPS `net` names: `alex` / `vgg` (torchvision ImageNet backbones, read from the local torch hub cache
only: nothing is downloaded), `alex-random` (a seeded random AlexNet backbone with LPIPS's shipped linear
heads: for the random `tiny` model and tests), `none`. `auto` picks `alex-random` for the built-in
random SD models and `alex` otherwise.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from hpcwalk.job.studyspec import LPIPS_NETS
from hpcwalk.sd.manifest import Weight, builtin, url_fetch
from hpcwalk.sd.weights import ModelLoadError

RANDOM_LPIPS = ("alex-random",)
SSIM_WINDOW, SSIM_SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03
LPIPS_MIN_SIZE = {"alex": 31, "alex-random": 31, "vgg": 16}  # smaller frames leave no pixel after the backbone's pooling (measured)


class LpipsLoadError(ModelLoadError):
    """LPIPS cannot be used as asked; the message names the weights and the fix."""


# ---------------------------------------------------------------------------------------------
# 1. SSIM (torch, batched, on any device)
# ---------------------------------------------------------------------------------------------


def _gauss(device: torch.device) -> torch.Tensor:
    x = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - SSIM_WINDOW // 2
    g = torch.exp(-(x ** 2) / (2 * SSIM_SIGMA ** 2))
    return (g / g.sum()).float()  # (11,)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of two batches of uint8 frames (N, H, W, 3) -> (N,) float32 (see the module docstring)."""
    if a.shape != b.shape or a.shape[1] < SSIM_WINDOW or a.shape[2] < SSIM_WINDOW:
        raise ValueError(f"ssim needs two batches of one shape, frames at least {SSIM_WINDOW}x{SSIM_WINDOW}; "
                         f"got {tuple(a.shape)}, {tuple(b.shape)}")
    x = a.permute(0, 3, 1, 2).float()  # (N, 3, H, W) on 0..255
    y = b.permute(0, 3, 1, 2).float()
    g = _gauss(x.device)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid region: (N, 3, H-10, W-10)
        n, c, h, w = t.shape
        t = torch.nn.functional.conv2d(t.reshape(n * c, 1, h, w), g.view(1, 1, -1, 1))
        t = torch.nn.functional.conv2d(t, g.view(1, 1, 1, -1))
        return t.reshape(n, c, t.shape[-2], t.shape[-1])

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (K1 * 255) ** 2, (K2 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)  # (N,)


# ---------------------------------------------------------------------------------------------
# 2. LPIPS: which backbone weights, from the local cache only
# ---------------------------------------------------------------------------------------------


def resolve_lpips(net: str, sd_model: str) -> str:
    """`auto` -> alex-random for the built-in random SD models, alex otherwise."""
    from hpcwalk.sd.weights import BUILTIN_MODELS

    if net == "auto":
        return "alex-random" if sd_model in BUILTIN_MODELS else "alex"
    return net


def backbone_url(net: str) -> str:
    """Where torchvision downloads the ImageNet backbone LPIPS loads for `net` from."""
    import torchvision

    weights = {"alex": torchvision.models.AlexNet_Weights.IMAGENET1K_V1,
               "vgg": torchvision.models.VGG16_Weights.IMAGENET1K_V1}[net]
    return weights.url


def backbone_file(net: str) -> str:
    """Where torchvision keeps the ImageNet backbone LPIPS loads for `net` (torch hub cache)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(backbone_url(net)))


def lpips_weight(net: str) -> Weight | None:
    """The backbone `net` (resolved) loads, for `hpcwalk needs` (None for `none`); LPIPS's linear heads ship
    with the lpips package."""
    if net == "none":
        return None
    if net in RANDOM_LPIPS:
        return builtin("LPIPS backbone", net)
    path = backbone_file(net)
    if os.path.isfile(path):
        return Weight("LPIPS backbone", net, path, True, size=os.path.getsize(path))
    folder = os.path.dirname(path)
    fetch, copy = url_fetch(backbone_url(net), folder)
    return Weight("LPIPS backbone", net, path, False, why=f"torchvision {os.path.basename(path)} not in the torch "
                  "hub cache", fetch=fetch, copy_to=folder, copy=copy,
                  env="the torch hub cache: TORCH_HOME/hub/checkpoints, else ~/.cache/torch/hub/checkpoints")


def check_lpips(net: str) -> None:
    """Raise LpipsLoadError naming the fix when `net` (resolved) cannot be loaded here without a download."""
    if net not in LPIPS_NETS or net == "auto":
        raise LpipsLoadError(f"[study] lpips: unknown value {net!r}; choose one of {', '.join(LPIPS_NETS)}")
    if net in ("none", *RANDOM_LPIPS):
        return
    path = backbone_file(net)
    if not os.path.isfile(path):
        fn = "alexnet" if net == "alex" else "vgg16"
        raise LpipsLoadError(
            f"LPIPS weights ({net}: torchvision {os.path.basename(path)}) are not in the local cache ({path}) and "
            f"cannot be downloaded here: on a machine with network run python -c \"import torchvision; "
            f"torchvision.models.{fn}(weights='IMAGENET1K_V1')\" and copy ~/.cache/torch/hub/checkpoints here "
            "(or set TORCH_HOME), or set [study] lpips = \"none\"")


def load_lpips(net: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The lpips package's LPIPS model for `net` (resolved), eval mode, on `device`."""
    import lpips

    check_lpips(net)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # lpips passes torchvision's deprecated `pretrained=`
        torch.manual_seed(0)
        model = lpips.LPIPS(net="alex" if net in RANDOM_LPIPS else net, pnet_rand=net in RANDOM_LPIPS, verbose=False)
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def lpips_distance(model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS between uint8 frames (N, H, W, 3) -> (N,) float32 (inputs scaled to [-1, 1] as LPIPS expects)."""
    dev = next(model.parameters()).device
    x = a.to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = b.to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1
    return model(x, y).flatten().float()


# ---------------------------------------------------------------------------------------------
# 3. Steps along every walk of a run
# ---------------------------------------------------------------------------------------------


@dataclass
class Steps:
    """Per frame i >= 1 of every (walk, method): the step from frame i-1 (keys in walk, method, index)."""

    keys: list[tuple[str, str, int]]
    ssim_step: np.ndarray  # (N,) 1 - SSIM
    lpips_step: np.ndarray | None  # (N,) or None without LPIPS


def _consecutive(uri: str, files: list[str]) -> Iterator[tuple[tuple[str, str, int], np.ndarray, np.ndarray]]:
    """(key of frame i, frame i-1, frame i) for consecutive frames of one (walk, method), in file order."""
    from PIL import Image

    from hpcwalk.store.reader import read_shard

    prev: tuple[str, str, int] | None = None
    prev_img: np.ndarray | None = None
    for f in files:
        t = read_shard(uri, f, ["walk", "method", "index", "image"])
        if t is None:  # unreadable after all: left out with a warning (its walks are incomplete)
            prev = None
            continue
        walks, methods = t["walk"].to_pylist(), t["method"].to_pylist()
        idx, images = t["index"].to_pylist(), t["image"]
        for k in range(t.num_rows):
            img = np.asarray(Image.open(io.BytesIO(images[k].as_py())).convert("RGB"))
            key = (walks[k], methods[k], idx[k])
            if prev is not None and prev[:2] == key[:2] and prev[2] + 1 == key[2]:
                yield key, prev_img, img
            prev, prev_img = key, img


def run_steps(uri: str, files: list[str], lpips_model: torch.nn.Module | None = None,
              device: str | torch.device = "cpu", batch_size: int = 16,
              progress: Callable[[int], None] | None = None) -> Steps:
    """SSIM (and LPIPS) steps between consecutive frames of every walk in a run's verified shard `files`
    (store.verify_run(...).files, in shard order)."""
    keys: list[tuple[str, str, int]] = []
    ss: list[torch.Tensor] = []
    lp: list[torch.Tensor] = []
    batch: list[tuple[np.ndarray, np.ndarray]] = []

    def flush() -> None:
        a = torch.from_numpy(np.stack([p for p, _ in batch])).to(device)
        b = torch.from_numpy(np.stack([q for _, q in batch])).to(device)
        ss.append(1 - ssim(a, b))
        if lpips_model is not None:
            lp.append(lpips_distance(lpips_model, a, b))
        if progress:
            progress(len(batch))
        batch.clear()

    for key, a, b in _consecutive(uri, files):
        keys.append(key)
        batch.append((a, b))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    cat = (lambda xs: torch.cat(xs).cpu().numpy().astype(np.float64) if xs else np.zeros(0))
    return Steps(keys, cat(ss), cat(lp) if lpips_model is not None else None)

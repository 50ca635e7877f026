"""A non-CLIP image encoder (DINOv2 through transformers): unit-norm features of decoded frames, on the device.

The study's on-distribution yardstick (KID between interior and endpoint frames) is computed on CLIP's
embeddings and, independently of CLIP, on these. `[encoder] model` names it:

- `auto`: the built-in `tiny-dinov2` for the `tiny` SD model, none otherwise;
- `tiny-dinov2`: a small DINOv2 with random weights (seeded), for tests and CI;
- a Hugging Face hub id such as `facebook/dinov2-base`, read from the local hub cache only, or a local
  folder holding `config.json`, the weights and `preprocessor_config.json` (as `save_pretrained` writes);
- `none`: no encoder column.

Preprocessing runs on the device on the uint8 frames, with the numbers of the model's own
`preprocessor_config.json` (resize of the short side, center crop, rescale, mean/std), as
`clip.ClipScorer.preprocess` does for CLIP; the feature is the model's pooled output (DINOv2: the
layer-normed CLS token), L2-normalised. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpcwalk.render.clip import OnDevice
from hpcwalk.sd.weights import ModelLoadError

RANDOM_ENCODERS = ("tiny-dinov2",)  # built in, random weights (stated in the run metadata by name)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# Named presets: transformers Dinov2Config arguments and the preprocessing of each built-in.
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-dinov2": dict(config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    patch_size=8, image_size=32),
                        preprocess=dict(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})),
}
# DINOv2's own preprocessing (facebook/dinov2-*: BitImageProcessor), the defaults for fields a config lacks
DEFAULT_PREPROCESS = dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3,
                          rescale_factor=1 / 255)
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL resample codes of preprocessor_config.json


class EncoderLoadError(ModelLoadError):
    """The encoder or its weights cannot be used; the message names the model and the fix."""


def hub_cache() -> str:
    """The Hugging Face hub cache folder, read from the environment now: the SD loader's (weights.hub_cache_dir)."""
    from hpcwalk.sd.weights import hub_cache_dir

    return str(hub_cache_dir())


# ---------------------------------------------------------------------------------------------
# 1. Which weights: built in, a local folder, or a hub id in the local cache
# ---------------------------------------------------------------------------------------------


def check_encoder(name: str, here: bool = True) -> str:
    """Validate an encoder name without loading it; returns its folder ('' for a built-in or `here=False`)."""
    if name in RANDOM_ENCODERS or not name:
        return ""
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file() or not any((folder / f).is_file() for f in WEIGHT_FILES):
            raise EncoderLoadError(f"[encoder] model {name!r}: the folder needs config.json and model.safetensors "
                                   "(as save_pretrained writes them)")
        return str(folder)
    if name.count("/") != 1 or name.startswith(("/", ".", "~")):
        raise EncoderLoadError(f"[encoder] model {name!r} is neither a folder nor a hub id like facebook/dinov2-base: "
                               f"use {', '.join(RANDOM_ENCODERS)}, a hub id, a local folder, or none")
    if not here:
        return ""
    snapshot = cached_snapshot(name)
    if not snapshot:
        raise EncoderLoadError(
            f"encoder weights {name} are not in the local cache ({hub_cache()}) and cannot be downloaded here: on a "
            f"machine with network run hf download {name} and copy the Hugging Face cache (~/.cache/huggingface) "
            "here, pass a local folder, or set [encoder] model = \"none\"")
    return snapshot


def cached_snapshot(repo: str, cache_dir: str | None = None) -> str:
    """The snapshot folder of a hub model in the local cache with config and weights ('' if absent); no network."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = cache_dir or hub_cache()
    config = try_to_load_from_cache(repo, "config.json", cache_dir=cache_dir)
    if not isinstance(config, str):
        return ""
    folder = os.path.dirname(config)
    return folder if any(os.path.isfile(os.path.join(folder, f)) for f in WEIGHT_FILES) else ""


# ---------------------------------------------------------------------------------------------
# 2. Loading and embedding
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageEncoder(OnDevice):
    """One image encoder: device preprocessing of uint8 frames, unit-norm pooled features."""

    model: torch.nn.Module
    name: str
    shortest_edge: int
    crop: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    prefix: str = "encoder"  # column: encoder_image

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalized float (N, 3, h, w): resize the short side, center crop, mean/std."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        x = frames.to(self.device).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8, resized as uint8 as PIL does
        x = TF.resize(x, self.shortest_edge, interpolation=InterpolationMode(self.interpolation), antialias=True)
        x = TF.center_crop(x, list(self.crop)).float() / 255  # (N, 3, h, w)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    @torch.no_grad()
    def embed_images(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> unit-norm features float32 (N, D) on the encoder's device."""
        out = self.model(pixel_values=self.preprocess(frames))
        pooled = getattr(out, "pooler_output", None)
        feats = pooled if pooled is not None else out.last_hidden_state[:, 0]  # (N, D)
        return torch.nn.functional.normalize(feats.float(), dim=-1)


def load_encoder(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ImageEncoder:
    """Load an encoder (see `check_encoder` for the names) on `device` in `dtype`."""
    from transformers import AutoModel, Dinov2Config, Dinov2Model

    # 1. validate (EncoderLoadError names the fix) and find the folder
    folder = check_encoder(name)
    # 2. build: seeded random weights for the built-ins, transformers' loader (local files only) otherwise
    if name in ENCODER_PRESETS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = Dinov2Model(Dinov2Config(**ENCODER_PRESETS[name]["config"]))
        pre = {**DEFAULT_PREPROCESS, **ENCODER_PRESETS[name]["preprocess"]}
    else:
        try:
            net = AutoModel.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # transformers raises many types; keep the cause
            raise EncoderLoadError(f"could not load encoder {name}: {e}") from e
        path = Path(folder) / "preprocessor_config.json"
        pre = {**DEFAULT_PREPROCESS, **(json.loads(path.read_text()) if path.is_file() else {})}
    # 3. the preprocessing numbers
    edge = pre["size"].get("shortest_edge") or min(pre["size"].get("height", 224), pre["size"].get("width", 224))
    crop = (pre["crop_size"]["height"], pre["crop_size"]["width"]) if pre.get("do_center_crop", True) else (edge, edge)
    if pre.get("resample", 3) not in RESAMPLE:
        raise EncoderLoadError(f"encoder {name}: resample {pre['resample']} is not supported on the device (2, 3)")
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ImageEncoder(net, name, int(edge), crop, tuple(pre["image_mean"]), tuple(pre["image_std"]),
                        RESAMPLE[pre.get("resample", 3)])

"""CLIP scoring with open_clip: image embeddings straight from decoded device tensors, text
embeddings cached per prompt, CLIPScore = max(100 * cos(text, image), 0).

`ClipScorer` wraps one open_clip model. Its image preprocessing runs on the device on the uint8
frames the VAE decoded (resize of the short side, center crop, mean/std normalisation, with the
model's own open_clip preprocess config), so no frame goes through PNG and PIL to be scored.
Built-in `tiny-clip` is a small random-weight CLIP (real tokenizer) for tests and the `tiny` SD
model; `pretrained = "none"` gives random weights for any open_clip architecture (benchmarks).
Real weights are read from the local cache only: this module never downloads.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from hpcwalk.job.spec import FrameRow, RenderJob
from hpcwalk.sd.weights import ModelLoadError

BUILTIN_CLIP = ("tiny-clip",)
RANDOM_TAG = "none"  # pretrained = "none": random weights (stated in the run metadata)

# Named presets (gpt-fast's ModelArgs.from_name): open_clip CLIP constructor arguments.
CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-clip": dict(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, head_width=16, layers=2),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2),
    ),
}


class ClipLoadError(ModelLoadError):
    """A CLIP model or its weights cannot be used; the message names the model, the tag and the fix."""


# ---------------------------------------------------------------------------------------------
# 1. Which weights: built-in, random, local folder, file, or a cached open_clip tag
# ---------------------------------------------------------------------------------------------


def check_clip(model: str, pretrained: str, here: bool = True) -> str:
    """Validate a CLIP model / tag pair without loading it; returns the weights file ('' if none).

    `here=False` (a Ray driver: the weights are the workers' business) checks names and tags only:
    folders, weights files and the local cache are checked by each worker when it loads the model."""
    import open_clip

    if model in BUILTIN_CLIP:
        if pretrained != RANDOM_TAG:
            raise ClipLoadError(f"CLIP model {model!r} is built in with random weights: set pretrained = \"none\"")
        return ""
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):]).expanduser()
        if here and not (folder / "open_clip_config.json").is_file():
            raise ClipLoadError(f"CLIP model {model!r}: {folder} has no open_clip_config.json; pass a folder "
                                "saved in open_clip's layout (config + weights)")
        return ""
    if open_clip.get_model_config(model) is None:
        raise ClipLoadError(f"CLIP model {model!r} is not an open_clip architecture: use tiny-clip, "
                            "local-dir:/path, or one of open_clip.list_models() such as ViT-L-14")
    if pretrained == RANDOM_TAG:
        return ""
    if Path(pretrained).expanduser().is_file():
        return str(Path(pretrained).expanduser())
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg and not here and ("/" in pretrained or pretrained.startswith("~")):
        return ""  # a weights file path: it must exist where the workers run, not here
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none known"
        raise ClipLoadError(f"CLIP weights tag {pretrained!r} is unknown for {model!r} (tags: {tags}); "
                            "or pass a weights file path, or \"none\" for random weights")
    path = cached_weights(cfg)
    if not path and here:
        raise ClipLoadError(
            f"CLIP weights {model}/{pretrained} are not in the local cache and cannot be downloaded here: on a "
            f"machine with network run python -c \"import open_clip; open_clip.create_model('{model}', "
            f"pretrained='{pretrained}')\" and copy the Hugging Face cache (~/.cache/huggingface) here, pass "
            "the weights file as pretrained, or use model tiny-clip / pretrained none")
    return path


def cached_weights(cfg: dict[str, Any], hf_cache: str | None = None) -> str:
    """The locally cached weights file of an open_clip pretrained config ('' if not cached); no network.
    `hf_cache`: the Hugging Face hub cache folder (default: huggingface_hub's, HF_HUB_CACHE)."""
    from huggingface_hub import try_to_load_from_cache

    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else ""
    if cfg.get("hf_hub"):  # the files open_clip's download_pretrained_from_hf would fetch, in its order
        from open_clip.constants import HF_WEIGHTS_NAME
        from open_clip.pretrained import _get_safe_alternatives  # open_clip's own safetensors name rule

        repo, name = os.path.split(cfg["hf_hub"])  # 'org/model/' -> ('org/model', '')
        name = name or HF_WEIGHTS_NAME
        for candidate in (*_get_safe_alternatives(name), name):
            hit = try_to_load_from_cache(repo, candidate, cache_dir=hf_cache)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    if cfg.get("url"):
        hit = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        if os.path.isfile(hit):
            return hit
    return ""


# ---------------------------------------------------------------------------------------------
# 2. Loading
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """open_clip's eval preprocessing, as numbers (`open_clip.get_model_preprocess_cfg`)."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "Preprocess":
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"])
        mode = cfg.get("resize_mode", "shortest")
        if mode not in ("shortest", "squash"):
            raise ClipLoadError(f"open_clip resize_mode {mode!r} is not supported on the device (shortest, squash)")
        return cls(tuple(size), tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"), mode)


def load_clip(model: str, pretrained: str, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, prefix: str = "clip") -> "ClipScorer":
    """Load one CLIP model (see `check_clip` for the accepted names) on `device` in `dtype`."""
    import open_clip
    from open_clip.transform import PreprocessCfg

    # 1. validate (raises ClipLoadError naming the fix) and find the weights
    weights = check_clip(model, pretrained)
    # 2. build: seeded random weights for built-ins and "none", open_clip's factory otherwise
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if model in CLIP_PRESETS:
            net = open_clip.CLIP(**CLIP_PRESETS[model])
            open_clip.set_model_preprocess_cfg(net, asdict(PreprocessCfg(size=net.visual.image_size)))
        else:
            kwargs: dict[str, Any] = {}
            if weights and not Path(pretrained).expanduser().is_file():
                cfg = open_clip.get_pretrained_cfg(model, pretrained)
                kwargs = dict(force_quick_gelu=cfg.get("quick_gelu", False), force_preprocess_cfg={
                    k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg})
            try:
                net = open_clip.create_model(model, pretrained=weights or None, **kwargs)
            except Exception as e:  # open_clip raises many types; keep the cause
                raise ClipLoadError(f"could not load CLIP {model}/{pretrained}: {e}") from e
    tokenizer = open_clip.get_tokenizer("ViT-B-32" if model in CLIP_PRESETS else model)
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ClipScorer(net, tokenizer, Preprocess.from_model(net), f"{model}/{pretrained}", prefix)


def load_scorers(job: RenderJob, device: str | torch.device, dtype: torch.dtype) -> list["ClipScorer"]:
    """The job's CLIP models (none when [clip] enabled = false), in column-prefix order."""
    return [load_clip(m, p, device, dtype, prefix) for prefix, m, p in job.clip.models(job.model.id)]


def check_job_clip(job: RenderJob, here: bool = True) -> None:
    """Everything about the job's CLIP models that can fail before loading, checked now (`here=False`
    on a Ray driver: names and tags only; the workers check their own weights when they start)."""
    for _, m, p in job.clip.models(job.model.id):
        check_clip(m, p, here)


# ---------------------------------------------------------------------------------------------
# 3. Scoring on the device
# ---------------------------------------------------------------------------------------------


class OnDevice:
    """The device and dtype of a wrapper's `model` (its parameters'): for ClipScorer and encoder.ImageEncoder."""

    model: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


@dataclass
class ClipScorer(OnDevice):
    """One open_clip model: device preprocessing, image and text embeddings, CLIPScore columns."""

    model: torch.nn.Module
    tokenizer: Any
    preprocess_cfg: Preprocess
    name: str  # "model/pretrained"
    prefix: str = "clip"  # column prefix: clip_image, clip_score, clip_score_b
    _text: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    image_encoder: Any = field(default=None, repr=False)  # a compiled model.encode_image (hpcwalk/sd/compile.py), or None

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) on any device -> normalized float (N, 3, S, S), as open_clip's eval transform."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        p = self.preprocess_cfg
        x = frames.permute(0, 3, 1, 2)  # (N, 3, H, W) uint8: resized as uint8, rounded, as PIL does
        mode = InterpolationMode(p.interpolation)
        if p.resize_mode == "squash":
            x = TF.resize(x, list(p.size), interpolation=mode, antialias=True)
        else:  # shortest side to the crop size, then center crop (open_clip: Resize + CenterCrop)
            x = TF.resize(x, p.size[0] if p.size[0] == p.size[1] else max(p.size), interpolation=mode, antialias=True)
            x = TF.center_crop(x, list(p.size))
        x = x.float() / 255  # (N, 3, S, S)
        mean = torch.tensor(p.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(p.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    @torch.no_grad()
    def embed_images(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> unit-norm image embeddings, float32 (N, D), on the frames' device."""
        x = self.preprocess(frames.to(self.device))
        encode = self.image_encoder or self.model.encode_image
        return torch.nn.functional.normalize(encode(x).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings float32 (P, D); each distinct prompt encoded once, alone, and cached (encoded
        together, a prompt's embedding would depend in its last bits on which prompts shared its batch)."""
        for p in dict.fromkeys(prompts):
            if p not in self._text:
                ids = self.tokenizer([p]).to(self.device)
                self._text[p] = torch.nn.functional.normalize(self.model.encode_text(ids).float(), dim=-1)[0]
        return torch.stack([self._text[p] for p in prompts])

    def score_frames(self, frames: torch.Tensor, rows: Sequence[FrameRow]) -> dict[str, torch.Tensor]:
        """Per-frame columns for plan rows: scored against each row's scoring text (`score_prompt`, by default
        its generation prompt) and, on text walks, the end prompt's (`score_prompt_b`)."""
        return self.score_prompts(frames, [r.score_prompt for r in rows], [r.score_prompt_b for r in rows])

    def score_prompts(self, frames: torch.Tensor, prompts: Sequence[str], prompts_b: Sequence[str | None]
                      ) -> dict[str, torch.Tensor]:
        """Per-frame columns on the device: unit image embedding (float16), CLIPScore against the
        frame's prompt, and against its end prompt where it has one (NaN elsewhere)."""
        img = self.embed_images(frames)  # (N, D)
        score = clip_score_torch(img, self.embed_texts(prompts))
        has_b = torch.tensor([p is not None for p in prompts_b], device=img.device)
        score_b = clip_score_torch(img, self.embed_texts([b or a for a, b in zip(prompts, prompts_b)]))
        return {f"{self.prefix}_image": img.half(), f"{self.prefix}_score": score,
                f"{self.prefix}_score_b": torch.where(has_b, score_b, torch.nan)}


def clip_score_torch(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """max(100 * cos(img_i, txt_i), 0) per row of two (N, D) tensors -> (N,) float32."""
    cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
    return (100 * cos).clamp_min(0)


def score_frames(scorers: Sequence[ClipScorer], frames: torch.Tensor, rows: Sequence[FrameRow]
                 ) -> dict[str, torch.Tensor]:
    """The columns of every scorer for one micro-batch (device tensors; no host sync)."""
    out: dict[str, torch.Tensor] = {}
    for s in scorers:
        out.update(s.score_frames(frames, rows))
    return out


def to_arrow(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, pa.Array]:
    """Concatenate per-batch columns and convert: embeddings -> fixed_size_list<float16>[D],
    scores -> float32 with nulls where NaN."""
    if not parts:
        return {}
    cols: dict[str, pa.Array] = {}
    for name in parts[0]:
        x = torch.cat([p[name] for p in parts]).cpu().numpy()
        if x.ndim == 2:  # (N, D) embeddings
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
        else:
            x = x.astype(np.float32)
            cols[name] = pa.array(x, mask=np.isnan(x))
    return cols

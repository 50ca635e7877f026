"""Load Stable Diffusion 1.x and 2.x components: a hub id (from the local cache), a local diffusers
folder, a single `.safetensors` checkpoint, or a built-in random model (`tiny` and `tiny-v` for tests
and laptops, `sd14-random` and `sd21-random` for benchmarks). Which weights a spec names and how they
load is `hpcwalk.sd.weights`; reading pretrained weights is `hpcwalk.sd.loaders`.

The built-ins keep SD's shapes: 4 latent channels, a VAE that downsamples by 8, and the real
77-token CLIP tokenizer, built offline from the BPE vocabulary that open_clip ships.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from hpcwalk.sd.loaders import clip_tokenizer
from hpcwalk.sd.weights import CONFIGS_DIR, ModelLoadError, ModelSource, model_kind, resolve

# SD 1.4's scheduler config (CompVis/stable-diffusion-v1-4, scheduler/scheduler_config.json).
SD14_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SDComponents:
    """The parts of an SD 1.x/2.x pipeline the renderer needs, on one device in one dtype."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler_config: dict[str, Any]
    model_id: str
    revision: str | None
    dtype: torch.dtype
    device: torch.device
    source: ModelSource | None = None  # how it was loaded (format, config, variant): hpcwalk.sd.weights


# ---------------------------------------------------------------------------------------------
# Device and dtype
# ---------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} requested but CUDA is not available here: use --device cpu")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        # Not a silent fallback: we refuse. Many CPU kernels lack fp16 (or run it very slowly).
        raise ModelLoadError("float16 on the CPU is not supported: use --dtype float32 or bfloat16 on CPU")
    return dtype


# ---------------------------------------------------------------------------------------------
# Built-in random models
# ---------------------------------------------------------------------------------------------

def _config_json(folder: str, part: str) -> dict[str, Any]:
    """A shipped config (hpcwalk/sd/configs/FOLDER/PART) without bookkeeping keys (versions, dtypes; _class_name stays)."""
    d = json.loads((CONFIGS_DIR / folder / part).read_text())
    drop = ("_diffusers_version", "architectures", "transformers_version", "torch_dtype", "model_type")
    return {k: v for k, v in d.items() if k not in drop}


# the tiny presets' UNet and VAE: SD's shapes (4 latent channels, a VAE downsampling by 8), small widths
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), norm_num_groups=16, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
    block_out_channels=(16, 16, 32, 32), norm_num_groups=8, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)

# Named presets (gpt-fast's ModelArgs.from_name): configs for UNet, VAE and CLIP text encoder, the
# scheduler config, the tokenizer's pad token, and how the random weights are drawn: `torch` (the
# modules' own initialisation, in float32, then cast) or `uniform` (filled tensor by tensor in the
# render dtype, so a float16 model never exists in float32: see `build_random`).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "unet": TINY_UNET,
        "vae": TINY_VAE,
        "text": dict(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
            hidden_act="quick_gelu", projection_dim=32,
        ),
        "scheduler": SD14_SCHEDULER_CONFIG, "pad_token": "<|endoftext|>", "init": "torch",
    },
    # SD 2.x in small: linear projections in the transformer blocks, per-block head counts, upcast
    # attention, a 48-wide context, GELU text encoder, "!" padding, SD 2.1's v-prediction scheduler.
    "tiny-v": {
        "unet": {**TINY_UNET, "cross_attention_dim": 48, "attention_head_dim": (2, 4), "use_linear_projection": True,
                 "upcast_attention": True},
        "vae": TINY_VAE,
        "text": dict(
            vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
            hidden_act="gelu", projection_dim=32,
        ),
        "scheduler": _config_json("sd-v2-v", "scheduler/scheduler_config.json"), "pad_token": "!", "init": "torch",
    },
    # CompVis/stable-diffusion-v1-4 configs (unet/, vae/, text_encoder/ config.json).
    "sd14-random": {
        "unet": dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512), scaling_factor=0.18215,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        "text": dict(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
            hidden_act="quick_gelu", projection_dim=768,
        ),
        "scheduler": SD14_SCHEDULER_CONFIG, "pad_token": "<|endoftext|>", "init": "uniform",
    },
    # stabilityai/stable-diffusion-2-1 (768x768, v-prediction, OpenCLIP ViT-H/14 text encoder as
    # diffusers' CLIPTextModel): the shipped sd-v2-v configs.
    "sd21-random": {
        "unet": _config_json("sd-v2-v", "unet/config.json"),
        "vae": _config_json("sd-v2-v", "vae/config.json"),
        "text": _config_json("sd-v2-v", "text_encoder/config.json"),
        "scheduler": _config_json("sd-v2-v", "scheduler/scheduler_config.json"), "pad_token": "!", "init": "uniform",
    },
}


def build_random(name: str, seed: int = 0, dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """UNet, VAE and text encoder of a preset with seeded random weights (same weights everywhere).

    `init = "torch"` presets use the modules' own initialisation in float32 (cast to `dtype` by the
    caller). `init = "uniform"` presets are built without parameter storage and then filled one
    tensor at a time in `dtype`: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases (torch's
    default bound for Linear and Conv), ones and zeros for norm layers, each tensor seeded by its
    name, so the float16 model is the float32 one rounded and no float32 copy is ever held.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = PRESETS[name]
    if cfg["init"] == "torch":
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(cfg["vae"])
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
        return unet, vae, text_encoder
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device, buffers real
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
    for i, m in enumerate((unet, vae, text_encoder)):
        _fill_uniform(m, seed + i, dtype)
    return unet, vae, text_encoder


def _fill_uniform(module: torch.nn.Module, seed: int, dtype: torch.dtype) -> None:
    """Materialise every meta parameter of `module` in `dtype`, one tensor at a time (see build_random)."""
    import zlib

    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for prefix, mod in module.named_modules():
        weight = mod._parameters.get("weight")
        fan_in = math.prod(weight.shape[1:]) if weight is not None and weight.dim() > 1 else None
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if isinstance(mod, norms):
                t = (torch.ones if name == "weight" else torch.zeros)(p.shape, dtype=dtype)
            else:
                bound = 1.0 / math.sqrt(fan_in or p.shape[-1])
                g = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(f"{prefix}.{name}".encode()))
                t = torch.empty(p.shape).uniform_(-bound, bound, generator=g).to(dtype)
            mod._parameters[name] = torch.nn.Parameter(t, requires_grad=False)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_components(model: str, dtype: str = "float32", device: str = "auto", revision: str | None = None,
                    config: str = "auto", variant: str = "auto") -> SDComponents:
    """Load by name: built-in, `.safetensors` file, local diffusers folder, or hub id from the local cache.

    Weights are read in the render dtype (a float16 run never holds a float32 copy of the model);
    `config` and `variant` are the job's `[model]` keys (see hpcwalk.sd.weights.resolve).
    """
    # 1. validate: device, dtype, and the weights as far as they can be checked without loading
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    src = resolve(model, revision, config, variant)
    # 2. build or read the modules, already in the render dtype
    if src.format == "builtin":
        unet, vae, text_encoder = build_random(model, dtype=dt)
        tokenizer, sched = clip_tokenizer(PRESETS[model]["pad_token"]), dict(PRESETS[model]["scheduler"])
    else:
        from hpcwalk.sd.loaders import load_pretrained

        unet, vae, text_encoder, tokenizer, sched = load_pretrained(src, dt)
    # 3. onto the device, eval mode
    from diffusers.utils import logging as dlog

    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()  # diffusers warns on every .to(dtype) of a model without fp32-pinned modules
    try:
        for m in (unet, vae, text_encoder):
            m.to(device=dev, dtype=dt).eval().requires_grad_(False)
    finally:
        dlog.set_verbosity(verbosity)
    return SDComponents(unet, vae, text_encoder, tokenizer, sched, model, revision, dt, dev, src)


def model_source(model: str) -> str:
    """Classify a model spec (builtin, file, folder, hub) and check what can be checked without reading it."""
    return model_kind(model)


def check_model_spec(model: str, dtype: str = "float32", device: str = "auto") -> None:
    """Everything about the model, dtype and device that can fail before loading, checked now."""
    model_source(model)
    resolve_dtype(dtype, resolve_device(device))


def check_model_files(spec: Any) -> ModelSource:
    """A job's `[model]` (ModelSpec) as far as it can be checked without loading: the file, folder or cached
    snapshot exists and is complete, the architecture is known, the variant files exist (ModelLoadError)."""
    return resolve(spec.id, spec.revision, spec.config, spec.variant)

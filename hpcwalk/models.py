"""Load Stable Diffusion 1.x components: hub id, local diffusers folder, single `.safetensors`,
or a built-in random model (`tiny` for tests and laptops, `sd14-random` for benchmarks).

The built-ins keep SD's shapes: 4 latent channels, a VAE that downsamples by 8, and the real
77-token CLIP tokenizer, built offline from the BPE vocabulary that open_clip ships.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

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

BUILTIN_MODELS = ("tiny", "sd14-random")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """Weights could not be loaded; the message says what was tried and how to fix it."""


@dataclass
class SDComponents:
    """The parts of an SD 1.x pipeline the renderer needs, on one device in one dtype."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler_config: dict[str, Any]
    model_id: str
    revision: str | None
    dtype: torch.dtype
    device: torch.device


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
# The real CLIP tokenizer, offline
# ---------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def clip_tokenizer_files() -> tuple[str, str]:
    """Write vocab.json and merges.txt of the OpenAI CLIP BPE (49,408 tokens) from open_clip's copy."""
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    cache = Path(os.environ.get("HPCWALK_CACHE", Path.home() / ".cache" / "hpcwalk")) / "clip-tokenizer"
    cache.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = cache / "vocab.json", cache / "merges.txt"
    tmp = cache / f".tmp-{os.getpid()}"
    tmp.write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    os.replace(tmp, vocab_file)
    tmp.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    os.replace(tmp, merges_file)
    return str(vocab_file), str(merges_file)


def clip_tokenizer():
    """transformers CLIPTokenizer with SD 1.x's ids (bos 49406, eos = pad 49407, 77 tokens)."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = clip_tokenizer_files()
    return CLIPTokenizer(vocab_file, merges_file, model_max_length=77, pad_token="<|endoftext|>")


# ---------------------------------------------------------------------------------------------
# Built-in random models
# ---------------------------------------------------------------------------------------------

# Named presets (gpt-fast's ModelArgs.from_name): configs for UNet, VAE and CLIP text encoder.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unet": dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=16, cross_attention_dim=32, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
            block_out_channels=(16, 16, 32, 32), norm_num_groups=8, scaling_factor=0.18215,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        "text": dict(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
            hidden_act="quick_gelu", projection_dim=32,
        ),
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
    },
}


def build_random(name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """UNet, VAE and text encoder of a preset with seeded random weights (same weights everywhere)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = PRESETS[name]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**cfg["vae"])
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
    return unet, vae, text_encoder


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_components(model: str, dtype: str = "float32", device: str = "auto", revision: str | None = None) -> SDComponents:
    """Load by name: built-in, `.safetensors` file, local diffusers folder, or hub id (in that order)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if model in BUILTIN_MODELS:
        unet, vae, text_encoder = build_random(model)
        tokenizer, sched = clip_tokenizer(), dict(SD14_SCHEDULER_CONFIG)
    else:
        unet, vae, text_encoder, tokenizer, sched = _load_pretrained(model, revision)
    from diffusers.utils import logging as dlog

    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()  # diffusers warns on every .to(dtype) of a model without fp32-pinned modules
    try:
        for m in (unet, vae, text_encoder):
            m.to(device=dev, dtype=dt).eval().requires_grad_(False)
    finally:
        dlog.set_verbosity(verbosity)
    return SDComponents(unet, vae, text_encoder, tokenizer, sched, model, revision, dt, dev)


def model_source(model: str) -> str:
    """Classify a model spec (builtin, file, folder, hub) and check what can be checked without loading."""
    path = Path(model).expanduser()
    if model in BUILTIN_MODELS:
        return "builtin"
    if model.endswith((".safetensors", ".ckpt")):
        if not path.is_file():
            raise ModelLoadError(f"model file {model!r} does not exist: check the path, or use --model tiny")
        return "file"
    if path.exists() or model.startswith((".", "/", "~")):
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"model folder {model!r} is missing or not a diffusers folder (no model_index.json): pass a "
                "folder saved by save_pretrained, a .safetensors file, a hub id, or tiny"
            )
        return "folder"
    if model.count("/") != 1:
        raise ModelLoadError(
            f"model {model!r} is not a built-in ({', '.join(BUILTIN_MODELS)}), an existing path or a hub id "
            "like CompVis/stable-diffusion-v1-4"
        )
    return "hub"


def check_model_spec(model: str, dtype: str = "float32", device: str = "auto") -> None:
    """Everything about the model, dtype and device that can fail before loading, checked now."""
    model_source(model)
    resolve_dtype(dtype, resolve_device(device))


def _load_pretrained(model: str, revision: str | None):
    from diffusers import StableDiffusionPipeline

    path = Path(model).expanduser()
    kwargs = dict(safety_checker=None, requires_safety_checker=False)
    source = model_source(model)
    try:
        if source == "file":
            pipe = StableDiffusionPipeline.from_single_file(str(path), **kwargs)
        elif source == "folder":
            pipe = StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(model, revision=revision, **kwargs)
    except Exception as e:  # diffusers raises many types; name what was tried, keep the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"could not load model {model!r} (tried it as a {source}): "
            f"{first}. Download the weights on a machine with network (huggingface-cli download "
            f"CompVis/stable-diffusion-v1-4) and pass the folder, or use --model tiny"
        ) from e
    return pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, dict(pipe.scheduler.config)

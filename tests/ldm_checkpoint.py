"""Artifacts as users hold them, built from random models: single LDM `.safetensors` checkpoints in
the original CompVis/Stability key layout, diffusers folders (fp16 variant files, CompVis's repo
layout), and a Hugging Face hub cache entry.

`to_ldm` is the inverse of diffusers' single-file conversion (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`),
written from the LDM layout: UNet `model.diffusion_model.{input_blocks,middle_block,output_blocks}`,
VAE `first_stage_model.{encoder,decoder}.{down,mid,up}` with 1x1-conv attention, SD 1.x text
encoder `cond_stage_model.transformer.text_model.*`, SD 2.x OpenCLIP `cond_stage_model.model.*`
with fused in_proj attention and one more residual block than diffusers keeps (SD 2.x conditions on
the penultimate layer).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import zlib
from pathlib import Path

import torch

# CompVis/stable-diffusion-v1-4's own files (main): model_index.json, and scheduler_config.json,
# which has no timestep_spacing (it predates that key).
COMPVIS_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.2.2",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
COMPVIS_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
COMPVIS_PREPROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


# ---------------------------------------------------------------------------------------------
# 1. diffusers -> LDM keys
# ---------------------------------------------------------------------------------------------


def unet_to_ldm(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel state dict in the LDM layout (`model.diffusion_model.*`)."""
    per = unet.config.layers_per_block + 1  # LDM blocks per level: L resnets (+ attention) and a down/up sampler
    out = {}
    for key, t in unet.state_dict().items():
        p = key.split(".")
        if p[0] == "time_embedding":
            new = f"time_embed.{ {'linear_1': 0, 'linear_2': 2}[p[1]] }.{p[2]}"
        elif p[0] in ("conv_in", "conv_norm_out", "conv_out"):
            new = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}[p[0]] + "." + p[1]
        elif p[0] == "down_blocks":
            b, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
            if kind == "downsamplers":
                new = f"input_blocks.{(b + 1) * per}.0.op.{rest[-1]}"
            else:
                new = f"input_blocks.{1 + b * per + j}.{0 if kind == 'resnets' else 1}." + _sub(kind, rest)
        elif p[0] == "mid_block":
            kind, j, rest = p[1], int(p[2]), p[3:]
            new = f"middle_block.{2 * j if kind == 'resnets' else 1}." + _sub(kind, rest)
        elif p[0] == "up_blocks":
            b, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
            if kind == "upsamplers":
                has_attn = unet.config.up_block_types[b].startswith("CrossAttn")
                new = f"output_blocks.{b * per + per - 1}.{2 if has_attn else 1}.conv.{rest[-1]}"
            else:
                new = f"output_blocks.{b * per + j}.{0 if kind == 'resnets' else 1}." + _sub(kind, rest)
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = t
    return out


def _sub(kind: str, rest: list[str]) -> str:
    if kind == "resnets":
        return ".".join([_RESNET.get(rest[0], rest[0]), *rest[1:]])
    return ".".join(rest)  # attentions: the same names in both layouts


def vae_to_ldm(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """AutoencoderKL state dict in the LDM layout (`first_stage_model.*`, attention as 1x1 convs)."""
    n = len(vae.config.block_out_channels)
    out = {}
    for key, t in vae.state_dict().items():
        p = key.split(".")
        if p[0] in ("quant_conv", "post_quant_conv"):
            new = key
        elif p[1] in ("conv_in", "conv_out"):
            new = key
        elif p[1] == "conv_norm_out":
            new = f"{p[0]}.norm_out.{p[2]}"
        elif p[1] in ("down_blocks", "up_blocks"):
            i = int(p[2]) if p[1] == "down_blocks" else n - 1 - int(p[2])
            where = "down" if p[1] == "down_blocks" else "up"
            if p[3] in ("downsamplers", "upsamplers"):
                new = f"{p[0]}.{where}.{i}.{'downsample' if where == 'down' else 'upsample'}.conv.{p[-1]}"
            else:
                new = f"{p[0]}.{where}.{i}.block.{p[4]}." + ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
        elif p[1] == "mid_block" and p[2] == "resnets":
            new = f"{p[0]}.mid.block_{int(p[3]) + 1}." + ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
        elif p[1] == "mid_block" and p[2] == "attentions":
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[p[4]]
            new = f"{p[0]}.mid.attn_1.{name}.{p[-1]}"
            if t.dim() == 2:
                t = t[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        else:
            raise KeyError(key)
        out["first_stage_model." + new] = t
    return out


def clip_to_ldm(text: torch.nn.Module) -> dict[str, torch.Tensor]:
    """SD 1.x: the transformers CLIPTextModel under `cond_stage_model.transformer.text_model.`."""
    out = {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": t
           for k, t in text.state_dict().items()}
    n = text.config.max_position_embeddings
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(n)[None]  # as old files have it
    return out


def open_clip_to_ldm(text: torch.nn.Module, embed_dim: int = 32) -> dict[str, torch.Tensor]:
    """SD 2.x: OpenCLIP's text tower under `cond_stage_model.model.`: fused q/k/v, and one more
    residual block than the diffusers model (SD 2.x uses the penultimate layer's output)."""
    sd = {k.removeprefix("text_model."): t for k, t in text.state_dict().items()}
    layers, width = text.config.num_hidden_layers, text.config.hidden_size
    m = "cond_stage_model.model."
    out = {m + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           m + "positional_embedding": sd["embeddings.position_embedding.weight"],
           m + "ln_final.weight": sd["final_layer_norm.weight"], m + "ln_final.bias": sd["final_layer_norm.bias"]}
    g = torch.Generator().manual_seed(7)
    dt = sd["final_layer_norm.weight"].dtype
    for i in range(layers + 1):
        r, d = f"{m}transformer.resblocks.{i}.", f"encoder.layers.{i}."
        if i == layers:  # the last open_clip block, which diffusers' conversion drops
            ref = {k[len("encoder.layers.0."):]: v for k, v in sd.items() if k.startswith("encoder.layers.0.")}
            extra = {k: torch.randn(v.shape, generator=g).to(dt) for k, v in ref.items()}
            sd.update({d + k: v for k, v in extra.items()})
        for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                             ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):
            for w in ("weight", "bias"):
                out[f"{r}{ours}.{w}"] = sd[f"{d}{theirs}.{w}"]
        for w, name in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            out[r + "attn." + name] = torch.cat([sd[f"{d}self_attn.{q}_proj.{w}"] for q in "qkv"])
    out[m + "text_projection"] = torch.randn(width, embed_dim, generator=g).to(dt)
    out[m + "logit_scale"] = torch.tensor(4.6052).to(dt)
    return out


def to_ldm(unet, vae, text, open_clip: bool = False, v_pred: bool = False) -> dict[str, torch.Tensor]:
    """A whole SD checkpoint in the LDM layout; `v_pred` adds the marker key v-prediction files carry."""
    out = {**unet_to_ldm(unet), **vae_to_ldm(vae), **(open_clip_to_ldm(text) if open_clip else clip_to_ldm(text))}
    if v_pred:
        out["v_pred"] = torch.tensor([])
    return out


def save_ldm(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# ---------------------------------------------------------------------------------------------
# 2. Folders: a preset's config folder, diffusers folders, the hub cache
# ---------------------------------------------------------------------------------------------


def write_config_folder(path: Path, c) -> Path:
    """The diffusers configs of loaded SDComponents `c` (no weights): what `[model] config` takes."""
    c.unet.save_config(path / "unet")
    c.vae.save_config(path / "vae")
    c.text_encoder.config.save_pretrained(path / "text_encoder")
    _write_json(path / "scheduler" / "scheduler_config.json", c.scheduler_config)
    _write_json(path / "tokenizer" / "special_tokens_map.json", {"pad_token": c.tokenizer.pad_token})
    _write_json(path / "model_index.json", {k: v for k, v in COMPVIS_MODEL_INDEX.items()
                                            if k not in ("safety_checker", "feature_extractor")})
    return path


def write_diffusers_folder(path: Path, c, variant: str | None = None, compvis: bool = False) -> Path:
    """A diffusers folder of SDComponents `c`: weights as `variant` files only (e.g. fp16), and with
    `compvis` the rest of CompVis/stable-diffusion-v1-4's layout: its model_index.json (listing
    safety_checker and feature_extractor), its scheduler_config.json, the tokenizer files, a
    feature_extractor config and a safety_checker folder whose weights are not even a valid file
    (so a loader that touched them would fail)."""
    c.unet.save_pretrained(path / "unet", variant=variant)
    c.vae.save_pretrained(path / "vae", variant=variant)
    c.text_encoder.save_pretrained(path / "text_encoder", variant=variant)
    _write_json(path / "scheduler" / "scheduler_config.json", COMPVIS_SCHEDULER if compvis else c.scheduler_config)
    index = dict(COMPVIS_MODEL_INDEX)
    if compvis:  # the repo's tokenizer files: vocab.json, merges.txt and its two JSONs
        from hpcwalk.sd.loaders import clip_tokenizer_files
        from hpcwalk.sd.weights import CONFIGS_DIR

        (path / "tokenizer").mkdir(parents=True, exist_ok=True)
        for src in (*clip_tokenizer_files(), *(CONFIGS_DIR / "sd-v1" / "tokenizer").glob("*.json")):
            shutil.copy(src, path / "tokenizer" / Path(src).name)
        _write_json(path / "feature_extractor" / "preprocessor_config.json", COMPVIS_PREPROCESSOR)
        _write_json(path / "safety_checker" / "config.json", {"architectures": ["StableDiffusionSafetyChecker"]})
        (path / "safety_checker" / "model.safetensors").write_bytes(b"never read by hpcwalk")
    else:
        index = {k: v for k, v in index.items() if k not in ("safety_checker", "feature_extractor")}
        _write_json(path / "tokenizer" / "special_tokens_map.json", {"pad_token": c.tokenizer.pad_token})
    _write_json(path / "model_index.json", index)
    return path


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "0" * 39 + "1") -> Path:
    """Copy `folder` into a Hugging Face hub cache as `hf download` leaves it: blobs named by content
    hash, a snapshot of relative symlinks, refs/main naming the commit. Returns the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def _write_json(path: Path, d: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d, indent=2, default=list))


# ---------------------------------------------------------------------------------------------
# 3. A full-size model, cheaply
# ---------------------------------------------------------------------------------------------


def cheap_random(name: str, dtype: torch.dtype):
    """A built-in preset's modules in `dtype`, filled from one block of 2**20 random values, rolled per
    tensor and scaled by 1/sqrt(fan_in) (norms: ones and zeros): deterministic, distinct per tensor,
    and about 10x cheaper than drawing a billion numbers (for the full-size single-file test)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from hpcwalk.sd.models import PRESETS

    cfg = PRESETS[name]
    with init_empty_weights():
        mods = (UNet2DConditionModel.from_config(cfg["unet"]), AutoencoderKL.from_config(cfg["vae"]),
                CLIPTextModel(CLIPTextConfig(**cfg["text"])))
    block = torch.rand(2**20, generator=torch.Generator().manual_seed(0)).mul_(2).sub_(1)
    scaled: dict[int, torch.Tensor] = {}  # the block times 1/sqrt(fan_in), twice over (for the roll), in dtype
    for m in mods:
        for prefix, mod in m.named_modules():
            w = mod._parameters.get("weight")
            fan_in = math.prod(w.shape[1:]) if w is not None and w.dim() > 1 else 1
            for pname, p in list(mod._parameters.items()):
                if p is None:
                    continue
                if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    t = (torch.ones if pname == "weight" else torch.zeros)(p.shape, dtype=dtype)
                else:
                    if fan_in not in scaled:
                        scaled[fan_in] = (block / math.sqrt(fan_in)).to(dtype).repeat(2)
                    src, n = scaled[fan_in], p.numel()
                    t = torch.empty(n, dtype=dtype)
                    shift = zlib.crc32(f"{prefix}.{pname}".encode()) % block.numel()
                    for i in range(0, n, block.numel()):  # consecutive block-sized pieces, each rolled by `shift`
                        k = min(block.numel(), n - i)
                        t[i : i + k] = src[shift : shift + k]
                    t = t.reshape(p.shape)
                mod._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)
    return mods

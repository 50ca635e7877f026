"""The shipped SD 1.x/2.x configs and telling the architectures apart: the checkpoint-key rules for
sd-v1 / sd-v2-base / sd-v2-v, the configs against diffusers' own LDM-yaml conversion, the presets
against the configs, the package data, and the built-ins' reduced-precision initialisation."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

import tomllib
from hpcwalk.sd.loaders import scheduler_config_of
from hpcwalk.sd.models import PRESETS, SD14_SCHEDULER_CONFIG
from hpcwalk.sd.weights import CONFIGS_DIR, Header, ModelLoadError, detect_config, read_header, resolve
from ldm_checkpoint import save_ldm, to_ldm


# ---------------------------------------------------------------------------------------------
# Telling SD 1.x, 2.x-base and 2.x-v apart from the checkpoint's keys and shapes
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _ldm_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a full-size preset's LDM file, from modules on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = PRESETS[name]
    with init_empty_weights():
        mods = (UNet2DConditionModel.from_config(cfg["unet"]), AutoencoderKL.from_config(cfg["vae"]),
                CLIPTextModel(CLIPTextConfig(**cfg["text"])))
    return {k: tuple(t.shape) for k, t in to_ldm(*mods, open_clip=name == "sd21-random").items()}


def _meta_header(name: str, tmp: Path, norm_std: float = 0.0, metadata=None, v_pred: bool = False) -> Header:
    """A full-size preset's LDM key/shape table plus one real tensor, the norm bias SD 2.x's statistic
    reads, with the given spread (and the v_pred marker key if asked)."""
    tensors = {k: ("F16", shape, 0, 0) for k, shape in _ldm_shapes(name).items()}
    if v_pred:
        tensors["v_pred"] = ("F32", (0,), 0, 0)
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    bias = torch.linspace(-1, 1, tensors[key][1][0]) * norm_std * 3**0.5  # std = norm_std
    real = read_header(save_ldm(tmp / "bias.safetensors", {key: bias}))
    return Header(real.path, {**tensors, key: real.tensors[key]}, metadata or {})


def test_architecture_detection(tmp_path):
    assert detect_config(_meta_header("sd14-random", tmp_path))[0] == "sd-v1"
    cases = [(dict(), "sd-v2-base", "epsilon by weight statistics"), (dict(norm_std=0.2), "sd-v2-v", "v-prediction by weight statistics"),
             (dict(v_pred=True), "sd-v2-v", "v_pred key"),
             (dict(metadata={"modelspec.prediction_type": "v"}), "sd-v2-v", "modelspec"),
             (dict(norm_std=0.2, metadata={"modelspec.architecture": "stable-diffusion-v2-512"}), "sd-v2-base", "modelspec")]
    for kw, want, rule in cases:
        name, why = detect_config(_meta_header("sd21-random", tmp_path, **kw))
        assert name == want and rule in why, (kw, name, why)


def test_inpainting_and_sdxl_checkpoints_are_named(tmp_path):
    h = _meta_header("sd14-random", tmp_path)
    k = "model.diffusion_model.input_blocks.0.0.weight"
    inpaint = Header(h.path, {**h.tensors, k: ("F16", (320, 9, 3, 3), 0, 0)}, {})
    with pytest.raises(ModelLoadError, match="9 input channels"):
        detect_config(inpaint)
    xl = save_ldm(tmp_path / "xl.safetensors", {"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1),
                                                "model.diffusion_model.x": torch.zeros(1)})
    with pytest.raises(ModelLoadError, match="SDXL"):
        resolve(str(xl))


# ---------------------------------------------------------------------------------------------
# The shipped configs, the presets, the package data
# ---------------------------------------------------------------------------------------------


def test_shipped_unet_configs_equal_diffusers_conversion_of_the_ldm_yaml():
    """diffusers' own LDM-yaml -> diffusers conversion, on the original repos' yaml values
    (v1-inference.yaml, v2-inference[-v].yaml), gives the shipped UNet and VAE configs."""
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    vae = {"ddconfig": {"z_channels": 4, "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4],
                        "num_res_blocks": 2}}
    unet = {"in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "transformer_depth": 1}
    yamls = {"sd-v1": (dict(unet, num_heads=8, context_dim=768), 512),
             "sd-v2-base": (dict(unet, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024), 512),
             "sd-v2-v": (dict(unet, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024), 768)}
    for name, (params, size) in yamls.items():
        original = {"model": {"params": {"unet_config": {"params": params}, "first_stage_config": {"params": vae},
                                         "scale_factor": 0.18215}}}
        want = create_unet_diffusers_config_from_ldm(original, {}, image_size=size)
        ours = json.loads((CONFIGS_DIR / name / "unet" / "config.json").read_text())
        for k in ("sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                  "layers_per_block", "cross_attention_dim", "attention_head_dim", "use_linear_projection"):
            assert ours.get(k, False) == want[k] or list(ours.get(k)) == list(want[k]), (name, k, ours.get(k), want[k])
        want_vae = create_vae_diffusers_config_from_ldm(original, {}, image_size=512)
        ours_vae = json.loads((CONFIGS_DIR / name / "vae" / "config.json").read_text())
        for k in ("block_out_channels", "latent_channels", "layers_per_block", "down_block_types", "up_block_types"):
            assert list(ours_vae[k]) == list(want_vae[k]) if isinstance(want_vae[k], list) else ours_vae[k] == want_vae[k]
        assert ours_vae.get("scaling_factor", 0.18215) == want_vae["scaling_factor"] == 0.18215


def test_presets_are_the_shipped_architectures():
    sd1 = {p: json.loads((CONFIGS_DIR / "sd-v1" / p / "config.json").read_text()) for p in ("unet", "vae", "text_encoder")}
    for part, key in (("unet", "unet"), ("vae", "vae"), ("text", "text_encoder")):
        for k, v in PRESETS["sd14-random"][part].items():
            if k not in ("bos_token_id", "eos_token_id", "projection_dim"):  # tokenizer ids: the preset's real ones
                assert sd1[key][k] == (list(v) if isinstance(v, tuple) else v), (part, k)
    sched = json.loads((CONFIGS_DIR / "sd-v1" / "scheduler" / "scheduler_config.json").read_text())
    assert {k: v for k, v in sched.items() if k != "_diffusers_version"} == SD14_SCHEDULER_CONFIG
    assert PRESETS["sd21-random"]["unet"]["cross_attention_dim"] == 1024 and PRESETS["sd21-random"]["pad_token"] == "!"
    assert scheduler_config_of(CONFIGS_DIR / "sd-v2-v")["prediction_type"] == "v_prediction"
    assert scheduler_config_of(CONFIGS_DIR / "sd-v2-base")["prediction_type"] == "epsilon"


def test_package_data_covers_the_configs():
    """Every file under hpcwalk/sd/configs/ is matched by pyproject's package-data globs (so wheels carry it)."""
    root = Path(__file__).resolve().parent.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["hpcwalk.sd"]
    files = {p for p in (root / "hpcwalk" / "sd" / "configs").rglob("*") if p.is_file()}
    shipped = {p for pat in patterns for p in (root / "hpcwalk" / "sd").glob(pat)}
    assert len(files) >= 22 and files <= shipped, sorted(map(str, files - shipped))


def test_reduced_dtype_builtin_is_the_float32_one_rounded():
    """`uniform` presets fill each tensor in the render dtype (no float32 model held): float32 rounded."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from hpcwalk.sd.models import _fill_uniform

    built = {}
    for dt in (torch.float32, torch.bfloat16):
        with init_empty_weights():
            m = UNet2DConditionModel.from_config(PRESETS["tiny"]["unet"])
        _fill_uniform(m, 0, dt)
        built[dt] = m.state_dict()
    for k, v in built[torch.bfloat16].items():
        assert v.dtype == torch.bfloat16 and not v.is_meta
        assert torch.equal(v, built[torch.float32][k].to(torch.bfloat16)), k

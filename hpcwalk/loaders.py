"""Pretrained weights into SD components, offline and in the render dtype.

Two formats (hpcwalk.weights decides which, and checks the files first):

- a single LDM `.safetensors`: each component's tensors are read one at a time from the file
  (cast to the render dtype as they are read; EMA copies and other components' tensors are never
  read) and handed to diffusers' `from_single_file` with a local folder of configs (shipped in
  `hpcwalk/configs/` or the user's), so nothing is fetched from the Hub;
- a diffusers folder (or hub cache snapshot): UNet, VAE and text encoder, each with its chosen
  variant file, by diffusers' / transformers' `from_pretrained` with `local_files_only`. Other
  components listed in `model_index.json` (safety_checker, feature_extractor) are neither loaded
  nor run, and the log says so once.

The tokenizer is the folder's own when it has one (vocab.json + merges.txt, or tokenizer.json), else the CLIP BPE that
open_clip ships with the folder's pad token. Failures are one-line `ModelLoadError`s; the full
cause goes to the `hpcwalk.models` logger at debug level (`hpcwalk --verbose`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from hpcwalk.weights import LDM_PREFIXES, ModelLoadError, ModelSource

log = logging.getLogger("hpcwalk.models")


def load_pretrained(src: ModelSource, dtype: torch.dtype) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    """(unet, vae, text_encoder, tokenizer, scheduler config) of a single file or a diffusers folder."""
    from diffusers.utils import logging as dlog

    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()  # its warnings about casts and unused keys are about conversions we check ourselves
    try:
        if src.format == "ldm-single-file":
            parts = _single_file(src, dtype)
            folder = src.config_dir()
        else:
            parts = _folder(src, dtype)
            folder = Path(src.path)
        return (*parts, tokenizer_of(folder), scheduler_config_of(folder))
    except ModelLoadError:
        raise
    except Exception as e:  # diffusers and transformers raise many types: name what was tried, keep the cause
        log.debug("loading %s failed", src.spec, exc_info=e)
        raise ModelLoadError(f"could not load model {src.spec!r} ({src.format} {src.path}): {_first_line(e)} "
                             "(hpcwalk --verbose shows the cause)") from e
    finally:
        dlog.set_verbosity(verbosity)


# ---------------------------------------------------------------------------------------------
# 1. Single LDM files
# ---------------------------------------------------------------------------------------------


def _single_file(src: ModelSource, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors import safe_open
    from transformers import CLIPTextModel

    config = str(src.config_dir())
    log.info("%s: LDM single file, config %s (%s), %s", src.path, src.config, src.config_rule,
             str(dtype).replace("torch.", ""))
    with safe_open(src.path, framework="pt") as f:
        keys = list(f.keys())

        def part(component: str) -> dict[str, torch.Tensor]:
            out = {}
            for k in keys:
                if k.startswith(LDM_PREFIXES[component]):
                    t = f.get_tensor(k)
                    out[k] = t.to(dtype) if t.is_floating_point() else t
            return out

        kw = dict(config=config, torch_dtype=dtype, local_files_only=True)
        unet = _component(src, "unet", lambda: UNet2DConditionModel.from_single_file(part("unet"), subfolder="unet", **kw))
        vae = _component(src, "vae", lambda: AutoencoderKL.from_single_file(part("vae"), subfolder="vae", **kw))
        text = _component(src, "text_encoder", lambda: create_diffusers_clip_model_from_ldm(
            CLIPTextModel, part("text_encoder"), subfolder="text_encoder", **kw))
    return unet, vae, text


def _component(src: ModelSource, name: str, load: Any) -> torch.nn.Module:
    """Run one component's conversion; weights that do not fit the config are named as such."""
    try:
        module = load()
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as e:  # shape mismatch, missing keys, meta copy
        if isinstance(e, RuntimeError) and "memory" in str(e).lower():
            raise
        log.debug("%s: %s does not fit config %s", src.path, name, src.config, exc_info=e)
        raise ModelLoadError(f"{src.path}: its {name} weights do not fit config {src.config} ({_first_line(e)}): "
                             "set [model] config to a folder of this checkpoint's own diffusers configs") from e
    missing = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if missing:
        raise ModelLoadError(f"{src.path}: {len(missing)} {name} tensors of config {src.config} are not in the "
                             f"checkpoint (first: {missing[0]}): set [model] config to this checkpoint's own configs")
    return module


# ---------------------------------------------------------------------------------------------
# 2. Diffusers folders and hub snapshots
# ---------------------------------------------------------------------------------------------


def _folder(src: ModelSource, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = src.path
    log.info("%s: diffusers folder (%s), variant %s, %s", src.spec, folder, src.variant or "none",
             str(dtype).replace("torch.", ""))
    if src.skipped:
        log.info("%s: model_index.json lists %s: neither loaded nor run", src.spec, ", ".join(src.skipped))

    def variant(comp: str) -> str | None:
        return src.variants[comp] or None

    kw = dict(local_files_only=True, use_safetensors=True)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", variant=variant("unet"), torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", variant=variant("vae"), torch_dtype=dtype, **kw)
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", variant=variant("text_encoder"),
                                         dtype=dtype, **kw)
    return unet, vae, text


# ---------------------------------------------------------------------------------------------
# 3. Tokenizer and scheduler config of a folder (a model's, or a config folder)
# ---------------------------------------------------------------------------------------------


def tokenizer_of(folder: Path) -> Any:
    """The folder's CLIP tokenizer (its files when present, else open_clip's BPE with its pad token)."""
    from hpcwalk.models import clip_tokenizer

    tok = Path(folder) / "tokenizer"
    if (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file() or (tok / "tokenizer.json").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(tok), local_files_only=True)
    return clip_tokenizer(pad_token_of(tok))


def pad_token_of(tok: Path) -> str:
    """The pad token a tokenizer folder names (special_tokens_map.json, else tokenizer_config.json)."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            pad = json.loads((tok / name).read_text(encoding="utf-8")).get("pad_token")
        except (OSError, ValueError, AttributeError):
            continue
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if isinstance(pad, str):
            return pad
    return "<|endoftext|>"


def scheduler_config_of(folder: Path) -> dict[str, Any]:
    """The scheduler config of a folder as its scheduler class fills it in (what diffusers' pipeline holds)."""
    import diffusers

    path = Path(folder) / "scheduler" / "scheduler_config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        cls = getattr(diffusers, raw["_class_name"])
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise ModelLoadError(f"{path} cannot be used ({type(e).__name__}: {_first_line(e)}): copy or download the "
                             "folder again") from None
    return dict(cls.from_config(raw).config)


def quiet_progress_bars() -> None:
    """Silence diffusers', transformers' and huggingface_hub's own progress bars (`--no-progress`), here and
    in processes started from here (HF_HUB_DISABLE_PROGRESS_BARS, which transformers also reads)."""
    import os

    import diffusers.utils.logging as dlog
    import huggingface_hub.utils as hub
    import transformers.utils.logging as tlog

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    hub.disable_progress_bars()


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's text, at most 160 characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(". ")[0][:160]

"""Pretrained weights into SD components, offline and in the render dtype.

Two formats (hpcwalk.sd.weights decides which, and checks the files first):

- a single LDM `.safetensors`: each component's tensors are read one at a time from the file
  (cast to the render dtype as they are read; EMA copies and other components' tensors are never
  read) and handed to diffusers' `from_single_file` with a local folder of configs (shipped in
  `hpcwalk/sd/configs/` or the user's), so nothing is fetched from the Hub;
- a diffusers folder (or hub cache snapshot): UNet, VAE and text encoder, each with its chosen
  variant file, by diffusers' / transformers' `from_pretrained` with `local_files_only`. Other
  components listed in `model_index.json` (safety_checker, feature_extractor) are neither loaded
  nor run, and the log says so once.

The tokenizer is the folder's own when it has one (vocab.json + merges.txt, or tokenizer.json), else the CLIP BPE that
open_clip ships with the folder's pad token. Failures are one-line `ModelLoadError`s; the full
cause goes to the `hpcwalk.sd.models` logger at debug level (`hpcwalk --verbose`).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from hpcwalk.core.errors import first_sentence
from hpcwalk.sd.weights import LDM_PREFIXES, ModelLoadError, ModelSource

log = logging.getLogger("hpcwalk.sd.models")


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
        raise ModelLoadError(f"could not load model {src.spec!r} ({src.format} {src.path}): {first_sentence(e)} "
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
        raise ModelLoadError(f"{src.path}: its {name} weights do not fit config {src.config} ({first_sentence(e)}): "
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
    pass

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
        raise ModelLoadError(f"{path} cannot be used ({type(e).__name__}: {first_sentence(e)}): copy or download the "
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


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """transformers CLIPTokenizer with SD's ids (bos 49406, eos 49407, 77 tokens). SD 1.x pads with
    <|endoftext|> (49407), SD 2.x with "!" (id 0; its repos' special_tokens_map.json)."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = clip_tokenizer_files()
    return CLIPTokenizer(vocab_file, merges_file, model_max_length=77, pad_token=pad_token)

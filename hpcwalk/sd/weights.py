"""Which weights a model spec names and how they will load, checked without loading a tensor.

`resolve(id, revision, config, variant)` turns `[model]` into a `ModelSource`: a built-in random
model, a single `.safetensors` checkpoint in the original CompVis/LDM key layout (with the diffusers
configs it needs: shipped in `hpcwalk/sd/configs/`, detected from the checkpoint's own keys and
shapes, or a local folder), a local diffusers folder (variant files picked per component), or a
hub id, which is read from the local Hugging Face cache only: hpcwalk never downloads. Everything
that can be wrong before loading (a missing or truncated file, a pickle, an unknown architecture,
a folder without weights, a model not in the cache) raises `ModelLoadError` with one line naming
the fix. This module does not import torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcwalk.core.errors import HpcwalkError

log = logging.getLogger("hpcwalk.sd.models")

BUILTIN_MODELS = ("tiny", "tiny-v", "sd14-random", "sd21-random")
CONFIGS_DIR = Path(__file__).parent / "configs"
BUILTIN_CONFIGS = ("sd-v1", "sd-v2-base", "sd-v2-v")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# the components hpcwalk loads from a diffusers folder: (library, class, weights file stem)
COMPONENTS = {
    "unet": ("diffusers", "UNet2DConditionModel", "diffusion_pytorch_model"),
    "vae": ("diffusers", "AutoencoderKL", "diffusion_pytorch_model"),
    "text_encoder": ("transformers", "CLIPTextModel", "model"),
}
PIPELINE_CLASSES = ("StableDiffusionPipeline",)
# the first prefix of each component's weights in an LDM checkpoint
LDM_PREFIXES = {"unet": ("model.diffusion_model.",), "vae": ("first_stage_model.", "vae."),
                "text_encoder": ("cond_stage_model.",)}
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
V_STD_THRESHOLD = 0.09  # SD 2.x: v-prediction checkpoints have norm biases spread wider (ComfyUI's rule)
CONVERT_HINT = ("convert it once on a trusted machine: python -c \"import torch, safetensors.torch as st; "
                "sd = torch.load('IN.ckpt', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
                "st.save_file({k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}, "
                "'OUT.safetensors')\" and pass the .safetensors file")


class ModelLoadError(HpcwalkError, RuntimeError):
    """Weights could not be loaded; the message says what was tried and how to fix it."""


@dataclass(frozen=True)
class ModelSource:
    """How one `[model]` table will load (what the run metadata records)."""

    spec: str  # [model] id as given
    format: str  # builtin | ldm-single-file | diffusers-folder | hub-cache
    path: str = ""  # the file, folder or cache snapshot ("" for a built-in)
    config: str = ""  # single file: shipped config name or config folder; else the model's own
    config_rule: str = ""  # why that config: "[model] config" or what in the checkpoint decided
    variants: dict[str, str] = field(default_factory=dict)  # folder: component -> variant ("" = plain files)
    skipped: tuple[str, ...] = ()  # folder: components model_index.json lists that are neither loaded nor run
    revision: str | None = None

    @property
    def variant(self) -> str:
        """One word for the run metadata: "" (plain files), "fp16", or "unet=fp16,vae=,..." when mixed."""
        vals = set(self.variants.values())
        if len(vals) <= 1:
            return next(iter(vals), "")
        return ",".join(f"{k}={v}" for k, v in self.variants.items())

    def config_dir(self) -> Path:
        """The folder of diffusers configs a single file is built with."""
        return CONFIGS_DIR / self.config if self.config in BUILTIN_CONFIGS else Path(self.config).expanduser()

    def metadata(self) -> dict[str, str]:
        return {"model_format": self.format, "model_path": self.path, "model_config": self.config,
                "model_config_rule": self.config_rule, "model_variant": self.variant}


# ---------------------------------------------------------------------------------------------
# 1. The entry: classify, then check what each kind needs
# ---------------------------------------------------------------------------------------------


def model_kind(model: str) -> str:
    """builtin, file, folder or hub, from the spec alone (no file is read); bad specs raise."""
    path = Path(model).expanduser()
    if model in BUILTIN_MODELS:
        return "builtin"
    if model.lower().endswith(PICKLE_SUFFIXES) and not path.is_dir():
        raise ModelLoadError(pickle_message(model))
    if model.lower().endswith(".safetensors"):
        if not path.is_file():
            raise ModelLoadError(f"model file {model!r} does not exist: check the path, or use --model tiny")
        return "file"
    if path.exists() or model.startswith((".", "/", "~")):
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"model folder {model!r} is missing or not a diffusers folder (no model_index.json): pass a "
                "folder saved by save_pretrained or `hf download`, a .safetensors file, a hub id, or tiny")
        return "folder"
    if model.count("/") != 1 or not all(model.split("/")):
        raise ModelLoadError(
            f"model {model!r} is not a built-in ({', '.join(BUILTIN_MODELS)}), an existing path or a hub id "
            "like CompVis/stable-diffusion-v1-4")
    return "hub"


def resolve(model: str, revision: str | None = None, config: str = "auto", variant: str = "auto") -> ModelSource:
    """Check everything about `[model]` that can fail before loading; returns how it will load."""
    kind = model_kind(model)
    if kind != "file" and config != "auto":
        raise ModelLoadError(f"[model] config = {config!r} applies to single .safetensors files only; {model!r} "
                             "carries its own configs: remove config")
    if kind in ("builtin", "file") and variant != "auto":
        raise ModelLoadError(f"[model] variant = {variant!r} applies to diffusers folders and hub ids only: "
                             "remove variant")
    if kind == "builtin":
        return ModelSource(model, "builtin", config=model)
    if kind == "file":
        return resolve_file(Path(model).expanduser(), config, spec=model)
    if kind == "folder":
        return resolve_folder(Path(model).expanduser(), variant, spec=model)
    snapshot = hub_snapshot(model, revision)
    if not (snapshot / "model_index.json").is_file():
        singles = sorted(str(p) for p in snapshot.glob("*.safetensors"))
        alt = f", or pass its single file as --model: {singles[0]}" if singles else ""
        raise ModelLoadError(f"the cached snapshot of {model!r} ({snapshot}) has no model_index.json (a partial "
                             f"download): run `hf download {model}` where there is network{alt}")
    src = resolve_folder(snapshot, variant, spec=model, hub_id=model)
    return ModelSource(model, "hub-cache", src.path, variants=src.variants, skipped=src.skipped, revision=revision)


def describe(model: str, revision: str | None = None, config: str = "auto", variant: str = "auto") -> dict[str, str]:
    """`resolve(...).metadata()`, or what was asked for where it cannot be resolved here (a Ray driver
    without the weights: each worker's shards record their own)."""
    try:
        return resolve(model, revision, config, variant).metadata()
    except ModelLoadError:
        return {"model_format": "unresolved here", "model_path": "", "model_config": config,
                "model_config_rule": "", "model_variant": variant}


def pickle_message(path: str) -> str:
    return (f"{path} is a pickle (a PyTorch .ckpt/.pt/.bin checkpoint): loading a pickle can run arbitrary code, "
            f"so hpcwalk refuses it; {CONVERT_HINT}")


# ---------------------------------------------------------------------------------------------
# 2. Single files: the safetensors header, and the architecture from its keys and shapes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """A safetensors file's table of contents: name -> (dtype, shape, start, end) in the file."""

    path: str
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]]
    metadata: dict[str, str]

    def shape(self, key: str) -> tuple[int, ...] | None:
        t = self.tensors.get(key)
        return t[1] if t else None

    def read(self, key: str) -> Any:
        """One tensor as a float64 numpy array (F32, F16 and BF16), read from its bytes."""
        import numpy as np

        dtype, shape, start, end = self.tensors[key]
        with open(self.path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
        if dtype == "BF16":  # the top half of a float32
            return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64).reshape(shape)
        return np.frombuffer(raw, {"F32": "<f4", "F16": "<f2", "F64": "<f8"}[dtype]).astype(np.float64).reshape(shape)


def read_header(path: str | Path) -> Header:
    """Parse and check a safetensors header against the file's size (truncation, damage, pickles)."""
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        raw = f.read(n) if 2 <= n <= min(size - 8, MAX_HEADER) else b""
    if head.startswith(b"version "):
        raise ModelLoadError(f"{path} is a git-lfs pointer, not the weights: fetch the file itself "
                             "(git lfs pull, or hf download)")
    try:
        table = json.loads(raw) if raw else None
        assert isinstance(table, dict)
        meta = table.pop("__metadata__", None) or {}
        tensors, start = {}, 8 + n
        for name, t in table.items():
            dtype, shape, (a, b) = t["dtype"], tuple(int(d) for d in t["shape"]), t["data_offsets"]
            assert dtype in SAFETENSORS_DTYPES and all(d >= 0 for d in shape) and 0 <= a <= b
            assert b - a == math.prod(shape) * SAFETENSORS_DTYPES[dtype]
            tensors[name] = (dtype, shape, start + a, start + b)
    except (ValueError, AssertionError, KeyError, TypeError, UnicodeDecodeError):
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # a zip (torch.save) or a raw pickle
            raise ModelLoadError(pickle_message(path)) from None
        why = "truncated" if size - 8 < n <= MAX_HEADER else "damaged or not a safetensors file"
        raise ModelLoadError(f"{path} is {why} (its header does not parse: {max(n, 0)} bytes announced, file of "
                             f"{size}): copy or download it again") from None
    end = max((t[3] for t in tensors.values()), default=8 + n)
    if end > size:
        raise ModelLoadError(f"{path} is truncated: its header needs {end} bytes, the file has {size}: copy or "
                             "download it again")
    if end < size:
        raise ModelLoadError(f"{path} is damaged: {size - end} bytes after the last tensor: copy or download it again")
    return Header(path, tensors, {str(k): str(v) for k, v in meta.items()})


def resolve_file(path: Path, config: str = "auto", spec: str = "") -> ModelSource:
    """A single LDM `.safetensors`: readable, complete, and with a config to build it with."""
    h = read_header(path)
    missing = [c for c, prefixes in LDM_PREFIXES.items() if not any(k.startswith(prefixes) for k in h.tensors)]
    if missing:
        raise ModelLoadError(f"{path} is not a full Stable Diffusion checkpoint in the original (CompVis/LDM) layout: "
                             f"no {', '.join(missing)} weights ({_layout_hint(h)}): pass a checkpoint holding "
                             "UNet, VAE and text encoder, or the diffusers folder")
    if config == "auto":
        name, rule = detect_config(h)
    else:
        name, rule = check_config_folder(config), "[model] config"
    log.debug("%s: config %s (%s)", path, name, rule)
    return ModelSource(spec or str(path), "ldm-single-file", str(path), config=name, config_rule=rule)


def detect_config(h: Header) -> tuple[str, str]:
    """sd-v1, sd-v2-base or sd-v2-v from the checkpoint's keys and shapes (and, for 2.x, its marks)."""
    u = "model.diffusion_model."
    conv_in = h.shape(u + "input_blocks.0.0.weight")
    to_k = h.shape(u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    proj_in = h.shape(u + "input_blocks.1.1.proj_in.weight")
    full = conv_in is not None and conv_in[0] == 320 and u + "output_blocks.11.0.skip_connection.weight" in h.tensors
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise ModelLoadError(f"{h.path}: its UNet takes {conv_in[1]} input channels (an inpainting, depth or "
                             "instruct-pix2pix model): hpcwalk renders text-to-image models (4 channels)")
    clip = h.shape("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight")
    open_clip = h.shape("cond_stage_model.model.token_embedding.weight")
    if full and to_k == (320, 768) and proj_in is not None and len(proj_in) == 4 and clip == (77, 768):
        return "sd-v1", "keys and shapes: SD 1.x (CLIP ViT-L/14 text encoder, 768-wide cross-attention)"
    if full and to_k == (320, 1024) and proj_in is not None and len(proj_in) == 2 and open_clip == (49408, 1024):
        return _v2_prediction(h)
    seen = f"UNet conv_in {conv_in}, cross-attention {to_k}, text encoder {'CLIP' if clip else 'OpenCLIP' if open_clip else '?'}"
    raise ModelLoadError(f"{h.path}: unknown architecture ({seen}), not SD 1.x or 2.x as hpcwalk ships configs "
                         f"for ({', '.join(BUILTIN_CONFIGS)}): set [model] config = a folder of its diffusers configs")


def _v2_prediction(h: Header) -> tuple[str, str]:
    """SD 2.x base (epsilon, 512) and 2.x-v (768) have the same shapes: decide by the checkpoint's marks."""
    if "v_pred" in h.tensors:
        return "sd-v2-v", "SD 2.x with a v_pred key (v-prediction)"
    spec = (h.metadata.get("modelspec.prediction_type", "") + " " + h.metadata.get("modelspec.architecture", "")).lower()
    if re.search(r"\bv(_prediction|-prediction)?\b|768-v", spec):
        return "sd-v2-v", f"SD 2.x, modelspec metadata {spec.strip()!r}"
    if re.search(r"eps|epsilon|\b512\b", spec):
        return "sd-v2-base", f"SD 2.x, modelspec metadata {spec.strip()!r}"
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    std = float(h.read(key).std()) if key in h.tensors else 0.0
    if std > V_STD_THRESHOLD:
        return "sd-v2-v", f"SD 2.x, v-prediction by weight statistics ({key} std {std:.3f} > {V_STD_THRESHOLD})"
    return "sd-v2-base", f"SD 2.x, epsilon by weight statistics ({key} std {std:.3f} <= {V_STD_THRESHOLD})"


def _layout_hint(h: Header) -> str:
    keys = list(h.tensors)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "it is an SDXL checkpoint, which hpcwalk does not render"
    if any(k.startswith(("down_blocks.", "conv_in.", "encoder.down_blocks.", "text_model.")) for k in keys):
        return "its keys are one diffusers component's"
    return f"{len(keys)} tensors, e.g. {keys[0] if keys else 'none'}"


def check_config_folder(config: str) -> str:
    """A built-in config name, or a folder with the four diffusers configs; returns it as given."""
    if config in BUILTIN_CONFIGS:
        return config
    folder = Path(config).expanduser()
    need = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"]
    lacking = [n for n in need if not (folder / n).is_file()]
    if lacking:
        raise ModelLoadError(f"[model] config = {config!r} is not one of {', '.join(BUILTIN_CONFIGS)} nor a folder of "
                             f"diffusers configs (missing {', '.join(lacking)}): name a shipped config or such a folder")
    return str(folder)


# ---------------------------------------------------------------------------------------------
# 3. Diffusers folders (and hub snapshots): which weights file per component
# ---------------------------------------------------------------------------------------------


def resolve_folder(folder: Path, variant: str = "auto", spec: str = "", hub_id: str = "") -> ModelSource:
    """A diffusers folder: an SD pipeline, and a safetensors weights file for each component."""
    index = read_model_index(folder)
    variants = {}
    for comp, (lib, cls, stem) in COMPONENTS.items():
        entry = index.get(comp)
        if list(entry or []) != [lib, cls]:
            raise ModelLoadError(f"{folder}/model_index.json lists {comp} as {entry}, not [{lib!r}, {cls!r}]: "
                                 "hpcwalk loads Stable Diffusion 1.x/2.x pipelines")
        variants[comp] = pick_weights(folder / comp, stem, variant, hub_id)
    skipped = tuple(sorted(k for k, v in index.items() if not k.startswith("_") and k not in (*COMPONENTS, "tokenizer",
                    "scheduler") and isinstance(v, list) and v and v[0] is not None))
    return ModelSource(spec or str(folder), "diffusers-folder", str(folder), variants=variants, skipped=skipped)


def read_model_index(folder: Path) -> dict[str, Any]:
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder}/model_index.json cannot be read ({type(e).__name__}): "
                             "copy or download the folder again") from None
    cls = index.get("_class_name") if isinstance(index, dict) else None
    if cls not in PIPELINE_CLASSES:
        raise ModelLoadError(f"{folder} holds a {cls} pipeline: hpcwalk renders {', '.join(PIPELINE_CLASSES)} "
                             "folders (Stable Diffusion 1.x and 2.x)")
    return index


def weight_files(comp_dir: Path, stem: str) -> dict[str, str]:
    """variant ("" for the plain files) -> safetensors file (or shard index) of one component folder."""
    pattern = re.compile(rf"^{re.escape(stem)}(?:\.([^.]+))?\.safetensors$|"
                         rf"^{re.escape(stem)}\.safetensors\.index(?:\.([^.]+))?\.json$")
    found = {}
    for p in sorted(comp_dir.iterdir()) if comp_dir.is_dir() else []:
        m = pattern.match(p.name)
        if m:
            found.setdefault(m.group(1) or m.group(2) or "", p.name)
    return found


def pick_weights(comp_dir: Path, stem: str, variant: str, hub_id: str = "") -> str:
    """The variant to load for one component: `auto` takes the plain files, else fp16, else the only one."""
    found = weight_files(comp_dir, stem)
    fetch = f"hf download {hub_id}" if hub_id else "copy the folder again"
    if not found:
        pickles = sorted(p.name for p in comp_dir.glob("*.bin")) if comp_dir.is_dir() else []
        if pickles:
            raise ModelLoadError(f"{comp_dir} has only pickle weights ({', '.join(pickles)}): loading a pickle can run "
                                 f"arbitrary code, so hpcwalk refuses it; download the .safetensors files ({fetch}), "
                                 f"or {CONVERT_HINT}")
        raise ModelLoadError(f"{comp_dir} has no weights (no {stem}.safetensors or {stem}.VARIANT.safetensors): "
                             f"{fetch} (a download with --include must take the weights too)")
    if variant == "auto":
        chosen = "" if "" in found else "fp16" if "fp16" in found else sorted(found)[0]
        if "" not in found and len(found) > 1:
            log.debug("%s: no plain weights; variants %s, loading %s", comp_dir, ", ".join(sorted(found)), chosen)
    else:
        chosen = "" if variant == "none" else variant
        if chosen not in found:
            have = ", ".join(v or "none" for v in sorted(found))
            raise ModelLoadError(f"{comp_dir} has no {stem}{'.' + chosen if chosen else ''}.safetensors for "
                                 f"[model] variant = {variant!r} (it has: {have}): set variant to one of those, or auto")
    name = found[chosen]
    if name.endswith(".safetensors"):
        read_header(comp_dir / name)  # truncated or damaged files fail here, not half-way through a load
    return chosen


# ---------------------------------------------------------------------------------------------
# 4. The local Hugging Face cache
# ---------------------------------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The hub cache folder, read from the environment now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The cached snapshot folder of a hub model (never a download)."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, or a malformed cache entry
        log.debug("hub lookup of %s in %s failed", repo_id, cache, exc_info=e)
        rev = f" --revision {revision}" if revision else ""
        raise ModelLoadError(
            f"model {repo_id!r}{' at ' + revision if revision else ''} is not in the Hugging Face cache ({cache}); "
            f"hpcwalk never downloads: on a machine with network run `hf download {repo_id}{rev}` with HF_HUB_CACHE "
            f"pointing at a cache this machine reads, or `hf download {repo_id}{rev} --local-dir DIR` and pass "
            "--model DIR") from None

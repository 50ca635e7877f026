"""What models are on this machine (`hpcwalk models`): SD and CLIP models in the Hugging Face cache and
in folders a user names, each with its format, size and whether it loads offline (checked as
`weights.resolve` checks a `[model]`, without loading a tensor)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hpcwalk.sd.manifest import disk_size
from hpcwalk.sd.weights import PICKLE_SUFFIXES, ModelLoadError, ModelSource, hub_cache_dir, resolve


@dataclass(frozen=True)
class LocalModel:
    """One model found locally: what to pass as [model] id (or [clip] model/pretrained) and whether it loads."""

    name: str
    kind: str  # sd | clip
    format: str
    size: int  # bytes on disk
    offline: str  # "yes", or the first line of what stops it


def scan(extra_dirs: tuple[str, ...] = (), clip_lookup: Callable[[str], list[str]] | None = None) -> list[LocalModel]:
    """SD and CLIP models in the hub cache, then in `extra_dirs` (diffusers folders and .safetensors files,
    at the top and one level down). `clip_lookup(repo_id)` names the open_clip tags a repo serves."""
    out = [m for repo_dir in _hub_repos() for m in _scan_hub_repo(repo_dir, clip_lookup)]
    for d in extra_dirs:
        root = Path(d).expanduser()
        out += [_local_entry(str(t), t) for t in _candidates(root)]
    return out


def _hub_repos() -> list[Path]:
    cache = hub_cache_dir()
    return sorted(p for p in cache.glob("models--*") if p.is_dir()) if cache.is_dir() else []


def _candidates(root: Path) -> list[Path]:
    """Diffusers folders and single files under `root` (itself, or one level down)."""
    if root.is_file():
        return [root]
    if (root / "model_index.json").is_file():
        return [root]
    folders = sorted(p.parent for p in root.glob("*/model_index.json"))
    files = sorted(p for pattern in ("*", "*/*") for p in root.glob(pattern)
                   if p.is_file() and p.name.lower().endswith((".safetensors", *PICKLE_SUFFIXES))
                   and p.parent not in folders and not (p.parent.parent / "model_index.json").is_file())
    return [*folders, *files]


def _scan_hub_repo(repo_dir: Path, clip_lookup: Callable[[str], list[str]] | None) -> list[LocalModel]:
    repo_id = repo_dir.name[len("models--"):].replace("--", "/", 1)
    ref = repo_dir / "refs" / "main"
    snaps = sorted((repo_dir / "snapshots").glob("*"))
    snap = repo_dir / "snapshots" / ref.read_text().strip() if ref.is_file() else (snaps[-1] if snaps else None)
    if snap is None or not snap.is_dir():
        return [LocalModel(repo_id, "?", "hub cache entry without a snapshot", 0, "no: nothing downloaded")]
    out = []
    if (snap / "model_index.json").is_file():
        out.append(LocalModel(repo_id, "sd", *_try(lambda: _folder_format(resolve(repo_id)), disk_size(snap))))
    elif any((snap / n).exists() for n in ("open_clip_config.json", "open_clip_model.safetensors",
                                           "open_clip_pytorch_model.bin")):
        tags = clip_lookup(repo_id) if clip_lookup else []
        fmt = "open_clip weights" + (f" ([clip] model/pretrained {', '.join(tags)})" if tags else "")
        out.append(LocalModel(repo_id, "clip", fmt, disk_size(snap),
                              "yes" if tags else "no: no open_clip pretrained tag names this repo"))
    out += [_local_entry(str(f), f) for f in sorted(snap.iterdir()) if not f.name.startswith("open_clip")
            and f.name.lower().endswith((".safetensors", *PICKLE_SUFFIXES))]
    return out


def _local_entry(name: str, target: Path) -> LocalModel:
    if target.name.lower().endswith(PICKLE_SUFFIXES):
        return LocalModel(name, "sd", "pickle", target.stat().st_size, "no: a pickle, refused (convert it to .safetensors)")
    if target.is_file():
        return LocalModel(name, "sd", *_try(lambda: f"ldm-single-file, config {resolve(str(target)).config}",
                                            target.stat().st_size))
    return LocalModel(name, "sd", *_try(lambda: _folder_format(resolve(str(target))), disk_size(target)))


def _folder_format(src: ModelSource) -> str:
    return f"{src.format}{', variant ' + src.variant if src.variant else ''}"


def _try(describe_fn: Callable[[], str], size: int) -> tuple[str, int, str]:
    try:
        return describe_fn(), size, "yes"
    except ModelLoadError as e:
        return "?", size, f"no: {e}"


def open_clip_tags(repo_id: str) -> list[str]:
    """The open_clip `model/pretrained` pairs whose weights live in hub repo `repo_id` (imports open_clip)."""
    import open_clip

    tags = []
    for model, tag in open_clip.list_pretrained():
        hub = (open_clip.get_pretrained_cfg(model, tag) or {}).get("hf_hub", "")
        if hub and os.path.split(hub)[0] == repo_id:  # 'org/repo/' or 'org/repo/file' (open_clip's forms)
            tags.append(f"{model}/{tag}")
    return tags

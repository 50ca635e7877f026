"""The weights a job will load, each found or not on this machine, and for each missing one the commands
that fetch it on a machine with network and where to copy it here (`hpcwalk needs`).

This module holds the list's entry (`Weight`), the commands (`hf download` into a local cache folder,
`curl` for a torch hub file) and the SD model's entry (`sd_weight`); the CLIP models and the image
encoder are added in `run/needs.py`, the LPIPS backbone in `analyse/pixelsteps.py`, a study's list in
`study.py`. Nothing is downloaded and no tensor is loaded: a hub id is looked up in the local Hugging
Face cache only, as `weights.resolve` does. This module does not import torch.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpcwalk.core.errors import first_line
from hpcwalk.sd.weights import (
    BUILTIN_MODELS,
    COMPONENTS,
    PICKLE_SUFFIXES,
    ModelLoadError,
    hub_cache_dir,
    hub_snapshot,
    model_kind,
    resolve,
)

FETCH_DIR = "hf-cache"  # the cache folder the printed `hf download` commands fill on the connected machine
REMOTE = "CLUSTER"  # the printed copy commands' placeholder for this machine's host name
BUILT_IN = "built in (random weights, nothing to fetch)"


@dataclass(frozen=True)
class Weight:
    """One weight a job loads: where it was looked for, whether it is there, and how to get it if not."""

    role: str  # SD model | CLIP | CLIP (clip2) | image encoder | LPIPS backbone
    name: str  # as the job names it: a hub id, ViT-L-14/openai, a path, alex
    looked: str  # where it was looked for (a cache folder, a path), or "built in"
    present: bool
    size: int = 0  # bytes on disk, when present
    why: str = ""  # missing: what is missing or what stops it
    fetch: tuple[str, ...] = ()  # missing: commands for a machine with network
    copy_to: str = ""  # missing: where the fetched files go on this machine
    copy: tuple[str, ...] = ()  # missing: commands that copy them there
    env: str = ""  # what sets copy_to (HF_HUB_CACHE, TORCH_HOME)
    builtin: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fetch": list(self.fetch), "copy": list(self.copy)}


@dataclass(frozen=True)
class Needs:
    """Every weight of a job (or study), and what a dry run would refuse here besides (one line each)."""

    weights: tuple[Weight, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def missing(self) -> tuple[Weight, ...]:
        return tuple(w for w in self.weights if not w.present)


def builtin(role: str, name: str) -> Weight:
    return Weight(role, name, "built in", True, why=BUILT_IN, builtin=True)


def disk_size(path: str | Path) -> int:
    """Bytes of a file, or of every file under a folder (links followed, as a load reads them)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# 1. The commands
# ---------------------------------------------------------------------------------------------


def hub_fetch(repo: str, files: tuple[str, ...] = (), includes: tuple[str, ...] = (),
              revision: str | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(fetch, copy) commands for hub files: `hf download` of exact `files` or glob `includes` into
    ./hf-cache on the connected machine, then the repo's cache folder copied into this machine's hub cache."""
    words = ["hf", "download", repo, *files]
    words += [w for pattern in includes for w in ("--include", pattern)]
    words += ["--revision", revision] if revision else []
    words += ["--cache-dir", FETCH_DIR]
    folder = f"{FETCH_DIR}/models--{repo.replace('/', '--')}"
    return (shlex.join(words),), (f"rsync -a {shlex.quote(folder)} {REMOTE}:{shlex.quote(str(hub_cache_dir()))}/",)


def url_fetch(url: str, folder: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(fetch, copy) commands for one file at `url` that a library reads from `folder` here."""
    name = url.rsplit("/", 1)[-1]
    return ((f"curl -L -o {shlex.quote(name)} {shlex.quote(url)}",),
            (f"rsync -a {shlex.quote(name)} {REMOTE}:{shlex.quote(folder)}/",))


HUB_ENV = "the hub cache: HF_HUB_CACHE, else HF_HOME/hub"


def hub_missing(role: str, name: str, why: str, fetch: tuple[tuple[str, ...], tuple[str, ...]]) -> Weight:
    """A weight not in the hub cache, with its (fetch, copy) commands (`hub_fetch`)."""
    cache = str(hub_cache_dir())
    return Weight(role, name, cache, False, why=why, fetch=fetch[0], copy_to=cache, copy=fetch[1], env=HUB_ENV)


# ---------------------------------------------------------------------------------------------
# 2. The SD model
# ---------------------------------------------------------------------------------------------


def diffusers_includes(variant: str) -> tuple[str, ...]:
    """What a diffusers folder load reads (weights.COMPONENTS, tokenizer, scheduler), `variant` weights files
    ("" = the plain ones); not the safety checker or feature extractor, which hpcwalk neither loads nor runs."""
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    parts = [f for comp, (_, _, stem) in COMPONENTS.items() for f in (f"{comp}/config.json", f"{comp}/{stem}{suffix}")]
    return ("model_index.json", "scheduler/*", "tokenizer/*", *parts)


def wanted_variant(variant: str, dtype: str) -> str:
    """The weights files to fetch: the job's [model] variant, or for `auto` fp16 files when it renders in
    float16 (an `auto` load takes them when the plain files are not there), else the plain files."""
    if variant == "auto":
        return "fp16" if dtype == "float16" else ""
    return "" if variant == "none" else variant


def sd_weight(spec: Any, dtype: str = "float32") -> Weight:
    """The job's `[model]` (a ModelSpec): built in, a file or folder that must be here, or a hub id looked up in
    the local cache. A spec that is no model name at all raises ModelLoadError (bad input)."""
    role, name = "SD model", spec.id
    if name in BUILTIN_MODELS:
        return builtin(role, name)
    path = str(Path(name).expanduser())
    try:
        kind = model_kind(name)
    except ModelLoadError as e:
        if not (name.startswith((".", "/", "~")) or name.lower().endswith((".safetensors", *PICKLE_SUFFIXES))):
            raise
        return Weight(role, name, path, False, why=first_line(e), copy_to=path)
    if kind != "hub":
        try:
            src = resolve(name, spec.revision, spec.config, spec.variant)
        except ModelLoadError as e:
            return Weight(role, name, path, False, why=first_line(e), copy_to=path)
        return Weight(role, name, path, True, size=disk_size(src.path))
    fetch = hub_fetch(name, includes=diffusers_includes(wanted_variant(spec.variant, dtype)), revision=spec.revision)
    try:
        hub_snapshot(name, spec.revision)
    except ModelLoadError:
        at = f" at revision {spec.revision}" if spec.revision else ""
        return hub_missing(role, name, f"not in the hub cache{at}", fetch)
    try:
        src = resolve(name, spec.revision, spec.config, spec.variant)
    except ModelLoadError as e:  # a partial download, a variant not there, a damaged file
        return hub_missing(role, name, first_line(e), fetch)
    return Weight(role, name, src.path, True, size=disk_size(src.path))

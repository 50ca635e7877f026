"""Every weight a render of a job loads (`hpcwalk needs`): the SD model (`sd/manifest.py`), each CLIP model
of `[clip]`, the `[encoder]`; each found here or not, with the commands that fetch a missing one; and what
a dry run would refuse on this machine besides (float16 on the CPU, CUDA asked for where there is none,
a `[compile]` choice the device lacks, a micro-batch too large), as notes, without stopping at the first.

Names that are no model at all (an unknown open_clip architecture or tag, an encoder that is neither a hub
id nor a path) raise as a dry run does (bad input). A study adds its LPIPS backbone (`study.study_needs`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hpcwalk.core.errors import HpcwalkError, first_line
from hpcwalk.job.spec import RenderJob
from hpcwalk.sd.manifest import Needs, Weight, builtin, disk_size, hub_fetch, hub_missing, sd_weight, url_fetch
from hpcwalk.sd.weights import hub_cache_dir


def job_needs(job: RenderJob) -> Needs:
    """The job's SD model, CLIP models and image encoder, and the machine notes."""
    weights = [sd_weight(job.model, job.render.dtype)]
    weights += [clip_weight(prefix, m, p) for prefix, m, p in job.clip.models(job.model.id)]
    encoder = job.encoder.resolved(job.model.id)
    if encoder:
        weights.append(encoder_weight(encoder))
    return Needs(tuple(weights), tuple(machine_notes(job)))


# ---------------------------------------------------------------------------------------------
# 1. CLIP (open_clip) and the image encoder (transformers)
# ---------------------------------------------------------------------------------------------


def clip_weight(prefix: str, model: str, pretrained: str) -> Weight:
    """One CLIP model: built in or random, a local folder or weights file, or an open_clip tag's hub file."""
    import open_clip
    from open_clip.constants import HF_WEIGHTS_NAME
    from open_clip.pretrained import _get_safe_alternatives  # the file open_clip tries first (render/clip.py)

    from hpcwalk.render.clip import BUILTIN_CLIP, RANDOM_TAG, cached_weights, check_clip

    role, name = "CLIP" if prefix == "clip" else f"CLIP ({prefix})", f"{model}/{pretrained}"
    if model in BUILTIN_CLIP or pretrained == RANDOM_TAG:
        check_clip(model, pretrained, here=False)  # names: bad ones are bad input
        return builtin(role, name)
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):]).expanduser()
        ok = (folder / "open_clip_config.json").is_file()
        return Weight(role, name, str(folder), ok, size=disk_size(folder) if ok else 0, copy_to=str(folder),
                      why="" if ok else "no open_clip_config.json there (a folder in open_clip's layout)")
    if Path(pretrained).expanduser().is_file():
        return Weight(role, name, str(Path(pretrained).expanduser()), True, size=disk_size(Path(pretrained).expanduser()))
    if "/" in pretrained or pretrained.startswith("~"):  # a weights file that is not here
        path = str(Path(pretrained).expanduser())
        return Weight(role, name, path, False, why="no such file", copy_to=path)
    check_clip(model, pretrained, here=False)  # an unknown architecture or tag raises ClipLoadError
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    found = cached_weights(cfg, str(hub_cache_dir()))
    if found:
        return Weight(role, name, found, True, size=disk_size(found))
    if cfg.get("hf_hub"):
        repo, file = os.path.split(cfg["hf_hub"])
        file = next(iter(_get_safe_alternatives(file or HF_WEIGHTS_NAME)), file or HF_WEIGHTS_NAME)
        return hub_missing(role, name, f"{repo}/{file} not in the hub cache (open_clip reads {HF_WEIGHTS_NAME} "
                           "where a repo has no safetensors file)", hub_fetch(repo, files=(file,)))
    folder = os.path.expanduser("~/.cache/clip")  # open_clip's download folder for a URL (cached_weights)
    fetch, copy = url_fetch(cfg.get("url", ""), folder)
    return Weight(role, name, folder, False, why="not in open_clip's download folder", fetch=fetch, copy_to=folder,
                  copy=copy)


def encoder_weight(name: str) -> Weight:
    """The image encoder: built in, a local folder, or a hub id's config, weights and preprocessing config."""
    from hpcwalk.render.encoder import RANDOM_ENCODERS, EncoderLoadError, cached_snapshot, check_encoder

    role = "image encoder"
    if name in RANDOM_ENCODERS:
        return builtin(role, name)
    folder = Path(name).expanduser()
    if folder.is_dir():
        try:
            check_encoder(name)
        except EncoderLoadError as e:
            return Weight(role, name, str(folder), False, why=first_line(e), copy_to=str(folder))
        return Weight(role, name, str(folder), True, size=disk_size(folder))
    if name.startswith(("/", ".", "~")):
        return Weight(role, name, str(folder), False, why="no such folder", copy_to=str(folder))
    check_encoder(name, here=False)  # neither a folder nor a hub id: bad input
    snapshot = cached_snapshot(name, str(hub_cache_dir()))
    if snapshot:
        return Weight(role, name, snapshot, True, size=disk_size(snapshot))
    return hub_missing(role, name, "not in the hub cache (config.json and weights)",
                       hub_fetch(name, files=("config.json", "model.safetensors", "preprocessor_config.json")))


# ---------------------------------------------------------------------------------------------
# 2. What a dry run would refuse here besides a missing weight
# ---------------------------------------------------------------------------------------------


def machine_notes(job: RenderJob) -> list[str]:
    """Device and dtype, [compile] and memory, checked as `prepare_render` checks them, each failure one line."""
    from hpcwalk.job.plan import plan_size
    from hpcwalk.run.preflight import cap_batch, check_memory, check_speed
    from hpcwalk.sd.models import resolve_device, resolve_dtype

    job, _ = cap_batch(job, plan_size(job))
    checks: list[Any] = [lambda: resolve_dtype(job.render.dtype, resolve_device(job.render.device)),
                         lambda: check_speed(job), lambda: check_memory(job)]
    notes: list[str] = []
    for check in checks:
        try:
            check()
        except HpcwalkError as e:
            line = f"on this machine a render would stop: {first_line(e)}"
            if line not in notes:
                notes.append(line)
    return notes

"""The image endpoints of a run: inverted once, before any frame renders, and read by every worker.

    driver      `prepare(job)`: the images walks' files read and fitted here, where the job file is
                (a changed or vanished file stops the run before anything is written)
    one worker  `invert_missing` (through the executor's `call`): every (image, prompt, settings) that
                RUN/inversions lacks is DDIM-inverted in the renderer's micro-batches and stored there
                (hpcwalk.render.invert.InversionCache: one file per inversion, unique temporary name, rename)
    driver      RUN/inversions/index.json: one record per walk image (path, sha256, prompt, PSNR, latent
                error, cache file), for the viewer and for people
    workers     `Endpoints(job, uri).inversion(...)`: an endpoint's z_T and PSNR, loaded from the cache
                once per worker

One process inverts, before the shards are handed out, so workers never race for an inversion and
every shard, retry and worker uses the same z_T; a rerun finds the cache filled and inverts nothing.
The cache key holds the image's content hash, not its path, so workers need no image files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hpcwalk.core.errors import JobError
from hpcwalk.job.spec import RenderJob
from hpcwalk.store.reader import INDEX_NAME, INVERSIONS_DIR, cache_uri


@dataclass(frozen=True)
class EndpointTask:
    """One image of one images walk, to invert under the walk's prompt."""

    walk: str
    image: str  # as written in the job
    sha256: str
    prompt: str
    guidance: float
    refine: int


@dataclass(frozen=True)
class Prepared:
    """The tasks and their fitted input images (K, H, W, 3) uint8, read on the driver."""

    tasks: tuple[EndpointTask, ...]
    images: np.ndarray


def has_images(job: RenderJob) -> bool:
    return any(w.kind == "images" for w in job.walks)


def tasks(job: RenderJob) -> list[EndpointTask]:
    """One task per image of every images walk, in walk and image order."""
    return [EndpointTask(w.name, p, sha, w.prompt, w.invert_guidance, w.invert_refine)
            for w in job.walks if w.kind == "images" for p, sha in zip(w.images, w.image_sha256)]


def prepare(job: RenderJob) -> Prepared | None:
    """The images to invert, read and fitted here (None: the job has no images walk). Each file must still
    hold the bytes the job was parsed with (its sha256 is in the fingerprint): JobError otherwise."""
    from hpcwalk.job.walkkeys import base_dir, check_image_file, resolve

    todo = tasks(job)
    if not todo:
        return None
    base, s = base_dir(job.source), job.sampling
    images = []
    for t in todo:
        where = f"[[walk]] {t.walk!r} image {t.image!r}"
        sha, fitted = check_image_file(where, resolve(base, t.image), s.height, s.width)
        if sha != t.sha256:
            raise JobError(f"{where} changed since the job was read (its sha256 differs): rerun the command")
        images.append(fitted)
    return Prepared(tuple(todo), np.stack(images))


# ---------------------------------------------------------------------------------------------
# On one worker (the executor's `call` passes its Renderer first)
# ---------------------------------------------------------------------------------------------


def check_settings(renderer: Any, job: RenderJob) -> None:
    """The worker's model can invert every images walk of the job (DDIM, steps its scheduler config can
    schedule, refine and guidance in range): JobError naming the walk otherwise, before anything is written."""
    from hpcwalk.render.invert import check_inversion

    for w in job.walks:
        if w.kind == "images":
            try:
                check_inversion(renderer, w.invert_guidance, w.invert_refine)
            except ValueError as e:
                raise JobError(f"[[walk]] {w.name!r}: {e}") from None


def invert_missing(renderer: Any, job: RenderJob, uri: str, prepared: Prepared) -> list[dict[str, Any]]:
    """Invert the prepared images that the run's cache lacks, store them; one record per task."""
    from hpcwalk.render.invert import InversionCache, invert_fitted, key_for

    cache = InversionCache(cache_uri(uri))
    _remove_stray_temporaries(cache)
    keys = [key_for(renderer, t.sha256, t.prompt, t.guidance, t.refine) for t in prepared.tasks]
    found: dict[str, Any] = {}
    for key in keys:
        d = key.digest()
        if d not in found:
            found[d] = cache.load(key)
    # one invert_fitted call per (guidance, refine): images of several walks share micro-batches
    missing = [k for k, key in enumerate(keys) if found[key.digest()] is None]
    first = {}
    for k in missing:
        first.setdefault(keys[k].digest(), k)
    by_setting: dict[tuple[float, int], list[int]] = {}
    for k in first.values():
        t = prepared.tasks[k]
        by_setting.setdefault((t.guidance, t.refine), []).append(k)
    for (g, refine), idx in by_setting.items():
        done = invert_fitted(renderer, prepared.images[idx], [prepared.tasks[k].prompt for k in idx], g, refine)
        for k, inv in zip(idx, done):
            cache.save(keys[k], inv)
            found[keys[k].digest()] = inv
    return [{**asdict(t), "psnr": found[key.digest()].psnr, "latent_error": found[key.digest()].latent_error,
             "file": f"{INVERSIONS_DIR}/{key.digest()}.safetensors", "inverted_now": k in missing}
            for k, (t, key) in enumerate(zip(prepared.tasks, keys))]


def _remove_stray_temporaries(cache: Any) -> None:
    """Temporary files a killed inversion left (`.DIGEST.safetensors.PID.RANDOM.tmp`): the driver holds the run's
    lock and this is the one process writing the cache, so none of them is being written now."""
    import pyarrow.fs as pafs

    for info in cache.fs.get_file_info(pafs.FileSelector(cache.root, allow_not_found=True)):
        if info.base_name.startswith(".") and info.base_name.endswith(".tmp"):
            cache.fs.delete_file(info.path)


# ---------------------------------------------------------------------------------------------
# The index (driver) and the lookup (every worker)
# ---------------------------------------------------------------------------------------------


def write_index(uri: str, records: list[dict[str, Any]]) -> None:
    """RUN/inversions/index.json, written to a temporary name and renamed."""
    from hpcwalk.core.fsio import filesystem, write_atomic

    fs, root = filesystem(cache_uri(uri))
    fs.create_dir(root, recursive=True)
    write_atomic(fs, f"{root}/{INDEX_NAME}", json.dumps(records, indent=1, allow_nan=True).encode())


def describe(records: list[dict[str, Any]]) -> list[str]:
    """One line per walk image: where its endpoint came from and how well it reconstructs."""
    return [f"walk {r['walk']!r} image {r['image']!r}: {'inverted' if r['inverted_now'] else 'cached'}, "
            f"reconstruction PSNR {r['psnr']:.2f} dB, latent error {r['latent_error']:.2e}" for r in records]


class Endpoints:
    """A worker's view of the run's inversions: (walk, image sha256, prompt) -> the stored Inversion."""

    def __init__(self, job: RenderJob, uri: str):
        from hpcwalk.render.invert import InversionCache

        self.uri = uri
        self.fingerprint = job.fingerprint()
        self.walks = {w.name: (w.invert_guidance, w.invert_refine) for w in job.walks if w.kind == "images"}
        self.cache = InversionCache(cache_uri(uri))
        self._loaded: dict[str, Any] = {}

    def inversion(self, renderer: Any, walk: str, sha256: str, prompt: str) -> Any:
        from hpcwalk.render.invert import key_for

        g, refine = self.walks[walk]
        key = key_for(renderer, sha256, prompt, g, refine)
        d = key.digest()
        if d not in self._loaded:
            inv = self.cache.load(key)
            if inv is None:
                raise RuntimeError(f"walk {walk!r}: the inversion of image {sha256[:12]} is not in "
                                   f"{self.cache.uri}: rerun the render (it inverts missing endpoints first)")
            self._loaded[d] = inv
        return self._loaded[d]


def bind(renderer: Any, job: RenderJob, uri: str) -> None:
    """Give a renderer the run's endpoints (kept when already bound to this job and run; none without images walks)."""
    if not has_images(job):
        renderer.endpoints = None
        return
    e = getattr(renderer, "endpoints", None)
    if e is None or e.uri != uri or e.fingerprint != job.fingerprint():
        renderer.endpoints = Endpoints(job, uri)

"""Synthetic run folders for the video / viewer / figure tests: real job, plan, shards and commit
markers (hpcwalk.store), generated images instead of rendered ones, optional CLIP score columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from hpcwalk.job.spec import RenderJob
from hpcwalk.job.parse import parse_job
from hpcwalk.job.plan import plan, shard
from hpcwalk.store.writer import ShardStore
from hpcwalk.store.schema import encode_image, frames_table


def frame_image(walk: int, method: int, index: int, h: int, w: int, noise: bool = False) -> np.ndarray:
    """A smooth frame unique to (walk, method, index): a gradient tinted per method, a bar at x = index."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (x * 255 // max(1, w - 1) + 40 * method) % 256
    img[..., 1] = (y * 255 // max(1, h - 1) + 60 * walk) % 256
    img[..., 2] = (90 * method + index) % 256
    img[:, (index * 3) % w] = 255
    if noise:  # incompressible pixels: PNG bytes close to the raw size
        rng = np.random.default_rng(index * 131 + method)
        img ^= rng.integers(0, 64, img.shape, dtype=np.uint8)
    return img


def make_run(path: str, walks: list[dict], *, size: tuple[int, int] = (64, 64), shard_size: int = 16,
             drop: tuple[int, ...] = (), clip: bool = False, noise: bool = False,
             image_size: tuple[int, int] | None = None) -> RenderJob:
    """Write a run of `walks` ([[walk]] tables) with every shard committed except those in `drop`."""
    h, w = size
    job = parse_job({"model": {"id": "tiny"}, "sampling": {"steps": 2, "height": h, "width": w},
                     "output": {"shard_size": shard_size}, "walk": walks})
    ih, iw = image_size or size
    store = ShardStore(path, job)
    names = [x.name for x in job.walks]
    methods: dict[str, list[str]] = {}
    for s in shard(plan(job), shard_size):
        if s.index in drop:
            continue
        images, norms, scores, scores_b = [], [], [], []
        for r in s.rows:
            m = methods.setdefault(r.walk, [])
            if r.method not in m:
                m.append(r.method)
            wi, mi = names.index(r.walk), m.index(r.method)
            images.append(encode_image(frame_image(wi, mi, r.index, ih, iw, noise)))
            g = r.gamma if r.gamma is not None else 0.5
            norms.append(np.sqrt(g * (2 * g - 2) + 1) if r.method == "linear" else 1.0)
            scores.append(20 + 10 * np.sin(r.index / 5 + mi))
            scores_b.append(15 + r.index / 10 if r.prompt_b is not None else np.nan)
        extra = {"clip_score": pa.array(scores, pa.float32()),
                 "clip_score_b": pa.array(scores_b, pa.float32())} if clip else None
        store.write(s, frames_table(list(s.rows), images, np.asarray(norms), s.index, ih, iw, extra=extra))
    return job


LATENT3 = {"name": "seeds", "kind": "latent", "prompt": "a cat", "seeds": [1, 2],
           "methods": ["linear", "normalized", "slerp"]}

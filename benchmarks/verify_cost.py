"""What shard verification costs: sha256 per GB of shards, and the resume of a 1,000-shard run folder at
the `quick` (size) and `full` (sha256) levels.

A synthetic run folder is written with the real store (ShardStore.write: Parquet, rename, marker): 1,000
shards of `--frames` frames each holding `--image-kb` KB of incompressible image bytes (what PNGs of
rendered frames are), about 1 GB with the defaults. Then, each timed `--repeats` times (median):

1. `verify_run(level)`: every shard checked against its marker (what `hpcwalk verify` does);
2. the resume: `run_render` with every shard committed, i.e. lock, verification and "nothing to render"
   (the time a rerun of a finished 1,000-shard job spends before it could render anything).

The files were just written, so they are in the page cache: the full level then measures hashing, not
the disk. On a cold cache or an object store the full level reads every byte once more.

    python benchmarks/verify_cost.py                 # writes benchmarks/results/verify-cpu-<date>.json
    python benchmarks/verify_cost.py --shards 100    # quicker
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def build_run(folder: str, shards: int, frames: int, image_kb: int):
    """A committed synthetic run of one latent walk cut into `shards` shards of `frames` frames."""
    from hpcwalk.job.parse import parse_job
    from hpcwalk.job.plan import plan, shard
    from hpcwalk.store.writer import ShardStore
    from hpcwalk.store.schema import frames_table

    n = shards * frames
    job = parse_job({"model": {"id": "tiny"}, "sampling": {"steps": 2, "height": 64, "width": 64},
                     "output": {"shard_size": frames},
                     "walk": [{"name": "w", "kind": "latent", "prompt": "a cat", "seeds": [1, 2],
                               "methods": ["linear"], "frames": n}]})
    store = ShardStore(folder, job)
    rng = np.random.default_rng(0)
    cut = shard(plan(job), frames)
    for s in cut:
        images = [rng.bytes(image_kb * 1024) for _ in s.rows]
        store.write(s, frames_table(list(s.rows), images, np.ones(len(s.rows)), s.index, 64, 64))
    return job, cut


def timed(fn, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=1000)
    p.add_argument("--frames", type=int, default=16, help="frames per shard")
    p.add_argument("--image-kb", type=int, default=64, help="incompressible bytes per frame image, in KB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(common.RESULTS))
    args = p.parse_args()

    from hpcwalk.run.local import run_render
    from hpcwalk.store.reader import verify_run

    tmp = tempfile.mkdtemp(prefix="hpcwalk-verify-")
    try:
        # 1. the run folder
        t0 = time.perf_counter()
        folder = os.path.join(tmp, "run")
        job, cut = build_run(folder, args.shards, args.frames, args.image_kb)
        build_s = time.perf_counter() - t0
        frames_dir = Path(folder, "frames")
        total = sum(f.stat().st_size for f in frames_dir.iterdir())
        # 2. raw sha256 of the same bytes (the floor for the full level) and the two levels
        data = [f.read_bytes() for f in sorted(frames_dir.iterdir())[:50]]
        raw = timed(lambda: [hashlib.sha256(d).digest() for d in data], args.repeats)
        raw_gb_s = sum(map(len, data)) / raw["median_s"] / 1e9
        result = {"what": "shard verification: quick (size) and full (sha256) levels; resume of a committed run",
                  "date": datetime.date.today().isoformat(), "device": common.device_info(common.torch.device("cpu")),
                  "versions": common.versions(), "load_average": common.load_average(),
                  "shards": args.shards, "frames_per_shard": args.frames, "image_kb": args.image_kb,
                  "total_bytes": total, "build_s": build_s, "page_cache": "warm (files just written)",
                  "sha256_in_memory_gb_per_s": raw_gb_s, "levels": {}}
        for level in ("quick", "full"):
            v = timed(lambda: verify_run(folder, level), args.repeats)
            r = timed(lambda: run_render(job, folder, cut, progress=False, verify=level), args.repeats)
            assert len(verify_run(folder, level).ok) == args.shards
            result["levels"][level] = {"verify": v, "resume": r,
                                       "verify_s_per_gb": v["median_s"] / (total / 1e9),
                                       "verify_ms_per_shard": 1000 * v["median_s"] / args.shards}
        path = common.write_result(result, args.out, f"verify-cpu-{result['date']}")
        q, f = result["levels"]["quick"], result["levels"]["full"]
        print(f"{args.shards} shards, {total / 1e9:.2f} GB: quick verify {q['verify']['median_s']:.3f} s, resume "
              f"{q['resume']['median_s']:.3f} s; full verify {f['verify']['median_s']:.2f} s "
              f"({f['verify_s_per_gb']:.2f} s/GB), resume {f['resume']['median_s']:.2f} s; sha256 alone "
              f"{raw_gb_s:.2f} GB/s -> {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""A long walk end to end: frames/s through the local executor with PNG + Parquet, per encode-pool size.

One Renderer is built and warmed up (compiled, when asked) once; then, for each encode-pool size, the
whole walk (default 256 frames) is rendered through `LocalExecutor` into a fresh folder: shard k is
PNG-encoded on the pool and written on a background thread while shard k + 1 renders. Per pool size:
frames/s (median of --repeats) and, summed from the shards' commit markers, the seconds spent
rendering and encoding. Encoding keeps up when encode_s stays below render_s: the run is then bound
by the renderer, and frames/s matches `hpcwalk bench throughput`'s hpcwalk figure.

    hpcwalk bench longrun --smoke                    # CPU / CI: tiny model, 64x64, 16 frames, pools 1 and 2
    hpcwalk bench longrun --model sd14-random --dtype float16 --height 512 --width 512 --compile default \\
        --channels-last --fuse-qkv --batch 16 --frames 256 --pools 1,2,4,8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from hpcwalk.bench import common
from hpcwalk.bench.systems import Hpcwalk, HpcwalkParquet, add_compile_options, compile_table, walk_job


def parse_args(argv: list[str] | None = None, default_out: str = common.DEFAULT_OUT) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hpcwalk bench longrun", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny | sd14-random | a diffusers folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--height", type=int, default=None, help="default 512 on CUDA, 128 on the CPU")
    p.add_argument("--width", type=int, default=None, help="default 512 on CUDA, 128 on the CPU")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--frames", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=None, help="frames per Parquet shard (default 4 micro-batches)")
    p.add_argument("--pools", default="1,2,4,8", help="comma list of PNG encode-pool sizes (threads)")
    p.add_argument("--repeats", type=int, default=1)
    add_compile_options(p)
    p.add_argument("--smoke", action="store_true", help="tiny model, 64x64, 16 frames, 2 steps, batch 2, pools 1,2 (CI)")
    common.add_output_options(p, default_out, "longrun-DEVICE-MODEL[-smoke]")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.height, a.width, a.frames, a.steps, a.batch, a.pools = "tiny", 64, 64, 16, 2, 2, "1,2"
    try:
        a.pool_sizes = [int(x) for x in a.pools.split(",") if x.strip()]
    except ValueError:
        p.error(f"--pools {a.pools!r}: expected a comma list of thread counts, e.g. 1,2,4")
    if not a.pool_sizes or min(a.pool_sizes) < 1 or max(a.pool_sizes) > 256:
        p.error(f"--pools {a.pools!r}: each pool size must be 1..256")
    if a.frames < 2 or a.batch < 1 or a.repeats < 1 or a.steps < 1 or (a.shard_size is not None and a.shard_size < 1):
        p.error("--frames must be >= 2; --batch, --repeats, --steps and --shard-size >= 1")
    return a


def main(argv: list[str] | None = None, default_out: str = common.DEFAULT_OUT) -> Path:
    from hpcwalk.sd.models import load_components, resolve_device

    # 1. settings; the model loaded and the renderer warmed up once, at the walk's micro-batch
    a = parse_args(argv, default_out)
    cuda = resolve_device(a.device).type == "cuda"
    a.height, a.width = a.height or (512 if cuda else 128), a.width or (512 if cuda else 128)
    job = walk_job(a.model, a.steps, a.guidance, a.height, a.width, a.frames, a.batch, a.dtype, a.device, compile_table(a))
    t0 = time.perf_counter()
    c = load_components(a.model, a.dtype, a.device)
    job.compile.check(c.device, job.sampling.scheduler, c.dtype)
    base = Hpcwalk(job, c)
    base.warmup()
    common.sync(c.device)
    warmup_s = time.perf_counter() - t0
    load0 = common.load_average()
    shard_size = a.shard_size or 4 * a.batch
    # 2. the whole walk through the local executor, once per pool size (in turns when repeated)
    runs: dict[int, list[float]] = {n: [] for n in a.pool_sizes}
    timings: dict[int, list[dict[str, float]]] = {}
    for _ in range(a.repeats):
        for n in a.pool_sizes:
            system = HpcwalkParquet(base, pool=n, shard_size=shard_size)
            common.sync(c.device)
            t = time.perf_counter()
            system.run()
            common.sync(c.device)
            runs[n].append(time.perf_counter() - t)
            timings[n] = system.timings
            print(f"pool {n:3d}: {a.frames / runs[n][-1]:.2f} frames/s", flush=True)
    # 3. figures
    rows: list[dict[str, Any]] = []
    for n, ts in runs.items():
        s = common.summary(ts)
        rows.append({"pool": n, "frames": a.frames, "shards": len(timings[n]), **s, "frames_per_s": a.frames / s["median_s"],
                     "render_s": sum(t.get("render_s", 0.0) for t in timings[n]),
                     "encode_s": sum(t.get("encode_s", 0.0) for t in timings[n])})
    result = {
        "benchmark": "longrun",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": common.device_info(c.device),
        "versions": common.versions(),
        "settings": {"model": a.model, "dtype": a.dtype, "height": a.height, "width": a.width, "steps": a.steps,
                     "guidance": a.guidance, "frames": a.frames, "batch": a.batch, "shard_size": shard_size,
                     "image_format": job.output.image_format, "repeats": a.repeats, "threads": torch.get_num_threads(),
                     "hpcwalk_compile": vars(job.compile), "smoke": a.smoke},
        "rows": rows,
        "warmup_s": warmup_s,
        "host_load_average": {"before": load0, "after": common.load_average()},
        "note": a.note,
    }
    dev = "cpu" if c.device.type == "cpu" else result["device"]["name"]
    path = common.write_result(result, a.out, a.name or f"longrun-{common.slug(dev)}-{a.model}{'-smoke' if a.smoke else ''}")
    print(common.markdown_table(result))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()

"""Peak memory of loading a model: `load_components(MODEL, DTYPE, "cpu")` in a fresh process per case.

    python benchmarks/load_memory.py --models sd14-random --dtypes bfloat16,float32 [--out results/X.json]

Each case runs in its own Python process (so peaks do not carry over) and reports that process's peak
RSS (`ru_maxrss`) before and after the load, the bytes of the loaded parameters, and wall time. With
`--fixed-mmap-threshold` (default on) the child runs with MALLOC_MMAP_THRESHOLD_=65536, so glibc
returns freed large blocks to the system and RSS tracks live memory instead of allocator slack (the
default allocator keeps freed temporaries mapped: both figures are written).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
from hpcwalk.sd.models import load_components
t0 = time.perf_counter()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
c = load_components(sys.argv[1], sys.argv[2], "cpu")
params = sum(p.numel() * p.element_size() for m in (c.unet, c.vae, c.text_encoder) for p in m.parameters())
print(json.dumps({"model": sys.argv[1], "dtype": sys.argv[2], "params_gib": params / 2**30,
                  "rss_before_gib": before / 2**20,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "load_s": time.perf_counter() - t0}))
"""


def measure(model: str, dtype: str, fixed_threshold: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if fixed_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run([sys.executable, "-c", CHILD, model, dtype], capture_output=True, text=True, env=env,
                         check=True)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "malloc_mmap_threshold_fixed": fixed_threshold}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="sd14-random")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--out", default="")
    args = p.parse_args()
    rows = [measure(m, d, fixed) for m in args.models.split(",") for d in args.dtypes.split(",")
            for fixed in (True, False)]
    for r in rows:
        print(f"{r['model']:>12} {r['dtype']:>9} params {r['params_gib']:.2f} GiB  peak RSS {r['peak_rss_gib']:.2f} GiB "
              f"(before load {r['rss_before_gib']:.2f})  {r['load_s']:.0f} s  fixed mmap threshold: "
              f"{r['malloc_mmap_threshold_fixed']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"host": os.uname().nodename, "load_avg": os.getloadavg(),
                                              "time": time.strftime("%Y-%m-%d %H:%M"), "cases": rows}, indent=2))


if __name__ == "__main__":
    main()

"""The benchmark harness users run as `hpcwalk bench latency | throughput | longrun` (benchmarks/README.md
holds the committed figures and the table these commands print).

| module | measures |
|---|---|
| `latency.py` | per-step UNet, VAE decode, CLIP image embedding and kernel latency over dtypes x attention x compile modes x batch sizes |
| `throughput.py` | end-to-end frames/s of one walk: hpcwalk vs diffusers eager and diffusers' documented recipe, the FP8 path and its quality cost |
| `longrun.py` | a long walk through the local executor with PNG + Parquet, frames/s per encode-pool size |
| `common.py` | timers, device description, peak table, JSON, the markdown tables |
| `systems.py`, `quality.py`, `sdv.py` | the systems timed, frame-quality metrics, the stable-diffusion-videos peer |
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("latency", "throughput", "longrun")


def run(which: str, argv: list[str], default_out: str | None = None) -> int:
    """Run one benchmark's `main(argv)`; a bad option or a choice this machine cannot run is one
    `error: ...` line on stderr and exit code 2 (argparse's own usage errors exit 2 as well)."""
    from hpcwalk.core.errors import CompileError, JobError
    from hpcwalk.sd.weights import ModelLoadError

    if which not in BENCHMARKS:
        print(f"error: unknown benchmark {which!r}: choose one of {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    main = importlib.import_module(f"hpcwalk.bench.{which}").main
    try:
        main(argv) if default_out is None else main(argv, default_out=default_out)
    except (CompileError, JobError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

"""What every benchmark shares: device description, versions, timers, peak FLOP/s, JSON output.

Timers follow nanoGPT's bench.py: warm-up calls apart (the first one reported as compile time when
something compiles), then timed calls, each measured with CUDA events on a GPU and perf_counter on
the CPU, summarised as median, p10 and p90.

    python -m hpcwalk.bench.common table benchmarks/results/throughput-cpu-tiny-float32.json   # markdown table
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

DEFAULT_OUT = "bench-results"  # where `hpcwalk bench` writes JSON, relative to the working folder (--out changes it)

# Peak dense fp16/bf16 tensor-core TFLOP/s (no sparsity) by device name, first match wins; vendor
# datasheets. A device not matched here gets utilisation null: it is never guessed.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0),  # H200 SXM
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
]


def peak_tflops(device_name: str) -> float | None:
    """Dense fp16/bf16 peak of a known GPU name, else None."""
    for key, tflops in PEAK_TFLOPS:
        if key in device_name:
            return tflops
    return None


def device_info(device: torch.device) -> dict[str, Any]:
    """Name, kind and peak of the device the figures were measured on."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        return {"type": "cuda", "name": name, "multiprocessors": props.multi_processor_count,
                "memory_gib": round(props.total_memory / 2**30, 1), "peak_tflops_fp16": peak_tflops(name)}
    return {"type": "cpu", "name": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "peak_tflops_fp16": None}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """Versions of what decides the figures."""
    import diffusers
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "cuda": str(torch.version.cuda)}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "absent"
    from hpcwalk.sd.fp8 import torchao_version

    out["torchao"] = torchao_version() or "absent"
    return out


def load_average() -> list[float]:
    """1, 5, 15-minute load average of the host (shared machines: read the figures with it)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 1) -> dict[str, Any]:
    """Warm up (the first call timed apart as `first_s`), then time `iters` calls; seconds per call."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        fn()
    sync(device)
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return {"first_s": first, **summary(times)}


def summary(times: Sequence[float]) -> dict[str, Any]:
    """median, p10, p90 and the raw count of a list of seconds."""
    s = sorted(times)
    q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
    return {"median_s": statistics.median(s), "p10_s": q[0], "p90_s": q[-1], "n": len(s)}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call, counted by torch.utils.flop_counter (matmul/conv/attention; elementwise ops not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def add_output_options(p: Any, default_out: str, default_name: str) -> None:
    """--out, --name and --note, which every benchmark takes (`p` an argparse parser)."""
    p.add_argument("--out", default=default_out, help=f"folder for the JSON result (default {default_out})")
    p.add_argument("--name", default=None, help=f"result file name without .json (default {default_name})")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. the host's load)")


def write_result(result: dict[str, Any], out_dir: str | Path, name: str) -> Path:
    """Write `result` as indented JSON to out_dir/name.json and return the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def markdown_table(result: dict[str, Any]) -> str:
    """The headline table(s) of a throughput, step-latency or long-run result, in benchmarks/README.md's columns."""
    dev = result["device"]["name"]
    if result["benchmark"] == "throughput":
        return f"{dev}\n\n" + throughput_table(result)
    if result["benchmark"] == "longrun":
        lines = ["| encode pool | frames | frames/s | s (median) | render s | encode s |", "|---|---|---|---|---|---|"]
        for r in result["rows"]:
            lines.append(f"| {r['pool']} | {r['frames']} | {r['frames_per_s']:.2f} | {r['median_s']:.2f} | "
                         f"{r['render_s']:.2f} | {r['encode_s']:.2f} |")
        return f"{dev}\n\n" + "\n".join(lines)
    lines = ["| module | dtype | attention | compile | frames | median ms | p10 ms | p90 ms | TFLOP/s | util |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        extras = [r.get("levers") or "", "" if r.get("inductor", "default") == "default" else r["inductor"],
                  "" if r.get("quantize", "none") == "none" else r["quantize"]]
        compile = " ".join([r["compile"], *[f"+{x}" for x in extras if x]])
        lines.append(f"| {r['module']} | {r['dtype']} | {r['attention']} | {compile} | {r['batch']} | "
                     f"{1e3 * r['median_s']:.2f} | {1e3 * r['p10_s']:.2f} | {1e3 * r['p90_s']:.2f} | "
                     f"{r['tflops']:.4g} | {_util(r.get('utilisation'))} |")
    return f"{dev}\n\n" + "\n".join(lines)


def throughput_table(result: dict[str, Any]) -> str:
    """Systems with frames/s and ratios to both baselines; then the quality of inexact paths, if any."""
    figures = result["figures"]
    base = figures["diffusers"]["frames_per_s"]
    recipe = figures.get("diffusers_recipe", {}).get("frames_per_s")
    lines = ["| system | frames/s | s per walk (median) | vs diffusers | vs diffusers recipe | TFLOP/s | util |",
             "|---|---|---|---|---|---|---|"]
    for name, f in figures.items():
        vs_recipe = f"{f['frames_per_s'] / recipe:.2f}x" if recipe else "-"
        tflops = "-" if f.get("tflops") is None else f"{f['tflops']:.4g}"
        lines.append(f"| {name} | {f['frames_per_s']:.2f} | {f['median_s']:.2f} | {f['frames_per_s'] / base:.2f}x | "
                     f"{vs_recipe} | {tflops} | {_util(f.get('utilisation'))} |")
    for name, why in result.get("not_measured", {}).items():
        lines.append(f"| {name} | not measured: {why} | | | | | |")
    mode = result.get("settings", {}).get("recipe_mode")
    if mode:
        lines.append(f"\ndiffusers_recipe: diffusers' documented recipe (fused QKV, channels_last, inductor flags), "
                     f"torch.compile mode {mode!r}")
    quality = result.get("quality", {})
    if quality:
        lines += ["", "| system vs reference | PSNR dB | max abs diff | mean abs diff | CLIP score delta | sharpness delta |",
                  "|---|---|---|---|---|---|"]
        for name, q in quality.items():
            psnr = "identical" if q["psnr_db"] is None else f"{q['psnr_db']:.2f}"
            lines.append(f"| {name} vs {q['reference']} | {psnr} | {q['max_abs_diff']} | "
                         f"{q['mean_abs_diff']:.3f} | {q['clip_score_delta']:+.3f} | {q['sharpness_delta']:+.2%} |")
    return "\n".join(lines)


def _util(u: float | None) -> str:
    return "null" if u is None else f"{100 * u:.1f}%"


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "table":
        sys.exit("usage: python -m hpcwalk.bench.common table RESULT.json")
    print(markdown_table(json.loads(Path(sys.argv[2]).read_text())))

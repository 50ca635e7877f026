"""Per-step UNet latency, VAE decode and CLIP image-encode latency, and the two Triton kernels.

For every dtype x attention backend x compile mode x batch size: the UNet called as the renderer
calls it (CFG: 2B latents for B frames), warm-up apart (the first call, which compiles, is reported
as `compile_s`), then `--iters` timed calls (CUDA events on a GPU, perf_counter on the CPU) as
median / p10 / p90. FLOPs of one call are counted by torch.utils.flop_counter on the eager module
(matmuls, convolutions and attention; elementwise work is not counted), giving achieved TFLOP/s
and, on a GPU with a known peak (benchmarks/common.py), utilisation; elsewhere utilisation is null.
The kernel rows time each kernel against its torch reference, eager and (on CUDA, or with
--compiled-kernels) torch.compile'd. The default is quick on a CPU: tiny model, 128x128, 1 frame.

    hpcwalk bench latency                                                       # CPU: seconds
    hpcwalk bench latency --model sd14-random --dtypes float16 --batches 8,16,32 --compile none,default \
        --attention sdpa,cudnn --levers channels_last,fuse_qkv --inductor conv1x1-mm+coordinate-descent
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import torch

from hpcwalk.bench import common

LEVERS = ("channels_last", "fuse_qkv", "cudnn_benchmark")  # boolean [compile] options --levers may turn on


def parse_args(argv: list[str] | None = None, default_out: str = common.DEFAULT_OUT) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hpcwalk bench latency", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtypes", default="float32", help="comma list: float32,float16,bfloat16")
    p.add_argument("--attention", default="sdpa", help="comma list: sdpa,xformers,cudnn")
    p.add_argument("--compile", default="none", help="comma list: none,default,max-autotune,max-autotune-no-cudagraphs,reduce-overhead")
    p.add_argument("--levers", default="", help=f"comma list of [compile] options turned on for every row: {','.join(LEVERS)}")
    p.add_argument("--inductor", default="default", help="[compile] inductor tunings for the compiled rows (see hpcwalk/sd/compile.py)")
    p.add_argument("--quantize", default="none", help="[compile] quantize for every row: none | fp8 | fp8-rowwise (CUDA, torchao)")
    p.add_argument("--batches", default=None, help="comma list of frames per micro-batch (the UNet sees 2x with CFG; "
                   "default 1,4 on CUDA, 1 on the CPU)")
    p.add_argument("--height", type=int, default=None, help="default 512 on CUDA, 128 on the CPU")
    p.add_argument("--width", type=int, default=None, help="default 512 on CUDA, 128 on the CPU")
    p.add_argument("--warmup", type=int, default=None, help="default 3 on CUDA, 1 on the CPU")
    p.add_argument("--iters", type=int, default=None, help="default 20 on CUDA, 5 on the CPU")
    p.add_argument("--compiled-kernels", action="store_true", help="also time torch.compile of the kernels' references "
                   "on the CPU (always on CUDA, never in --smoke)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--parts", default="unet,vae,clip,kernels", help="comma list of what to time")
    p.add_argument("--clip-model", default=None, help="open_clip model (default: tiny-clip for tiny, ViT-L-14 otherwise; random weights)")
    p.add_argument("--skip-unavailable", action="store_true",
                   help="record a compile mode / attention backend that cannot run here under `unavailable` and go on (default: stop with its error)")
    p.add_argument("--smoke", action="store_true", help="tiny model, 64x64, batch 1, 2 iterations (CI)")
    common.add_output_options(p, default_out, "step-latency-DEVICE-MODEL[-smoke]")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.height, a.width, a.batches, a.warmup, a.iters = "tiny", 64, 64, "1", 1, 2
    bad = [x for x in _list(a.levers) if x not in LEVERS]
    if bad:
        p.error(f"--levers {bad[0]!r}: choose from {', '.join(LEVERS)}")
    return a


def device_defaults(a: argparse.Namespace, device: torch.device) -> None:
    """Fill the sizes left unset: a full SD step on CUDA, a quick look on the CPU."""
    cuda = device.type == "cuda"
    for name, on_cuda, on_cpu in (("height", 512, 128), ("width", 512, 128), ("batches", "1,4", "1"),
                                  ("warmup", 3, 1), ("iters", 20, 5)):
        if getattr(a, name) is None:
            setattr(a, name, on_cuda if cuda else on_cpu)


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def measure(module: str, fn: Callable[[], Any], eager: Callable[[], Any], device: torch.device, a: argparse.Namespace,
            **labels: Any) -> dict[str, Any]:
    """One row: timing of `fn`, FLOPs of `eager` (the same work, uncompiled), TFLOP/s, utilisation."""
    t = common.time_calls(fn, device, a.iters, a.warmup)
    flops = common.count_flops(eager)
    tflops = flops / t["median_s"] / 1e12
    peak = common.device_info(device)["peak_tflops_fp16"] if device.type == "cuda" else None
    row = {"module": module, **labels, "flops": flops, "tflops": tflops,
           "utilisation": (tflops / peak) if peak and labels.get("dtype") in ("float16", "bfloat16") else None,
           "compile_s": max(0.0, t["first_s"] - t["median_s"]), **t}
    print(f"{module:8s} {labels} {1e3 * t['median_s']:9.2f} ms  {tflops:9.4g} TFLOP/s  first {t['first_s']:.1f} s", flush=True)
    return row


def unet_rows(a: argparse.Namespace, c, mode: str, attention: str, dtype: str) -> list[dict[str, Any]]:
    """UNet per step (and VAE decode, when asked) under one compile config, every batch size."""
    from hpcwalk.sd.compile import CompileConfig, prepare

    levers = {x: True for x in _list(a.levers)}
    inductor = a.inductor if mode != "none" else "default"
    speed = prepare(CompileConfig(mode=mode, attention=attention, scope="unet+vae", inductor=inductor,
                                  quantize=a.quantize, **levers), c)
    h, w = a.height // 8, a.width // 8
    d = c.unet.config.cross_attention_dim
    rows = []
    for b in map(int, _list(a.batches)):
        x = torch.randn(2 * b, 4, h, w, device=c.device, dtype=c.dtype)
        emb = torch.randn(2 * b, 77, d, device=c.device, dtype=c.dtype)
        t = torch.tensor(500, device=c.device)
        labels = dict(dtype=dtype, attention=attention, compile=mode, batch=b, levers=a.levers, inductor=inductor,
                      quantize=a.quantize)
        if "unet" in a.parts:
            def step(fn=speed.unet):
                speed.mark_step()
                return fn(x, t, encoder_hidden_states=emb, return_dict=False)[0]

            def eager():
                return c.unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]

            with torch.no_grad():
                rows.append(measure("unet", step, eager, c.device, a, unet_batch=2 * b, **labels))
        if "vae" in a.parts:
            z = torch.randn(b, 4, h, w, device=c.device, dtype=c.dtype)

            def decode():
                speed.mark_step()
                return speed.postprocess(speed.vae_decode(z))

            def decode_eager():
                return c.vae.decode(z, return_dict=False)[0]

            with torch.no_grad():
                rows.append(measure("vae", decode, decode_eager, c.device, a, **labels))
    return rows


def clip_rows(a: argparse.Namespace, device: torch.device, dtype: str) -> list[dict[str, Any]]:
    """CLIP image embedding of uint8 frames (device preprocessing included), random weights."""
    from hpcwalk.render.clip import load_clip
    from hpcwalk.sd.models import DTYPES

    name = a.clip_model or ("tiny-clip" if a.model == "tiny" else "ViT-L-14")
    scorer = load_clip(name, "none", device, DTYPES[dtype])
    rows = []
    for b in map(int, _list(a.batches)):
        frames = torch.randint(0, 256, (b, a.height, a.width, 3), dtype=torch.uint8, device=device)
        rows.append(measure("clip", lambda: scorer.embed_images(frames), lambda: scorer.embed_images(frames),
                            device, a, dtype=dtype, attention="-", compile="none", batch=b, clip_model=name))
    return rows


def kernel_rows(a: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Each Triton kernel vs its torch reference, eager and compiled (on the CPU: the paths that run here)."""
    from hpcwalk.kernels import decode_postprocess as dp
    from hpcwalk.kernels import guided_dpm as gd
    from hpcwalk.kernels._dispatch import available_path

    rows = []
    h, w = a.height // 8, a.width // 8
    for b in map(int, _list(a.batches)):
        eps = torch.randn(2 * b, 4, h, w, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
        x = torch.randn(b, 4, h, w, device=device)
        prev = torch.randn_like(x)
        coef = torch.rand(30, 5, device=device)
        img = torch.randn(b, 3, a.height, a.width, device=device, dtype=eps.dtype)
        cases = [
            ("guided_dpm", "torch", lambda: gd.reference(eps, x, prev, coef, 7, 7.5, True)),
            ("decode_postprocess", "torch", lambda: dp.reference(img)),
        ]
        if not a.smoke and (device.type == "cuda" or a.compiled_kernels):  # the bar a kernel must beat: inductor's fusion
            compiled_step = torch.compile(gd.reference, dynamic=False)
            compiled_post = torch.compile(dp.reference, dynamic=False)
            cases.insert(1, ("guided_dpm", "torch.compile", lambda: compiled_step(eps, x, prev, coef, 7, 7.5, True)))
            cases.append(("decode_postprocess", "torch.compile", lambda: compiled_post(img)))
        if available_path(x) == "triton":
            cases.insert(2, ("guided_dpm", "triton", lambda: gd.guided_dpm_step(eps, x, prev, coef, 7, 7.5, True, path="triton")))
            cases.append(("decode_postprocess", "triton", lambda: dp.decode_postprocess(img, path="triton")))
        for op, impl, fn in cases:
            t = common.time_calls(fn, device, a.iters, a.warmup)
            moved = (eps.numel() * eps.element_size() + 4 * x.numel() * 4) if op == "guided_dpm" else (
                img.numel() * img.element_size() + img.numel())
            rows.append({"module": "kernel", "op": op, "impl": impl, "batch": b, "bytes": moved,
                         "gb_per_s": moved / t["median_s"] / 1e9, **t})
            print(f"kernel   {op:18s} {impl:14s} b={b} {1e6 * t['median_s']:9.1f} us  {moved / t['median_s'] / 1e9:7.1f} GB/s", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None, default_out: str = common.DEFAULT_OUT) -> Path:
    from hpcwalk.core.errors import CompileError
    from hpcwalk.sd.compile import CompileConfig
    from hpcwalk.sd.models import load_components, resolve_device

    # 1. settings; every combination is checked before anything is timed
    a = parse_args(argv, default_out)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    device_defaults(a, device)
    unavailable: dict[str, str] = {}
    for option, values in (("mode", _list(a.compile)), ("attention", _list(a.attention))):
        for v in values:
            try:
                CompileConfig(**{option: v}).check(device)  # a mode or backend this device cannot run
            except CompileError as e:
                if not a.skip_unavailable:
                    raise
                unavailable[v] = str(e)
                print(f"unavailable, skipped: {e}", flush=True)
    for dtype in _list(a.dtypes):  # the levers and quantize apply to every row: they must run here
        CompileConfig(quantize=a.quantize, **{x: True for x in _list(a.levers)}).check(device, dtype=dtype)
    modes = [m for m in _list(a.compile) if m not in unavailable]
    attentions = [x for x in _list(a.attention) if x not in unavailable]
    load0 = common.load_average()
    rows: list[dict[str, Any]] = []
    # 2. UNet and VAE per dtype x attention x compile mode (one model per dtype; a fresh one after
    #    xformers, whose attention processors change the modules in place, and after each config when FP8 or
    #    fused QKV rewrites the layers: applied twice they would quantize float8 or fuse fused weights)
    rewrites = a.quantize != "none" or "fuse_qkv" in _list(a.levers)
    for dtype in _list(a.dtypes):
        c = None
        for attention in attentions:
            for mode in modes:
                c = c or load_components(a.model, dtype, a.device)
                torch._dynamo.reset()
                rows += unet_rows(a, c, mode, attention, dtype)
                if rewrites:
                    c = None
            if attention == "xformers":
                c = None
        del c
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # 3. CLIP image encoding
        if "clip" in a.parts:
            rows += clip_rows(a, device, dtype)
    # 4. kernels
    if "kernels" in a.parts:
        rows += kernel_rows(a, device)
    result = {
        "benchmark": "step_latency",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": common.device_info(device),
        "versions": common.versions(),
        "settings": {"model": a.model, "height": a.height, "width": a.width, "dtypes": _list(a.dtypes),
                     "attention": _list(a.attention), "compile": _list(a.compile), "batches": _list(a.batches),
                     "warmup": a.warmup, "iters": a.iters, "threads": torch.get_num_threads(), "smoke": a.smoke,
                     "levers": _list(a.levers), "inductor": a.inductor, "quantize": a.quantize},
        "rows": [r for r in rows if r["module"] != "kernel"],
        "kernels": [r for r in rows if r["module"] == "kernel"],
        "unavailable": unavailable,
        "host_load_average": {"before": load0, "after": common.load_average()},
        "note": a.note,
    }
    dev = "cpu" if device.type == "cpu" else result["device"]["name"]
    name = a.name or f"step-latency-{common.slug(dev)}-{a.model}{'-smoke' if a.smoke else ''}"
    path = common.write_result(result, a.out, name)
    print(common.markdown_table(result))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()

"""End-to-end frames/s of one fixed walk: hpcwalk vs diffusers, eager and with its documented recipe, in one process.

Every system renders the same frames (hpcwalk/bench/systems.py): a slerp walk between two seeds under
one prompt, the same z_T, scheduler, steps, guidance and micro-batch. Each system is warmed up apart
(a warm-up that compiles is reported as `warmup_s`), then the systems run in turns, `--repeats` times,
so a busy host slows all alike; the figure is the median. The baselines are diffusers'
`StableDiffusionPipeline` as shipped (`diffusers`) and with diffusers' documented speed recipe
(`diffusers_recipe`: fused QKV, channels_last, torch.compile of UNet and VAE decode with the page's
inductor flags); every figure carries its ratio to both. `hpcwalk_parquet` adds PNG encoding and
Parquet writes through the local executor. `--quantize fp8` adds the FP8 path on its own copy of the
model and measures what it costs in the frames against the exact path's (PSNR, max and mean
difference, CLIP score and sharpness deltas, `quality`); where it cannot run, the reason is recorded
under `not_measured` and nothing is faked. `--peer sdv` also runs stable-diffusion-videos in its own venv.

    hpcwalk bench throughput --smoke                       # CPU / CI: tiny model, 64x64, 4 frames, 4 steps
    hpcwalk bench throughput --model sd14-random --dtype float16 --compile default --channels-last --fuse-qkv \\
        --inductor conv1x1-mm+coordinate-descent+no-epilogue-fusion --batch 16 --quantize fp8
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcwalk.bench import common
from hpcwalk.bench.systems import (
    PROMPT,
    SEEDS,
    Diffusers,
    DiffusersRecipe,
    Hpcwalk,
    HpcwalkParquet,
    add_compile_options,
    compile_table,
    copy_components,
    walk_job,
)
from hpcwalk.sd.compile import COMPILE_MODES, QUANTIZE


def parse_args(argv: list[str] | None = None, default_out: str = common.DEFAULT_OUT) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hpcwalk bench throughput", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny | sd14-random | a diffusers folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16 (every system)")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="frames per micro-batch, every system")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads for every system, the peer too (0: torch's default)")
    add_compile_options(p)
    g = p.add_argument_group("more hpcwalk systems")
    g.add_argument("--variant", action="append", default=[], metavar="MODE/STEP/POST",
                   help="also time hpcwalk with these [compile] mode/step/postprocess on the same loaded model, e.g. "
                        "none/scheduler/torch (repeatable; figure hpcwalk[MODE/STEP/POST]); at most one compile mode")
    g.add_argument("--quantize", default="none", choices=QUANTIZE,
                   help="also time the FP8 path (same options, own model copy) and measure its quality vs hpcwalk's frames")
    p.add_argument("--recipe-mode", default="auto", help="diffusers_recipe's torch.compile mode: auto (max-autotune, "
                   "as diffusers' page, on CUDA; none on the CPU, where compiling only costs time), none, or a mode")
    p.add_argument("--no-recipe", action="store_true", help="skip the diffusers_recipe baseline")
    p.add_argument("--no-parquet", action="store_true", help="skip the hpcwalk_parquet figure")
    p.add_argument("--pool", type=int, default=None, help="hpcwalk_parquet's PNG encode threads (default: the executor's)")
    p.add_argument("--no-quality", action="store_true", help="skip the quality table (frames vs hpcwalk's)")
    p.add_argument("--clip-model", default=None, help="CLIP for the quality table's score delta (random weights; "
                   "default tiny-clip for tiny, else ViT-L-14)")
    p.add_argument("--peer", action="append", default=[], choices=["sdv"], help="also run a peer (sdv: stable-diffusion-videos)")
    p.add_argument("--sdv-python", default=os.environ.get("SDV_PYTHON", str(Path.home() / ".cache/hpcwalk/sdv-venv/bin/python")))
    p.add_argument("--smoke", action="store_true", help="tiny model, 64x64, 4 frames, 4 steps, 1 repeat (CI)")
    common.add_output_options(p, default_out, "throughput-DEVICE-MODEL-DTYPE[-smoke]")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.height, a.width, a.frames, a.steps, a.batch, a.repeats = "tiny", 64, 64, 4, 4, 2, 1
    if a.frames < 2 or a.batch < 1 or a.repeats < 1 or a.steps < 1:
        p.error("--frames must be >= 2, --batch, --repeats and --steps >= 1")
    for v in a.variant:
        if len(v.split("/")) != 3:
            p.error(f"--variant {v!r}: expected MODE/STEP/POST, e.g. none/scheduler/torch")
    compiling = [m for m in [a.compile] + [v.split("/")[0] for v in a.variant] if m != "none"]
    if len(set(compiling)) > 1:
        p.error(f"--compile and --variant ask for several compile modes ({', '.join(compiling)}) on one model: "
                "run one process per compile mode")
    if a.recipe_mode not in ("auto", *COMPILE_MODES):
        p.error(f"--recipe-mode {a.recipe_mode!r}: choose auto or one of {', '.join(COMPILE_MODES)}")
    return a


def job_for(a: argparse.Namespace, compile: dict[str, Any]):
    return walk_job(a.model, a.steps, a.guidance, a.height, a.width, a.frames, a.batch, a.dtype, a.device, compile)


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def frame_flops(job, c) -> int:
    """FLOPs of one frame, counted (torch.utils.flop_counter: matmuls, convolutions, attention) on the
    eager modules: `steps` UNet calls on the frame's CFG pair plus one VAE decode. Prompt encoding is
    cached per prompt and left out."""
    s = job.sampling
    h, w = s.height // 8, s.width // 8
    n = 2 if s.guidance > 1.0 else 1
    x = torch.randn(n, 4, h, w, device=c.device, dtype=c.dtype)
    emb = torch.randn(n, 77, c.unet.config.cross_attention_dim, device=c.device, dtype=c.dtype)
    t = torch.tensor(500, device=c.device)
    unet = common.count_flops(lambda: c.unet(x, t, encoder_hidden_states=emb, return_dict=False))
    vae = common.count_flops(lambda: c.vae.decode(x[:1], return_dict=False))
    return s.steps * unet + vae


def with_flops(figure: dict[str, Any], flops_per_frame: int, peak: float | None) -> dict[str, Any]:
    """Add achieved TFLOP/s (frames/s x counted FLOPs per frame) and utilisation of the device's peak."""
    tflops = figure["frames_per_s"] * flops_per_frame / 1e12
    return {**figure, "tflops": tflops, "utilisation": tflops / peak if peak else None}


def quality_rows(frames: dict[str, np.ndarray], scorer) -> dict[str, dict[str, Any]]:
    """Each system's frames against hpcwalk's (the exact path): hpcwalk/bench/quality.py, plus the CLIP score delta."""
    from hpcwalk.bench.quality import frame_quality

    ref = frames["hpcwalk"]

    def clip_score(f: np.ndarray) -> float:
        x = torch.from_numpy(f).to(scorer.device)
        return float(scorer.score_prompts(x, [PROMPT] * len(f), [None] * len(f))["clip_score"].mean())

    base = clip_score(ref)
    out = {}
    for name, f in frames.items():
        if name != "hpcwalk" and f.shape == ref.shape:
            out[name] = {"reference": "hpcwalk", **frame_quality(ref, f), "clip_score_ref": base,
                         "clip_score_delta": clip_score(f) - base, "clip_model": f"{scorer.name} (random weights)"}
    return out


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None, default_out: str = common.DEFAULT_OUT) -> Path:
    from hpcwalk.core.errors import CompileError, JobError
    from hpcwalk.sd.compile import CompileConfig
    from hpcwalk.sd.models import load_components

    # 1. settings, checked before loading; one copy of the model per system that changes modules in place
    a = parse_args(argv, default_out)
    if a.threads:
        torch.set_num_threads(a.threads)
    job = job_for(a, compile_table(a))
    variants = {}
    for v in a.variant:
        mode, step, post = v.split("/")
        inductor = a.inductor if mode != "none" else "default"  # the tunings belong to a compile
        variants[f"hpcwalk[{v}]"] = job_for(a, compile_table(a, mode=mode, step=step, postprocess=post, inductor=inductor))
    torch.manual_seed(0)
    t_load = time.perf_counter()
    ours_c = load_components(a.model, a.dtype, a.device)
    device = ours_c.device
    recipe_mode = a.recipe_mode if a.recipe_mode != "auto" else ("max-autotune" if device.type == "cuda" else "none")
    for j in [job, *variants.values()]:
        j.compile.check(device, j.sampling.scheduler, ours_c.dtype)
    CompileConfig(mode=recipe_mode).check(device)
    theirs_c = copy_components(ours_c)  # the pipeline keeps diffusers' defaults: hpcwalk's in-place options never reach it
    load_s = time.perf_counter() - t_load
    flops_per_frame = frame_flops(job, ours_c)
    load0 = common.load_average()

    # 2. the systems, each warmed up apart (compile time is in each one's first warm-up)
    ours = Hpcwalk(job, ours_c)
    latents = ours.renderer.latents(ours.rows)  # the same z_T for the pipelines
    systems: dict[str, Any] = {"hpcwalk": ours, "diffusers": Diffusers(job, theirs_c, latents)}
    if not a.no_recipe:
        systems["diffusers_recipe"] = DiffusersRecipe(job, copy_components(theirs_c), latents, recipe_mode)
    if not a.no_parquet:
        systems["hpcwalk_parquet"] = HpcwalkParquet(ours, a.pool)  # the same (compiled) renderer
    for name, vjob in variants.items():
        systems[name] = Hpcwalk(vjob, ours_c)
    not_measured: dict[str, str] = {}
    if a.quantize != "none":
        name = f"hpcwalk[{a.quantize}]"
        try:
            from hpcwalk.sd.fp8 import check_fp8

            check_fp8(a.quantize, device)  # the device and the library first: the reason a user can act on
            systems[name] = Hpcwalk(job_for(a, compile_table(a, quantize=a.quantize)), copy_components(theirs_c))
        except (CompileError, JobError) as e:
            not_measured[name] = str(e)
            print(f"{name}: not measured: {e}", flush=True)
    warm: dict[str, float] = {}
    for name, sysm in systems.items():
        t = time.perf_counter()
        sysm.warmup()
        common.sync(device)
        warm[name] = time.perf_counter() - t

    # 3. timed runs, in turns
    times: dict[str, list[float]] = {n: [] for n in systems}
    frames: dict[str, np.ndarray] = {}
    for _ in range(a.repeats):
        for name, sysm in systems.items():
            common.sync(device)
            t = time.perf_counter()
            frames[name] = sysm.run()
            common.sync(device)
            times[name].append(time.perf_counter() - t)

    # 4. the peer, then the figures, ratios to both baselines, checks and quality
    peak = common.device_info(device)["peak_tflops_fp16"] if a.dtype in ("float16", "bfloat16") else None
    figures = {n: with_flops({**common.summary(ts), "frames_per_s": a.frames / common.summary(ts)["median_s"],
                              "warmup_s": warm[n]}, flops_per_frame, peak) for n, ts in times.items()}
    checks = {f"max_abs_diff_{n}_vs_diffusers": int(np.abs(frames[n].astype(int) - frames["diffusers"].astype(int)).max())
              for n in ["hpcwalk", *variants, *(["diffusers_recipe"] if "diffusers_recipe" in frames else [])]}
    peers: dict[str, Any] = {}
    if "sdv" in a.peer:
        from hpcwalk.bench.sdv import read_frames, run_sdv

        with tempfile.TemporaryDirectory() as tmp:
            sdv = run_sdv(a, theirs_c, Path(tmp))
            got = read_frames(Path(tmp) / "sdv-frames")
            if got.shape == frames["hpcwalk"].shape:
                checks["max_abs_diff_hpcwalk_vs_sdv"] = int(np.abs(got.astype(int) - frames["hpcwalk"].astype(int)).max())
            else:
                checks["sdv_frames_shape"] = list(got.shape)
        figures["stable-diffusion-videos"] = with_flops(
            {**common.summary(sdv["walk_s"]), "frames_per_s": a.frames / common.summary(sdv["walk_s"])["median_s"],
             "warmup_s": sdv["warmup_s"]}, flops_per_frame, peak)
        peers["stable-diffusion-videos"] = {k: v for k, v in sdv.items() if k not in ("walk_s",)}
    ratios = {}
    for base in ("diffusers", "diffusers_recipe"):
        if base in figures:
            ratios.update({f"{n}_vs_{base}": f["frames_per_s"] / figures[base]["frames_per_s"]
                           for n, f in figures.items() if n != base})
    quality: dict[str, Any] = {}
    if not a.no_quality and len([n for n in frames if frames[n].shape == frames["hpcwalk"].shape]) > 1:
        from hpcwalk.render.clip import load_clip

        scorer = load_clip(a.clip_model or ("tiny-clip" if a.model == "tiny" else "ViT-L-14"), "none", device, ours_c.dtype)
        quality = quality_rows(frames, scorer)
    from hpcwalk.kernels.decode_postprocess import decode_postprocess
    from hpcwalk.kernels.guided_dpm import guided_dpm_step

    result = {
        "benchmark": "throughput",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": common.device_info(device),
        "versions": common.versions(),
        "settings": {"model": a.model, "dtype": a.dtype, "height": a.height, "width": a.width, "steps": a.steps,
                     "guidance": a.guidance, "frames": a.frames, "batch": a.batch, "repeats": a.repeats,
                     "threads": torch.get_num_threads(),
                     "scheduler": "dpmsolver++", "prompt": PROMPT, "seeds": list(SEEDS), "walk": "slerp",
                     "hpcwalk_compile": vars(job.compile), "recipe_mode": None if a.no_recipe else recipe_mode,
                     "encode_pool": a.pool, "quantize": a.quantize, "smoke": a.smoke},
        "figures": figures,
        "ratios": ratios,
        "not_measured": not_measured,
        "quality": quality,
        "compile_s": warm["hpcwalk"] if a.compile != "none" else 0.0,
        "load_s": load_s,
        "flops_per_frame": flops_per_frame,
        "variants": {n: vars(j.compile) for n, j in variants.items()},
        "fp8_layers": {n: s.renderer.speed.quantized_layers for n, s in systems.items()
                       if isinstance(s, Hpcwalk) and s.renderer.speed.quantized_layers},
        "kernel_paths": {"guided_dpm_step": guided_dpm_step.last_path, "decode_postprocess": decode_postprocess.last_path},
        "checks": checks,
        "peers": peers,
        "host_load_average": {"before": load0, "after": common.load_average()},
        "note": a.note,
    }
    dev = result["device"]["type"] if device.type == "cpu" else result["device"]["name"]
    name = a.name or f"throughput-{common.slug(dev)}-{a.model}-{a.dtype}{'-smoke' if a.smoke else ''}"
    path = common.write_result(result, a.out, name)
    print(common.markdown_table(result))
    print(f"ratios: {json.dumps({k: round(v, 3) for k, v in ratios.items()})}; checks: {json.dumps(checks)}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()

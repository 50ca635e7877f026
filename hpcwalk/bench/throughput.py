"""End-to-end frames/s of one fixed walk: hpcwalk vs diffusers' StableDiffusionPipeline, in one process.

Both render the same frames: a slerp walk between two seeds under one prompt, the same z_T (hpcwalk's
seeded noise and slerp, handed to the pipeline as `latents`), the same scheduler, steps, guidance
and batch size. Each system is warmed up apart (hpcwalk's warm-up includes compilation, reported as
`compile_s`), then the systems run in turns, `--repeats` times, so a busy host slows both alike;
the figure is the median. Outputs are uint8 frames in host memory for both (no CLIP: the pipeline has
none); `hpcwalk_parquet` adds PNG encoding and Parquet writes through the local executor. On request
(`--peer sdv`) the same walk runs in stable-diffusion-videos' `StableDiffusionWalkPipeline.walk`, in
its own venv (benchmarks/peers/setup_sdv.sh), as a subprocess on the same model saved to a folder.

    python benchmarks/throughput.py --smoke                      # CI: tiny model, 4 frames, 4 steps
    python benchmarks/throughput.py --model tiny --height 128 --width 128 --frames 32 --batch 8 --peer sdv
    python benchmarks/throughput.py --model sd14-random --dtype float16 --compile max-autotune --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROMPT = "A high resolution photo of a cat"
SEEDS = (1, 2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny | sd14-random | a diffusers folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16 (both systems)")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads for every system, the peer too (0: torch's default)")
    p.add_argument("--compile", default="none", help="hpcwalk's [compile] mode: none | default | max-autotune | reduce-overhead")
    p.add_argument("--attention", default="sdpa", help="hpcwalk's attention: sdpa | xformers | cudnn")
    p.add_argument("--step", default="scheduler", help="hpcwalk's step: scheduler | fused")
    p.add_argument("--postprocess", default="torch", help="hpcwalk's post-processing: torch | fused")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-parquet", action="store_true", help="skip the hpcwalk_parquet figure")
    p.add_argument("--variant", action="append", default=[], metavar="MODE/STEP/POST",
                   help="also time hpcwalk with these [compile] options on the same loaded model, e.g. none/scheduler/torch "
                        "(repeatable; figure name hpcwalk[MODE/STEP/POST]); at most one variant may compile")
    p.add_argument("--peer", action="append", default=[], choices=["sdv"], help="also run a peer (sdv: stable-diffusion-videos)")
    p.add_argument("--sdv-python", default=os.environ.get("SDV_PYTHON", str(Path.home() / ".cache/hpcwalk/sdv-venv/bin/python")))
    p.add_argument("--smoke", action="store_true", help="tiny model, 64x64, 4 frames, 4 steps, 1 repeat (CI)")
    p.add_argument("--out", default=str(common.RESULTS), help="folder for the JSON result")
    p.add_argument("--name", default=None, help="result file name (default: throughput-DEVICE-MODEL-DTYPE[-smoke])")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. the host's load)")
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
    return a


# ---------------------------------------------------------------------------------------------
# The systems
# ---------------------------------------------------------------------------------------------


def walk_job(a: argparse.Namespace, mode: str | None = None, step: str | None = None, post: str | None = None):
    """The fixed walk as an hpcwalk job: slerp between two seeds under one prompt (compile options overridable)."""
    from hpcwalk.job import parse_job

    return parse_job({
        "model": {"id": a.model},
        "sampling": {"scheduler": "dpmsolver++", "steps": a.steps, "guidance": a.guidance,
                     "height": a.height, "width": a.width},
        "render": {"batch_size": a.batch, "dtype": a.dtype, "device": a.device},
        "clip": {"enabled": False},
        "output": {"shard_size": a.frames},
        "compile": {"mode": mode or a.compile, "attention": a.attention, "step": step or a.step,
                    "postprocess": post or a.postprocess,
                    "channels_last": a.channels_last},
        "walk": [{"name": "bench", "kind": "latent", "prompt": PROMPT, "seeds": list(SEEDS), "methods": ["slerp"],
                  "frames": a.frames}],
    }, source="benchmarks/throughput.py")


class Hpcwalk:
    """hpcwalk's Renderer on the walk (frames in host memory)."""

    def __init__(self, job, components):
        from hpcwalk.engine import Renderer
        from hpcwalk.job import plan

        self.job, self.rows = job, plan(job)
        self.renderer = Renderer(components, job.sampling, job.render.batch_size, compile=job.compile)

    def warmup(self) -> None:
        self.renderer.render(self.rows[: self.job.render.batch_size])

    def run(self) -> np.ndarray:
        return self.renderer.render(self.rows).images


class HpcwalkParquet:
    """The same Renderer through the local executor: PNG encoding and Parquet shards, overlapped."""

    def __init__(self, base: Hpcwalk):
        self.job, self.rows, self.renderer = base.job, base.rows, base.renderer

    def warmup(self) -> None:
        """Nothing: the renderer is the one `Hpcwalk` warmed up."""

    def run(self) -> np.ndarray:
        from hpcwalk.executors import LocalExecutor
        from hpcwalk.job import shard
        from hpcwalk.store import ShardStore, run_metadata

        with tempfile.TemporaryDirectory() as out:
            store = ShardStore(out, self.job, overwrite=True, metadata=run_metadata(self.job, self.renderer.c.scheduler_config))
            ex = LocalExecutor(self.renderer)
            try:
                b = self.job.render.batch_size  # shards of whole micro-batches, at least two when the walk allows
                results = ex.run(self.job, shard(self.rows, b * max(1, len(self.rows) // (2 * b))), store)
            finally:
                ex.close()
            bad = [r.error for r in results if r.status != "committed"]
            if bad:
                raise RuntimeError(f"hpcwalk_parquet: shard failed: {bad[0]}")
        return np.zeros((0,))


class Diffusers:
    """StableDiffusionPipeline called per batch with the walk's latents and the prompt (output_type np -> uint8)."""

    def __init__(self, job, components, latents: torch.Tensor):
        from diffusers import StableDiffusionPipeline

        from hpcwalk.engine import make_scheduler

        c = components
        self.pipe = StableDiffusionPipeline(
            vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
            scheduler=make_scheduler(job.sampling.scheduler, c.scheduler_config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.job, self.latents = job, latents

    def _batch(self, z: torch.Tensor) -> np.ndarray:
        s = self.job.sampling
        out = self.pipe(prompt=[PROMPT] * z.shape[0], negative_prompt=[s.negative_prompt] * z.shape[0],
                        latents=z.to(self.pipe.unet.dtype), num_inference_steps=s.steps, guidance_scale=s.guidance,
                        height=s.height, width=s.width, output_type="np").images
        return (out * 255).round().astype(np.uint8)

    def warmup(self) -> None:
        self._batch(self.latents[: self.job.render.batch_size])

    def run(self) -> np.ndarray:
        b = self.job.render.batch_size
        return np.concatenate([self._batch(self.latents[i : i + b]) for i in range(0, len(self.latents), b)])


# ---------------------------------------------------------------------------------------------
# The peer: stable-diffusion-videos in its own venv
# ---------------------------------------------------------------------------------------------


def run_sdv(a: argparse.Namespace, components, workdir: Path) -> dict[str, Any]:
    """Save the model to a folder, run benchmarks/peers/sdv_walk.py in the sdv venv, read its JSON."""
    from diffusers import StableDiffusionPipeline

    from hpcwalk.engine import make_scheduler

    if not Path(a.sdv_python).is_file():
        raise SystemExit(f"--peer sdv: {a.sdv_python} not found: run bash benchmarks/peers/setup_sdv.sh "
                         "(or pass --sdv-python / set SDV_PYTHON)")
    model_dir = workdir / "model"
    c = components
    StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
        scheduler=make_scheduler("dpmsolver++", c.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(model_dir, safe_serialization=True)
    # transformers 5 saves the tokenizer as tokenizer.json only; the peer's transformers 4 CLIPTokenizer
    # reads vocab.json + merges.txt: the same BPE files hpcwalk builds its tokenizer from
    from hpcwalk.models import clip_tokenizer_files

    for f in clip_tokenizer_files():
        shutil.copy(f, model_dir / "tokenizer" / Path(f).name)
    # transformers 5 saves CLIPTextModel weights without the `text_model.` prefix transformers 4 expects
    # (it would silently re-initialise them): write the same tensors under the old names
    from safetensors.torch import load_file, save_file

    weights = model_dir / "text_encoder" / "model.safetensors"
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v.contiguous() for k, v in load_file(weights).items()}
    save_file(state, weights, metadata={"format": "pt"})
    out = workdir / "sdv.json"
    cmd = [a.sdv_python, str(Path(__file__).resolve().parent / "peers" / "sdv_walk.py"),
           "--model-dir", str(model_dir), "--prompt", PROMPT, "--seeds", *map(str, SEEDS),
           "--frames", str(a.frames), "--steps", str(a.steps), "--guidance", str(a.guidance),
           "--height", str(a.height), "--width", str(a.width), "--batch", str(a.batch),
           "--repeats", str(a.repeats), "--threads", str(torch.get_num_threads()), "--dtype", a.dtype, "--device", str(c.device),
           "--frames-dir", str(workdir / "sdv-frames"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"sdv peer failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def copy_components(c):
    """A second set of the same modules (deep copies on the same device): the pipeline's own model."""
    import copy
    import dataclasses

    return dataclasses.replace(c, unet=copy.deepcopy(c.unet), vae=copy.deepcopy(c.vae),
                               text_encoder=copy.deepcopy(c.text_encoder))


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


def read_frames(folder: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(folder.rglob("*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]) if files else np.zeros((0,))


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path:
    from hpcwalk.models import load_components

    # 1. settings, and two copies of the model: hpcwalk may change modules in place (channels_last,
    #    fused QKV, attention processors), the pipeline keeps diffusers' defaults
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    job = walk_job(a)
    variants = {f"hpcwalk[{v}]": walk_job(a, *v.split("/")) for v in a.variant}
    torch.manual_seed(0)
    t_load = time.perf_counter()
    ours_c = load_components(a.model, a.dtype, a.device)
    theirs_c = copy_components(ours_c)  # the same weights; hpcwalk's in-place options never reach the pipeline
    load_s = time.perf_counter() - t_load
    device = ours_c.device
    for j in [job, *variants.values()]:
        j.compile.check(device, j.sampling.scheduler)
    flops_per_frame = frame_flops(job, ours_c)
    load0 = common.load_average()

    # 2. the systems, each warmed up apart (compile time is hpcwalk's first warm-up)
    ours = Hpcwalk(job, ours_c)
    latents = ours.renderer.latents(ours.rows)  # the same z_T for the pipeline
    systems: dict[str, Any] = {"hpcwalk": ours, "diffusers": Diffusers(job, theirs_c, latents)}
    if not a.no_parquet:
        systems["hpcwalk_parquet"] = HpcwalkParquet(ours)  # the same (compiled) renderer
    for name, vjob in variants.items():
        systems[name] = Hpcwalk(vjob, ours_c)
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

    # 4. the peer, then the figures
    peak = common.device_info(device)["peak_tflops_fp16"] if a.dtype in ("float16", "bfloat16") else None
    figures = {n: with_flops({**common.summary(ts), "frames_per_s": a.frames / common.summary(ts)["median_s"],
                              "warmup_s": warm[n]}, flops_per_frame, peak) for n, ts in times.items()}
    checks = {f"max_abs_diff_{n}_vs_diffusers": int(np.abs(frames[n].astype(int) - frames["diffusers"].astype(int)).max())
              for n in ["hpcwalk", *variants]}
    peers: dict[str, Any] = {}
    if "sdv" in a.peer:
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
    base = figures["diffusers"]["frames_per_s"]
    ratios = {f"{n}_vs_diffusers": f["frames_per_s"] / base for n, f in figures.items() if n != "diffusers"}
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
                     "hpcwalk_compile": vars(job.compile), "smoke": a.smoke},
        "figures": figures,
        "ratios": ratios,
        "compile_s": warm["hpcwalk"] if a.compile != "none" else 0.0,
        "load_s": load_s,
        "flops_per_frame": flops_per_frame,
        "variants": {n: vars(j.compile) for n, j in variants.items()},
        "kernel_paths": {"guided_dpm_step": guided_dpm_step.last_path, "decode_postprocess": decode_postprocess.last_path},
        "checks": checks,
        "peers": peers,
        "host_load_average": {"before": load0, "after": common.load_average()},
        "note": a.note,
    }
    name = a.name or f"throughput-{common.slug(result['device']['type'] if device.type == 'cpu' else result['device']['name'])}-{a.model}-{a.dtype}{'-smoke' if a.smoke else ''}"
    path = common.write_result(result, a.out, name)
    print(common.markdown_table(result))
    print(f"ratios: {json.dumps({k: round(v, 3) for k, v in ratios.items()})}; checks: {json.dumps(checks)}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()

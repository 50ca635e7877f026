"""The stable-diffusion-videos peer: `StableDiffusionWalkPipeline.walk` over two seeds under one prompt.

Runs in the venv made by benchmarks/peers/setup_sdv.sh (stable-diffusion-videos 0.9.2 does not import
on hpcwalk's own stack), as a subprocess of hpcwalk/bench/throughput.py (run by its path, never imported
by hpcwalk), on a model saved there with
save_pretrained. It times the whole walk as a user calls it (text encoding, noise, slerp, denoising,
VAE, PNG frames written to --frames-dir; make_video=False), after one warm-up walk of one batch, and
writes the timings as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--seeds", type=int, nargs=2, required=True)
    p.add_argument("--frames", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--guidance", type=float, required=True)
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--frames-dir", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    # 1. the pipeline, as its README loads it, with the scheduler the model folder names (DPM-Solver++)
    if a.threads:
        torch.set_num_threads(a.threads)
    import diffusers
    import stable_diffusion_videos
    import transformers
    from stable_diffusion_videos import StableDiffusionWalkPipeline

    dtype = getattr(torch, a.dtype)
    pipe = StableDiffusionWalkPipeline.from_pretrained(a.model_dir, safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False, torch_dtype=dtype).to(a.device)
    pipe.set_progress_bar_config(disable=True)

    def walk(out: str, frames: int) -> None:
        pipe.walk(prompts=[a.prompt, a.prompt], seeds=list(a.seeds), num_interpolation_steps=frames, output_dir=out,
                  name="walk", num_inference_steps=a.steps, guidance_scale=a.guidance, height=a.height,
                  width=a.width, batch_size=a.batch, make_video=False)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    # 2. warm-up (one batch), then the timed walks
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        walk(tmp, max(2, min(a.batch, a.frames)))
        warm = time.perf_counter() - t
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        walk(a.frames_dir, a.frames)
        times.append(time.perf_counter() - t)
    Path(a.out).write_text(json.dumps({
        "walk_s": times, "warmup_s": warm, "frames": a.frames, "threads": torch.get_num_threads(),
        "scheduler": type(pipe.scheduler).__name__,
        "versions": {"stable_diffusion_videos": getattr(stable_diffusion_videos, "__version__", "0.9.2"),
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }, indent=2))


if __name__ == "__main__":
    main()

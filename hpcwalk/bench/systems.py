"""The systems the throughput benchmark times on one fixed walk, each with `warmup()` and `run() -> frames`.

hpcwalk's Renderer (frames in host memory), the same Renderer through the local executor (PNG +
Parquet), diffusers' `StableDiffusionPipeline` as shipped (eager), and the pipeline with diffusers'
own documented speed recipe. All render the same walk: a slerp between two seeds under one prompt,
the same z_T (hpcwalk's seeded noise and slerp, handed to the pipeline as `latents`), scheduler,
steps, guidance and micro-batch.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROMPT = "A high resolution photo of a cat"
SEEDS = (1, 2)
# diffusers' recipe (huggingface.co/docs/diffusers/optimization/fp16, "torch.compile"): the inductor flags it sets
RECIPE_INDUCTOR = "conv1x1-mm+coordinate-descent+no-epilogue-fusion"


def walk_job(model: str, steps: int, guidance: float, height: int, width: int, frames: int, batch: int,
             dtype: str, device: str, compile: dict[str, Any]):
    """The fixed walk as an hpcwalk job: slerp between two seeds under one prompt, `compile` as its [compile]."""
    from hpcwalk.job.parse import parse_job

    return parse_job({
        "model": {"id": model},
        "sampling": {"scheduler": "dpmsolver++", "steps": steps, "guidance": guidance, "height": height, "width": width},
        "render": {"batch_size": batch, "dtype": dtype, "device": device},
        "clip": {"enabled": False},
        "output": {"shard_size": frames},
        "compile": compile,
        "walk": [{"name": "bench", "kind": "latent", "prompt": PROMPT, "seeds": list(SEEDS), "methods": ["slerp"],
                  "frames": frames}],
    }, source="hpcwalk bench throughput")


def add_compile_options(p: argparse.ArgumentParser) -> None:
    """hpcwalk's [compile] options as flags (throughput and longrun share them)."""
    from hpcwalk.sd.compile import COMPILE_MODES

    g = p.add_argument_group("hpcwalk's [compile] options (hpcwalk/sd/compile.py)")
    g.add_argument("--compile", default="none", help=f"mode: {' | '.join(COMPILE_MODES)}")
    g.add_argument("--scope", default="unet+vae", help="unet | unet+vae | unet+vae+clip")
    g.add_argument("--inductor", default="default", help="default, or '+'-joined: conv1x1-mm, coordinate-descent, no-epilogue-fusion")
    g.add_argument("--attention", default="sdpa", help="sdpa | xformers | cudnn")
    g.add_argument("--step", default="scheduler", help="scheduler | fused")
    g.add_argument("--postprocess", default="torch", help="torch | fused")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--fuse-qkv", action="store_true")
    g.add_argument("--cudnn-benchmark", action="store_true")


def compile_table(a: argparse.Namespace, **changes: Any) -> dict[str, Any]:
    """hpcwalk's [compile] table from those flags (`changes` override single keys)."""
    table = {"mode": a.compile, "scope": a.scope, "inductor": a.inductor, "attention": a.attention, "step": a.step,
             "postprocess": a.postprocess, "channels_last": a.channels_last, "fuse_qkv": a.fuse_qkv,
             "cudnn_benchmark": a.cudnn_benchmark}
    return {**table, **changes}


def copy_components(c):
    """A second set of the same modules (deep copies on the same device), for a system that changes them in place."""
    return dataclasses.replace(c, unet=copy.deepcopy(c.unet), vae=copy.deepcopy(c.vae),
                               text_encoder=copy.deepcopy(c.text_encoder))


class Hpcwalk:
    """hpcwalk's Renderer on the walk (frames in host memory)."""

    def __init__(self, job, components):
        from hpcwalk.job.plan import plan
        from hpcwalk.render.engine import Renderer

        self.job, self.rows = job, plan(job)
        self.renderer = Renderer(components, job.sampling, job.render.batch_size, compile=job.compile)

    def warmup(self) -> None:
        self.renderer.render(self.rows[: self.job.render.batch_size])

    def run(self) -> np.ndarray:
        return self.renderer.render(self.rows).images


class HpcwalkParquet:
    """The same Renderer through the local executor: PNG encoding (`pool` threads) and Parquet shards, overlapped."""

    def __init__(self, base: Hpcwalk, pool: int | None = None, shard_size: int | None = None):
        self.job, self.rows, self.renderer = base.job, base.rows, base.renderer
        self.pool, self.shard_size = pool, shard_size
        self.timings: list[dict[str, float]] = []  # the last run's shard markers' timings (render_s, encode_s)

    def warmup(self) -> None:
        """Nothing: the renderer is the one `Hpcwalk` warmed up."""

    def run(self) -> np.ndarray:
        from hpcwalk.job.plan import shard
        from hpcwalk.run.base import EncodePool
        from hpcwalk.run.local import LocalExecutor
        from hpcwalk.store.schema import run_metadata
        from hpcwalk.store.writer import ShardStore

        b = self.job.render.batch_size  # default: shards of whole micro-batches, at least two when the walk allows
        size = self.shard_size or b * max(1, len(self.rows) // (2 * b))
        with tempfile.TemporaryDirectory() as out:
            store = ShardStore(out, self.job, overwrite=True, metadata=run_metadata(self.job, self.renderer.c.scheduler_config))
            ex = LocalExecutor(self.renderer)
            ex.pool = EncodePool(self.pool)
            try:
                results = ex.run(self.job, shard(self.rows, size), store)
            finally:
                ex.close()
            bad = [r.error for r in results if r.status != "committed"]
            if bad:
                raise RuntimeError(f"hpcwalk_parquet: shard failed: {bad[0]}")
            self.timings = [json.loads(p.read_text()).get("timings", {}) for p in Path(out).rglob("*.done.json")]
        return np.zeros((0,))


class Diffusers:
    """StableDiffusionPipeline called per batch with the walk's latents and the prompt (output_type np -> uint8)."""

    def __init__(self, job, components, latents: torch.Tensor):
        from diffusers import StableDiffusionPipeline

        from hpcwalk.render.engine import make_scheduler

        c = components
        self.pipe = StableDiffusionPipeline(
            vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
            scheduler=make_scheduler(job.sampling.scheduler, c.scheduler_config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.job, self.latents = job, latents
        self.dtype = c.dtype

    def _batch(self, z: torch.Tensor) -> np.ndarray:
        s = self.job.sampling
        out = self.pipe(prompt=[PROMPT] * z.shape[0], negative_prompt=[s.negative_prompt] * z.shape[0],
                        latents=z.to(self.dtype), num_inference_steps=s.steps, guidance_scale=s.guidance,
                        height=s.height, width=s.width, output_type="np").images
        return (out * 255).round().astype(np.uint8)

    def warmup(self) -> None:
        self._batch(self.latents[: self.job.render.batch_size])

    def run(self) -> np.ndarray:
        b = self.job.render.batch_size
        return np.concatenate([self._batch(self.latents[i : i + b]) for i in range(0, len(self.latents), b)])


class DiffusersRecipe(Diffusers):
    """The pipeline with diffusers' documented speed recipe (huggingface.co/docs/diffusers/optimization/fp16:
    "torch.compile" and "Fused projection matrices"): fused QKV projections, channels_last UNet and VAE,
    the UNet and `vae.decode` compiled with `fullgraph=True` in `mode` (the page uses max-autotune) and the
    inductor flags the page sets (conv_1x1_as_mm, coordinate_descent_tuning and its all-directions check,
    epilogue_fusion off), passed to these compiles rather than set for the whole process."""

    def __init__(self, job, components, latents: torch.Tensor, mode: str):
        from hpcwalk.sd.compile import CompileConfig

        super().__init__(job, components, latents)
        pipe = self.pipe
        pipe.fuse_qkv_projections()
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        if mode != "none":
            options = CompileConfig(mode=mode, inductor=RECIPE_INDUCTOR).inductor_options()
            pipe.unet = torch.compile(pipe.unet, fullgraph=True, options=options)
            pipe.vae.decode = torch.compile(pipe.vae.decode, fullgraph=True, options=options)
        self.mode = mode

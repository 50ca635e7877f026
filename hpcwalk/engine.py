"""The batched renderer: plan rows -> z_T and text embeddings -> denoise (CFG) -> VAE -> uint8 frames.

One `Renderer` per worker: models loaded once, prompt embeddings cached per prompt, seeded noise
cached per (seed, draw). `render(rows)` cuts the rows into micro-batches of a fixed size (the last
padded with copies of its last row, the padding dropped), so compiled graphs see one shape.
Inside the denoise loop there is no host sync and no per-frame Python work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, Callable, Sequence

import numpy as np
import torch

from hpcwalk import interp
from hpcwalk.job import FrameRow, NoiseKey, RenderJob, Sampling
from hpcwalk.models import SDComponents, load_components

SCHEDULER_CLASSES = {
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
}


def make_scheduler(name: str, config: dict[str, Any]):
    """A fresh diffusers scheduler of the named kind built from the model's scheduler config."""
    import diffusers

    return getattr(diffusers, SCHEDULER_CLASSES[name]).from_config(config)


def draw_noise(key: NoiseKey, shape: Sequence[int]) -> torch.Tensor:
    """The `draw`-th N(0, I) tensor of `shape` from a CPU generator seeded `seed` (float32, CPU)."""
    g = torch.Generator("cpu").manual_seed(key.seed)
    z = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    for _ in range(key.draw):
        z = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    return z


@dataclass
class RenderOutput:
    """Frames of one `render` call, in row order."""

    rows: list[FrameRow]
    images: np.ndarray  # (N, H, W, 3) uint8
    latent_norm: np.ndarray  # (N,) float32: ||z_T|| / sqrt(numel), the start latent's scale
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # more per-frame columns (pyarrow arrays)


class Renderer:
    """Renders plan rows with one set of loaded SD components."""

    def __init__(self, components: SDComponents, sampling: Sampling, batch_size: int = 8):
        self.c = components
        self.sampling = sampling
        self.batch_size = batch_size
        self.device, self.dtype = components.device, components.dtype
        self.latent_shape = (4, sampling.height // 8, sampling.width // 8)
        self._noise: dict[NoiseKey, torch.Tensor] = {}
        self._prompt: dict[str, torch.Tensor] = {}
        make_scheduler(sampling.scheduler, components.scheduler_config)  # fail early on a bad config

    @classmethod
    def from_job(cls, job: RenderJob) -> "Renderer":
        """Load the job's model on its device in its dtype and wrap it."""
        c = load_components(job.model.id, job.render.dtype, job.render.device, job.model.revision)
        return cls(c, job.sampling, job.render.batch_size)

    # -- 1. inputs ------------------------------------------------------------------------------

    def noise(self, key: NoiseKey) -> torch.Tensor:
        """Seeded z_T on the device, float32, (4, h, w); drawn on the CPU as diffusers does."""
        if key not in self._noise:
            self._noise[key] = draw_noise(key, (1, *self.latent_shape))[0].to(self.device)
        return self._noise[key]

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """CLIP text encoder output (77, D) in the model dtype, cached per prompt (as diffusers' encode_prompt)."""
        if prompt not in self._prompt:
            tok = self.c.tokenizer
            ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            self._prompt[prompt] = self.c.text_encoder(ids.to(self.device))[0][0].to(self.dtype)
        return self._prompt[prompt]

    def latents(self, rows: Sequence[FrameRow]) -> torch.Tensor:
        """z_T for each row, float32 (N, 4, h, w): consecutive rows of one operator are one batched call."""
        out = []
        for (kind, method, a, b), grp in groupby(rows, key=_operator_key):
            grp = list(grp)
            za = self.noise(a)
            zb = self.noise(b) if b is not None else None
            if kind == "latent":
                out.append(interp.interpolate(method, za, zb, [r.gamma for r in grp]))
            elif kind == "translate":
                out.append(interp.translate(za, zb, [r.t for r in grp]))
            elif kind == "mix":
                out.append(interp.mix(za, zb, [r.t for r in grp]))
            elif kind == "std":
                out.append(interp.scale_std(za, [r.std for r in grp]))
            else:  # text, prompts: the fixed latent
                out.append(za.expand(len(grp), *za.shape))
        return torch.cat(out)  # (N, 4, h, w)

    def conditioning(self, rows: Sequence[FrameRow]) -> torch.Tensor:
        """Prompt embeddings per row (N, 77, D): text walks interpolate between two prompts' outputs."""
        out = []
        for r in rows:
            e = self.encode_prompt(r.prompt)
            if r.kind == "text":
                e = interp.interpolate_text(r.method, e, self.encode_prompt(r.prompt_b), [r.gamma])[0]
            out.append(e)
        return torch.stack(out)

    # -- 2. denoise, decode -----------------------------------------------------------------------

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The sampler loop of StableDiffusionPipeline: CFG as one UNet call on 2N, diffusers' scheduler."""
        s = self.sampling
        sched = make_scheduler(s.scheduler, self.c.scheduler_config)
        sched.set_timesteps(s.steps, device=self.device)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)  # skips the timestep lookup (a host sync) on the first step
        cfg = s.guidance > 1.0
        n = latents.shape[0]
        emb = cond
        if cfg:
            uncond = self.encode_prompt(s.negative_prompt).expand(n, -1, -1)
            emb = torch.cat([uncond, cond])  # (2N, 77, D)
        x = latents.to(self.dtype) * sched.init_noise_sigma
        for t in sched.timesteps:
            xin = torch.cat([x, x]) if cfg else x
            xin = sched.scale_model_input(xin, t)
            eps = self.c.unet(xin, t, encoder_hidden_states=emb, return_dict=False)[0]
            if cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + s.guidance * (eps_c - eps_u)
            x = sched.step(eps, t, x, return_dict=False)[0]
        return x  # (N, 4, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode and SD's post-processing to uint8 (N, H, W, 3) on the device."""
        vae = self.c.vae
        img = vae.decode(latents.to(self.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        img = (img.float() / 2 + 0.5).clamp(0, 1)
        return (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1)

    # -- 3. the public entry -------------------------------------------------------------------

    def render(self, rows: Sequence[FrameRow], on_batch: Callable[[int], None] | None = None) -> RenderOutput:
        """Render rows in fixed-size micro-batches; returns frames in row order."""
        rows = list(rows)
        images, norms = [], []
        t0 = time.perf_counter()
        for i in range(0, len(rows), self.batch_size):
            batch = rows[i : i + self.batch_size]
            pad = self.batch_size - len(batch)
            full = batch + [batch[-1]] * pad  # fixed shape for compiled graphs; padding dropped below
            z = self.latents(full)
            norms.append((z.flatten(1).norm(dim=1) / z[0].numel() ** 0.5)[: len(batch)])
            frames = self.decode(self.denoise(z, self.conditioning(full)))[: len(batch)]
            images.append(frames)
            if on_batch:
                on_batch(len(batch))
        out = torch.cat(images).cpu().numpy() if images else np.zeros((0, 0, 0, 3), np.uint8)
        latent_norm = torch.cat(norms).float().cpu().numpy() if norms else np.zeros(0, np.float32)
        return RenderOutput(rows, out, latent_norm, {"render_s": time.perf_counter() - t0})


def _operator_key(r: FrameRow) -> tuple[str, str, NoiseKey, NoiseKey | None]:
    b = NoiseKey(r.seed_b, r.draw_b or 0) if r.seed_b is not None else None
    kind = r.kind if r.kind in ("latent", "translate", "mix", "std") else "fixed"
    return kind, r.method, NoiseKey(r.seed, r.draw), b

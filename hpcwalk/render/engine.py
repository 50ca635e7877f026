"""The batched renderer: plan rows -> z_T and text embeddings -> denoise (CFG) -> VAE -> uint8 frames.

One `Renderer` per worker: models loaded once, prompt embeddings cached per prompt, seeded noise
cached per (seed, draw). `render(rows)` cuts the rows into micro-batches of a fixed size (the last
padded with copies of its last row, the padding dropped), so compiled graphs see one shape.
Inside the denoise loop there is no host sync and no per-frame Python work.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from hpcwalk.core.errors import CompileError
from hpcwalk.job.spec import FrameRow, NoiseKey, RenderJob, Sampling
from hpcwalk.render import interp
from hpcwalk.render.clip import ClipScorer, load_scorers, score_frames, to_arrow
from hpcwalk.render.framestats import FrameStats, load_frame_stats
from hpcwalk.sd.compile import CompileConfig, prepare
from hpcwalk.sd.memory import check_batch_memory
from hpcwalk.sd.models import SDComponents, load_components

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

    def __init__(self, components: SDComponents, sampling: Sampling, batch_size: int = 8,
                 scorers: Sequence[ClipScorer] = (), compile: CompileConfig | None = None,
                 stats: FrameStats | None = None):
        self.c = components
        self.scorers = tuple(scorers)  # CLIP models embedding every decoded frame (hpcwalk.render.clip)
        self.stats = stats or FrameStats()  # sharpness, encoder features of every decoded frame (hpcwalk.render.framestats)
        self.sampling = sampling
        self.batch_size = batch_size
        self.device, self.dtype = components.device, components.dtype
        self.latent_shape = (4, sampling.height // 8, sampling.width // 8)
        self._noise: dict[NoiseKey, torch.Tensor] = {}
        self._prompt: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, int] = {}
        make_scheduler(sampling.scheduler, components.scheduler_config)  # fail early on a bad config
        check_batch_memory(components, batch_size, sampling.height, sampling.width, sampling.guidance > 1.0)
        self.speed = prepare(compile or CompileConfig(), components, sampling.scheduler)  # hpcwalk/sd/compile.py
        self.scorers = self.speed.scorers(self.scorers)  # CLIP image encoders compiled with scope unet+vae+clip
        self._fused = self._fused_schedule() if self.speed.config.step == "fused" else None
        self._vae32: torch.nn.Module | None = None  # float32 VAE copy for the NaN guard, made on first need
        # images walks: the run's inverted endpoints (hpcwalk.run.endpoints.Endpoints), bound by the executor
        self.endpoints: Any = None

    @classmethod
    def from_job(cls, job: RenderJob) -> "Renderer":
        """Load the job's model on its device in its dtype and wrap it."""
        m = job.model
        c = load_components(m.id, job.render.dtype, job.render.device, m.revision, m.config, m.variant)
        return cls(c, job.sampling, job.render.batch_size, load_scorers(job, c.device, c.dtype), compile=job.compile,
                   stats=load_frame_stats(job, c.device, c.dtype))

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

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of the full prompt (start and end included); the encoder reads the first model_max_length."""
        if prompt not in self._tokens:
            self._tokens[prompt] = len(self.c.tokenizer(prompt, truncation=False, verbose=False).input_ids)
        return self._tokens[prompt]

    def token_columns(self, rows: Sequence[FrameRow]) -> dict[str, pa.Array]:
        """prompt_tokens, prompt_b_tokens (int32; null where a row has no prompt_b): more than 77 means the
        text encoder saw only the first 77 tokens of that prompt."""
        return {"prompt_tokens": pa.array([self.prompt_tokens(r.prompt) for r in rows], pa.int32()),
                "prompt_b_tokens": pa.array([None if r.prompt_b is None else self.prompt_tokens(r.prompt_b)
                                             for r in rows], pa.int32())}

    def latents(self, rows: Sequence[FrameRow]) -> torch.Tensor:
        """z_T for each row, float32 (N, 4, h, w): consecutive rows of one operator are one batched call."""
        out = []
        for (kind, method, a, b), grp in groupby(rows, key=_operator_key):
            grp = list(grp)
            if kind == "images":  # endpoints inverted from the walk's images, before rendering (endpoints.py)
                za, zb = self.image_latent(grp[0], 0), self.image_latent(grp[0], 1)
                out.append(interp.interpolate(method, za, zb, [r.gamma for r in grp]))
                continue
            za = self.noise(a)
            zb = self.noise(b) if b is not None else None
            if kind == "latent":
                out.append(interp.interpolate(method, za, zb, [r.gamma for r in grp]))
            elif kind == "translate":
                out.append(interp.translate(za, zb, [r.t for r in grp]))
            elif kind == "mix":
                out.append(interp.mix(za, zb, [r.t for r in grp], layout=method or "end-left"))
            elif kind == "std":
                out.append(interp.scale_std(za, [r.std for r in grp]))
            else:  # text, prompts: the fixed latent
                out.append(za.expand(len(grp), *za.shape))
        return torch.cat(out)  # (N, 4, h, w)

    def conditioning(self, rows: Sequence[FrameRow]) -> torch.Tensor:
        """Prompt embeddings per row (N, 77, D): text walks interpolate between two prompts' outputs with
        their method, keyframes walks with their text_method."""
        out = []
        for r in rows:
            e = self.encode_prompt(r.prompt)
            if r.kind == "text" or (r.kind == "keyframes" and r.prompt_b != r.prompt):  # a kept prompt: its own
                how = r.method if r.kind == "text" else r.text_method
                e = interp.interpolate_text(how, e, self.encode_prompt(r.prompt_b), [r.gamma])[0]
            out.append(e)
        return torch.stack(out)

    def image_latent(self, row: FrameRow, side: int) -> torch.Tensor:
        """The inverted z_T (4, h, w) of an images row's start (side 0) or end (side 1) image, on the device."""
        if self.endpoints is None:
            raise RuntimeError(f"{row.frame_id}: an images walk renders from its inverted endpoints, which this "
                               "renderer was not given: render the job through executors.run_render")
        sha = row.image_sha256 if side == 0 else row.image_sha256_b
        return self.endpoints.inversion(self, row.walk, sha, row.prompt).z_T.to(self.device)

    def image_columns(self, rows: Sequence[FrameRow]) -> dict[str, pa.Array]:
        """image_psnr, image_psnr_b (float64, dB; null on rows of other kinds): each images row's endpoints'
        reconstruction PSNR against their fitted input images."""
        def col(side: int) -> pa.Array:
            return pa.array([self.endpoints.inversion(self, r.walk, r.image_sha256 if side == 0 else r.image_sha256_b,
                                                      r.prompt).psnr if r.kind == "images" else None for r in rows],
                            pa.float64())
        return {"image_psnr": col(0), "image_psnr_b": col(1)}

    # -- 2. denoise, decode -----------------------------------------------------------------------

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The sampler loop of StableDiffusionPipeline: CFG as one UNet call on 2N, diffusers' scheduler."""
        if self._fused is not None:
            return self._denoise_fused(latents, cond)
        s = self.sampling
        sched = make_scheduler(s.scheduler, self.c.scheduler_config)
        sched.set_timesteps(s.steps, device=self.device)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)  # skips the timestep lookup (a host sync) on the first step
        emb = self._guidance_embeddings(cond, s.guidance > 1.0)
        # contiguous whatever the caller's layout: a channels_last z_T gives other last bits than the same
        # values contiguous (different conv algorithms), so the walk's frames and a reconstruction would differ
        x = latents.to(self.dtype).contiguous() * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(self.eps(sched.scale_model_input(x, t), t, emb), t, x, return_dict=False)[0]
        return x  # (N, 4, h, w)

    def eps(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, guidance: float | None = None) -> torch.Tensor:
        """eps_u + g (eps_c - eps_u) from one UNet call on [x, x] with emb = [uncond, cond] when g > 1, else eps(x, t, emb)

        x: (N, 4, h, w) scaled model input (the scheduler's scale_model_input is elementwise, so scaling x
        before doubling it equals scaling the pair); emb: (2N, 77, D) from `_guidance_embeddings` with
        guidance, else (N, 77, D); g = `guidance`, default the job's. The one place guidance is applied:
        the sampler loop and DDIM inversion (hpcwalk/render/invert.py) both call it.
        """
        g = self.sampling.guidance if guidance is None else guidance
        cfg = g > 1.0
        xin = torch.cat([x, x]) if cfg else x
        self.speed.mark_step()
        out = self.speed.unet(xin, t, encoder_hidden_states=emb, return_dict=False)[0]
        if cfg:
            eps_u, eps_c = out.chunk(2)
            out = eps_u + g * (eps_c - eps_u)
        return out  # (N, 4, h, w)

    def _guidance_embeddings(self, cond: torch.Tensor, cfg: bool) -> torch.Tensor:
        """(2N, 77, D) uncond-then-cond embeddings for one CFG UNet call, or cond alone without CFG."""
        if not cfg:
            return cond
        uncond = self.encode_prompt(self.sampling.negative_prompt).expand(cond.shape[0], -1, -1)
        return torch.cat([uncond, cond])

    def _fused_schedule(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Timesteps, the guided DPM-Solver++ coefficient table (on the device) and sigma_0, built once."""
        from hpcwalk.kernels.guided_dpm import dpm_coefficients

        sched = make_scheduler(self.sampling.scheduler, self.c.scheduler_config)
        sched.set_timesteps(self.sampling.steps, device=self.device)
        try:
            coef = dpm_coefficients(sched, self.device)
        except ValueError as e:  # a scheduler config the fused step does not implement: refused, named
            raise CompileError(f"[compile] step = 'fused': {e}") from None
        return sched.timesteps, coef, float(sched.init_noise_sigma)

    @torch.no_grad()
    def _denoise_fused(self, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The same sampler, guidance and DPM-Solver++(2M) update fused in one op (hpcwalk.kernels.guided_dpm)."""
        from hpcwalk.kernels.guided_dpm import guided_dpm_step

        timesteps, coef, init_sigma = self._fused
        s = self.sampling
        cfg = s.guidance > 1.0
        emb = self._guidance_embeddings(cond, cfg)
        x = latents.float().contiguous() * init_sigma  # the sample stays float32 between steps; contiguous as in denoise
        x0 = torch.zeros_like(x)  # previous data prediction (unused by the first, first-order step)
        for i, t in enumerate(timesteps):
            xin = x.to(self.dtype)
            xin = torch.cat([xin, xin]) if cfg else xin  # DPM-Solver's scale_model_input is the identity
            self.speed.mark_step()
            eps = self.speed.unet(xin, t, encoder_hidden_states=emb, return_dict=False)[0]
            x, x0 = guided_dpm_step(eps, x, x0, coef, i, s.guidance, cfg)
        return x  # (N, 4, h, w) float32

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode and SD's post-processing to uint8 (N, H, W, 3) on the device."""
        return self.decode_guarded(latents)[0]

    @torch.no_grad()
    def decode_guarded(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames (N, H, W, 3), and (N,) bool: frames the NaN guard re-decoded in float32.

        In float16 the VAE can overflow to inf/NaN; such frames are decoded again by a float32 copy
        of the VAE. Checking costs one host sync per micro-batch (outside the denoise loop), and only
        in reduced precision.
        """
        vae = self.c.vae
        self.speed.mark_step()
        img = self.speed.vae_decode(latents.to(self.dtype).contiguous() / vae.config.scaling_factor)  # (N, 3, H, W); layout as in denoise
        bad = torch.zeros(img.shape[0], dtype=torch.bool, device=img.device)
        if self.dtype != torch.float32:
            bad = ~torch.isfinite(img).flatten(1).all(dim=1)
            if bool(bad.any()):
                if self._vae32 is None:
                    self._vae32 = copy.deepcopy(vae).float()
                img = img.float()  # a new tensor: also frees it from CUDA-graph reuse
                img[bad] = self._vae32.decode(latents[bad].float() / vae.config.scaling_factor, return_dict=False)[0]
        return self.speed.postprocess(img), bad

    def _to_host(self, frames: torch.Tensor) -> torch.Tensor:
        """Start an async device -> pinned host copy of uint8 frames (CUDA); CPU frames pass through."""
        if frames.device.type != "cuda":
            return frames
        host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
        host.copy_(frames, non_blocking=True)
        return host

    def _host_frames(self, images: list[torch.Tensor]) -> np.ndarray:
        """Wait for the pending copies (one sync per render call) and join the frames."""
        if not images:
            return np.zeros((0, 0, 0, 3), np.uint8)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return torch.cat(images).numpy()

    # -- 3. the public entry -------------------------------------------------------------------

    def render(self, rows: Sequence[FrameRow], on_batch: Callable[[int], None] | None = None) -> RenderOutput:
        """Render rows in fixed-size micro-batches; returns frames in row order."""
        rows = list(rows)
        images, norms, clip_cols, redecoded, stat_cols = [], [], [], [], []
        t0 = time.perf_counter()
        for i in range(0, len(rows), self.batch_size):
            batch = rows[i : i + self.batch_size]
            pad = self.batch_size - len(batch)
            full = batch + [batch[-1]] * pad  # fixed shape for compiled graphs; padding dropped below
            z = self.latents(full)
            norms.append((z.flatten(1).norm(dim=1) / z[0].numel() ** 0.5)[: len(batch)])
            decoded, bad = self.decode_guarded(self.denoise(z, self.conditioning(full)))  # (B, H, W, 3) uint8
            redecoded.append(bad[: len(batch)])
            if self.scorers:  # CLIP on the same device and micro-batch, padding dropped after
                clip_cols.append({k: v[: len(batch)] for k, v in score_frames(self.scorers, decoded, full).items()})
            stat_cols.append({k: v[: len(batch)] for k, v in self.stats.columns(decoded).items()})
            frames = decoded[: len(batch)]
            images.append(self._to_host(frames))  # async to pinned memory on CUDA; joined once below
            if on_batch:
                on_batch(len(batch))
        out = self._host_frames(images)
        latent_norm = torch.cat(norms).float().cpu().numpy() if norms else np.zeros(0, np.float32)
        extra = to_arrow(clip_cols) if clip_cols else {}
        extra.update(to_arrow(stat_cols))
        extra.update(self.token_columns(rows))  # the prompt length per frame (truncation recorded, not silent)
        if self.endpoints is not None and self.endpoints.walks:  # a job with images walks: every shard has them
            extra.update(self.image_columns(rows))
        if redecoded:  # the NaN guard's record: True where the frame was decoded again in float32
            extra["vae_fp32_redecode"] = pa.array(torch.cat(redecoded).cpu().numpy(), pa.bool_())
        return RenderOutput(rows, out, latent_norm, {"render_s": time.perf_counter() - t0}, extra)


def _operator_key(r: FrameRow) -> tuple[str, str, Any, Any]:
    if r.kind == "images":
        return "images", r.method, (r.walk, r.image_sha256, r.prompt), r.image_sha256_b
    a, b = NoiseKey(r.seed, r.draw), NoiseKey(r.seed_b, r.draw_b or 0) if r.seed_b is not None else None
    if r.kind == "keyframes":  # a segment between two keyframes of one seed keeps that latent (as a text walk does)
        return ("latent" if b != a else "fixed"), r.method, a, b
    kind = r.kind if r.kind in ("latent", "translate", "mix", "std") else "fixed"
    return kind, r.method, a, b

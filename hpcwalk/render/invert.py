"""Real images as walk endpoints: load and fit an image, VAE-encode it, DDIM-invert it to z_T, cache the result.

    image file --load_image--> (H, W, 3) uint8 --encode_latent--> z_0 --ddim_invert--> z_T
    z_T --Renderer.denoise (DDIM, same steps)--> z_0' --Renderer.decode--> frame; psnr(frame, image)

`invert_fitted` does all of it for a batch of fitted images under their prompts with a `Renderer`
whose sampler is DDIM, in the renderer's micro-batch shape (the last batch padded, as the renderer
pads), so the stored reconstruction is the frame the walk renders at its endpoint; `invert_image`
does it for one file. Results are kept in an `InversionCache` (one small safetensors file per
image and setting, in a local folder or any pyarrow.fs URI), so every shard, retry and worker that
needs the endpoint loads it instead of inverting again (hpcwalk/run/endpoints.py wires this into runs).
The UNet is called through `Renderer.eps`, the one place classifier-free guidance is applied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import hpcwalk
from hpcwalk.core.errors import first_line
from hpcwalk.core.metrics import psnr
from hpcwalk.job.bounds import MAX_INVERT_REFINE as MAX_REFINE
from hpcwalk.job.imagefile import PREPROCESS, image_sha256, load_image
from hpcwalk.render.engine import Renderer
from hpcwalk.sd.models import SDComponents

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# 2. Encoding, inversion, quality
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_latent(c: SDComponents, images: np.ndarray) -> torch.Tensor:
    """z_0 = scaling_factor * mean of q(z | x), x = image / 127.5 - 1: (B, H, W, 3) uint8 -> (B, 4, H/8, W/8) float32

    The posterior's mean, not a sample, so the same image always gives the same z_0 (diffusers'
    pipelines sample it with a generator). x is what diffusers' VaeImageProcessor makes of it.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8, an NHWC view
    # contiguous (NCHW), as every latent the renderer makes: a channels_last input gives a channels_last z_0,
    # and a channels_last z_T then denoises to other last bits than the contiguous one the walk renders from
    x = (x.to(c.device, torch.float32) / 127.5 - 1.0).to(c.dtype).contiguous()
    z = c.vae.encode(x).latent_dist.mean * c.vae.config.scaling_factor
    return z.float().contiguous()  # (B, 4, h, w)


def inverse_scheduler(config: dict):
    """diffusers' DDIMInverseScheduler from the model's scheduler config (as engine.make_scheduler builds the others)."""
    from diffusers import DDIMInverseScheduler

    return DDIMInverseScheduler.from_config(config)


@torch.no_grad()
def ddim_invert(renderer: Renderer, z0: torch.Tensor, cond: torch.Tensor, steps: int, guidance: float = 0.0,
                uncond: torch.Tensor | None = None, refine: int = 0) -> torch.Tensor:
    """z_T by DDIM run backwards: x_t = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps, x0_hat = (x_{t-r} - sqrt(1 - a_{t-r}) eps) / sqrt(a_{t-r})

    z0: (B, 4, h, w); cond: (B, 77, D) prompt embeddings; -> (B, 4, h, w) float32. The timesteps
    are DDIMInverseScheduler's for `steps` (the DDIMScheduler's of the same config, ascending), so
    DDIM sampling at the same steps retraces them. eps is `renderer.eps` (its UNet, compiled or
    not, and its guidance arithmetic). Plain inversion (refine = 0, as diffusers' DiffEdit
    inverts) takes eps = eps(x_{t-r}, t), where the sampler will use eps(x_t, t): the round trip
    is exact only as the steps grow. refine = k > 0 iterates x_t <- step(eps(x_t, t), x_{t-r}) k
    times per step, converging to the sampler's exact inverse (fixed-point inversion, as in AIDI
    and ReNoise) for (1 + k) x steps UNet calls. Guidance: none by default (guidance <= 1: the
    conditional eps only); with guidance > 1 eps = eps_u + g (eps_c - eps_u) on [uncond, cond] in
    one call, though guided inversion drifts (its error grows with g), so it is rarely what a walk
    wants.
    """
    c = renderer.c
    _check_steps(c.scheduler_config, steps)
    _check_refine(refine)
    cfg = guidance > 1.0
    if cfg and uncond is None:
        raise ValueError("guided inversion needs the unconditional (negative prompt) embeddings")
    sched = inverse_scheduler(c.scheduler_config)
    sched.set_timesteps(steps, device=c.device)
    emb = cond.to(c.device, c.dtype)  # (B, 77, D)
    if cfg:
        emb = torch.cat([uncond.to(c.device, c.dtype).expand_as(emb), emb])  # (2B, 77, D)
    x = z0.to(c.device, c.dtype).contiguous()  # (B, 4, h, w); DDIM's scale_model_input is the identity
    for t in sched.timesteps:
        x_next = sched.step(renderer.eps(x, t, emb, guidance), t, x, return_dict=False)[0]
        for _ in range(refine):  # fixed point of x_next = step(eps(x_next, t), x): the sampler's exact inverse
            x_next = sched.step(renderer.eps(x_next, t, emb, guidance), t, x, return_dict=False)[0]
        x = x_next
    return x.float().contiguous()  # (B, 4, h, w), contiguous: the layout the walk's latents have


def max_steps(config: dict) -> int:
    """The most DDIM steps this scheduler config can schedule: its "leading" timesteps are i (T // steps)
    + steps_offset, i < steps, and the last must stay below T (diffusers indexes its alphas there)."""
    n_train = int(config.get("num_train_timesteps", 1000))
    offset = int(config.get("steps_offset", 0)) if config.get("timestep_spacing", "leading") == "leading" else 0
    return max(k for k in range(1, n_train + 1) if (k - 1) * (n_train // k) + offset <= n_train - 1)


def _check_steps(config: dict, steps: int) -> None:
    n_train = int(config.get("num_train_timesteps", 1000))
    most = max_steps(config)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= most:
        offset = config.get("steps_offset", 0)
        raise ValueError(f"inversion steps must be an int in 1..{most} for this scheduler "
                         f"({n_train} training steps, steps_offset {offset}), got {steps!r}")


def _check_refine(refine: int) -> None:
    if isinstance(refine, bool) or not isinstance(refine, int) or not 0 <= refine <= MAX_REFINE:
        raise ValueError(f"refine (fixed-point iterations per inversion step) must be an int in 0..{MAX_REFINE}, got {refine!r}")


# ---------------------------------------------------------------------------------------------
# 3. The cache
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InversionKey:
    """Everything that decides an inversion; its digest names the cache file."""

    image_sha256: str  # of the file's bytes
    model_id: str
    revision: str | None
    dtype: str
    height: int
    width: int
    steps: int
    prompt: str
    guidance: float  # of the inversion
    refine: int  # fixed-point iterations per inversion step
    negative_prompt: str  # "" unless the inversion's or the reconstruction's guidance is > 1
    render_guidance: float  # of the reconstruction (the walk's sampler), which decides the stored PSNR
    scheduler_config_sha256: str
    preprocess: str = PREPROCESS

    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class Inversion:
    """One image inverted under one prompt."""

    z_T: torch.Tensor  # (4, h, w) float32 on the CPU: the walk's endpoint latent
    z_0: torch.Tensor  # (4, h, w) float32 on the CPU: the VAE latent of the fitted image
    reconstruction: np.ndarray  # (H, W, 3) uint8: z_T rendered back with the walk's DDIM sampler
    psnr: float  # dB, reconstruction against the fitted input image
    latent_error: float  # ||z_0' - z_0|| / ||z_0||, z_0' the sampler's latent before decoding
    cached: bool  # True: loaded from the cache, nothing was run
    image: np.ndarray | None = None  # (H, W, 3) uint8: the fitted input (None in files written before it was kept)


class InversionCache:
    """Inversions as `<digest>.safetensors` files in one folder (a local path or a pyarrow.fs URI such as
    s3://bucket/run/inversions), each written to a unique temporary name beside it and renamed."""

    def __init__(self, folder: str | os.PathLike):
        from hpcwalk.core.fsio import filesystem

        self.uri = os.fspath(folder)
        self.fs, self.root = filesystem(self.uri)
        self.local = "://" not in self.uri
        self.folder = Path(self.root)

    def path(self, key: InversionKey) -> Path | str:
        name = f"{key.digest()}.safetensors"
        return self.folder / name if self.local else f"{self.root}/{name}"

    def load(self, key: InversionKey) -> Inversion | None:
        """The stored inversion, or None when there is none; a damaged or foreign file counts as none (logged)."""
        from safetensors.torch import load as load_tensors

        p = str(self.path(key))
        try:
            with self.fs.open_input_stream(p) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            n = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
            if json.loads(meta.get("key", "null")) != dataclasses.asdict(key):
                raise ValueError("its key does not match")
            t = load_tensors(data)
            image = t["image"].numpy() if "image" in t else None
            return Inversion(t["z_T"], t["z_0"], t["reconstruction"].numpy(), float(meta["psnr"]),
                             float(meta["latent_error"]), cached=True, image=image)
        except Exception as e:  # safetensors raises several types for a damaged file
            log.warning("inversion cache file %s is unusable (%s): inverting again", p, first_line(e))
            return None

    def save(self, key: InversionKey, inv: Inversion) -> Path | str:
        """Write atomically: a temporary file of a unique name in the same folder, then renamed onto the final name."""
        from safetensors.torch import save as save_tensors

        final = str(self.path(key))
        tmp = f"{self.root}/.{key.digest()}.safetensors.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        meta = {"key": json.dumps(dataclasses.asdict(key)), "psnr": repr(inv.psnr),
                "latent_error": repr(inv.latent_error), "hpcwalk": hpcwalk.__version__}
        tensors = {"z_T": inv.z_T.contiguous(), "z_0": inv.z_0.contiguous(),
                   "reconstruction": torch.from_numpy(np.ascontiguousarray(inv.reconstruction))}
        if inv.image is not None:
            tensors["image"] = torch.from_numpy(np.ascontiguousarray(inv.image))
        data = save_tensors(tensors, metadata=meta)
        self.fs.create_dir(self.root, recursive=True)
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, final)
        finally:
            try:
                self.fs.delete_file(tmp)
            except (FileNotFoundError, OSError):  # moved into place (the usual case)
                pass
        return self.path(key)


# ---------------------------------------------------------------------------------------------
# 4. The entry points
# ---------------------------------------------------------------------------------------------


def inversion_key(renderer: Renderer, path: str | os.PathLike, prompt: str, guidance: float = 0.0,
                  refine: int = 0) -> InversionKey:
    """The cache key of inverting the image at `path` under `prompt` for this renderer's model and sampling."""
    return key_for(renderer, image_sha256(path), prompt, guidance, refine)


def key_for(renderer: Renderer, sha256: str, prompt: str, guidance: float = 0.0, refine: int = 0) -> InversionKey:
    """The cache key of inverting the image whose bytes hash to `sha256` (no file needed: a worker
    without the image computes the key the driver's inversion was stored under)."""
    s, c = renderer.sampling, renderer.c
    sched = json.dumps(c.scheduler_config, sort_keys=True, default=str).encode()
    return InversionKey(
        image_sha256=sha256, model_id=c.model_id, revision=c.revision,
        dtype=str(c.dtype).removeprefix("torch."), height=s.height, width=s.width, steps=s.steps, prompt=prompt,
        guidance=float(guidance), refine=int(refine), negative_prompt=s.negative_prompt if max(guidance, s.guidance) > 1.0 else "",
        render_guidance=float(s.guidance), scheduler_config_sha256=hashlib.sha256(sched).hexdigest(),
    )


def check_inversion(renderer: Renderer, guidance: float, refine: int) -> float:
    """The renderer's sampler must be DDIM (the deterministic sampler the inversion reverses), its steps
    schedulable, refine an int in 0..MAX_REFINE, guidance finite >= 0; returns guidance as a float."""
    s = renderer.sampling
    if s.scheduler != "ddim":
        raise ValueError(f"image endpoints need the DDIM sampler: set [sampling] scheduler = \"ddim\" (got {s.scheduler!r})")
    g = float(guidance)
    if not np.isfinite(g) or g < 0:
        raise ValueError(f"inversion guidance must be a finite number >= 0, got {guidance!r}")
    _check_steps(renderer.c.scheduler_config, s.steps)
    _check_refine(refine)
    return g


@torch.no_grad()
def invert_fitted(renderer: Renderer, images: np.ndarray, prompts: Sequence[str], guidance: float = 0.0,
                  refine: int = 0) -> list[Inversion]:
    """Invert fitted images (K, H, W, 3) uint8, image k under prompts[k], and render each back to measure it.

    In micro-batches of the renderer's batch size, the last padded with copies of its last image (the
    renderer's fixed shapes: compiled graphs are reused, and each reconstruction is computed in the
    shape the walk's frames are, so it is the walk's endpoint frame). Steps are the renderer's; its
    guidance is the reconstruction's (the walk's sampler), the inversion's own `guidance` defaults to
    none; `refine` is `ddim_invert`'s. Nothing is cached here (see `invert_image`, endpoints.py).
    """
    s, b = renderer.sampling, renderer.batch_size
    g = check_inversion(renderer, guidance, refine)
    if len(images) != len(prompts):
        raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    out: list[Inversion] = []
    for i in range(0, len(images), b):
        imgs, ps = np.asarray(images[i : i + b]), list(prompts[i : i + b])
        n, pad = len(imgs), b - len(imgs)
        imgs_p = np.concatenate([imgs, np.repeat(imgs[-1:], pad, axis=0)])  # (B, H, W, 3)
        # 1. encode and invert
        z0 = encode_latent(renderer.c, imgs_p)  # (B, 4, h, w)
        cond = torch.stack([renderer.encode_prompt(p) for p in ps + [ps[-1]] * pad])  # (B, 77, D)
        uncond = renderer.encode_prompt(s.negative_prompt)[None] if g > 1.0 else None
        z_T = ddim_invert(renderer, z0, cond, s.steps, g, uncond, refine)  # (B, 4, h, w)
        # 2. render back with the walk's sampler, measure
        z0_back = renderer.denoise(z_T, cond).float()  # (B, 4, h, w)
        frames = renderer.decode(z0_back).cpu().numpy()  # (B, H, W, 3) uint8
        for k in range(n):
            err = float((z0_back[k] - z0[k]).norm() / z0[k].norm())
            out.append(Inversion(z_T[k].cpu(), z0[k].cpu(), frames[k], psnr(frames[k], imgs[k]), err, cached=False,
                                 image=imgs[k]))
    return out


def invert_image(renderer: Renderer, path: str | os.PathLike, prompt: str, cache: InversionCache | None = None,
                 guidance: float = 0.0, refine: int = 0) -> Inversion:
    """Invert one image file under `prompt` at the renderer's size and steps (`invert_fitted`), through
    `cache`: a stored result is returned as it is (`cached=True`, no model call), a new one stored."""
    if not isinstance(prompt, str):
        raise ValueError(f"the inversion prompt must be a string, got {prompt!r}")
    g = check_inversion(renderer, guidance, refine)
    image = load_image(path, renderer.sampling.height, renderer.sampling.width)  # (H, W, 3): errors before any work
    key = inversion_key(renderer, path, prompt, g, refine)
    if cache is not None and (hit := cache.load(key)) is not None:
        return hit
    inv = invert_fitted(renderer, image[None], [prompt], g, refine)[0]
    if cache is not None:
        cache.save(key, inv)
    return inv

"""Real images as walk endpoints: load and fit an image, VAE-encode it, DDIM-invert it to z_T, cache the result.

    image file --load_image--> (H, W, 3) uint8 --encode_latent--> z_0 --ddim_invert--> z_T
    z_T --Renderer.denoise (DDIM, same steps)--> z_0' --Renderer.decode--> frame; psnr(frame, image)

`invert_image` does all of it for one image under one prompt with a `Renderer` whose sampler is
DDIM, and keeps the result in an `InversionCache` (one small safetensors file per image and
setting), so every shard and retry that needs the endpoint loads it instead of inverting again.
The UNet is called as `engine.Renderer` calls it: `unet(x, t, encoder_hidden_states=emb)`, with
classifier-free guidance as one call on [uncond, cond] when guidance > 1.
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

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

import hpcwalk
from hpcwalk.engine import Renderer
from hpcwalk.models import SDComponents

log = logging.getLogger(__name__)

# Modes PIL converts to RGB without losing meaning; the others (16/32-bit integer, float, HSV, LAB)
# would be clipped or misread by a plain conversion, so they are refused with the fix.
RGB_MODES = ("1", "L", "P", "RGB", "CMYK", "YCbCr")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
MAX_IMAGE_PIXELS = 64_000_000  # 64 MP: larger inputs are refused before decoding
MAX_REFINE = 20  # fixed-point iterations per inversion step
PREPROCESS = "v1: exif_transpose, alpha over white, ImageOps.fit lanczos centred"  # part of the cache key


class ImageError(ValueError):
    """An image file cannot be used as a walk endpoint; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------
# 1. Loading: RGB, resized and centre-cropped to the job's size
# ---------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike, height: int, width: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """The image at `path` as (height, width, 3) uint8 RGB, covering the frame, centre-cropped.

    1. EXIF orientation applied (a phone photo stands as it was taken); the first frame of an
       animation. 2. To RGB: modes in RGB_MODES convert directly; alpha (ALPHA_MODES) is
       composited over white; any other mode is refused. 3. Fit (PIL.ImageOps.fit, Lanczos): the
       largest centred region of the target's aspect ratio is cut out and resized to (height,
       width), so nothing is stretched and the short side fills the frame; a wider image loses
       equal strips left and right, a taller one top and bottom. One-line ImageError for a missing
       file, a file that is not an image, an unsupported mode, a damaged file or more than
       max_pixels pixels.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise ImageError(f"image file {p!r} not found: check the path")
    try:
        img = Image.open(p)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise ImageError(f"{p!r} is not an image Pillow can read ({_first_line(e)}): pass a PNG, JPEG or WebP file") from None
    with img:
        if img.width * img.height > max_pixels:
            raise ImageError(f"{p!r} is {img.width}x{img.height} pixels, more than {max_pixels:,}: scale it down first")
        if img.mode not in RGB_MODES + ALPHA_MODES:
            raise ImageError(f"{p!r} has pixel mode {img.mode!r}, which has no faithful RGB conversion: "
                             "save it as 8-bit RGB (or RGBA, grayscale) and pass that")
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageError(f"{p!r} is damaged ({_first_line(e)}): re-export or replace the file") from None
        rgb = _to_rgb(img)
    fitted = ImageOps.fit(rgb, (int(width), int(height)), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    return np.asarray(fitted, dtype=np.uint8).copy()  # (H, W, 3)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in RGB_MODES:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# 2. Encoding, inversion, quality
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_latent(c: SDComponents, images: np.ndarray) -> torch.Tensor:
    """z_0 = scaling_factor * mean of q(z | x), x = image / 127.5 - 1: (B, H, W, 3) uint8 -> (B, 4, H/8, W/8) float32

    The posterior's mean, not a sample, so the same image always gives the same z_0 (diffusers'
    pipelines sample it with a generator). x is what diffusers' VaeImageProcessor makes of it.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    x = (x.to(c.device, torch.float32) / 127.5 - 1.0).to(c.dtype)
    z = c.vae.encode(x).latent_dist.mean * c.vae.config.scaling_factor
    return z.float()  # (B, 4, h, w)


def inverse_scheduler(config: dict):
    """diffusers' DDIMInverseScheduler from the model's scheduler config (as engine.make_scheduler builds the others)."""
    from diffusers import DDIMInverseScheduler

    return DDIMInverseScheduler.from_config(config)


@torch.no_grad()
def ddim_invert(c: SDComponents, z0: torch.Tensor, cond: torch.Tensor, steps: int, guidance: float = 0.0,
                uncond: torch.Tensor | None = None, refine: int = 0) -> torch.Tensor:
    """z_T by DDIM run backwards: x_t = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps, x0_hat = (x_{t-r} - sqrt(1 - a_{t-r}) eps) / sqrt(a_{t-r})

    z0: (B, 4, h, w); cond: (B, 77, D) prompt embeddings; -> (B, 4, h, w) float32. The timesteps
    are DDIMInverseScheduler's for `steps` (the DDIMScheduler's of the same config, ascending), so
    DDIM sampling at the same steps retraces them. Plain inversion (refine = 0, as diffusers'
    DiffEdit inverts) takes eps = eps(x_{t-r}, t), where the sampler will use eps(x_t, t): the
    round trip is exact only as the steps grow. refine = k > 0 iterates x_t <- step(eps(x_t, t),
    x_{t-r}) k times per step, converging to the sampler's exact inverse (fixed-point inversion,
    as in AIDI and ReNoise) for (1 + k) x steps UNet calls. Guidance: none by default (guidance
    <= 1: the conditional eps only); with guidance > 1 eps = eps_u + g (eps_c - eps_u) on
    [uncond, cond] in one call, as in the renderer, though guided inversion drifts (its error grows
    with g), so it is rarely what a walk wants.
    """
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
    x = z0.to(c.device, c.dtype)  # (B, 4, h, w)
    for t in sched.timesteps:
        x_next = sched.step(_eps(c, x, t, emb, guidance, cfg), t, x, return_dict=False)[0]
        for _ in range(refine):  # fixed point of x_next = step(eps(x_next, t), x): the sampler's exact inverse
            x_next = sched.step(_eps(c, x_next, t, emb, guidance, cfg), t, x, return_dict=False)[0]
        x = x_next
    return x.float()  # (B, 4, h, w)


def _check_steps(config: dict, steps: int) -> None:
    """DDIM's "leading" timesteps are i (T // steps) + steps_offset, i < steps; the last must stay below T (diffusers indexes past it)."""
    n_train = int(config.get("num_train_timesteps", 1000))
    offset = int(config.get("steps_offset", 0)) if config.get("timestep_spacing", "leading") == "leading" else 0
    ok = not isinstance(steps, bool) and isinstance(steps, int) and steps >= 1
    if not ok or (steps - 1) * (n_train // steps) + offset > n_train - 1:
        most = max(k for k in range(1, n_train + 1) if (k - 1) * (n_train // k) + offset <= n_train - 1)
        raise ValueError(f"inversion steps must be an int in 1..{most} for this scheduler "
                         f"({n_train} training steps, steps_offset {offset}), got {steps!r}")


def _check_refine(refine: int) -> None:
    if isinstance(refine, bool) or not isinstance(refine, int) or not 0 <= refine <= MAX_REFINE:
        raise ValueError(f"refine (fixed-point iterations per inversion step) must be an int in 0..{MAX_REFINE}, got {refine!r}")


def _eps(c: SDComponents, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, guidance: float, cfg: bool) -> torch.Tensor:
    xin = torch.cat([x, x]) if cfg else x
    eps = c.unet(xin, t, encoder_hidden_states=emb, return_dict=False)[0]  # DDIM's scale_model_input is the identity
    if cfg:
        eps_u, eps_c = eps.chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
    return eps


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """10 log10(255^2 / mean((a - b)^2)) in dB over uint8 images of one shape; inf where they are equal"""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs images of one shape, got {a.shape} and {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


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


class InversionCache:
    """Inversions as `<digest>.safetensors` files in one folder, written to a temporary name and renamed."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, key: InversionKey) -> Path:
        return self.folder / f"{key.digest()}.safetensors"

    def load(self, key: InversionKey) -> Inversion | None:
        """The stored inversion, or None when there is none; a damaged or foreign file counts as none (logged)."""
        from safetensors import safe_open

        p = self.path(key)
        if not p.is_file():
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                if json.loads(meta.get("key", "null")) != dataclasses.asdict(key):
                    raise ValueError("its key does not match")
                t = {name: f.get_tensor(name) for name in ("z_T", "z_0", "reconstruction")}
            return Inversion(t["z_T"], t["z_0"], t["reconstruction"].numpy(), float(meta["psnr"]),
                             float(meta["latent_error"]), cached=True)
        except Exception as e:  # safetensors raises several types for a damaged file
            log.warning("inversion cache file %s is unusable (%s): inverting again", p, _first_line(e))
            return None

    def save(self, key: InversionKey, inv: Inversion) -> Path:
        """Write atomically: a temporary file in the same folder, then os.replace onto the final name."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path(key)
        tmp = self.folder / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        meta = {"key": json.dumps(dataclasses.asdict(key)), "psnr": repr(inv.psnr),
                "latent_error": repr(inv.latent_error), "hpcwalk": hpcwalk.__version__}
        tensors = {"z_T": inv.z_T.contiguous(), "z_0": inv.z_0.contiguous(),
                   "reconstruction": torch.from_numpy(np.ascontiguousarray(inv.reconstruction))}
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final


# ---------------------------------------------------------------------------------------------
# 4. The entry point
# ---------------------------------------------------------------------------------------------


def inversion_key(renderer: Renderer, path: str | os.PathLike, prompt: str, guidance: float = 0.0,
                  refine: int = 0) -> InversionKey:
    """The cache key of inverting the image at `path` under `prompt` for this renderer's model and sampling."""
    s, c = renderer.sampling, renderer.c
    data = Path(path).read_bytes()
    sched = json.dumps(c.scheduler_config, sort_keys=True, default=str).encode()
    return InversionKey(
        image_sha256=hashlib.sha256(data).hexdigest(), model_id=c.model_id, revision=c.revision,
        dtype=str(c.dtype).removeprefix("torch."), height=s.height, width=s.width, steps=s.steps, prompt=prompt,
        guidance=float(guidance), refine=int(refine), negative_prompt=s.negative_prompt if max(guidance, s.guidance) > 1.0 else "",
        render_guidance=float(s.guidance), scheduler_config_sha256=hashlib.sha256(sched).hexdigest(),
    )


@torch.no_grad()
def invert_image(renderer: Renderer, path: str | os.PathLike, prompt: str, cache: InversionCache | None = None,
                 guidance: float = 0.0, refine: int = 0) -> Inversion:
    """Invert one image under `prompt` at the renderer's size and steps, and render it back to measure it.

    The renderer's sampler must be DDIM (the deterministic sampler the inversion reverses); its
    steps are the inversion's steps; its guidance is used for the reconstruction (the frame the
    walk shows at the endpoint), the inversion's own `guidance` defaults to none; `refine` is
    `ddim_invert`'s. With a cache, a stored result is returned as it is (`cached=True`, no model
    call) and a new one is stored.
    """
    s = renderer.sampling
    if s.scheduler != "ddim":
        raise ValueError(f"image endpoints need the DDIM sampler: set [sampling] scheduler = \"ddim\" (got {s.scheduler!r})")
    if not isinstance(prompt, str):
        raise ValueError(f"the inversion prompt must be a string, got {prompt!r}")
    g = float(guidance)
    if not np.isfinite(g) or g < 0:
        raise ValueError(f"inversion guidance must be a finite number >= 0, got {guidance!r}")
    # 1. the image (errors before any work) and the cache
    image = load_image(path, s.height, s.width)  # (H, W, 3)
    _check_steps(renderer.c.scheduler_config, s.steps)
    _check_refine(refine)
    key = inversion_key(renderer, path, prompt, g, refine)
    if cache is not None and (hit := cache.load(key)) is not None:
        return hit
    # 2. encode and invert
    z0 = encode_latent(renderer.c, image[None])  # (1, 4, h, w)
    cond = renderer.encode_prompt(prompt)[None]  # (1, 77, D)
    uncond = renderer.encode_prompt(s.negative_prompt)[None] if g > 1.0 else None
    z_T = ddim_invert(renderer.c, z0, cond, s.steps, g, uncond, refine)  # (1, 4, h, w)
    # 3. render it back with the walk's sampler, measure
    z0_back = renderer.denoise(z_T, cond).float()  # (1, 4, h, w)
    frame = renderer.decode(z0_back)[0].cpu().numpy()  # (H, W, 3) uint8
    err = float((z0_back - z0).norm() / z0.norm())
    inv = Inversion(z_T[0].cpu(), z0[0].cpu(), frame, psnr(frame, image), err, cached=False)
    if cache is not None:
        cache.save(key, inv)
    return inv

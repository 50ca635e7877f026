"""hpcwalk.render.invert: image loading and fitting, VAE encoding, DDIM inversion and its round trip, the cache.

Peers: diffusers' DiffEdit pipeline (its `invert` runs DDIMInverseScheduler the way diffusers does),
diffusers' VaeImageProcessor for the VAE input, torchmetrics for PSNR. The tiny model has random
weights, and its random VAE gives latents of rms 0.06 where SD's scaled latents have rms about 1, so
the round-trip figures are measured on an N(0, I) latent (the scale SD's scaling_factor gives real
images) as well as on an image's own latent.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from hpcwalk.render.engine import Renderer
from hpcwalk.job.imagefile import ImageError, load_image
from hpcwalk.render.invert import InversionCache, ddim_invert, encode_latent, invert_image, inversion_key
from hpcwalk.core.metrics import psnr
from hpcwalk.job.spec import Sampling

SIZE = 64
PROMPT = "a photo of a cat"


def _renderer(tiny, steps: int, guidance: float = 0.0, scheduler: str = "ddim") -> Renderer:
    return Renderer(tiny, Sampling(scheduler=scheduler, steps=steps, guidance=guidance, height=SIZE, width=SIZE),
                    batch_size=1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def unit_latent():
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A 96x80 (W x H) PNG with smooth structure: gradients and a disc."""
    yy, xx = np.mgrid[0:80, 0:96]
    img = np.stack([xx * 2.6, yy * 3.1, 255 * ((xx - 48) ** 2 + (yy - 40) ** 2 < 400)], -1).clip(0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "picture.png"
    Image.fromarray(img).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# inversion and the round trip
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_inversion_equals_diffusers_diffedit_invert(tiny, unit_latent, guidance):
    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline

    r = _renderer(tiny, 10)
    cond, uncond = r.encode_prompt(PROMPT)[None], r.encode_prompt("")[None]
    pipe = StableDiffusionDiffEditPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        scheduler=DDIMScheduler.from_config(tiny.scheduler_config),
        inverse_scheduler=DDIMInverseScheduler.from_config(tiny.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref = pipe.invert(image=unit_latent, prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=10,
                      inpaint_strength=1.0, guidance_scale=max(guidance, 1.0), num_reg_steps=0,
                      output_type="latent").latents[:, 0]  # (1, 4, h, w): the noisiest of its trajectory
    ours = ddim_invert(r, unit_latent, cond, 10, guidance, uncond)
    print(f"guidance {guidance}: max abs diff vs DiffEdit {float((ours - ref).abs().max()):.2e}")
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


class _ConstantEps(torch.nn.Module):
    """A denoiser whose eps depends on neither x nor t: DDIM's inverse is then exact (a fixed reference)."""

    def __init__(self, eps: torch.Tensor):
        super().__init__()
        self.eps = eps

    def forward(self, x, t, encoder_hidden_states=None, return_dict=False):
        return (self.eps.expand_as(x),)


def test_round_trip_exact_for_a_constant_eps(tiny, unit_latent):
    """Checks that inversion and the renderer's DDIM sampler use the same timesteps and alpha levels:
    with eps independent of x any mismatch of one level would show at once."""
    eps = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    c = dataclasses.replace(tiny, unet=_ConstantEps(eps))
    for steps in (3, 10):
        r = _renderer(c, steps)
        cond = r.encode_prompt(PROMPT)[None]
        back = r.denoise(ddim_invert(r, unit_latent, cond, steps), cond)
        print(f"constant eps, {steps} steps: relative error {_rel(back, unit_latent):.1e}")
        assert _rel(back, unit_latent) < 1e-5


def test_round_trip_tiny_float32(tiny, unit_latent):
    """Inversion, then the renderer's DDIM sampling at the same steps, no guidance, float32, on `tiny`.

    Measured (2-core CPU, this latent and prompt): relative latent error of plain DDIM inversion
    1.29 / 1.03 / 0.72 / 0.43 / 0.25 at 10 / 25 / 50 / 100 / 200 steps (about 1 / steps at the
    end: the random UNet's eps is rough, so plain inversion converges slowly); at 50 steps with
    refine = 1 / 2 / 3 / 5 / 8 fixed-point iterations per step 0.13 / 2.9e-2 / 4.6e-3 / 1.2e-4 / 7.9e-6.
    """
    r = _renderer(tiny, 50)
    cond = r.encode_prompt(PROMPT)[None]
    refined = _rel(r.denoise(ddim_invert(r, unit_latent, cond, 50, refine=5), cond), unit_latent)
    plain50 = _rel(r.denoise(ddim_invert(r, unit_latent, cond, 50), cond), unit_latent)
    r10 = _renderer(tiny, 10)
    plain10 = _rel(r10.denoise(ddim_invert(r10, unit_latent, cond, 10), cond), unit_latent)
    print(f"relative latent error: plain 10 steps {plain10:.3f}, plain 50 {plain50:.3f}, refine=5 at 50 {refined:.1e}")
    assert refined < 1e-3  # the stated tolerance
    assert plain50 < plain10  # plain inversion improves with steps
    assert refined < plain50 / 100


def test_invert_image_measures_and_caches(tiny, picture, tmp_path, caplog):
    r = _renderer(tiny, 8)
    cache = InversionCache(tmp_path / "inversions")
    calls = []
    hook = tiny.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        first = invert_image(r, picture, PROMPT, cache)
        n_first = len(calls)
        again = invert_image(r, picture, PROMPT, cache)
        n_again = len(calls) - n_first
        other_prompt = invert_image(r, picture, "a photo of a dog", cache)
        other_steps = invert_image(_renderer(tiny, 6), picture, PROMPT, cache)
        refined = invert_image(r, picture, PROMPT, cache, refine=1)
    finally:
        hook.remove()
    fitted = load_image(picture, SIZE, SIZE)
    # 1. what is stored is what was measured, and the reconstruction is the walk's endpoint frame
    assert not first.cached and first.z_T.shape == (4, SIZE // 8, SIZE // 8) and first.z_T.dtype == torch.float32
    assert n_first == 2 * 8  # 8 inversion steps + 8 sampling steps
    assert first.psnr == psnr(first.reconstruction, fitted)
    frame = r.decode(r.denoise(first.z_T[None], r.encode_prompt(PROMPT)[None]))[0].numpy()
    np.testing.assert_array_equal(first.reconstruction, frame)
    torch.testing.assert_close(first.z_0, encode_latent(tiny, fitted[None])[0], rtol=0, atol=0)
    print(f"tiny, 8 steps: PSNR {first.psnr:.2f} dB, latent error {first.latent_error:.2f} (random VAE and UNet)")
    # 2. the second call is a cache hit, bit-equal, without a UNet call
    assert again.cached and n_again == 0
    assert torch.equal(again.z_T, first.z_T) and torch.equal(again.z_0, first.z_0)
    np.testing.assert_array_equal(again.reconstruction, first.reconstruction)
    assert (again.psnr, again.latent_error) == (first.psnr, first.latent_error)
    # 3. another prompt, other steps, refinement: misses, each stored in its own file
    for inv in (other_prompt, other_steps, refined):
        assert not inv.cached and not torch.equal(inv.z_T, first.z_T)
    files = sorted(p.name for p in cache.folder.iterdir())
    assert len(files) == 4 and all(f.endswith(".safetensors") and not f.startswith(".") for f in files)
    # 4. a damaged file is a miss (logged), inverted again and replaced
    path = cache.path(inversion_key(r, picture, PROMPT))
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="hpcwalk.render.invert"):
        redone = invert_image(r, picture, PROMPT, cache)
    assert not redone.cached and "unusable" in caplog.text
    assert torch.equal(redone.z_T, first.z_T)  # deterministic
    assert invert_image(r, picture, PROMPT, cache).cached


def test_invert_image_refuses_bad_settings(tiny, picture):
    with pytest.raises(ValueError, match='scheduler = "ddim"'):
        invert_image(_renderer(tiny, 4, scheduler="dpmsolver++"), picture, PROMPT)
    with pytest.raises(ValueError, match=r"1\.\.999"):  # SD's config: steps_offset 1, 1000 training steps
        invert_image(_renderer(tiny, 1000), picture, PROMPT)
    with pytest.raises(ValueError, match=r"refine"):
        invert_image(_renderer(tiny, 4), picture, PROMPT, refine=-1)
    with pytest.raises(ValueError, match="guidance"):
        invert_image(_renderer(tiny, 4), picture, PROMPT, guidance=float("nan"))


def test_encode_latent_matches_diffusers_preprocessing(tiny, picture):
    from diffusers.image_processor import VaeImageProcessor

    fitted = load_image(picture, SIZE, SIZE)
    x = VaeImageProcessor(vae_scale_factor=8).preprocess(Image.fromarray(fitted))  # (1, 3, H, W) in [-1, 1]
    with torch.no_grad():
        ref = tiny.vae.encode(x).latent_dist.mean * tiny.vae.config.scaling_factor
    torch.testing.assert_close(encode_latent(tiny, fitted[None]), ref, rtol=1e-5, atol=1e-6)


def test_psnr_matches_torchmetrics():
    from torchmetrics.image import PeakSignalNoiseRatio

    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    ref = PeakSignalNoiseRatio(data_range=255.0)(torch.from_numpy(b).double(), torch.from_numpy(a).double())
    assert abs(psnr(b, a) - float(ref)) < 1e-5  # torchmetrics returns float32
    assert psnr(a, a) == float("inf")
    with pytest.raises(ValueError, match="one shape"):
        psnr(a, a[:8])


# ---------------------------------------------------------------------------------------------
# loading images
# ---------------------------------------------------------------------------------------------


def _bands(width: int, height: int) -> np.ndarray:
    """Red | green | blue vertical bands, the middle one half the width."""
    img = np.zeros((height, width, 3), np.uint8)
    q = width // 4
    img[:, :q, 0] = 255
    img[:, q:width - q, 1] = 255
    img[:, width - q:, 2] = 255
    return img


def test_load_image_fits_by_centre_crop(tmp_path):
    wide = tmp_path / "wide.png"
    Image.fromarray(_bands(128, 64)).save(wide)
    out = load_image(wide, 32, 32)  # the centre square of the wide image: the green band only
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    inner = out[:, 2:-2]  # Lanczos reaches 2 output pixels past the crop box into the red and blue bands
    assert (inner[..., 1] > 250).all() and (inner[..., 0] < 5).all() and (inner[..., 2] < 5).all()
    out = load_image(wide, 16, 32)  # same aspect ratio: all three bands, only resized
    assert out[8, 2, 0] > 250 and out[8, 16, 1] > 250 and out[8, 29, 2] > 250
    tall = tmp_path / "tall.png"
    Image.fromarray(np.ascontiguousarray(_bands(128, 64).transpose(1, 0, 2))).save(tall)  # bands stacked
    out = load_image(tall, 24, 40)  # upscaled: the short side (64) fills 40, the middle of 128 kept
    assert out.shape == (24, 40, 3) and (out[..., 1] > 250).all()


def test_load_image_modes(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    out = load_image(tmp_path / "alpha.png", 8, 8)
    assert (out[:4] == [255, 0, 0]).all() and (out[4:] == [255, 255, 255]).all()  # composited over white
    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(tmp_path / "grey.png")
    assert (load_image(tmp_path / "grey.png", 8, 8) == 77).all()
    Image.fromarray(_bands(16, 8)).convert("P").save(tmp_path / "palette.gif")
    np.testing.assert_array_equal(load_image(tmp_path / "palette.gif", 8, 16), _bands(16, 8))
    # EXIF orientation 6: stored left half red, shown rotated 90 degrees clockwise (red on top)
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20, 0] = 255
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rotated.jpg", 40, 20)
    assert out[5, 10, 0] > 200 and out[35, 10, 0] < 50


def test_load_image_errors(tmp_path):
    cases = {}
    cases["missing"] = (tmp_path / "nope.png", "not found: check the path")
    (tmp_path / "notes.png").write_text("not pixels\n" * 20)
    cases["text"] = (tmp_path / "notes.png", "is not an image Pillow can read")
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "deep.png")  # mode I;16
    cases["mode"] = (tmp_path / "deep.png", "pixel mode 'I;16'")
    Image.fromarray(np.zeros((8, 8), np.float32), "F").save(tmp_path / "float.tiff")
    cases["float"] = (tmp_path / "float.tiff", "pixel mode 'F'")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:2000])
    cases["truncated"] = (tmp_path / "cut.png", "is damaged")
    for name, (path, match) in cases.items():
        with pytest.raises(ImageError, match=match) as e:
            load_image(path, 16, 16)
        assert "\n" not in str(e.value) and str(path.name) in str(e.value), name
        assert isinstance(e.value, ValueError)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="50x40 pixels, more than 1,000"):
        load_image(tmp_path / "big.png", 16, 16, max_pixels=1000)

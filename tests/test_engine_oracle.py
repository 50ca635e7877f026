"""The renderer against diffusers' StableDiffusionPipeline: same latents, prompt embeddings,
scheduler config and steps must give the same uint8 frame (max abs difference <= 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcwalk.render import interp
from hpcwalk.render.engine import Renderer, draw_noise, make_scheduler
from hpcwalk.job.spec import NoiseKey
from hpcwalk.job.plan import plan

BOUND = 1  # max abs difference on the uint8 image


@pytest.fixture(scope="module")
def renderer(tiny, tiny_job):
    return Renderer(tiny, tiny_job.sampling, batch_size=8)


@pytest.fixture(scope="module")
def pipe(tiny, tiny_job):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        scheduler=make_scheduler(tiny_job.sampling.scheduler, tiny.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def rendered(renderer, tiny_job):
    rows = plan(tiny_job)
    out = renderer.render(rows)
    return {r.frame_id: (r, img) for r, img in zip(out.rows, out.images)}


def _oracle_latent(row, hw):
    """z_T computed independently of the renderer: CPU generator, then the operator."""
    shape = (1, 4, *hw)
    za = draw_noise(NoiseKey(row.seed, row.draw), shape)[0]
    if row.kind in ("text", "prompts"):
        return za
    if row.kind == "std":
        return za * row.std
    zb = draw_noise(NoiseKey(row.seed_b, row.draw_b), shape)[0]
    if row.kind == "latent":
        return interp.interpolate(row.method, za, zb, [row.gamma])[0]
    if row.kind == "translate":
        return torch.cat([za, zb], dim=-1)[..., row.t : row.t + hw[1]]
    return torch.cat([zb[..., : row.t], za[..., row.t :]], dim=-1)  # mix


def _pipeline_frame(pipe, job, row, hw):
    s = job.sampling
    cond, uncond = pipe.encode_prompt(row.prompt, "cpu", 1, True, s.negative_prompt)
    if row.kind == "text":
        cond_b, _ = pipe.encode_prompt(row.prompt_b, "cpu", 1, True, s.negative_prompt)
        cond = interp.interpolate_text(row.method, cond[0], cond_b[0], [row.gamma])
    out = pipe(
        prompt_embeds=cond, negative_prompt_embeds=uncond, latents=_oracle_latent(row, hw)[None],
        num_inference_steps=s.steps, guidance_scale=s.guidance, height=s.height, width=s.width,
        output_type="np",
    ).images[0]
    return (out * 255).round().astype(np.uint8)


# one frame from inside every walk kind (not an endpoint, where possible)
PICKS = [
    "seeds/linear/00003", "seeds/normalized/00004", "seeds/slerp/00005", "keyframes/slerp/00006",
    "cat-to-dog/linear/00002", "cat-to-dog/slerp/00003", "slide/translate/00003", "columns/mix/00002",
    "std-sweep/std/00001", "one-latent/prompts/00002",
]


@pytest.mark.parametrize("frame_id", PICKS)
def test_frame_equals_diffusers_pipeline(frame_id, rendered, pipe, tiny_job):
    row, ours = rendered[frame_id]
    ref = _pipeline_frame(pipe, tiny_job, row, tiny_job.latent_hw)
    diff = np.abs(ours.astype(int) - ref.astype(int)).max()
    print(f"{frame_id}: max abs diff {diff}")
    assert ours.shape == ref.shape == (tiny_job.sampling.height, tiny_job.sampling.width, 3)
    assert ref.std() > 5, "oracle frame is flat: the comparison would be meaningless"
    assert diff <= BOUND


def test_prompt_embeddings_equal_pipeline_encode_prompt(renderer, pipe):
    cond, uncond = pipe.encode_prompt("A high resolution photo of a cat", "cpu", 1, True, "")
    assert torch.equal(renderer.encode_prompt("A high resolution photo of a cat"), cond[0])
    assert torch.equal(renderer.encode_prompt(""), uncond[0])


def test_batch_invariance(tiny, tiny_job, rendered):
    """Micro-batch 1 and 8 (with a padded last batch) give the same frames within the bound."""
    rows = [rendered[f][0] for f in PICKS[:5]]
    one = Renderer(tiny, tiny_job.sampling, batch_size=1).render(rows).images
    eight = np.stack([rendered[f][1] for f in PICKS[:5]])
    diff = np.abs(one.astype(int) - eight.astype(int)).max()
    print(f"batch 1 vs 8: max abs diff {diff}")
    assert diff <= BOUND


def test_padding_is_dropped_and_order_kept(tiny, tiny_job, rendered):
    rows = [rendered[f][0] for f in PICKS[:3]]
    out = Renderer(tiny, tiny_job.sampling, batch_size=2).render(rows)
    assert [r.frame_id for r in out.rows] == PICKS[:3]
    assert out.images.shape[0] == 3 and out.latent_norm.shape == (3,)


def test_noise_matches_diffusers_cpu_generator():
    """A CPU generator's randn in the latent shape, as diffusers' randn_tensor draws it."""
    from diffusers.utils.torch_utils import randn_tensor

    g = torch.Generator("cpu").manual_seed(7)
    ref = randn_tensor((1, 4, 8, 8), generator=g, device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(draw_noise(NoiseKey(7), (1, 4, 8, 8)), ref)
    ref2 = randn_tensor((1, 4, 8, 8), generator=g, device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(draw_noise(NoiseKey(7, 1), (1, 4, 8, 8)), ref2)


# -- SD 2.x: v-prediction (tiny-v: linear projections, 48-wide context, "!" padding, SD 2.1's scheduler) --------

V_PICKS = ["seeds/slerp/00005", "cat-to-dog/linear/00002", "one-latent/prompts/00002"]


@pytest.fixture(scope="module")
def tiny_v():
    from hpcwalk.sd.models import load_components

    return load_components("tiny-v", "float32", "cpu")


def test_v_prediction_frames_equal_diffusers_pipeline(tiny_v, tiny_job, rendered):
    """SD 2.x-v: the renderer on a v-prediction model vs StableDiffusionPipeline, same scheduler config."""
    from diffusers import StableDiffusionPipeline

    sched = make_scheduler(tiny_job.sampling.scheduler, tiny_v.scheduler_config)
    assert sched.config.prediction_type == "v_prediction"
    pipe = StableDiffusionPipeline(
        vae=tiny_v.vae, text_encoder=tiny_v.text_encoder, tokenizer=tiny_v.tokenizer, unet=tiny_v.unet,
        scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    rows = [rendered[f][0] for f in V_PICKS]
    ours = Renderer(tiny_v, tiny_job.sampling, batch_size=3).render(rows).images
    for row, img in zip(rows, ours):
        ref = _pipeline_frame(pipe, tiny_job, row, tiny_job.latent_hw)
        diff = np.abs(img.astype(int) - ref.astype(int)).max()
        print(f"tiny-v {row.frame_id}: max abs diff {diff}")
        assert ref.std() > 5 and diff <= BOUND


def test_v_prediction_fused_step_equals_scheduler_path(tiny_v, tiny_job, rendered):
    """The fused guidance + DPM-Solver++ step (torch reference here) on a v-prediction model."""
    from hpcwalk.sd.compile import CompileConfig

    rows = [rendered[f][0] for f in V_PICKS]
    plain = Renderer(tiny_v, tiny_job.sampling, batch_size=3).render(rows).images
    fused = Renderer(tiny_v, tiny_job.sampling, batch_size=3, compile=CompileConfig(step="fused")).render(rows).images
    diff = np.abs(plain.astype(int) - fused.astype(int)).max()
    print(f"tiny-v fused step vs scheduler: max abs diff {diff}")
    assert plain.std() > 5 and diff <= BOUND

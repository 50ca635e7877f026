"""On a CUDA device: compiled Triton kernels against their references, the fast renderer paths
(fused step and post-processing, CUDA graphs, cuDNN attention) against the plain path, and the
float16 NaN guard. Skipped, and reported as skipped, without CUDA (tests/conftest.py)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from hpcwalk.sd.compile import CompileConfig
from hpcwalk.core.errors import CompileError
from hpcwalk.render.engine import Renderer
from jobs import max_abs_diff, pick_rows

pytestmark = pytest.mark.gpu
BOUND = 1
PICKS = ["seeds/slerp/00005", "cat-to-dog/linear/00002", "std-sweep/std/00001", "slide/translate/00003"]


@pytest.fixture(scope="module")
def cuda_tiny():
    from hpcwalk.sd.models import load_components

    return load_components("tiny", "float32", "cuda")


@pytest.fixture(scope="module")
def rows(tiny_job):
    return pick_rows(tiny_job, PICKS)


@pytest.fixture(scope="module")
def plain(cuda_tiny, tiny_job, rows):
    return Renderer(cuda_tiny, tiny_job.sampling, batch_size=4).render(rows).images


# ---------------------------------------------------------------------------------------------
# kernels, compiled
# ---------------------------------------------------------------------------------------------


def test_postprocess_kernel_bit_equal_on_cuda():
    from hpcwalk.kernels import decode_postprocess as dp

    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        v = bits.view(dtype)
        v = v[~torch.isnan(v)][: 3 * 101 * 103].reshape(1, 3, 101, 103).cuda()
        out = dp.decode_postprocess(v)
        assert dp.decode_postprocess.last_path == "triton"
        assert torch.equal(out, dp.reference(v)), dtype
    x = torch.randn(5, 3, 131, 77, device="cuda") * 1.3
    assert torch.equal(dp.decode_postprocess(x), dp.reference(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_guided_step_kernel_on_cuda(dtype):
    from diffusers import DPMSolverMultistepScheduler

    from hpcwalk.kernels import guided_dpm as gd
    from hpcwalk.sd.models import SD14_SCHEDULER_CONFIG

    sched = DPMSolverMultistepScheduler.from_config(SD14_SCHEDULER_CONFIG)
    sched.set_timesteps(30)
    coef = gd.dpm_coefficients(sched, "cuda")
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(3, 4, 65, 63, device="cuda", generator=g)
    eps = torch.randn(6, 4, 65, 63, device="cuda", generator=g).to(dtype)
    prev = torch.randn_like(x)
    for step in (0, 1, 29):
        got = gd.guided_dpm_step(eps, x, prev, coef, step, 7.5, True)
        assert gd.guided_dpm_step.last_path == "triton"
        ref = gd.reference(eps, x, prev, coef, step, 7.5, True)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # FMA contraction only


# ---------------------------------------------------------------------------------------------
# renderer paths
# ---------------------------------------------------------------------------------------------


def test_fused_paths_equal_plain_path_on_cuda(cuda_tiny, tiny_job, rows, plain):
    speed = CompileConfig(step="fused", postprocess="fused")
    out = Renderer(cuda_tiny, tiny_job.sampling, batch_size=4, compile=speed).render(rows).images
    d = max_abs_diff(out, plain)
    print(f"fused (triton) vs plain, float32 CUDA: max abs diff {d}")
    assert plain.std() > 5 and d <= BOUND


def test_cuda_graphs_renderer_equals_plain(cuda_tiny, tiny_job, rows, plain):
    """reduce-overhead: CUDA graph replays; outputs are consumed or cloned before the next replay."""
    r = Renderer(cuda_tiny, tiny_job.sampling, batch_size=4, compile=CompileConfig(mode="reduce-overhead"))
    first = r.render(rows).images
    second = r.render(rows).images  # replays, no recompilation
    assert max_abs_diff(first, plain) <= BOUND and max_abs_diff(second, first) == 0


def test_float16_render_has_finite_frames_and_guard_column(tiny_job, rows):
    from hpcwalk.sd.models import load_components

    half = load_components("tiny", "float16", "cuda")
    out = Renderer(half, tiny_job.sampling, batch_size=4, compile=CompileConfig(step="fused")).render(rows)
    assert out.images.std() > 5
    assert len(out.extra["vae_fp32_redecode"]) == len(rows)


def test_nan_guard_on_cuda(tiny_job):
    from hpcwalk.sd.models import load_components

    c = load_components("tiny", "float32", "cuda")
    vae = copy.deepcopy(c.vae)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(3000.0)
    half = dataclasses.replace(c, vae=copy.deepcopy(vae).half(), unet=copy.deepcopy(c.unet).half(), dtype=torch.float16)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)).cuda()
    z[1] *= 30
    frames, bad = Renderer(half, tiny_job.sampling, 3).decode_guarded(z)
    assert bad.tolist() == [False, True, False]
    ref = Renderer(dataclasses.replace(c, vae=vae), tiny_job.sampling, 3).decode(z)
    assert max_abs_diff(frames.cpu().numpy(), ref.cpu().numpy()) <= BOUND


# ---------------------------------------------------------------------------------------------
# attention backends: usable or a clear error
# ---------------------------------------------------------------------------------------------


def test_cudnn_attention_on_hopper():
    name = torch.cuda.get_device_name()
    if any(h in name for h in ("H100", "H200")):
        CompileConfig(attention="cudnn").check(torch.device("cuda"))  # must not raise on Hopper
    else:
        try:
            CompileConfig(attention="cudnn").check(torch.device("cuda"))
        except CompileError as e:
            assert "attention 'cudnn'" in str(e)


def test_cudnn_attention_renders_and_decodes_sd14_vae_attention(tiny_job, rows):
    """attention = 'cudnn' (float16: cuDNN attention has no float32 kernel) renders like SDPA, and the
    SD 1.4 VAE's 512-wide attention head, which cuDNN cannot run, decodes on the default SDPA choice
    instead of failing ("No available kernel", seen on an H200 on 2026-11-26 before the fix)."""
    from diffusers import AutoencoderKL

    from hpcwalk.sd.models import PRESETS, load_components

    name = torch.cuda.get_device_name()
    if not any(h in name for h in ("H100", "H200")):
        pytest.skip(f"cuDNN attention is checked on Hopper only, not {name}")
    half = load_components("tiny", "float16", "cuda")
    sdpa = Renderer(half, tiny_job.sampling, batch_size=4).render(rows).images
    cudnn = Renderer(half, tiny_job.sampling, batch_size=4, compile=CompileConfig(attention="cudnn")).render(rows).images
    mean_diff = float(np.abs(cudnn.astype(float) - sdpa.astype(float)).mean())
    print(f"cudnn vs sdpa attention, float16: mean abs diff {mean_diff:.3f}, max {max_abs_diff(cudnn, sdpa)}")
    assert cudnn.std() > 5 and mean_diff < 1.0  # different reduction orders in fp16: small, not bit-equal
    vae = AutoencoderKL(**PRESETS["sd14-random"]["vae"]).to("cuda", torch.float16).eval()
    r = Renderer(dataclasses.replace(half, vae=vae), tiny_job.sampling, batch_size=1, compile=CompileConfig(attention="cudnn"))
    with torch.no_grad():
        img = r.speed.vae_decode(torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float16))
    assert img.shape == (1, 3, 512, 512) and torch.isfinite(img).all()


def test_xformers_is_usable_or_a_clear_error():
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(CompileError, match="xformers does not import"):
            CompileConfig(attention="xformers").check(torch.device("cuda"))
        return
    try:
        CompileConfig(attention="xformers").check(torch.device("cuda"))
    except CompileError as e:
        assert "xformers" in str(e) and "sdpa" in str(e)


# ---------------------------------------------------------------------------------------------
# round 2: every exact lever on CUDA, the memory estimate, the FP8 path
# ---------------------------------------------------------------------------------------------


def test_every_exact_lever_on_cuda_equals_plain(tiny_job, rows):
    """The CUDA-only levers (CUDA graphs, cudnn_benchmark) with the others (inductor tunings,
    channels_last, fused QKV, UNet + VAE + CLIP compiled): frames within 1 level of the plain path,
    replays equal, cudnn.benchmark restored. TF32 is off for both renders (cuDNN's float32 default is
    TF32, whose noise would be measured instead of the levers')."""
    from hpcwalk.render.clip import load_clip
    from hpcwalk.sd.models import load_components

    levers = CompileConfig(mode="reduce-overhead", scope="unet+vae+clip", channels_last=True, fuse_qkv=True,
                           cudnn_benchmark=True, inductor="conv1x1-mm+coordinate-descent+no-epilogue-fusion")
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
        plain = Renderer(load_components("tiny", "float32", "cuda"), tiny_job.sampling, batch_size=4).render(rows).images
        r = Renderer(load_components("tiny", "float32", "cuda"), tiny_job.sampling, batch_size=4, compile=levers,
                     scorers=[load_clip("tiny-clip", "none", "cuda")])
        first, second = r.render(rows), r.render(rows)
        assert torch.backends.cudnn.benchmark is False
    d = max_abs_diff(first.images, plain)
    print(f"every exact lever (CUDA graphs, cudnn_benchmark, ...) vs plain, float32 CUDA: max abs diff {d}")
    assert plain.std() > 5 and d <= BOUND and max_abs_diff(second.images, first.images) == 0
    assert r.scorers[0].image_encoder is not None and len(first.extra["clip_score"]) == len(rows)


def test_memory_estimate_covers_the_renders_peak(tiny_job, rows):
    """The batch check's estimate (hpcwalk/sd/memory.py) against what the CUDA allocator saw while a micro-batch
    of 8 frames rendered at 512x512: not below it, and not wildly above (within 2x)."""
    from hpcwalk.sd.memory import estimate
    from hpcwalk.sd.models import load_components

    c = load_components("tiny", "float32", "cuda")
    s = dataclasses.replace(tiny_job.sampling, height=512, width=512, steps=2)
    est = estimate(c, 8, 512, 512, cfg=True, free=(1 << 40, "test"))
    r = Renderer(c, s, batch_size=8)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    r.render((rows * 2)[:8])
    peak = torch.cuda.max_memory_allocated() - base
    print(f"render peak {peak / 2**20:.1f} MiB, estimate {est.need(8) / 2**20:.1f} MiB")
    assert peak <= est.need(8) <= 2 * peak


def test_fp8_path_renders_on_hopper_or_is_refused_in_one_line(tiny_job, rows):
    """Where FP8 can run (compute capability >= 8.9 and torchao >= 0.18), the UNet's Linear layers are
    converted and the frames stay close to bfloat16's; elsewhere the refusal is the one the check names."""
    from hpcwalk.bench.quality import frame_quality
    from hpcwalk.sd.fp8 import fp8_problem, torchao_version
    from hpcwalk.sd.models import load_components

    config = CompileConfig(quantize="fp8-rowwise")
    problem = fp8_problem("fp8-rowwise", "cuda", torch.cuda.get_device_capability(), torchao_version())
    if problem:
        with pytest.raises(CompileError) as e:
            Renderer(load_components("tiny", "bfloat16", "cuda"), tiny_job.sampling, batch_size=4, compile=config)
        assert str(e.value) == problem
        return
    bf16 = Renderer(load_components("tiny", "bfloat16", "cuda"), tiny_job.sampling, batch_size=4).render(rows).images
    r = Renderer(load_components("tiny", "bfloat16", "cuda"), tiny_job.sampling, batch_size=4, compile=config)
    out = r.render(rows).images
    q = frame_quality(bf16, out)
    print(f"fp8-rowwise vs bfloat16 (tiny, random weights): {r.speed.quantized_layers} layers, {q}")
    assert r.speed.quantized_layers == 50 and out.std() > 5 and q["max_abs_diff"] > 0  # really another path
    assert q["psnr_db"] > 15  # loose: random weights; the benchmark measures the real cost on sd14 at 512x512

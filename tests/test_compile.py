"""Speed options: validation and clear errors, the fused step and post-processing in the renderer,
a torch.compile'd renderer, and the float16 NaN guard, each against the eager float32 path within the
core bound (max abs difference <= 1 on uint8 frames), on the tiny model on the CPU."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from hpcwalk.compile import CompileConfig, CompileError, prepare
from hpcwalk.engine import Renderer
from hpcwalk.job import JobError, parse_job
from hpcwalk.kernels.guided_dpm import guided_dpm_step
from jobs import max_abs_diff, pick_rows

BOUND = 1
PICKS = ["seeds/slerp/00005", "cat-to-dog/linear/00002", "std-sweep/std/00001"]


@pytest.fixture(scope="module")
def rows(tiny_job):
    return pick_rows(tiny_job, PICKS)


@pytest.fixture(scope="module")
def eager(tiny, tiny_job, rows):
    """Frames of the default path: diffusers' scheduler.step, torch post-processing (checked against
    StableDiffusionPipeline in test_engine_oracle.py)."""
    return Renderer(tiny, tiny_job.sampling, batch_size=3).render(rows).images


# ---------------------------------------------------------------------------------------------
# validation: one clear line, never a silent fallback
# ---------------------------------------------------------------------------------------------

_WALK = [{"kind": "std", "prompt": "a cat", "seed": 1, "frames": 2}]


@pytest.mark.parametrize("table,match", [
    ({"mode": "max_autotune"}, r"\[compile\] mode: unknown value 'max_autotune' \(did you mean 'max-autotune'\?\)"),
    ({"attention": "flash"}, r"\[compile\] attention: unknown value 'flash'"),
    ({"step": "fused2"}, r"\[compile\] step: unknown value"),
    ({"fuse_qkv": True, "attention": "xformers"}, r"fuse_qkv = true needs attention 'sdpa' or 'cudnn'"),
    ({"channels_last": "yes"}, r"\[compile\] channels_last must be bool"),
    ({"modes": "default"}, r"unknown key 'modes' in \[compile\] \(did you mean 'mode'\?\)"),
])
def test_bad_compile_table_is_a_job_error(table, match):
    with pytest.raises(JobError, match=match):
        parse_job({"compile": table, "walk": _WALK})


def test_fused_step_needs_dpm_solver():
    with pytest.raises(JobError, match="step = 'fused' implements DPM-Solver\\+\\+ only.*'ddim'"):
        parse_job({"compile": {"step": "fused"}, "sampling": {"scheduler": "ddim"}, "walk": _WALK})


def test_compile_options_do_not_change_the_fingerprint():
    plain = parse_job({"walk": _WALK})
    fast = parse_job({"compile": {"mode": "default", "step": "fused"}, "walk": _WALK})
    assert fast.compile.mode == "default" and plain.fingerprint() == fast.fingerprint()
    assert plain.with_overrides(compile_mode="max-autotune", attention="cudnn", dtype="float16").compile.attention == "cudnn"
    with pytest.raises(JobError, match="mode: unknown value 'fast'"):
        plain.with_overrides(compile_mode="fast")


def test_xformers_unusable_here_is_a_clear_error(tiny):
    """xformers is not installed on the CPU machines (and needs CUDA): an error, not sdpa in disguise."""
    with pytest.raises(CompileError, match=r"attention 'xformers'.*use attention = 'sdpa'") as e:
        CompileConfig(attention="xformers").check("cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(CompileError, match="xformers"):
        Renderer(tiny, parse_job({"walk": _WALK}).sampling, compile=CompileConfig(attention="xformers"))


@pytest.mark.parametrize("config,match", [
    (CompileConfig(attention="cudnn"), r"attention 'cudnn' needs a CUDA device"),
    (CompileConfig(mode="reduce-overhead"), r"'reduce-overhead' replays CUDA graphs and needs a CUDA device"),
])
def test_cuda_only_choices_refused_on_cpu(config, match):
    with pytest.raises(CompileError, match=match):
        config.check(torch.device("cpu"))


def test_cudnn_attention_in_float32_is_refused():
    """cuDNN attention has no float32 kernel: refused with the fix named, in the job and at prepare time."""
    msg = r"attention 'cudnn' needs \[render\] dtype 'float16' or 'bfloat16'"
    with pytest.raises(CompileError, match=msg):
        CompileConfig(attention="cudnn").check("cpu", dtype=torch.float32)  # before the device check
    with pytest.raises(JobError, match=msg):
        parse_job({"compile": {"attention": "cudnn"}, "walk": _WALK})  # [render] dtype defaults to float32
    assert parse_job({"render": {"dtype": "float16"}, "compile": {"attention": "cudnn"}, "walk": _WALK}).compile.attention == "cudnn"
    job = parse_job({"render": {"dtype": "float16"}, "compile": {"attention": "cudnn"}, "walk": _WALK})
    with pytest.raises(JobError, match=msg):
        job.with_overrides(dtype="float32")


def test_cudnn_attention_restricts_the_unet_only(tiny, monkeypatch):
    """cuDNN has no kernel for the VAE's one 512-wide attention head ("No available kernel" on an
    H200): `cudnn` restricts the UNet's SDPA calls and leaves the VAE decode on torch's default
    choice. On this CPU a cuDNN-only SDPA call has no kernel at all, which makes the split visible."""
    import hpcwalk.compile as hc

    monkeypatch.setattr(hc, "check_cudnn_attention", lambda device: None)  # the device check needs CUDA
    monkeypatch.setattr(hc.CompileConfig, "problems", lambda self, *a: [])  # and so does float16 (tiny is float32 here)
    speed = prepare(CompileConfig(attention="cudnn"), tiny)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert speed.vae_decode(z).shape == (1, 3, 64, 64)  # not restricted: runs
        x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 77, tiny.unet.config.cross_attention_dim)
        with pytest.raises(RuntimeError, match="No available kernel|No viable backend"):  # cuDNN only: none here
            speed.unet(x, torch.tensor(500), encoder_hidden_states=emb, return_dict=False)


def test_cli_refuses_unusable_attention_before_writing(tmp_path):
    from typer.testing import CliRunner

    from hpcwalk.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["render", "examples/quickstart.toml", "--out", str(out), "--device", "cpu",
                                   "--attention", "xformers", "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "attention 'xformers'" in res.output and not out.exists()
    res = CliRunner().invoke(app, ["render", "examples/quickstart.toml", "--out", str(out), "--compile", "turbo"])
    assert res.exit_code == 2 and "[compile] mode: unknown value 'turbo'" in res.output and not out.exists()


# ---------------------------------------------------------------------------------------------
# the fast paths give the same frames
# ---------------------------------------------------------------------------------------------


def test_fused_step_equals_scheduler_path(tiny, tiny_job, rows, eager, monkeypatch):
    """Guidance + DPM-Solver++ in one op (torch reference on this CPU) vs diffusers' scheduler.step."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = Renderer(tiny, tiny_job.sampling, batch_size=3, compile=CompileConfig(step="fused")).render(rows)
    assert guided_dpm_step.last_path == "torch"
    d = max_abs_diff(out.images, eager)
    print(f"fused step (torch path) vs scheduler: max abs diff {d}")
    assert eager.std() > 5 and d <= BOUND


def test_fused_kernels_in_the_interpreter_equal_scheduler_path(tiny, tiny_job, rows, eager, monkeypatch):
    """The Triton kernels themselves (Triton's interpreter), inside the renderer, 30 steps."""
    from hpcwalk.kernels.decode_postprocess import decode_postprocess

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    speed = CompileConfig(step="fused", postprocess="fused")
    out = Renderer(tiny, tiny_job.sampling, batch_size=3, compile=speed).render(rows)
    assert guided_dpm_step.last_path == "interpreter" and decode_postprocess.last_path == "interpreter"
    d = max_abs_diff(out.images, eager)
    print(f"fused step + post-processing (interpreter) vs scheduler: max abs diff {d}")
    assert d <= BOUND


def test_fused_step_without_guidance(tiny, tiny_job, rows):
    sampling = dataclasses.replace(tiny_job.sampling, guidance=1.0, steps=12)  # no CFG; < 15 steps
    a = Renderer(tiny, sampling, batch_size=3).render(rows).images
    b = Renderer(tiny, sampling, batch_size=3, compile=CompileConfig(step="fused")).render(rows).images
    assert max_abs_diff(a, b) <= BOUND


def test_compiled_renderer_equals_eager(tiny, tiny_job, rows):
    """torch.compile (default mode, inductor's CPU backend) of the UNet; the VAE stays eager, which
    keeps compile time in check on 2 cores (compiling it too is measured in benchmarks/)."""
    sampling = dataclasses.replace(tiny_job.sampling, steps=8)
    base = Renderer(tiny, sampling, batch_size=3).render(rows).images
    r = Renderer(tiny, sampling, batch_size=3, compile=CompileConfig(mode="default", scope="unet"))
    assert r.speed.unet is not tiny.unet  # really wrapped
    out = r.render(rows)
    d = max_abs_diff(out.images, base)
    print(f"compiled (default, unet) vs eager: max abs diff {d}; render incl. compile {out.timings['render_s']:.1f} s")
    assert base.std() > 5 and d <= BOUND


def test_prepare_leaves_modules_alone_by_default(tiny):
    speed = prepare(CompileConfig(), tiny)
    assert speed.unet is tiny.unet and not speed.cuda_graphs
    assert {type(p).__name__ for p in tiny.unet.attn_processors.values()} == {"AttnProcessor2_0"}


# ---------------------------------------------------------------------------------------------
# the NaN guard
# ---------------------------------------------------------------------------------------------


def test_nan_guard_redecodes_overflowing_frames_in_float32(tiny, tiny_job):
    """A float16 VAE whose activations overflow (65504) for large latents: those frames, and only
    those, are decoded again by a float32 copy and match the float32 decode."""
    vae = copy.deepcopy(tiny.vae)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(3000.0)
    half = dataclasses.replace(tiny, vae=copy.deepcopy(vae).half(), unet=copy.deepcopy(tiny.unet).half(),
                               dtype=torch.float16)  # fp16 on the CPU: only to exercise the guard
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    z[1] *= 30
    frames, redecoded = Renderer(half, tiny_job.sampling, 3).decode_guarded(z)
    assert redecoded.tolist() == [False, True, False]
    raw = half.vae.decode(z.half() / 0.18215, return_dict=False)[0]
    assert not torch.isfinite(raw[1]).all(), "the fp16 decode did not overflow: the test proves nothing"
    ref = Renderer(dataclasses.replace(tiny, vae=vae), tiny_job.sampling, 3).decode(z)
    assert max_abs_diff(frames.numpy(), ref.numpy()) <= BOUND


def test_render_records_the_guard_column(tiny, tiny_job, rows):
    out = Renderer(tiny, dataclasses.replace(tiny_job.sampling, steps=2), batch_size=2).render(rows)
    col = out.extra["vae_fp32_redecode"]
    assert len(col) == len(rows) and col.to_pylist() == [False] * len(rows)

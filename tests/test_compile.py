"""Speed options: validation and clear errors, the fused step and post-processing in the renderer,
a torch.compile'd renderer, and the float16 NaN guard, each against the eager float32 path within the
core bound (max abs difference <= 1 on uint8 frames), on the tiny model on the CPU."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from hpcwalk.sd.compile import CompileConfig, prepare
from hpcwalk.core.errors import CompileError
from hpcwalk.render.engine import Renderer
from hpcwalk.core.errors import JobError
from hpcwalk.job.parse import parse_job
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
    ({"mode": "default", "inductor": "conv1x1mm"}, r"\[compile\] inductor: unknown setting 'conv1x1mm' \(did you mean 'conv1x1-mm'\?\)"),
    ({"mode": "default", "inductor": "conv1x1-mm+conv1x1-mm"}, r"names a setting twice"),
    ({"inductor": "coordinate-descent"}, r"inductor = 'coordinate-descent' tunes torch.compile, but mode is 'none'"),
    ({"cudnn_benchmark": 1}, r"\[compile\] cudnn_benchmark must be bool"),
    ({"quantize": "int8"}, r"\[compile\] quantize: unknown value 'int8'; choose one of none, fp8, fp8-rowwise"),
    ({"quantize": "fp8"}, r"quantize = 'fp8' is a reduced-precision path: set \[render\] dtype 'bfloat16' or 'float16'"),
])
def test_bad_compile_table_is_a_job_error(table, match):
    with pytest.raises(JobError, match=match):
        parse_job({"compile": table, "walk": _WALK})


def test_fp8_rowwise_needs_bfloat16():
    with pytest.raises(JobError, match=r"'fp8-rowwise' needs \[render\] dtype 'bfloat16'"):
        parse_job({"render": {"dtype": "float16"}, "compile": {"quantize": "fp8-rowwise"}, "walk": _WALK})
    job = parse_job({"render": {"dtype": "bfloat16"}, "compile": {"quantize": "fp8-rowwise"}, "walk": _WALK})
    assert job.compile.quantize == "fp8-rowwise"


def test_fused_step_needs_dpm_solver():
    with pytest.raises(JobError, match="step = 'fused' implements DPM-Solver\\+\\+ only.*'ddim'"):
        parse_job({"compile": {"step": "fused"}, "sampling": {"scheduler": "ddim"}, "walk": _WALK})


def test_compile_options_do_not_change_the_fingerprint():
    plain = parse_job({"walk": _WALK})
    fast = parse_job({"compile": {"mode": "max-autotune-no-cudagraphs", "step": "fused", "channels_last": True,
                                  "fuse_qkv": True, "cudnn_benchmark": True, "scope": "unet+vae+clip",
                                  "inductor": "conv1x1-mm+coordinate-descent+no-epilogue-fusion"}, "walk": _WALK})
    assert fast.compile.mode == "max-autotune-no-cudagraphs" and plain.fingerprint() == fast.fingerprint()
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


def test_fp8_path_is_part_of_the_fingerprint_and_the_metadata():
    """FP8 frames are not the exact frames: a run rendered with it is another run (resume refuses to mix
    them), and every shard's metadata says so with the library that made them."""
    from hpcwalk.store.schema import run_metadata

    bf16 = parse_job({"render": {"dtype": "bfloat16"}, "walk": _WALK})
    fp8 = parse_job({"render": {"dtype": "bfloat16"}, "compile": {"quantize": "fp8"}, "walk": _WALK})
    assert bf16.fingerprint() != fp8.fingerprint()
    assert run_metadata(bf16)["quantize"] == "none"
    note = run_metadata(fp8)["quantize"]
    assert note.startswith("fp8: torchao ") and "per-tensor" in note and "not exact" in note


@pytest.mark.parametrize("config,match", [
    (CompileConfig(attention="cudnn"), r"attention 'cudnn' needs a CUDA device"),
    (CompileConfig(mode="reduce-overhead"), r"'reduce-overhead' replays CUDA graphs and needs a CUDA device"),
    (CompileConfig(mode="max-autotune"), r"mode 'max-autotune' replays CUDA graphs.*use mode 'max-autotune-no-cudagraphs'"),
    (CompileConfig(cudnn_benchmark=True), r"cudnn_benchmark = true tunes cuDNN convolutions and needs a CUDA device"),
    (CompileConfig(quantize="fp8"), r"quantize = 'fp8' runs FP8 matmuls on a CUDA GPU with compute capability >= 8.9"),
])
def test_cuda_only_choices_refused_on_cpu(config, match):
    with pytest.raises(CompileError, match=match):
        config.check(torch.device("cpu"))


def test_max_autotune_marks_cuda_graph_steps():
    """max-autotune replays CUDA graphs like reduce-overhead (inductor's mode options), so the renderer
    must mark each step for both; it marked reduce-overhead only."""
    assert CompileConfig(mode="max-autotune").cuda_graphs and CompileConfig(mode="reduce-overhead").cuda_graphs
    assert not CompileConfig(mode="max-autotune-no-cudagraphs").cuda_graphs and not CompileConfig(mode="default").cuda_graphs
    from torch._inductor import list_mode_options

    for mode in ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"):
        assert CompileConfig(mode=mode).cuda_graphs == bool(list_mode_options(mode).get("triton.cudagraphs")), mode


def test_inductor_settings_are_this_compile_options():
    """The `inductor` tunings are passed to torch.compile with the mode's own options, not set globally."""
    c = CompileConfig(mode="max-autotune-no-cudagraphs", inductor="conv1x1-mm+no-epilogue-fusion")
    assert c.inductor_options() == {"max_autotune": True, "coordinate_descent_tuning": True,
                                    "conv_1x1_as_mm": True, "epilogue_fusion": False}
    assert CompileConfig(mode="reduce-overhead", inductor="coordinate-descent").inductor_options() == {
        "triton.cudagraphs": True, "coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True}
    assert CompileConfig().inductor_options() == {}


def test_fp8_refusals_name_the_fix():
    """The FP8 path's decision on each kind of machine (the CUDA cases cannot happen on this CPU, so the
    decision is checked on their figures; the CPU case is also checked for real above)."""
    from hpcwalk.sd.fp8 import fp8_problem

    assert "not on cpu: set quantize = 'none'" in fp8_problem("fp8", "cpu", (0, 0), "0.18.0")
    assert "this GPU has 8.0" in fp8_problem("fp8", "cuda", (8, 0), "0.18.0")  # A100: no FP8 tensor cores
    assert "not installed: pip install 'hpcwalk[fp8]'" in fp8_problem("fp8", "cuda", (9, 0), None)
    assert "found 0.17.0: pip install -U 'torchao>=0.18'" in fp8_problem("fp8", "cuda", (9, 0), "0.17.0")
    assert fp8_problem("fp8-rowwise", "cuda", (8, 9), "0.18.0+cu130") is None  # L4 / L40S
    assert fp8_problem("fp8", "cuda", (9, 0), "0.19.1") is None  # H100 / H200


def test_cli_refuses_fp8_on_the_cpu_before_writing(tmp_path):
    from typer.testing import CliRunner

    from hpcwalk.cli import app

    job = tmp_path / "job.toml"
    text = open("examples/quickstart.toml").read().replace('dtype = "float32"', 'dtype = "bfloat16"')
    job.write_text(text.replace("[output]", '[compile]\nquantize = "fp8"\n\n[output]'))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["render", str(job), "--out", str(out), "--device", "cpu", "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "error: [compile] quantize = 'fp8' runs FP8 matmuls on a CUDA GPU" in res.output and not out.exists()
    assert len(res.output.strip().splitlines()) == 1


def test_cudnn_benchmark_is_on_during_calls_and_restored(tiny, monkeypatch):
    """cudnn_benchmark sets torch.backends.cudnn.benchmark for the UNet and VAE calls only (checked from
    inside the modules) and restores it after each, also when the call fails."""
    import hpcwalk.sd.compile as hc

    monkeypatch.setattr(hc.CompileConfig, "check", lambda self, *a: None)  # the device check needs CUDA
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(torch.backends.cudnn.benchmark))
             for m in (tiny.unet, tiny.vae.decoder)]
    try:
        assert torch.backends.cudnn.benchmark is False
        speed = prepare(CompileConfig(cudnn_benchmark=True), tiny)
        with torch.no_grad():
            speed.vae_decode(torch.randn(1, 4, 8, 8))
            speed.unet(torch.randn(2, 4, 8, 8), torch.tensor(500), encoder_hidden_states=torch.randn(2, 77, 32),
                       return_dict=False)
            assert seen == [True, True] and torch.backends.cudnn.benchmark is False
            with pytest.raises(RuntimeError):
                speed.vae_decode(torch.randn(1, 3, 8, 8))  # wrong channels: fails inside the call
        assert torch.backends.cudnn.benchmark is False
    finally:
        for h in hooks:
            h.remove()


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
    import hpcwalk.sd.compile as hc

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


@pytest.mark.slow
def test_every_exact_compile_lever_together_equals_eager(tiny, tiny_job, rows):
    """torch.compile (max-autotune-no-cudagraphs, inductor's CPU backend) of the UNet, VAE decode and the
    CLIP image encoder, with the inductor tunings for UNets, channels_last and fused QKV, all in one
    compile (compiling is what costs time on 2 cores): frames within 1 uint8 level of the eager path, CLIP
    embeddings and scores within float noise; torch's global inductor config is left as it was. The
    CUDA-only levers (CUDA graphs, cudnn_benchmark) are checked the same way in tests/test_gpu.py."""
    import torch._inductor.config as inductor_config

    from hpcwalk.render.clip import load_clip

    before = inductor_config.get_config_copy()
    sampling = dataclasses.replace(tiny_job.sampling, steps=8)
    scorers = [load_clip("tiny-clip", "none")]
    base = Renderer(tiny, sampling, batch_size=3, scorers=scorers).render(rows)
    own = dataclasses.replace(tiny, unet=copy.deepcopy(tiny.unet), vae=copy.deepcopy(tiny.vae))  # modules change in place
    levers = CompileConfig(mode="max-autotune-no-cudagraphs", scope="unet+vae+clip", channels_last=True, fuse_qkv=True,
                           inductor="conv1x1-mm+coordinate-descent+no-epilogue-fusion")
    r = Renderer(own, sampling, batch_size=3, scorers=scorers, compile=levers)
    assert r.speed.unet is not own.unet and r.scorers[0].image_encoder is not None  # really wrapped
    assert own.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert {type(p).__name__ for p in own.unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    out = r.render(rows)
    d = max_abs_diff(out.images, base.images)
    print(f"every exact lever vs eager: max abs diff {d}; render incl. compile {out.timings['render_s']:.1f} s")
    assert base.images.std() > 5 and d <= BOUND
    emb = lambda o: np.stack(o.extra["clip_image"].to_numpy(zero_copy_only=False)).astype(np.float32)  # noqa: E731
    np.testing.assert_allclose(emb(out), emb(base), atol=2e-3)  # float16 column
    np.testing.assert_allclose(out.extra["clip_score"].to_numpy(), base.extra["clip_score"].to_numpy(), atol=0.01)
    assert inductor_config.get_config_copy() == before


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

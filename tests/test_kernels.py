"""Each kernel against its torch reference under Triton's interpreter (TRITON_INTERPRET=1, CPU),
at odd shapes with a tolerance per dtype; the dispatch reports which path ran; the DPM-Solver++
coefficient table reproduces diffusers' scheduler.step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcwalk.kernels import decode_postprocess as dp
from hpcwalk.kernels import guided_dpm as gd
from hpcwalk.kernels._dispatch import HAVE_TRITON, KernelUnavailable

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (ships with torch's CUDA wheels)")

# tolerance of the fused step vs its reference, by the dtype of eps (both compute in float32 from the
# same inputs; only FMA contraction and operation order differ)
STEP_TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


@pytest.fixture
def interpret(monkeypatch):
    """Run kernels in Triton's interpreter for this test only (read at call time by the dispatch)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def no_interpret(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _engine_postprocess(img: torch.Tensor) -> torch.Tensor:
    """The renderer's decode post-processing as it was written before the kernel existed."""
    img = (img.float() / 2 + 0.5).clamp(0, 1)
    return (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------------
# decode post-processing: bit-equal
# ---------------------------------------------------------------------------------------------


def _all_finite_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype, plus +-inf, as a (2, 3, H, W)-shaped tensor (odd W)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    v = bits.view(dtype)
    v = v[~torch.isnan(v)]
    n = 2 * 3 * 97 * 113
    v = torch.cat([v, v[: n - v.numel()]]) if v.numel() < n else v[:n]
    return v.reshape(2, 3, 97, 113)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_postprocess_bit_equal_on_every_16bit_value(interpret, dtype):
    img = _all_finite_values(dtype)
    out = dp.decode_postprocess(img)
    assert dp.decode_postprocess.last_path == "interpreter"
    assert out.shape == (2, 97, 113, 3) and out.dtype == torch.uint8
    assert torch.equal(out, _engine_postprocess(img))


def test_postprocess_bit_equal_float32_random_and_edges(interpret):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 3, 37, 29, generator=g) * 1.2  # odd shape, values past [-1, 1] too
    edge = torch.tensor([float("inf"), -float("inf"), 1.0, -1.0, 0.0, -0.0, 1e-40, 2.0 / 255 - 1])
    img.view(-1)[: edge.numel()] = edge
    # exact rounding ties after scaling: x such that (x / 2 + 0.5) * 255 lands on k + 0.5
    k = torch.arange(0, 255, dtype=torch.float32) + 0.5
    ties = (k / 255 - 0.5) * 2
    img.view(-1)[100 : 100 + ties.numel()] = ties
    out = dp.decode_postprocess(img)
    ref = _engine_postprocess(img)
    assert torch.equal(out, ref), f"{(out.int() - ref.int()).abs().max()} levels apart"
    assert torch.equal(dp.reference(img), ref)


def test_postprocess_single_pixel_and_empty(interpret):
    one = torch.tensor([[[[0.3]], [[-0.7]], [[0.99]]]])  # (1, 3, 1, 1)
    assert torch.equal(dp.decode_postprocess(one), _engine_postprocess(one))
    empty = torch.zeros(0, 3, 5, 7)
    assert dp.decode_postprocess(empty).shape == (0, 5, 7, 3)


def test_dispatch_reports_torch_path_without_interpreter(no_interpret):
    img = torch.randn(1, 3, 5, 7)
    out = dp.decode_postprocess(img)
    assert dp.decode_postprocess.last_path == "torch"
    assert torch.equal(out, _engine_postprocess(img))


def test_explicit_triton_path_on_cpu_is_an_error(no_interpret):
    with pytest.raises(KernelUnavailable, match="cannot run here"):
        dp.decode_postprocess(torch.randn(1, 3, 5, 7), path="triton")
    with pytest.raises(KernelUnavailable, match="TRITON_INTERPRET=1"):
        dp.decode_postprocess(torch.randn(1, 3, 5, 7), path="interpreter")


def test_dispatch_logs_the_path(interpret, caplog):
    import logging

    op = dp.KernelOp("probe_op", dp._launch, dp.reference)
    with caplog.at_level(logging.INFO, logger="hpcwalk.kernels"):
        op(torch.randn(1, 3, 3, 3))
    assert "probe_op: running the interpreter path" in caplog.text


# ---------------------------------------------------------------------------------------------
# guided DPM-Solver++ step
# ---------------------------------------------------------------------------------------------


def _dpm_scheduler(steps: int, **config):
    from diffusers import DPMSolverMultistepScheduler

    from hpcwalk.sd.models import SD14_SCHEDULER_CONFIG

    sched = DPMSolverMultistepScheduler.from_config({**SD14_SCHEDULER_CONFIG, **config})
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [True, False])
def test_guided_step_kernel_equals_reference(interpret, dtype, cfg):
    g = torch.Generator().manual_seed(1)
    shape = (3, 4, 9, 7)  # odd sizes, 756 elements: not a multiple of the block
    eps = torch.randn((6 if cfg else 3, *shape[1:]), generator=g).to(dtype)
    x = torch.randn(shape, generator=g)
    prev = torch.randn(shape, generator=g)
    coef = gd.dpm_coefficients(_dpm_scheduler(30))
    for step in (0, 1, 17, 29):
        got = gd.guided_dpm_step(eps, x, prev, coef, step, 7.5, cfg)
        assert gd.guided_dpm_step.last_path == "interpreter"
        ref = gd.reference(eps, x, prev, coef, step, 7.5, cfg)
        for a, b in zip(got, ref):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=STEP_TOL[dtype], atol=STEP_TOL[dtype])


def test_guided_step_half_precision_sample(interpret):
    """x in float16: x_next comes back in float16, x0 in float32."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 5, 3, generator=g).half()
    eps = torch.randn(4, 4, 5, 3, generator=g).half()
    coef = gd.dpm_coefficients(_dpm_scheduler(10))
    xn, x0 = gd.guided_dpm_step(eps, x, torch.zeros(x.shape), coef, 3, 5.0, True)
    rn, r0 = gd.reference(eps, x, torch.zeros(x.shape), coef, 3, 5.0, True)
    assert xn.dtype == torch.float16 and x0.dtype == torch.float32
    torch.testing.assert_close(xn, rn, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(x0, r0, rtol=1e-5, atol=1e-5)


def test_guided_step_rejects_mismatched_shapes(interpret):
    coef = gd.dpm_coefficients(_dpm_scheduler(5))
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="need eps = 2x x"):
        gd.guided_dpm_step(torch.randn(2, 4, 3, 3), x, torch.zeros_like(x), coef, 0, 7.5, True)


@pytest.mark.parametrize("steps,config", [
    (30, {}), (12, {}), (1, {}), (2, {}), (20, {"use_karras_sigmas": True}), (9, {"final_sigmas_type": "sigma_min"}),
    (30, {"prediction_type": "v_prediction"}), (12, {"prediction_type": "v_prediction"}),
    (20, {"prediction_type": "v_prediction", "use_karras_sigmas": True}),
])
def test_coefficients_reproduce_diffusers_scheduler(steps, config):
    """A whole trajectory: our table + reference op vs scheduler.step with CFG done as the pipeline does."""
    sched = _dpm_scheduler(steps, **config)
    coef = gd.dpm_coefficients(sched)
    assert coef.shape == (steps, 5) and coef.dtype == torch.float32
    g = torch.Generator().manual_seed(3)
    x_ref = torch.randn(2, 4, 5, 7, generator=g)
    x, x0 = x_ref.clone(), torch.zeros_like(x_ref)
    w = torch.randn(4, 4, generator=g) * 0.3

    def model(z, i):  # a deterministic stand-in for the UNet: (2N) eps, uncond then cond
        a = torch.tanh(torch.einsum("oc,nchw->nohw", w, z)) + 0.01 * i
        return torch.cat([a, a * 0.7 + 0.2])

    for i, t in enumerate(sched.timesteps):
        eps = model(x_ref, i)
        e_u, e_c = eps.chunk(2)
        x_ref = sched.step(e_u + 7.5 * (e_c - e_u), t, x_ref, return_dict=False)[0]
        x, x0 = gd.reference(model(x, i), x, x0, coef, i, 7.5, True)
    torch.testing.assert_close(x, x_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config,match", [
    ({"solver_order": 3}, "solver_order=3"),
    ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ({"prediction_type": "sample"}, "prediction_type='sample'"),
])
def test_unsupported_scheduler_configs_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        gd.dpm_coefficients(_dpm_scheduler(10, **config))


def test_v_prediction_kernel_in_the_interpreter_follows_the_scheduler(interpret):
    """SD 2.x-v: the Triton kernel itself (interpreter) over a whole trajectory vs scheduler.step."""
    sched = _dpm_scheduler(10, prediction_type="v_prediction")
    coef = gd.dpm_coefficients(sched)
    g = torch.Generator().manual_seed(4)
    x_ref = torch.randn(1, 4, 5, 3, generator=g)
    x, x0 = x_ref.clone(), torch.zeros_like(x_ref)
    for i, t in enumerate(sched.timesteps):
        v = torch.cat([torch.tanh(x_ref), 0.5 * torch.tanh(x_ref) + 0.1])
        x_ref = sched.step(v[:1] + 6.0 * (v[1:] - v[:1]), t, x_ref, return_dict=False)[0]
        v = torch.cat([torch.tanh(x), 0.5 * torch.tanh(x) + 0.1])
        x, x0 = gd.guided_dpm_step(v, x, x0, coef, i, 6.0, True)
        assert gd.guided_dpm_step.last_path == "interpreter"
    torch.testing.assert_close(x, x_ref, rtol=1e-4, atol=1e-4)


def test_other_scheduler_is_refused():
    from diffusers import DDIMScheduler

    from hpcwalk.sd.models import SD14_SCHEDULER_CONFIG

    sched = DDIMScheduler.from_config(SD14_SCHEDULER_CONFIG)
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler"):
        gd.dpm_coefficients(sched)


def test_coefficients_final_step_returns_the_data_prediction():
    coef = gd.dpm_coefficients(_dpm_scheduler(30))
    assert np.allclose(coef[-1, 2:].numpy(), [0.0, 1.0, 0.0])
    assert coef[0, 4] == 0  # first step is first order: no previous prediction

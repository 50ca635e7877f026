"""The benchmark harness's parts that need no model: refusals, metrics against their peers, tables.
The harness end to end runs in tests/test_bench_wheel.py (from an installed wheel) and
tests/test_gpu_bench_script.py (scripts/gpu_bench.sh --smoke). Speed is never asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcwalk.bench import common, run

ROOT = Path(__file__).resolve().parents[1]


def test_two_compile_modes_on_one_model_are_refused(capsys):
    from hpcwalk.bench.throughput import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--smoke", "--compile", "default", "--variant", "max-autotune/fused/fused"])
    assert e.value.code == 2 and "run one process per compile mode" in capsys.readouterr().err


def test_latency_refuses_cuda_only_modes_on_cpu_in_one_line(tmp_path, capsys):
    """A choice this machine cannot run stops the benchmark before anything is timed or written."""
    for argv, match in ((["--compile", "reduce-overhead"], "'reduce-overhead' replays CUDA graphs and needs a CUDA device"),
                        (["--levers", "cudnn_benchmark"], "cudnn_benchmark = true tunes cuDNN convolutions"),
                        (["--quantize", "fp8", "--dtypes", "bfloat16"], "quantize = 'fp8' runs FP8 matmuls on a CUDA GPU")):
        assert run("latency", ["--smoke", "--device", "cpu", "--out", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_unknown_benchmark_is_one_line(capsys):
    assert run("speed", []) == 2
    assert capsys.readouterr().err.strip() == "error: unknown benchmark 'speed': choose one of latency, throughput, longrun"


def test_quality_metrics():
    """PSNR on stacks with a known mean squared error, the Laplacian behind sharpness against
    scipy.ndimage on the interior pixels, and the deltas on known changes."""
    import numpy as np
    from scipy import ndimage

    from hpcwalk.render.framestats import LUMA
    from hpcwalk.bench.quality import frame_quality, sharpness
    from hpcwalk.core.metrics import psnr

    rng = np.random.default_rng(0)
    ref = rng.integers(4, 252, (3, 37, 41, 3), dtype=np.uint8)
    test = ref.copy()
    test[..., 0] += 3  # every red value off by 3: MSE = 9 / 3
    assert psnr(ref, test) == pytest.approx(10 * np.log10(255**2 / 3.0), rel=1e-12)
    luma = ref.astype(np.float64) @ np.array(LUMA)
    peer = np.array([ndimage.laplace(y)[1:-1, 1:-1].var() for y in luma])  # interior pixels: no edge rule
    np.testing.assert_allclose(sharpness(ref), peer, rtol=1e-5)  # float32 on the device
    q = frame_quality(ref, test)
    assert q["max_abs_diff"] == 3 and q["mean_abs_diff"] == pytest.approx(1.0) and not q["identical"]
    blurred = ndimage.uniform_filter(ref, size=(1, 3, 3, 1))
    assert frame_quality(ref, blurred)["sharpness_delta"] < -0.5  # a blur loses most of the Laplacian's variance
    same = frame_quality(ref, ref.copy())
    assert same["identical"] and same["psnr_db"] is None and same["max_abs_diff"] == 0
    with pytest.raises(ValueError, match="frame stacks differ"):
        frame_quality(ref, test[:2])


def test_throughput_table_reports_what_was_not_measured():
    r = {"device": {"name": "cpu"}, "benchmark": "throughput", "settings": {"recipe_mode": "none"},
         "figures": {"hpcwalk": {"frames_per_s": 3.0, "median_s": 1.0}, "diffusers": {"frames_per_s": 2.0, "median_s": 1.5},
                     "diffusers_recipe": {"frames_per_s": 2.5, "median_s": 1.2}},
         "not_measured": {"hpcwalk[fp8]": "[compile] quantize = 'fp8' runs FP8 matmuls on a CUDA GPU ..."}}
    table = common.markdown_table(r)
    assert "| hpcwalk | 3.00 | 1.00 | 1.50x | 1.20x | - | null |" in table
    assert "| hpcwalk[fp8] | not measured: [compile] quantize = 'fp8'" in table


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce GTX 1080", None), ("AMD EPYC", None),
])
def test_peak_table(name, peak):
    assert common.peak_tflops(name) == peak


def test_summary_quantiles():
    s = common.summary([0.5, 0.1, 0.2, 0.3, 0.4])
    assert s["median_s"] == 0.3 and s["p10_s"] <= 0.2 and s["p90_s"] >= 0.4 and s["n"] == 5

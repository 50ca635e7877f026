"""The benchmark harness runs end to end in its smoke mode (tiny model, CPU) and writes honest JSON.
Speed is never asserted here: only that the figures exist, are positive and name their device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_throughput_smoke_via_cli(tmp_path):
    """`hpcwalk bench throughput --smoke`: hpcwalk and diffusers on the same walk, one process."""
    _run([sys.executable, "-m", "hpcwalk.cli", "bench", "throughput", "--smoke", "--threads", "1",
          "--out", str(tmp_path), "--name", "t"])
    r = json.loads((tmp_path / "t.json").read_text())
    assert r["benchmark"] == "throughput" and r["device"]["type"] == "cpu" and r["device"]["name"]
    assert r["versions"]["torch"] and r["versions"]["diffusers"]
    assert r["settings"]["smoke"] and r["settings"]["frames"] == 4
    assert set(r["figures"]) == {"hpcwalk", "diffusers", "hpcwalk_parquet"}
    for f in r["figures"].values():
        assert f["frames_per_s"] > 0 and f["median_s"] > 0 and f["n"] == 1
    assert r["ratios"]["hpcwalk_vs_diffusers"] == pytest.approx(
        r["figures"]["hpcwalk"]["frames_per_s"] / r["figures"]["diffusers"]["frames_per_s"])
    # the two systems rendered the same frames (the core bound)
    assert r["checks"]["max_abs_diff_hpcwalk_vs_diffusers"] <= 1
    assert r["device"]["peak_tflops_fp16"] is None


def test_throughput_variants_share_one_model(tmp_path):
    """--variant adds hpcwalk configurations to the same run; each gets frames/s, counted TFLOP/s
    and a pixel check against diffusers; two compile modes in one process are refused."""
    _run([sys.executable, "benchmarks/throughput.py", "--smoke", "--threads", "1", "--no-parquet",
          "--variant", "none/scheduler/torch", "--variant", "none/fused/fused", "--out", str(tmp_path), "--name", "v"])
    r = json.loads((tmp_path / "v.json").read_text())
    assert set(r["figures"]) == {"hpcwalk", "diffusers", "hpcwalk[none/scheduler/torch]", "hpcwalk[none/fused/fused]"}
    assert r["variants"]["hpcwalk[none/fused/fused]"]["step"] == "fused"
    assert r["flops_per_frame"] > 0
    for name, f in r["figures"].items():
        assert f["tflops"] == pytest.approx(f["frames_per_s"] * r["flops_per_frame"] / 1e12)
        assert f["utilisation"] is None  # CPU: no peak
    assert r["checks"]["max_abs_diff_hpcwalk[none/scheduler/torch]_vs_diffusers"] <= 1
    assert r["checks"]["max_abs_diff_hpcwalk[none/fused/fused]_vs_diffusers"] <= 1
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--smoke", "--compile", "default",
                           "--variant", "max-autotune/fused/fused", "--out", str(tmp_path), "--name", "bad"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "run one process per compile mode" in proc.stderr
    assert not (tmp_path / "bad.json").exists()


def test_step_latency_smoke(tmp_path):
    _run([sys.executable, "benchmarks/step_latency.py", "--smoke", "--threads", "1", "--out", str(tmp_path), "--name", "s"])
    r = json.loads((tmp_path / "s.json").read_text())
    assert r["benchmark"] == "step_latency" and r["settings"]["smoke"]
    modules = {row["module"] for row in r["rows"]}
    assert modules == {"unet", "vae", "clip"}
    for row in r["rows"]:
        assert row["median_s"] > 0 and row["p10_s"] <= row["median_s"] <= row["p90_s"]
        assert row["flops"] > 0 and row["tflops"] > 0
        assert row["utilisation"] is None  # CPU: no peak is known, none is guessed
    assert {(k["op"], k["impl"]) for k in r["kernels"]} == {("guided_dpm", "torch"), ("decode_postprocess", "torch")}
    assert "| unet | float32 | sdpa | none | 1 |" in common.markdown_table(r)


def test_step_latency_refuses_cuda_only_modes_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/step_latency.py", "--smoke", "--compile", "reduce-overhead",
                           "--device", "cpu", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "needs a CUDA device" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce GTX 1080", None), ("AMD EPYC", None),
])
def test_peak_table(name, peak):
    assert common.peak_tflops(name) == peak


def test_summary_quantiles():
    s = common.summary([0.5, 0.1, 0.2, 0.3, 0.4])
    assert s["median_s"] == 0.3 and s["p10_s"] <= 0.2 and s["p90_s"] >= 0.4 and s["n"] == 5

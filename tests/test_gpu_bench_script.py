"""scripts/gpu_bench.sh in its smoke mode (what it does without CUDA): the environment check, the
step runner with its caps, step selection and summary, and the JSON of the per-module latency and
long-run steps. Its throughput step runs `hpcwalk bench throughput --smoke` with the same options
tests/test_bench_wheel.py runs from an installed wheel, so it is left out here (GPU_BENCH_STEPS) to
save a model load; the GPU steps themselves run only on a CUDA machine."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_smoke_mode(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_BENCH_STEPS": "latency_batches,longrun", "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(["bash", "scripts/gpu_bench.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["smoke"] == 1 and summary["seconds"] <= summary["budget_s"] == 450
    steps = summary["steps"]
    assert steps["throughput_best"] == {"outcome": "skipped", "reason": "not in GPU_BENCH_STEPS"}
    assert steps["gpu_tests"] == {"outcome": "skipped", "reason": "smoke mode"}
    for name, wrote in (("latency_batches", "step-latency-smoke.json"), ("longrun", "longrun-smoke.json")):
        assert steps[name]["outcome"] == "ok" and steps[name]["exit"] == 0 and steps[name]["newest_file"] == wrote, steps
    assert summary["fp8_library"]  # what the FP8 step would find: a version or the import error
    # per-module latency with the levers on (channels_last, fused QKV), as the GPU step runs them
    lat = json.loads((tmp_path / "step-latency-smoke.json").read_text())
    assert lat["settings"]["levers"] == ["channels_last", "fuse_qkv"]
    assert {r["module"] for r in lat["rows"]} == {"unet", "vae", "clip"}
    assert all(r["median_s"] > 0 and r["flops"] > 0 for r in lat["rows"])
    # the long run: every pool size rendered the whole walk through PNG + Parquet, timed from the markers
    run = json.loads((tmp_path / "longrun-smoke.json").read_text())
    assert [r["pool"] for r in run["rows"]] == [1, 2]
    for r in run["rows"]:
        assert r["frames"] == 16 and r["shards"] == 2 and r["frames_per_s"] > 0
        assert r["render_s"] > 0 and r["encode_s"] > 0
    log = (tmp_path / "gpu_bench.log").read_text()
    assert "end latency_batches: ok" in log and "end longrun: ok" in log and "FP8 library:" in log

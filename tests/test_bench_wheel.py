"""`hpcwalk bench latency` and `hpcwalk bench throughput --smoke` from a wheel installed in a fresh
virtual environment, run from a folder outside the source tree: the harness is part of what a user
installs, not of the checkout. The wheel is built offline (no build isolation) and installed without
dependencies; the venv sees the installed packages (torch, diffusers, ...) so nothing is reinstalled."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _fresh_venv(where: Path) -> Path:
    """A venv with --system-site-packages (and, when this interpreter is itself a venv, its packages too)."""
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", where], cwd=where.parent)
    py = where / "bin" / "python"
    if sys.prefix != sys.base_prefix:  # a plain path entry: the parent venv's .pth hooks (an editable hpcwalk) stay off
        purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=where).stdout.strip()
        Path(purelib, "_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return py


@pytest.mark.slow
def test_bench_runs_from_an_installed_wheel(tmp_path):
    # 1. the wheel, from a copy of the sources (no build/ or egg-info in the tree)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("hpcwalk", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
          "-w", tmp_path / "dist", src], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("hpcwalk-*.whl")
    # 2. a fresh venv; hpcwalk from the wheel only (--ignore-installed: an editable hpcwalk elsewhere stays)
    venv = tmp_path / "venv"
    py = _fresh_venv(venv)
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", "--no-cache-dir", wheel],
         cwd=tmp_path)
    work = tmp_path / "work"  # outside the source tree
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))
    where = _run([py, "-c", "import hpcwalk, hpcwalk.bench, hpcwalk.kernels; print(hpcwalk.__file__)"], work, env).stdout
    assert Path(where.strip()).resolve().is_relative_to(venv.resolve()), where
    # 3. the two commands, with the installed console script, from that folder
    hpcwalk = venv / "bin" / "hpcwalk"
    lat = _run([hpcwalk, "bench", "latency", "--threads", "1"], work, env)
    thr = _run([hpcwalk, "bench", "throughput", "--smoke", "--threads", "1", "--variant", "none/fused/fused",
                "--quantize", "fp8", "--name", "t"], work, env)
    # 4. tables a user can hold against benchmarks/README.md, and the JSON in ./bench-results
    assert "| module | dtype | attention | compile | frames | median ms |" in lat.stdout
    assert "| unet | float32 | sdpa | none | 1 |" in lat.stdout
    (lat_json,) = (work / "bench-results").glob("step-latency-cpu-tiny.json")
    r = json.loads(lat_json.read_text())
    assert r["settings"]["height"] == 128 and r["settings"]["batches"] == ["1"]  # the CPU's quick default
    assert {row["module"] for row in r["rows"]} == {"unet", "vae", "clip"} and all(row["utilisation"] is None for row in r["rows"])
    assert {(k["op"], k["impl"]) for k in r["kernels"]} == {("guided_dpm", "torch"), ("decode_postprocess", "torch")}
    assert "| system | frames/s | s per walk (median) | vs diffusers | vs diffusers recipe |" in thr.stdout
    t = json.loads((work / "bench-results" / "t.json").read_text())
    assert t["benchmark"] == "throughput" and t["device"]["type"] == "cpu" and t["settings"]["smoke"]
    assert set(t["figures"]) == {"hpcwalk", "diffusers", "diffusers_recipe", "hpcwalk_parquet", "hpcwalk[none/fused/fused]"}
    assert t["variants"]["hpcwalk[none/fused/fused]"]["step"] == "fused" and t["flops_per_frame"] > 0
    for f in t["figures"].values():
        assert f["frames_per_s"] > 0 and f["median_s"] > 0 and f["n"] == 1 and f["utilisation"] is None
    assert t["ratios"]["hpcwalk_vs_diffusers"] == pytest.approx(
        t["figures"]["hpcwalk"]["frames_per_s"] / t["figures"]["diffusers"]["frames_per_s"])
    assert t["ratios"]["hpcwalk_vs_diffusers_recipe"] == pytest.approx(
        t["figures"]["hpcwalk"]["frames_per_s"] / t["figures"]["diffusers_recipe"]["frames_per_s"])
    assert t["checks"]["max_abs_diff_hpcwalk_vs_diffusers"] <= 1
    assert t["checks"]["max_abs_diff_hpcwalk[none/fused/fused]_vs_diffusers"] <= 1
    assert t["checks"]["max_abs_diff_diffusers_recipe_vs_diffusers"] <= 1  # fused QKV + channels_last: exact
    assert t["settings"]["recipe_mode"] == "none"  # on the CPU the recipe is not compiled, and says so
    # the FP8 path cannot run on a CPU: reported as not measured, with the reason, and no figure
    assert "hpcwalk[fp8]" not in t["figures"] and "hpcwalk[fp8]" not in t["quality"]
    assert "runs FP8 matmuls on a CUDA GPU" in t["not_measured"]["hpcwalk[fp8]"]
    assert "| hpcwalk[fp8] | not measured:" in thr.stdout
    assert t["quality"]["diffusers"]["max_abs_diff"] <= 1 and t["quality"]["diffusers"]["reference"] == "hpcwalk"
    assert abs(t["quality"]["hpcwalk[none/fused/fused]"]["clip_score_delta"]) < 0.5  # frames within 1 level

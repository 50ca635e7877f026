"""What a real SLURM cannot show about scripts/slurm_render.sbatch and the Ray driver it starts: the script
run outside any allocation (sbatch always gives one) says so and names the command to use instead, and a
driver without the cluster's token is refused with the fix named (Ray 2.59+ heads use token
authentication; the script's own token passing is exercised under real SLURM). The script itself on a
real SLURM (two nodes, requeue): tests/test_slurm_real.py."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import cat_walk, tiny_job_toml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_render.sbatch"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def clean_env() -> dict[str, str]:
    """This environment without RAY_* and SLURM_* variables, this Python's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def test_slurm_script_outside_slurm_says_so(clean_env, tmp_path):
    """Run by hand (not through sbatch): exit 2 naming the missing allocation and `hpcwalk render --ray`; no
    arguments: the usage line."""
    proc = subprocess.run(["bash", str(SCRIPT), "job.toml", "out"], cwd=tmp_path, env=clean_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not inside a SLURM allocation" in proc.stderr
    assert "hpcwalk render job.toml --out out --ray" in proc.stderr
    usage = subprocess.run(["bash", str(SCRIPT)], env=clean_env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage: sbatch scripts/slurm_render.sbatch" in usage.stderr


@pytest.mark.ray
def test_driver_without_the_clusters_token_is_refused_with_the_fix(clean_env, tmp_path):
    """A head started with token authentication; `--ray ADDRESS` without RAY_AUTH_MODE=token: exit 2,
    one line naming RAY_AUTH_MODE and where the token comes from, nothing written."""
    port = _free_port()
    head_env = {**clean_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    tmp = f"/tmp/hpcwalk-ray-auth{os.getpid()}"
    head = subprocess.Popen(["ray", "start", "--head", f"--port={port}", f"--temp-dir={tmp}",
                             "--include-dashboard=false", "--block"], env=head_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        job = tmp_path / "job.toml"
        job.write_text(tiny_job_toml(cat_walk(methods=["slerp"], frames=2)))
        out = tmp_path / "run"
        driver_env = {**clean_env, "RAY_gcs_server_port_wait_time_s": "2"}  # Ray retries ~20 s by default: 2 here
        proc = subprocess.run([sys.executable, "-m", "hpcwalk.cli", "render", str(job), "--out", str(out),
                               "--ray", f"127.0.0.1:{port}", "--no-progress"], env=driver_env,
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert "refused this driver's authentication token" in last and "RAY_AUTH_MODE=token" in last, last
        assert not out.exists()
    finally:
        head.terminate()
        head.wait(60)

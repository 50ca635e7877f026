"""scripts/slurm_render.sbatch on one machine, with stand-ins for `srun` (runs the command here) and
`scontrol show hostnames` (this host): the Ray head comes up with a per-job auth token, the render
runs through it, the exit status is hpcwalk's, and no Ray process is left behind. Also: a driver
without the token is refused with the fix named (Ray 2.59+ heads use token authentication).

Not a SLURM cluster: multi-node start-up, srun's resource binding and networks between nodes are
not exercised here."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcwalk.store.reader import committed_shards, read_frames
from jobs import cat_walk, tiny_job_toml

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_render.sbatch"
SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && { echo localhost; exit 0; }
echo "scontrol stand-in: unsupported: $*" >&2; exit 1
"""
SRUN = """#!/usr/bin/env bash
while [ $# -gt 0 ]; do
  case "$1" in -w|-N|-n|-c) shift 2 ;; -*) shift ;; *) break ;; esac
done
exec "$@"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_processes(tag: str) -> list[str]:
    out = subprocess.run(["pgrep", "-fa", tag], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if "pgrep" not in ln]


@pytest.fixture()
def shims(tmp_path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{bin_dir}:{Path(sys.executable).parent}:{env['PATH']}"
    return env


def test_slurm_script_renders_through_its_own_ray_cluster(shims, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(tiny_job_toml(cat_walk(methods=["slerp"], frames=4)))
    out = tmp_path / "run"
    tag = f"hpcwalk-ray-pytest{os.getpid()}"
    env = {**shims, "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": f"pytest{os.getpid()}",
           "HPCWALK_RAY_PORT": str(_free_port()), "HPCWALK_RAY_WAIT_S": "120"}
    proc = subprocess.run(["bash", str(SCRIPT), str(job), str(out), "--workers", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Ray cluster up: 1 nodes" in proc.stderr and "stopping the Ray cluster" in proc.stderr
    assert committed_shards(str(out)) == {0, 1}
    assert read_frames(str(out)).num_rows == 4
    deadline = time.monotonic() + 30  # the head drains and exits after SIGTERM
    while _ray_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(tag)


def test_slurm_script_outside_slurm_says_so(shims, tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "job.toml", "out"], cwd=tmp_path, env=shims,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not inside a SLURM allocation" in proc.stderr
    assert "hpcwalk render job.toml --out out --ray" in proc.stderr
    usage = subprocess.run(["bash", str(SCRIPT)], env=shims, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage: sbatch scripts/slurm_render.sbatch" in usage.stderr


def test_driver_without_the_clusters_token_is_refused_with_the_fix(shims, tmp_path):
    """A head started with token authentication; `--ray ADDRESS` without RAY_AUTH_MODE=token: exit 2,
    one line naming RAY_AUTH_MODE and where the token comes from, nothing written."""
    port = _free_port()
    head_env = {**shims, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
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
        driver_env = {**shims, "RAY_gcs_server_port_wait_time_s": "2"}  # Ray retries ~20 s by default: 2 here
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

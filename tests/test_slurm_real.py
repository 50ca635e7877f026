"""scripts/slurm_render.sbatch submitted with sbatch to a real SLURM 22.05 (the `slurm` fixture: munged,
slurmctld and two slurmd on this machine, tests/slurm_cluster.py): a two-node job brings up a Ray head on
n1 and a Ray node on n2, renders, exits 0 with nothing left running, and its run folder verifies and
equals a local render; a job requeued mid-render (`scontrol requeue`: SIGTERM, SIGKILL after KillWait,
the same job id again) takes its own lock over at once and renders only the missing shards.

Both nodes are this host: srun, the allocation, signals and requeue are SLURM's own, but the network
between nodes is loopback and the GPUs are none. A job's processes see PYTHONPATH=this checkout, so
the code under test is what runs inside SLURM.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from hpcwalk.store.reader import committed_shards, read_frames
from jobs import cat_walk, tiny_job_toml

pytestmark = [pytest.mark.slurm, pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_render.sbatch"
FAST_JOB = tiny_job_toml(cat_walk(methods=["slerp"], frames=10), steps=1, size=16)  # 5 shards of 2
# shards of about a second each (40 steps at 64x64), so a requeue sent at the first commit lands mid-render
SLOW_JOB = tiny_job_toml(cat_walk(methods=["slerp"], frames=12), steps=40, size=64)  # 6 shards of 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_env(slurm) -> dict[str, str]:
    """What sbatch passes on to the job (--export=ALL): this checkout first on PYTHONPATH, this Python's bin
    first on PATH (hpcwalk, ray, python3), one torch thread, a Ray port of its own."""
    py = os.environ.get("PYTHONPATH", "")
    return {**slurm.env, "PYTHONPATH": str(ROOT) + (os.pathsep + py if py else ""),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{slurm.env['PATH']}", "OMP_NUM_THREADS": "1",
            "HPCWALK_RAY_PORT": str(_free_port()), "HPCWALK_RAY_WAIT_S": "180"}


def _local_render(job_file: Path, out: Path, env: dict[str, str]) -> subprocess.Popen:
    """`hpcwalk render` in a process of its own (no SLURM, no Ray), started now, waited for by the caller. On as
    many torch threads as a Ray CPU worker of the jobs here: one worker per node holds all the node's CPUs, Ray's
    count of them (the machine's), and CPU matmuls are blocked by thread count (1 against 2 threads moves a
    pixel by 1/255 in a 64x64 frame here)."""
    return subprocess.Popen([sys.executable, "-m", "hpcwalk.cli", "render", str(job_file), "--out", str(out),
                             "--no-progress"], env={**env, "OMP_NUM_THREADS": str(os.cpu_count() or 1)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _frames(out: Path) -> pa.Table:
    t = read_frames(str(out)).sort_by("frame_id").replace_schema_metadata(None)
    ids = t.column("frame_id").to_pylist()
    assert len(ids) == len(set(ids)), f"{out}: a frame id appears twice"
    return t


def _check_run(out: Path, reference: subprocess.Popen, ref_out: Path, env: dict[str, str]) -> None:
    """`hpcwalk verify OUT` exits 0 and OUT's frames equal the local render's, column for column."""
    verify = subprocess.run([sys.executable, "-m", "hpcwalk.cli", "verify", str(out)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-2000:]
    got, want = _frames(out), _frames(ref_out)
    assert got.num_rows == want.num_rows and got.column_names == want.column_names
    for name in want.column_names:
        assert got.column(name).equals(want.column(name)), \
            f"column {name} differs from the local render on {os.cpu_count()} torch threads"


def _no_job_processes_left(slurm, timeout_s: float = 60) -> list[str]:
    """The processes the cluster's jobs started (Ray, hpcwalk, srun) that are still running after `timeout_s`
    (the daemons' own, in their process groups, such as slurmctld's slurmscriptd, are not counted)."""
    daemons = {p.pid for p in slurm.procs.values()}
    deadline = time.monotonic() + timeout_s
    while True:
        left = [f"{pid} {cmd[:120]}" for pid, cmd in slurm.processes() if _pgid(pid) not in daemons]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_sbatch_on_two_nodes_renders_what_a_local_render_does(slurm, tmp_path):
    """The script's own defaults (--nodes=2): Ray head on n1, a Ray node on n2 joined through the head's
    address, one CPU worker per node, exit 0 (JobState COMPLETED, ExitCode 0:0), no process of the job left."""
    job = tmp_path / "job.toml"
    job.write_text(FAST_JOB)
    out, ref_out, log = tmp_path / "run", tmp_path / "local", tmp_path / "job.out"
    env = _job_env(slurm)
    job_id = slurm.sbatch(["--gpus-per-node=0", f"--output={log}", str(SCRIPT), str(job), str(out)],
                          cwd=tmp_path, env=env)
    reference = _local_render(job, ref_out, env)
    info = slurm.wait_done(job_id, timeout_s=300)
    text = log.read_text(errors="replace")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{text[-4000:]}"
    assert info["NodeList"] == "n[1-2]" and "2 nodes (n1 n2)" in text and "Ray cluster up: 2 nodes" in text, text[-4000:]
    assert "hpcwalk render exited 0" in text and "2 workers" in text, text[-4000:]
    _check_run(out, reference, ref_out, env)
    assert not _no_job_processes_left(slurm)


def test_requeued_mid_render_takes_its_lock_over_and_renders_only_the_rest(slurm, tmp_path):
    """`scontrol requeue` at the first committed shard (what a time limit or preemption does to a running job:
    SIGTERM to every step, SIGKILL after KillWait): the job runs again under the same id (Restarts=1), its
    lock from the first run (same SLURM_JOB_ID) is taken over at once with a warning saying so, the committed
    shards are kept and the rest rendered: every frame once, verify ok, equal to a local render."""
    job = tmp_path / "job.toml"
    job.write_text(SLOW_JOB)
    out, ref_out, log = tmp_path / "run", tmp_path / "local", tmp_path / "job.out"
    env = _job_env(slurm)
    job_id = slurm.sbatch(["--nodes=1", "--gpus-per-node=0", "--requeue", "--open-mode=append", f"--output={log}",
                           str(SCRIPT), str(job), str(out), "--workers", "1"], cwd=tmp_path, env=env)
    # now, while the job starts Ray and loads the model: beside a rendering worker, two processes of 2 torch
    # threads each on 2 cores render ~10x slower (0.29 against 2.8 frames/s measured here)
    reference = _local_render(job, ref_out, env)
    deadline = time.monotonic() + 240
    while not committed_shards(str(out)):
        assert time.monotonic() < deadline, f"no shard committed within 240 s: {slurm.job(job_id)}\n{slurm.logs()}"
        assert slurm.job(job_id).get("JobState") in ("PENDING", "RUNNING"), log.read_text(errors="replace")[-4000:]
        time.sleep(0.1)
    lock = json.loads((out / ".hpcwalk.lock").read_text())
    slurm.scontrol("requeue", job_id)
    assert lock["slurm_job_id"] == job_id and lock["host"] == slurm.host

    first = slurm.wait_state(job_id, {"PENDING"}, timeout_s=120, poll_s=0.1)  # the first run is gone
    kept = committed_shards(str(out))
    left_lock = (out / ".hpcwalk.lock").exists()
    assert first["Restarts"] == "1", first
    assert len(kept) < 6, f"the render finished before the requeue reached it ({sorted(kept)}): the test needs slower shards"

    info = slurm.wait_done(job_id, timeout_s=300)
    text = log.read_text(errors="replace")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), f"{info}\n{text[-4000:]}"
    assert "DUE TO JOB REQUEUE" in text and "resume run in" in text, text[-4000:]
    assert "refusing to start a second driver" not in text, text[-4000:]
    if left_lock:  # the first driver died holding it (SIGTERM kills it before it can let go): taken over at once
        assert f"it was written by this SLURM job ({job_id}) before it was requeued" in text, text[-4000:]
    assert f"{len(kept)} shards already committed" in text, text[-4000:]
    _check_run(out, reference, ref_out, env)
    assert not (out / ".hpcwalk.lock").exists()
    assert not _no_job_processes_left(slurm)

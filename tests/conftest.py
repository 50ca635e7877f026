"""Shared fixtures: the tiny model is built once per session (random weights, CPU); a test module's
`JOB` text (see jobs.py) is written, loaded and given a Renderer once per module."""

from __future__ import annotations

import os

# One intra-op thread per process, set before torch loads (subprocesses and Ray workers inherit it):
# the suite runs several torch processes at once (CLI subprocesses, Ray workers) on 2 cores, and
# oversubscribed OpenMP threads there ran 10-25x slower than one thread each (measured here).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """SDComponents of the built-in tiny model, float32 on the CPU."""
    from hpcwalk.sd.models import load_components

    return load_components("tiny", "float32", "cpu")


@pytest.fixture(scope="session")
def tiny_job():
    """A small job touching every walk kind (64x64, 30 steps)."""
    from hpcwalk.job.parse import load_job

    return load_job(os.path.join(os.path.dirname(__file__), "..", "examples", "quickstart.toml")).with_overrides(device="cpu")


@pytest.fixture(scope="module")
def job_file(request, tmp_path_factory) -> str:
    """The test module's `JOB` (TOML text, built with jobs.tiny_job_toml) written to a file."""
    p = tmp_path_factory.mktemp("job") / "job.toml"
    p.write_text(request.module.JOB)
    return str(p)


@pytest.fixture(scope="module")
def job(job_file):
    """The test module's `JOB`, loaded (RenderJob)."""
    from hpcwalk.job.parse import load_job

    return load_job(job_file)


@pytest.fixture(scope="module")
def renderer(job):
    """A Renderer for the test module's `JOB`, shared by its tests."""
    from hpcwalk.render.engine import Renderer

    return Renderer.from_job(job)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real two-node SLURM cluster on this machine (tests/slurm_cluster.py): munged, slurmctld and two
    slurmd (nodes n1, n2), started once per session and stopped at its end with every process they started.
    Skipped, with the reason, where it cannot run (not root, or SLURM/munge not installed)."""
    from slurm_cluster import SlurmCluster, SlurmStartError, unavailable_reason

    why = unavailable_reason()
    if why:
        pytest.skip(why)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2)
    try:
        cluster.start()
    except SlurmStartError as e:
        cluster.stop()
        pytest.fail(f"the test SLURM cluster did not start: {e}")
    yield cluster
    left = cluster.stop()
    if left:
        pytest.fail("processes of the test SLURM cluster were still running after it stopped (killed): " + "; ".join(left))

"""Shared fixtures: the tiny model is built once per session (random weights, CPU)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """SDComponents of the built-in tiny model, float32 on the CPU."""
    from hpcwalk.models import load_components

    return load_components("tiny", "float32", "cpu")


@pytest.fixture(scope="session")
def tiny_job():
    """A small job touching every walk kind (64x64, 30 steps)."""
    from hpcwalk.job import load_job

    return load_job(os.path.join(os.path.dirname(__file__), "..", "examples", "quickstart.toml")).with_overrides(device="cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

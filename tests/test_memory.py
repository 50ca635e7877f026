"""The micro-batch memory check: the peak counter itself, its extrapolation on the tiny model, and the
refusal before the run against a fake device budget (HPCWALK_DEVICE_MEMORY_MIB, the test hook)."""

from __future__ import annotations

import pytest
import torch

from hpcwalk.core.errors import CompileError
from hpcwalk.render.engine import Renderer
from hpcwalk.sd.memory import BUDGET_ENV, MARGIN, check_batch_memory, estimate, measure, peak_bytes

MB4 = 4 * 1000 * 1000  # one float32 (1000, 1000) tensor


def test_peak_counts_live_allocations_only():
    w = torch.ones(1000, 1000)  # made before: like the weights, not counted

    def views_keep_storage_alive():
        a = torch.ones(1000, 1000)
        v = a.view(-1)  # noqa: F841 (keeps a's storage alive after del a)
        del a
        b = torch.ones(1000, 1000)  # noqa: F841

    def freed_storage_is_not_counted():
        a = torch.ones(1000, 1000)
        a.mul_(2)  # in place: no allocation
        w.t()  # a view of a tensor made outside: no allocation
        del a
        b = torch.ones(1000, 1000)  # noqa: F841

    assert peak_bytes(views_keep_storage_alive) == 2 * MB4
    assert peak_bytes(freed_storage_is_not_counted) == MB4


def test_peak_grows_linearly_with_the_batch(tiny):
    """The extrapolation from 1 and 2 frames holds at 4 and 8 on the tiny model (CFG UNet step and VAE)."""
    p1, p2, p4, p8 = (measure(tiny, n, 64, 64, cfg=True) for n in (1, 2, 4, 8))
    assert p2 > p1 > 0
    for n, p in ((4, p4), (8, p8)):
        assert p == pytest.approx(p1 + (n - 1) * (p2 - p1), rel=0.05)


def test_no_check_on_the_cpu_without_a_budget(tiny, monkeypatch):
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    assert check_batch_memory(tiny, 32, 64, 64, cfg=True) is None


def test_batch_that_will_not_fit_is_refused_with_the_largest_that_does(tiny, tiny_job, monkeypatch):
    """A fake budget between the estimates for 4 and 5 frames: batch 8 is refused naming batch 4, which passes."""
    s = tiny_job.sampling
    est = estimate(tiny, 8, s.height, s.width, cfg=True, free=(1 << 40, "test"))
    budget = (est.need(4) + est.need(5)) / 2
    monkeypatch.setenv(BUDGET_ENV, str(budget / 2**20))
    with pytest.raises(CompileError, match=r"\[render\] batch_size 8 needs about .* MiB on cpu at 64x64 \(estimated: "
                                           rf"{MARGIN} x the peak measured at 1 and 2 frames.*use batch_size 4 or less") as e:
        Renderer(tiny, s, batch_size=8)
    assert "\n" not in str(e.value) and BUDGET_ENV in str(e.value)
    assert Renderer(tiny, s, batch_size=4).batch_size == 4
    assert est.need(8) > est.need(4) > 0


def test_cli_refuses_a_batch_too_large_before_writing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from hpcwalk.cli import app

    out = tmp_path / "run"
    for budget, parts in (("0.01", ["error: [render] batch_size 8 needs about", "is free", "lower height/width"]),
                          ("lots", [f"error: {BUDGET_ENV}='lots' is not a positive number of MiB"]),
                          ("nan", [f"error: {BUDGET_ENV}='nan' is not a positive number of MiB"])):
        monkeypatch.setenv(BUDGET_ENV, budget)
        res = CliRunner().invoke(app, ["render", "examples/quickstart.toml", "--out", str(out), "--device", "cpu",
                                       "--no-progress"])
        assert res.exit_code == 2, res.output
        assert all(p in res.output for p in parts), res.output
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0] == res.output.strip().splitlines()[-1] and not out.exists()

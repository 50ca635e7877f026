"""Figures: the 2-D trajectory picture, latent norm vs gamma measured from a real tiny render, contact sheets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hpcwalk.see.figures import FigureError, norm_figure, trajectory_figure, walk_contact_sheet
from hpcwalk.store.runindex import open_run
from hpcwalk.store.reader import read_frames
from synthetic_run import make_run


def test_trajectory_figure_draws_the_three_paths(tmp_path):
    path = str(tmp_path / "traj.png")
    t = trajectory_figure(path, seed=24, n=51)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (1000, 460)
    a, b, g = t.start, t.end, t.gamma
    for m, p in t.paths.items():  # every path runs from z_start to z_end
        assert np.allclose(p[0], a) and np.allclose(p[-1], b), m
    lin, nrm, sl = t.paths["linear"], t.paths["normalized"], t.paths["slerp"]
    # linear is the chord; normalized rescales it by 1 / sqrt(g^2 + (1-g)^2); slerp follows the great arc
    cross = (b - a)[0] * (lin - a)[:, 1] - (b - a)[1] * (lin - a)[:, 0]
    assert np.abs(cross).max() < 1e-9
    assert np.allclose(nrm, lin / np.sqrt(g ** 2 + (1 - g) ** 2)[:, None])
    phi = np.arccos(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    want = (np.sin((1 - g) * phi)[:, None] * a + np.sin(g * phi)[:, None] * b) / np.sin(phi)
    assert np.allclose(sl, want, atol=1e-9)
    mid = len(g) // 2
    assert np.linalg.norm(lin[mid]) < np.linalg.norm(nrm[mid]) < np.linalg.norm(sl[mid])


@pytest.fixture(scope="module")
def real_run(tiny, tmp_path_factory):
    """A latent walk rendered by the real Renderer with the tiny model (3 methods x 3 frames, 1 step)."""
    from hpcwalk.render.engine import Renderer
    from hpcwalk.run.base import render_shard
    from hpcwalk.job.parse import parse_job
    from hpcwalk.job.plan import plan, shard
    from hpcwalk.store.writer import ShardStore

    job = parse_job({"model": {"id": "tiny"}, "sampling": {"steps": 1, "height": 64, "width": 64},
                     "clip": {"enabled": False}, "output": {"shard_size": 9},
                     "walk": [{"name": "seeds", "kind": "latent", "prompt": "a cat", "seeds": [1, 2],
                               "methods": ["linear", "normalized", "slerp"], "frames": 3}]})
    path = str(tmp_path_factory.mktemp("real") / "run")
    renderer, store = Renderer(tiny, job.sampling, 9), ShardStore(path, job)
    for s in shard(plan(job), 9):
        assert render_shard(renderer, job, s, store).status == "committed"
    return path


def test_norm_figure_plots_the_runs_latent_norms(real_run, tmp_path):
    """The plotted series are the run's latent_norm column, which matches ||z_T|| / sqrt(numel) recomputed
    from the seeds with hpcwalk.render.interp; linear sags to about sqrt(1/2) at gamma = 0.5, the others do not."""
    from hpcwalk.render import interp
    from hpcwalk.render.engine import draw_noise
    from hpcwalk.job.spec import NoiseKey

    path = str(tmp_path / "norm.png")
    series = norm_figure(open_run(real_run), "seeds", path)
    assert Image.open(path).format == "PNG"
    table = read_frames(real_run, columns=["method", "gamma", "latent_norm"]).to_pylist()
    a, b = (draw_noise(NoiseKey(s), (1, 4, 8, 8))[0].double() for s in (1, 2))
    for m, (x, y) in series.items():
        rows = sorted((r for r in table if r["method"] == m), key=lambda r: r["gamma"])
        assert np.allclose(x, [r["gamma"] for r in rows]) and np.allclose(y, [r["latent_norm"] for r in rows])
        z = interp.interpolate(m, a, b, torch.tensor(x))
        want = (z.flatten(1).norm(dim=1) / z[0].numel() ** 0.5).numpy()
        assert np.allclose(y, want, rtol=1e-5), m
    ends = series["linear"][1][[0, 2]].mean()
    assert abs(series["linear"][1][1] / ends - 0.5 ** 0.5) < 0.1
    assert series["normalized"][1][1] > 0.9 * ends and series["slerp"][1][1] > 0.9 * ends


def test_contact_sheets_for_prompts_and_std_walks(tmp_path):
    run = str(tmp_path / "run")
    prompts = ["a cat", "a dog", "an oil painting of a lighthouse at night, very detailed"]
    make_run(run, [{"name": "one", "kind": "prompts", "seed": 1, "prompts": prompts},
                   {"name": "sweep", "kind": "std", "prompt": "a cat", "seed": 1, "frames": 31},
                   {"name": "seeds", "kind": "latent", "prompt": "a cat", "seeds": [1, 2], "frames": 3}])
    index = open_run(run)
    assert walk_contact_sheet(index, "one", str(tmp_path / "one.png")) == prompts
    caps = walk_contact_sheet(index, "sweep", str(tmp_path / "sweep.png"), max_frames=6)
    assert caps == ["std 0.500", "std 0.700", "std 0.900", "std 1.100", "std 1.300", "std 1.500"]
    for f in ("one.png", "sweep.png"):
        with Image.open(tmp_path / f) as im:
            assert im.format == "PNG" and im.size[0] > 300
    with pytest.raises(FigureError, match="contact sheets are drawn for prompts and std walks"):
        walk_contact_sheet(index, "seeds", str(tmp_path / "x.png"))
    with pytest.raises(FigureError, match="not a latent walk"):
        norm_figure(index, "sweep", str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()

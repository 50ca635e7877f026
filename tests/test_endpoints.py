"""Images walks rendered on `tiny`: the endpoints are inverted once, before any shard, cached in the run folder;
the walk's frames at gamma 0 and 1 are the stored reconstructions; reruns and re-rendered shards reuse the
cache (no UNet call for an inversion); the viewer and the video read the walk."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.compute as pc
import pytest
from typer.testing import CliRunner

from hpcwalk.cli import app
from hpcwalk.render.engine import Renderer
from hpcwalk.run.local import run_render
from hpcwalk.render.invert import InversionCache, key_for
from hpcwalk.job.parse import load_job
from hpcwalk.job.plan import plan, shard
from hpcwalk.store.reader import read_frames
from jobs import tiny_job_toml, walk
from test_walks import pictures

STEPS, REFINE = 6, 2
JOB = tiny_job_toml(
    walk("img", "images", images=["in/a.png", "in/b.png"], prompt="a photo", methods=["linear", "slerp"], frames=4,
         invert_refine=REFINE),
    walk("w", "latent", prompt="a cat", seeds=[1, 2], methods=["slerp"], frames=3),
    steps=STEPS, guidance=1.0, size=32, batch_size=2, shard_size=3,
).replace(f"steps = {STEPS}", f'scheduler = "ddim"\nsteps = {STEPS}')


class Counting:
    """A renderer factory that counts the UNet's calls (forward pre-hook) of the one Renderer it builds."""

    def __init__(self):
        self.calls = 0
        self.renderer = None

    def __call__(self, job):
        if self.renderer is None:
            self.renderer = Renderer.from_job(job)
            self.renderer.c.unet.register_forward_pre_hook(lambda *a: setattr(self, "calls", self.calls + 1))
        return self.renderer


@pytest.fixture(scope="module")
def job_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("job")
    pictures(folder / "in")
    (folder / "job.toml").write_text(JOB)
    return folder / "job.toml"


@pytest.fixture(scope="module")
def rendered(job_path, tmp_path_factory):
    job = load_job(job_path)
    out = str(tmp_path_factory.mktemp("run") / "run")
    factory = Counting()
    summary = run_render(job, out, shard(plan(job), job.output.shard_size), progress=False, factory=factory)
    assert not summary.failed, [r.error for r in summary.failed]
    return job, out, factory, summary


def test_endpoints_are_inverted_once_before_rendering_and_are_the_walks_end_frames(rendered):
    job, out, factory, summary = rendered
    r = factory.renderer
    # 1. inverted once each, on the worker, before any shard: 2 images x (steps x (1 + refine) inversion + steps back)
    render_calls = sum(-(-len(s.rows) // 2) for s in shard(plan(job), 3)) * STEPS  # micro-batches of 2 per shard
    assert factory.calls == STEPS * (1 + REFINE) + STEPS + render_calls  # one micro-batch holds both images
    index = json.loads(open(os.path.join(out, "inversions", "index.json")).read())
    assert [(x["image"], x["inverted_now"]) for x in index] == [("in/a.png", True), ("in/b.png", True)]
    assert any("reconstruction PSNR" in line for line in summary.notes)
    # 2. the walk's frames at gamma 0 and 1 are the stored reconstructions, and the rows carry their PSNR
    cache = InversionCache(os.path.join(out, "inversions"))
    w = job.walks[0]
    inv = [cache.load(key_for(r, sha, w.prompt, w.invert_guidance, w.invert_refine)) for sha in w.image_sha256]
    t = read_frames(out).sort_by("frame_id")
    for method in ("linear", "slerp"):
        rows = t.filter(pc.equal(t["frame_id"], f"img/{method}/00000")).to_pylist()[0], \
            t.filter(pc.equal(t["frame_id"], f"img/{method}/00003")).to_pylist()[0]
        for row, end in zip(rows, inv):
            from PIL import Image
            import io

            frame = np.asarray(Image.open(io.BytesIO(row["image"])))
            diff = int(np.abs(frame.astype(int) - end.reconstruction.astype(int)).max())
            print(f"{method} {row['frame_id']}: max abs difference to the stored reconstruction {diff}")
            assert diff == 0  # same micro-batch shape, same latent, same sampler
        assert (rows[0]["image_psnr"], rows[0]["image_psnr_b"]) == (inv[0].psnr, inv[1].psnr)
        assert (rows[0]["image_sha256"], rows[1]["image_sha256_b"]) == w.image_sha256
    assert t.filter(pc.equal(t["walk"], "w"))["image_psnr"].null_count == 3  # other kinds: null
    # 3. the stored reconstruction is the renderer's DDIM sampling of the stored z_T, measured against the input
    from hpcwalk.core.metrics import psnr

    assert inv[0].image.shape == (32, 32, 3) and psnr(inv[0].reconstruction, inv[0].image) == inv[0].psnr
    print(f"tiny (random VAE and UNet), {STEPS} steps, refine {REFINE}: PSNR {inv[0].psnr:.2f} / {inv[1].psnr:.2f} dB")


def test_reruns_and_rerendered_shards_reuse_the_inversions(rendered, tmp_path):
    job, out, factory, _ = rendered
    run = str(tmp_path / "run")
    shutil.copytree(out, run)
    for name in ("shard-00000.parquet", "shard-00002.parquet"):  # damaged: both render again
        os.remove(os.path.join(run, "frames", name))
    factory.calls = 0
    summary = run_render(job, run, shard(plan(job), job.output.shard_size), progress=False, factory=factory)
    assert not summary.failed and summary.damaged
    assert factory.calls == 2 * 2 * STEPS  # two shards of 3 rows: 2 micro-batches each; no inversion
    index = json.loads(open(os.path.join(run, "inversions", "index.json")).read())
    assert [x["inverted_now"] for x in index] == [False, False]
    ref, got = read_frames(out).sort_by("frame_id"), read_frames(run).sort_by("frame_id")
    assert got.column("image").to_pylist() == ref.column("image").to_pylist()


def test_a_changed_image_stops_the_run_before_anything_is_written(job_path, tmp_path):
    folder = tmp_path / "job"
    shutil.copytree(job_path.parent, folder)
    job = load_job(folder / "job.toml")
    from PIL import Image

    Image.open(folder / "in" / "b.png").rotate(90).save(folder / "in" / "b.png")
    from hpcwalk.core.errors import JobError

    with pytest.raises(JobError, match="changed since the job was read"):
        run_render(job, str(tmp_path / "out"), shard(plan(job), 3), progress=False)
    assert not (tmp_path / "out").exists()


def test_viewer_and_video_read_an_images_walk(rendered, tmp_path):
    _, out, _, _ = rendered
    run = str(tmp_path / "run")
    shutil.copytree(out, run)
    res = CliRunner().invoke(app, ["view", run])
    assert res.exit_code == 0, res.output
    data = open(os.path.join(run, "viewer", "data.js")).read()
    walk_data = json.loads(data[len("window.HPCWALK = "):].rstrip().rstrip(";"))["walks"][0]
    assert walk_data["kind"] == "images" and walk_data["params"][0] == "gamma 0.000"
    note = walk_data["tracks"][0]["notes"][0]
    assert note.startswith("images in/a.png → in/b.png · reconstruction PSNR") and " dB" in note
    assert walk_data["tracks"][0]["seeds"][0].startswith("none")
    assert [f["src"] for f in walk_data["figures"]] == ["figures/w0-endpoints.png"]
    assert os.path.getsize(os.path.join(run, "viewer", "figures", "w0-endpoints.png")) > 5000
    res = CliRunner().invoke(app, ["video", run, "--walk", "img"])
    assert res.exit_code == 0, res.output
    import av

    with av.open(os.path.join(run, "videos", "img.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 4

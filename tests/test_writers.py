"""Writers that fail cleanly: prompts and names are data (never mathtext, LaTeX or markup), walk names
become safe file names, and a full disk in video, view, score or the study report exits 1 with one
line and leaves no temporary file.

The full disk is a real one: a small tmpfs mounted under the test's folder (needs root, as on this
project's machines). Without root the same writers are run with RLIMIT_FSIZE capping every file this
process writes (EFBIG instead of ENOSPC): said in the fixture's `how`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from hpcwalk.cli import app
from hpcwalk.job.plan import plan, shard
from hpcwalk.see.report import FIGURES
from hpcwalk.store.writer import ShardStore
from hpcwalk.store.schema import encode_image, frames_table, run_metadata
from hpcwalk.job.studyspec import parse_study
from jobs import cat_walk, tiny_job_toml, tiny_study_toml
from synthetic_run import LATENT3, frame_image, make_run

runner = CliRunner()
MATH = "$\\frac{a$ and $x^{$"  # unbalanced: matplotlib's math parser raised on both


def _temps(folder) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if ".tmp" in f]


# -- names and prompts are data ---------------------------------------------------------------------


def test_math_and_markup_in_prompts_and_names_are_drawn_as_text(tmp_path):
    run = str(tmp_path / "run")
    make_run(run, [{"name": f"cats {MATH}", "kind": "prompts", "seed": 1, "prompts": [MATH, "<b>bold</b> & \\alpha"]},
                   dict(LATENT3, name=f"walk {MATH}", frames=3, methods=["linear"]),
                   {"name": "sweep $1$", "kind": "std", "prompt": MATH, "seed": 1, "frames": 3}])
    res = runner.invoke(app, ["view", run])
    assert res.exit_code == 0, res.output
    figures = sorted(os.listdir(os.path.join(run, "viewer", "figures")))
    assert figures == ["trajectories.png", "w0-contact.png", "w1-latent-norm.png", "w2-contact.png"]
    data = open(os.path.join(run, "viewer", "data.js"), encoding="utf-8").read()
    assert json.dumps(MATH)[1:-1] in data and "<b>bold</b>" in data  # kept as written (viewer.js sets textContent)


def test_long_and_odd_walk_names_become_safe_file_names(tmp_path):
    run = str(tmp_path / "run")
    long, nul = "w" * 300, "a\u0000b/../c".replace("/", "|")
    make_run(run, [dict(LATENT3, name=long, frames=3, methods=["linear"]),
                   dict(LATENT3, name=nul, frames=3, methods=["linear"]),
                   {"name": "line\nbreak", "kind": "prompts", "seed": 1, "prompts": ["two\nlines\u0000", "x" * 500]}])
    res = runner.invoke(app, ["video", run])
    assert res.exit_code == 0, res.output
    videos = sorted(os.listdir(os.path.join(run, "videos")))
    assert len(videos) == 3 and all(len(v.encode()) <= 110 and "\0" not in v and "\n" not in v for v in videos)
    assert any(v.startswith("w" * 64 + "~~") for v in videos)  # cut, and kept distinct by a hash
    assert f"walk {long!r}" in res.stdout and f"walk {nul!r}" in res.stdout  # the data keeps the name


def _study(tmp_path: Path, clip_model: str = "tiny-clip/none") -> tuple[Path, Path]:
    """A committed study folder without rendering: 2 pairs x 3 methods x 3 frames, synthetic CLIP columns."""
    text = tiny_study_toml(f"a <script>alert(1)</script> cat {MATH}", "bootstrap = 200", 'lpips = "none"', shard_size=9)
    path = tmp_path / "study.toml"
    path.write_text(text)
    import tomllib

    st = parse_study(tomllib.loads(text), source=str(path))
    out = tmp_path / "out"
    meta = {**run_metadata(st.job), "clip_model": clip_model}
    store = ShardStore(str(out), st.job, metadata=meta)
    rng = np.random.default_rng(0)
    for s in shard(plan(st.job), st.job.output.shard_size):
        n = len(s.rows)
        emb = rng.normal(size=(n, 32)).astype(np.float16)
        extra = {"clip_image": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 32),
                 "clip_score": pa.array(rng.uniform(10, 30, n).astype(np.float32)),
                 "clip_score_b": pa.array([None] * n, pa.float32())}
        images = [encode_image(frame_image(0, 0, r.index, 16, 16)) for r in s.rows]
        store.write(s, frames_table(list(s.rows), images, np.ones(n), s.index, 16, 16, extra=extra))
    return path, out


def test_the_report_draws_model_names_as_text_and_escapes_prompts(tmp_path):
    study, out = _study(tmp_path, clip_model=f"local-dir:/models/{MATH}/none")
    res = runner.invoke(app, ["study", str(study), "--out", str(out), "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    html = (out / "report.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    assert len(list((out / "figures").glob("*.png"))) == len(FIGURES)  # every figure drawn (none failed on the text)


# -- a full disk ------------------------------------------------------------------------------------


class SmallDisk:
    """A folder on a nearly full filesystem."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], capture_output=True)
        self.mounted = r.returncode == 0
        self.how = "tmpfs of 8 MiB, filled" if self.mounted else "RLIMIT_FSIZE (no root to mount a tmpfs)"

    @contextlib.contextmanager
    def full(self, free: int = 8192):
        """Leave about `free` bytes (tmpfs), or cap each file this process writes at 1 KiB (RLIMIT_FSIZE)."""
        if self.mounted:
            filler = self.path / "filler.bin"
            with open(filler, "wb", buffering=0) as f:
                with contextlib.suppress(OSError):  # written until the disk is full
                    while True:
                        f.write(b"\0" * 65536)
            size = filler.stat().st_size
            os.truncate(filler, max(0, size - free))
            try:
                yield
            finally:
                filler.unlink()
            return
        from hpcwalk.sd.loaders import clip_tokenizer_files

        clip_tokenizer_files()  # the tokenizer cache (written once per process) is not what is tested
        old = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, old[1]))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)
            signal.signal(signal.SIGXFSZ, handler)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def disk(tmp_path):
    d = SmallDisk(tmp_path / "small")
    print(f"full disk: {d.how}")
    yield d
    d.close()


def _one_line_exit_1(res, what: str) -> None:
    assert res.exit_code == 1, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write {what}"), res.stderr
    assert "free space" in errors[0] and res.exception is None or isinstance(res.exception, SystemExit)


def test_full_disk_in_video_and_view(tmp_path, disk):
    run = str(tmp_path / "run")
    make_run(run, [dict(LATENT3, frames=30, methods=["linear"])], size=(96, 96), noise=True)
    video, viewer = disk.path / "v.mp4", disk.path / "viewer"
    with disk.full():
        _one_line_exit_1(runner.invoke(app, ["video", run, "--walk", "seeds", "--out", str(video)]), "the video")
        _one_line_exit_1(runner.invoke(app, ["view", run, "--out", str(viewer)]), "the viewer")
    assert not video.exists() and _temps(disk.path) == []
    # with space again, the same commands complete
    assert runner.invoke(app, ["video", run, "--walk", "seeds", "--out", str(video)]).exit_code == 0
    assert runner.invoke(app, ["view", run, "--out", str(viewer)]).exit_code == 0


def test_full_disk_in_score_and_the_study_report(tmp_path, disk):
    run = disk.path / "run"
    make_run(str(run), [dict(LATENT3, frames=30, methods=["linear"])], size=(16, 16))
    score = ["score", str(run), "--clip-model", "tiny-clip", "--device", "cpu", "--no-progress"]
    with disk.full(free=4096):
        _one_line_exit_1(runner.invoke(app, score), "the scores")
    assert _temps(run) == []
    study, out = _study(tmp_path)
    shutil.move(str(out), str(disk.path / "study"))
    out = disk.path / "study"
    args = ["study", str(study), "--out", str(out), "--device", "cpu", "--no-progress"]
    with disk.full(free=4096):
        _one_line_exit_1(runner.invoke(app, args), "the study's outputs")
    assert _temps(out) == [] and not (out / "report.html").exists()
    res = runner.invoke(app, args)  # space again: the rerun writes everything
    assert res.exit_code == 0, res.output
    assert (out / "report.html").exists() and runner.invoke(app, score).exit_code == 0


def test_full_disk_during_render_loses_no_committed_shard_and_the_rerun_completes(tmp_path, disk):
    if not disk.mounted:
        pytest.skip("needs a small real filesystem (root, to mount a tmpfs): a per-file size cap is not a full disk")
    job = tmp_path / "job.toml"
    job.write_text(tiny_job_toml(cat_walk(methods=["linear", "slerp"], frames=6), steps=1, size=32))
    ref, out = tmp_path / "ref", disk.path / "run"
    assert runner.invoke(app, ["render", str(job), "--out", str(ref), "--no-progress"]).exit_code == 0
    per_shard = max(f.stat().st_size for f in (ref / "frames").iterdir())
    with disk.full(free=3 * 4096 + 2 * (per_shard // 4096 + 2) * 4096):  # run.json and about two shards fit
        res = runner.invoke(app, ["render", str(job), "--out", str(out), "--no-progress"])
        assert res.exit_code == 1, res.output
        assert "No space left on device" in res.stderr and "committed shards are kept" in res.stderr
        kept = runner.invoke(app, ["verify", str(out)]).stdout.splitlines()[-1]
    # what was committed verifies; the shards the full disk stopped are missing until the rerun
    assert re.fullmatch(r"[1-9]\d* of 6 shards ok \(full\), [1-5] missing", kept), kept
    assert _temps(out) == []
    res = runner.invoke(app, ["render", str(job), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    from hpcwalk.store.reader import read_frames

    got, want = (read_frames(str(d)).sort_by("frame_id").replace_schema_metadata(None) for d in (out, ref))
    assert got.equals(want)


def test_the_kid_figure_draws_an_encoder_name_as_text():
    """The encoder's name (a folder path, here with unbalanced $...$) is data in the KID panel's title too."""
    import io

    from hpcwalk.see.report import fig_yardsticks

    iv = {"estimate": 0.1, "low": 0.0, "high": 0.2}
    fig = fig_yardsticks({"kid": {"encoder": {"label": f"/models/{MATH}", "bins": [[0.1, 0.4], [0.5, 0.9]],
                                              "per_bin": {"slerp": [iv, iv]}}}})
    fig.savefig(io.BytesIO(), format="png")  # mathtext raised ValueError on the title here
    assert MATH in fig.axes[0].get_title()

"""`hpcwalk score`: re-score a run's frames with a CLIP model without re-rendering, into a sibling
dataset keyed by frame id; resume; bad input exits 2 and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from hpcwalk.cli import app
from hpcwalk.render.clip import CLIP_PRESETS, load_clip
from jobs import tiny_job_toml, walk

JOB = tiny_job_toml(
    walk("seeds", "latent", prompt="A high resolution photo of a cat", seeds=[1, 2], methods=["linear", "slerp"],
         frames=3),
    walk("cat-to-dog", "text", prompts=["A high resolution photo of a cat", "A high resolution photo of a dog"],
         seed=1, methods=["slerp"], frames=3),
    steps=2, guidance=1.0, batch_size=4, shard_size=4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 9-frame run in 3 shards, rendered (and scored by tiny-clip) by `hpcwalk render`."""
    tmp = tmp_path_factory.mktemp("score")
    (tmp / "job.toml").write_text(JOB)
    res = CliRunner().invoke(app, ["render", str(tmp / "job.toml"), "--out", str(tmp / "run"), "--no-progress"])
    assert res.exit_code == 0, res.output
    return tmp / "run"


def _score(run: Path, *args: str):
    return CliRunner().invoke(app, ["score", str(run), *args, "--device", "cpu", "--no-progress", "--batch-size", "5"])


def _joined(run: Path, name: str):
    import duckdb

    return duckdb.sql(f"""
        SELECT f.frame_id, f.clip_score AS a, s.clip_score AS b, f.clip_score_b AS a2, s.clip_score_b AS b2,
               array_cosine_similarity(f.clip_image::FLOAT[32], s.clip_image::FLOAT[32]) AS cos
        FROM '{run}/frames/*.parquet' f JOIN '{run}/scores/{name}/data/*.parquet' s USING (frame_id)
        ORDER BY f.frame_id""").fetchall()


def test_rescoring_with_the_render_model_reproduces_the_render_columns(run):
    """Same model, images read back from the PNGs: the columns equal those computed in the render."""
    res = _score(run, "--clip-model", "tiny-clip")
    assert res.exit_code == 0, res.output
    assert "9 frames in 3 shards scored with tiny-clip/none" in res.output
    rows = _joined(run, "tiny-clip__none")
    assert len(rows) == 9
    for frame_id, a, b, a2, b2, cos in rows:
        assert b == pytest.approx(a, abs=1e-4)
        assert (a2 is None) == (b2 is None) == (not frame_id.startswith("cat-to-dog"))
        if a2 is not None:
            assert b2 == pytest.approx(a2, abs=1e-4)
        assert cos == pytest.approx(1.0, abs=1e-5)
    meta = pq.read_schema(next((run / "scores" / "tiny-clip__none" / "data").glob("*.parquet"))).metadata
    assert meta[b"clip_model"] == b"tiny-clip/none"


def test_rescoring_resumes(run):
    marker = run / "scores" / "tiny-clip__none" / "commits" / "shard-00001.done.json"
    if not marker.exists():
        assert _score(run, "--clip-model", "tiny-clip").exit_code == 0
    marker.unlink()
    res = _score(run, "--clip-model", "tiny-clip")
    assert res.exit_code == 0, res.output
    assert "4 frames in 1 shards scored" in res.output and "2 shards already scored" in res.output


def test_rescoring_with_another_model_writes_its_own_dataset(run, tmp_path):
    """A second model (an open_clip folder with other weights): new columns beside the render's, frames untouched."""
    other = load_clip("tiny-clip", "none")
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path / "other-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": CLIP_PRESETS["tiny-clip"]}))
    torch.save(other.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    frames_before = sorted(p.stat().st_mtime_ns for p in (run / "frames").glob("*.parquet"))
    res = _score(run, "--clip-model", f"local-dir:{folder}")
    assert res.exit_code == 0, res.output
    name = next(p.name for p in (run / "scores").iterdir() if "other-clip" in p.name)
    rows = _joined(run, name)
    assert len(rows) == 9
    assert max(abs(a - b) for _, a, b, *_ in rows) > 1e-3  # another yardstick gives other scores
    assert sorted(p.stat().st_mtime_ns for p in (run / "frames").glob("*.parquet")) == frames_before


@pytest.mark.parametrize("args, needle", [
    (["--clip-model", "ViT-L-14", "--pretrained", "openai"], "ViT-L-14/openai are not in the local cache"),
    (["--clip-model", "ViT-H-14"], "--pretrained is needed for 'ViT-H-14'"),
    (["--clip-model", "ViT-Q-99", "--pretrained", "x"], "not an open_clip architecture"),
    (["--clip-model", "tiny-clip", "--device", "cuda:7"], "CUDA is not available"),
])
def test_bad_score_input_exits_2_and_writes_nothing(run, args, needle):
    before = sorted(p.name for p in (run / "scores").iterdir()) if (run / "scores").exists() else []
    res = CliRunner().invoke(app, ["score", str(run), *args, "--no-progress"])
    assert res.exit_code == 2, res.output
    assert needle in res.output and len(res.output.strip().splitlines()) == 1
    after = sorted(p.name for p in (run / "scores").iterdir()) if (run / "scores").exists() else []
    assert after == before


def test_score_refuses_a_folder_that_is_not_a_run(tmp_path):
    res = CliRunner().invoke(app, ["score", str(tmp_path), "--clip-model", "tiny-clip"])
    assert res.exit_code == 2 and "not an hpcwalk run folder" in res.output
    assert list(tmp_path.iterdir()) == []


def test_render_columns_are_float16_unit_embeddings(run):
    t = pq.read_table(run / "frames", columns=["frame_id", "clip_image", "clip_score"])
    e = t["clip_image"].combine_chunks().values.to_numpy(zero_copy_only=False)
    assert e.dtype == np.float16
    assert np.allclose(np.linalg.norm(e.astype(np.float32).reshape(-1, 32), axis=1), 1, atol=2e-3)


@pytest.mark.parametrize("content", [b"\xff", b'{"run_fingerprint": "ab', b"[]"], ids=["odd bytes", "cut short", "a list"])
def test_a_damaged_score_json_is_one_line_and_overwrite_rescores(run, content):
    """scores/NAME/score.json damaged: `hpcwalk score` gave a traceback. Now one line naming the file and
    --overwrite, exit 2, nothing touched; with --overwrite every shard is scored again."""
    folder = run / "scores" / "tiny-clip__none"
    if not (folder / "score.json").exists():
        assert _score(run, "--clip-model", "tiny-clip").exit_code == 0
    (folder / "score.json").write_bytes(content)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.rglob("*"))
    res = _score(run, "--clip-model", "tiny-clip")
    assert res.exit_code == 2, res.output
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("error: ") and "score.json" in line and "damaged" in line and "--overwrite" in line, line
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.rglob("*")) == before
    res = _score(run, "--clip-model", "tiny-clip", "--overwrite")
    assert res.exit_code == 0 and "9 frames in 3 shards scored" in res.output, res.output
    assert json.loads((folder / "score.json").read_bytes())["run_fingerprint"]

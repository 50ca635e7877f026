"""`hpcwalk render` end to end: output readable by pyarrow/DuckDB/Polars, determinism, resume,
and bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from hpcwalk.cli import app
from hpcwalk.store.reader import committed_files, read_frames
from jobs import cat_walk, tiny_job_toml, walk

ROOT = Path(__file__).resolve().parent.parent
SMALL = tiny_job_toml(
    cat_walk(methods=["linear", "slerp"], frames=6),
    walk("t", "translate", prompt="a dog", seeds=[3, 4], stride=4),
    batch_size=4, shard_size=5)


@pytest.fixture
def small_job(tmp_path) -> Path:
    p = tmp_path / "small.toml"
    p.write_text(SMALL)
    return p


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_quickstart_via_console_script_reads_back_everywhere(tmp_path):
    """The README's first command (minus the install) on the quickstart job."""
    out = tmp_path / "qs"
    proc = subprocess.run(["hpcwalk", "render", str(ROOT / "examples" / "quickstart.toml"), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "done: 69 frames in 5 shards rendered" in proc.stdout
    import duckdb
    import polars as pl
    import pyarrow.dataset as ds

    t = ds.dataset(str(out / "frames"), format="parquet").to_table()
    assert t.num_rows == 69 and t.schema.field("image").type == "binary"
    n = duckdb.sql(f"select count(distinct frame_id) from read_parquet('{out}/frames/*.parquet')").fetchall()[0][0]
    assert n == 69
    df = pl.read_parquet(f"{out}/frames/*.parquet")
    assert df.height == 69 and set(df["kind"].unique()) == {"latent", "text", "translate", "mix", "std", "prompts"}
    meta = pq.read_schema(committed_files(str(out))[0]).metadata
    assert meta[b"model_id"] == b"tiny" and meta[b"steps"] == b"30" and meta[b"scheduler"] == b"dpmsolver++"
    assert b"beta_schedule" in meta[b"scheduler_config"]


def test_render_is_deterministic_and_resumes(small_job, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ra = invoke("render", str(small_job), "--out", str(a), "--no-progress")
    assert ra.exit_code == 0, ra.output
    assert "done: 15 frames in 3 shards rendered" in ra.stdout
    rb = invoke("render", str(small_job), "--out", str(b), "--no-progress", "--batch-size", "3")
    assert rb.exit_code == 0, rb.output
    ta, tb = read_frames(str(a)), read_frames(str(b))
    assert ta.column("frame_id").to_pylist() == tb.column("frame_id").to_pylist()
    # a third run with the same batch size: identical PNG bytes
    c = tmp_path / "c"
    assert invoke("render", str(small_job), "--out", str(c), "--no-progress").exit_code == 0
    assert read_frames(str(c)).column("image").to_pylist() == ta.column("image").to_pylist()
    # resume: delete one commit marker -> only that shard renders again
    os.remove(a / "commits" / "shard-00001.done.json")
    rr = invoke("render", str(small_job), "--out", str(a), "--no-progress")
    assert rr.exit_code == 0, rr.output
    assert "done: 5 frames in 1 shards rendered, 2 shards already committed" in rr.stdout
    assert read_frames(str(a)).column("image").to_pylist() == ta.column("image").to_pylist()


def test_batch_size_does_not_change_frames_beyond_bound(small_job, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    outs = []
    for bs in ("1", "4"):
        o = tmp_path / f"bs{bs}"
        assert invoke("render", str(small_job), "--out", str(o), "--no-progress", "-b", bs).exit_code == 0
        outs.append([np.asarray(Image.open(io.BytesIO(x))) for x in read_frames(str(o)).column("image").to_pylist()])
    diff = max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(*outs))
    assert diff <= 1


def test_other_job_in_same_folder_refused_unless_overwrite(small_job, tmp_path):
    out = tmp_path / "o"
    assert invoke("render", str(small_job), "--out", str(out), "--no-progress").exit_code == 0
    other = tmp_path / "other.toml"
    other.write_text(SMALL.replace("steps = 4", "steps = 3"))
    r = invoke("render", str(other), "--out", str(out), "--no-progress")
    assert r.exit_code == 2 and "holds another job" in r.stderr and "--overwrite" in r.stderr
    assert read_frames(str(out)).num_rows == 15  # nothing lost
    r = invoke("render", str(other), "--out", str(out), "--no-progress", "--overwrite")
    assert r.exit_code == 0 and "done: 15 frames in 3 shards rendered" in r.stdout


def _assert_bad(result, needle, out: Path):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not out.exists(), "bad input must write nothing"


def test_bad_inputs_exit_2_one_line_nothing_written(small_job, tmp_path):
    out = tmp_path / "never"
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    _assert_bad(invoke("render", str(bad), "--out", str(out)), "malformed TOML", out)
    for line, edited, needle in [  # SMALL with `line` replaced by `edited`
        ("frames = 6", "frames = 6\nframs = 2", "did you mean 'frames'"),
        ('methods = ["linear", "slerp"]', 'methods = ["cubic"]', "unknown value 'cubic'"),
        ('kind = "translate"', 'kind = "rotate"', "unknown value 'rotate'"),
        ("frames = 6", "frames = 1", "frames must be >= 2"),
        ("seeds = [1, 2]", "seeds = [1]", "at least 2 seeds"),
        ("width = 64", "width = 60", "multiple of 8"),
    ]:
        assert line in SMALL
        bad.write_text(SMALL.replace(line, edited))
        _assert_bad(invoke("render", str(bad), "--out", str(out)), needle, out)
    _assert_bad(invoke("render", str(small_job), "--out", str(out), "--model", str(tmp_path / "no-such-model")),
                "no model_index.json", out)
    _assert_bad(invoke("render", str(small_job), "--out", str(out), "--model", str(tmp_path / "w.safetensors")),
                "does not exist", out)
    _assert_bad(invoke("render", str(small_job), "--out", str(out), "--dtype", "float16"), "float16 on the CPU", out)
    _assert_bad(invoke("render", str(small_job), "--out", str(out), "-b", "0"), "batch_size must be >= 1", out)
    _assert_bad(invoke("render", str(tmp_path / "nope.toml"), "--out", str(out)), "not found", out)


def test_unwritable_output_exit_2(small_job, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = invoke("render", str(small_job), "--out", str(blocker / "run"))
    assert r.exit_code == 2 and "not writable" in r.stderr
    r = invoke("render", str(small_job), "--out", str(blocker))
    assert r.exit_code == 2 and "is a file" in r.stderr
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    r = invoke("render", str(small_job), "--out", str(stranger), "--overwrite")
    assert r.exit_code == 2 and "not an hpcwalk run" in r.stderr
    assert (stranger / "notes.txt").read_text() == "mine"


def test_render_help_explains_every_option():
    r = invoke("render", "--help")
    assert r.exit_code == 0
    for opt in ("--out", "--model", "--device", "--dtype", "--batch-size", "--shard-size", "--overwrite", "--progress"):
        assert opt in r.stdout

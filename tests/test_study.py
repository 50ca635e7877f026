"""`hpcwalk study`: 4 seed pairs x 3 methods x 9 frames on the tiny model, rendered and scored in one
pass; the three outputs; resume; the columns read back with DuckDB and Polars; bad input."""

from __future__ import annotations

import base64
import json
import os
import re
import tomllib
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from hpcwalk.cli import app
from hpcwalk.core.errors import JobError
from hpcwalk.job.plan import plan
from hpcwalk.job.studyspec import parse_study

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "study.toml"
FAST = {"steps = 30": "steps = 2", "guidance = 7.5": "guidance = 1.0"}  # speed only; the example as it is runs slow below


def _study_file(tmp: Path, **study) -> Path:
    text = EXAMPLE.read_text()
    for old, new in FAST.items():
        assert old in text
        text = text.replace(old, new)
    for key, value in study.items():
        text = re.sub(rf"^{key} = .*$", f"{key} = {json.dumps(value)}", text, flags=re.M)
    path = tmp / "study.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    out = tmp / "out"
    res = CliRunner().invoke(app, ["study", str(_study_file(tmp)), "--out", str(out), "--device", "cpu", "--no-progress"])
    print(res.output)
    assert res.exit_code == 0, res.output
    return tmp, out, res.output


def test_study_writes_all_three_outputs(study_run):
    _, out, output = study_run
    walks = pq.read_table(out / "study.parquet")
    assert walks.num_rows == 4 * 3  # pairs x methods
    assert sorted(set(walks["method"].to_pylist())) == ["linear", "normalized", "slerp"]
    summary = json.loads((out / "study.json").read_text())
    assert set(summary["interp_score"]["clip"]) == {"linear", "normalized", "slerp"}
    assert set(summary["paired_differences"]["clip"]) == {"linear - normalized", "linear - slerp", "normalized - slerp"}
    for iv in summary["interp_score"]["clip"].values():
        assert iv["low"] <= iv["estimate"] <= iv["high"] and iv["n"] == 4
    assert summary["clip_models"] == {"clip": "tiny-clip/none"}
    assert len(summary["score_curves"]["clip"]["slerp"]["mean"]) == 9
    assert len(summary["step_curves"]["clip"]["slerp"]["mean"]) == 8
    html = (out / "report.html").read_text()
    pngs = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert len(pngs) == 6 and all(base64.b64decode(p).startswith(b"\x89PNG") for p in pngs)
    for name in ("interp_score", "paired_differences", "score_vs_gamma", "latent_norm", "smoothness", "yardsticks"):
        assert (out / "figures" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert "InterpScore clip     linear:" in output and "report:" in output
    # every yardstick, on tiny: CLIP, sharpness, SSIM and LPIPS steps, KID on CLIP and tiny-dinov2 features
    assert list(summary["yardsticks"]) == ["interp_score", "sharpness", "ssim_step", "lpips_step", "kid_clip",
                                           "kid_encoder"]
    for name, y in summary["yardsticks"].items():
        assert sorted(y["ranking"]) == ["linear", "normalized", "slerp"] and len(y["paired"]) == 3
        assert all(0 <= t["p"] <= t["p_holm"] <= 1 for t in y["paired"].values()), name
        assert (name == "interp_score") == ("agreement" not in y)
    # 4 pairs cannot resolve anything under Holm over 3 comparisons (7 are needed): the answer says so first
    assert summary["answer"].startswith("With 4 seed pairs nothing can resolve: ") and "needs at least 7 pairs" in summary["answer"]
    assert "Rankings over 4 seed pairs" in summary["answer"] and "CLIP's ranking" in summary["answer"]
    assert "no difference resolved" in summary["answer"] and "resolved:" not in summary["answer"]
    assert any("Only 4 seed pairs" in w for w in summary["warnings"])
    assert any(w.startswith("Random weights: the Stable Diffusion model (tiny), CLIP tiny-clip/none, the encoder "
                            "tiny-dinov2, LPIPS alex-random") for w in summary["warnings"])
    assert html.index("id=answer") < html.index("id=warnings") < html.index("<h2>Results")


def test_study_rows_are_the_formulas_over_the_frames(study_run):
    """InterpScore = mean clip_score of the walk's frames; path length from consecutive embeddings,
    recomputed by DuckDB (array_cosine_similarity on the cast embedding)."""
    import duckdb

    _, out, _ = study_run
    frames = f"{out}/frames/*.parquet"
    got = {(r["walk"], r["method"]): r for r in pq.read_table(out / "study.parquet").to_pylist()}
    rows = duckdb.sql(f"""
        WITH f AS (SELECT walk, method, index, clip_score, clip_image::FLOAT[32] AS e,
                          lag(clip_image::FLOAT[32]) OVER (PARTITION BY walk, method ORDER BY index) AS prev
                   FROM '{frames}')
        SELECT walk, method, avg(clip_score) AS score, count(*) AS n,
               sum(1 - array_cosine_similarity(e, prev)) AS path, max(1 - array_cosine_similarity(e, prev)) AS jump
        FROM f GROUP BY walk, method""").fetchall()
    assert len(rows) == 12
    for walk, method, score, n, path, jump in rows:
        r = got[(walk, method)]
        assert n == 9
        assert r["interp_score"] == pytest.approx(score, rel=1e-6)
        assert r["path_length"] == pytest.approx(path, rel=1e-3, abs=1e-6)
        assert r["max_step"] == pytest.approx(jump, rel=1e-3, abs=1e-6)
    sharp = dict(((w, m), v) for w, m, v in duckdb.sql(
        f"SELECT walk, method, avg(sharpness) FROM '{frames}' GROUP BY ALL").fetchall())
    for key, r in got.items():
        assert r["sharpness_mean"] == pytest.approx(sharp[key], rel=1e-5)
        assert 0 < r["ssim_step_mean"] <= r["ssim_step_max"] < 1 and 0 <= r["lpips_step_mean"] <= r["lpips_step_max"]
        assert r["score_prompt"] == "A high resolution image of a cat" and r["prompt"] == "An high resolution photo of a cat"
    # the distribution shift linear interpolation causes: ||z|| / sqrt(dim) dips to ~1/sqrt(2) at gamma 0.5
    for r in got.values():
        if r["method"] == "linear":
            assert r["latent_norm_min"] < 0.8
        else:
            assert r["latent_norm_min"] > 0.9


def test_clip_columns_read_back_with_polars_and_duckdb(study_run):
    import duckdb
    import polars as pl

    _, out, _ = study_run
    df = pl.read_parquet(f"{out}/frames/*.parquet")
    assert df.schema["clip_image"] == pl.Array(pl.Float16, 32)
    assert df["clip_score"].dtype == pl.Float32 and df["clip_score"].null_count() == 0
    assert df["clip_score_b"].null_count() == df.height  # latent walks have no end prompt
    e = df.sort("frame_id")["clip_image"].to_numpy().astype(np.float32)
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=2e-3)
    first = df.sort("frame_id")["frame_id"][0]
    cos = duckdb.sql(f"SELECT array_cosine_similarity(clip_image::FLOAT[32], clip_image::FLOAT[32]) FROM "
                     f"'{out}/frames/*.parquet' WHERE frame_id = '{first}'").fetchall()[0][0]
    assert cos == pytest.approx(1.0, abs=1e-6)
    meta = pq.read_schema(sorted((out / "frames").glob("*.parquet"))[0]).metadata
    assert meta[b"clip_model"] == b"tiny-clip/none"


def test_rerun_resumes_and_rewrites_the_analysis(study_run):
    tmp, out, _ = study_run
    before = json.loads((out / "study.json").read_text())
    (out / "study.json").unlink()
    res = CliRunner().invoke(app, ["study", str(tmp / "study.toml"), "--out", str(out), "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "0 frames in 0 shards rendered, 4 shards already committed" in res.output
    assert json.loads((out / "study.json").read_text())["interp_score"] == before["interp_score"]


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.replace("[study]", "[studdy]"), "no [study] table"),
    (lambda t: t.replace("pairs = 4", "pairz = 4"), "unknown key 'pairz' in [study] (did you mean 'pairs'?)"),
    (lambda t: t.replace('"slerp"]', '"slurp"]'), "unknown method 'slurp'"),
    (lambda t: t.replace("frames = 9 ", "frames = 1 "), "[study] frames must be an int >= 2"),
    (lambda t: t.replace("pairs = 4", "pairs = 0"), "[study] pairs must be an int >= 1"),
    (lambda t: t + '\n[[walk]]\nname = "x"\n', "has no [[walk]] tables"),
    (lambda t: t.replace('pretrained = "none"', 'pretrained = "none"\nenabled = false'), "needs CLIP scores"),
    (lambda t: t.replace('model = "tiny-clip"', 'model = "ViT-L-14"').replace('"none"', '"openai"'),
     "ViT-L-14/openai are not in the local cache"),
])
def test_bad_study_exits_2_and_writes_nothing(tmp_path, edit, needle):
    path = tmp_path / "bad.toml"
    path.write_text(edit(EXAMPLE.read_text()))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["study", str(path), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.ray
def test_study_with_ray_checks_the_device_on_the_workers_not_here(tmp_path):
    """With --ray the driver may be a CPU-only head: a CUDA float16 study is not refused here for
    lacking CUDA (it was, before), but by the cluster, which has no GPUs: exit 2, nothing written."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the local Ray instance would have GPUs and the study would render")
    out = tmp_path / "s"
    res = CliRunner().invoke(app, ["study", str(EXAMPLE), "--out", str(out), "--device", "cuda", "--dtype", "float16",
                                   "--no-progress", "--ray", "local", "--workers", "1"])
    assert res.exit_code == 2, res.output
    assert "the Ray cluster has no GPUs" in res.output and "pass --device cpu" in res.output
    assert not out.exists()


def test_study_refuses_a_remote_out(tmp_path):
    res = CliRunner().invoke(app, ["study", str(EXAMPLE), "--out", "s3://bucket/x"])
    assert res.exit_code == 2 and "local path" in res.output


def test_parse_study_builds_one_latent_walk_per_pair_and_prompt():
    data = tomllib.loads(EXAMPLE.read_text())
    data["study"].update(prompts=["a cat", "a dog"], pairs=3, first_seed=10)
    st = parse_study(data)
    assert len(st.job.walks) == 6
    w = st.job.walks[3]  # pair 1, prompt 1
    assert (w.name, w.prompt, [str(s) for s in w.seeds]) == ("pair00001-prompt01", "a dog", ["11", "11:1"])
    assert w.methods == ("linear", "normalized", "slerp") and w.frames == 9
    with pytest.raises(JobError, match="exactly one of them"):
        parse_study({**data, "study": {**data["study"], "prompt": "x"}})


@pytest.mark.slow
@pytest.mark.timeout(1200)  # about 3 CPU-minutes of rendering; far longer when the 2 cores are shared
def test_example_study_as_specified(tmp_path):
    """The acceptance run: examples/study.toml unchanged (tiny, 4 pairs x 3 methods x 9 frames, 30 steps)."""
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["study", str(EXAMPLE), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    for name in ("study.parquet", "study.json", "report.html"):
        assert (out / name).stat().st_size > 0
    assert os.path.getsize(out / "figures" / "latent_norm.png") > 0


def _synthetic_frames(st, drop_last: bool = False):
    """A frames table for a study without rendering: known scores, unit embeddings along a circle."""
    import pyarrow as pa

    rows, emb = [], []
    for name, pair, k in st.spec.units():
        for j, m in enumerate(st.spec.methods):
            for i in range(st.spec.frames):
                rows.append({"walk": name, "method": m, "index": i, "latent_norm": 1.0,
                             "clip_score": float(10 * pair + k + j + i / 10)})
                a = (pair + j + 1) * 0.1 * i
                emb.append([np.cos(a), np.sin(a), 0.0, 0.0])
    if drop_last:
        rows, emb = rows[:-1], emb[:-1]
    t = pa.Table.from_pylist(rows)
    e = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(emb, np.float16).reshape(-1)), 4)
    return t.append_column("clip_image", e)


def test_summary_averages_prompts_within_a_pair_and_reports_each_prompt():
    from hpcwalk.analyse.interpscore import summarize, walk_table

    data = tomllib.loads(EXAMPLE.read_text())
    data["study"].update(prompts=["a cat", "a dog"], pairs=3, frames=5, bootstrap=500)
    st = parse_study(data)
    frames = _synthetic_frames(st)
    walks = walk_table(st, frames.take(np.random.default_rng(0).permutation(frames.num_rows)))  # any row order
    assert walks.num_rows == 3 * 2 * 3
    r = next(r for r in walks.to_pylist() if r["walk"] == "pair00002-prompt01" and r["method"] == "slerp")
    assert r["interp_score"] == pytest.approx(10 * 2 + 1 + 2 + 0.2)  # mean of i/10 over 5 frames = 0.2
    assert r["path_length"] == pytest.approx(4 * (1 - np.cos(0.5)), rel=2e-3)  # 4 even steps of 0.5 rad
    assert r["step_cv"] == pytest.approx(0.0, abs=1e-2)
    s = summarize(st, frames, walks, {"clip_model": "m/none"})
    # per pair: mean over the two prompts (k = 0, 1), then over pairs 0..2: 10 + 0.5 + j + 0.2
    assert s["interp_score"]["clip"]["linear"]["estimate"] == pytest.approx(10.7)
    assert s["paired_differences"]["clip"]["linear - slerp"]["estimate"] == pytest.approx(-2.0)
    assert s["per_prompt"]["clip"]["a dog"]["normalized"]["estimate"] == pytest.approx(10 + 1 + 1 + 0.2)
    assert s["score_curves"]["clip"]["linear"]["mean"] == pytest.approx([10.5 + i / 10 for i in range(5)])
    # a pair with an incomplete walk is left out whole (its methods stay paired); the rest is analysed
    part = _synthetic_frames(st, drop_last=True)  # pair 2's last walk lacks its last frame
    walks = walk_table(st, part)
    assert sorted(set(walks["pair"].to_pylist())) == [0, 1] and walks.num_rows == 2 * 2 * 3
    s = summarize(st, part, walks, {"clip_model": "m/none"})
    assert (s["n_units"], s["pairs_left_out"], s["left_out_pairs"]) == (2, 1, [2])
    assert s["interp_score"]["clip"]["linear"]["estimate"] == pytest.approx(5.7)  # pairs 0, 1: 10 * 0.5 + 0.5 + 0.2
    assert len(s["score_curves"]["clip"]["linear"]["mean"]) == 5
    with pytest.raises(JobError, match="no seed pair has all its walks complete"):
        walk_table(st, part.filter(pc.not_equal(part["index"], 4)))


def test_study_walks_can_be_eased_and_the_analysis_reads_the_eased_grid():
    """[study] easing: every generated walk is eased, and the curves and KID bins are against the eased gammas;
    pace is refused with the reason (one gamma grid for every pair)."""
    from hpcwalk.job.pacing import ease
    from hpcwalk.analyse.interpscore import summarize, walk_table

    data = tomllib.loads(EXAMPLE.read_text())
    data["study"].update(pairs=3, frames=5, bootstrap=500, easing="ease-in-out", easing_exponent=3.0)
    st = parse_study(data)
    grid = ease(np.linspace(0, 1, 5), "ease-in-out", 3.0)
    assert {(w.easing, w.easing_exponent) for w in st.job.walks} == {("ease-in-out", 3.0)}
    assert [r.gamma for r in plan(st.job) if r.walk == "pair00000" and r.method == "slerp"] == grid.tolist()
    np.testing.assert_array_equal(st.spec.gamma(), grid)
    frames = _synthetic_frames(st)
    s = summarize(st, frames, walk_table(st, frames), {"clip_model": "m/none"})
    assert s["score_curves"]["clip"]["slerp"]["x"] == grid.tolist() and s["study"]["easing"] == "ease-in-out"
    for edit, needle in (({"pace": "even"}, "[study] pace: a study keeps one gamma grid for every seed pair"),
                         ({"easing": "bouncy"}, "[study] easing: unknown value 'bouncy'"),
                         ({"easing_exponent": 99.0}, "[study] easing_exponent must be <= 16")):
        with pytest.raises(JobError, match=re.escape(needle)):
            parse_study({**data, "study": {**data["study"], **edit}})

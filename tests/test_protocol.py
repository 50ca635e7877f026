"""The study's own protocol: examples/cat.toml plans exactly the study's frames and prompts; a scoring prompt
apart from the generation prompt, on walks, in studies and in `hpcwalk score --prompt`; both readings of C;
explicit gammas; bad values exit 2 with one line."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from hpcwalk.render import interp
from hpcwalk.cli import app
from hpcwalk.core.errors import JobError
from hpcwalk.job.parse import load_job, parse_job
from hpcwalk.job.plan import plan
from jobs import tiny_job_toml, walk

ROOT = Path(__file__).resolve().parent.parent
GEN, SCORE = "An high resolution photo of a cat", "A high resolution image of a cat"


def test_cat_toml_plans_exactly_the_studys_frames_and_prompts():
    job = load_job(ROOT / "examples" / "cat.toml")
    rows = plan(job)
    per = Counter((r.walk, r.method) for r in rows)
    assert per == {("cat", "linear"): 300, ("cat", "normalized"): 300, ("cat", "slerp"): 300,
                   ("cat-translate", ""): 65, ("cat-mix", "end-left"): 65, ("cat-std", ""): 21,
                   ("cat-to-dog", "linear"): 30, ("cat-to-dog", "slerp"): 30, ("one-latent", ""): 4}
    assert len(rows) == 1115
    s = job.sampling
    assert (job.model.id, s.scheduler, s.steps, s.guidance, s.height, s.width) == (
        "CompVis/stable-diffusion-v1-4", "dpmsolver++", 30, 7.5, 512, 512)
    assert job.clip.models(job.model.id)[0][1:] == ("ViT-L-14", "openai")
    cat = [r for r in rows if r.walk == "cat"]
    for m in ("linear", "normalized", "slerp"):  # gamma = i / (n - 1), n = 300, from seed 1's two draws
        g = [r.gamma for r in cat if r.method == m]
        assert g == [i / 299 for i in range(300)]
    assert {(r.seed, r.draw, r.seed_b, r.draw_b) for r in cat} == {(1, 0, 1, 1)}
    assert {(r.prompt, r.score_prompt) for r in cat} == {(GEN, SCORE)}  # generation and scoring prompts apart
    assert [r.t for r in rows if r.walk == "cat-translate"] == list(range(65))  # T for t = 0..64
    assert [r.t for r in rows if r.walk == "cat-mix"] == list(range(65))
    std = [r.std for r in rows if r.walk == "cat-std"]
    assert std[0] == 0.5 and std[-1] == 1.5 and np.allclose(np.diff(std), 0.05)
    text = [r for r in rows if r.walk == "cat-to-dog"]
    assert {(r.prompt, r.prompt_b, r.score_prompt, r.score_prompt_b) for r in text} == {
        (GEN, "An high resolution photo of a dog", SCORE, "A high resolution image of a dog")}
    people = [r for r in rows if r.walk == "one-latent"]
    assert len({r.prompt for r in people}) == 4 and {(r.seed, r.draw) for r in people} == {(1, 0)}
    assert all(r.score_prompt == r.prompt for r in people)


JOB = tiny_job_toml(
    walk("w", "latent", prompt=GEN, score_prompt=SCORE, seeds=[1, 2], methods=["slerp"], frames=2),
    walk("t", "text", prompts=[GEN, "a dog"], score_prompts=[SCORE, "an image of a dog"], seed=1, frames=2),
    walk("m", "mix", prompt=GEN, seeds=[1, 2], stride=4, layout="end-right"),
    steps=2, guidance=1.0, batch_size=4, shard_size=4)


def test_clip_score_follows_the_scoring_prompt(renderer, job):
    """The render scores each frame against its walk's score_prompt (and text walks' ends against
    score_prompts), not the generation prompt; the rows carry both."""
    rows = [r for r in plan(job) if r.walk in ("w", "t")]
    out = renderer.render(rows)
    scorer = renderer.scorers[0]
    img = scorer.embed_images(torch.from_numpy(out.images))
    score = out.extra["clip_score"].to_numpy(zero_copy_only=False)
    want = torch.clamp(100 * (img * scorer.embed_texts([r.score_prompt for r in rows])).sum(-1), min=0).numpy()
    gen = torch.clamp(100 * (img * scorer.embed_texts([r.prompt for r in rows])).sum(-1), min=0).numpy()
    assert [r.score_prompt for r in rows] == [SCORE] * 4 and [r.prompt for r in rows] == [GEN] * 4
    assert np.allclose(score, want, atol=1e-4)
    assert np.abs(score - gen).max() > 1e-2  # the generation prompt would give other scores
    end = scorer.embed_texts(["an image of a dog"])[0]
    b = out.extra["clip_score_b"].to_pylist()
    for i, r in enumerate(rows):
        if r.walk == "t":
            assert b[i] == pytest.approx(max(100 * float(img[i] @ end), 0.0), abs=1e-4)
        else:
            assert b[i] is None


def test_score_prompt_column_and_rescoring_with_another_prompt(job_file, tmp_path):
    """`render` stores score_prompt per row; `hpcwalk score RUN --prompt TEXT` re-scores every frame against
    TEXT with the run's own CLIP model, into a folder named by the text's hash."""
    from hpcwalk.render.clip import load_clip
    from PIL import Image
    import io

    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["render", job_file, "--out", str(run), "--no-progress"])
    assert res.exit_code == 0, res.output
    frames = pq.read_table(run / "frames", columns=["frame_id", "walk", "score_prompt", "score_prompt_b", "image"])
    got = dict(zip(frames["walk"].to_pylist(), frames["score_prompt"].to_pylist()))
    assert got == {"w": SCORE, "t": SCORE, "m": GEN}
    res = CliRunner().invoke(app, ["score", str(run), "--prompt", "a photo of a bird", "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    slug = "tiny-clip__none__prompt-" + hashlib.sha256(b"a photo of a bird").hexdigest()[:10]
    scored = pq.read_table(run / "scores" / slug / "data").to_pylist()
    assert len(scored) == frames.num_rows and {r["score_prompt"] for r in scored} == {"a photo of a bird"}
    scorer = load_clip("tiny-clip", "none")
    by_id = {r["frame_id"]: r for r in scored}
    for fid, data in zip(frames["frame_id"].to_pylist(), frames["image"].to_pylist()):
        img = scorer.embed_images(torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB")))[None])
        want = max(100 * float(img[0] @ scorer.embed_texts(["a photo of a bird"])[0]), 0.0)
        assert by_id[fid]["clip_score"] == pytest.approx(want, abs=1e-4)
    res = CliRunner().invoke(app, ["score", str(run), "--prompt", "  ", "--no-progress"])
    assert res.exit_code == 2 and "--prompt is empty" in res.output


@pytest.mark.parametrize("layout", ["end-left", "end-right"])
def test_mix_layouts_against_hand_built_tensors(layout):
    z0 = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    z1 = -z0 - 1
    out = interp.mix(z0, z1, list(range(6)), layout=layout)
    for t in range(6):
        want = (torch.cat((z1[..., :t], z0[..., t:]), -1) if layout == "end-left"
                else torch.cat((z0[..., :5 - t], z1[..., 5 - t:]), -1))
        assert torch.equal(out[t], want)
    assert torch.equal(out[0], z0) and torch.equal(out[5], z1)
    if layout == "end-right":  # T without the shift: the same columns come from z_end as in T, each at its place
        tr = interp.translate(z0, z1, [2])[0]
        assert torch.equal((out[2] < 0), (tr < 0))
    with pytest.raises(ValueError, match="unknown mix layout"):
        interp.mix(z0, z1, [1], layout="middle")


def test_renderer_uses_the_walks_mix_layout(renderer, job):
    rows = [r for r in plan(job) if r.walk == "m"]
    assert {r.method for r in rows} == {"end-right"} and [r.t for r in rows] == [0, 4, 8]
    z = renderer.latents(rows)
    a, b = renderer.noise(_key(rows[0], 0)), renderer.noise(_key(rows[0], 1))  # (4, 8, 8) each
    for i, r in enumerate(rows):
        assert torch.equal(z[i], torch.cat((a[..., :8 - r.t], b[..., 8 - r.t:]), -1))


def _key(r, end: int):
    from hpcwalk.job.spec import NoiseKey

    return NoiseKey(r.seed, r.draw) if end == 0 else NoiseKey(r.seed_b, r.draw_b)


def test_explicit_gammas_are_planned_as_given():
    base = {"model": {"id": "tiny"}, "sampling": {"height": 64, "width": 64}}
    job = parse_job({**base, "walk": [{"name": "g", "kind": "latent", "prompt": "a", "seeds": [1, 2],
                                       "methods": ["slerp"], "gammas": [0, 0.1, 0.5, 1]}]})
    assert [r.gamma for r in plan(job)] == [0.0, 0.1, 0.5, 1.0]
    assert job.walks[0].frames == 4


@pytest.mark.parametrize("line, needle", [
    ("gammas = [0.0, nan, 1.0]", "gammas must be finite and in [0, 1]"),
    ("gammas = [0.0, inf]", "gammas must be finite and in [0, 1]"),
    ("gammas = [0.0, 1.5]", "gammas must be finite and in [0, 1]"),
    ("gammas = [0.5, 0.2, 1.0]", "strictly increasing"),
    ("gammas = [0.0, 0.0, 1.0]", "strictly increasing"),
    ("gammas = [0.5]", "at least 2 numbers"),
    ('gammas = ["a", 1.0]', "at least 2 numbers"),
    ("gammas = [0.0, 1.0]\nframes = 3", "give frames or gammas, not both"),
    ('layout = "middle"', "layout: unknown value 'middle'"),
    ('score_prompts = ["a", "b"]', "unknown key 'score_prompts'"),
])
def test_bad_protocol_values_exit_2_and_write_nothing(tmp_path, line, needle):
    kind = "mix" if "layout" in line else "latent"
    body = (f'prompt = "a"\nseeds = [1, 2]\n{line}\n' if kind == "mix" else
            f'prompt = "a"\nseeds = [1, 2]\nmethods = ["slerp"]\n{line}\n')
    if "frames" not in line and "gammas" not in line and kind == "latent":
        body += "frames = 2\n"
    text = tiny_job_toml() + f'[[walk]]\nname = "x"\nkind = "{kind}"\n' + body
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["render", str(path), "--out", str(out), "--no-progress"])
    assert res.exit_code == 2, res.output
    assert needle in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()


def test_text_walk_score_prompts_need_one_per_prompt():
    w = {"name": "t", "kind": "text", "prompts": ["a", "b"], "score_prompts": ["x"], "seed": 1, "frames": 2}
    with pytest.raises(JobError, match="one text per prompt"):
        parse_job({"walk": [w]})
    with pytest.raises(JobError, match="not both"):
        parse_job({"walk": [{**w, "score_prompts": ["x", "y"], "score_prompt": "z"}]})


def test_study_score_prompt_reaches_every_walk():
    import tomllib

    from hpcwalk.job.studyspec import parse_study

    data = tomllib.loads((ROOT / "examples" / "study.toml").read_text())
    st = parse_study(data)
    assert {(w.prompt, w.score_prompt) for w in st.job.walks} == {(GEN, SCORE)}
    data["study"].pop("score_prompt")
    data["study"].update(prompts=["a", "b"], score_prompts=["x", "y"], pairs=2)
    assert [(w.prompt, w.score_prompt) for w in parse_study(data).job.walks] == [("a", "x"), ("b", "y")] * 2
    data["study"].update(score_prompts=["x"])
    with pytest.raises(JobError, match="one text per prompt"):
        parse_study(data)
    data["study"].pop("score_prompts")
    data["study"].update(gammas=[0.0, 0.3, 1.0])
    data["study"].pop("frames")
    st = parse_study(data)
    assert st.spec.frames == 3 and list(st.spec.gamma()) == [0.0, 0.3, 1.0]
    assert [r.gamma for r in plan(st.job)][:3] == [0.0, 0.3, 1.0]

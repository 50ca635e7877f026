"""Even pacing end to end (hpcwalk/run/evenpace.py through executors.run_render): on a path with a known uneven pace
the step_cv falls by a stated factor; the plan is a function of committed data (identical on rerun, and when
computed again); coinciding frames are copied, not rendered; readers show the final pass; a SIGKILL between or
during the passes loses nothing (trials in a fresh interpreter, as tests/test_sigkill.py)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from hpcwalk.job import pacing
from hpcwalk.render.engine import RenderOutput
from hpcwalk.run.local import run_render
from hpcwalk.job.parse import parse_job
from hpcwalk.job.plan import plan, shard
from hpcwalk.store.reader import read_frames
from jobs import run_trials

HERE = os.path.dirname(os.path.abspath(__file__))


class PathRenderer:
    """A stand-in renderer whose frames lie on a known uneven path: frame(gamma) has the CLIP image embedding
    (cos a, sin a), a = (pi / 2) gamma^3 (moving 3 gamma^2 times as fast at gamma as at 0), and a flat grey
    image of level 255 gamma^3. It records the gammas it was asked to render."""

    def __init__(self, job):
        self.c, self.device, self.endpoints, self.rendered = SimpleNamespace(scheduler_config={}), "cpu", None, []

    def render(self, rows, on_batch=None):
        g = np.array([r.gamma for r in rows], np.float64)
        self.rendered += list(g)
        a = np.pi / 2 * g**3
        emb = np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)  # (N, 2) unit vectors
        images = np.broadcast_to(np.rint(255 * g**3).astype(np.uint8)[:, None, None, None], (len(rows), 8, 8, 3)).copy()
        if on_batch:
            on_batch(len(rows))
        clip = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()), 2)
        return RenderOutput(list(rows), images, np.ones(len(rows), np.float32), {}, {"clip_image": clip})


def path_job(frames: int = 33, coarse: int = 9):
    return parse_job({"model": {"id": "tiny"}, "sampling": {"steps": 1, "height": 8, "width": 8},
                      "output": {"shard_size": 8}, "walk": [
                          {"name": "w", "kind": "latent", "prompt": "p", "seeds": [1, 2], "methods": ["slerp"],
                           "frames": frames, "pace": "even", "pace_coarse": coarse, "pace_measure": "clip"}]})


def _render(job, out, renderer=None):
    r = renderer or PathRenderer(job)
    summary = run_render(job, out, shard(plan(job), job.output.shard_size), progress=False, factory=lambda j: r)
    assert not summary.failed, [x.error for x in summary.failed]
    return summary, r


def test_even_pacing_evens_a_known_uneven_path(tmp_path):
    job = path_job()
    out = str(tmp_path / "run")
    summary, r = _render(job, out)
    plan_file = os.path.join(out, "pacing", "w.json")
    steps = json.load(open(os.path.join(out, "pacing", "w.steps.json")))["methods"]["slerp"]
    before, after = steps["step_cv_coarse"], steps["step_cv_final"]
    print(f"step_cv: uniform coarse pass (9 frames) {before:.3f} -> even final pass (33 frames) {after:.4f} "
          f"({before / after:.0f}x)")
    assert after < before / 20  # the stated factor (PCHIP of the cumulative chord length, phase 1: 72x)
    assert any("step_cv" in line and "evenly paced frames" in line for line in summary.notes)
    # 1. the final gammas are pacing.even_gammas of the committed coarse pass
    coarse = np.arange(9) / 8
    a = np.pi / 2 * coarse**3
    emb = np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32).astype(np.float64)
    from hpcwalk.core.metrics import step_distances

    want = pacing.even_gammas(coarse, pacing.chord_distance(step_distances(emb)), 33)
    t = read_frames(out).sort_by("frame_id")
    final = t.filter(pc.equal(t["pace_pass"], "final")).sort_by("index")
    assert final["gamma"].to_pylist() == [float(x) for x in want]
    assert final["position"].to_pylist() == [i / 32 for i in range(33)]
    # 2. frames at a coarse frame's gamma are copies of it, never rendered in the final pass
    reused = final.filter(pc.is_valid(final["reused_from"])).to_pylist()
    assert [x["reused_from"] for x in reused][:1] == ["w/slerp/c00000"] and reused[-1]["reused_from"] == "w/slerp/c00008"
    by_id = {x["frame_id"]: x for x in t.to_pylist()}
    for x in reused:
        c = by_id[x["reused_from"]]
        assert (x["image"], x["clip_image"], x["gamma"]) == (c["image"], c["clip_image"], c["gamma"])
    assert len(r.rendered) == 9 + 33 - len(reused)
    # 3. a rerun renders nothing and keeps the plan; computed again from the committed coarse pass, it is bit-equal
    first = open(plan_file, "rb").read()
    _render(job, out)
    assert open(plan_file, "rb").read() == first
    os.remove(plan_file)
    for name in os.listdir(os.path.join(out, "commits")):
        if int(name[6:11]) >= 2:  # the final shards: the 9 coarse rows fill shards 0 and 1
            os.remove(os.path.join(out, "commits", name))
    _render(job, out)
    assert open(plan_file, "rb").read() == first
    assert read_frames(out).sort_by("frame_id").column("gamma").to_pylist() == t.column("gamma").to_pylist()


DAMAGED_PLANS = {"odd bytes": b"\xff{[", "cut short": b'{"coarse_shards": {"0": "ab',
                 "an empty object": b"{}", "a list": b"[]",
                 "reuse out of range": None, "gammas NaN": None}


@pytest.mark.parametrize("kind", DAMAGED_PLANS, ids=DAMAGED_PLANS.keys())
def test_a_damaged_pacing_file_is_computed_again_never_a_traceback(tmp_path, kind):
    """RUN/pacing/WALK.json (the plan) and WALK.steps.json (the step_cv figures) damaged: the rerun raised
    UnicodeDecodeError, KeyError or IndexError (a traceback). Both are functions of committed data: the rerun
    says so in one warning, computes them again, bit-equal, and renders the same frames."""
    job = path_job(frames=9, coarse=3)
    out = str(tmp_path / "run")
    _render(job, out)
    ref = read_frames(out).sort_by("frame_id")
    files = {n: open(os.path.join(out, "pacing", n), "rb").read() for n in ("w.json", "w.steps.json")}
    for name, good in files.items():
        bad = DAMAGED_PLANS[kind]
        if bad is None:
            d = json.loads(good)
            if "reuse" not in json.dumps(d):
                continue  # the steps file has no reuse list nor gammas
            m = d["methods"]["slerp"]
            if kind == "reuse out of range":
                m["reuse"] = [10**6] * len(m["reuse"])
            else:
                m["final_gammas"] = [float("nan")] * len(m["final_gammas"])
            bad = json.dumps(d).encode()
        open(os.path.join(out, "pacing", name), "wb").write(bad)
        for c in os.listdir(os.path.join(out, "commits")):
            if int(c[6:11]) >= 1:  # the final shards (the 3 coarse rows fill shard 0)
                os.remove(os.path.join(out, "commits", c))
        with pytest.warns(Warning, match=rf"pacing/{name.replace('.', '[.]')}.*damaged.*computed again"):
            _render(job, out)
        assert open(os.path.join(out, "pacing", name), "rb").read() == good, name
        assert read_frames(out).sort_by("frame_id").equals(ref)


def test_final_pass_never_copies_from_a_damaged_coarse_shard(tmp_path):
    """A pacing plan on disk, a coarse shard replaced by another (parseable) file, and its re-render failing:
    the final shards that copy coarse frames wait (reported failed), instead of copying the damaged file's
    frames into a final shard with a fresh, valid marker."""
    import pyarrow.parquet as pq

    job = path_job(frames=9, coarse=3)
    out = str(tmp_path / "run")
    _render(job, out)
    shards = shard(plan(job), job.output.shard_size)
    coarse = [s.index for s in shards if any(r.pace_pass == "coarse" for r in s.rows)]
    final = [s.index for s in shards if s.index not in coarse]
    f = os.path.join(out, "frames", f"shard-{coarse[0]:05d}.parquet")
    t = pq.read_table(f)
    pq.write_table(t.set_column(t.schema.get_field_index("image"), "image", pa.array([b"damaged"] * t.num_rows)), f)
    for i in final:
        os.remove(os.path.join(out, "commits", f"shard-{i:05d}.done.json"))

    class CoarseFails(PathRenderer):
        def render(self, rows, on_batch=None):
            if any(r.pace_pass == "coarse" for r in rows):
                raise RuntimeError("the coarse re-render fails")
            return super().render(rows, on_batch)

    summary = run_render(job, out, shards, progress=False, factory=lambda j: CoarseFails(j))
    assert {r.shard for r in summary.failed} == {coarse[0], *final}, [(r.shard, r.error) for r in summary.failed]
    assert all("waits for the coarse pass" in r.error for r in summary.failed if r.shard in final)
    from hpcwalk.store.reader import committed_shards

    assert not set(final) & committed_shards(out)  # no final shard was committed from the damaged file


def test_even_pacing_on_tiny_reads_back_as_the_final_walk(tiny, tmp_path):
    """A real render (pixel steps, several methods and keyframes): readers show the final pass only."""
    from hpcwalk.render.engine import Renderer
    from typer.testing import CliRunner

    from hpcwalk.cli import app

    job = parse_job({"model": {"id": "tiny"}, "sampling": {"steps": 2, "height": 16, "width": 16},
                     "render": {"batch_size": 2}, "clip": {"enabled": False}, "output": {"shard_size": 4},
                     "walk": [{"name": "kf", "kind": "keyframes", "methods": ["linear", "slerp"], "pace": "even",
                               "keyframes": [{"prompt": "a cat", "seed": 1, "frames": 7},
                                             {"prompt": "a dog", "seed": 2, "frames": 5}, {"prompt": "a fox", "seed": 3}]}]})
    out = str(tmp_path / "run")
    summary, _ = _render(job, out, Renderer(tiny, job.sampling, 2))
    t = read_frames(out)
    assert t.filter(pc.equal(t["pace_pass"], "coarse")).num_rows == 2 * (3 + 2)  # auto: 3 coarse frames a segment
    final = t.filter(pc.equal(t["pace_pass"], "final")).sort_by([("method", "ascending"), ("index", "ascending")])
    assert final.num_rows == 2 * 11
    g = final.filter(pc.equal(final["method"], "slerp"))
    assert g["gamma"].to_pylist()[6] == 1.0 and g["gamma"].to_pylist()[-1] == 1.0  # keyframes stay exact
    assert g["reused_from"].to_pylist()[6] == "kf/slerp/c00002"  # keyframe 1 copies its coarse frame
    print("\n".join(line for line in summary.notes if "step_cv" in line))
    res = CliRunner().invoke(app, ["view", out])
    assert res.exit_code == 0, res.output
    data = json.loads(open(os.path.join(out, "viewer", "data.js")).read()[len("window.HPCWALK = "):].rstrip().rstrip(";"))
    track = data["walks"][0]["tracks"][1]
    assert track["index"] == list(range(11)) and track["frame_id"][0] == "kf/slerp/00000"
    assert "pace even, from position 0.000, a copy of coarse frame kf/slerp/c00000" in track["notes"][0]
    res = CliRunner().invoke(app, ["video", out, "--walk", "kf", "--method", "slerp"])
    assert res.exit_code == 0 and "11 frames" in res.output, res.output


@pytest.mark.slow
def test_sigkill_between_and_during_the_passes_loses_nothing(tmp_path):
    res = run_trials(__file__, tmp_path, 20261212)
    assert [t["where"] for t in res["trials"][:2]] == ["after the coarse pass", "after the plan file"]
    for t in res["trials"]:
        assert t["killed"] and t["rerun_exit"] == 0, t
        assert t["equal_to_clean_run"] and t["frames_once"] and t["plan_equal"] and t["temp_files_after"] == 0, t
    assert not res["trials"][0]["plan_at_kill"] and res["trials"][1]["plan_at_kill"]  # the two sides of the barrier
    assert res["trials"][0]["committed_at_kill"] == res["trials"][1]["committed_at_kill"] == res["coarse_shards"]
    assert len({t["committed_at_kill"] for t in res["trials"]}) >= 3


# -- the trials (run as a script) ---------------------------------------------------------------------


def main(tmp: str, seed: int) -> dict:
    import random
    import signal
    import warnings

    import torch

    from hpcwalk.run import evenpace
    from hpcwalk.render.engine import Renderer
    from hpcwalk.store.reader import committed_shards
    from test_sigkill import _duration, _fork, watchdog

    warnings.simplefilter("ignore")
    watchdog()
    torch.set_num_threads(1)
    rng = random.Random(seed)
    job = parse_job({"model": {"id": "tiny"}, "sampling": {"steps": 1, "height": 16, "width": 16},
                     "render": {"batch_size": 2, "device": "cpu"}, "clip": {"enabled": False},
                     "output": {"shard_size": 2}, "walk": [
                         {"name": "e", "kind": "latent", "prompt": "a cat", "seeds": [1, 2],
                          "methods": ["linear", "slerp"], "frames": 9, "pace": "even"}]})
    shards = shard(plan(job), job.output.shard_size)
    renderer = Renderer.from_job(job)

    def render(out: str) -> int:
        s = run_render(job, out, shards, progress=False, factory=lambda j: renderer)
        return 1 if s.failed else 0

    def plan_bytes(out: str) -> bytes | None:
        p = os.path.join(out, "pacing", "e.json")
        return open(p, "rb").read() if os.path.exists(p) else None

    ref_dir = os.path.join(tmp, "ref")
    assert render(ref_dir) == 0
    ref = read_frames(ref_dir).sort_by("frame_id").replace_schema_metadata(None)
    ref_plan = plan_bytes(ref_dir)
    duration = _duration(lambda k: render(os.path.join(tmp, f"timing{k}")))

    def killed_at(hook: str):
        """A render that SIGKILLs itself at a point of the barrier: entering place_final, or once the plan is written."""
        def victim(out: str) -> int:
            if hook == "after the coarse pass":
                evenpace.place_final = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
            else:
                write = evenpace._write_json

                def write_then_die(*a, **k):
                    write(*a, **k)
                    os.kill(os.getpid(), signal.SIGKILL)

                evenpace._write_json = write_then_die
            return render(out)
        return victim

    trials = []
    cases = [("after the coarse pass", killed_at("after the coarse pass"), None),
             ("after the plan file", killed_at("after the plan file"), None)]
    cases += [(f"at {d:.3f} s", render, d) for d in sorted(rng.uniform(0.2 * duration, 0.95 * duration) for _ in range(5))]
    for i, (where, fn, delay) in enumerate(cases):
        out = os.path.join(tmp, f"trial{i}")
        killed = _fork(lambda: fn(out), delay)  # the hooked victims kill themselves: waited for
        while delay is not None and not killed and delay > 0.01:  # finished first (this machine got faster
            shutil.rmtree(out, ignore_errors=True)                # than when timed): again, sooner
            delay /= 2
            where = f"at {delay:.3f} s"
            killed = _fork(lambda: fn(out), delay)
        state = {"where": where, "killed": killed or delay is None, "committed_at_kill": len(committed_shards(out)),
                 "plan_at_kill": plan_bytes(out) is not None}
        code = render(out)
        got = read_frames(out).sort_by("frame_id").replace_schema_metadata(None)
        ids = got.column("frame_id").to_pylist()
        files = [f for d in ("frames", "commits", "pacing") if os.path.isdir(os.path.join(out, d))
                 for f in os.listdir(os.path.join(out, d))]
        trials.append({**state, "rerun_exit": code, "equal_to_clean_run": got.equals(ref),
                       "frames_once": len(ids) == len(set(ids)), "plan_equal": plan_bytes(out) == ref_plan,
                       "temp_files_after": sum(".tmp" in f for f in files)})
    return {"seed": seed, "render_s": duration, "trials": trials,
            "coarse_shards": sum(1 for s in shards if not s.rows[0].stage)}


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))


class NoiseRenderer(PathRenderer):
    """Frames of a zero-length path (a walk from seed 1 to seed 1): one grey image, a fifth of its values one
    grey level up or down in each frame, as rounding leaves on the frames of (nearly) identical latents."""

    def render(self, rows, on_batch=None):
        out = super().render(rows, on_batch)
        rng = np.random.default_rng([int(1e6 * r.gamma) for r in rows])
        noise = rng.choice([-1, 1], (len(rows), 8, 8, 3)) * (rng.random((len(rows), 8, 8, 3)) < 0.2)
        images = (128 + noise).astype(np.uint8)
        return RenderOutput(out.rows, images, out.latent_norm, out.timings, out.extra)


def test_even_pacing_on_a_zero_length_path_places_frames_uniformly_and_says_so(tmp_path):
    job = parse_job({"model": {"id": "tiny"}, "sampling": {"steps": 1, "height": 8, "width": 8},
                     "output": {"shard_size": 8}, "walk": [
                         {"name": "w", "kind": "latent", "prompt": "p", "seeds": [1, 1], "methods": ["slerp"],
                          "frames": 17, "pace": "even", "pace_coarse": 9, "pace_measure": "pixel"}]})
    with pytest.warns(Warning, match=r"walk 'w' slerp segment 0: its two ends are the same image .*placed uniformly"):
        _render(job, str(tmp_path / "run"), NoiseRenderer(job))
    t = read_frames(str(tmp_path / "run"))
    final = t.filter(pc.equal(t["pace_pass"], "final")).sort_by("index")
    np.testing.assert_allclose(final["gamma"].to_pylist(), np.arange(17) / 16, atol=1e-12)

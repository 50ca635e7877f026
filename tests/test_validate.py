"""Bounds on every input, checked before any work (hpcwalk/job/bounds.py): each refusal is one line naming
the limit and the value, exit 2, nothing written; `render --dry-run` validates and plans, writes
nothing; a property test throws generated and mutated job files at the dry run."""

from __future__ import annotations

import os
import re

import pytest
from typer.testing import CliRunner

from hpcwalk.cli import app
from hpcwalk.store.reader import read_frames
from jobs import cat_walk, tiny_job_toml, tiny_study_toml, walk

runner = CliRunner()
SMALL = tiny_job_toml(cat_walk(methods=["linear"], frames=3), steps=1, size=16, shard_size=4)
STUDY = tiny_study_toml()


def _refused(res, needle: str, out) -> None:
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert not os.path.exists(out)


@pytest.mark.parametrize("line, edited, needle", [
    ("frames = 3", "frames = 1000000000", "plans 1,000,000,000 frames"),
    ("steps = 1", "steps = 10000000", "[sampling] steps must be <= 1,000 (the scheduler has 1000 training timesteps), "
                                     "got 10,000,000"),
    ("height = 16", "height = 65536", "[sampling] height must be <= 4,096 (pixels; SD 1.x is trained at 512), got 65,536"),
    ("seeds = [1, 2]", 'seeds = ["1:100000000000", 2]', "draw 100000000000 of seed 1 is out of range"),
    ("seeds = [1, 2]", "seeds = [9223372036854775808, 2]", "must be in [0, 2**63) (int64), got 9223372036854775808"),
    ("seeds = [1, 2]", 'seeds = ["9223372036854775808:1", 2]', "must be in [0, 2**63)"),
    ("steps = 1", "steps = 1\nguidance = inf", "[sampling] guidance must be a finite number, got inf"),
    ("steps = 1", "steps = 1\nguidance = nan", "[sampling] guidance must be a finite number, got nan"),
    ("steps = 1", "steps = 1\nguidance = 1e30", "[sampling] guidance must be <= 100"),
    ('prompt = "a cat"', 'prompt = "' + "cat " * 3000 + '"', "prompt must be at most 10,000 characters, got 12,000"),
    ('device = "cpu"', 'device = "cuda:abc"', "[render] device must be auto, cpu, cuda or cuda:N, got 'cuda:abc'"),
    ('methods = ["linear"]', 'methods = ["linear", "linear"]', "distinct methods"),
    ('id = "tiny"', 'id = "a\\u0000b"', "[model] id must not contain a NUL character"),
    ('name = "w"', 'name = "../w"', "name must be a non-empty string without '/'"),
], ids=["frames", "steps", "height", "draw", "seed", "seed-draw", "guidance-inf", "guidance-nan", "guidance-huge",
        "prompt", "device", "methods", "model-nul", "name-slash"])
def test_each_bound_refuses_before_any_work(tmp_path, line, edited, needle):
    assert line in SMALL
    job = tmp_path / "job.toml"
    job.write_text(SMALL.replace(line, edited))
    out = tmp_path / "out"
    _refused(runner.invoke(app, ["render", str(job), "--out", str(out), "--dry-run"]), needle, out)
    _refused(runner.invoke(app, ["render", str(job), "--out", str(out)]), needle, out)


def test_std_bounds(tmp_path):
    job = tmp_path / "job.toml"
    out = tmp_path / "out"
    for std_max, needle in (("inf", "std_max must be a finite number, got inf"), ("nan", "must be a finite number"),
                            ("1e9", "std_max must be <= 10")):
        job.write_text(tiny_job_toml(f'[[walk]]\nname = "s"\nkind = "std"\nprompt = "p"\nseed = 1\nframes = 3\n'
                                     f"std_max = {std_max}\n", steps=1, size=16))
        _refused(runner.invoke(app, ["render", str(job), "--out", str(out)]), needle, out)


def test_a_huge_study_is_refused_from_its_counts(tmp_path):
    """pairs = 10**9 used to build a billion walk tables before anything checked it (killed at 23.5 GB)."""
    study = tmp_path / "study.toml"
    study.write_text(STUDY.replace("pairs = 2", "pairs = 1000000000"))
    out = tmp_path / "out"
    _refused(runner.invoke(app, ["study", str(study), "--out", str(out), "--device", "cpu"]),
             "the study plans 9,000,000,000 frames", out)
    study.write_text(STUDY.replace("frames = 3", "frames = 3\nbootstrap = 1000000000"))
    _refused(runner.invoke(app, ["study", str(study), "--out", str(out), "--device", "cpu"]),
             "[study] bootstrap must be <= 100,000", out)


def test_job_files_that_are_not_text_or_not_files(tmp_path):
    out = tmp_path / "out"
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(SMALL.replace("a cat", "a caf\xe9").encode("latin-1"))
    _refused(runner.invoke(app, ["render", str(bad), "--out", str(out)]), "is not UTF-8 text (byte 0xe9 at offset", out)
    _refused(runner.invoke(app, ["render", str(tmp_path), "--out", str(out)]), "is a folder", out)
    fifo = tmp_path / "job.fifo"  # was "not found": it exists, and is no regular file
    os.mkfifo(fifo)
    for path in ("/dev/null", str(fifo)):
        _refused(runner.invoke(app, ["render", path, "--out", str(out)]), "is not a regular file", out)
    big = tmp_path / "big.toml"
    big.write_text(SMALL.replace('prompt = "a cat"', 'prompt = "' + "x" * (17 << 20) + '"'))
    _refused(runner.invoke(app, ["render", str(big), "--out", str(out)]), "must be at most 16,777,216 bytes", out)
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 100000 + "]" * 100000)  # one 200,004-character line: the line bound answers first
    _refused(runner.invoke(app, ["render", str(deep), "--out", str(out)]), "line 1 has 200,004 characters", out)
    deep.write_text("a = " + "[\n" * 5000 + "]\n" * 5000)  # short lines: the nesting bound answers
    _refused(runner.invoke(app, ["render", str(deep), "--out", str(out)]), "nested more than 32 deep", out)


def test_dry_run_plans_and_writes_nothing(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(SMALL.replace("batch_size = 2", "batch_size = 1000000"))
    out = tmp_path / "out"
    res = runner.invoke(app, ["render", str(job), "--out", str(out), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "note: [render] batch_size 1,000,000 capped at 3, the most frames a shard holds" in res.stderr
    assert res.stdout.startswith("dry run: 3 frames in 1 shards of up to 3, micro-batch 3, plan about ")
    assert "0 shards committed and verified (full), 1 to render; nothing written" in res.stdout
    assert sorted(os.listdir(tmp_path)) == ["job.toml"]


def test_the_batch_cap_renders_the_same_frames(tmp_path):
    """batch_size = 10**6 for a 3-frame job used to pad every micro-batch to a million rows."""
    job = tmp_path / "job.toml"
    job.write_text(SMALL.replace("batch_size = 2", "batch_size = 1000000"))
    res = runner.invoke(app, ["render", str(job), "--out", str(tmp_path / "a"), "--no-progress"])
    assert res.exit_code == 0, res.output
    job.write_text(SMALL.replace("batch_size = 2", "batch_size = 3"))
    assert runner.invoke(app, ["render", str(job), "--out", str(tmp_path / "b"), "--no-progress"]).exit_code == 0
    a, b = read_frames(str(tmp_path / "a")), read_frames(str(tmp_path / "b"))
    assert a.column("image").to_pylist() == b.column("image").to_pylist()


def test_a_prompt_the_text_encoder_cuts_is_said_once_and_recorded_per_frame(tmp_path):
    long = "a very detailed photograph of a small grey cat sitting on a wooden chair " * 6  # about 90 tokens
    job = tmp_path / "job.toml"
    job.write_text(tiny_job_toml(walk("a", "latent", prompt=long, seeds=[1, 2], methods=["linear"], frames=2),
                                 walk("b", "prompts", seed=3, prompts=[long, "a cat"]), steps=1, size=16))
    res = runner.invoke(app, ["render", str(job), "--out", str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 0, res.output
    warned = [line for line in res.stderr.splitlines() if "tokens: the text encoder reads the first 77" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: [[walk]] 'a' prompt 'a very detailed"), res.stderr
    n = int(re.search(r" is (\d+) tokens", warned[0]).group(1))
    assert n > 77
    t = read_frames(str(tmp_path / "out")).to_pylist()
    assert {r["prompt_tokens"] for r in t if r["prompt"] == long} == {n}
    assert {r["prompt_tokens"] for r in t if r["prompt"] == "a cat"} == {4}  # <start> a cat <end>
    assert all(r["prompt_b_tokens"] is None for r in t)


# -- the property test: generated and mutated job files never get past the dry run with a traceback --

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ints = st.one_of(st.integers(-3, 40), st.sampled_from([0, 1, 2**31, 2**63 - 1, 2**63, 10**30, -(2**63)]))
_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-5, 50))
_text = st.one_of(st.text(max_size=30), st.sampled_from(["a cat", "$\\frac{a$", "<b>x</b>", "a\u0000b", "x" * 400,
                                                          "../x", "cuda:abc", "slerp", "linear", "tiny"]))
_seed = st.one_of(_ints, st.sampled_from(["1:0", "1:1", "2:100000000000", ":", "1:-1", "x:1", "١:٢"]), _text)
_value = st.one_of(_ints, _floats, _text, st.booleans(), st.lists(_seed, max_size=4))


KEYS = {"model": ["id", "revision"],
        "sampling": ["scheduler", "steps", "guidance", "negative_prompt", "height", "width"],
        "render": ["batch_size", "dtype", "device"], "output": ["shard_size", "image_format"],
        "walk": ["name", "kind", "prompt", "prompts", "seed", "seeds", "methods", "frames", "stride", "std_min",
                 "std_max", "easing", "easing_exponent", "pace", "pace_coarse", "pace_measure", "audio", "audio_fps",
                 "images", "keyframes", "text_method", "invert_refine"]}


@st.composite
def job_dicts(draw) -> dict:
    """A valid small job, then up to three mutations: a key's value replaced (any type), a key added or
    dropped, a table replaced by a scalar."""
    kind = draw(st.sampled_from(["latent", "text", "translate", "mix", "std", "prompts", "keyframes", "images"]))
    w: dict = {"name": draw(st.one_of(st.just("w"), _text)), "kind": kind}
    w.update({"latent": {"prompt": "a cat", "seeds": [1, 2], "methods": ["slerp"], "frames": 3},
              "text": {"prompts": ["a cat", "a dog"], "seed": 1, "frames": 3},
              "translate": {"prompt": "a cat", "seeds": [1, 2], "stride": 1},
              "mix": {"prompt": "a cat", "seeds": [1, 2], "stride": 1},
              "std": {"prompt": "a cat", "seed": 1, "frames": 3, "std_min": 0.5, "std_max": 1.5},
              "prompts": {"prompts": ["a cat", "a dog"], "seed": 1},
              "keyframes": {"keyframes": [{"prompt": "a cat", "seed": 1, "frames": 3}, {"prompt": "a dog", "seed": 2}],
                            "easing": "ease-in-out"},
              "images": {"images": ["a.png", "b.png"], "prompt": "a cat", "frames": 3}}[kind])  # no such files: exit 2
    job = {"model": {"id": "tiny"}, "sampling": {"steps": 1, "height": 16, "width": 16, "guidance": 2.0},
           "render": {"batch_size": 2, "device": "cpu"}, "output": {"shard_size": 4}, "walk": [w]}
    for _ in range(draw(st.integers(0, 3))):
        table = draw(st.sampled_from(["model", "sampling", "render", "output", "walk"]))
        target = w if table == "walk" else job[table]
        if not isinstance(target, dict):
            continue
        key = draw(st.sampled_from(KEYS[table]) if draw(st.integers(0, 9)) else _text)  # mostly real keys
        action = draw(st.sampled_from(["set", "set", "drop", "scalar"]))
        if action == "set":
            target[key] = draw(_value)
        elif action == "drop":
            target.pop(key, None)
        elif table != "walk":
            job[table] = draw(_value)
    return job


def _toml(v) -> str:
    """A TOML value (strings with every control character escaped; floats nan/inf as TOML spells them)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v > 0 else "-inf") if v in (float("inf"), float("-inf")) else repr(v)
    if isinstance(v, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x10000
                             else f"\\U{ord(c):08x}" for c in v) + '"'
    if isinstance(v, dict):  # an inline table (keyframes = [{prompt = ..., seed = ...}, ...])
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml(x)}" for k, x in v.items()) + "}"
    return "[" + ", ".join(_toml(x) for x in v) + "]"


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml(k)


def to_toml(job: dict) -> str:
    lines = []
    for table, body in job.items():
        if table == "walk":
            continue
        if not isinstance(body, dict):
            lines.append(f"{table} = {_toml(body)}")
            continue
    for table, body in job.items():
        if table == "walk" or not isinstance(body, dict):
            continue
        lines.append(f"[{table}]")
        lines += [f"{_toml_key(k)} = {_toml(v)}" for k, v in body.items()]
    for w in job["walk"]:
        lines.append("[[walk]]")
        lines += [f"{_toml_key(k)} = {_toml(v)}" for k, v in w.items()]
    return "\n".join(lines) + "\n"


@st.composite
def job_texts(draw) -> bytes:
    """The TOML of a generated job, sometimes with its bytes mutated (a flipped, cut or inserted byte)."""
    data = to_toml(draw(job_dicts())).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 4)) == 0:
        i = draw(st.integers(0, len(data) - 1))
        data = draw(st.sampled_from([data[:i], data[:i] + bytes([data[i] ^ 0x80]) + data[i + 1:],
                                     data[:i] + b"\xff" + data[i:], data[:i] + b"[" + data[i:]]))
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=job_texts())
def test_dry_run_on_generated_job_files_exits_0_or_2_and_never_tracebacks(tmp_path, data):
    job = tmp_path / "job.toml"
    job.write_bytes(data)
    out = tmp_path / "out"
    res = runner.invoke(app, ["render", str(job), "--out", str(out), "--dry-run"])
    assert res.exit_code in (0, 2), (res.exit_code, res.output, data)
    assert res.exception is None or isinstance(res.exception, SystemExit), (repr(res.exception), data)
    assert "Traceback" not in res.output
    if res.exit_code == 2:
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (res.stderr, data)
    else:
        assert res.stdout.startswith("dry run: ") and res.stdout.rstrip().endswith("nothing written"), res.stdout
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["job.toml"]

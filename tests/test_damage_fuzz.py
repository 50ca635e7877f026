"""The damage fuzz: random sequences of what happens to run folders on clusters (copy in another run's shard,
swap, move, duplicate, delete, truncate, flip a byte, symlink, edit a marker) applied to a rendered run.
After each sequence: `read_frames` serves only planned frames, each at most once and equal to the clean
run's; `hpcwalk verify` exits non-zero exactly when the folder differs from the clean one; a render and
then `verify` give back the clean run. A tiny run (10 frames in 5 shards of 2) and a bounded, derandomized
number of examples keep it to about a minute on 2 cores."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hpcwalk.cli import app
from hpcwalk.core.errors import StoreError
from hpcwalk.store.reader import read_frames, verify_run
from jobs import cat_walk, tiny_job_toml, walk

runner = CliRunner()
CAT = tiny_job_toml(cat_walk(methods=["linear", "slerp"], frames=5), steps=1, size=16)  # 10 frames, 5 shards
DOG = tiny_job_toml(walk("w", "latent", prompt="a dog", seeds=[1, 2], methods=["linear", "slerp"], frames=5),
                    steps=1, size=16)
SHARDS = 5
EXAMPLES, MAX_OPS = 40, 6  # 150 random examples (502 operations) passed in 61 s on 2 cores once
STATS = {"examples": 0, "ops": 0, "seconds": 0.0, "refused": 0}

shard_no = st.integers(0, SHARDS - 1)
OPS = st.one_of(
    st.tuples(st.just("copy foreign"), shard_no),
    st.tuples(st.just("swap"), shard_no, shard_no),
    st.tuples(st.just("move"), shard_no, st.integers(0, SHARDS + 1)),  # SHARDS, SHARDS + 1: not in the plan
    st.tuples(st.just("duplicate"), shard_no, st.integers(0, SHARDS + 1)),
    st.tuples(st.just("delete"), shard_no, st.sampled_from(["file", "marker", "both"])),
    st.tuples(st.just("truncate"), shard_no, st.sampled_from(["file", "marker"]), st.floats(0, 0.99)),
    st.tuples(st.just("flip"), shard_no, st.floats(0, 0.999), st.integers(0, 7)),
    st.tuples(st.just("symlink"), shard_no, st.sampled_from(["dog", "own"]), shard_no),
    st.tuples(st.just("edit marker"), shard_no,
              st.sampled_from(["rows", "shard", "sha256", "bytes", "job_fingerprint", "frames"])),
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    for name, text in (("cat", CAT), ("dog", DOG)):
        (tmp / f"{name}.toml").write_text(text)
        res = runner.invoke(app, ["render", str(tmp / f"{name}.toml"), "--out", str(tmp / name), "--no-progress"])
        assert res.exit_code == 0, res.output
    clean = read_frames(str(tmp / "cat")).replace_schema_metadata(None)
    yield str(tmp / "cat.toml"), str(tmp / "cat"), str(tmp / "dog"), {r["frame_id"]: r for r in clean.to_pylist()}
    print(f"damage fuzz: {STATS['examples']} examples rendered back, {STATS['refused']} refused (no shard of the "
          f"run's own), {STATS['ops']} operations, {STATS['seconds']:.1f} s")


def paths(run: str, i: int) -> tuple[str, str]:
    return os.path.join(run, "frames", f"shard-{i:05d}.parquet"), os.path.join(run, "commits", f"shard-{i:05d}.done.json")


def apply(op: tuple, run: str, dog: str) -> None:
    """One damaging operation; one whose source is gone (deleted by an earlier one) does nothing."""
    kind, i = op[0], op[1]
    f, m = paths(run, i)
    if kind == "copy foreign":
        for src, dst in zip(paths(dog, i), (f, m)):
            _replace(dst)
            shutil.copy(src, dst)
    elif kind in ("swap", "move", "duplicate"):
        j = op[2]
        g, n = paths(run, j)
        if i == j:
            return
        for a, b in ((f, g), (m, n)):
            if not os.path.lexists(a):
                continue
            if kind == "swap":
                tmp = a + ".swap"
                os.rename(a, tmp)
                if os.path.lexists(b):
                    os.rename(b, a)
                os.rename(tmp, b)
            elif kind == "move":
                _replace(b)
                os.rename(a, b)
            else:
                _replace(b)
                shutil.copy(a, b)
    elif kind == "delete":
        for p in {"file": [f], "marker": [m], "both": [f, m]}[op[2]]:
            _replace(p)
    elif kind == "truncate":
        p = f if op[2] == "file" else m
        if os.path.isfile(p):
            data = open(p, "rb").read()
            _replace(p)
            open(p, "wb").write(data[: int(len(data) * op[3])])
    elif kind == "flip":
        if os.path.isfile(f):
            data = bytearray(open(f, "rb").read())
            data[int(len(data) * op[2])] ^= 1 << op[3]
            _replace(f)
            open(f, "wb").write(bytes(data))
    elif kind == "symlink":
        target = paths(dog, i)[0] if op[2] == "dog" else paths(run, op[3])[0]
        if os.path.realpath(target) == os.path.realpath(f) or not os.path.exists(target):
            return
        _replace(f)
        os.symlink(os.path.realpath(target), f)
    elif kind == "edit marker" and os.path.isfile(m):
        try:
            d = json.load(open(m))
        except ValueError:
            return  # a truncated marker: already not one
        field = op[2]
        d[field] = ((d[field] + 1) if isinstance(d.get(field), int) else
                    ("0" * len(d[field]) if d.get(field) != "0" * len(d[field]) else "1" * len(d[field])))
        _replace(m)
        json.dump(d, open(m, "w"))


def _replace(p: str) -> None:
    """Remove a file or link (never its target) so that the next write makes a new file there."""
    if os.path.lexists(p):
        os.remove(p)


def contents(run: str) -> dict[str, bytes]:
    """What the run's frames/ and commits/ hold, by name, following links (what a reader would read)."""
    out = {}
    for d in ("frames", "commits"):
        for n in sorted(os.listdir(os.path.join(run, d))):
            p = os.path.join(run, d, n)
            out[f"{d}/{n}"] = open(p, "rb").read() if os.path.isfile(p) else b"<not a file>"
            if os.path.islink(p):
                out[f"{d}/{n}"] = b"<link>" + out[f"{d}/{n}"]
    return out


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=1, max_size=MAX_OPS))
@example(ops=[("copy foreign", i) for i in range(SHARDS)])  # no shard of the run's own: refused
@example(ops=[("delete", 0, "file"), ("move", 0, SHARDS)])  # a marker moved out of the plan (found by the fuzz)
def test_no_damage_makes_a_run_serve_wrong_frames(runs, ops):
    job_file, clean_run, dog, clean = runs
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        shutil.copytree(clean_run, run, symlinks=True)
        before = contents(run)
        for op in ops:
            apply(op, run, dog)
        damaged = contents(run) != before
        # 1. the readers serve only planned frames, each once, each the clean run's
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                got = read_frames(run).replace_schema_metadata(None).to_pylist()
            except StoreError:  # nothing left that passes
                got = []
        ids = [r["frame_id"] for r in got]
        assert len(ids) == len(set(ids)) and set(ids) <= set(clean), ops
        assert all(r == clean[r["frame_id"]] for r in got), ops
        # 2. verify says damaged exactly when the folder is not the clean one
        res = runner.invoke(app, ["verify", run])
        assert (res.exit_code != 0) == damaged, (ops, res.output)
        # 3. a render gives the clean run back; where no shard is the run's own and some carry another job,
        #    the folder may be that job's run with a copied run.json: refused naming both, nothing touched
        mismatch = verify_run(run).run_mismatch
        kept = contents(run)
        res = runner.invoke(app, ["render", job_file, "--out", run, "--no-progress"])
        if mismatch:
            lines = res.stderr.strip().splitlines()
            assert res.exit_code == 2 and len(lines) == 1 and "run.json says job" in lines[0], (ops, res.output)
            assert contents(run) == kept
            STATS["refused"] += 1
            return
        assert res.exit_code == 0, (ops, res.output)
        res = runner.invoke(app, ["verify", run])
        assert res.exit_code == 0 and res.stdout.splitlines()[-1] == f"{SHARDS} of {SHARDS} shards ok (full)", (ops, res.output)
        again = read_frames(run).replace_schema_metadata(None)
        assert again.num_rows == len(clean) and all(r == clean[r["frame_id"]] for r in again.to_pylist()), ops
    STATS["examples"] += 1
    STATS["ops"] += len(ops)
    STATS["seconds"] += time.perf_counter() - start


def test_the_fuzz_operations_damage_what_they_say(runs, tmp_path):
    """The fuzz is only as good as its operations: each one, applied alone, changes the folder."""
    _, clean_run, dog, _ = runs
    for op in [("copy foreign", 1), ("swap", 1, 2), ("move", 1, 6), ("duplicate", 1, 2), ("delete", 1, "marker"),
               ("truncate", 1, "file", 0.5), ("flip", 1, 0.5, 3), ("symlink", 1, "own", 2), ("edit marker", 1, "frames")]:
        run = str(tmp_path / op[0].replace(" ", "_"))
        shutil.copytree(clean_run, run)
        before = contents(run)
        apply(op, run, dog)
        assert contents(run) != before, op
        assert runner.invoke(app, ["verify", run]).exit_code == 1, op

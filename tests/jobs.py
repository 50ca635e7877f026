"""Small job files for the render tests: the TOML text of a job on the built-in tiny model, built from
the few values the tests vary, and its [[walk]] tables; `hpcwalk render` SIGKILLed mid-run; and
two helpers for comparing rendered frames (`pick_rows`, `max_abs_diff`).

    JOB = tiny_job_toml(cat_walk(methods=["slerp"], frames=6), steps=3)

The defaults (4 steps, 64x64, batch 2, device "cpu", shards of 2) are the common case; a test passes
what differs, and the walks' frame counts, seeds and prompts at the call site. The `job_file`, `job`
and `renderer` fixtures in conftest.py write and load a test module's `JOB`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from hpcwalk.store.reader import committed_shards


def _value(v) -> str:
    """A TOML value: strings quoted, lists inline, numbers as Python writes them."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return repr(v)


def walk(name: str, kind: str, **fields) -> str:
    """One [[walk]] table: `name`, `kind`, then `fields` in the order given."""
    lines = ["[[walk]]", f"name = {_value(name)}", f"kind = {_value(kind)}"]
    lines += [f"{k} = {_value(v)}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


def cat_walk(methods: Sequence[str], frames: int) -> str:
    """The latent walk "w" most render tests use: "a cat" between seeds 1 and 2."""
    return walk("w", "latent", prompt="a cat", seeds=[1, 2], methods=list(methods), frames=frames)


def tiny_job_toml(*walks: str, steps: int = 4, guidance: float | None = None, size: int = 64,
                  batch_size: int = 2, device: str = "cpu", shard_size: int = 2) -> str:
    """A job on the tiny model rendering `walks` (tables from `walk`) at size x size pixels."""
    sampling = [f"steps = {steps}"] + ([] if guidance is None else [f"guidance = {_value(guidance)}"])
    head = ["", "[model]", 'id = "tiny"', "[sampling]", *sampling, f"height = {size}", f"width = {size}",
            "[render]", f"batch_size = {batch_size}", f"device = {_value(device)}",
            "[output]", f"shard_size = {shard_size}"]
    return "\n".join(head) + "\n" + "".join(walks)



def tiny_study_toml(prompt: str = "a cat", *study_lines: str, size: int = 16, shard_size: int | None = None) -> str:
    """A study file on the tiny model (2 seed pairs x 3 frames, 1 step, size x size, tiny-clip), with more
    [study] lines (`'bootstrap = 200'`) and optionally an [output] shard_size."""
    study = ["[study]", f"prompts = [{_value(prompt)}]", "pairs = 2", "frames = 3", *study_lines]
    rest = ["[model]", 'id = "tiny"', "[sampling]", "steps = 1", f"height = {size}", f"width = {size}",
            "[clip]", 'model = "tiny-clip"', 'pretrained = "none"']
    rest += ["[output]", f"shard_size = {shard_size}"] if shard_size is not None else []
    return "\n".join(["", *study, *rest]) + "\n"

def sigkill_render(job_file: str, out: str, *flags: str, poll_s: float, commits: int = 2,
                   env: dict[str, str] | None = None) -> None:
    """Run `hpcwalk render job_file --out out --no-progress *flags` in a subprocess and SIGKILL it once
    `out` holds `commits` committed shards (or it has exited, or 240 s have passed), polling every
    `poll_s` seconds; returns once it is dead."""
    cmd = [sys.executable, "-m", "hpcwalk.cli", "render", job_file, "--out", out, "--no-progress", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 240
        while len(committed_shards(out)) < commits and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(poll_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()


def pick_rows(job, frame_ids: Sequence[str]) -> list:
    """The job's plan rows with these frame ids, in the order given."""
    from hpcwalk.job.plan import plan

    by_id = {r.frame_id: r for r in plan(job)}
    return [by_id[f] for f in frame_ids]


def max_abs_diff(a, b) -> int:
    """Largest per-pixel difference between two uint8 frame arrays of the same shape."""
    import numpy as np

    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def write_audio(path, samples, rate: int, codec: str = "pcm_s16le", fmt: str = "s16p") -> None:
    """An audio file of float samples in [-1, 1], (channels, N) with 1 or 2 channels, through PyAV: `fmt`
    s16p/s16 writes 16-bit integers, fltp floats."""
    import av
    import numpy as np

    samples = np.asarray(samples, np.float32)
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    with av.open(str(path), "w") as c:
        stream = c.add_stream(codec, rate=rate, layout=layout)
        data = (samples * 32767).astype(np.int16) if fmt.startswith("s16") else samples
        frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            c.mux(packet)
        for packet in stream.encode(None):
            c.mux(packet)


def run_trials(script: str, tmp: str, seed: int) -> dict:
    """`python script TMP SEED` in a fresh interpreter (one torch thread, tests/ importable): the trial scripts of
    the SIGKILL tests fork their victims from it; returns the JSON dict it prints last (printed here too)."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    path = [os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]  # this checkout's hpcwalk, not an installed one
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    proc = subprocess.run([sys.executable, script, str(tmp), str(seed)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(res, indent=1))
    return res

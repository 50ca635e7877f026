"""Re-score the frames of an existing run with another CLIP model, without re-rendering.

The images are read back from the run's committed Parquet shards (PNG/WebP/JPEG bytes), decoded,
and embedded with the same device preprocessing the renderer uses. The new columns go to a sibling
dataset keyed by frame id, one file per frames shard, committed like the frames:

    RUN/scores/<model>__<pretrained>/score.json                 model, run fingerprint
    RUN/scores/<model>__<pretrained>/data/shard-00000.parquet   frame_id, score_prompt, clip_image, clip_score, clip_score_b
    RUN/scores/<model>__<pretrained>/commits/shard-00000.done.json

Each frame is scored against its row's `score_prompt` (the job's scoring text, by default the generation
prompt; runs written before that column existed: `prompt`), or, with `prompt=TEXT` (`hpcwalk score RUN
--prompt TEXT`), every frame against TEXT, into `RUN/scores/<model>__<pretrained>__prompt-<sha256[:10]>/`.
`clip_score_b` (text walks) stays against the row's end scoring text `score_prompt_b`.

Join on frame_id (DuckDB: `... FROM 'RUN/frames/*.parquet' JOIN 'RUN/scores/X/data/*.parquet' USING (frame_id)`).
Frames shards are read only when they pass verification (a damaged one is left out with a warning); a
rerun scores only shards whose score marker is missing or does not match its file.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from hpcwalk.core import interrupt
from hpcwalk.core.errors import JobError, StoreError
from hpcwalk.core.fsio import filesystem, write_atomic
from hpcwalk.job.bounds import DEVICE_RE, MAX_CLIP_BATCH, MAX_PROMPT_CHARS, check_text
from hpcwalk.render.clip import ClipScorer, load_clip, to_arrow
from hpcwalk.store.reader import read_run, read_shard, verify_run
from hpcwalk.store.verify import DEFAULT_LEVEL, VerifyLevel, check_shards, parse_json_object

SCORES_DIR = "scores"


@dataclass
class ScoreSummary:
    """The outcome of one `score_run` call."""

    out: str
    model: str
    shards_scored: int = 0
    already_committed: int = 0
    frames: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    def describe(self) -> str:
        fps = self.frames / self.seconds if self.seconds else 0.0
        return (f"done: {self.frames} frames in {self.shards_scored} shards scored with {self.model}, "
                f"{self.already_committed} shards already scored; {self.seconds:.1f} s ({fps:.1f} frames/s)\n"
                f"scores: {self.out}")


def score_dir(run: str, model: str, pretrained: str, prompt: str | None = None) -> str:
    """Where a run's scores for one CLIP model (and one scoring text, when given) live; safe on every filesystem."""
    name = f"{model}__{pretrained}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    if len(slug) > 100:  # a long local-dir: path or weights file: its end kept, distinct by a hash of the whole
        slug = f"{slug[-80:].lstrip('._')}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    if prompt is not None:
        slug += "__prompt-" + hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{run.rstrip('/')}/{SCORES_DIR}/{slug}"


def run_clip_model(run: str) -> tuple[str, str]:
    """(model, pretrained) of the CLIP model the run was rendered with; StoreError if it had none."""
    from hpcwalk.core.errors import JobError
    from hpcwalk.job.spec import ClipSpec

    job = read_run(run).get("job", {})
    try:
        models = ClipSpec(**job.get("clip", {})).models(job.get("model", {}).get("id", ""))
    except (TypeError, JobError):
        models = ()
    if not models:
        raise StoreError(f"{run!r} was rendered without CLIP: pass --clip-model (and --pretrained)")
    return models[0][1], models[0][2]


def preflight_score(run: str, model: str, pretrained: str, overwrite: bool = False, prompt: str | None = None) -> str:
    """Check the run and the score folder before any work; returns the score folder."""
    info = read_run(run)  # StoreError when RUN is not a run folder
    if not verify_run(run, "quick").ok:  # present and of the right size; score_run verifies at its level
        raise StoreError(f"{run!r} has no committed shards: render into it first")
    if prompt is not None and not prompt.strip():
        raise StoreError("--prompt is empty: give the text to score against, e.g. --prompt \"A high resolution "
                         "image of a cat\"")
    out = score_dir(run, model, pretrained, prompt)
    fs, root = filesystem(out)
    if fs.get_file_info(f"{root}/score.json").type == pafs.FileType.File and not overwrite:
        with fs.open_input_stream(f"{root}/score.json") as f:
            data = f.read()
        prev, why = parse_json_object(data)
        if prev is None:
            raise StoreError(f"{root}/score.json is damaged ({why}, {len(data):,} bytes): pass --overwrite to "
                             "re-score every shard")
        prev = prev.get("run_fingerprint")
        if prev != info.get("job_fingerprint"):
            raise StoreError(f"{out!r} holds scores of another run (fingerprint {prev}): pass --overwrite to "
                             "re-score every shard")
    return out


def score_run(run: str, model: str, pretrained: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
              batch_size: int = 32, overwrite: bool = False, progress: Callable[[int], None] | None = None,
              prompt: str | None = None, verify: VerifyLevel = DEFAULT_LEVEL) -> ScoreSummary:
    """Embed and score every committed frame of `run` with one CLIP model (against each row's scoring text,
    or `prompt` for every frame) into the sibling dataset."""
    # 1. validate the run and the output, then load the model (ClipLoadError names the fix)
    out = preflight_score(run, model, pretrained, overwrite, prompt)
    scorer = load_clip(model, pretrained, device, dtype)
    fs, root = filesystem(out)
    if overwrite and fs.get_file_info(root).type == pafs.FileType.Directory:
        fs.delete_dir_contents(root)
    for sub in ("data", "commits"):
        fs.create_dir(f"{root}/{sub}", recursive=True)
    fingerprint = read_run(run).get("job_fingerprint")
    write_atomic(fs, f"{root}/score.json", json.dumps(
        {"clip_model": scorer.name, "run": run, "run_fingerprint": fingerprint, "prompt": prompt}, indent=2).encode())
    # 2. score the verified frames shards whose score shard is not committed (or does not match its marker)
    done = {c.name for c in check_shards(fs, root, verify, data_dir="data") if c.ok}
    frames_shards = verify_run(run, verify)
    frames_shards.warn()
    summary = ScoreSummary(out, scorer.name)
    t0 = time.perf_counter()
    with interrupt.reporting(lambda: f"{summary.already_committed + summary.shards_scored} of "
                                     f"{len(frames_shards.files)} shards scored in {out}"):
        _score_shards(run, fs, root, frames_shards.files, done, scorer, batch_size, progress, prompt, fingerprint, summary)
    summary.seconds = time.perf_counter() - t0
    return summary


def _score_shards(run: str, fs: pafs.FileSystem, root: str, files: list[str], done: set[str], scorer: ClipScorer,
                  batch_size: int, progress: Callable[[int], None] | None, prompt: str | None, fingerprint: Any,
                  summary: ScoreSummary) -> None:
    """Score each frames shard not scored yet; its data file and marker are written together (a SIGTERM
    between them waits for the marker)."""
    run_fs, _ = filesystem(run)
    for path in files:
        name = path.rpartition("/")[2][: -len(".parquet")]
        if name in done:
            summary.already_committed += 1
            continue
        try:
            names = pq.read_schema(path, filesystem=run_fs).names
        except (pa.ArrowException, OSError):  # read_shard below says so
            names = []
        cols = ["frame_id", "prompt", "prompt_b", "image"] + [c for c in ("score_prompt", "score_prompt_b") if c in names]
        frames = read_shard(run, path, cols)
        if frames is None:  # unreadable after all: left out with a warning
            continue
        table = score_table(scorer, frames, batch_size, progress, prompt)
        table = table.replace_schema_metadata({"clip_model": scorer.name, "run_fingerprint": str(fingerprint)})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        with interrupt.deferred():
            write_atomic(fs, f"{root}/data/{name}.parquet", data)
            write_atomic(fs, f"{root}/commits/{name}.done.json", json.dumps(
                {"rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}).encode())
            summary.shards_scored += 1
            summary.frames += table.num_rows
            summary.files.append(f"{root}/data/{name}.parquet")


def score_table(scorer: ClipScorer, frames: pa.Table, batch_size: int = 32,
                progress: Callable[[int], None] | None = None, prompt: str | None = None) -> pa.Table:
    """frame_id, score_prompt + the scorer's columns for a table with frame_id, prompt, prompt_b (and
    score_prompt, score_prompt_b where the run has them) and image bytes; `prompt`: one text for every frame."""
    from PIL import Image

    own = frames["score_prompt"] if "score_prompt" in frames.column_names else frames["prompt"]
    prompts = [prompt] * frames.num_rows if prompt is not None else own.to_pylist()
    prompts_b = (frames["score_prompt_b"] if "score_prompt_b" in frames.column_names else frames["prompt_b"]).to_pylist()
    images = frames["image"]
    parts = []
    for i in range(0, frames.num_rows, batch_size):
        j = min(i + batch_size, frames.num_rows)
        pix = np.stack([np.asarray(Image.open(io.BytesIO(b.as_py())).convert("RGB")) for b in images[i:j]])
        parts.append(scorer.score_prompts(torch.from_numpy(pix), prompts[i:j], prompts_b[i:j]))
        if progress:
            progress(j - i)
    return pa.table({"frame_id": frames["frame_id"], "score_prompt": pa.array(prompts, pa.string()), **to_arrow(parts)})


def check_score(run: str, clip_model: str, pretrained: str | None, device: str, dtype: str, batch_size: int,
                overwrite: bool, prompt: str | None = None) -> tuple[str, Any, Any, str]:
    """`hpcwalk score`'s inputs: (score folder, torch device, torch dtype, pretrained tag). Writes nothing."""
    from hpcwalk.render.clip import BUILTIN_CLIP, check_clip
    from hpcwalk.sd.models import resolve_device, resolve_dtype
    from hpcwalk.sd.weights import ModelLoadError
    pass

    check_text("--clip-model", clip_model)
    if pretrained is None:
        if clip_model not in BUILTIN_CLIP and not clip_model.startswith("local-dir:"):
            raise JobError(f"--pretrained is needed for {clip_model!r}: an open_clip tag such as openai or "
                           "laion2b_s32b_b79k, a weights file, or none")
        pretrained = "none" if clip_model in BUILTIN_CLIP else ""
    check_text("--pretrained", pretrained)
    if not 1 <= batch_size <= MAX_CLIP_BATCH:
        raise JobError(f"--batch-size must be in 1..{MAX_CLIP_BATCH}, got {batch_size}")
    if not DEVICE_RE.fullmatch(device):
        raise ModelLoadError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r:.80}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if prompt is not None:
        check_text("--prompt", prompt, MAX_PROMPT_CHARS, nul=True)
    check_clip(clip_model, pretrained)
    return preflight_score(run, clip_model, pretrained, overwrite, prompt), dev, dt, pretrained

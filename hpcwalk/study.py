"""InterpScore studies: N seed pairs x methods x n frames, rendered and CLIP-scored in one pass,
then summarised with bootstrap confidence intervals over seed pairs.

A study file is a job file whose [[walk]] tables are replaced by one [study] table:

    [study]
    prompt = "An high resolution photo of a cat"     # generation prompt (or prompts = [...])
    score_prompt = "A high resolution image of a cat" # what CLIP scores against (or score_prompts = [...])
    pairs = 1000          # seed pair i interpolates seed (first_seed + i), draw 0 -> draw 1
    first_seed = 1        # (the study's own pair is seed 1, draws 0 and 1)
    methods = ["linear", "normalized", "slerp"]
    frames = 300          # n, both ends included, gamma = i / (n - 1); or gammas = [...]
    bins = 5              # gamma bins for KID (interior frames vs endpoint frames)
    lpips = "auto"        # LPIPS backbone: auto, alex, vgg, alex-random, none
    bootstrap = 10000     # resamples for the 95% intervals
    confidence = 0.95

The output folder is a normal run folder (frames/, commits/, run.json: `hpcwalk score` and the
readers work on it) plus study.parquet (one row per walk), study.json (the summary), report.html
and figures/*.png. A rerun renders only uncommitted shards, then re-analyses everything. The
yardsticks beyond CLIP (sharpness, SSIM and LPIPS steps, KID on CLIP and encoder features) and the
report's answer are in hpcwalk/analyse/yardsticks.py.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from hpcwalk.analyse.interpscore import analysed_pairs, summarize, walk_table
from hpcwalk.core import interrupt
from hpcwalk.core.errors import JobError
from hpcwalk.job.plan import plan
from hpcwalk.job.studyspec import Study

OUTPUTS = ("study.json", "study.parquet", "report.html")  # beside the run's own files

# ---------------------------------------------------------------------------------------------
# 3. The entry point: render what is missing, analyse, write the three outputs
# ---------------------------------------------------------------------------------------------


@dataclass
class StudyResult:
    """What `run_study` did. `status` is done, or failed with the render summary's failed shards."""

    status: str
    render: Any  # executors.RunSummary
    files: list[str]
    pairs_left_out: int = 0  # seed pairs not analysed: some walk of theirs incomplete


def run_study(study: Study, out: str, overwrite: bool = False, progress: bool = True, executor: Any = None,
              verify: str = "full", shards: Any = None) -> StudyResult:
    """Render the study's frames through the executors (resuming; `executor`: executors.ExecutorOptions,
    None renders in this process), then write the analysis of the seed pairs whose walks are complete.
    `shards`: the job's shards when the caller has cut them already (validate.prepare_render)."""
    from hpcwalk.job.plan import shard
    from hpcwalk.run.local import run_render

    # 1. render and score what is not committed yet, or damaged (same path as `hpcwalk render`)
    missing = [] if overwrite else missing_outputs(out)
    if shards is None:
        shards = shard(plan(study.job), study.job.output.shard_size)
    summary = run_render(study.job, out, shards, overwrite=overwrite, progress=progress, executor=executor,
                         verify=verify)  # type: ignore[arg-type]
    if summary.failed:
        return StudyResult("failed", summary, [])
    if missing:
        from hpcwalk.store.verify import RunWarning

        warnings.warn(RunWarning(f"{out!r} had no {', '.join(missing)}: a study run there stopped before "
                                 f"writing its report; writing {'it' if len(missing) == 1 else 'them'} now"),
                      stacklevel=2)
    mark_study(out, study)  # from here on the folder owes its report: `hpcwalk verify` says so while it is missing
    # 2. the analysis of what is committed and verified
    with interrupt.reporting(lambda: f"all {len(shards)} shards committed in {out}; the analysis was not finished "
                                     "(study.parquet, study.json and report.html are each whole or absent)"):
        files, left_out = analyse(study, out, verify, progress)
    return StudyResult("done", summary, files, left_out)


def analyse(study: Study, out: str, verify: str = "full", progress: bool = True) -> tuple[list[str], int]:
    """Read a study folder's verified frames (no images), reduce them to one row per walk of the seed pairs
    with every walk complete, write the three outputs; returns (files written, seed pairs left out)."""
    from hpcwalk.see.report import write_report
    from hpcwalk.store.reader import read_verified, shard_columns, verify_run
    from hpcwalk.store.verify import RunWarning

    # 1. the verified frames, without image bytes (damaged shards left out, each with a warning)
    shards = verify_run(out, verify)  # type: ignore[arg-type]
    shards.warn()
    frames = read_verified(shards, [n for n in shard_columns(shards) if n != "image"] or None)
    meta = {k.decode(): v.decode() for k, v in (frames.schema.metadata or {}).items()}
    # 2. pixel and perceptual steps between consecutive frames (images read back, one shard at a time)
    steps = _pixel_steps(study, out, shards.files, progress)
    meta["lpips"] = resolve_lpips(study.spec.lpips, study.job.model.id)
    # 3. one row per walk of the complete pairs; say how many pairs are left out
    walks = walk_table(study, frames, steps)
    left_out = study.spec.pairs - len(analysed_pairs(walks))
    if left_out:
        warnings.warn(RunWarning(f"analysed {study.spec.pairs - left_out} of {study.spec.pairs} seed pairs: "
                                 f"{left_out} left out with incomplete walks (rerun the study to render them)"),
                      stacklevel=2)
    # 4. the summary, the table, the report
    summary_json = summarize(study, frames, walks, meta, steps)
    files = write_outputs(out, walks, summary_json)
    files += write_report(out, summary_json, walks)
    return files, left_out


def mark_study(out: str, study: Study) -> None:
    """Write the study mark (store/runfolder.STUDY_MARK): this folder is a study's, and which file made it."""
    import json

    from hpcwalk.core.fsio import filesystem, write_atomic
    from hpcwalk.store.runfolder import STUDY_MARK

    fs, root = filesystem(out)
    write_atomic(fs, f"{root}/{STUDY_MARK}", json.dumps({"study": study.job.source, "outputs": list(OUTPUTS)}).encode())


def owed_outputs(out: str) -> tuple[list[str], str]:
    """(the outputs a study folder lacks, the study file that made it) when its render finished (the study mark
    is there); ([], "") for any other folder."""
    import json

    from hpcwalk.core.fsio import filesystem
    from hpcwalk.store.runfolder import STUDY_MARK
    from hpcwalk.store.verify import parse_json_object

    fs, root = filesystem(out)
    try:
        with fs.open_input_stream(f"{root}/{STUDY_MARK}") as f:
            mark, _ = parse_json_object(f.read())
    except OSError:
        return [], ""
    source = str((mark or {}).get("study", "STUDY.toml"))
    return missing_outputs(out), source


def missing_outputs(out: str) -> list[str]:
    """The outputs (OUTPUTS) that a study folder already holding a run lacks; [] for a folder with no run."""
    import pyarrow.fs as pafs

    from hpcwalk.core.fsio import filesystem

    fs, root = filesystem(out)
    infos = fs.get_file_info([f"{root}/run.json", *(f"{root}/{n}" for n in OUTPUTS)])
    if infos[0].type != pafs.FileType.File:
        return []
    return [n for n, i in zip(OUTPUTS, infos[1:]) if i.type != pafs.FileType.File]


def check_yardsticks(study: Study) -> None:
    """What can fail in the analysis, checked before any work: LPIPS weights, frame size for SSIM and LPIPS."""
    from hpcwalk.analyse.pixelsteps import LPIPS_MIN_SIZE, SSIM_WINDOW, check_lpips

    net = resolve_lpips(study.spec.lpips, study.job.model.id)
    check_lpips(net)
    s = study.job.sampling
    if min(s.height, s.width) < SSIM_WINDOW:
        raise JobError(f"[sampling] height and width must be >= {SSIM_WINDOW} in a study (the SSIM window), "
                       f"got {s.height}x{s.width}")
    if min(s.height, s.width) < LPIPS_MIN_SIZE.get(net, 0):
        raise JobError(f"[sampling] height and width must be >= {LPIPS_MIN_SIZE[net]} for [study] lpips = {net!r} "
                       f"(its backbone pools smaller frames away), got {s.height}x{s.width}: render larger frames "
                       "or set lpips = \"none\"")


def study_needs(study: Study) -> Any:
    """Every weight the study loads (`run/needs.py: job_needs`: SD, CLIP, the encoder whose features KID
    compares) and the LPIPS backbone of its pixel steps; a `Needs`."""
    from dataclasses import replace

    from hpcwalk.analyse.pixelsteps import lpips_weight
    from hpcwalk.run.needs import job_needs

    needs = job_needs(study.job)
    lpips = lpips_weight(resolve_lpips(study.spec.lpips, study.job.model.id))
    return replace(needs, weights=needs.weights + ((lpips,) if lpips else ()))


def _pixel_steps(study: Study, out: str, files: list[str], progress: bool) -> Any:
    """SSIM and LPIPS steps of every walk, on the render device (pixelsteps.run_steps)."""
    import sys

    from tqdm import tqdm

    from hpcwalk.analyse.pixelsteps import load_lpips, run_steps
    from hpcwalk.sd.models import resolve_device

    check_yardsticks(study)
    device = resolve_device(study.job.render.device)
    net = resolve_lpips(study.spec.lpips, study.job.model.id)
    model = load_lpips(net, device) if net != "none" else None
    total = len(study.spec.units()) * len(study.spec.methods) * (study.spec.frames - 1)
    with tqdm(total=total, unit="step", desc="pixel steps", disable=not progress, file=sys.stderr) as bar:
        return run_steps(out, files, model, device, study.job.render.batch_size, progress=bar.update)


def resolve_lpips(net: str, sd_model: str) -> str:
    from hpcwalk.analyse.pixelsteps import resolve_lpips as resolve

    return resolve(net, sd_model)


def write_outputs(out: str, walks: pa.Table, summary: dict[str, Any]) -> list[str]:
    """study.parquet and study.json, each written to a temporary name and renamed (no temporary file is
    left when a write fails)."""
    import io

    import pyarrow.parquet as pq

    from hpcwalk.core.fsio import filesystem, write_atomic

    fs, root = filesystem(out)
    buf = io.BytesIO()
    pq.write_table(walks, buf)
    write_atomic(fs, f"{root}/study.parquet", buf.getvalue())
    write_atomic(fs, f"{root}/study.json", json.dumps(summary, indent=2).encode())
    return [f"{root}/study.parquet", f"{root}/study.json"]

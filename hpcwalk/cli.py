"""The `hpcwalk` command line: parse, call, print. Bad input exits with code 2 and one line."""

from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from hpcwalk.compile import CompileError
from hpcwalk.job import DTYPES, JobError
from hpcwalk.verify import DEFAULT_LEVEL, RunWarning, check_level

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # help texts name TOML tables like [render]: printed as written, not as markup
    help="Render latent-space walks of Stable Diffusion 1.x and 2.x to Parquet, score them with CLIP, and study them.",
)


def _print_version(value: bool) -> None:
    """`hpcwalk --version`: this package's version and the libraries that decide the frames (no imports)."""
    if not value:
        return
    from importlib import metadata

    import hpcwalk

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    libs = ", ".join(f"{n} {version(n)}" for n in ("torch", "diffusers", "transformers", "huggingface_hub",
                                                  "open_clip_torch", "safetensors"))
    typer.echo(f"hpcwalk {hpcwalk.__version__} (Python {sys.version.split()[0]}; {libs})")
    raise typer.Exit()


class _StderrHandler(logging.Handler):
    """Writes `hpcwalk.*` log records to the current sys.stderr (which test runners swap)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


def configure_logging(verbose: bool) -> None:
    """hpcwalk's loggers to stderr: INFO (what was loaded, and how), DEBUG with --verbose (full causes)."""
    root = logging.getLogger("hpcwalk")
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("hpcwalk: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print hpcwalk's version and its libraries' versions, then exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging (give it before the command: "
                                 "hpcwalk --verbose render ...): how the model was resolved, and the full cause "
                                 "(traceback) of a model load failure."),
) -> None:
    """hpcwalk: latent-space walks of Stable Diffusion 1.x and 2.x at cluster scale."""
    configure_logging(verbose)
    ctx.with_resource(_warning_lines())


@contextmanager
def _warning_lines() -> Iterator[None]:
    """While a command runs, each RunWarning (a damaged shard left out, a stale lock taken over, a prompt
    the text encoder cuts) is printed once as one `warning: ...` line on stderr."""
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("always", RunWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, RunWarning):
                return shown(message, category, filename, lineno, file, line)
            if str(message) not in seen:
                seen.add(str(message))
                typer.echo(f"warning: {message}", err=True)

        warnings.showwarning = show  # restored by catch_warnings on the way out
        yield


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _fail_io(e: OSError, what: str = "") -> None:
    """A writer hit the filesystem (a full disk, a vanished folder): one line, exit 1; nothing half-written
    stays under a final name (writers use temporary names), and rerunning after freeing space completes."""
    where = " ".join(x for x in (what, str(getattr(e, "filename", None) or "")) if x)
    typer.echo(f"error: cannot write {where or 'a file'}: {e.strerror or e}: free space (or fix the folder) and "
               "rerun the same command", err=True)
    raise typer.Exit(1)


# Executor flags, shared by every command that renders: declare them with these aliases
# (`ray: RayOption = None, workers: WorkersOption = None, gpus_per_worker: GpusPerWorkerOption = None,
# retries: RetriesOption = 2, shard_timeout: ShardTimeoutOption = None`) and turn them into checked ExecutorOptions with `executor_options`.
RayOption = Annotated[Optional[str], typer.Option(
    "--ray", metavar="[ADDRESS]",
    help="Render on Ray: auto, HOST:PORT of the head, ray://HOST:10001, or no value: RAY_ADDRESS when set "
         "(as under `ray job submit`), else a new local instance. Without --ray, frames render in this process.")]
WorkersOption = Annotated[Optional[int], typer.Option(
    "--workers", help="Ray workers (default: one per GPU of the cluster; without GPUs, one CPU worker per node).")]
GpusPerWorkerOption = Annotated[Optional[float], typer.Option(
    "--gpus-per-worker", help="GPUs per Ray worker (default 1; 0.5 puts two workers on each GPU).")]
RetriesOption = Annotated[int, typer.Option(
    "--retries", help="Re-runs of a shard whose Ray worker died under it, before it is reported failed.")]
ShardTimeoutOption = Annotated[Optional[float], typer.Option(
    "--shard-timeout", metavar="SECONDS",
    help="Ray only: a shard still rendering after this long is taken as a hung worker: the worker is killed "
         "and replaced, and the shard retried (counts against --retries). Default: no limit.")]


# Job overrides, shared by `render` and `study` (None keeps the job file's value).
ModelOption = Annotated[Optional[str], typer.Option(
    "--model", help="Override [model] id: tiny, tiny-v, sd14-random, sd21-random, a hub id (read from the local "
                    "Hugging Face cache, never downloaded), a diffusers folder or a .safetensors file (see `hpcwalk models`).")]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="Override [render] device: auto, cpu, cuda or cuda:N.")]
DtypeOption = Annotated[Optional[str], typer.Option("--dtype", help=f"Override [render] dtype: {', '.join(DTYPES)}.")]
BatchSizeOption = Annotated[Optional[int], typer.Option(
    "--batch-size", "-b", help="Override [render] batch_size (frames per micro-batch).")]
CompileModeOption = Annotated[Optional[str], typer.Option(
    "--compile", help="Override [compile] mode: none, default, max-autotune, reduce-overhead (CUDA graphs).")]
AttentionOption = Annotated[Optional[str], typer.Option(
    "--attention", help="Override [compile] attention: sdpa, xformers (CUDA, needs xformers), cudnn (CUDA, float16/bfloat16).")]


def _library_progress(enabled: bool) -> bool:
    """--no-progress also quiets the bars diffusers, transformers and huggingface_hub draw while loading."""
    if not enabled:
        from hpcwalk.loaders import quiet_progress_bars

        quiet_progress_bars()
    return enabled


ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", callback=_library_progress,
                                              help="Show progress bars (--no-progress: none, the libraries' included).")]
VerifyOption = Annotated[str, typer.Option(
    "--verify", metavar="quick|full",
    help="How committed shards are checked against their commit markers before they count: quick (file present, "
         "size) or full (sha256 of every byte, the default). A shard that fails is left out with a warning (and "
         "rendered again by render and study).")]


def _level(verify: str) -> str:
    try:
        return check_level(verify)
    except ValueError as e:
        _fail(str(e))


def executor_options(ray: Optional[str], workers: Optional[int], gpus_per_worker: Optional[float],
                     retries: int = 2, shard_timeout: Optional[float] = None):
    """The executor flags as checked `ExecutorOptions`; bad flags exit 2 with one line."""
    from hpcwalk.executors import ExecutorError, ExecutorOptions
    from hpcwalk.ray_executor import check_reachable

    try:
        options = ExecutorOptions(ray=ray, workers=workers, gpus_per_worker=gpus_per_worker, max_retries=retries,
                                  shard_timeout_s=shard_timeout)
        check_reachable(options.check().ray)
        return options
    except ExecutorError as e:
        _fail(str(e))


def expand_ray_flag(argv: list[str]) -> list[str]:
    """`--ray` given without a value (last, or before another option) means `--ray default`."""
    out: list[str] = []
    for i, a in enumerate(argv):
        out.append(a)
        if a == "--ray" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append("default")
    return out


@app.command()
def render(
    job_file: Path = typer.Argument(..., help="TOML job file (see examples/quickstart.toml)."),
    out: str = typer.Option(..., "--out", "-o", help="Output run folder (local path or pyarrow.fs URI such as s3://bucket/run)."),
    model: ModelOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    compile_mode: CompileModeOption = None,
    attention: AttentionOption = None,
    batch_size: BatchSizeOption = None,
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Override [output] shard_size (frames per Parquet file). Changing it changes the job fingerprint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out (otherwise a rerun resumes, and another job's folder is refused)."),
    progress: ProgressOption = True,
    ray: RayOption = None,
    workers: WorkersOption = None,
    gpus_per_worker: GpusPerWorkerOption = None,
    retries: RetriesOption = 2,
    shard_timeout: ShardTimeoutOption = None,
    verify: VerifyOption = DEFAULT_LEVEL,
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and plan only: print the plan's size and what a "
                                 "run would render, write nothing (exit 0), or the first problem (exit 2)."),
) -> None:
    """Render every frame of JOB_FILE into Parquet shards under --out.

    A rerun with the same job resumes: committed shards that pass verification are skipped, damaged
    ones are named and rendered again. One driver per folder: a second render into a folder that a
    live render holds is refused. Exit codes: 0 all shards committed, 1 some shard failed (listed;
    committed shards stay), 2 bad input (nothing written).
    """
    from hpcwalk.job import load_job
    from hpcwalk.models import ModelLoadError
    from hpcwalk.store import StoreError, verify_run
    from hpcwalk.validate import prepare_render

    # 1. validate everything before any work, then plan
    executor = executor_options(ray, workers, gpus_per_worker, retries, shard_timeout)
    level = _level(verify)
    try:
        job = load_job(job_file).with_overrides(model=model, device=device, dtype=dtype,
                                                batch_size=batch_size, shard_size=shard_size,
                                                compile_mode=compile_mode, attention=attention)
        prepared = prepare_render(job, out, overwrite, executor)
    except (JobError, StoreError, ModelLoadError, CompileError) as e:
        _fail(str(e))
    except OSError as e:  # a cache this process writes (the tokenizer's), on a full disk
        _fail_io(e)
    job = prepared.job
    for note in prepared.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"hpcwalk: {len(prepared.rows)} frames in {len(prepared.shards)} shards, model {job.model.id}, "
               f"{job.sampling.steps} steps, {job.render.dtype} ({prepared.mode} run in {out})", err=True)
    if dry_run:  # 2. the plan's size and what a run would render; nothing written
        done = set() if prepared.mode != "resume" else verify_run(out, level).indices
        left = sum(1 for s in prepared.shards if s.index not in done)
        typer.echo(f"dry run: {prepared.describe()}; {len(prepared.shards) - left} shards committed and verified "
                   f"({level}), {left} to render; nothing written")
        return
    # 2. render what is left
    run_job(job, out, prepared.shards, overwrite=overwrite, progress=progress, executor=executor, verify=level)


def run_job(job, out: str, shards, overwrite: bool = False, progress: bool = True, executor=None,
            verify: str = DEFAULT_LEVEL) -> None:
    """Render what is not committed yet (executors.run_render, local or on Ray), print the summary, exit 1 on failures."""
    from hpcwalk.executors import ExecutorError, run_render
    from hpcwalk.models import ModelLoadError
    from hpcwalk.store import StoreError

    try:
        summary = run_render(job, out, shards, overwrite=overwrite, progress=progress, executor=executor,
                             verify=verify)
    except (ModelLoadError, StoreError, ExecutorError, CompileError, JobError) as e:
        _fail(str(e))
    typer.echo(summary.describe())
    if summary.failed:
        for r in summary.failed:
            typer.echo(f"failed: shard-{r.shard:05d}: {r.error}", err=True)
        typer.echo("committed shards are kept; rerun the same command to retry the failed ones", err=True)
        raise typer.Exit(1)


@app.command()
def video(
    run_dir: str = typer.Argument(..., help="A run folder written by `hpcwalk render` (may be partial)."),
    walk: Optional[str] = typer.Option(None, "--walk", "-w", help="Walk to film (default: every walk, one video each)."),
    method: Optional[list[str]] = typer.Option(None, "--method", "-m", help="Method(s) side by side, in this order (repeatable; default: all of the walk's)."),
    fps: Optional[float] = typer.Option(None, help="Frames per second (default 30; an audio-paced walk plays at its audio_fps)."),
    crf: int = typer.Option(18, help="Quality for mp4 (libx264, 0-51) and webm (VP9, 0-63): lower is better. webp and gif ignore it."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help="mp4 (H.264 yuv420p, faststart), webm, webp or gif (default: --out's extension, else mp4)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output file (needs --walk when the run has several walks; default RUN_DIR/videos/WALK.FMT)."),
    labels: bool = typer.Option(True, "--labels/--no-labels", help="Method names above the panels, the walk parameter below."),
    audio: Optional[str] = typer.Option(None, "--audio", help="Mux this audio file in (mp4: AAC, webm: Opus), trimmed to the video. Default: an audio-paced walk's own audio (pace = \"audio\")."),
    audio_start: Optional[float] = typer.Option(None, "--audio-start", metavar="SECONDS", help="Where in the audio the first frame shows (default: the walk's audio_start, else 0)."),
    no_audio: bool = typer.Option(False, "--no-audio", help="No audio track, even for an audio-paced walk."),
    verify: VerifyOption = DEFAULT_LEVEL,
) -> None:
    """Stream a walk's committed frames into a video, its methods side by side; says what is missing.
    An audio-paced walk gets its audio muxed in at its audio_fps. Damaged shards are left out with a
    warning; exit 1 when the file cannot be written (a full disk)."""
    import os

    from hpcwalk.runindex import open_run
    from hpcwalk.store import StoreError
    from hpcwalk.video import VideoError, VideoOptions, check_options, select_tracks, walk_options, write_video

    # 1. validate: the run, the options, the walks
    fmt = format or {".webm": "webm", ".webp": "webp", ".gif": "gif"}.get(os.path.splitext(out or "")[1].lower(), "mp4")
    opts = VideoOptions(format=fmt, fps=30.0 if fps is None else fps, crf=crf, labels=labels, audio=audio,
                        audio_start=audio_start or 0.0)
    level = _level(verify)
    try:
        check_options(opts)
        index = open_run(run_dir, level)
        walks = [walk] if walk else index.walks()
        if out and len(walks) > 1:
            _fail(f"--out names one file but {run_dir!r} has {len(walks)} walks: add --walk NAME (one of {', '.join(walks)})")
        if walk:
            select_tracks(index, walk, method)
        per_walk = {w: walk_options(index, w, opts, fps, audio, audio_start, no_audio) for w in walks}
        for o in per_walk.values():  # an audio-paced walk's own fps and audio, checked like the options given
            check_options(o)
        for line in index.missing_report():
            typer.echo(f"warning: {line}", err=True)
        # 2. one video per walk (with no --walk, walks lacking frames or a --method are skipped, and said so)
        written = 0
        for w in walks:
            tracks = index.tracks(w)
            lacking = [m for m in method or [] if m not in {t.label for t in tracks}]
            if not walk and (lacking or not any(t.rows.num_rows for t in tracks)):
                why = f"no method {', '.join(lacking)}" if lacking else "no committed frames yet"
                typer.echo(f"skipped walk {w!r}: {why}", err=True)
                continue
            typer.echo(write_video(index, w, out, method, per_walk[w]).describe())
            written += 1
        if not written:
            _fail(f"no walk of {run_dir!r} has committed frames" + (f" for method {', '.join(method)}" if method else ""))
    except (StoreError, VideoError) as e:
        _fail(str(e))
    except OSError as e:
        _fail_io(e, "the video")


@app.command()
def view(
    run_dir: str = typer.Argument(..., help="A run folder written by `hpcwalk render` (may be partial)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Viewer folder (default RUN_DIR/viewer); must be new, empty or a previous viewer."),
    thumb_size: int = typer.Option(160, "--thumb-size", min=16, help="Longest side of the strip thumbnails, in pixels."),
    verify: VerifyOption = DEFAULT_LEVEL,
) -> None:
    """Write a static viewer (index.html + images, no server; opens from file://); says what is missing.
    Damaged shards are left out with a warning; exit 1 when a file cannot be written (a full disk)."""
    from hpcwalk.runindex import open_run
    from hpcwalk.store import StoreError
    from tqdm import tqdm

    from hpcwalk.viewer import ViewerError, build_viewer, check_out, default_out

    level = _level(verify)
    try:
        index = open_run(run_dir, level)
        check_out(out or default_out(index))
        for line in index.missing_report():
            typer.echo(f"warning: {line}", err=True)
        with tqdm(total=index.table.num_rows, unit="frame", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
            typer.echo(build_viewer(index, out, thumb_size=thumb_size, progress=bar.update).describe())
    except (StoreError, ViewerError) as e:
        _fail(str(e))
    except OSError as e:
        _fail_io(e, "the viewer")


@app.command()
def study(
    study_file: Path = typer.Argument(..., help="Study TOML: a [study] table plus the job tables (see examples/study.toml)."),
    out: str = typer.Option(..., "--out", "-o", help="Study folder (local): a run folder plus study.parquet, study.json, report.html and figures/."),
    model: ModelOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    compile_mode: CompileModeOption = None,
    attention: AttentionOption = None,
    batch_size: BatchSizeOption = None,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing study in --out (otherwise a rerun resumes)."),
    progress: ProgressOption = True,
    ray: RayOption = None,
    workers: WorkersOption = None,
    gpus_per_worker: GpusPerWorkerOption = None,
    retries: RetriesOption = 2,
    shard_timeout: ShardTimeoutOption = None,
    verify: VerifyOption = DEFAULT_LEVEL,
) -> None:
    """Render N seed pairs x methods x n frames, CLIP-scored in the same pass, and report InterpScore
    per method with bootstrap CIs, paired differences, curves along gamma and smoothness.

    A rerun renders only uncommitted (or damaged) shards, then rewrites the analysis, which covers seed
    pairs whose walks are all complete and says how many it left out. Exit codes: 0 done, 1 some shard
    failed (rerun to retry) or an output could not be written, 2 bad input (nothing written).
    """
    import dataclasses

    from hpcwalk.executors import ExecutorError
    from hpcwalk.models import ModelLoadError
    from hpcwalk.store import StoreError
    from hpcwalk.study import check_yardsticks, load_study, run_study
    from hpcwalk.validate import prepare_render

    # 1. validate everything before any work
    executor = executor_options(ray, workers, gpus_per_worker, retries, shard_timeout)
    level = _level(verify)
    if "://" in out:
        _fail(f"--out {out!r}: a study writes its report to a local folder; pass a local path")
    try:
        st = load_study(study_file)
        st = dataclasses.replace(st, job=st.job.with_overrides(model=model, device=device, dtype=dtype,
                                                               batch_size=batch_size, compile_mode=compile_mode,
                                                               attention=attention))
        prepared = prepare_render(st.job, out, overwrite, executor)  # with --ray, device checks run on the workers
        st, mode = dataclasses.replace(st, job=prepared.job), prepared.mode
        check_yardsticks(st)  # LPIPS weights (the analysis runs here), frame size for SSIM
    except (JobError, StoreError, ModelLoadError, CompileError) as e:
        _fail(str(e))
    except OSError as e:
        _fail_io(e)
    s = st.spec
    typer.echo(f"hpcwalk study: {s.pairs} seed pairs x {len(s.prompts)} prompt(s) x {len(s.methods)} methods x "
               f"{s.frames} frames, model {st.job.model.id}, CLIP "
               f"{', '.join(f'{m}/{p}' for _, m, p in st.job.clip.models(st.job.model.id))} ({mode} run in {out})", err=True)
    # 2. render + score what is missing, then analyse
    try:
        result = run_study(st, out, overwrite=overwrite, progress=progress, executor=executor, verify=level,
                           shards=prepared.shards)
    except (JobError, ModelLoadError, StoreError, ExecutorError) as e:
        _fail(str(e))
    except OSError as e:
        _fail_io(e, "the study's outputs")
    typer.echo(result.render.describe())
    if result.status == "failed":
        for r in result.render.failed:
            typer.echo(f"failed: shard-{r.shard:05d}: {r.error}", err=True)
        typer.echo("no report written: rerun the same command to retry the failed shards", err=True)
        raise typer.Exit(1)
    # 3. the headline numbers and where everything is
    import json

    summary = json.loads(Path(out, "study.json").read_text())
    for p, per in summary["interp_score"].items():
        for m, iv in per.items():
            typer.echo(f"InterpScore {p} {m:>10}: {iv['estimate']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]")
    typer.echo(f"report: {Path(out, 'report.html')}")


@app.command()
def score(
    run_dir: str = typer.Argument(..., help="A run folder written by `hpcwalk render` or `hpcwalk study`."),
    clip_model: Optional[str] = typer.Option(None, "--clip-model", help="open_clip model: tiny-clip, an architecture such as ViT-H-14, or local-dir:/path. Default: the CLIP model the run was rendered with."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Score every frame against this text instead of each row's score_prompt (written to scores/MODEL__TAG__prompt-HASH/)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Weights: an open_clip tag (e.g. laion2b_s32b_b79k), a weights file, or none (random). Default: none for tiny-clip."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", help=f"CLIP dtype: {', '.join(DTYPES)}."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Frames per CLIP batch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Re-score every shard (otherwise a rerun scores only the rest)."),
    progress: ProgressOption = True,
    verify: VerifyOption = DEFAULT_LEVEL,
) -> None:
    """Re-score a run's frames with another CLIP model or against another text, without re-rendering: writes
    RUN_DIR/scores/MODEL__TAG[__prompt-HASH]/ (frame_id, score_prompt, clip_image, clip_score, clip_score_b),
    keyed by frame id. Damaged frame shards are left out with a warning; exit 1 when a file cannot be written
    (a full disk)."""
    from tqdm import tqdm

    from hpcwalk.models import ModelLoadError
    from hpcwalk.score import run_clip_model, score_run
    from hpcwalk.store import StoreError
    from hpcwalk.validate import check_score

    # 1. validate everything before any work
    level = _level(verify)
    if clip_model is None:
        if pretrained is not None:
            _fail("--pretrained needs --clip-model (without both, the run's own CLIP model is used)")
        try:
            clip_model, pretrained = run_clip_model(run_dir)
        except StoreError as e:
            _fail(str(e))
    try:
        out, dev, dt, pretrained = check_score(run_dir, clip_model, pretrained, device, dtype, batch_size, overwrite,
                                               prompt)
    except (JobError, ModelLoadError, StoreError) as e:
        _fail(str(e))
    typer.echo(f"hpcwalk score: {run_dir} with {clip_model}/{pretrained} on {dev} -> {out}", err=True)
    # 2. score the shards not scored yet
    bar = tqdm(unit="frame", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    try:
        summary = score_run(run_dir, clip_model, pretrained, dev, dt, batch_size, overwrite, progress=bar.update,
                            prompt=prompt, verify=level)
    except (ModelLoadError, StoreError) as e:
        _fail(str(e))
    except OSError as e:
        _fail_io(e, "the scores")
    finally:
        bar.close()
    typer.echo(summary.describe())


@app.command()
def models(
    folders: Optional[list[str]] = typer.Argument(None, help="Also look here: diffusers folders and .safetensors "
                                                 "files, at the top and one level down."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line instead of the table."),
    clip_tags: bool = typer.Option(True, "--clip-tags/--no-clip-tags", help="Name the open_clip model/pretrained "
                                   "pairs of cached CLIP repos (imports open_clip: a few seconds)."),
) -> None:
    """List the SD and CLIP models on this machine: Hugging Face cache snapshots (HF_HUB_CACHE or HF_HOME)
    and the given folders, each with its format and whether it loads offline; then the built-in random models.
    Nothing is downloaded: what is listed as loading is what `hpcwalk render --model NAME` can use here."""
    import json

    from hpcwalk.weights import BUILTIN_MODELS, hub_cache_dir, open_clip_tags, scan

    # 1. find: the hub cache, then the folders given
    found = scan(tuple(folders or ()), open_clip_tags if clip_tags else None)
    rows = [(m.name, m.kind, m.format, f"{m.size / 2**30:.2f} GiB", m.offline) for m in found]
    rows += [(b, "sd", "builtin (random weights)", "-", "yes") for b in BUILTIN_MODELS]
    # 2. print
    if as_json:
        for r in rows:
            typer.echo(json.dumps(dict(zip(("name", "kind", "format", "size", "offline"), r))))
        return
    typer.echo(f"hub cache: {hub_cache_dir()}" + ("" if found else " (no models found there)"))
    widths = [max(len(str(r[i])) for r in rows + [("MODEL", "KIND", "FORMAT", "SIZE", "LOADS OFFLINE")])
              for i in range(4)]
    for r in [("MODEL", "KIND", "FORMAT", "SIZE", "LOADS OFFLINE"), *rows]:
        why = r[4] if len(r[4]) <= 120 else r[4][:117] + "..."  # --json has the whole line
        typer.echo("  ".join(str(v).ljust(w) for v, w in zip(r[:4], widths)) + "  " + why)



@app.command("verify")
def verify_cmd(
    run_dir: str = typer.Argument(..., help="A run folder written by `hpcwalk render` or `hpcwalk study`."),
    repair: bool = typer.Option(False, "--repair", help="Remove every damaged shard (marker first, then its file) and "
                                "every stray temporary file, so that the next render renders exactly those again."),
    verify: VerifyOption = DEFAULT_LEVEL,
) -> None:
    """List each shard's state: ok, missing (marker without its Parquet file), truncated, size mismatch,
    checksum mismatch, bad marker, file without marker, stray temp file; and a damaged run.json. Exit 0 when
    every shard is ok (or was repaired), 1 when something is damaged (or run.json is), 2 when RUN_DIR is not
    a run folder."""
    from collections import Counter

    from hpcwalk.runlock import RunLock, describe
    from hpcwalk.runfolder import damaged_run_folder
    from hpcwalk.store import DamagedRunJson, StoreError, filesystem, read_run, verify_run
    from hpcwalk.verify import repair as remove_damaged

    # 1. validate: a run folder (its run.json may be damaged: reported with the shards), no render running in
    #    it when repairing
    level = _level(verify)
    lock = RunLock(run_dir)
    damaged_run = None
    try:
        try:
            read_run(run_dir)
        except DamagedRunJson as e:
            if not damaged_run_folder(run_dir):
                raise
            damaged_run = f"run.json: damaged or not hpcwalk's ({e.why})"
        if repair:
            lock.acquire()
    except StoreError as e:
        _fail(str(e))
    try:
        # 2. every shard against its marker
        shards = verify_run(run_dir, level)
        holder = None if repair else lock.live_holder()
        if holder is not None:
            typer.echo(f"note: {describe(holder)} is rendering into this folder: a file without marker or a temp "
                       "file may be a shard being committed right now", err=True)
        for c in shards.checks:
            typer.echo(c.describe())
        counts = Counter(c.state for c in shards.checks)
        bad = [c for c in shards.checks if not c.ok]
        typer.echo(f"{len(shards.ok)} of {len(shards.checks) - counts['stray temp file']} shards ok ({level})"
                   + "".join(f", {n} {state}" for state, n in counts.items() if state != "ok"))
        if damaged_run:  # --repair cannot mend it: the job is not in the shards, only its fingerprint
            typer.echo(f"{damaged_run}: rerun the render with the run's own job file into {run_dir} (it writes "
                       "run.json again when the shards carry that job's fingerprint), or restore it from a copy")
        if bad and repair:  # 3. repair: remove what is bad; the next render renders exactly that
            removed = remove_damaged(filesystem(run_dir)[0], bad)
            typer.echo(f"repaired: removed {len(removed)} files; rerun the render or study into {run_dir} to "
                       f"render the {len(shards.damaged)} removed shards again")
        elif bad:
            typer.echo(f"damaged: run `hpcwalk verify {run_dir} --repair`, or rerun the render or study into "
                       f"{run_dir} (it renders damaged shards again)", err=True)
        if damaged_run or (bad and not repair):
            raise typer.Exit(1)
    except OSError as e:
        _fail_io(e, "the repair")
    finally:
        lock.release()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def bench(
    ctx: typer.Context,
    which: Optional[str] = typer.Argument(None, help="latency (per-step UNet, VAE, CLIP, kernels), throughput (frames/s: "
                                          "hpcwalk vs diffusers eager and diffusers' recipe, FP8 and its quality) or "
                                          "longrun (a long walk through PNG + Parquet, per encode-pool size)."),
) -> None:
    """Benchmark this machine; the options after WHICH go to the benchmark (`hpcwalk bench WHICH --help`).

    Examples: `hpcwalk bench latency` (quick on a CPU), `hpcwalk bench throughput --smoke`,
    `hpcwalk bench throughput --model sd14-random --dtype float16 --compile default --batch 16 --quantize fp8`.
    Each prints a table in the columns of benchmarks/README.md and writes its JSON to ./bench-results/
    (or --out). The harness is part of the installed package (hpcwalk.bench): no source checkout needed.
    """
    from hpcwalk.bench import run

    if which is None or which in ("--help", "-h"):  # --help after WHICH is the benchmark's own (argparse)
        typer.echo(ctx.get_help())
        raise typer.Exit(0 if which or "--help" in ctx.args or "-h" in ctx.args else 2)
    raise typer.Exit(run(which, list(ctx.args)))


def main() -> None:
    app(args=expand_ray_flag(sys.argv[1:]))


if __name__ == "__main__":
    main()

"""What every command shares: the Typer app, logging, the one-line error exits, the option set of the
commands that render (render, study), and the executor flags. Imports stay light (no torch): the
commands import what they run inside their bodies, so `hpcwalk --help` starts in a moment."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import typing
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator, Optional

import click
import typer
from typer.core import TyperGroup

from hpcwalk.core import interrupt
from hpcwalk.core.errors import HpcwalkError
from hpcwalk.job.spec import DTYPES
from hpcwalk.store.verify import DEFAULT_LEVEL, RunWarning, check_level

if TYPE_CHECKING:  # annotations only: the executors (and torch) load when a command runs
    from hpcwalk.job.spec import RenderJob
    from hpcwalk.run.options import ExecutorOptions

class _Commands(TyperGroup):
    """The command group: every command runs with SIGTERM and SIGINT stopping it at a safe point (one line)."""

    def invoke(self, ctx: click.Context) -> Any:
        resume = resume_command([*ctx._protected_args, *ctx.args])  # before the group consumes them
        with interrupt.handling(last_words(resume)):
            try:
                return super().invoke(ctx)
            except interrupt.Interrupted as e:
                stopped(e, resume)


def resume_command(args: list[str]) -> str:
    """The command that picks up where a stopped one left off: the same one, without --overwrite."""
    import shlex

    return "hpcwalk " + shlex.join(a for a in args if a != "--overwrite")


def last_words(resume: str) -> Callable[[int], str]:
    """The line of a command that a second signal stopped at once (hpcwalk/core/interrupt.py: stop_now)."""
    return lambda signum: _stop_line(signum, "stopped at once (a second signal); committed files are whole, "
                                     "one being written is left under its temporary name", resume)


def _stop_line(signum: int, state: str, resume: str) -> str:
    return f"interrupted ({interrupt.Interrupted(signum).name}): {state}; resume with: {resume}"


def stopped(e: interrupt.Interrupted, resume: str) -> None:
    """The one line of a command stopped by SIGTERM or SIGINT, after its locks are released; exit 128 + signum
    (143 for SIGTERM, 130 for SIGINT)."""
    interrupt.run_cleanups()  # what no finally released (normally nothing: the lock's own finally did)
    typer.echo(_stop_line(e.signum, e.state(), resume), err=True)
    raise typer.Exit(e.exit_code)


app = typer.Typer(
    cls=_Commands,
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


def fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def fail_io(e: OSError, what: str = "") -> None:
    """A writer hit the filesystem (a full disk, a vanished folder): one line, exit 1; nothing half-written
    stays under a final name (writers use temporary names), and rerunning after freeing space completes."""
    where = " ".join(x for x in (what, str(getattr(e, "filename", None) or "")) if x)
    typer.echo(f"error: cannot write {where or 'a file'}: {e.strerror or e}: free space (or fix the folder) and "
               "rerun the same command", err=True)
    raise typer.Exit(1)


@contextmanager
def refused(io: Optional[str] = None) -> Iterator[None]:
    """The one error handler of every command: inside, any HpcwalkError is one `error:` line and exit 2;
    with `io` (what is being written, "" for unnamed), an OSError is one `cannot write` line and exit 1."""
    try:
        yield
    except HpcwalkError as e:
        fail(str(e))
    except OSError as e:
        if io is None:
            raise
        fail_io(e, io)


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
ClipModelOption = Annotated[Optional[str], typer.Option(
    "--clip-model", help="Override [clip] model: tiny-clip, an open_clip architecture such as ViT-L-14 (with "
                         "--clip-pretrained unless it is the SD model's default), or local-dir:/path.")]
ClipPretrainedOption = Annotated[Optional[str], typer.Option(
    "--clip-pretrained", help="Override [clip] pretrained: an open_clip weights tag such as openai or "
                              "laion2b_s32b_b79k (read from the local cache), a weights file, or none (random).")]
EncoderOption = Annotated[Optional[str], typer.Option(
    "--encoder", help="Override [encoder] model: auto, tiny-dinov2, a hub id such as facebook/dinov2-base (local "
                      "cache only), a folder, or none.")]
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
        from hpcwalk.sd.loaders import quiet_progress_bars

        quiet_progress_bars()
    return enabled


ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", callback=_library_progress,
                                              help="Show progress bars (--no-progress: none, the libraries' included).")]
VerifyOption = Annotated[str, typer.Option(
    "--verify", metavar="quick|full",
    help="How committed shards are checked against their commit markers before they count: quick (file present, "
         "size) or full (sha256 of every byte, the default). A shard that fails is left out with a warning (and "
         "rendered again by render and study).")]


def level_of(verify: str) -> str:
    try:
        return check_level(verify)
    except ValueError as e:
        fail(str(e))


def executor_options(ray: Optional[str], workers: Optional[int], gpus_per_worker: Optional[float],
                     retries: int = 2, shard_timeout: Optional[float] = None):
    """The executor flags as checked `ExecutorOptions`; bad flags exit 2 with one line."""
    from hpcwalk.run.options import ExecutorOptions
    from hpcwalk.run.options import check_reachable

    try:
        options = ExecutorOptions(ray=ray, workers=workers, gpus_per_worker=gpus_per_worker, max_retries=retries,
                                  shard_timeout_s=shard_timeout)
        check_reachable(options.check().ray)
        return options
    except HpcwalkError as e:
        fail(str(e))


def expand_ray_flag(argv: list[str]) -> list[str]:
    """`--ray` given without a value (last, or before another option) means `--ray default`."""
    out: list[str] = []
    for i, a in enumerate(argv):
        out.append(a)
        if a == "--ray" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append("default")
    return out
# The option set `render` and `study` share, declared once. A command takes `overrides: JobOverrides` and
# `run: RunFlags` parameters; `@shared_options` puts the options of each in their place in its signature
# (so --help lists them where they were) and hands the command the two checked values.
@dataclass(frozen=True)
class JobOverrides:
    """--model --clip-model --clip-pretrained --encoder --device --dtype --compile --attention --batch-size
    (None keeps the job file's value)."""

    model: Optional[str] = None
    clip_model: Optional[str] = None
    clip_pretrained: Optional[str] = None
    encoder: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    compile_mode: Optional[str] = None
    attention: Optional[str] = None
    batch_size: Optional[int] = None

    def apply(self, job: RenderJob, **more: Any) -> RenderJob:
        """The job with these overrides (and `more`, such as render's --shard-size); JobError when invalid."""
        return job.with_overrides(**vars(self), **more)


@dataclass(frozen=True)
class RunFlags:
    """--progress, the executor flags (checked: ExecutorOptions) and --verify (checked: its level)."""

    progress: bool
    executor: ExecutorOptions
    verify: str


_GROUPS: dict[str, list[tuple[str, Any, Any]]] = {
    "overrides": [("model", ModelOption, None), ("clip_model", ClipModelOption, None),
                  ("clip_pretrained", ClipPretrainedOption, None), ("encoder", EncoderOption, None),
                  ("device", DeviceOption, None), ("dtype", DtypeOption, None),
                  ("compile_mode", CompileModeOption, None), ("attention", AttentionOption, None),
                  ("batch_size", BatchSizeOption, None)],
    "run": [("progress", ProgressOption, True), ("ray", RayOption, None), ("workers", WorkersOption, None),
            ("gpus_per_worker", GpusPerWorkerOption, None), ("retries", RetriesOption, 2),
            ("shard_timeout", ShardTimeoutOption, None), ("verify", VerifyOption, None)],
}


def shared_options(fn: Callable[..., None]) -> Callable[..., None]:
    """Expand fn's `overrides` and `run` parameters into the shared options (see JobOverrides, RunFlags)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    params: list[inspect.Parameter] = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in _GROUPS:
            for name, annotation, default in _GROUPS[p.name]:
                default = DEFAULT_LEVEL if name == "verify" else default
                params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                annotation=annotation))
        else:
            params.append(p.replace(annotation=hints[p.name], kind=inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(fn)
    def command(**kw: Any) -> None:
        overrides = JobOverrides(**{name: kw.pop(name) for name, _, _ in _GROUPS["overrides"]})
        flags = {name: kw.pop(name) for name, _, _ in _GROUPS["run"]}
        executor = executor_options(flags["ray"], flags["workers"], flags["gpus_per_worker"], flags["retries"],
                                    flags["shard_timeout"])
        run = RunFlags(progress=flags["progress"], executor=executor, verify=level_of(flags["verify"]))
        return fn(overrides=overrides, run=run, **kw)

    command.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command

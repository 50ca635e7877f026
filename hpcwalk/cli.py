"""The `hpcwalk` command line: parse, call, print. Bad input exits with code 2 and one line."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from hpcwalk.job import DTYPES, JobError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Render latent-space walks of Stable Diffusion 1.x to Parquet, score them with CLIP, and study them.",
)


@app.callback()
def _root() -> None:
    """hpcwalk: latent-space walks of Stable Diffusion 1.x at cluster scale."""


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


@app.command()
def render(
    job_file: Path = typer.Argument(..., help="TOML job file (see examples/quickstart.toml)."),
    out: str = typer.Option(..., "--out", "-o", help="Output run folder (local path or pyarrow.fs URI such as s3://bucket/run)."),
    model: Optional[str] = typer.Option(None, help="Override [model] id: tiny, sd14-random, a hub id, a diffusers folder or a .safetensors file."),
    device: Optional[str] = typer.Option(None, help="Override [render] device: auto, cpu, cuda or cuda:N."),
    dtype: Optional[str] = typer.Option(None, help=f"Override [render] dtype: {', '.join(DTYPES)}."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Override [render] batch_size (frames per micro-batch)."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Override [output] shard_size (frames per Parquet file). Changing it changes the job fingerprint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out (otherwise a rerun resumes, and another job's folder is refused)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Render every frame of JOB_FILE into Parquet shards under --out.

    A rerun with the same job resumes: committed shards are skipped. Exit codes: 0 all shards
    committed, 1 some shard failed (listed; committed shards stay), 2 bad input (nothing written).
    """
    from hpcwalk.job import load_job, plan, shard
    from hpcwalk.models import ModelLoadError, check_model_spec
    from hpcwalk.store import StoreError, preflight

    # 1. validate everything before any work
    try:
        job = load_job(job_file).with_overrides(model=model, device=device, dtype=dtype,
                                                batch_size=batch_size, shard_size=shard_size)
        check_model_spec(job.model.id, job.render.dtype, job.render.device)
        mode = preflight(out, job, overwrite)
    except (JobError, StoreError, ModelLoadError) as e:
        _fail(str(e))
    rows = plan(job)
    shards = shard(rows, job.output.shard_size)
    typer.echo(f"hpcwalk: {len(rows)} frames in {len(shards)} shards, model {job.model.id}, "
               f"{job.sampling.steps} steps, {job.render.dtype} ({mode} run in {out})", err=True)
    run_job(job, out, shards, overwrite=overwrite, progress=progress)


def run_job(job, out: str, shards, overwrite: bool = False, progress: bool = True) -> None:
    """Render what is not committed yet (executors.run_render), print the summary, exit 1 on failures."""
    from hpcwalk.executors import run_render
    from hpcwalk.models import ModelLoadError
    from hpcwalk.store import StoreError

    try:
        summary = run_render(job, out, shards, overwrite=overwrite, progress=progress)
    except (ModelLoadError, StoreError) as e:
        _fail(str(e))
    typer.echo(summary.describe())
    if summary.failed:
        for r in summary.failed:
            typer.echo(f"failed: shard-{r.shard:05d}: {r.error}", err=True)
        typer.echo("committed shards are kept; rerun the same command to retry the failed ones", err=True)
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

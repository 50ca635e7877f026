"""`hpcwalk render` and `hpcwalk study`: validate, plan, render what is not committed, then (study) analyse."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hpcwalk.cli.common import JobOverrides, RunFlags, app, fail, refused, shared_options
from hpcwalk.store.verify import DEFAULT_LEVEL


@app.command()
@shared_options
def render(
    job_file: Path = typer.Argument(..., help="TOML job file (see examples/quickstart.toml)."),
    out: str = typer.Option(..., "--out", "-o", help="Output run folder (local path or pyarrow.fs URI such as s3://bucket/run)."),
    overrides: JobOverrides = JobOverrides(),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Override [output] shard_size (frames per Parquet file). Changing it changes the job fingerprint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out (otherwise a rerun resumes, and another job's folder is refused)."),
    run: RunFlags = None,  # type: ignore[assignment]  (filled by @shared_options)
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and plan only: print the plan's size and what a "
                                 "run would render, write nothing (exit 0), or the first problem (exit 2)."),
) -> None:
    """Render every frame of JOB_FILE into Parquet shards under --out.

    A rerun with the same job resumes: committed shards that pass verification are skipped, damaged
    ones are named and rendered again. One driver per folder: a second render into a folder that a
    live render holds is refused. Exit codes: 0 all shards committed, 1 some shard failed (listed;
    committed shards stay), 2 bad input (nothing written).
    """
    from hpcwalk.job.parse import load_job

    # 1. validate everything before any work, then plan; the job file first, before torch is imported (a bad
    #    or hostile file is one line in a fraction of a second)
    with refused(""):
        job = overrides.apply(load_job(job_file), shard_size=shard_size)
        from hpcwalk.run.preflight import prepare_render
        from hpcwalk.store.reader import verify_run
        from hpcwalk.store.runfolder import check_output_path

        check_output_path(out)
        prepared = prepare_render(job, out, overwrite, run.executor)
    job = prepared.job
    for note in prepared.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"hpcwalk: {len(prepared.rows)} frames in {len(prepared.shards)} shards, model {job.model.id}, "
               f"{job.sampling.steps} steps, {job.render.dtype} ({prepared.mode} run in {out})", err=True)
    if dry_run:  # 2. the plan's size and what a run would render; nothing written
        done = set() if prepared.mode != "resume" else verify_run(out, run.verify, job=job).indices
        left = sum(1 for s in prepared.shards if s.index not in done)
        typer.echo(f"dry run: {prepared.describe()}; {len(prepared.shards) - left} shards committed and verified "
                   f"({run.verify}), {left} to render; nothing written")
        return
    # 2. render what is left
    run_job(job, out, prepared.shards, overwrite=overwrite, progress=run.progress, executor=run.executor,
            verify=run.verify)


def run_job(job, out: str, shards, overwrite: bool = False, progress: bool = True, executor=None,
            verify: str = DEFAULT_LEVEL) -> None:
    """Render what is not committed yet (executors.run_render, local or on Ray), print the summary, exit 1 on failures."""
    from hpcwalk.run.local import run_render

    with refused():
        summary = run_render(job, out, shards, overwrite=overwrite, progress=progress, executor=executor,
                             verify=verify)
    typer.echo(summary.describe())
    if summary.failed:
        for r in summary.failed:
            typer.echo(f"failed: shard-{r.shard:05d}: {r.error}", err=True)
        typer.echo("committed shards are kept; rerun the same command to retry the failed ones", err=True)
        raise typer.Exit(1)


@app.command()
@shared_options
def study(
    study_file: Path = typer.Argument(..., help="Study TOML: a [study] table plus the job tables (see examples/study.toml)."),
    out: str = typer.Option(..., "--out", "-o", help="Study folder (local): a run folder plus study.parquet, study.json, report.html and figures/."),
    overrides: JobOverrides = JobOverrides(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing study in --out (otherwise a rerun resumes)."),
    run: RunFlags = None,  # type: ignore[assignment]  (filled by @shared_options)
) -> None:
    """Render N seed pairs x methods x n frames, CLIP-scored in the same pass, and report InterpScore
    per method with bootstrap CIs, paired differences, curves along gamma and smoothness.

    A rerun renders only uncommitted (or damaged) shards, then rewrites the analysis, which covers seed
    pairs whose walks are all complete and says how many it left out. Exit codes: 0 done, 1 some shard
    failed (rerun to retry) or an output could not be written, 2 bad input (nothing written).
    """
    import dataclasses

    from hpcwalk.job.studyspec import load_study

    # 1. validate everything before any work (the study file before torch is imported)
    if "://" in out:
        fail(f"--out {out!r}: a study writes its report to a local folder; pass a local path")
    with refused(""):
        st = load_study(study_file)
        from hpcwalk.run.preflight import prepare_render
        from hpcwalk.store.runfolder import check_output_path
        from hpcwalk.study import check_yardsticks, run_study

        check_output_path(out)
        st = dataclasses.replace(st, job=overrides.apply(st.job))
        prepared = prepare_render(st.job, out, overwrite, run.executor)  # with --ray, device checks run on the workers
        st, mode = dataclasses.replace(st, job=prepared.job), prepared.mode
        check_yardsticks(st)  # LPIPS weights (the analysis runs here), frame size for SSIM
    s = st.spec
    typer.echo(f"hpcwalk study: {s.pairs} seed pairs x {len(s.prompts)} prompt(s) x {len(s.methods)} methods x "
               f"{s.frames} frames, model {st.job.model.id}, CLIP "
               f"{', '.join(f'{m}/{p}' for _, m, p in st.job.clip.models(st.job.model.id))} ({mode} run in {out})", err=True)
    # 2. render + score what is missing, then analyse
    with refused("the study's outputs"):
        result = run_study(st, out, overwrite=overwrite, progress=run.progress, executor=run.executor,
                           verify=run.verify, shards=prepared.shards)
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

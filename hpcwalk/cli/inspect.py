"""Commands that look without rendering: `hpcwalk models`, `hpcwalk needs`, `hpcwalk verify`, `hpcwalk bench`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hpcwalk.cli.common import (
    ClipModelOption,
    ClipPretrainedOption,
    DeviceOption,
    DtypeOption,
    EncoderOption,
    JobOverrides,
    ModelOption,
    VerifyOption,
    app,
    fail_io,
    level_of,
    refused,
)
from hpcwalk.core import interrupt
from hpcwalk.store.verify import DEFAULT_LEVEL


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

    from hpcwalk.sd.catalog import open_clip_tags, scan
    from hpcwalk.sd.weights import BUILTIN_MODELS, hub_cache_dir

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


@app.command()
def needs(
    job_file: Path = typer.Argument(..., help="A job or study TOML (a study: a file with a [study] table)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object (weights, notes) instead of the list."),
    model: ModelOption = None,
    clip_model: ClipModelOption = None,
    clip_pretrained: ClipPretrainedOption = None,
    encoder: EncoderOption = None,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
) -> None:
    """List every weight JOB_FILE loads: the SD model, the CLIP model(s), the image encoder and, for a study,
    the LPIPS backbone; each with where it was looked for and whether it is here, and for a missing one
    the commands that fetch it on a machine with network and copy it here. Then what a dry run would refuse
    on this machine besides (e.g. float16 on a CPU), as notes. Nothing is downloaded. Exit 0 when every
    weight is here, 1 when one is missing, 2 on bad input."""
    import json

    from hpcwalk.job.parse import parse_job, read_toml
    from hpcwalk.job.studyspec import parse_study
    from hpcwalk.run.needs import job_needs
    from hpcwalk.study import study_needs

    # 1. the job or study, with the overrides a render would be given
    overrides = JobOverrides(model=model, clip_model=clip_model, clip_pretrained=clip_pretrained, encoder=encoder,
                             dtype=dtype, device=device)
    with refused():
        data = read_toml(job_file, "job", "examples/")
        if "study" in data:
            st = parse_study(data, source=str(job_file))
            found = study_needs(type(st)(st.spec, overrides.apply(st.job)))
        else:
            found = job_needs(overrides.apply(parse_job(data, source=str(job_file))))
    # 2. print
    if as_json:
        typer.echo(json.dumps({"job": str(job_file), "ok": not found.missing,
                               "weights": [w.as_dict() for w in found.weights], "notes": list(found.notes)}, indent=2))
    else:
        for line in needs_lines(found):
            typer.echo(line)
    if found.missing:
        raise typer.Exit(1)


def needs_lines(found) -> list[str]:
    """The list `hpcwalk needs` prints: one line per weight, then for a missing one why, and its commands."""
    out = []
    for w in found.weights:
        where = w.why if w.builtin else f"{w.looked}, {w.size / 2**30:.2f} GiB" if w.present else f"looked in {w.looked}"
        out.append(f"{'here   ' if w.present else 'MISSING'}  {w.role}: {w.name}  ({where})")
        if w.present:
            continue
        out.append(f"    {w.why}")
        if w.fetch:
            out += ["    fetch on a machine with network:", *(f"      {c}" for c in w.fetch)]
            out += [f"    then copy it into {w.copy_to} on this machine ({w.env}):", *(f"      {c}" for c in w.copy)]
        else:
            out.append(f"    put it at {w.copy_to} (a path of yours: hpcwalk cannot know where it comes from)")
    n = len(found.missing)
    out.append(f"{len(found.weights) - n} of {len(found.weights)} weights here" + (f", {n} missing" if n else ""))
    return out + [f"note: {line}" for line in found.notes]


@app.command("verify")
def verify_cmd(
    run_dir: str = typer.Argument(..., help="A run folder written by `hpcwalk render` or `hpcwalk study`."),
    repair: bool = typer.Option(False, "--repair", help="Remove every damaged shard (marker first, then its file) and "
                                "every stray temporary file, so that the next render renders exactly those again."),
    verify: VerifyOption = DEFAULT_LEVEL,
) -> None:
    """List each shard's state against its marker and against the run's plan: ok, missing (a marker without its
    Parquet file, or a planned shard with neither), truncated, size mismatch, checksum mismatch, bad marker
    (unreadable, or its rows or shard number lie), file without marker, stray temp file, not a file, foreign
    (another job's shard), extra (not in the plan), duplicate (a copy of another shard), misplaced (another
    shard's frames); and a damaged run.json, or one whose job is not its shards'. --repair removes what is
    damaged and moves what is not the run's own into RUN_DIR/quarantine/ (never deleted). Exit 0 when every
    planned shard is ok (or was repaired), 1 when something is damaged or missing, 2 when RUN_DIR is not a
    run folder."""
    from collections import Counter

    from hpcwalk.core.fsio import filesystem
    from hpcwalk.store.reader import DamagedRunJson, read_run, verify_run
    from hpcwalk.store.runfolder import damaged_run_folder
    from hpcwalk.store.runlock import RunLock, describe
    from hpcwalk.store.verify import quarantine
    from hpcwalk.store.verify import repair as remove_damaged

    # 1. validate: a run folder (its run.json may be damaged: reported with the shards), no render running in
    #    it when repairing
    level = level_of(verify)
    lock = RunLock(run_dir)
    damaged_run = None
    with refused():
        try:
            read_run(run_dir)
        except DamagedRunJson as e:
            if not damaged_run_folder(run_dir):
                raise
            damaged_run = f"run.json: damaged or not hpcwalk's ({e.why})"
        if repair:
            lock.acquire()
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
        if shards.run_mismatch:
            typer.echo(f"run.json: {shards.run_mismatch}: restore the run's own run.json, or render that job's file "
                       f"into {run_dir} with --overwrite", err=True)
        elif shards.plan_note and not damaged_run:
            typer.echo(f"note: shards checked against their markers only: {shards.plan_note}", err=True)
        if damaged_run:  # --repair cannot mend it: the job is not in the shards, only its fingerprint
            typer.echo(f"{damaged_run}: rerun the render with the run's own job file into {run_dir} (it writes "
                       "run.json again when the shards carry that job's fingerprint), or restore it from a copy")
        if bad and repair and not shards.run_mismatch:  # 3. repair: remove what is bad and ours, move what is not
            fs, root = filesystem(run_dir)  # ours; the next render renders exactly that
            with interrupt.deferred():  # SIGTERM/SIGINT: every removal and move done, then the stop
                removed, moved = remove_damaged(fs, bad), quarantine(fs, root, bad)
            again = len([c for c in shards.damaged if c.index is not None and c.state != "extra"])
            typer.echo(f"repaired: removed {len(removed)} files"
                       + (f", moved {len(moved)} files that are not this run's into {run_dir}/quarantine/" if moved else "")
                       + f"; rerun the render or study into {run_dir} to render the {again} shards again")
        elif bad:
            typer.echo(f"damaged: run `hpcwalk verify {run_dir} --repair`, or rerun the render or study into "
                       f"{run_dir} (it renders damaged shards again)", err=True)
        from hpcwalk.study import owed_outputs

        owed, source = owed_outputs(run_dir)
        if owed:  # a study stopped after its render, before its report
            typer.echo(f"study: {', '.join(owed)} missing (the study stopped before its analysis was written): rerun "
                       f"`hpcwalk study {source} --out {run_dir}` (it renders nothing again and writes them)", err=True)
        if damaged_run or shards.run_mismatch or owed or (bad and not repair):
            raise typer.Exit(1)
    except OSError as e:
        fail_io(e, "the repair")
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

"""Commands that look without rendering: `hpcwalk models`, `hpcwalk verify`, `hpcwalk bench`."""

from __future__ import annotations

from typing import Optional

import typer

from hpcwalk.cli.common import VerifyOption, app, fail_io, level_of, refused
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

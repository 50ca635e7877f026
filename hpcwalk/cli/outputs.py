"""Commands that read a run and write beside it: `hpcwalk video`, `hpcwalk view`, `hpcwalk score`."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from hpcwalk.cli.common import ProgressOption, VerifyOption, app, fail, level_of, refused
from hpcwalk.core import interrupt
from hpcwalk.job.spec import DTYPES
from hpcwalk.store.verify import DEFAULT_LEVEL


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

    from hpcwalk.see.video import VideoOptions, check_options, default_path, select_tracks, walk_options, write_video
    from hpcwalk.store.runfolder import check_output_path
    from hpcwalk.store.runindex import open_run

    # 1. validate: the run, the options, the walks
    fmt = format or {".webm": "webm", ".webp": "webp", ".gif": "gif"}.get(os.path.splitext(out or "")[1].lower(), "mp4")
    opts = VideoOptions(format=fmt, fps=30.0 if fps is None else fps, crf=crf, labels=labels, audio=audio,
                        audio_start=audio_start or 0.0)
    level = level_of(verify)
    with refused("the video"):
        check_options(opts)
        index = open_run(run_dir, level)
        walks = [walk] if walk else index.walks()
        if out and len(walks) > 1:
            fail(f"--out names one file but {run_dir!r} has {len(walks)} walks: add --walk NAME (one of {', '.join(walks)})")
        if walk:
            select_tracks(index, walk, method)
        per_walk = {w: walk_options(index, w, opts, fps, audio, audio_start, no_audio) for w in walks}
        for o in per_walk.values():  # an audio-paced walk's own fps and audio, checked like the options given
            check_options(o)
        for w in walks:  # never onto the run's own files (run.json, frames/, ...)
            check_output_path(out or default_path(index, w, method, fmt))
        for line in index.missing_report():
            typer.echo(f"warning: {line}", err=True)
        # 2. one video per walk (with no --walk, walks lacking frames or a --method are skipped, and said so)
        written = 0
        with interrupt.reporting(lambda: f"{written} of {len(walks)} videos written (one being encoded when "
                                         "stopped is dropped, its temporary file removed)"):
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
            fail(f"no walk of {run_dir!r} has committed frames" + (f" for method {', '.join(method)}" if method else ""))


@app.command()
def view(
    run_dir: str = typer.Argument(..., help="A run folder written by `hpcwalk render` (may be partial)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Viewer folder (default RUN_DIR/viewer); must be new, empty or a previous viewer."),
    thumb_size: int = typer.Option(160, "--thumb-size", min=16, help="Longest side of the strip thumbnails, in pixels."),
    verify: VerifyOption = DEFAULT_LEVEL,
) -> None:
    """Write a static viewer (index.html + images, no server; opens from file://); says what is missing.
    Damaged shards are left out with a warning; exit 1 when a file cannot be written (a full disk)."""
    from tqdm import tqdm

    from hpcwalk.see.viewer.build import build_viewer, check_out, default_out
    from hpcwalk.store.runfolder import check_output_path
    from hpcwalk.store.runindex import open_run

    level = level_of(verify)
    with refused("the viewer"):
        index = open_run(run_dir, level)
        check_output_path(out or default_out(index))
        check_out(out or default_out(index))
        for line in index.missing_report():
            typer.echo(f"warning: {line}", err=True)
        where = out or default_out(index)
        with tqdm(total=index.table.num_rows, unit="frame", file=sys.stderr, disable=not sys.stderr.isatty()) as bar, \
                interrupt.reporting(lambda: f"the viewer in {where} is not finished (its index.html is written last; "
                                            "no file is left half-written)"):
            typer.echo(build_viewer(index, out, thumb_size=thumb_size, progress=bar.update).describe())


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

    from hpcwalk.analyse.score import check_score, run_clip_model, score_run
    from hpcwalk.store.runfolder import check_output_path

    # 1. validate everything before any work
    level = level_of(verify)
    if clip_model is None:
        if pretrained is not None:
            fail("--pretrained needs --clip-model (without both, the run's own CLIP model is used)")
        with refused():
            clip_model, pretrained = run_clip_model(run_dir)
    with refused():
        out, dev, dt, pretrained = check_score(run_dir, clip_model, pretrained, device, dtype, batch_size, overwrite,
                                               prompt)
        check_output_path(out, "the score folder")
    typer.echo(f"hpcwalk score: {run_dir} with {clip_model}/{pretrained} on {dev} -> {out}", err=True)
    # 2. score the shards not scored yet
    bar = tqdm(unit="frame", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    with refused("the scores"):
        try:
            summary = score_run(run_dir, clip_model, pretrained, dev, dt, batch_size, overwrite, progress=bar.update,
                                prompt=prompt, verify=level)
        finally:
            bar.close()
    typer.echo(summary.describe())

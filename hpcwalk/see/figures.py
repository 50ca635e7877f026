"""Figures (matplotlib, PNG): contact sheets, the 2-D trajectory picture, latent norm versus gamma.

- `contact_sheet` / `walk_contact_sheet`: a grid of frames with captions, for `prompts` walks (one
  latent under several prompts) and `std` sweeps.
- `trajectory_figure`: how linear, normalized and slerp paths differ between two points drawn from a
  2-D normal (the study's trajectory figure), computed with hpcwalk.render.interp itself.
- `norm_figure`: the latent norm of every frame of a latent walk against gamma, per method, measured
  from the run (the distribution shift of linear interpolation), with the closed form for reference.

Each function writes one PNG and returns what it plotted, so tests can check the numbers.
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from hpcwalk.core.errors import HpcwalkError
from hpcwalk.see.colors import DATA_TEXT, color
from hpcwalk.store.runindex import RunIndex, evenly_spaced, iter_images


class FigureError(HpcwalkError, ValueError):
    """A figure cannot be drawn for this walk; the message says why."""


# ---------------------------------------------------------------------------------------------
# 1. Contact sheets
# ---------------------------------------------------------------------------------------------


def contact_sheet(images: Sequence[np.ndarray], captions: Sequence[str], title: str, path: str,
                  cols: int | None = None) -> str:
    """A grid of uint8 (H, W, 3) images with one caption each, saved as PNG at `path`."""
    if not images or len(images) != len(captions):
        raise FigureError(f"contact sheet {title!r}: need one caption per image, got {len(images)} images "
                          f"and {len(captions)} captions")
    n = len(images)
    cols = cols or min(n, max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.1 * cols, 2.4 * rows + 0.4), layout="constrained")
    fig.suptitle(title, **DATA_TEXT)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k], interpolation="nearest")
            ax.set_title(textwrap.fill(captions[k], 26), fontsize=8, **DATA_TEXT)
    return _save(fig, path)


def walk_contact_sheet(index: RunIndex, walk: str, path: str, max_frames: int = 24) -> list[str]:
    """Contact sheet of a `prompts` walk (every prompt) or `std` sweep (up to max_frames, evenly spaced)."""
    tracks = index.tracks(walk)
    kind = tracks[0].kind
    if kind not in ("prompts", "std"):
        raise FigureError(f"walk {walk!r} is a {kind} walk: contact sheets are drawn for prompts and std walks")
    track = tracks[0]
    rows = track.rows.select(["index", "prompt", "std", "seed", "draw"]).to_pylist()
    if not rows:
        raise FigureError(f"walk {walk!r} has no committed frames yet")
    keep = {rows[k]["index"] for k in evenly_spaced(len(rows), max_frames)}
    by_index = {r["index"]: r for r in rows}
    images, captions = [], []
    for i, data in iter_images(index, track):
        if i in keep:
            images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            r = by_index[i]
            captions.append(r["prompt"] if kind == "prompts" else f"std {r['std']:.3f}")
    seed = f"{rows[0]['seed']}" + (f":{rows[0]['draw']}" if rows[0]["draw"] else "")
    title = (f"{walk}: one latent (seed {seed}) under {len(rows)} prompts" if kind == "prompts"
             else f"{walk}: std x z_T, seed {seed}, prompt {rows[0]['prompt']!r}")
    contact_sheet(images, captions, title, path, cols=min(len(images), 4 if kind == "prompts" else 6))
    return captions


# ---------------------------------------------------------------------------------------------
# 2. The 2-D trajectory figure
# ---------------------------------------------------------------------------------------------


@dataclass
class Trajectories:
    start: np.ndarray  # (2,)
    end: np.ndarray  # (2,)
    gamma: np.ndarray  # (G,)
    paths: dict[str, np.ndarray]  # method -> (G, 2)


def trajectory_figure(path: str, seed: int = 24, n: int = 101) -> Trajectories:
    """Paths of every interpolation method between two points drawn from N(0, I_2), and their norms.

    The default seed draws a pair about 139 degrees apart with norms 1.35 and 1.55, where the methods
    differ visibly (nearby pairs give three nearly identical paths).
    """
    import torch  # here, not at import: the viewer and `hpcwalk view` start without torch

    from hpcwalk.render import interp

    g = torch.Generator("cpu").manual_seed(seed)
    a, b = torch.randn(2, 2, generator=g, dtype=torch.float64)  # two points of a 2-D normal
    gamma = torch.linspace(0, 1, n, dtype=torch.float64)
    paths = {m: interp.interpolate(m, a, b, gamma).numpy() for m in interp.METHODS}  # (G, 2) each
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=[1.15, 1])
    # the density of N(0, I_2) as circles of radius 1, 2, 3 (the typical set hugs radius sqrt(2) in 2-D)
    t = np.linspace(0, 2 * np.pi, 256)
    for r in (1, 2, 3):
        ax.plot(r * np.cos(t), r * np.sin(t), color="0.8", lw=0.8, zorder=0)
        ax.annotate(f"{r}σ", (r * 0.707, r * 0.707), color="0.6", fontsize=7)
    for m, p in paths.items():
        ax.plot(p[:, 0], p[:, 1], color=color(m), lw=2, label=m)
        ax2.plot(gamma.numpy(), np.linalg.norm(p, axis=1), color=color(m), lw=2, label=m)
    ax.scatter(*zip(a.numpy(), b.numpy()), color="k", zorder=3)
    ax.annotate("z_start", a.numpy(), textcoords="offset points", xytext=(6, 6))
    ax.annotate("z_end", b.numpy(), textcoords="offset points", xytext=(6, 6))
    lim = max(3.2, float(np.abs(np.concatenate(list(paths.values()))).max()) + 0.3)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal",
           title=f"paths between two draws of N(0, I₂) (seed {seed})")
    ax.legend(loc="lower right", fontsize=8)
    ax2.set(xlabel="gamma", ylabel="‖z(gamma)‖", title="norm along the path")
    ax2.legend(fontsize=8)
    _save(fig, path)
    return Trajectories(a.numpy(), b.numpy(), gamma.numpy(), paths)


# ---------------------------------------------------------------------------------------------
# 3. Latent norm versus gamma, measured from a run
# ---------------------------------------------------------------------------------------------


def norm_figure(index: RunIndex, walk: str, path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """latent_norm (RMS of z_T) of every committed frame of a latent walk against its position, per method."""
    tracks = [t for t in index.tracks(walk) if t.rows.num_rows]
    if not tracks or tracks[0].kind != "latent":
        raise FigureError(f"walk {walk!r} is not a latent walk with committed frames: the norm figure needs one")
    series = {}
    fig = Figure(figsize=(6.4, 4), layout="constrained")
    ax = fig.subplots()
    for t in tracks:
        x = (np.asarray(t.rows.column("segment").to_numpy(), float)
             + np.asarray(t.rows.column("gamma").to_numpy(), float))
        y = np.asarray(t.rows.column("latent_norm").to_numpy(), float)
        series[t.method] = (x, y)
        ax.plot(x, y, "o-", ms=3, color=color(t.method), label=f"{t.method} (measured)")
    segments = math.ceil(max(x.max() for x, _ in series.values())) or 1
    xs = np.linspace(0, segments, 200 * segments)
    local = np.where(xs == segments, 1.0, xs - np.floor(xs))
    ax.plot(xs, np.sqrt(local * (2 * local - 2) + 1), "--", color="0.4", lw=1,
            label="sqrt(γ(2γ−2)+1): linear, iid N(0, I) ends")
    ax.axhline(1.0, color="0.7", lw=0.8)
    ax.set(xlabel="gamma" if segments == 1 else "segment + gamma", ylabel="‖z_T‖ / sqrt(numel)")
    ax.set_title(f"{walk}: latent norm along the walk", **DATA_TEXT)
    ax.legend(fontsize=8, loc="lower left")
    _save(fig, path)
    return series


def _save(fig: Figure, path: str) -> str:
    """The figure as PNG at `path`, via a temporary name (a failed write, a full disk, leaves none)."""
    from hpcwalk.core.fsio import filesystem, write_atomic

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    fs, where = filesystem(path)
    write_atomic(fs, where, buf.getvalue())
    return path

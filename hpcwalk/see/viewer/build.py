"""`hpcwalk view`: a self-contained static viewer of a run: open index.html from disk or any static host.

    viewer/
      index.html viewer.js viewer.css   copied from hpcwalk/see/viewer/static (no server, no fetch)
      data.js                           window.HPCWALK = {...}: the run, its gaps, walks, tracks, provenance
      frames/wK/mJ/NNNNN.png            each frame's bytes as stored in the run (png, webp or jpeg)
      thumbs/wK/mJ/NNNNN.jpg            thumbnails for the frame strip, when frames exceed the thumb size
      figures/*.png                     contact sheets, latent norms, the 2-D trajectory figure
      .hpcwalk-viewer                   marker: `hpcwalk view` may rewrite this folder

Data travels as a script (data.js), not JSON fetched at run time, so file:// works. Frames load only
when shown and strip thumbnails load lazily, so long walks stay usable.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable

from PIL import Image

from hpcwalk.core.errors import HpcwalkError
from hpcwalk.core.fsio import target_error
from hpcwalk.see import figures
from hpcwalk.see.colors import METHOD_COLORS, PALETTE
from hpcwalk.store.runindex import RunIndex, Track, evenly_spaced, iter_images, param_rows, param_text

MARKER = ".hpcwalk-viewer"
STATIC = ("viewer.js", "viewer.css", "index.html")  # index.html last


class ViewerError(HpcwalkError, ValueError):
    """The viewer cannot be written as asked; the message names the problem and the fix."""


@dataclass
class ViewerResult:
    """What was written."""

    path: str  # index.html
    walks: int
    frames: int
    figures: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> str:
        return (f"wrote {self.path}: {self.walks} walks, {self.frames} frames, {len(self.figures)} figures "
                f"({self.seconds:.1f} s); open file://{os.path.abspath(self.path)}")


def default_out(index: RunIndex) -> str:
    """RUN/viewer for a local run; ViewerError for a remote one (pass --out)."""
    if "://" in index.uri and not index.uri.startswith("file://"):
        raise ViewerError(f"run {index.uri!r} is not a local folder: pass --out with a local folder")
    return os.path.join(index.uri.removeprefix("file://"), "viewer")


def check_out(out: str) -> None:
    """Refuse an output folder we did not write: it must be new, empty, or a previous viewer."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise ViewerError(f"--out {out!r} is a file, not a folder: choose another --out")
        if os.listdir(out) and not os.path.exists(os.path.join(out, MARKER)):
            raise ViewerError(f"--out {out!r} is not empty and is not an hpcwalk viewer: choose a new folder")
    anc = os.path.abspath(out)
    while not os.path.exists(anc):
        anc = os.path.dirname(anc)
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ViewerError(f"--out {out!r} is not writable ({anc!r}): choose another --out")


def build_viewer(index: RunIndex, out: str | None = None, thumb_size: int = 160, strip_max: int = 240,
                 progress: Callable[[int], None] | None = None) -> ViewerResult:
    """Write the static viewer of a run into `out` (default RUN/viewer) and return where it is."""
    t0 = time.perf_counter()
    # 1. validate before writing anything
    if not 16 <= thumb_size <= 4096:
        raise ViewerError(f"--thumb-size must be in 16..4096 pixels, got {thumb_size}")
    out = out or default_out(index)
    check_out(out)
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, MARKER), "w").close()
    # 2. frames and thumbnails, walk by walk
    walks, frames = [], 0
    for w, name in enumerate(index.walks()):
        walk = _walk_data(index, name, w, out, thumb_size, strip_max, progress)
        frames += sum(len(t["index"]) for t in walk["tracks"])
        walks.append(walk)
    # 3. figures: one per walk where it applies, and the 2-D trajectory figure
    written = [f["src"] for w in walks for f in w["figures"]]
    traj = "figures/trajectories.png"
    figures.trajectory_figure(os.path.join(out, traj))
    written.append(traj)
    # 4. data.js, the static files, index.html last (temporary name + rename)
    data = {"run": _run_data(index), "missing": index.missing_report(), "walks": walks, "colors": METHOD_COLORS, "palette": list(PALETTE),
            "figures": [{"title": "How linear, normalized and slerp paths differ between two draws of a 2-D "
                                  "normal (computed with hpcwalk.render.interp)", "src": traj}]}
    _write(out, "data.js", ("window.HPCWALK = " + json.dumps(data, separators=(",", ":"), allow_nan=False)
                            + ";\n").encode())
    static = resources.files("hpcwalk.see.viewer") / "static"
    for name in STATIC:
        _write(out, name, (static / name).read_bytes())
    return ViewerResult(os.path.join(out, "index.html"), len(walks), frames, written, index.missing_report(),
                        time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Per walk: positions, tracks (columnar provenance), image files, figures
# ---------------------------------------------------------------------------------------------


def _walk_data(index: RunIndex, name: str, w: int, out: str, thumb_size: int, strip_max: int,
               progress: Callable[[int], None] | None) -> dict[str, Any]:
    tracks = index.tracks(name)
    kind = tracks[0].kind
    rows: dict[int, dict] = {}
    for t in reversed(tracks):  # the first track with a frame at an index names its parameter
        rows.update({r["index"]: r for r in param_rows(t.rows)})
    positions = sorted(rows)
    segments = 1 + max((r["segment"] for r in rows.values()), default=0)
    scores = [c for c in index.score_columns  # only the columns this walk has values in (clip_score_b: text walks)
              if any(_finite(v) for t in tracks for v in t.rows.column(c).to_pylist())]
    best = max(range(len(tracks)), key=lambda m: tracks[m].rows.num_rows)  # the strip shows the fullest track
    have = tracks[best].indices
    strip = [have[k] for k in evenly_spaced(len(have), strip_max)]
    track_data = [_track_data(index, t, w, m, out, scores, thumb_size, set(strip) if m == best else set(),
                              progress) for m, t in enumerate(tracks)]
    first = tracks[best].rows
    size = [first.column(c)[0].as_py() if first.num_rows else 1 for c in ("width", "height")]
    return {"name": name, "kind": kind, "segments": segments, "positions": positions,
            "width": size[0], "height": size[1],
            "params": [param_text(kind, rows[i], segments) for i in positions],
            "param_name": {"latent": "gamma", "text": "gamma", "translate": "t", "mix": "t", "std": "std"}.get(
                kind, "prompt"),
            "scores": scores, "strip": strip, "strip_track": best, "tracks": track_data,
            "figures": _walk_figures(index, name, kind, w, out, tracks)}


def _track_data(index: RunIndex, t: Track, w: int, m: int, out: str, scores: list[str], thumb_size: int,
                strip: set[int], progress: Callable[[int], None] | None) -> dict[str, Any]:
    """Columnar provenance of one track, with its frames (and strip thumbnails) written to disk."""
    cols = t.rows.to_pydict()
    d: dict[str, Any] = {
        "label": t.label, "method": t.method, "dir": f"frames/w{w}/m{m}", "thumbs": "", "ext": "png",
        "index": cols["index"], "frame_id": cols["frame_id"],
        "seeds": [_seeds(cols, k) if t.kind != "images" else "none (endpoints inverted from images)"
                  for k in range(t.rows.num_rows)],
        "notes": [_notes(cols, k) for k in range(t.rows.num_rows)],
        "prompt": cols["prompt"], "prompt_b": cols["prompt_b"],
        "latent_norm": [round(v, 4) for v in cols["latent_norm"]],
        "scores": {c: [round(v, 3) if _finite(v) else None for v in cols[c]] for c in scores},
        "missing": t.missing,
    }
    os.makedirs(os.path.join(out, d["dir"]), exist_ok=True)
    for i, data in iter_images(index, t):
        d["ext"] = _ext(data)
        _write(os.path.join(out, d["dir"]), f"{i:05d}.{d['ext']}", data)
        if i in strip:
            img = Image.open(io.BytesIO(data))
            if max(img.size) > thumb_size:
                d["thumbs"] = f"thumbs/w{w}/m{m}"
                img = img.convert("RGB")
                img.thumbnail((thumb_size, thumb_size))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=85)
                os.makedirs(os.path.join(out, d["thumbs"]), exist_ok=True)
                _write(os.path.join(out, d["thumbs"]), f"{i:05d}.jpg", buf.getvalue())
        if progress:
            progress(1)
    return d


def _walk_figures(index: RunIndex, name: str, kind: str, w: int, out: str, tracks: list[Track]) -> list[dict]:
    if not any(t.rows.num_rows for t in tracks):
        return []
    if kind in ("prompts", "std"):
        src = f"figures/w{w}-contact.png"
        figures.walk_contact_sheet(index, name, os.path.join(out, src))
        return [{"title": f"contact sheet of {name}", "src": src}]
    if kind == "latent":
        src = f"figures/w{w}-latent-norm.png"
        figures.norm_figure(index, name, os.path.join(out, src))
        return [{"title": f"latent norm along {name}, measured from the run", "src": src}]
    if kind == "images":
        from hpcwalk.store.reader import endpoint_images

        shown = endpoint_images(index.uri, name)
        if shown:
            src = f"figures/w{w}-endpoints.png"
            images = [im for _, inp, rec in shown for im in (inp, rec)]
            captions = [c for r, _, _ in shown for c in (f"input {r['image']}",
                                                          f"reconstruction: PSNR {r['psnr']:.2f} dB")]
            figures.contact_sheet(images, captions, f"{name}: inputs and reconstructions", os.path.join(out, src),
                                  cols=2)
            return [{"title": f"input images of {name} beside their reconstructions (the walk's endpoint frames)",
                     "src": src}]
    return []


def _run_data(index: RunIndex) -> dict[str, Any]:
    meta = index.metadata
    job = index.run.get("job", {})
    return {"uri": index.uri, "fingerprint": index.run.get("job_fingerprint", ""),
            "hpcwalk_version": index.run.get("hpcwalk_version", ""),
            "model": meta.get("model_id") or job.get("model", {}).get("id", ""),
            "steps": meta.get("steps") or job.get("sampling", {}).get("steps", ""),
            "guidance": meta.get("guidance") or job.get("sampling", {}).get("guidance", ""),
            "scheduler": meta.get("scheduler") or job.get("sampling", {}).get("scheduler", ""),
            "clip_model": meta.get("clip_model", ""),
            "frames": index.table.num_rows,
            "shards": len(index.files), "total_shards": index.total_shards}


def _seeds(cols: dict[str, list], k: int) -> str:
    a = f"{cols['seed'][k]}" + (f":{cols['draw'][k]}" if cols["draw"][k] else "")
    if cols["seed_b"][k] is None:
        return a
    return f"{a} → {cols['seed_b'][k]}" + (f":{cols['draw_b'][k]}" if cols["draw_b"][k] else "")


def _notes(cols: dict[str, list], k: int) -> str:
    """The frame's placement and endpoints in words: easing, pacing, audio time, text method, input images."""
    def get(c: str) -> Any:
        return cols[c][k] if c in cols else None

    parts = []
    if get("easing") not in (None, "linear"):
        parts.append(f"easing {get('easing')} (exponent {get('easing_exponent'):g}) of position {get('position'):.3f}")
    if get("pace") not in (None, "uniform"):
        pace = f"pace {get('pace')}"
        if get("pace") == "even":
            pace += f", from position {get('position'):.3f}" + (f", a copy of coarse frame {get('reused_from')}"
                                                                 if get("reused_from") else "")
        if get("time_s") is not None:
            pace += f", shown at {get('time_s'):.3f} s"
        parts.append(pace)
    if get("text_method"):
        parts.append(f"text {get('text_method')}")
    if get("image_path") is not None:
        psnr = [get(c) for c in ("image_psnr", "image_psnr_b")]
        parts.append(f"images {get('image_path')} → {get('image_path_b')}"
                     + (f" · reconstruction PSNR {psnr[0]:.2f} / {psnr[1]:.2f} dB" if None not in psnr else ""))
    return " · ".join(parts)


def _finite(v: Any) -> bool:
    return v is not None and math.isfinite(v)


def _ext(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    raise ViewerError(f"a frame's image is neither PNG, WebP nor JPEG (starts {data[:8]!r})")


def _write(folder: str, name: str, data: bytes) -> None:
    """Write to a hidden temporary name in `folder`, then rename into place; a failed write (a full disk)
    removes the temporary file and raises the OSError."""
    tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(folder, name))
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise target_error(e, os.path.join(folder, name)) from e
        raise

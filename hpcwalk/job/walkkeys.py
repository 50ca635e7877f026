"""The [[walk]] keys of image endpoints, keyframe walks, easing and pacing: parsed, checked, resolved.

`hpcwalk.job` parses a walk table's original keys and hands the rest here:

    images = ["a.png", "b.jpg"]        kind "images": endpoints inverted from image files (paths relative
    invert_guidance, invert_refine     to the job file; each file's sha256 joins the walk)
    keyframes = [{prompt, seed, frames}, ..., {prompt, seed}]   kind "keyframes"; text_method
    easing, easing_exponent            every kind but prompts (hpcwalk.job.pacing.ease)
    pace = "uniform" | "even" | "audio"
    pace_coarse, pace_measure, pace_method                     even: the coarse pass (hpcwalk/run/evenpace.py)
    audio, audio_fps, audio_start, audio_floor                 audio: gammas from onsets, placed here

`parse_keys` turns the raw TOML values into typed ones (one-line JobError naming the key otherwise);
`finish` checks the walk as a whole and places audio-timed gammas, so the plan (and every reader
rebuilding it from run.json) needs no audio file. Numeric and file bounds are validate.py's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcwalk.core.errors import JobError
from hpcwalk.job.bounds import (
    EXPONENT_RANGE,
    MAX_AUDIO_FPS,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_INVERT_REFINE,
    MAX_KEYFRAMES,
    MAX_PROMPT_CHARS,
    MAX_TEXT_CHARS,
    bounded,
    check_seed,
    check_segment_frames,
    check_text,
)
from hpcwalk.job.pacing import EASINGS, PACE_METHODS
from hpcwalk.job.plan import chain_frames, segment_frames
from hpcwalk.job.spec import Keyframe, NoiseKey, Sampling, Walk


def _parse_seed(v: Any, where: str) -> NoiseKey:
    """A seed is an int, or "S:K" for the K-th latent drawn from one generator seeded S."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        check_seed(v, 0, where)
        return NoiseKey(v)
    if isinstance(v, str):
        s, _, k = v.partition(":")
        if s.isascii() and s.isdigit() and (k.isascii() and k.isdigit() or not k) and len(v) <= 40:
            check_seed(int(s), int(k or 0), where)
            return NoiseKey(int(s), int(k or 0))
    raise JobError(f"{where} seeds: {v!r} is not a seed; use a non-negative int or 'SEED:DRAW' like '1:1'")


def check_timing(w: "Walk", where: str) -> None:
    """Easing and pacing values: exponent in EXPONENT_RANGE, the coarse pass within the segment, audio numbers."""
    lo, hi = EXPONENT_RANGE
    bounded(f"{where} easing_exponent", w.easing_exponent, lo, hi, "2 is quadratic; beyond 16 every frame sits at one end")
    if w.pace == "even" and w.pace_coarse != 0:
        fewest = min(k.frames for k in w.keyframes[:-1]) if w.kind == "keyframes" else w.frames
        if not 2 <= w.pace_coarse <= fewest:
            raise JobError(f"{where} pace_coarse must be 0 (automatic) or in 2..{fewest} (the coarse pass has at most "
                           f"a segment's frames), got {w.pace_coarse}")
    if w.pace == "audio":
        bounded(f"{where} audio_fps", w.audio_fps, None, MAX_AUDIO_FPS, "frames per second of the video")
        if not w.audio_fps > 0:
            raise JobError(f"{where} audio_fps must be > 0 (frames per second of the video), got {w.audio_fps:g}")
        bounded(f"{where} audio_start", w.audio_start, 0, None)
        bounded(f"{where} audio_floor", w.audio_floor, None, 1.0, "the slowest pace, as a share of the mean")
        if not w.audio_floor > 0:
            raise JobError(f"{where} audio_floor must be > 0 (0 would freeze the walk between onsets), got {w.audio_floor:g}")


def check_inversion_settings(w: "Walk", where: str) -> None:
    bounded(f"{where} invert_guidance", w.invert_guidance, 0, MAX_GUIDANCE, "guidance of the inversion; 0 is none")
    if not 0 <= w.invert_refine <= MAX_INVERT_REFINE:
        raise JobError(f"{where} invert_refine must be in 0..{MAX_INVERT_REFINE} (fixed-point iterations per "
                       f"inversion step), got {w.invert_refine}")


def check_image_file(where: str, path: Any, height: int, width: int) -> tuple[str, Any]:
    """An image endpoint's file: there, an image Pillow reads, a mode with a faithful RGB conversion, at most
    64 MP; returns its sha256 and the (height, width, 3) uint8 frame hpcwalk.job.imagefile.load_image fits it to."""
    from hpcwalk.job.imagefile import ImageError, image_sha256, load_image

    try:
        fitted = load_image(path, height, width)
        return image_sha256(path), fitted
    except ImageError as e:
        raise JobError(f"{where}: {e}") from None
    except OSError as e:
        raise JobError(f"{where}: {str(path)!r} cannot be read ({e.strerror or e}): check its permissions") from None


def check_audio_file(where: str, path: Any) -> tuple[str, Any]:
    """An audio file to time a walk to: decodable by PyAV, with samples, at most 3 hours; returns (sha256, onsets)."""
    from hpcwalk.job.imagefile import image_sha256
    from hpcwalk.job.audiofile import AudioError, audio_onsets

    try:
        onsets = audio_onsets(path)  # first: its errors name what is wrong with the file; streamed, bounded memory
        return image_sha256(path), onsets
    except AudioError as e:
        raise JobError(f"{where}: {e}") from None
    except OSError as e:
        raise JobError(f"{where}: {str(path)!r} cannot be read ({e.strerror or e}): check its permissions") from None

PACES = ("uniform", "even", "audio")
PACE_MEASURES = ("auto", "clip", "pixel")  # auto: clip when [clip] is enabled, else pixel
_SCALARS: dict[str, type] = {"easing": str, "easing_exponent": float, "pace": str, "pace_coarse": int,
                             "pace_measure": str, "pace_method": str, "audio": str, "audio_fps": float,
                             "audio_start": float, "audio_floor": float, "invert_guidance": float,
                             "invert_refine": int, "text_method": str}


@dataclass(frozen=True)
class ParseContext:
    """What a walk's new keys are checked against: the job's sampling, whether CLIP runs, the job file's folder."""

    sampling: "Sampling"
    clip_enabled: bool
    base_dir: Path


def base_dir(source: str) -> Path:
    """The folder paths in a job are relative to: the job file's, or the working directory for a dict."""
    return Path.cwd() if not source or source.startswith("<") else Path(source).resolve().parent


def resolve(base: Path, path: str) -> Path:
    """A path as written in a job, resolved against the job file's folder (absolute paths stay)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


# ---------------------------------------------------------------------------------------------
# 1. Raw TOML values -> typed values
# ---------------------------------------------------------------------------------------------


def parse_keys(body: dict[str, Any], kind: str, where: str, ctx: ParseContext) -> None:
    """Type-check and convert the new keys of one walk table in place (images, keyframes, scalars)."""
    for key, want in _SCALARS.items():
        if key in body:
            v = body[key]
            ok = isinstance(v, want) or (want is float and isinstance(v, int))
            if not ok or isinstance(v, bool):
                noun = "an int" if want is int else "a number" if want is float else "a string"
                raise JobError(f"{where} {key} must be {noun}, got {v!r:.80}")
            if want is float:
                body[key] = float(v)
    if "images" in body:
        body["images"], body["image_sha256"] = _parse_images(body["images"], where, ctx)
    if "keyframes" in body:
        body["keyframes"] = _parse_keyframes(body["keyframes"], where)
    if "audio" in body:
        check_text(f"{where} audio", body["audio"], MAX_TEXT_CHARS)


def _parse_images(raw: Any, where: str, ctx: ParseContext) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """images = [paths]: at least 2 strings; each file is read and fitted now (validate.check_image_file)."""
    _keys_list(raw, where, "images", lambda p: isinstance(p, str) and bool(p), MAX_IMAGES,
               'a list of image file paths (relative to the job file), e.g. ["a.png", "b.jpg"]',
               "each is inverted before rendering")
    shas = []
    for k, p in enumerate(raw):
        check_text(f"{where} images[{k}]", p, MAX_TEXT_CHARS)
        shas.append(check_image_file(f"{where} images[{k}]", resolve(ctx.base_dir, p),
                                              ctx.sampling.height, ctx.sampling.width)[0])
    return tuple(raw), tuple(shas)


def _keys_list(raw: Any, where: str, key: str, item_ok: Any, most: int, shape: str, why: str) -> None:
    """A walk's keyframes as a TOML list (`images`, `keyframes`): of the right items, 2..most of them."""
    if not isinstance(raw, list) or not all(item_ok(x) for x in raw):
        raise JobError(f"{where} {key} must be {shape}")
    if len(raw) < 2:
        raise JobError(f"{where}: {'an images' if key == 'images' else 'a keyframes'} walk needs at least 2 {key} "
                       f"(its keyframes), got {len(raw)}")
    bounded(f"{where} {key}", len(raw), None, most, why)


def _parse_keyframes(raw: Any, where: str) -> tuple[Keyframe, ...]:
    """keyframes = [{prompt, seed, frames}, ..., {prompt, seed}]: frames on every keyframe but the last."""
    pass  # job.py imports this module lazily: no cycle

    _keys_list(raw, where, "keyframes", lambda k: isinstance(k, dict), MAX_KEYFRAMES,
               'a list of tables, e.g. [{prompt = "a cat", seed = 1, frames = 9}, {prompt = "a dog", seed = 2}]',
               "keyframes in one walk")
    out = []
    for k, t in enumerate(raw):
        at = f"{where} keyframes[{k}]"
        last = k == len(raw) - 1
        for key in t:
            if key not in ("prompt", "seed", "frames"):
                raise JobError(f"unknown key {key!r} in {at} (allowed: frames, prompt, seed)")
        if "prompt" not in t or "seed" not in t:
            raise JobError(f"{at}: a keyframe needs a prompt and a seed")
        if not isinstance(t["prompt"], str):
            raise JobError(f"{at} prompt must be a string, got {t['prompt']!r:.80}")
        check_text(f"{at} prompt", t["prompt"], MAX_PROMPT_CHARS, nul=True)
        seed = _parse_seed(t["seed"], at)
        if last and "frames" in t:
            raise JobError(f"{at} is the last keyframe and starts no segment: drop its frames")
        frames = t.get("frames", 0)
        if not last:
            if "frames" not in t:
                raise JobError(f"{at}: missing frames (of the segment to keyframes[{k + 1}], both ends included)")
            if not isinstance(frames, int) or isinstance(frames, bool):
                raise JobError(f"{at} frames must be an int, got {frames!r:.80}")
            check_segment_frames(f"{at} frames", frames)
        out.append(Keyframe(t["prompt"], seed, frames))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# 2. The walk as a whole: combinations, bounds, audio placement
# ---------------------------------------------------------------------------------------------


def finish(w: "Walk", where: str, ctx: ParseContext) -> "Walk":
    """Check the new keys against the walk's kind and each other; return the walk with audio gammas placed."""
    s = ctx.sampling
    if w.kind == "images" and s.scheduler != "ddim":
        raise JobError(f"{where}: an images walk needs [sampling] scheduler = \"ddim\" (its endpoints are DDIM-"
                       f"inverted, and only the DDIM sampler retraces the inversion), got {s.scheduler!r}")
    _check_choices(w, where, ctx)
    check_timing(w, where)
    if w.kind == "images":
        check_inversion_settings(w, where)
    if w.pace == "audio":
        return _place_audio(w, where, ctx)
    return w


def _check_choices(w: "Walk", where: str, ctx: ParseContext) -> None:
    from hpcwalk.job.bounds import _choice_msg
    from hpcwalk.job.spec import TEXT_METHODS

    if w.easing not in EASINGS:
        raise JobError(_choice_msg(f"{where} easing", w.easing, EASINGS))
    if w.pace not in PACES:
        raise JobError(_choice_msg(f"{where} pace", w.pace, PACES))
    if w.pace != "uniform" and w.easing != "linear":
        raise JobError(f"{where}: pace = {w.pace!r} and easing = {w.easing!r} both place the frames: choose one")
    if w.gammas and (w.pace != "uniform" or w.easing != "linear"):
        raise JobError(f"{where}: gammas = [...] places the frames itself: drop "
                       + ("pace" if w.pace != "uniform" else "easing") + " (or gammas)")
    if w.pace_measure not in PACE_MEASURES:
        raise JobError(_choice_msg(f"{where} pace_measure", w.pace_measure, PACE_MEASURES))
    if w.pace == "even" and w.pace_measure == "clip" and not ctx.clip_enabled:
        raise JobError(f"{where}: pace_measure = \"clip\" measures the coarse pass with CLIP, but [clip] enabled = "
                       "false: enable CLIP or use pace_measure = \"pixel\"")
    if w.pace_method not in PACE_METHODS:
        raise JobError(_choice_msg(f"{where} pace_method", w.pace_method, PACE_METHODS))
    if w.text_method not in TEXT_METHODS:
        raise JobError(_choice_msg(f"{where} text_method", w.text_method, TEXT_METHODS))
    if w.pace == "audio" and not w.audio:
        raise JobError(f"{where}: pace = \"audio\" needs audio = \"FILE\" (a WAV, MP3, FLAC, ... relative to the job file)")
    if w.pace != "audio" and w.audio:
        raise JobError(f"{where}: audio = {w.audio!r} is used by pace = \"audio\" only: add pace = \"audio\" or drop it")


def _place_audio(w: "Walk", where: str, ctx: ParseContext) -> "Walk":
    """audio: the file read now (validate.check_audio_file), each segment's gammas from its time window."""
    from hpcwalk.job.pacing import audio_gammas

    sha, onsets = check_audio_file(f"{where} audio", resolve(ctx.base_dir, w.audio))
    seg = segment_frames(w)
    n = chain_frames(seg)
    end = w.audio_start + n / w.audio_fps
    if end > onsets.duration_s + 1e-9:
        most = max(int(math.floor((onsets.duration_s - w.audio_start) * w.audio_fps + 1e-9)), 0)
        raise JobError(f"{where}: {n:,} frames at {w.audio_fps:g} fps from {w.audio_start:g} s last until {end:.3f} s, "
                       f"past the end of audio {w.audio!r} ({onsets.duration_s:.3f} s): use at most {most:,} frames, "
                       "a higher audio_fps or an earlier audio_start")
    gammas: list[float] = []
    first = 0  # the walk's frame index where the segment starts
    for k, f in enumerate(seg):
        g = audio_gammas(onsets, f, w.audio_fps, w.audio_floor, w.audio_start + first / w.audio_fps)
        gammas.extend(float(x) for x in (g if k == 0 else g[1:]))
        first += f - 1
    return dataclasses.replace(w, audio_sha256=sha, audio_gammas=tuple(gammas))

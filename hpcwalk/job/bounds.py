"""Every bound on every input, checked before any work, in one place.

Each refusal is one line naming the field, the limit and the value (`JobError`, `ModelLoadError`,
`CompileError`, `StoreError`: the command line prints it as `error: ...` and exits 2, having written
nothing). Three layers, in the order an entry point meets them:

1. Values of a job file (called while `hpcwalk.job` parses it): steps, guidance, sizes, seeds and
   draws, std, text lengths, and the plan's size against this machine's memory, computed before
   the plan exists.
2. Where the frames render (`check_render_device`): model, device, dtype, the `[compile]` choices,
   CLIP, and the micro-batch's activations against the device's memory. Without `--ray` here; with
   `--ray` the driver checks names only and each worker checks the rest as it starts (`check_worker`).
3. The entry points: `prepare_render` (render and study: the checks above, the run folder, prompts the
   text encoder will cut, then the plan with the micro-batch capped at a shard's frames) and
   `check_score` (score).

This module imports no other hpcwalk module at load time (hpcwalk.job imports it).
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Sequence

from hpcwalk.core.errors import JobError


def _choice_msg(where: str, got: Any, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(got), list(choices), n=1) or [c for c in choices if c.startswith(str(got))]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where}: unknown value {got!r}{hint}; choose one of {', '.join(choices)}"


# ---------------------------------------------------------------------------------------------
# The limits (README "Bounds" lists them with their reasons)
# ---------------------------------------------------------------------------------------------

MAX_JOB_FILE_BYTES = 16 << 20  # a job or study file
MAX_STEPS = 1000  # SD schedulers have 1000 training timesteps; more steps cannot be scheduled
MAX_GUIDANCE = 100.0  # classifier-free guidance scale (the study uses 7.5; beyond ~30 frames saturate)
MAX_SIDE = 4096  # pixels per side (SD 1.x is trained at 512; 4096 is 64x its pixels)
MAX_STD = 10.0  # std sweeps scale z_T ~ N(0, I); the study sweeps around 0.5..1.5
SEED_LIMIT = 2**63  # seeds are int64 in the Parquet schema and in torch.Generator.manual_seed
MAX_DRAW = 10_000  # "S:K" draws K latents first and keeps the last: bounded work per seed
MAX_PROMPT_CHARS = 10_000  # the text encoder reads 77 tokens (about 300 characters); longer is cut
MAX_NAME_CHARS = 1000  # walk names (their files are named by core.fsio.walk_file)
MAX_TEXT_CHARS = 4096  # model ids, revisions, CLIP names and tags, devices
MAX_PLAN_FRAMES = 100_000_000  # frames in one job (the driver holds the whole plan)
PLAN_BYTES_PER_FRAME = 450  # measured 394-424 bytes per plan row (30 slotted fields) and shard entry (tracemalloc)
PLAN_BYTES_PER_WALK = 2048  # a Walk, its table and its share of run.json
MAX_BOOTSTRAP = 100_000  # [study] bootstrap resamples (the default is 10,000)
MAX_CLIP_BATCH = 4096  # `hpcwalk score --batch-size`
MEMORY_SHARE = 0.5  # the plan may use at most this share of the memory available now
SD_VAE_CHANNELS = 128  # the VAE decoder's channels at full resolution in every SD 1.x checkpoint
TOKEN_LIMIT = 77  # CLIP's text context, SD 1.x's prompt length in tokens
LEADING_MAX_STEPS = 999  # ddim, pndm: "leading" timesteps with SD's steps_offset = 1 reach timestep 1000 at 1000 steps
MAX_IMAGES = 1000  # images of one walk: each is DDIM-inverted, (1 + invert_refine) x steps UNet calls, before rendering
MAX_KEYFRAMES = 100_000  # keyframes of one walk
MAX_SEGMENT_FRAMES = 100_000  # frames of one keyframe segment (hpcwalk.job.plan)
MAX_INVERT_REFINE = 20  # fixed-point iterations per inversion step (hpcwalk.render.invert.MAX_REFINE)
EXPONENT_RANGE = (1 / 16, 16.0)  # easing_exponent (hpcwalk.job.pacing.EXPONENT_RANGE)
MAX_AUDIO_FPS = 240.0  # audio_fps (hpcwalk.job.pacing.MAX_FPS)
# A job or study file's shape, scanned before tomllib reads it (hpcwalk.job.parse.scan_toml): tomllib's
# work on a dotted key is quadratic in its parts (24 KB of `a.a.a...` took 1.4 GB, 100 KB 14.5 GB)
MAX_TOML_KEY_PARTS = 32  # parts of one dotted key (`a.b.c = 1`, `[a.b.c]`); jobs use 1 or 2
MAX_TOML_DEPTH = 32  # arrays and inline tables nested in one another, and a table header's parts plus its keys'
MAX_TOML_LINE_CHARS = 200_000  # characters in one line (a 10,000-character prompt fits 20 times)
MAX_TOML_TABLES = 100_000  # [table] and [[array]] headers in one file


def bounded(where: str, value: Any, low: float | None = None, high: float | None = None, why: str = "") -> None:
    """Raise JobError unless `value` is a finite number in [low, high], naming the limit and the value."""
    if isinstance(value, float) and not math.isfinite(value):
        raise JobError(f"{where} must be a finite number, got {value}")
    if low is not None and value < low:
        raise JobError(f"{where} must be >= {low:g}, got {value!r}")
    if high is not None and value > high:
        raise JobError(f"{where} must be <= {_num(high)}{f' ({why})' if why else ''}, got {_num(value)}")


def check_text(where: str, value: str, max_chars: int = MAX_TEXT_CHARS, nul: bool = False) -> None:
    """Strings are bounded; names that become paths or devices must not hold NUL."""
    if len(value) > max_chars:
        raise JobError(f"{where} must be at most {max_chars:,} characters, got {len(value):,}")
    if not nul and "\0" in value:
        raise JobError(f"{where} must not contain a NUL character, got {value!r:.80}")


def _num(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:g}"


DEVICE_RE = re.compile(r"auto|cpu|cuda|cuda:\d{1,4}")


def check_render(batch_size: int, device: str, shard_size: int) -> None:
    if batch_size < 1:
        raise JobError(f"[render] batch_size must be >= 1, got {batch_size}")
    if not DEVICE_RE.fullmatch(device):
        raise JobError(f"[render] device must be auto, cpu, cuda or cuda:N, got {device!r:.80}")
    if shard_size < 1:
        raise JobError(f"[output] shard_size must be >= 1, got {shard_size}")


def check_model(model_id: str, revision: str | None) -> None:
    check_text("[model] id", model_id)
    if revision is not None:
        check_text("[model] revision", revision)


def check_seed(seed: int, draw: int, where: str) -> None:
    """A seed in [0, 2**63) (int64, torch's manual_seed) and a draw index in 0..MAX_DRAW."""
    if not 0 <= seed < SEED_LIMIT:
        raise JobError(f"{where} seeds: {seed} is out of range: a seed must be in [0, 2**63) (int64), got {seed}")
    if not 0 <= draw <= MAX_DRAW:
        raise JobError(f"{where} seeds: draw {draw} of seed {seed} is out of range: 'SEED:DRAW' draws DRAW latents "
                       f"first, so DRAW must be <= {MAX_DRAW:,}; use another seed instead")


def check_segment_frames(where: str, frames: int) -> None:
    """A keyframe segment's frames, both ends included: 2..MAX_SEGMENT_FRAMES."""
    if not 2 <= frames <= MAX_SEGMENT_FRAMES:
        raise JobError(f"{where} must be in 2..{MAX_SEGMENT_FRAMES:,} (the segment's frames, both ends included), "
                       f"got {frames:,}")


def check_plan_size(frames: int, walks: int, where: str = "the job") -> None:
    """The plan (one row per frame, held by the driver) must fit: at most MAX_PLAN_FRAMES frames and at
    most MEMORY_SHARE of the memory available now. Checked from counts, before the plan is built."""
    need = frames * PLAN_BYTES_PER_FRAME + walks * PLAN_BYTES_PER_WALK
    if frames > MAX_PLAN_FRAMES:
        raise JobError(f"{where} plans {frames:,} frames: at most {MAX_PLAN_FRAMES:,} frames per job (the driver "
                       f"holds one row per frame, about {_gib(need)}); split it into several jobs")
    avail = available_memory()
    if avail is not None and need > MEMORY_SHARE * avail:
        raise JobError(f"{where} plans {frames:,} frames in {walks:,} walks: its plan needs about {_gib(need)} "
                       f"({PLAN_BYTES_PER_FRAME} bytes per frame), more than {MEMORY_SHARE:.0%} of the {_gib(avail)} "
                       "available here: render fewer frames per job")


def available_memory() -> int | None:
    """Bytes of memory available to this process now (psutil: MemAvailable on Linux)."""
    try:
        import psutil
    except ImportError:  # psutil comes with ray[default]; without it the memory bound is not checked
        return None
    return int(psutil.virtual_memory().available)


def _gib(n: float) -> str:
    if n >= 2**28:
        return f"{n / 2**30:,.1f} GiB"
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"

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

import math
import re
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpcwalk.job import FramePlan, RenderJob, Sampling, Shard, Walk


class JobError(ValueError):
    """A job file or override is invalid; the message names the field and the fix."""


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
MAX_NAME_CHARS = 1000  # walk names (files get a safe name: store.safe_filename)
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
MAX_SEGMENT_FRAMES = 100_000  # frames of one keyframe segment (hpcwalk.keyframes)
MAX_INVERT_REFINE = 20  # fixed-point iterations per inversion step (hpcwalk.invert.MAX_REFINE)
EXPONENT_RANGE = (1 / 16, 16.0)  # easing_exponent (hpcwalk.pacing.EXPONENT_RANGE)
MAX_AUDIO_FPS = 240.0  # audio_fps (hpcwalk.pacing.MAX_FPS)


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


# ---------------------------------------------------------------------------------------------
# 1. Values of a job file (hpcwalk.job calls these while parsing)
# ---------------------------------------------------------------------------------------------


def check_sampling(s: "Sampling") -> None:
    bounded("[sampling] steps", s.steps, 1, MAX_STEPS, f"the scheduler has {MAX_STEPS} training timesteps")
    if s.scheduler in ("ddim", "pndm"):
        bounded("[sampling] steps", s.steps, 1, LEADING_MAX_STEPS,
                f"for scheduler {s.scheduler!r}: SD's steps_offset = 1 puts the last of 1000 steps at timestep 1000, "
                "past the 1000 training timesteps")
    bounded("[sampling] guidance", s.guidance, 0, MAX_GUIDANCE, "classifier-free guidance scale; the study uses 7.5")
    check_text("[sampling] negative_prompt", s.negative_prompt, MAX_PROMPT_CHARS, nul=True)
    for name in ("height", "width"):
        v = getattr(s, name)
        if v < 8 or v % 8:
            raise JobError(f"[sampling] {name} must be a positive multiple of 8 (the VAE downsamples by 8), got {v}")
        bounded(f"[sampling] {name}", v, None, MAX_SIDE, "pixels; SD 1.x is trained at 512")


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


def check_walk(w: "Walk", where: str, latent_w: int) -> None:
    """A walk's numbers and strings (its counts of seeds and prompts are job.py's); its frames count
    toward the plan's size (`check_plan_size`)."""
    check_text(f"{where}: name", w.name, MAX_NAME_CHARS, nul=True)
    for k, p in enumerate((w.prompt, *w.prompts)):
        check_text(f"{where} prompt" if k == 0 else f"{where} prompts[{k - 1}]", p, MAX_PROMPT_CHARS, nul=True)
    for k, p in enumerate((w.score_prompt, *w.score_prompts)):
        check_text(f"{where} score_prompt" if k == 0 else f"{where} score_prompts[{k - 1}]", p, MAX_PROMPT_CHARS, nul=True)
    if w.kind in ("latent", "text", "std", "images") and w.frames < 2:
        raise JobError(f"{where}: frames must be >= 2 (both ends are frames), got {w.frames}")
    if w.kind in ("translate", "mix") and not 1 <= w.stride <= latent_w:
        raise JobError(f"{where}: stride must be in 1..{latent_w} (the latent width), got {w.stride}")
    if w.kind == "std":
        bounded(f"{where} std_min", w.std_min, None, MAX_STD, "a scale of z_T ~ N(0, I)")
        bounded(f"{where} std_max", w.std_max, None, MAX_STD, "a scale of z_T ~ N(0, I)")
        if not 0 <= w.std_min <= w.std_max:
            raise JobError(f"{where}: need 0 <= std_min <= std_max, got {w.std_min}, {w.std_max}")


def check_segment_frames(where: str, frames: int) -> None:
    """A keyframe segment's frames, both ends included: 2..MAX_SEGMENT_FRAMES."""
    if not 2 <= frames <= MAX_SEGMENT_FRAMES:
        raise JobError(f"{where} must be in 2..{MAX_SEGMENT_FRAMES:,} (the segment's frames, both ends included), "
                       f"got {frames:,}")


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
    64 MP; returns its sha256 and the (height, width, 3) uint8 frame hpcwalk.imagefile.load_image fits it to."""
    from hpcwalk.imagefile import ImageError, image_sha256, load_image

    try:
        fitted = load_image(path, height, width)
        return image_sha256(path), fitted
    except ImageError as e:
        raise JobError(f"{where}: {e}") from None
    except OSError as e:
        raise JobError(f"{where}: {str(path)!r} cannot be read ({e.strerror or e}): check its permissions") from None


def check_audio_file(where: str, path: Any) -> tuple[str, Any]:
    """An audio file to time a walk to: decodable by PyAV, with samples, at most 3 hours; returns (sha256, onsets)."""
    from hpcwalk.imagefile import image_sha256
    from hpcwalk.pacing import AudioError, decode_audio, onset_strength

    try:
        onsets = onset_strength(decode_audio(path))  # first: its errors name what is wrong with the file
        return image_sha256(path), onsets
    except AudioError as e:
        raise JobError(f"{where}: {e}") from None
    except OSError as e:
        raise JobError(f"{where}: {str(path)!r} cannot be read ({e.strerror or e}): check its permissions") from None


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


# ---------------------------------------------------------------------------------------------
# 2. Where the frames render: model, device, dtype, [compile], CLIP, memory
# ---------------------------------------------------------------------------------------------


def check_render_device(job: "RenderJob", executor: Any) -> None:
    """Model, device, dtype, [compile] and CLIP checks where the frames will render: here without --ray;
    with --ray only the model source and CLIP names and tags here (the driver may be a CPU-only head
    without the weights), the rest on each worker while it starts (`check_worker`), which still stops
    the run (exit 2) before anything is written."""
    from hpcwalk.clip import check_job_clip
    from hpcwalk.framestats import check_job_encoder
    from hpcwalk.models import check_model_files, check_model_spec, model_source

    here = executor is None or executor.ray is None
    if here:
        check_model_spec(job.model.id, job.render.dtype, job.render.device)
        check_model_files(job.model)  # the file / folder / cached snapshot: complete, known architecture, variants
        check_speed(job)  # [compile] choices that cannot run on this device (CompileError)
        check_memory(job)  # the micro-batch's activations against the device's memory
    else:
        model_source(job.model.id)
    check_job_clip(job, here)  # ClipLoadError is a ModelLoadError
    check_job_encoder(job, here)  # EncoderLoadError too


def check_speed(job: "RenderJob") -> None:
    """The job's [compile] choices must run on its device; raises CompileError naming the fix."""
    from hpcwalk.models import resolve_device

    job.compile.check(resolve_device(job.render.device), job.sampling.scheduler, job.render.dtype)


def check_worker(job: "RenderJob") -> None:
    """What a Ray worker checks on its own device before it builds its Renderer."""
    check_render_device(job, None)


def check_memory(job: "RenderJob") -> None:
    """One micro-batch at the job's size must fit the device, and one shard's frames the host.

    A lower bound, so only hopeless sizes are refused: the VAE decoder's last block holds about three
    (B, C, H, W) activations at full resolution (C = 128 in SD 1.x, the preset's own for built-ins),
    plus the (B, 3, H, W) float32 image; the host holds a shard's uint8 frames and their encoded copies."""
    from hpcwalk.models import DTYPES, PRESETS, resolve_device

    device = resolve_device(job.render.device)
    s, b = job.sampling, job.render.batch_size
    channels = PRESETS[job.model.id]["vae"]["block_out_channels"][0] if job.model.id in PRESETS else SD_VAE_CHANNELS
    elt = DTYPES[job.render.dtype].itemsize
    pixels = s.height * s.width
    on_device = b * pixels * (3 * channels * elt + 3 * 4)
    on_host = min(job.output.shard_size, MAX_PLAN_FRAMES) * pixels * 3 * 2
    if device.type == "cuda":
        from hpcwalk.memory import free_memory

        try:  # the same figure as the measured check after loading (memory.py), HPCWALK_DEVICE_MEMORY_MIB included
            free = free_memory(device)[0]
        except ValueError as e:
            raise JobError(str(e)) from None
        host = available_memory()
        if host is not None and on_host > host:
            raise JobError(f"a shard of {job.output.shard_size:,} frames at {s.width}x{s.height} holds at least "
                           f"{_gib(on_host)} of frames on the host, which has {_gib(host)} available: lower "
                           "[output] shard_size or height/width")
    else:
        free, on_device = available_memory(), on_device + on_host
    if free is not None and on_device > free:
        raise JobError(f"a micro-batch of {b} frames at {s.width}x{s.height} ({s.width // 8}x{s.height // 8} latents) "
                       f"needs at least {_gib(on_device)} on {device} (the VAE decoder at full resolution"
                       f"{'' if device.type == 'cuda' else ', and a shard of frames'}), which has {_gib(free)} free: "
                       "lower height/width, [render] batch_size or [output] shard_size")


# ---------------------------------------------------------------------------------------------
# 3. Entry points
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderPlan:
    """A validated job, its plan and shards, ready for `executors.run_render`."""

    job: "RenderJob"  # the micro-batch capped at the frames a shard holds
    rows: "FramePlan"
    shards: "list[Shard]"
    mode: str  # new | resume | replace
    notes: tuple[str, ...] = ()  # what was adjusted, one line each

    def describe(self) -> str:
        size = max((len(s.rows) for s in self.shards), default=0)
        late = sum(1 for r in self.rows if r.stage)
        images = sum(len(w.images) for w in self.job.walks if w.kind == "images")
        extra = ((f"; even pacing: {sum(1 for r in self.rows if r.pace_pass == 'coarse'):,} coarse frames first, "
                  f"then {late:,} final frames in {sum(1 for s in self.shards if s.rows and s.rows[0].stage):,} "
                  "shards placed from them") if late else "")
        extra += f"; {images:,} endpoint images inverted before rendering (cached in the run)" if images else ""
        return (f"{len(self.rows):,} frames in {len(self.shards):,} shards of up to {size:,}, micro-batch "
                f"{self.job.render.batch_size}, plan about {_gib(len(self.rows) * PLAN_BYTES_PER_FRAME)}{extra}")


def prepare_render(job: "RenderJob", out: str, overwrite: bool = False, executor: Any = None) -> RenderPlan:
    """Everything `render` and `study` check before any work, then the plan. Writes nothing."""
    from hpcwalk.job import plan, plan_size, shard
    from hpcwalk.runlock import RunLock, RunLocked, describe
    from hpcwalk.store import preflight

    # 1. the micro-batch capped at a shard's frames (padding a 3-frame job to 10**6 rows helps no one)
    job, notes = cap_batch(job, plan_size(job))
    # 2. model, device, dtype, [compile], CLIP, memory: here, or on each Ray worker as it starts
    check_render_device(job, executor)
    # 3. the run folder: writable, this job's or new, no live driver in it
    mode = preflight(out, job, overwrite)
    holder = RunLock(out).live_holder() if mode != "new" else None
    if holder is not None:
        raise RunLocked(f"{out!r} is being rendered by {describe(holder)}: refusing to start a second driver; "
                        "wait for it to finish (a rerun then renders only what is left)")
    # 4. prompts longer than the text encoder reads: said once each, recorded per frame by the renderer
    for line in truncated_prompts(job):
        warnings.warn(_run_warning(line), stacklevel=2)
    # 5. the plan
    rows = plan(job)
    return RenderPlan(job, rows, shard(rows, job.output.shard_size), mode, notes)


def cap_batch(job: "RenderJob", frames: int) -> tuple["RenderJob", tuple[str, ...]]:
    """The job with batch_size at most the frames of its largest shard (a micro-batch is padded to it)."""
    most = max(1, min(job.output.shard_size, frames))
    if job.render.batch_size <= most:
        return job, ()
    note = f"[render] batch_size {job.render.batch_size:,} capped at {most:,}, the most frames a shard holds"
    return replace(job, render=replace(job.render, batch_size=most)), (note,)


def check_score(run: str, clip_model: str, pretrained: str | None, device: str, dtype: str, batch_size: int,
                overwrite: bool, prompt: str | None = None) -> tuple[str, Any, Any, str]:
    """`hpcwalk score`'s inputs: (score folder, torch device, torch dtype, pretrained tag). Writes nothing."""
    from hpcwalk.clip import BUILTIN_CLIP, check_clip
    from hpcwalk.models import ModelLoadError, resolve_device, resolve_dtype
    from hpcwalk.score import preflight_score

    check_text("--clip-model", clip_model)
    if pretrained is None:
        if clip_model not in BUILTIN_CLIP and not clip_model.startswith("local-dir:"):
            raise JobError(f"--pretrained is needed for {clip_model!r}: an open_clip tag such as openai or "
                           "laion2b_s32b_b79k, a weights file, or none")
        pretrained = "none" if clip_model in BUILTIN_CLIP else ""
    check_text("--pretrained", pretrained)
    if not 1 <= batch_size <= MAX_CLIP_BATCH:
        raise JobError(f"--batch-size must be in 1..{MAX_CLIP_BATCH}, got {batch_size}")
    if not DEVICE_RE.fullmatch(device):
        raise ModelLoadError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r:.80}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if prompt is not None:
        check_text("--prompt", prompt, MAX_PROMPT_CHARS, nul=True)
    check_clip(clip_model, pretrained)
    return preflight_score(run, clip_model, pretrained, overwrite, prompt), dev, dt, pretrained



def first_line(e: BaseException) -> str:
    """An exception's message, its first line only (its type's name when it has none): for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

# ---------------------------------------------------------------------------------------------
# 4. Prompts the text encoder cuts
# ---------------------------------------------------------------------------------------------


def truncated_prompts(job: "RenderJob") -> list[str]:
    """One line per distinct prompt longer than CLIP's 77 tokens (SD 1.x's tokenizer): only its first 77
    condition the frames."""
    prompts: dict[str, str] = {}
    if job.sampling.guidance > 1.0:
        prompts.setdefault(job.sampling.negative_prompt, "[sampling] negative_prompt")
    for w in job.walks:
        texts = w.prompts if w.kind in ("text", "prompts") else [k.prompt for k in w.keyframes] or (w.prompt,)
        for p in texts:
            prompts.setdefault(p, f"[[walk]] {w.name!r}")
    out = []
    for p, where in prompts.items():
        if p.isascii() and len(p) + 2 <= TOKEN_LIMIT:  # a BPE token covers >= 1 ASCII character: no tokenizer
            continue
        n = prompt_tokens(p)
        if n > TOKEN_LIMIT:
            out.append(f"{where} prompt {_clip(p)} is {n} tokens: the text encoder reads the first {TOKEN_LIMIT} "
                       "(the rest is ignored; each frame records its prompt's count in prompt_tokens)")
    return out


def prompt_tokens(prompt: str) -> int:
    """Tokens of `prompt` with SD 1.x's CLIP tokenizer, start and end tokens included."""
    return len(_tokenizer()(prompt, truncation=False, verbose=False).input_ids)


@lru_cache(maxsize=1)
def _tokenizer():
    from hpcwalk.models import clip_tokenizer

    return clip_tokenizer()


def _clip(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _run_warning(line: str) -> Warning:
    from hpcwalk.verify import RunWarning

    return RunWarning(line)


"""everything render and study check before work, then the plan"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from hpcwalk.core.errors import JobError
from hpcwalk.job.bounds import (
    MAX_PLAN_FRAMES,
    PLAN_BYTES_PER_FRAME,
    SD_VAE_CHANNELS,
    TOKEN_LIMIT,
    _gib,
    available_memory,
)
from hpcwalk.job.spec import FramePlan, RenderJob, Shard

# ---------------------------------------------------------------------------------------------
# 2. Where the frames render: model, device, dtype, [compile], CLIP, memory
# ---------------------------------------------------------------------------------------------


def check_render_device(job: "RenderJob", executor: Any) -> None:
    """Model, device, dtype, [compile] and CLIP checks where the frames will render: here without --ray;
    with --ray only the model source and CLIP names and tags here (the driver may be a CPU-only head
    without the weights), the rest on each worker while it starts (`check_worker`), which still stops
    the run (exit 2) before anything is written."""
    from hpcwalk.render.clip import check_job_clip
    from hpcwalk.render.framestats import check_job_encoder
    from hpcwalk.sd.models import check_model_files, check_model_spec, model_source

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
    from hpcwalk.sd.models import resolve_device

    job.compile.check(resolve_device(job.render.device), job.sampling.scheduler, job.render.dtype)


def check_worker(job: "RenderJob") -> None:
    """What a Ray worker checks on its own device before it builds its Renderer."""
    check_render_device(job, None)


def check_memory(job: "RenderJob") -> None:
    """One micro-batch at the job's size must fit the device, and one shard's frames the host.

    A lower bound, so only hopeless sizes are refused: the VAE decoder's last block holds about three
    (B, C, H, W) activations at full resolution (C = 128 in SD 1.x, the preset's own for built-ins),
    plus the (B, 3, H, W) float32 image; the host holds a shard's uint8 frames and their encoded copies."""
    from hpcwalk.sd.models import DTYPES, PRESETS, resolve_device

    device = resolve_device(job.render.device)
    s, b = job.sampling, job.render.batch_size
    channels = PRESETS[job.model.id]["vae"]["block_out_channels"][0] if job.model.id in PRESETS else SD_VAE_CHANNELS
    elt = DTYPES[job.render.dtype].itemsize
    pixels = s.height * s.width
    on_device = b * pixels * (3 * channels * elt + 3 * 4)
    on_host = min(job.output.shard_size, MAX_PLAN_FRAMES) * pixels * 3 * 2
    if device.type == "cuda":
        from hpcwalk.sd.memory import free_memory

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
    from hpcwalk.job.plan import plan, plan_size, shard
    from hpcwalk.store.runlock import RunLock, RunLocked, describe
    from hpcwalk.store.writer import preflight

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
    from hpcwalk.sd.loaders import clip_tokenizer

    return clip_tokenizer()


def _clip(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _run_warning(line: str) -> Warning:
    from hpcwalk.store.verify import RunWarning

    return RunWarning(line)

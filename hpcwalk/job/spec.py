"""Job files: one frozen `RenderJob` loaded from TOML, expanded to a `FramePlan`, cut into shards.

A job names the model, the sampling settings, the render settings and a list of walks. `plan(job)`
turns the walks into one small row per frame (keys and parameters only: seeds, prompts, method,
gamma / t / std); latents and embeddings are materialised by the worker that renders the row.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from hpcwalk.core.errors import JobError
from hpcwalk.job.bounds import _choice_msg, check_model, check_render, check_text
from hpcwalk.sd.compile import CompileConfig

METHODS = ("linear", "normalized", "slerp")  # latent interpolation (hpcwalk.render.interp implements them)
TEXT_METHODS = ("linear", "slerp")  # text-embedding interpolation

WALK_KINDS = ("latent", "text", "translate", "mix", "std", "prompts", "images", "keyframes")
MIX_LAYOUTS = ("end-left", "end-right")  # the two readings of the study's C (hpcwalk.render.interp.mix)
DTYPES = ("float32", "float16", "bfloat16")
IMAGE_FORMATS = ("png", "webp", "jpeg")
SCHEDULERS = ("dpmsolver++", "ddim", "euler", "pndm", "unipc", "heun")


# ---------------------------------------------------------------------------------------------
# 1. The job: frozen dataclasses, one per TOML table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseKey:
    """The `draw`-th N(0, I) latent drawn from `torch.Generator("cpu").manual_seed(seed)`."""

    seed: int
    draw: int = 0

    def __str__(self) -> str:
        return str(self.seed) if self.draw == 0 else f"{self.seed}:{self.draw}"


@dataclass(frozen=True)
class ModelSpec:
    id: str = "tiny"  # tiny | tiny-v | sd14-random | sd21-random | hub id (local cache) | diffusers folder | file.safetensors
    revision: str | None = None
    # single .safetensors: auto (from the checkpoint's keys) | sd-v1 | sd-v2-base | sd-v2-v | a folder of diffusers configs
    config: str = "auto"
    variant: str = "auto"  # diffusers folder / hub id: auto (plain files, else fp16) | fp16 | none | another variant name


@dataclass(frozen=True)
class Sampling:
    scheduler: str = "dpmsolver++"
    steps: int = 30
    guidance: float = 7.5
    negative_prompt: str = ""
    height: int = 512
    width: int = 512


@dataclass(frozen=True)
class RenderSettings:
    batch_size: int = 8
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass(frozen=True)
class ClipSpec:
    """CLIP models that embed and score every frame in the render (see hpcwalk/render/clip.py)."""

    model: str = "auto"  # auto: tiny-clip for tiny/tiny-v, random ViT-L-14 for sd14-random, random ViT-H-14 for sd21-random, else ViT-L-14
    pretrained: str = "auto"  # auto: none (random) for the built-in SD models, else openai
    enabled: bool = True  # false: no CLIP columns
    second_model: str = ""  # an independent second yardstick (e.g. ViT-H-14), stored as clip2_*
    second_pretrained: str = ""  # e.g. laion2b_s32b_b79k

    def models(self, sd_model: str) -> tuple[tuple[str, str, str], ...]:
        """(column prefix, open_clip model, pretrained tag) per CLIP model to score with."""
        if not self.enabled:
            return ()
        auto = {"tiny": ("tiny-clip", "none"), "tiny-v": ("tiny-clip", "none"), "sd14-random": ("ViT-L-14", "none"),
                "sd21-random": ("ViT-H-14", "none")}.get(sd_model, ("ViT-L-14", "openai"))
        model = auto[0] if self.model == "auto" else self.model
        if self.pretrained != "auto":
            pretrained = self.pretrained
        elif model in (auto[0], "tiny-clip"):
            pretrained = "none" if model == "tiny-clip" else auto[1]
        else:
            raise JobError(f"[clip] pretrained (--clip-pretrained): give the weights tag for model {model!r} (e.g. "
                           "openai for ViT-L-14)")
        out = [("clip", model, pretrained)]
        if self.second_model:
            if not self.second_pretrained:
                raise JobError(f"[clip] second_pretrained: give the weights tag for second_model {self.second_model!r}")
            out.append(("clip2", self.second_model, self.second_pretrained))
        return tuple(out)


@dataclass(frozen=True)
class EncoderSpec:
    """A non-CLIP image encoder that embeds every frame in the render (hpcwalk/render/encoder.py): the
    features the study's on-distribution yardstick (KID) compares besides CLIP's."""

    model: str = "auto"  # auto: tiny-dinov2 (built in, random) for `tiny`, none otherwise; a hub id or folder

    def resolved(self, sd_model: str) -> str:
        """The encoder to load ('' for none)."""
        if self.model == "auto":
            return "tiny-dinov2" if sd_model == "tiny" else ""
        return "" if self.model == "none" else self.model


@dataclass(frozen=True)
class OutputSpec:
    shard_size: int = 64
    image_format: Literal["png", "webp", "jpeg"] = "png"


@dataclass(frozen=True)
class Walk:
    """One walk. Which fields matter depends on `kind` (see `_WALK_KEYS`)."""

    name: str
    kind: str
    prompt: str = ""
    prompts: tuple[str, ...] = ()
    seeds: tuple[NoiseKey, ...] = ()
    methods: tuple[str, ...] = ()
    frames: int = 0  # frames per segment, both ends included (latent, text, std)
    stride: int = 1  # t step for translate / mix (t = 0, stride, ..., W; W always included)
    std_min: float = 0.5
    std_max: float = 1.5
    score_prompt: str = ""  # the text CLIP scores against ("" = the generation prompt)
    score_prompts: tuple[str, ...] = ()  # text / prompts walks: one scoring text per prompt
    gammas: tuple[float, ...] = ()  # latent / text walks: explicit gammas instead of i / (frames - 1)
    layout: str = MIX_LAYOUTS[0]  # mix walks: which reading of the study's C (see interp.mix)
    # Where the frames sit (hpcwalk/job/walkkeys.py parses these keys, hpcwalk/job/plan.py places the rows)
    easing: str = "linear"  # linear | ease-in | ease-out | ease-in-out (hpcwalk.job.pacing.ease); not on prompts walks
    easing_exponent: float = 2.0  # p of ease-in g^p, ease-out, ease-in-out
    pace: str = "uniform"  # uniform | even (coarse pass, then equal steps: hpcwalk/run/evenpace.py) | audio
    pace_coarse: int = 0  # even: coarse frames per segment (0: ceil(frames / 4) + 1, at least 3)
    pace_measure: str = "auto"  # even: clip (chord of CLIP embeddings) | pixel (RMS) | auto (clip when CLIP runs)
    pace_method: str = "pchip"  # even: pchip | linear (hpcwalk.job.pacing.even_gammas)
    audio: str = ""  # audio: the audio file as written in the job (relative to the job file)
    audio_sha256: str = ""  # its content (in the fingerprint; the path is not)
    audio_fps: float = 30.0  # audio: the video's frame rate the walk is timed at
    audio_start: float = 0.0  # audio: seconds into the audio where frame 0 shows
    audio_floor: float = 0.25  # audio: slowest pace, as a share of the mean (hpcwalk.job.pacing.audio_gammas)
    audio_gammas: tuple[float, ...] = ()  # audio: each frame's gamma, placed from the file when the job was parsed
    # images walks: endpoints DDIM-inverted from image files (hpcwalk/render/invert.py, hpcwalk/run/endpoints.py)
    images: tuple[str, ...] = ()  # as written in the job (relative to the job file)
    image_sha256: tuple[str, ...] = ()  # each file's content (in the fingerprint; the paths are not)
    invert_guidance: float = 0.0  # guidance of the inversion (0: none, the faithful choice)
    invert_refine: int = 5  # fixed-point iterations per inversion step (0: plain DDIM inversion)
    # keyframes walks: prompt and seed move together, segment by segment
    keyframes: tuple[Keyframe, ...] = ()
    text_method: str = "slerp"  # keyframes: text-embedding interpolation (linear | slerp)


# Walk keys added since the first runs were written, at their defaults (left out of the fingerprint there)
_WALK_KEYS_SINCE_0_1 = {f.name: f.default for f in dataclasses.fields(Walk) if f.name in (
    "score_prompt", "score_prompts", "gammas", "layout", "easing", "easing_exponent", "pace", "pace_coarse",
    "pace_measure", "pace_method", "audio_sha256", "audio_fps", "audio_start", "audio_floor", "audio_gammas",
    "image_sha256", "invert_guidance", "invert_refine", "keyframes", "text_method")}
_WALK_PATHS = ("images", "audio")  # files as written: their sha256 stands for them in the fingerprint


@dataclass(frozen=True)
class RenderJob:
    model: ModelSpec = ModelSpec()
    sampling: Sampling = Sampling()
    render: RenderSettings = RenderSettings()
    clip: ClipSpec = ClipSpec()
    output: OutputSpec = OutputSpec()
    encoder: EncoderSpec = EncoderSpec()
    compile: CompileConfig = CompileConfig()  # speed options (hpcwalk/sd/compile.py); not in the fingerprint
    walks: tuple[Walk, ...] = ()
    source: str = ""  # where it was loaded from (not part of the fingerprint)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.sampling.height // 8, self.sampling.width // 8

    def fingerprint(self) -> str:
        """sha256 over everything that decides the frames and the shard cut (not device or batch).

        Computed once per job object and kept on it (a job is frozen; `dataclasses.replace` makes a new
        one), so the layers that check it (the store, the pacing plans, the inversion index) do not
        recompute it."""
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            cached = self._compute_fingerprint()
            object.__setattr__(self, "_fingerprint", cached)
        return cached

    def _compute_fingerprint(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("source")
        d["render"].pop("batch_size")
        d["render"].pop("device")
        d.pop("compile", None)  # speed options change frames only within the tested bound
        if self.compile.quantize != "none":  # ... except the FP8 path: its frames are not the exact ones
            d["quantize"] = self.compile.quantize
        # Keys added after runs were first written enter only when they change something, so a run folder
        # of an earlier version resumes (its fingerprint holds): at their defaults they are left out.
        for key in ("config", "variant"):
            if d["model"][key] == "auto":
                d["model"].pop(key)
        if not self.encoder.resolved(self.model.id):  # no encoder column: as before [encoder] existed
            d.pop("encoder")
        for w in d["walks"]:
            for key, default in _WALK_KEYS_SINCE_0_1.items():
                if w[key] == default:
                    w.pop(key)
            for key in _WALK_PATHS:
                w.pop(key)
            # audio pacing: the file's sha256 and the audio_* keys stand for the gammas placed from it; those are
            # floats from a decoder and an FFT, which differ in the last bits between library builds and CPUs,
            # so in the fingerprint they would make one job two on two machines
            if w.get("audio_sha256"):
                w.pop("audio_gammas", None)
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def with_overrides(self, **overrides: Any) -> "RenderJob":
        """Command-line overrides: model, device, dtype, batch_size, shard_size, compile_mode, attention,
        clip_model, clip_pretrained, encoder (None = keep). Each sets its table's key as the job file would,
        so a job rendered with an override has the fingerprint of the file that sets the key."""
        o = {k: v for k, v in overrides.items() if v is not None}
        speed = self.compile.replace(mode=o.pop("compile_mode", None), attention=o.pop("attention", None))
        clip = {**dataclasses.asdict(self.clip), "model": o.pop("clip_model", self.clip.model),
                "pretrained": o.pop("clip_pretrained", self.clip.pretrained)}
        raw = {
            "clip": clip,
            "encoder": {"model": o.pop("encoder", self.encoder.model)},
            "model": {**dataclasses.asdict(self.model), "id": o.pop("model", self.model.id)},
            "render": {
                "batch_size": o.pop("batch_size", self.render.batch_size),
                "dtype": o.pop("dtype", self.render.dtype),
                "device": o.pop("device", self.render.device),
            },
            "output": {
                "shard_size": o.pop("shard_size", self.output.shard_size),
                "image_format": self.output.image_format,
            },
        }
        if o:
            raise JobError(f"unknown override(s): {', '.join(o)}")
        model = _build(ModelSpec, raw["model"], "[model]")
        check_model(model.id, model.revision)
        for key in ("model", "pretrained"):
            check_text(f"[clip] {key}", raw["clip"][key])
        check_text("[encoder] model", raw["encoder"]["model"])
        clip = _build(ClipSpec, raw["clip"], "[clip]")
        clip.models(model.id)  # JobError on a model without its weights tag
        encoder = _build(EncoderSpec, raw["encoder"], "[encoder]")
        render = _build(RenderSettings, raw["render"], "[render]")
        output = _build(OutputSpec, raw["output"], "[output]")
        _check_render(render, output)
        _check_compile(speed, self.sampling, render.dtype)
        return dataclasses.replace(self, model=model, render=render, output=output, compile=speed, clip=clip,
                                   encoder=encoder)


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(sorted(allowed))})"
            raise JobError(f"unknown key {key!r} in {where}{hint}")


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(table, set(fields), where)
    defaults = cls()
    for key, value in table.items():
        want = type(getattr(defaults, key))
        if getattr(defaults, key) is None:  # optional string
            if value is None:
                continue
            want = str
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise JobError(f"{where} {key} must be {want.__name__}, got {value!r}")
    return cls(**table)


def _check_render(r: RenderSettings, o: OutputSpec) -> None:
    if r.dtype not in DTYPES:
        raise JobError(_choice_msg("[render] dtype", r.dtype, DTYPES))
    check_render(r.batch_size, r.device, o.shard_size)
    if o.image_format not in IMAGE_FORMATS:
        raise JobError(_choice_msg("[output] image_format", o.image_format, IMAGE_FORMATS))


def _check_compile(c: CompileConfig, s: Sampling, dtype: str | None = None) -> None:
    """Values only; whether a choice runs on the device is checked when the renderer is built."""
    bad = c.problems(s.scheduler, dtype)
    if bad:
        raise JobError(bad[0])


# ---------------------------------------------------------------------------------------------
# 3. Planning: one small row per frame
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)  # slots: ~350 bytes a row where a __dict__ of 30 fields took ~1,700
class FrameRow:
    """Everything needed to render one frame, and its provenance. No tensors."""

    frame_id: str  # "{walk}/{method or kind}/{index:05d}", stable across runs
    walk: str
    kind: str
    method: str  # interpolation method ("" where the kind has none)
    index: int  # position along the walk
    segment: int  # keyframe segment (0 for two-endpoint walks)
    seed: int  # start latent (or the only one)
    draw: int
    prompt: str  # the prompt rendered (text walks: the segment's start prompt)
    seed_b: int | None = None  # end latent of the segment
    draw_b: int | None = None
    prompt_b: str | None = None  # text walks: the segment's end prompt
    gamma: float | None = None  # latent / text walks
    t: int | None = None  # translate / mix
    std: float | None = None  # std sweep
    score_prompt: str = ""  # the text CLIP scores against ("" here = `prompt`; resolved on construction)
    score_prompt_b: str | None = None  # text walks: the end prompt's scoring text (None here = `prompt_b`)
    position: float | None = None  # the uniform place along the segment, i / (n - 1), before easing or pacing
    easing: str = "linear"
    easing_exponent: float | None = None  # None where easing is linear
    pace: str = "uniform"  # uniform | even | audio
    pace_pass: str = "final"  # even pacing: "coarse" (the measured pass) or "final"
    reused_from: str | None = None  # even pacing: the coarse frame (same gamma) this final frame copies
    time_s: float | None = None  # audio pacing: when the frame shows, audio_start + index / audio_fps
    text_method: str | None = None  # keyframes walks: how the text embeddings are interpolated
    image_path: str | None = None  # images walks: the segment's start image, as written in the job
    image_path_b: str | None = None
    image_sha256: str | None = None
    image_sha256_b: str | None = None
    reuse_shard: int | None = None  # even pacing: the shard holding `reused_from` (not a column)

    @property
    def stage(self) -> int:
        """1 for the final rows of an even walk (rendered after the coarse pass), else 0."""
        return 1 if self.pace == "even" and self.pace_pass == "final" else 0

    def __getstate__(self) -> tuple:  # pickling (Ray ships shards) of a frozen slotted class, on 3.10 too
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def __setstate__(self, state: tuple) -> None:
        for f, v in zip(dataclasses.fields(self), state):
            object.__setattr__(self, f.name, v)

    def __post_init__(self) -> None:
        if not self.score_prompt:
            object.__setattr__(self, "score_prompt", self.prompt)
        if self.score_prompt_b is None and self.prompt_b is not None:
            object.__setattr__(self, "score_prompt_b", self.prompt_b)


FramePlan = list[FrameRow]


@dataclass(frozen=True)
class Shard:
    index: int
    rows: tuple[FrameRow, ...]

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


@dataclass(frozen=True)
class Keyframe:
    """One keyframe: a prompt and a seed; `frames` counts the frames of the segment to the next keyframe."""

    prompt: str
    seed: NoiseKey
    frames: int = 0  # both ends included (>= 2); 0 on the last keyframe, which starts no segment

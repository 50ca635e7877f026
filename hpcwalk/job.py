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
import math
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from hpcwalk import validate
from hpcwalk.compile import CompileConfig
from hpcwalk.keyframes import Keyframe
from hpcwalk.validate import JobError  # noqa: F401  (defined beside the bounds; importable from here as before)

METHODS = ("linear", "normalized", "slerp")  # latent interpolation (hpcwalk.interp implements them)
TEXT_METHODS = ("linear", "slerp")  # text-embedding interpolation

WALK_KINDS = ("latent", "text", "translate", "mix", "std", "prompts", "images", "keyframes")
MIX_LAYOUTS = ("end-left", "end-right")  # the two readings of the study's C (hpcwalk.interp.mix)
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
    """CLIP models that embed and score every frame in the render (see hpcwalk/clip.py)."""

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
            raise JobError(f"[clip] pretrained: give the weights tag for model {model!r} (e.g. openai for ViT-L-14)")
        out = [("clip", model, pretrained)]
        if self.second_model:
            if not self.second_pretrained:
                raise JobError(f"[clip] second_pretrained: give the weights tag for second_model {self.second_model!r}")
            out.append(("clip2", self.second_model, self.second_pretrained))
        return tuple(out)


@dataclass(frozen=True)
class EncoderSpec:
    """A non-CLIP image encoder that embeds every frame in the render (hpcwalk/encoder.py): the
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
    # Where the frames sit (hpcwalk/walkparse.py parses these keys, hpcwalk/placement.py places the rows)
    easing: str = "linear"  # linear | ease-in | ease-out | ease-in-out (hpcwalk.pacing.ease); not on prompts walks
    easing_exponent: float = 2.0  # p of ease-in g^p, ease-out, ease-in-out
    pace: str = "uniform"  # uniform | even (coarse pass, then equal steps: hpcwalk/evenpace.py) | audio
    pace_coarse: int = 0  # even: coarse frames per segment (0: ceil(frames / 4) + 1, at least 3)
    pace_measure: str = "auto"  # even: clip (chord of CLIP embeddings) | pixel (RMS) | auto (clip when CLIP runs)
    pace_method: str = "pchip"  # even: pchip | linear (hpcwalk.pacing.even_gammas)
    audio: str = ""  # audio: the audio file as written in the job (relative to the job file)
    audio_sha256: str = ""  # its content (in the fingerprint; the path is not)
    audio_fps: float = 30.0  # audio: the video's frame rate the walk is timed at
    audio_start: float = 0.0  # audio: seconds into the audio where frame 0 shows
    audio_floor: float = 0.25  # audio: slowest pace, as a share of the mean (hpcwalk.pacing.audio_gammas)
    audio_gammas: tuple[float, ...] = ()  # audio: each frame's gamma, placed from the file when the job was parsed
    # images walks: endpoints DDIM-inverted from image files (hpcwalk/invert.py, hpcwalk/endpoints.py)
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
    compile: CompileConfig = CompileConfig()  # speed options (hpcwalk/compile.py); not in the fingerprint
    walks: tuple[Walk, ...] = ()
    source: str = ""  # where it was loaded from (not part of the fingerprint)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.sampling.height // 8, self.sampling.width // 8

    def fingerprint(self) -> str:
        """sha256 over everything that decides the frames and the shard cut (not device or batch)."""
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
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def with_overrides(self, **overrides: Any) -> "RenderJob":
        """Command-line overrides: model, device, dtype, batch_size, shard_size, compile_mode, attention (None = keep)."""
        o = {k: v for k, v in overrides.items() if v is not None}
        speed = self.compile.replace(mode=o.pop("compile_mode", None), attention=o.pop("attention", None))
        raw = {
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
        validate.check_model(model.id, model.revision)
        render = _build(RenderSettings, raw["render"], "[render]")
        output = _build(OutputSpec, raw["output"], "[output]")
        _check_render(render, output)
        _check_compile(speed, self.sampling, render.dtype)
        return dataclasses.replace(self, model=model, render=render, output=output, compile=speed)


# ---------------------------------------------------------------------------------------------
# 2. Loading and validation
# ---------------------------------------------------------------------------------------------

_TABLES = {"model": ModelSpec, "sampling": Sampling, "render": RenderSettings, "clip": ClipSpec, "output": OutputSpec,
           "compile": CompileConfig, "encoder": EncoderSpec}

_EASE, _PACE = {"easing", "easing_exponent"}, {"pace", "pace_coarse", "pace_measure", "pace_method", "audio",
                                                "audio_fps", "audio_start", "audio_floor"}  # hpcwalk/walkparse.py
_WALK_KEYS: dict[str, set[str]] = {
    "latent": {"prompt", "seeds", "methods", "frames", "score_prompt", "gammas"} | _EASE | _PACE,
    "text": {"prompts", "seeds", "methods", "frames", "score_prompt", "score_prompts", "gammas"} | _EASE | _PACE,
    "translate": {"prompt", "seeds", "stride", "score_prompt"} | _EASE,
    "mix": {"prompt", "seeds", "stride", "score_prompt", "layout"} | _EASE,
    "std": {"prompt", "seeds", "frames", "std_min", "std_max", "score_prompt"} | _EASE,
    "prompts": {"prompts", "seeds", "score_prompt", "score_prompts"},
    "images": {"images", "prompt", "methods", "frames", "gammas", "score_prompt", "invert_guidance",
               "invert_refine"} | _EASE | _PACE,
    "keyframes": {"keyframes", "methods", "text_method", "score_prompt"} | _EASE | _PACE,
}
_WALK_REQUIRED: dict[str, set[str]] = {
    "latent": {"prompt", "seeds"},  # and frames or gammas (checked in _parse_walk)
    "text": {"prompts", "seeds"},
    "translate": {"prompt", "seeds"},
    "mix": {"prompt", "seeds"},
    "std": {"prompt", "seeds", "frames"},
    "prompts": {"prompts", "seeds"},
    "images": {"images", "prompt"},  # and frames or gammas
    "keyframes": {"keyframes"},
}


def read_toml(path: str | Path, what: str, example: str) -> dict[str, Any]:
    """A TOML file as a dict; a missing file or malformed TOML raises JobError naming the fix."""
    path = Path(path)
    if path.is_dir():
        raise JobError(f"{what} file {str(path)!r} is a folder: pass the path of a {what} TOML file (see {example})")
    if path.exists() and not path.is_file():
        raise JobError(f"{what} file {str(path)!r} is not a regular file (a device, pipe or socket): save the {what} "
                       f"as a TOML file and pass its path (see {example})")
    if not path.is_file():
        raise JobError(f"{what} file {str(path)!r} not found: pass the path of a {what} TOML (see {example})")
    try:
        if path.stat().st_size > validate.MAX_JOB_FILE_BYTES:
            raise JobError(f"{what} file {str(path)!r} is {path.stat().st_size:,} bytes: a {what} file must be at "
                           f"most {validate.MAX_JOB_FILE_BYTES:,} bytes")
        data = path.read_bytes()
    except OSError as e:
        raise JobError(f"{what} file {str(path)!r} cannot be read ({e.strerror or e}): check its permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobError(f"{what} file {str(path)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): "
                       "save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise JobError(f"{path}: malformed TOML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise JobError(f"{path}: malformed TOML: arrays or tables nested too deeply") from None


def load_job(path: str | Path) -> RenderJob:
    """Read and validate a TOML job file; every problem raises JobError naming the field."""
    return parse_job(read_toml(path, "job", "examples/"), source=str(path))


def parse_job(data: dict[str, Any], source: str = "<dict>") -> RenderJob:
    """Validate a TOML-shaped dict into a RenderJob."""
    if not isinstance(data, dict):
        raise JobError(f"a job must be a table of tables, got {type(data).__name__}")
    _check_keys(data, set(_TABLES) | {"walk"}, "the top level")
    parts: dict[str, Any] = {}
    for key, cls in _TABLES.items():
        table = data.get(key, {})
        if not isinstance(table, dict):
            raise JobError(f"[{key}] must be a table, got {type(table).__name__}")
        parts[key] = _build(cls, table, f"[{key}]")
    _check_sampling(parts["sampling"])
    _check_render(parts["render"], parts["output"])
    _check_compile(parts["compile"], parts["sampling"], parts["render"].dtype)
    validate.check_model(parts["model"].id, parts["model"].revision)
    parts["clip"].models(parts["model"].id)  # raises JobError on an incomplete [clip] table
    walks_raw = data.get("walk", [])
    if not isinstance(walks_raw, list) or not walks_raw:
        raise JobError("the job has no walks: add at least one [[walk]] table (see examples/quickstart.toml)")
    from hpcwalk.walkparse import ParseContext, base_dir  # lazily: walkparse imports this module

    ctx = ParseContext(parts["sampling"], parts["clip"].enabled, base_dir(source))
    walks = tuple(_parse_walk(w, i, ctx) for i, w in enumerate(walks_raw))
    names = [w.name for w in walks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise JobError(f"walk name(s) {dup} used more than once: give each [[walk]] a unique name")
    job = RenderJob(walks=walks, source=source, **parts)
    validate.check_plan_size(plan_size(job), len(walks))  # before anything builds the plan
    return job


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


def _check_sampling(s: Sampling) -> None:
    if s.scheduler not in SCHEDULERS:
        raise JobError(_choice_msg("[sampling] scheduler", s.scheduler, SCHEDULERS))
    validate.check_sampling(s)  # steps, guidance, height, width, negative_prompt


def _check_render(r: RenderSettings, o: OutputSpec) -> None:
    if r.dtype not in DTYPES:
        raise JobError(_choice_msg("[render] dtype", r.dtype, DTYPES))
    validate.check_render(r.batch_size, r.device, o.shard_size)
    if o.image_format not in IMAGE_FORMATS:
        raise JobError(_choice_msg("[output] image_format", o.image_format, IMAGE_FORMATS))


def _check_compile(c: CompileConfig, s: Sampling, dtype: str | None = None) -> None:
    """Values only; whether a choice runs on the device is checked when the renderer is built."""
    bad = c.problems(s.scheduler, dtype)
    if bad:
        raise JobError(bad[0])


def _choice_msg(where: str, got: Any, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(got), list(choices), n=1) or [c for c in choices if c.startswith(str(got))]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where}: unknown value {got!r}{hint}; choose one of {', '.join(choices)}"


def _parse_seed(v: Any, where: str) -> NoiseKey:
    """A seed is an int, or "S:K" for the K-th latent drawn from one generator seeded S."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        validate.check_seed(v, 0, where)
        return NoiseKey(v)
    if isinstance(v, str):
        s, _, k = v.partition(":")
        if s.isascii() and s.isdigit() and (k.isascii() and k.isdigit() or not k) and len(v) <= 40:
            validate.check_seed(int(s), int(k or 0), where)
            return NoiseKey(int(s), int(k or 0))
    raise JobError(f"{where} seeds: {v!r} is not a seed; use a non-negative int or 'SEED:DRAW' like '1:1'")


def _parse_walk(raw: Any, i: int, ctx: Any) -> Walk:
    from hpcwalk import walkparse

    sampling = ctx.sampling
    where = f"[[walk]] #{i + 1}"
    if not isinstance(raw, dict):
        raise JobError(f"{where} must be a table")
    kind = raw.get("kind")
    if kind is None:
        raise JobError(f"{where} has no kind; set kind to one of {', '.join(WALK_KINDS)}")
    if kind not in WALK_KINDS:
        raise JobError(_choice_msg(f"{where} kind", kind, WALK_KINDS))
    name = raw.get("name", f"{kind}-{i + 1}")
    where = f"[[walk]] {name!r}"
    if not isinstance(name, str) or not name or "/" in name:
        raise JobError(f"{where}: name must be a non-empty string without '/'")
    body = {k: v for k, v in raw.items() if k not in ("kind", "name")}
    _check_keys(body, _WALK_KEYS[kind] | ({"seed"} if "seeds" in _WALK_KEYS[kind] else set()), f"{where} (kind {kind!r})")
    if "seed" in body:  # `seed = 3` is shorthand for `seeds = [3]`
        if "seeds" in body:
            raise JobError(f"{where}: give seed or seeds, not both")
        body["seeds"] = [body.pop("seed")]
    missing = sorted(_WALK_REQUIRED[kind] - set(body))
    if missing:
        raise JobError(f"{where}: missing {', '.join(missing)} for a {kind!r} walk")
    seeds = body.get("seeds", [])
    if not isinstance(seeds, list):
        raise JobError(f"{where} seeds must be a list")
    body["seeds"] = tuple(_parse_seed(s, where) for s in seeds)
    _parse_walk_extras(body, kind, where)
    walkparse.parse_keys(body, kind, where, ctx)  # images, keyframes, easing, pace, audio
    for key in ("prompts", "methods", "score_prompts"):
        if key in body:
            v = body[key]
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise JobError(f"{where} {key} must be a list of strings")
            body[key] = tuple(v)
    valid_methods = TEXT_METHODS if kind == "text" else METHODS
    if kind in ("latent", "text", "images", "keyframes"):
        body.setdefault("methods", {"text": (valid_methods[0],), "latent": tuple(METHODS)}.get(kind, ("slerp",)))
        for m in body["methods"]:
            if m not in valid_methods:
                raise JobError(_choice_msg(f"{where} methods", m, valid_methods))
        if len(set(body["methods"])) != len(body["methods"]) or not body["methods"]:
            raise JobError(f"{where} methods must be a non-empty list of distinct methods, got {list(body['methods'])}")
    try:
        walk = Walk(name=name, kind=kind, **body)
    except TypeError as e:  # pragma: no cover - keys were checked above
        raise JobError(f"{where}: {e}") from None
    for key, want in (("prompt", str), ("frames", int), ("stride", int), ("std_min", float), ("std_max", float),
                      ("score_prompt", str), ("layout", str)):
        v = getattr(walk, key)
        ok = isinstance(v, want) or (want is float and isinstance(v, int))
        if not ok or isinstance(v, bool):
            raise JobError(f"{where} {key} must be {'an int' if want is int else 'a ' + want.__name__}, got {v!r}")
    _check_walk(walk, where, sampling)
    return walkparse.finish(walk, where, ctx)  # the new keys as a whole; audio gammas placed


def _check_walk(w: Walk, where: str, s: Sampling) -> None:
    n_seeds, n_prompts = len(w.seeds), len(w.prompts)
    if w.kind == "latent" and n_seeds < 2:
        raise JobError(f"{where}: a latent walk needs at least 2 seeds (keyframes), got {n_seeds}")
    if w.kind in ("translate", "mix") and n_seeds != 2:
        raise JobError(f"{where}: a {w.kind} walk needs exactly 2 seeds (start, end), got {n_seeds}")
    if w.kind in ("text", "std", "prompts") and n_seeds != 1:
        raise JobError(f"{where}: a {w.kind} walk uses one fixed latent: give exactly one seed, got {n_seeds}")
    if w.kind == "text" and n_prompts < 2:
        raise JobError(f"{where}: a text walk needs at least 2 prompts (keyframes), got {n_prompts}")
    if w.kind == "prompts" and n_prompts < 1:
        raise JobError(f"{where}: a prompts walk needs at least 1 prompt")
    validate.check_walk(w, where, s.width // 8)  # frames, stride, std range, names and prompts
    if w.score_prompts and len(w.score_prompts) != n_prompts:
        raise JobError(f"{where}: score_prompts needs one text per prompt ({n_prompts}), got {len(w.score_prompts)}")
    if w.score_prompt and w.score_prompts:
        raise JobError(f"{where}: give score_prompt or score_prompts, not both")
    if w.kind == "mix" and w.layout not in MIX_LAYOUTS:
        raise JobError(_choice_msg(f"{where} layout", w.layout, MIX_LAYOUTS))
    if w.gammas and {"latent": n_seeds, "images": len(w.images)}.get(w.kind, n_prompts) != 2:
        raise JobError(f"{where}: gammas = [...] is for walks between two keyframes; with more, use frames")


def _parse_walk_extras(body: dict[str, Any], kind: str, where: str) -> None:
    """`gammas = [...]` (instead of `frames`): finite floats in [0, 1], strictly increasing, at least 2."""
    if kind not in ("latent", "text", "images"):
        return
    if "gammas" not in body:
        if "frames" not in body:
            raise JobError(f"{where}: missing frames (or an explicit gammas = [...]) for a {kind!r} walk")
        return
    if "frames" in body:
        raise JobError(f"{where}: give frames or gammas, not both (frames = len(gammas))")
    body["gammas"] = parse_gammas(body["gammas"], where)
    body["frames"] = len(body["gammas"])


def parse_gammas(g: Any, where: str) -> tuple[float, ...]:
    """An explicit gamma list: at least 2 finite numbers in [0, 1], strictly increasing."""
    if not isinstance(g, list) or len(g) < 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                         for x in g):
        raise JobError(f"{where} gammas must be a list of at least 2 numbers, e.g. [0.0, 0.25, 0.5, 0.75, 1.0]")
    g = [float(x) for x in g]
    if not all(math.isfinite(x) and 0.0 <= x <= 1.0 for x in g):
        raise JobError(f"{where} gammas must be finite and in [0, 1], got {[x for x in g if not 0 <= x <= 1][:1]}")
    if any(b <= a for a, b in zip(g, g[1:])):
        raise JobError(f"{where} gammas must be strictly increasing (a walk in gamma order), got {g[:8]}")
    return tuple(g)


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


def plan(job: RenderJob) -> FramePlan:
    """Expand every walk of the job into frame rows, in walk order; the final rows of evenly paced walks
    (stage 1: placed from the coarse pass) after all the others."""
    from hpcwalk.placement import walk_rows  # lazily: placement imports this module

    rows: FramePlan = []
    late: FramePlan = []
    for w in job.walks:
        walk = walk_rows(w, job.latent_hw[1])
        if w.pace == "even":
            late.extend(r for r in walk if r.stage)
            walk = [r for r in walk if not r.stage]
        rows.extend(walk)
    return rows + late


def plan_size(job: RenderJob) -> int:
    """The number of rows `plan(job)` returns, counted without building them."""
    from hpcwalk.placement import walk_size

    return sum(walk_size(w, job.latent_hw[1]) for w in job.walks)


def _segments(frames: int, keyframes: int, gammas: Sequence[float] = ()) -> list[tuple[int, float]]:
    """(segment, local gamma) per frame; segments share their keyframe; gamma = i / (frames - 1), or the
    walk's explicit gammas (two keyframes only). The study prints its grid as {0, 1/(n-1), 1/(n-2), ..., 1};
    read as a typo for i/(n-1): its n frames are evenly spaced and 1/(n-2) > 1/(n-1) would not increase."""
    if gammas:
        return [(0, float(g)) for g in gammas]
    out = [(0, 0.0)]
    for k in range(keyframes - 1):
        out.extend((k, i / (frames - 1)) for i in range(1, frames))
    return out


def _scoring(w: Walk, k: int) -> str:
    """The scoring text of the walk's k-th prompt (its own prompt unless score_prompt(s) say otherwise)."""
    if w.score_prompts:
        return w.score_prompts[k]
    return w.score_prompt or (w.prompts[k] if w.prompts else w.prompt)


def shard(rows: FramePlan, size: int) -> list[Shard]:
    """Cut the plan into consecutive shards of `size` rows (the last may be shorter); the stage-1 rows at the
    plan's end (final rows of evenly paced walks) start a shard of their own, numbered after the others."""
    if size < 1:
        raise JobError(f"shard size must be >= 1, got {size}")
    split = len(rows)
    while split > 0 and rows[split - 1].stage:
        split -= 1
    out = [Shard(i, tuple(rows[j : min(j + size, split)])) for i, j in enumerate(range(0, split, size))]
    return out + [Shard(len(out) + i, tuple(rows[j : j + size])) for i, j in enumerate(range(split, len(rows), size))]

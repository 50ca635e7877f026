"""TOML -> RenderJob: tables, walks, overrides"""

from __future__ import annotations

import math
import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib
from pathlib import Path
from typing import Any

from hpcwalk.core.errors import JobError
from hpcwalk.core.fsio import walk_stem
from hpcwalk.job.bounds import (
    LEADING_MAX_STEPS,
    MAX_GUIDANCE,
    MAX_JOB_FILE_BYTES,
    MAX_NAME_CHARS,
    MAX_PROMPT_CHARS,
    MAX_SIDE,
    MAX_STD,
    MAX_STEPS,
    MAX_TOML_DEPTH,
    MAX_TOML_KEY_PARTS,
    MAX_TOML_LINE_CHARS,
    MAX_TOML_TABLES,
    _choice_msg,
    bounded,
    check_model,
    check_plan_size,
    check_text,
)
from hpcwalk.job.plan import plan_size
from hpcwalk.job.spec import (
    METHODS,
    MIX_LAYOUTS,
    SCHEDULERS,
    TEXT_METHODS,
    WALK_KINDS,
    ClipSpec,
    EncoderSpec,
    ModelSpec,
    OutputSpec,
    RenderJob,
    RenderSettings,
    Sampling,
    Walk,
    _build,
    _check_compile,
    _check_keys,
    _check_render,
)
from hpcwalk.job.walkkeys import _parse_seed, finish, parse_keys
from hpcwalk.sd.compile import CompileConfig

# ---------------------------------------------------------------------------------------------
# 2. Loading and validation
# ---------------------------------------------------------------------------------------------

_TABLES = {"model": ModelSpec, "sampling": Sampling, "render": RenderSettings, "clip": ClipSpec, "output": OutputSpec,
           "compile": CompileConfig, "encoder": EncoderSpec}

_EASE, _PACE = {"easing", "easing_exponent"}, {"pace", "pace_coarse", "pace_measure", "pace_method", "audio",
                                                "audio_fps", "audio_start", "audio_floor"}  # hpcwalk/job/walkkeys.py
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
        if path.stat().st_size > MAX_JOB_FILE_BYTES:
            raise JobError(f"{what} file {str(path)!r} is {path.stat().st_size:,} bytes: a {what} file must be at "
                           f"most {MAX_JOB_FILE_BYTES:,} bytes")
        data = path.read_bytes()
    except OSError as e:
        raise JobError(f"{what} file {str(path)!r} cannot be read ({e.strerror or e}): check its permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobError(f"{what} file {str(path)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): "
                       "save it as UTF-8") from None
    scan_toml(text, f"{what} file {str(path)!r}")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise JobError(f"{path}: malformed TOML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise JobError(f"{path}: malformed TOML: arrays or tables nested too deeply") from None


# strings and comments (what the shape scan skips): multi-line basic and literal first, then one-line ones
_TOML_SKIP = re.compile(r'"""(?:[^\\]|\\.)*?"""(?!")|\'\'\'[\s\S]*?\'\'\'(?!\')|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*')
_TOML_DOTTED = re.compile(r"(?<![A-Za-z0-9_\-])[A-Za-z0-9_\-]+(?:[ \t]*\.[ \t]*[A-Za-z0-9_\-]+)+")
_TOML_HEADER = re.compile(r"^[ \t]*\[", re.MULTILINE)
_TOML_BRACKETS = re.compile(r"[\[\]{}]")


def scan_toml(text: str, where: str) -> None:
    """A cheap linear scan of a TOML text's shape before tomllib reads it: line length, dotted-key parts,
    nesting and table count against the MAX_TOML_* bounds (tomllib's work on a long dotted key is
    quadratic: 100 KB of `a.a.a...` takes 14.5 GB). JobError names the limit and the line."""
    for n, line in enumerate(text.split("\n"), 1):
        if len(line) > MAX_TOML_LINE_CHARS:
            raise JobError(f"{where} line {n} has {len(line):,} characters: at most {MAX_TOML_LINE_CHARS:,} per line "
                           "(break long arrays across lines)")
    # strings and comments become one placeholder key character (a quoted key still counts as a part),
    # keeping their newlines so the skeleton's line numbers are the file's
    skeleton = _TOML_SKIP.sub(lambda m: "\n" * m.group().count("\n") if m.group().startswith("#")
                              else "s" + "\n" * m.group().count("\n"), text)
    for m in _TOML_DOTTED.finditer(skeleton):
        parts = m.group().count(".") + 1
        if parts > MAX_TOML_KEY_PARTS:
            line = skeleton.count("\n", 0, m.start()) + 1
            raise JobError(f"{where} line {line}: a dotted key of {parts:,} parts: at most {MAX_TOML_KEY_PARTS} "
                           "parts per key")
    depth, tables = 0, 0
    for m in _TOML_BRACKETS.finditer(skeleton):
        if m.group() in "[{":
            if depth == 0 and m.group() == "[" and not skeleton[skeleton.rfind("\n", 0, m.start()) + 1:m.start()].strip():
                tables += 1  # a [table] or [[array]] header (its second "[" is at depth 1)
                if tables > MAX_TOML_TABLES:
                    raise JobError(f"{where} has more than {MAX_TOML_TABLES:,} [table] headers: at most "
                                   f"{MAX_TOML_TABLES:,} per file")
            depth += 1
            if depth > MAX_TOML_DEPTH:
                line = skeleton.count("\n", 0, m.start()) + 1
                raise JobError(f"{where} line {line}: arrays or inline tables nested more than {MAX_TOML_DEPTH} "
                               f"deep: at most {MAX_TOML_DEPTH} levels")
        else:
            depth = max(depth - 1, 0)


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
    check_model(parts["model"].id, parts["model"].revision)
    parts["clip"].models(parts["model"].id)  # raises JobError on an incomplete [clip] table
    walks_raw = data.get("walk", [])
    if not isinstance(walks_raw, list) or not walks_raw:
        raise JobError("the job has no walks: add at least one [[walk]] table (see examples/quickstart.toml)")
    from hpcwalk.job.walkkeys import ParseContext, base_dir  # lazily: walkparse imports this module

    ctx = ParseContext(parts["sampling"], parts["clip"].enabled, base_dir(source))
    walks = tuple(_parse_walk(w, i, ctx) for i, w in enumerate(walks_raw))
    names = [w.name for w in walks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise JobError(f"walk name(s) {dup} used more than once: give each [[walk]] a unique name")
    _check_file_names(names)
    job = RenderJob(walks=walks, source=source, **parts)
    check_plan_size(plan_size(job), len(walks))  # before anything builds the plan
    return job


def _check_file_names(names: list[str]) -> None:
    """Every walk's files (RUN/pacing/, RUN/videos/) are named by core.fsio.walk_file, distinct for distinct
    names; two names whose stems differ only in case still make one file on a case-insensitive filesystem
    (macOS, Windows): refused."""
    seen: dict[str, str] = {}
    for n in names:
        stem = walk_stem(n)
        other = seen.setdefault(stem.lower(), n)
        if other != n:
            raise JobError(f"walks {other!r} and {n!r} would write their per-walk files (pacing/, videos/) under "
                           f"one name on a case-insensitive filesystem (macOS, Windows: {walk_stem(other)} and "
                           f"{stem} are one file): rename one")


def _check_sampling(s: Sampling) -> None:
    if s.scheduler not in SCHEDULERS:
        raise JobError(_choice_msg("[sampling] scheduler", s.scheduler, SCHEDULERS))
    check_sampling(s)  # steps, guidance, height, width, negative_prompt


def _parse_walk(raw: Any, i: int, ctx: Any) -> Walk:
    pass

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
    parse_keys(body, kind, where, ctx)  # images, keyframes, easing, pace, audio
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
    return finish(walk, where, ctx)  # the new keys as a whole; audio gammas placed


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
    check_walk(w, where, s.width // 8)  # frames, stride, std range, names and prompts
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

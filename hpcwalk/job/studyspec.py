"""[study] table -> Study (spec + job)"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcwalk.core import metrics
from hpcwalk.core.errors import JobError
from hpcwalk.job.bounds import (
    EXPONENT_RANGE,
    MAX_BOOTSTRAP,
    MAX_PROMPT_CHARS,
    SEED_LIMIT,
    bounded,
    check_plan_size,
    check_text,
)
from hpcwalk.job.parse import parse_gammas, parse_job, read_toml
from hpcwalk.job.spec import METHODS, RenderJob

LPIPS_NETS = ("auto", "alex", "vgg", "alex-random", "none")

STUDY_KEYS = {"prompt", "prompts", "pairs", "first_seed", "methods", "frames", "bootstrap", "confidence",
              "score_prompt", "score_prompts", "gammas", "bins", "lpips", "easing", "easing_exponent"}


# ---------------------------------------------------------------------------------------------
# 1. The study file
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudySpec:
    prompts: tuple[str, ...]
    pairs: int
    first_seed: int = 1
    methods: tuple[str, ...] = METHODS
    frames: int = 300
    bootstrap: int = metrics.N_BOOT
    confidence: float = metrics.CONFIDENCE
    score_prompts: tuple[str, ...] = ()  # one scoring text per prompt (() = the prompts themselves)
    gammas: tuple[float, ...] = ()  # explicit gammas (() = i / (frames - 1))
    bins: int = 5  # gamma bins for KID
    lpips: str = "auto"  # LPIPS backbone (pixelsteps.LPIPS_NETS)
    easing: str = "linear"  # every walk's gammas eased (pacing.ease): the grid becomes ease(i / (frames - 1))
    easing_exponent: float = 2.0

    def scoring(self, k: int) -> str:
        return self.score_prompts[k] if self.score_prompts else self.prompts[k]

    def gamma(self) -> np.ndarray:
        """The walks' gamma grid (frames,): the explicit gammas, or i / (frames - 1) eased by `easing`."""
        if self.gammas:
            return np.asarray(self.gammas)
        from hpcwalk.job.pacing import ease

        return ease(np.linspace(0.0, 1.0, self.frames), self.easing, self.easing_exponent)

    def walk_name(self, pair: int, prompt: int) -> str:
        return f"pair{pair:05d}" if len(self.prompts) == 1 else f"pair{pair:05d}-prompt{prompt:02d}"

    def units(self) -> list[tuple[str, int, int]]:
        """(walk name, pair, prompt index) for every walk of the study, in render order."""
        return [(self.walk_name(i, k), i, k) for i in range(self.pairs) for k in range(len(self.prompts))]


@dataclass(frozen=True)
class Study:
    spec: StudySpec
    job: RenderJob


def load_study(path: str | Path) -> Study:
    """Read a study TOML: [study] plus the job tables ([model], [sampling], [render], [clip], [output])."""
    return parse_study(read_toml(path, "study", "examples/study.toml"), source=str(path))


def parse_study(data: dict[str, Any], source: str = "<dict>") -> Study:
    """Validate a study dict and build the RenderJob that renders it (one latent walk per pair x prompt)."""
    if "walk" in data:
        raise JobError("a study file has no [[walk]] tables: the [study] table generates the walks")
    raw = data.get("study")
    if not isinstance(raw, dict):
        raise JobError("the study file has no [study] table: add one (see examples/study.toml)")
    spec = _parse_spec(raw)
    # the plan's size from the counts, before a walk table exists (10**9 pairs must not build 10**9 dicts)
    check_plan_size(spec.pairs * len(spec.prompts) * len(spec.methods) * spec.frames,
                             spec.pairs * len(spec.prompts), "the study")
    clip = data.get("clip", {})
    if isinstance(clip, dict) and clip.get("enabled", True) is False:
        raise JobError("[clip] enabled = false: a study needs CLIP scores; remove the line")
    grid = {"gammas": list(spec.gammas)} if spec.gammas else {"frames": spec.frames}
    if spec.easing != "linear":
        grid.update(easing=spec.easing, easing_exponent=spec.easing_exponent)
    walks = [{"name": name, "kind": "latent", "prompt": spec.prompts[k], "score_prompt": spec.scoring(k),
              "seeds": [f"{spec.first_seed + i}:0", f"{spec.first_seed + i}:1"],
              "methods": list(spec.methods), **grid} for name, i, k in spec.units()]
    job = parse_job({**{k: v for k, v in data.items() if k != "study"}, "walk": walks}, source=source)
    return Study(spec, job)


def _parse_spec(raw: dict[str, Any]) -> StudySpec:
    if "pace" in raw:
        raise JobError("[study] pace: a study keeps one gamma grid for every seed pair (its score curves and KID bins "
                       "are per gamma), which even and audio pacing would move walk by walk: pace them in [[walk]] "
                       "tables; easing = ... works in [study]")
    for key in raw:
        if key not in STUDY_KEYS:
            close = difflib.get_close_matches(key, sorted(STUDY_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(sorted(STUDY_KEYS))})"
            raise JobError(f"unknown key {key!r} in [study]{hint}")
    if ("prompt" in raw) == ("prompts" in raw):
        raise JobError("[study]: give prompt = \"...\" or prompts = [...], exactly one of them")
    prompts = [raw["prompt"]] if "prompt" in raw else raw["prompts"]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise JobError("[study] prompts must be a non-empty list of non-empty strings")
    methods = raw.get("methods", list(METHODS))
    if not isinstance(methods, list) or not methods or len(set(methods)) != len(methods):
        raise JobError(f"[study] methods must be a non-empty list of distinct names from {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise JobError(f"[study] methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    scoring = _parse_scoring(raw, prompts)
    gammas = _parse_gammas(raw)
    if gammas:
        raw = {**raw, "frames": len(gammas)}
    ints = {"pairs": (1, None), "first_seed": (0, 1), "frames": (2, 300), "bootstrap": (100, metrics.N_BOOT),
            "bins": (1, 5)}
    vals: dict[str, Any] = {}
    for key, (low, default) in ints.items():
        v = raw.get(key, default)
        if v is None:
            raise JobError(f"[study] {key} is missing: set the number of seed pairs, e.g. pairs = 100")
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise JobError(f"[study] {key} must be an int >= {low}, got {v!r}")
        vals[key] = v
    for k, p in enumerate(prompts):
        check_text(f"[study] prompts[{k}]", p, MAX_PROMPT_CHARS, nul=True)
    bounded("[study] bootstrap", vals["bootstrap"], None, MAX_BOOTSTRAP, "resamples")
    bounded("[study] first_seed + pairs", vals["first_seed"] + vals["pairs"], None, SEED_LIMIT,
                     "seeds are int64")
    conf = raw.get("confidence", metrics.CONFIDENCE)
    if not isinstance(conf, float) or not 0.5 <= conf < 1:
        raise JobError(f"[study] confidence must be a float in [0.5, 1), got {conf!r}")
    lpips = raw.get("lpips", "auto")
    pass

    if lpips not in LPIPS_NETS:
        raise JobError(f"[study] lpips: unknown value {lpips!r}; choose one of {', '.join(LPIPS_NETS)}")
    easing, exponent = raw.get("easing", "linear"), raw.get("easing_exponent", 2.0)
    if not isinstance(easing, str) or isinstance(exponent, bool) or not isinstance(exponent, (int, float)):
        raise JobError(f"[study] easing must be a string and easing_exponent a number, got {easing!r}, {exponent!r}")
    from hpcwalk.job.pacing import EASINGS

    if easing not in EASINGS:
        raise JobError(f"[study] easing: unknown value {easing!r}; choose one of {', '.join(EASINGS)}")
    bounded("[study] easing_exponent", exponent, *EXPONENT_RANGE, "2 is quadratic")
    if gammas and easing != "linear":
        raise JobError("[study]: gammas = [...] places the frames itself: drop easing (or gammas)")
    return StudySpec(tuple(prompts), methods=tuple(methods), confidence=conf, score_prompts=scoring, gammas=gammas,
                     lpips=lpips, easing=easing, easing_exponent=float(exponent), **vals)


def _parse_scoring(raw: dict[str, Any], prompts: list[str]) -> tuple[str, ...]:
    """score_prompt (one text for every prompt) or score_prompts (one per prompt) -> one text per prompt."""
    if "score_prompt" in raw and "score_prompts" in raw:
        raise JobError("[study]: give score_prompt or score_prompts, not both")
    if "score_prompt" in raw:
        v = raw["score_prompt"]
        if not isinstance(v, str) or not v:
            raise JobError(f"[study] score_prompt must be a non-empty string, got {v!r}")
        return (v,) * len(prompts)
    v = raw.get("score_prompts", [])
    if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
        raise JobError("[study] score_prompts must be a list of non-empty strings")
    if v and len(v) != len(prompts):
        raise JobError(f"[study] score_prompts needs one text per prompt ({len(prompts)}), got {len(v)}")
    return tuple(v)


def _parse_gammas(raw: dict[str, Any]) -> tuple[float, ...]:
    """[study] gammas, checked as a walk's are (job._parse_walk_extras)."""
    if "gammas" not in raw:
        return ()
    if "frames" in raw:
        raise JobError("[study]: give frames or gammas, not both (frames = len(gammas))")
    return parse_gammas(raw["gammas"], "[study]")

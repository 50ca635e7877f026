"""InterpScore studies: N seed pairs x methods x n frames, rendered and CLIP-scored in one pass,
then summarised with bootstrap confidence intervals over seed pairs.

A study file is a job file whose [[walk]] tables are replaced by one [study] table:

    [study]
    prompt = "An high resolution photo of a cat"     # generation prompt (or prompts = [...])
    score_prompt = "A high resolution image of a cat" # what CLIP scores against (or score_prompts = [...])
    pairs = 1000          # seed pair i interpolates seed (first_seed + i), draw 0 -> draw 1
    first_seed = 1        # (the study's own pair is seed 1, draws 0 and 1)
    methods = ["linear", "normalized", "slerp"]
    frames = 300          # n, both ends included, gamma = i / (n - 1); or gammas = [...]
    bins = 5              # gamma bins for KID (interior frames vs endpoint frames)
    lpips = "auto"        # LPIPS backbone: auto, alex, vgg, alex-random, none
    bootstrap = 10000     # resamples for the 95% intervals
    confidence = 0.95

The output folder is a normal run folder (frames/, commits/, run.json: `hpcwalk score` and the
readers work on it) plus study.parquet (one row per walk), study.json (the summary), report.html
and figures/*.png. A rerun renders only uncommitted shards, then re-analyses everything. The
yardsticks beyond CLIP (sharpness, SSIM and LPIPS steps, KID on CLIP and encoder features) and the
report's answer are in hpcwalk/yardsticks.py.
"""

from __future__ import annotations

import difflib
import json
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hpcwalk import metrics, validate, yardsticks
from hpcwalk.job import METHODS
from hpcwalk.job import JobError, RenderJob, parse_gammas, parse_job, plan, read_toml

STUDY_KEYS = {"prompt", "prompts", "pairs", "first_seed", "methods", "frames", "bootstrap", "confidence",
              "score_prompt", "score_prompts", "gammas", "bins", "lpips", "easing", "easing_exponent"}
SMOOTHNESS = ("path_length", "max_step", "mean_step", "step_std", "step_cv")


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
        from hpcwalk.pacing import ease

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
    validate.check_plan_size(spec.pairs * len(spec.prompts) * len(spec.methods) * spec.frames,
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
        validate.check_text(f"[study] prompts[{k}]", p, validate.MAX_PROMPT_CHARS, nul=True)
    validate.bounded("[study] bootstrap", vals["bootstrap"], None, validate.MAX_BOOTSTRAP, "resamples")
    validate.bounded("[study] first_seed + pairs", vals["first_seed"] + vals["pairs"], None, validate.SEED_LIMIT,
                     "seeds are int64")
    conf = raw.get("confidence", metrics.CONFIDENCE)
    if not isinstance(conf, float) or not 0.5 <= conf < 1:
        raise JobError(f"[study] confidence must be a float in [0.5, 1), got {conf!r}")
    lpips = raw.get("lpips", "auto")
    from hpcwalk.pixelsteps import LPIPS_NETS

    if lpips not in LPIPS_NETS:
        raise JobError(f"[study] lpips: unknown value {lpips!r}; choose one of {', '.join(LPIPS_NETS)}")
    easing, exponent = raw.get("easing", "linear"), raw.get("easing_exponent", 2.0)
    if not isinstance(easing, str) or isinstance(exponent, bool) or not isinstance(exponent, (int, float)):
        raise JobError(f"[study] easing must be a string and easing_exponent a number, got {easing!r}, {exponent!r}")
    from hpcwalk.pacing import EASINGS

    if easing not in EASINGS:
        raise JobError(f"[study] easing: unknown value {easing!r}; choose one of {', '.join(EASINGS)}")
    validate.bounded("[study] easing_exponent", exponent, *validate.EXPONENT_RANGE, "2 is quadratic")
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


# ---------------------------------------------------------------------------------------------
# 2. Analysis: frames -> one row per walk -> intervals over seed pairs
# ---------------------------------------------------------------------------------------------


def clip_prefixes(table: pa.Table) -> list[str]:
    """CLIP column prefixes present in a frames table (clip, clip2), primary first."""
    return sorted({n[: -len("_score")] for n in table.column_names if n.endswith("_score") and n.startswith("clip")},
                  key=lambda p: (p != "clip", p))


def walk_table(study: Study, frames: pa.Table, steps: Any = None) -> pa.Table:
    """study.parquet: one row per (seed pair, prompt, method) with InterpScore, smoothness, latent norm,
    sharpness and (given `steps`, a pixelsteps.Steps) the SSIM / LPIPS steps between consecutive frames,
    for the seed pairs whose walks are all complete. A pair with an incomplete walk (a shard not rendered
    or left out as damaged) is left out whole, so the methods stay paired; `analysed_pairs` tells which."""
    spec = study.spec
    prefixes = clip_prefixes(frames)
    if not prefixes:
        raise JobError("the run has no CLIP columns (clip_score): render the study with [clip] enabled")
    frames = _sorted(frames)
    walk, method = frames["walk"].to_numpy(zero_copy_only=False), frames["method"].to_numpy(zero_copy_only=False)
    norm = frames["latent_norm"].to_numpy()
    scores = {p: frames[f"{p}_score"].to_numpy() for p in prefixes}
    embs = {p: _embeddings(frames[f"{p}_image"]) for p in prefixes}
    sharp = frames["sharpness"].to_numpy() if "sharpness" in frames.column_names else None
    step_of = _step_lookup(steps)
    starts = _walk_starts(walk, method)
    rows: list[dict[str, Any]] = []
    for name, pair, k in spec.units():
        for m in spec.methods:
            if (name, m) not in starts:
                continue  # no committed frames
            sl = slice(starts[(name, m)], starts[(name, m)] + spec.frames)
            if len(walk[sl]) != spec.frames or (walk[sl] != name).any() or (method[sl] != m).any():
                continue  # incomplete
            seed = spec.first_seed + pair
            row = {"walk": name, "pair": pair, "prompt_index": k, "prompt": spec.prompts[k],
                   "score_prompt": spec.scoring(k), "method": m,
                   "seed_a": f"{seed}:0", "seed_b": f"{seed}:1", "frames": spec.frames,
                   "latent_norm_min": float(norm[sl].min()), "latent_norm_mean": float(norm[sl].mean())}
            for p in prefixes:
                tag = "" if p == "clip" else f"_{p}"
                row[f"interp_score{tag}"] = float(scores[p][sl].mean())  # InterpScore(f, text, n)
                row.update({f"{key}{tag}": v for key, v in metrics.smoothness(embs[p][sl]).as_dict().items()})
            if sharp is not None:
                row.update(sharpness_mean=float(sharp[sl].mean()), sharpness_min=float(sharp[sl].min()))
            for key, vals in step_of(name, m, spec.frames).items():
                row.update({f"{key}_mean": float(vals.mean()), f"{key}_max": float(vals.max())})
            rows.append(row)
    walks_per_pair = Counter(r["pair"] for r in rows)
    rows = [r for r in rows if walks_per_pair[r["pair"]] == len(spec.prompts) * len(spec.methods)]
    if not rows:
        raise JobError("no seed pair has all its walks complete: rerun the study to finish rendering")
    return pa.Table.from_pylist(rows)


def _step_lookup(steps: Any):
    """(walk, method, n) -> {"ssim_step": (n - 1,), "lpips_step": (n - 1,)} from pixelsteps.Steps (none: {})."""
    if steps is None:
        return lambda walk, method, n: {}
    where = {key: i for i, key in enumerate(steps.keys)}
    cols = {"ssim_step": steps.ssim_step, **({"lpips_step": steps.lpips_step} if steps.lpips_step is not None else {})}

    def get(walk: str, method: str, n: int) -> dict[str, np.ndarray]:
        try:
            idx = [where[(walk, method, i)] for i in range(1, n)]
        except KeyError:
            raise JobError(f"walk {walk}/{method}: a frame's image is missing: rerun the study") from None
        return {k: v[idx] for k, v in cols.items()}

    return get


def analysed_pairs(walks: pa.Table) -> list[int]:
    """The seed pairs a walk table covers (those with every walk complete), in order."""
    return sorted(set(walks["pair"].to_pylist()))


def _walk_starts(walk: np.ndarray, method: np.ndarray) -> dict[tuple[str, str], int]:
    """(walk, method) -> the row where its run of frames starts, in frames sorted by `_sorted`."""
    return {(w, m): i for i, (w, m) in enumerate(zip(walk, method)) if i == 0 or (walk[i - 1], method[i - 1]) != (w, m)}


def _embeddings(col: pa.ChunkedArray) -> np.ndarray:
    """fixed_size_list<float16|float32>[D] column -> (N, D) in its stored dtype (metrics cast per walk,
    so a large study holds the column once, not a float64 copy)."""
    arr = col.combine_chunks()
    return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)


def _per_pair(walks: pa.Table, spec: StudySpec, column: str) -> dict[str, np.ndarray]:
    """method -> (pairs,) values of a walk column over the analysed pairs, averaged over prompts (the
    bootstrap unit is the pair)."""
    pos = {p: i for i, p in enumerate(analysed_pairs(walks))}
    out = {}
    for m in spec.methods:
        sub = walks.filter(pc.equal(walks["method"], m))
        vals = np.zeros(len(pos))
        np.add.at(vals, [pos[p] for p in sub["pair"].to_pylist()], sub[column].to_numpy())
        out[m] = vals / len(spec.prompts)
    return out


def _curves(frames: pa.Table, spec: StudySpec, column: str, pairs: list[int], steps: bool = False
            ) -> dict[str, np.ndarray]:
    """method -> (pairs, n) values along gamma (or (pairs, n - 1) step distances) over the analysed
    `pairs`, averaged over prompts; `frames` sorted by `_sorted` and holding only those pairs' walks."""
    pos = {p: i for i, p in enumerate(pairs)}
    pair_of = {name: pos[pair] for name, pair, _ in spec.units() if pair in pos}
    out = {}
    for m in spec.methods:
        sub = frames.filter(pc.equal(frames["method"], m))
        walks = sub["walk"].to_numpy(zero_copy_only=False).reshape(-1, spec.frames)[:, 0]
        vals = _embeddings(sub[column]) if steps else sub[column].to_numpy()
        vals = vals.reshape(len(walks), spec.frames, -1)
        y = np.stack([metrics.step_distances(v) for v in vals]) if steps else vals[..., 0]
        acc = np.zeros((len(pairs), y.shape[1]))
        np.add.at(acc, [pair_of[w] for w in walks], y)
        out[m] = acc / len(spec.prompts)
    return out


def summarize(study: Study, frames: pa.Table, walks: pa.Table, clip_models: dict[str, str], steps: Any = None
              ) -> dict[str, Any]:
    """study.json: per-method intervals, paired differences, curves with bands, over seed pairs; every
    yardstick's ranking and Holm-corrected comparisons, KID per gamma bin, agreement with CLIP, the answer.
    `clip_models`: the frames' schema metadata (clip_model, encoder_model, model_id, ...)."""
    spec = study.spec
    boot = dict(n_boot=spec.bootstrap, confidence=spec.confidence)
    gamma = spec.gamma()
    pairs = analysed_pairs(walks)
    frames = _sorted(frames.filter(pc.is_in(frames["walk"], walks["walk"].unique())))  # the analysed walks only
    prefixes = clip_prefixes(frames)

    def intervals(column: str) -> dict[str, dict[str, float]]:  # method -> CI of the per-pair means
        return {m: metrics.bootstrap_ci(v, **boot).as_dict() for m, v in _per_pair(walks, spec, column).items()}

    out: dict[str, Any] = {
        "study": asdict(spec), "job_fingerprint": study.job.fingerprint(), "model": study.job.model.id,
        "steps": study.job.sampling.steps, "size": [study.job.sampling.height, study.job.sampling.width],
        "clip_models": {p: clip_models.get(f"{p}_model", "") for p in prefixes},
        "unit": "seed pair (values averaged over prompts first)", "n_units": len(pairs),
        "pairs_left_out": spec.pairs - len(pairs),
        "left_out_pairs": sorted(set(range(spec.pairs)) - set(pairs))[:1000],
        "interp_score": {}, "paired_differences": {}, "score_curves": {}, "smoothness": {}, "step_curves": {},
        "per_prompt": {},
    }
    for p in prefixes:
        tag = "" if p == "clip" else f"_{p}"
        per = _per_pair(walks, spec, f"interp_score{tag}")
        out["interp_score"][p] = intervals(f"interp_score{tag}")
        out["paired_differences"][p] = {
            f"{a} - {b}": metrics.paired_difference(per[a], per[b], **boot).as_dict()
            for i, a in enumerate(spec.methods) for b in spec.methods[i + 1:]}
        out["score_curves"][p] = _curve_dict(_curves(frames, spec, f"{p}_score", pairs), gamma, boot)
        by_key = {key: intervals(f"{key}{tag}") for key in SMOOTHNESS}
        out["smoothness"][p] = {m: {key: by_key[key][m] for key in SMOOTHNESS} for m in spec.methods}
        out["step_curves"][p] = _curve_dict(
            _curves(frames, spec, f"{p}_image", pairs, steps=True), (gamma[1:] + gamma[:-1]) / 2, boot)
        if len(spec.prompts) > 1:  # each prompt on its own, over the seed pairs
            out["per_prompt"][p] = {prompt: {m: metrics.bootstrap_ci(_select(walks, k, m)[f"interp_score{tag}"].to_numpy(),
                                                                     **boot).as_dict() for m in spec.methods}
                                    for k, prompt in enumerate(spec.prompts)}
    norms = {key: intervals(f"latent_norm_{key}") for key in ("min", "mean")}
    out["latent_norm"] = {m: {key: norms[key][m] for key in norms} for m in spec.methods}
    out["latent_norm_curves"] = _curve_dict(_curves(frames, spec, "latent_norm", pairs), gamma, boot)
    out["latent_norm_linear_theory"] = {"gamma": gamma.tolist(), "ratio": metrics.linear_norm_ratio(gamma).tolist()}
    if "sharpness" in frames.column_names:
        out["sharpness_curves"] = _curve_dict(_curves(frames, spec, "sharpness", pairs), gamma, boot)
    if steps is not None:
        mid = (gamma[1:] + gamma[:-1]) / 2
        for key in ("ssim_step", "lpips_step"):
            if getattr(steps, key) is not None:
                out[f"{key}_curves"] = _curve_dict(_step_curves(steps, spec, key, pairs), mid, boot)
    _yardsticks(out, study, frames, walks, clip_models)
    return out


def _step_curves(steps: Any, spec: StudySpec, key: str, pairs: list[int]) -> dict[str, np.ndarray]:
    """method -> (pairs, n - 1) pixel steps along the walk over the analysed `pairs`, averaged over prompts."""
    get = _step_lookup(steps)
    pos = {p: i for i, p in enumerate(pairs)}
    out = {}
    for m in spec.methods:
        acc = np.zeros((len(pairs), spec.frames - 1))
        for name, pair, _ in spec.units():
            if pair in pos:
                acc[pos[pair]] += get(name, m, spec.frames)[key]
        out[m] = acc / len(spec.prompts)
    return out


def _yardsticks(out: dict[str, Any], study: Study, frames: pa.Table, walks: pa.Table, meta: dict[str, str]) -> None:
    """out["yardsticks"], out["kid"], out["answer"], out["warnings"] (see hpcwalk/yardsticks.py)."""
    spec = study.spec
    conf, n_boot = spec.confidence, spec.bootstrap
    ys: dict[str, dict[str, Any]] = {}
    clip_pairs = _per_pair(walks, spec, "interp_score")
    for y in yardsticks.walk_yardsticks(walks.column_names, out["clip_models"]):
        per = _per_pair(walks, spec, y.column)
        ys[y.name] = {"label": y.label, **yardsticks.compare_walk_values(per, y.better, n_boot, conf)}
        if y.name != "interp_score":
            ys[y.name]["agreement"] = yardsticks.agreement(clip_pairs, per, y.better, n_boot, conf)
    # KID per gamma bin on CLIP's and the encoder's features, pairs resampled with one set of weights
    starts = _walk_starts(frames["walk"].to_numpy(zero_copy_only=False),  # frames: sorted by summarize
                          frames["method"].to_numpy(zero_copy_only=False))

    pairs = analysed_pairs(walks)

    def rows(m: str, idx: np.ndarray) -> np.ndarray:  # (P, prompts * len(idx)) row numbers, the analysed pairs
        return np.array([np.concatenate([starts[(spec.walk_name(p, k), m)] + idx for k in range(len(spec.prompts))])
                         for p in pairs])

    weights = metrics.bootstrap_weights(len(pairs), min(n_boot, yardsticks.KID_BOOT), seed=1)
    out["kid"] = {}
    encoder = meta.get("encoder_model", "")
    for prefix, label in (("clip", "CLIP"), ("encoder", encoder)):
        if f"{prefix}_image" not in frames.column_names or not yardsticks.gamma_bins(spec.gamma(), spec.bins):
            continue
        res = yardsticks.kid_analysis(_embeddings(frames[f"{prefix}_image"]), rows, spec.methods, spec.gamma(),
                                      spec.bins, weights, conf)
        out["kid"][prefix] = {"label": label, "bins": res["bins"], "per_bin": res["per_bin"]}
        name = f"kid_{prefix}"
        ys[name] = {"label": f"KID ({label} features)",
                    **yardsticks.compare_set_values(res["estimate"], res["boots"], res["swap_terms"], len(pairs),
                                                    "lower", conf),
                    "agreement": yardsticks.agreement(clip_pairs, res["per_pair"], "lower", n_boot, conf)}
    out["yardsticks"] = ys
    lpips = meta.get("lpips", "none")
    out["answer"] = yardsticks.answer(ys, len(pairs), conf)
    out["warnings"] = yardsticks.warning_lines(len(pairs), out, meta, lpips)
    out["random_weights"] = yardsticks.random_models(meta, lpips)


def _select(walks: pa.Table, prompt_index: int, method: str) -> pa.Table:
    return walks.filter(pc.and_(pc.equal(walks["prompt_index"], prompt_index), pc.equal(walks["method"], method)))


def _sorted(frames: pa.Table) -> pa.Table:
    """Frames in walk, method, index order: every (walk, method) is a contiguous run along gamma."""
    return frames.sort_by([("walk", "ascending"), ("method", "ascending"), ("index", "ascending")])


def _curve_dict(curves: dict[str, np.ndarray], x: np.ndarray, boot: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for m, y in curves.items():
        mean, lo, hi = metrics.bootstrap_curve(y, **boot)
        out[m] = {"x": x.tolist(), "mean": mean.tolist(), "low": lo.tolist(), "high": hi.tolist()}
    return out


# ---------------------------------------------------------------------------------------------
# 3. The entry point: render what is missing, analyse, write the three outputs
# ---------------------------------------------------------------------------------------------


@dataclass
class StudyResult:
    """What `run_study` did. `status` is done, or failed with the render summary's failed shards."""

    status: str
    render: Any  # executors.RunSummary
    files: list[str]
    pairs_left_out: int = 0  # seed pairs not analysed: some walk of theirs incomplete


def run_study(study: Study, out: str, overwrite: bool = False, progress: bool = True, executor: Any = None,
              verify: str = "full", shards: Any = None) -> StudyResult:
    """Render the study's frames through the executors (resuming; `executor`: executors.ExecutorOptions,
    None renders in this process), then write the analysis of the seed pairs whose walks are complete.
    `shards`: the job's shards when the caller has cut them already (validate.prepare_render)."""
    from hpcwalk.executors import run_render
    from hpcwalk.job import shard

    # 1. render and score what is not committed yet, or damaged (same path as `hpcwalk render`)
    if shards is None:
        shards = shard(plan(study.job), study.job.output.shard_size)
    summary = run_render(study.job, out, shards, overwrite=overwrite, progress=progress, executor=executor,
                         verify=verify)  # type: ignore[arg-type]
    if summary.failed:
        return StudyResult("failed", summary, [])
    # 2. the analysis of what is committed and verified
    files, left_out = analyse(study, out, verify, progress)
    return StudyResult("done", summary, files, left_out)


def analyse(study: Study, out: str, verify: str = "full", progress: bool = True) -> tuple[list[str], int]:
    """Read a study folder's verified frames (no images), reduce them to one row per walk of the seed pairs
    with every walk complete, write the three outputs; returns (files written, seed pairs left out)."""
    from hpcwalk.report import write_report
    from hpcwalk.store import RunWarning, read_verified, shard_columns, verify_run

    # 1. the verified frames, without image bytes (damaged shards left out, each with a warning)
    shards = verify_run(out, verify)  # type: ignore[arg-type]
    shards.warn()
    frames = read_verified(shards, [n for n in shard_columns(shards) if n != "image"] or None)
    meta = {k.decode(): v.decode() for k, v in (frames.schema.metadata or {}).items()}
    # 2. pixel and perceptual steps between consecutive frames (images read back, one shard at a time)
    steps = _pixel_steps(study, out, shards.files, progress)
    meta["lpips"] = resolve_lpips(study.spec.lpips, study.job.model.id)
    # 3. one row per walk of the complete pairs; say how many pairs are left out
    walks = walk_table(study, frames, steps)
    left_out = study.spec.pairs - len(analysed_pairs(walks))
    if left_out:
        warnings.warn(RunWarning(f"analysed {study.spec.pairs - left_out} of {study.spec.pairs} seed pairs: "
                                 f"{left_out} left out with incomplete walks (rerun the study to render them)"),
                      stacklevel=2)
    # 4. the summary, the table, the report
    summary_json = summarize(study, frames, walks, meta, steps)
    files = write_outputs(out, walks, summary_json)
    files += write_report(out, summary_json, walks)
    return files, left_out


def check_yardsticks(study: Study) -> None:
    """What can fail in the analysis, checked before any work: LPIPS weights, frame size for SSIM and LPIPS."""
    from hpcwalk.pixelsteps import LPIPS_MIN_SIZE, SSIM_WINDOW, check_lpips

    net = resolve_lpips(study.spec.lpips, study.job.model.id)
    check_lpips(net)
    s = study.job.sampling
    if min(s.height, s.width) < SSIM_WINDOW:
        raise JobError(f"[sampling] height and width must be >= {SSIM_WINDOW} in a study (the SSIM window), "
                       f"got {s.height}x{s.width}")
    if min(s.height, s.width) < LPIPS_MIN_SIZE.get(net, 0):
        raise JobError(f"[sampling] height and width must be >= {LPIPS_MIN_SIZE[net]} for [study] lpips = {net!r} "
                       f"(its backbone pools smaller frames away), got {s.height}x{s.width}: render larger frames "
                       "or set lpips = \"none\"")


def _pixel_steps(study: Study, out: str, files: list[str], progress: bool) -> Any:
    """SSIM and LPIPS steps of every walk, on the render device (pixelsteps.run_steps)."""
    import sys

    from tqdm import tqdm

    from hpcwalk.models import resolve_device
    from hpcwalk.pixelsteps import load_lpips, run_steps

    check_yardsticks(study)
    device = resolve_device(study.job.render.device)
    net = resolve_lpips(study.spec.lpips, study.job.model.id)
    model = load_lpips(net, device) if net != "none" else None
    total = len(study.spec.units()) * len(study.spec.methods) * (study.spec.frames - 1)
    with tqdm(total=total, unit="step", desc="pixel steps", disable=not progress, file=sys.stderr) as bar:
        return run_steps(out, files, model, device, study.job.render.batch_size, progress=bar.update)


def resolve_lpips(net: str, sd_model: str) -> str:
    from hpcwalk.pixelsteps import resolve_lpips as resolve

    return resolve(net, sd_model)



def write_outputs(out: str, walks: pa.Table, summary: dict[str, Any]) -> list[str]:
    """study.parquet and study.json, each written to a temporary name and renamed (no temporary file is
    left when a write fails)."""
    import io

    import pyarrow.parquet as pq

    from hpcwalk.store import filesystem, write_atomic

    fs, root = filesystem(out)
    buf = io.BytesIO()
    pq.write_table(walks, buf)
    write_atomic(fs, f"{root}/study.parquet", buf.getvalue())
    write_atomic(fs, f"{root}/study.json", json.dumps(summary, indent=2).encode())
    return [f"{root}/study.parquet", f"{root}/study.json"]

"""per-walk table and InterpScore summary of a study"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hpcwalk.analyse import yardsticks
from hpcwalk.core import metrics
from hpcwalk.core.errors import JobError
from hpcwalk.job.studyspec import Study, StudySpec

SMOOTHNESS = ("path_length", "max_step", "mean_step", "step_std", "step_cv")


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
    """out["yardsticks"], out["kid"], out["answer"], out["warnings"] (see hpcwalk/analyse/yardsticks.py)."""
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

"""The study's yardsticks side by side, CLIP and not: rankings, Holm-corrected comparisons, agreement with
CLIP, the report's answer and its warnings. Reads the per-walk table and the frames' feature columns.

Every yardstick ranks the methods over the same seed pairs (the bootstrap unit):

| yardstick     | per walk / set | better | what it is                                                          |
|---------------|----------------|--------|---------------------------------------------------------------------|
| interp_score  | walk           | higher | the study's InterpScore (CLIP), `_clip2`: the second CLIP model     |
| sharpness     | walk           | higher | mean variance of the Laplacian of the luma (framestats.py): blur   |
| ssim_step     | walk           | lower  | mean 1 - SSIM between consecutive frames (pixelsteps.py)            |
| lpips_step    | walk           | lower  | mean LPIPS between consecutive frames                               |
| kid_clip      | set            | lower  | KID of interior frames vs the endpoint frames, CLIP features       |
| kid_encoder   | set            | lower  | the same on the non-CLIP encoder's features (encoder.py)           |

KID per gamma bin: the interior frames (0 < gamma < 1) whose gamma falls in the bin, at most KID_FRAMES per
pair and prompt, against every pair's endpoint frames (gamma 0 and 1, the ordinary samples of N(0, I)),
kernel (x.y + 1)^3 on the unit embeddings (KID's (x.y/d + 1)^3 on embeddings of norm sqrt(d)), as a
U-statistic over distinct pairs (metrics.kid_from_blocks); its yardstick value is the mean over bins.
Walk yardsticks get paired bootstrap intervals and sign-flip p-values (exact for few pairs); set yardsticks
bootstrap the pairs with one set of resample weights shared by all methods, so differences are paired too,
and take their p-values from the exact test of swapping two methods' frames within pairs (a sign-flip test,
metrics.kid_swap_terms). Each yardstick's
M(M-1)/2 pairwise comparisons are Holm-corrected at alpha = 1 - confidence. Agreement with CLIP: per
pair, Kendall's tau-b between the methods' InterpScores and the yardstick's values (oriented: higher =
better; KID: each pair's share of it), averaged over pairs with a bootstrap interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from hpcwalk.core import metrics

KID_FRAMES = 8  # interior frames per pair, prompt and bin that enter KID (evenly spaced in the bin)
KID_BOOT = 2000  # resamples for the KID intervals (each costs a P x P product per method and bin)
MIN_PAIRS = 20


@dataclass(frozen=True)
class Yardstick:
    name: str
    label: str
    better: str  # "higher" | "lower"
    column: str = ""  # per-walk column of study.parquet ("" for set yardsticks)


def walk_yardsticks(columns: list[str], clip_models: dict[str, str]) -> list[Yardstick]:
    """The per-walk yardsticks this study's table has, CLIP's first."""
    out = []
    for p, model in clip_models.items():
        tag = "" if p == "clip" else f"_{p}"
        out.append(Yardstick(f"interp_score{tag}", f"InterpScore (CLIP {model})", "higher", f"interp_score{tag}"))
    for name, label, better in (("sharpness", "sharpness", "higher"),
                                ("ssim_step", "pixel step (1 - SSIM)", "lower"),
                                ("lpips_step", "LPIPS step", "lower")):
        if f"{name}_mean" in columns:
            out.append(Yardstick(name, label, better, f"{name}_mean"))
    return out


# ---------------------------------------------------------------------------------------------
# 1. KID per gamma bin, over seed pairs
# ---------------------------------------------------------------------------------------------


def gamma_bins(gamma: np.ndarray, bins: int) -> list[np.ndarray]:
    """Frame indices of the interior frames (0 < gamma < 1) in each of `bins` equal-width gamma bins (empty
    bins dropped)."""
    interior = np.flatnonzero((gamma > 0) & (gamma < 1))
    which = np.minimum((gamma[interior] * bins).astype(int), bins - 1)
    return [interior[which == b] for b in range(bins) if (which == b).any()]


def kid_analysis(emb: np.ndarray, rows: Callable[[str, np.ndarray], np.ndarray], methods: tuple[str, ...],
                 gamma: np.ndarray, bins: int, weights: np.ndarray, confidence: float) -> dict[str, Any]:
    """KID per method and gamma bin for one feature column.

    emb (N, D): unit features of the sorted frames; rows(method, frame_indices) -> (P, F) row numbers of
    those frames for every pair (its prompts side by side); weights (B, P): shared bootstrap counts."""
    ends = np.flatnonzero((gamma == 0) | (gamma == 1))
    ref = emb[rows(methods[0], ends)].astype(np.float32)  # (P, G, D): every method shares its endpoints
    kyy = metrics.pair_kernel_means(ref, ref, gamma=1.0)
    P = kyy.shape[0]
    out: dict[str, Any] = {"bins": [], "per_bin": {m: [] for m in methods}, "estimate": {}, "boots": {},
                           "per_pair": {}}
    groups = gamma_bins(gamma, bins)
    for idx in groups:
        out["bins"].append([float(gamma[idx].min()), float(gamma[idx].max())])
    xs: dict[str, list[np.ndarray]] = {m: [] for m in methods}  # per method, per bin: (P, F, D) interior features
    kxx: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    kxy: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for m in methods:
        est, boots, share = [], [], []
        for idx in groups:
            pick = idx[np.unique(np.linspace(0, len(idx) - 1, min(KID_FRAMES, len(idx))).round().astype(int))]
            x = emb[rows(m, pick)].astype(np.float32)  # (P, F, D)
            xs[m].append(x)
            kxx[m].append(metrics.pair_kernel_means(x, x, gamma=1.0))
            kxy[m].append(metrics.pair_kernel_means(x, ref, gamma=1.0))
            e = float(metrics.kid_from_blocks(kxx[m][-1], kyy, kxy[m][-1])[0])
            b = metrics.kid_from_blocks(kxx[m][-1], kyy, kxy[m][-1], weights)
            out["per_bin"][m].append(metrics.interval_from_boots(e, b, P, confidence).as_dict())
            est.append(e)
            boots.append(b)
            share.append(metrics.kid_per_pair(kxx[m][-1], kyy, kxy[m][-1]))
        out["estimate"][m] = float(np.mean(est))
        out["boots"][m] = np.mean(boots, axis=0)  # (B,): the mean over bins of each resample
        out["per_pair"][m] = np.mean(share, axis=0)  # (P,)
    out["swap_terms"] = {  # (a, b) -> (P,): the exact swap test of the bin-averaged KID_a - KID_b (metrics.kid_swap_terms)
        (a, b): np.mean([metrics.kid_swap_terms(kxx[a][k], kxx[b][k], metrics.pair_kernel_means(xs[a][k], xs[b][k], gamma=1.0),
                                                kxy[a][k], kxy[b][k]) for k in range(len(groups))], axis=0)
        for i, a in enumerate(methods) for b in methods[i + 1:]}
    return out


# ---------------------------------------------------------------------------------------------
# 2. Rankings, Holm-corrected comparisons, agreement with CLIP
# ---------------------------------------------------------------------------------------------


def compare_walk_values(per_pair: dict[str, np.ndarray], better: str, n_boot: int, confidence: float
                        ) -> dict[str, Any]:
    """Intervals per method, paired tests with Holm's correction, ranking (best first), from per-pair values."""
    methods = list(per_pair)
    per_method = {m: metrics.bootstrap_ci(v, n_boot, confidence).as_dict() for m, v in per_pair.items()}
    tests = {}
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            iv, p = metrics.paired_test(per_pair[a], per_pair[b], n_boot, confidence)
            tests[f"{a} - {b}"] = {**iv.as_dict(), "p": p}
    return _finish(per_method, tests, better, confidence)


def compare_set_values(estimate: dict[str, float], boots: dict[str, np.ndarray],
                       swap_terms: dict[tuple[str, str], np.ndarray], n: int, better: str, confidence: float
                       ) -> dict[str, Any]:
    """The same from set-level estimates and bootstrap replicates drawn with shared weights (the intervals); the
    p-value of a - b is the exact test of swapping the two methods' frames within pairs, a sign-flip test on
    `swap_terms[(a, b)]` (metrics.kid_swap_terms; a percentile bootstrap p-value reads 0 with 3 pairs, whose
    10 distinct resamples may all fall on one side of 0). n: the seed pairs."""
    methods = list(estimate)
    per_method = {m: metrics.interval_from_boots(estimate[m], boots[m], n, confidence).as_dict() for m in methods}
    tests = {}
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            iv = metrics.interval_from_boots(estimate[a] - estimate[b], boots[a] - boots[b], n, confidence)
            tests[f"{a} - {b}"] = {**iv.as_dict(), "p": metrics.sign_flip_p_value(swap_terms[(a, b)])}
    return _finish(per_method, tests, better, confidence)


def _finish(per_method: dict, tests: dict, better: str, confidence: float) -> dict[str, Any]:
    names = list(tests)
    adjusted = metrics.holm(np.array([tests[k]["p"] for k in names]))
    alpha = 1 - confidence
    for k, adj in zip(names, adjusted):
        tests[k]["p_holm"] = float(adj)
        tests[k]["resolved"] = bool(np.isfinite(adj) and adj <= alpha)
    sign = -1 if better == "higher" else 1
    ranking = sorted(per_method, key=lambda m: sign * per_method[m]["estimate"])
    return {"better": better, "per_method": per_method, "paired": tests, "ranking": ranking}


def agreement(clip: dict[str, np.ndarray], other: dict[str, np.ndarray], better: str, n_boot: int,
              confidence: float) -> dict[str, Any]:
    """Mean over pairs of Kendall's tau-b between CLIP's and another yardstick's ranking of the methods."""
    methods = list(clip)
    x = np.stack([clip[m] for m in methods], 1)  # (P, M), higher = better
    y = np.stack([other[m] for m in methods], 1) * (1 if better == "higher" else -1)
    tau = metrics.rank_agreement(x, y)
    ok = tau[np.isfinite(tau)]
    if ok.size == 0:
        return {"estimate": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0,
                "confidence": confidence, "pairs_tied": int(tau.size), "verdict": "undefined"}
    iv = metrics.bootstrap_ci(ok, n_boot, confidence).as_dict()
    # The verdict rests on the exact sign-flip test of mean tau = 0 (as the differences do), never on the
    # bootstrap interval alone: with 2 pairs a tau of -1 in both gives [-1, -1], degenerate, no evidence.
    p = metrics.sign_flip_p_value(ok, n_boot)
    degenerate_iv = not iv["high"] - iv["low"] > 1e-12
    resolved = p <= 1 - confidence and not degenerate_iv
    verdict = ("agrees" if iv["estimate"] > 0 else "disagrees") if resolved else "not resolved"
    return {**iv, "p": p, "pairs_tied": int(tau.size - ok.size), "verdict": verdict}


# ---------------------------------------------------------------------------------------------
# 3. The answer in words, and what should make a reader wary of it
# ---------------------------------------------------------------------------------------------


def answer(yardsticks: dict[str, dict[str, Any]], pairs: int, confidence: float) -> str:
    """The report's first paragraph: the ranking under each yardstick, what Holm's correction leaves resolved,
    and whether CLIP agrees with the others."""
    alpha = 1 - confidence
    parts = []
    for y in yardsticks.values():
        ranking = " > ".join(y["ranking"])
        resolved = [f"{k.replace(' - ', ' vs ')} ({_winner(k, t, y['better'])} better, Holm p = {t['p_holm']:.2g})"
                    for k, t in y["paired"].items() if t["resolved"]]
        parts.append(f"{y['label']}: {ranking}, "
                     + (f"resolved: {', '.join(resolved)}" if resolved else "no difference resolved"))
    comparisons = max((len(y["paired"]) for y in yardsticks.values()), default=1) or 1
    need = metrics.min_pairs_to_resolve(comparisons, confidence)
    floor = (f"With {pairs} seed pairs nothing can resolve: the exact sign-flip test with Holm's correction over "
             f"{comparisons} comparisons needs at least {need} pairs. ") if pairs < need else ""
    head = floor + (f"Rankings over {pairs} seed pairs (best first; a difference counts as resolved when its Holm-corrected "
            f"p-value, over the yardstick's pairwise comparisons, is at most {alpha:g}). " + ". ".join(parts) + ".")
    verdicts = {y["label"]: y["agreement"] for y in yardsticks.values() if y.get("agreement")}
    if not verdicts:
        return head + " There is no other yardstick to compare CLIP with."
    said = [f"{v['verdict']} with {label} (Kendall's tau {v['estimate']:.2f} [{v['low']:.2f}, {v['high']:.2f}])"
            if math.isfinite(v["estimate"]) else f"cannot be compared with {label} (every pair tied)"
            for label, v in verdicts.items()]
    said = [x.replace("not resolved with", "is not resolved against") for x in said]
    kinds = {v["verdict"] for v in verdicts.values()}
    if kinds == {"agrees"}:
        overall = "CLIP agrees with every other yardstick."
    elif "disagrees" in kinds:
        overall = "CLIP disagrees with at least one other yardstick: its ranking is not the others'."
    else:
        overall = "Whether CLIP agrees with the others is not resolved with these pairs."
    return head + " CLIP's ranking of the methods, pair by pair, " + "; ".join(said) + ". " + overall


def _winner(key: str, test: dict[str, Any], better: str) -> str:
    a, b = key.split(" - ")
    return a if (test["estimate"] > 0) == (better == "higher") else b


def degenerate(summary_part: Any, path: str = "") -> list[str]:
    """Paths of intervals (dicts with low/high) that have zero width or are not finite."""
    out = []
    if isinstance(summary_part, dict):
        if {"low", "high", "estimate"} <= set(summary_part):
            lo, hi = summary_part["low"], summary_part["high"]
            if not (math.isfinite(lo) and math.isfinite(hi)) or hi - lo <= 1e-12 * max(1.0, abs(hi)):
                out.append(path)
            return out
        for k, v in summary_part.items():
            out += degenerate(v, f"{path}/{k}" if path else str(k))
    return out


def random_models(meta: dict[str, str], lpips: str) -> list[str]:
    """The models of this study that have random weights (names as the metadata states them)."""
    out = []
    from hpcwalk.sd.weights import BUILTIN_MODELS

    if meta.get("model_id") in BUILTIN_MODELS:
        out.append(f"the Stable Diffusion model ({meta['model_id']})")
    for key in ("clip_model", "clip2_model"):
        if meta.get(key, "").endswith("/none"):
            out.append(f"CLIP {meta[key]}")
    from hpcwalk.analyse.pixelsteps import RANDOM_LPIPS
    from hpcwalk.render.encoder import RANDOM_ENCODERS

    if meta.get("encoder_model") in RANDOM_ENCODERS:
        out.append(f"the encoder {meta['encoder_model']}")
    if lpips in RANDOM_LPIPS:
        out.append(f"LPIPS {lpips}")
    return out


def warning_lines(pairs: int, summary: dict[str, Any], meta: dict[str, str], lpips: str) -> list[str]:
    """What should make a reader wary: too few pairs, degenerate intervals, random weights, missing yardsticks."""
    out = []
    if pairs < MIN_PAIRS:
        out.append(f"Only {pairs} seed pairs (fewer than {MIN_PAIRS}): the bootstrap over pairs has "
                   f"{math.comb(2 * pairs - 1, pairs)} distinct resamples, so intervals and p-values are coarse "
                   "and a difference may look resolved or not by chance. Use more pairs.")
    bad = degenerate({k: summary.get(k) for k in ("yardsticks", "kid")})
    if bad:
        shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        out.append(f"{len(bad)} interval(s) are degenerate (zero width or undefined): {shown}.")
    rnd = random_models(meta, lpips)
    if rnd:
        out.append("Random weights: " + ", ".join(rnd) + ". These numbers test the pipeline; they say nothing "
                   "about Stable Diffusion's latent space.")
    if not meta.get("encoder_model"):
        out.append("No non-CLIP encoder ([encoder] model is none): KID is computed on CLIP features only.")
    if lpips == "none":
        out.append("LPIPS is off ([study] lpips = \"none\").")
    return out

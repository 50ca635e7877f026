"""Pure numpy metrics of interpolation walks: CLIPScore, InterpScore, smoothness, bootstrap CIs, paired tests
and Holm's correction, Kendall's tau between rankings, KID with seed pairs as units.

Array in, array out; embeddings are (N, D) rows (any norm: cosines normalise them), one row per
frame of a walk in gamma order. The study's definitions (seed/exploring-latent-space-of-sd.txt):

    CLIPScore(text, image) = max(100 * cos(z_text, E(image)), 0)
    InterpScore(f, text, n) = (1 / n) * sum over the n frames of f's walk of CLIPScore(text, x_f^(gamma))

with gamma = i / (n - 1), i = 0 .. n - 1 (the study prints the set as {0, 1/(n-1), 1/(n-2), ..., 1};
its text and its use of n frames mean the evenly spaced grid, which is what `plan` renders).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

CONFIDENCE = 0.95
N_BOOT = 10_000


# ---------------------------------------------------------------------------------------------
# 1. CLIPScore and InterpScore
# ---------------------------------------------------------------------------------------------


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """cos(a_i, b_i) along the last axis; a, b broadcast (..., D) -> (...)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def clip_score(text: np.ndarray, images: np.ndarray) -> np.ndarray:
    """max(100 * cos(text, image_i), 0): text (D,), images (N, D) -> (N,)."""
    return np.maximum(100.0 * cosine(images, np.asarray(text)[None, :]), 0.0)


def interp_score(text: np.ndarray, images: np.ndarray) -> float:
    """InterpScore = mean over the walk's n frames of CLIPScore(text, frame): images (n, D)."""
    return float(clip_score(text, images).mean())


# ---------------------------------------------------------------------------------------------
# 2. Smoothness along a walk
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Smoothness:
    """How a walk moves in embedding space, from consecutive frames' cosine distances."""

    path_length: float  # sum of the steps
    max_step: float  # the largest jump
    mean_step: float
    step_std: float
    step_cv: float  # step_std / mean_step: 0 for a walk at an even pace

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def step_distances(emb: np.ndarray) -> np.ndarray:
    """1 - cos(e_i, e_{i+1}) for consecutive frames: (n, D) -> (n - 1,)."""
    emb = np.asarray(emb, np.float64)
    return 1.0 - cosine(emb[:-1], emb[1:])


def smoothness(emb: np.ndarray) -> Smoothness:
    """Path length, largest jump and spread of the steps of a walk (n >= 2 frames, (n, D))."""
    d = step_distances(emb)  # (n - 1,)
    if d.size == 0:
        raise ValueError("smoothness needs a walk of at least 2 frames")
    mean = float(d.mean())
    std = float(d.std())
    return Smoothness(float(d.sum()), float(d.max()), mean, std, std / mean if mean > 0 else 0.0)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """10 log10(255^2 / mean((a - b)^2)) in dB over uint8 images (or stacks) of one shape; inf where they are equal."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs images of one shape, got {a.shape} and {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def linear_norm_ratio(gamma: np.ndarray) -> np.ndarray:
    """Expected ||(1-g) a + g b|| / ||a|| for independent N(0, I) endpoints: sqrt((1-g)^2 + g^2)."""
    g = np.asarray(gamma, np.float64)
    return np.sqrt((1 - g) ** 2 + g**2)


# ---------------------------------------------------------------------------------------------
# 3. Bootstrap confidence intervals (percentile bootstrap over independent units, e.g. seed pairs)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _boot_means(y: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of n_boot resamples (with replacement) of the rows of y (units, G) -> (n_boot, G).

    A resample is a multinomial count vector over the units, so the mean is counts @ y / units;
    resamples are drawn in chunks to keep memory bounded for large studies."""
    units = y.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, 20_000_000 // max(units, y.shape[1]))
    out = []
    for start in range(0, n_boot, chunk):
        counts = rng.multinomial(units, np.full(units, 1.0 / units), size=min(chunk, n_boot - start))
        out.append(counts @ y / units)  # (chunk, G)
    return np.concatenate(out)


def bootstrap_ci(x: np.ndarray, n_boot: int = N_BOOT, confidence: float = CONFIDENCE, seed: int = 0) -> Interval:
    """Percentile bootstrap CI of the mean of independent units x (n,)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D sample, got shape {x.shape}")
    boots = _boot_means(x[:, None], n_boot, seed)[:, 0]  # (n_boot,)
    lo, hi = np.quantile(boots, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(float(x.mean()), float(lo), float(hi), int(x.size), confidence)


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = N_BOOT, confidence: float = CONFIDENCE,
                      seed: int = 0) -> Interval:
    """Mean of a_i - b_i over paired units (the same seed pairs) with its bootstrap CI."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in shape: {a.shape} vs {b.shape}")
    return bootstrap_ci(a - b, n_boot, confidence, seed)


def bootstrap_curve(y: np.ndarray, n_boot: int = N_BOOT, confidence: float = CONFIDENCE, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean curve over units and a pointwise band: y (units, G) -> mean, low, high, each (G,)."""
    y = np.asarray(y, np.float64)
    if y.ndim != 2 or y.shape[0] == 0:
        raise ValueError(f"bootstrap_curve needs (units, G) values, got shape {y.shape}")
    boots = _boot_means(y, n_boot, seed)  # (n_boot, G)
    lo, hi = np.quantile(boots, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    return y.mean(axis=0), lo, hi


# ---------------------------------------------------------------------------------------------
# 4. Tests of paired differences, and Holm's correction for several of them
# ---------------------------------------------------------------------------------------------


def bootstrap_weights(units: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """Resample counts over `units` (n_boot, units): row b says how often each unit is in resample b."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(units, np.full(units, 1.0 / units), size=n_boot)


def sign_flip_p_value(d: np.ndarray, n_perm: int = N_BOOT, seed: int = 0) -> float:
    """Two-sided paired randomization test of 'mean d = 0' (Fisher): the share of sign flips s in {-1, 1}^n with
    |mean(s d)| >= |mean(d)|; all 2^n flips for n <= 16 (exact: with 4 pairs it is never below 2/16), else
    n_perm random ones, counted with the observed one ((hits + 1) / (n_perm + 1))."""
    d = np.asarray(d, np.float64)
    obs = abs(d.mean()) * (1 - 1e-12)  # ties count as "as extreme"
    if d.size <= 16:
        signs = 1 - 2 * ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1)  # (2^n, n)
        return float((np.abs(signs @ d) / d.size >= obs).mean())
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_perm, d.size))
    return float(((np.abs(signs @ d) / d.size >= obs).sum() + 1) / (n_perm + 1))


def paired_test(a: np.ndarray, b: np.ndarray, n_boot: int = N_BOOT, confidence: float = CONFIDENCE,
                seed: int = 0) -> tuple[Interval, float]:
    """Mean of a_i - b_i over paired units with its bootstrap CI (as `paired_difference`) and the sign-flip
    test's p-value (exact for few units, where a bootstrap p-value would be far too small)."""
    iv = paired_difference(a, b, n_boot, confidence, seed)  # checks the shapes (and a non-empty 1-D sample)
    return iv, sign_flip_p_value(np.asarray(a, np.float64) - np.asarray(b, np.float64), n_boot, seed)


def min_pairs_to_resolve(comparisons: int, confidence: float = CONFIDENCE) -> int:
    """The fewest pairs at which any one of `comparisons` Holm-corrected exact sign-flip tests can resolve.

    With n pairs the exact two-sided test's smallest p-value is 2 / 2^n (all differences of one sign);
    Holm multiplies the smallest p by m, so resolving needs m * 2^(1-n) <= alpha: below that n nothing
    can resolve, whatever the data (3 comparisons at 95%: 7 pairs)."""
    if comparisons < 1:
        raise ValueError(f"comparisons must be >= 1, got {comparisons}")
    alpha = 1.0 - confidence
    n = 1
    while comparisons * 2.0 ** (1 - n) > alpha * (1 + 1e-12):
        n += 1
    return n


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values: sorted p_(1) <= ... <= p_(m), adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    Reject H_i at level alpha iff adj_i <= alpha; controls the family-wise error rate. NaN stays NaN."""
    p = np.asarray(p, np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = order.size, 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * p[i]))
        out[i] = running
    return out


# ---------------------------------------------------------------------------------------------
# 5. Agreement of two rankings of the methods, unit by unit
# ---------------------------------------------------------------------------------------------


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b of two scorings of the same M items (M,): (C - D) / sqrt((n0 - tx)(n0 - ty)); NaN when
    either scoring ties every item."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    i, j = np.triu_indices(x.size, 1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])  # (M(M-1)/2,)
    den = np.sqrt(np.count_nonzero(sx) * np.count_nonzero(sy))
    return float((sx * sy).sum() / den) if den > 0 else float("nan")


def rank_agreement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """tau-b per unit between two (units, M) scorings of M methods (both oriented: higher = better) -> (units,)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"rank_agreement needs two (units, methods) arrays of one shape, got {x.shape}, {y.shape}")
    return np.array([kendall_tau_b(a, b) for a, b in zip(x, y)])


# ---------------------------------------------------------------------------------------------
# 6. Kernel Inception Distance (unbiased MMD^2, cubic polynomial kernel), with seed pairs as units
# ---------------------------------------------------------------------------------------------


def poly_kernel(a: np.ndarray, b: np.ndarray, gamma: float | None = None, coef: float = 1.0) -> np.ndarray:
    """k(a_i, b_j) = (gamma a_i . b_j + coef)^3, gamma = 1/D by default (KID's kernel): (n, D), (m, D) -> (n, m)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    g = 1.0 / a.shape[-1] if gamma is None else gamma
    return (g * a @ b.T + coef) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, gamma: float | None = None) -> float:
    """The usual unbiased KID of two independent samples x (n, D), y (m, D):
    sum_{i != j} k(x_i, x_j) / n(n-1) + sum_{i != j} k(y_i, y_j) / m(m-1) - 2 sum_{i, j} k(x_i, y_j) / nm."""
    kxx, kyy, kxy = poly_kernel(x, x, gamma), poly_kernel(y, y, gamma), poly_kernel(x, y, gamma)
    n, m = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def pair_kernel_means(a: np.ndarray, b: np.ndarray, gamma: float | None = None, chunk: int = 16) -> np.ndarray:
    """K[p, q] = mean over i, j of k(a[p, i], b[q, j]): a (P, F, D), b (P, G, D) -> (P, P), in chunks of pairs."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    P, G, D = b.shape
    g = 1.0 / D if gamma is None else gamma
    flat_b = b.reshape(P * G, D)  # (P G, D)
    out = np.empty((a.shape[0], P))
    for s in range(0, a.shape[0], chunk):
        blk = a[s:s + chunk]  # (c, F, D)
        k = (g * blk.reshape(-1, D).astype(np.float64) @ flat_b.T.astype(np.float64) + 1.0) ** 3  # (c F, P G)
        out[s:s + chunk] = k.reshape(blk.shape[0], blk.shape[1], P, G).mean(axis=(1, 3))
    return out


def kid_from_blocks(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, weights: np.ndarray | None = None
                    ) -> np.ndarray:
    """KID as a U-statistic over distinct seed pairs, from pair-block kernel means (P, P) (`pair_kernel_means`):

        KID = sum_{p != q} w_p w_q (Kxx[p,q] + Kyy[p,q] - 2 Kxy[p,q]) / sum_{p != q} w_p w_q

    Frames of one pair are never compared with each other (they share a walk, so they are not independent
    draws), neither within a set nor across the two; for independent units its expectation is the MMD^2
    of the two distributions, so an unshifted one centres on 0. weights (B, P): bootstrap counts (None: all
    ones) -> (B,); a resample holding a single distinct pair gives NaN."""
    w = np.ones((1, kxx.shape[0])) if weights is None else np.asarray(weights, np.float64)  # (B, P)
    k = kxx + kyy - kxy - kxy.T  # (P, P): symmetric, same U-statistic
    num = np.einsum("bp,pq,bq->b", w, k, w) - (w ** 2) @ np.diag(k)  # (B,)
    den = w.sum(1) ** 2 - (w ** 2).sum(1)  # (B,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def kid_swap_terms(kaa: np.ndarray, kbb: np.ndarray, kab: np.ndarray, kay: np.ndarray, kby: np.ndarray
                   ) -> np.ndarray:
    """Per-pair terms v (P,) of a paired KID difference, for the exact test of 'methods a and b are exchangeable
    within each pair': swapping a and b in the pairs where u_p = -1 turns KID_a - KID_b into

        D(u) = sum_p u_p v_p / (P (P - 1)),   v_p = sum_{q != p} (Kaa - Kbb + Kab - Kab^T - 2 (Kay - Kby))[p, q]

    (pair-block kernel means, `pair_kernel_means`; the endpoint term Kyy cancels), so the swap test is the
    sign-flip test on v, and D(1) = sum(v) / (P (P - 1)) is the observed difference."""
    k = kaa - kbb + kab - kab.T - 2 * (kay - kby)  # (P, P)
    return k.sum(1) - np.diag(k)  # (P,)


def kid_per_pair(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> np.ndarray:
    """Each pair's share h_p of the KID: h_p = mean_{q != p} (Kxx + Kyy - Kxy - Kxy^T)[p, q]; mean_p h_p = KID.
    For ranking methods pair by pair (its spread is not the KID's: use `kid_from_blocks` for intervals)."""
    k = kxx + kyy - kxy - kxy.T
    P = k.shape[0]
    return (k.sum(1) - np.diag(k)) / max(P - 1, 1)


def interval_from_boots(estimate: float, boots: np.ndarray, n: int, confidence: float = CONFIDENCE) -> Interval:
    """A percentile interval from bootstrap replicates (NaN replicates left out)."""
    b = np.asarray(boots, np.float64)
    b = b[np.isfinite(b)]
    lo, hi = np.quantile(b, [(1 - confidence) / 2, (1 + confidence) / 2]) if b.size else (np.nan, np.nan)
    return Interval(float(estimate), float(lo), float(hi), int(n), confidence)

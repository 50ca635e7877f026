"""Pure numpy metrics of interpolation walks: CLIPScore, InterpScore, smoothness, bootstrap CIs.

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

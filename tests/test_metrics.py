"""InterpScore, smoothness and bootstrap intervals against direct computations of their formulas."""

from __future__ import annotations

import numpy as np
import pytest

from hpcwalk.core import metrics

# hand-made embeddings (not unit length): a text vector and five frames of a walk
TEXT = np.array([2.0, 0.0, 0.0])
FRAMES = np.array([
    [1.0, 0.0, 0.0],   # cos 1
    [3.0, 4.0, 0.0],   # cos 0.6
    [0.0, 0.0, 5.0],   # cos 0
    [-1.0, 1.0, 0.0],  # cos -0.7071 -> clamped to 0
    [1.0, 1.0, 1.0],   # cos 0.5774
])


def _study_formula(text: np.ndarray, frames: np.ndarray) -> float:
    """InterpScore(f, text, n) = 1/n sum_gamma max(100 * z_text . E(x) / (|z_text| |E(x)|), 0), term by term."""
    total = 0.0
    for x in frames:
        total += max(100.0 * float(np.dot(text, x)) / (np.linalg.norm(text) * np.linalg.norm(x)), 0.0)
    return total / len(frames)


def _torchmetrics_clip_score(text: np.ndarray, frames: np.ndarray) -> float:
    """torchmetrics' formula (src/torchmetrics/functional/multimodal/clip_score.py: _clip_score_update
    normalizes both features and takes score = 100 * (img * txt).sum(-1); clip_score then returns
    max(score.mean(0), 0)), written out on the same embeddings (torchmetrics is not a dependency)."""
    img = frames / np.linalg.norm(frames, axis=-1, keepdims=True)
    txt = text / np.linalg.norm(text)
    score = 100 * (img * txt).sum(-1)
    return max(float(score.mean(0)), 0.0)


def test_clip_score_values_and_clamp():
    s = metrics.clip_score(TEXT, FRAMES)
    assert s == pytest.approx([100.0, 60.0, 0.0, 0.0, 100 / np.sqrt(3)])
    assert (s >= 0).all() and s[3] == 0.0  # negative cosine clamped to 0, not negative


def test_interp_score_equals_the_study_formula():
    assert metrics.interp_score(TEXT, FRAMES) == pytest.approx(_study_formula(TEXT, FRAMES), rel=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(20):
        t, x = rng.normal(size=16), rng.normal(size=(9, 16))
        assert metrics.interp_score(t, x) == pytest.approx(_study_formula(t, x), rel=1e-12)


def test_interp_score_agrees_with_torchmetrics_formula_where_no_cosine_is_negative():
    nonneg = np.delete(FRAMES, 3, axis=0)
    assert metrics.interp_score(TEXT, nonneg) == pytest.approx(_torchmetrics_clip_score(TEXT, nonneg), rel=1e-12)
    # torchmetrics clamps the mean, the study clamps every frame: with a negative cosine they differ
    assert metrics.interp_score(TEXT, FRAMES) > _torchmetrics_clip_score(TEXT, FRAMES)


def test_smoothness_of_a_hand_made_walk():
    # unit vectors at angles 0, 10, 30, 60 degrees in a plane: steps 1 - cos(10), 1 - cos(20), 1 - cos(30)
    ang = np.deg2rad([0, 10, 30, 60])
    emb = np.stack([np.cos(ang), np.sin(ang), np.zeros(4)], axis=1) * [[1], [2], [3], [4]]  # norms must not matter
    steps = 1 - np.cos(np.deg2rad([10, 20, 30]))
    sm = metrics.smoothness(emb)
    assert metrics.step_distances(emb) == pytest.approx(steps)
    assert sm.path_length == pytest.approx(steps.sum())
    assert sm.max_step == pytest.approx(steps.max())
    assert sm.step_cv == pytest.approx(steps.std() / steps.mean())
    even = metrics.smoothness(np.stack([np.cos(np.deg2rad([0, 10, 20])), np.sin(np.deg2rad([0, 10, 20]))], 1))
    assert even.step_cv == pytest.approx(0.0, abs=1e-9)  # an even pace has no spread
    with pytest.raises(ValueError, match="at least 2 frames"):
        metrics.smoothness(emb[:1])


def test_linear_norm_ratio():
    assert metrics.linear_norm_ratio([0, 0.5, 1]) == pytest.approx([1, np.sqrt(0.5), 1])


def test_bootstrap_ci_matches_scipy_percentile_bootstrap():
    import scipy.stats as scipy_stats  # dev extra

    x = np.random.default_rng(3).normal(2.0, 1.0, 40)
    ours = metrics.bootstrap_ci(x, n_boot=20_000)
    ref = scipy_stats.bootstrap((x,), np.mean, n_resamples=20_000, method="percentile", random_state=0)
    assert ours.estimate == pytest.approx(x.mean())
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.02)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.02)


def test_paired_bootstrap_covers_a_known_difference_about_95_percent_of_the_time():
    """400 synthetic studies of 40 seed pairs with a true mean difference of 0.8 and a per-pair
    effect shared by both methods: the 95% interval must cover 0.8 in 95% +- 3.5% of them
    (binomial sd at 400 trials is 1.1%; the percentile bootstrap under-covers slightly at n = 40)."""
    rng = np.random.default_rng(12345)
    trials, n, delta = 400, 40, 0.8
    covered = 0
    for t in range(trials):
        pair_effect = rng.normal(25.0, 3.0, n)  # shared by both methods: pairing removes it
        a = pair_effect + delta + rng.normal(0, 1.0, n)
        b = pair_effect + rng.normal(0, 1.0, n)
        covered += metrics.paired_difference(a, b, n_boot=2000, seed=t).covers(delta)
    rate = covered / trials
    print(f"coverage {rate:.3f} over {trials} trials")
    assert abs(rate - 0.95) <= 0.035


def test_bootstrap_curve_band_contains_the_mean_and_narrows_with_more_units():
    rng = np.random.default_rng(0)
    few = rng.normal(size=(10, 7)) + np.linspace(0, 1, 7)
    many = rng.normal(size=(1000, 7)) + np.linspace(0, 1, 7)
    m, lo, hi = metrics.bootstrap_curve(few, n_boot=2000)
    assert m == pytest.approx(few.mean(0)) and (lo <= m).all() and (m <= hi).all()
    _, lo2, hi2 = metrics.bootstrap_curve(many, n_boot=2000)
    assert ((hi2 - lo2) < (hi - lo)).all()


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        metrics.bootstrap_ci(np.array([]))
    with pytest.raises(ValueError):
        metrics.paired_difference(np.ones(3), np.ones(4))
    with pytest.raises(ValueError):
        metrics.bootstrap_curve(np.ones(3))


def test_min_pairs_to_resolve_matches_exact_test_and_holm():
    import numpy as _np
    from hpcwalk.core import metrics as _m
    assert _m.min_pairs_to_resolve(3) == 7
    assert _m.min_pairs_to_resolve(1) == 6
    for m in (1, 3):
        n = _m.min_pairs_to_resolve(m)
        best = lambda k: _m.holm(_np.full(m, _m.sign_flip_p_value(_np.arange(1.0, k + 1)))).min()
        assert best(n) <= 0.05 < best(n - 1)

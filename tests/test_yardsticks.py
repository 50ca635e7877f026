"""Each yardstick beyond CLIP against an independent computation on hand-made images or features:
scikit-image and scipy (sharpness, SSIM), torchmetrics (LPIPS, KID's kernel), scipy (Kendall's tau), the
definitions (Holm, the sign-flip test, the pair-wise KID); and KID's interval on known shifts, in the
metric and through a synthetic study."""

from __future__ import annotations

import itertools
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcwalk.core import metrics
from hpcwalk.render.framestats import sharpness
from hpcwalk.analyse.pixelsteps import LpipsLoadError, backbone_file, check_lpips, load_lpips, lpips_distance, ssim

ROOT = Path(__file__).resolve().parent.parent


def _images(n: int, h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    """Hand-made frames: smooth gradients, a bright square, a little noise (uint8, (n, h, w, 3))."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    out = []
    for k in range(n):
        img = np.stack([x * 255 / w, y * 255 / h, np.full((h, w), 40.0 * k)], -1)
        img[10 + k:22 + k, 8:20] = 230
        out.append(np.clip(img + rng.normal(0, 6, img.shape), 0, 255))
    return np.asarray(out, np.uint8)


def test_sharpness_is_the_variance_of_the_laplacian_and_blur_lowers_it():
    from scipy import ndimage
    from skimage.color import rgb2gray
    from skimage.filters import gaussian, laplace

    imgs = _images(3)
    ours = sharpness(torch.from_numpy(imgs)).numpy()
    for img, s in zip(imgs, ours):
        y = rgb2gray(img) * 255  # BT.709 luma on 0..255
        assert s == pytest.approx(laplace(y, ksize=3)[1:-1, 1:-1].var(), rel=1e-5)  # interior pixels
        assert s == pytest.approx(ndimage.laplace(y)[1:-1, 1:-1].var(), rel=1e-5)
    blurred = (gaussian(imgs[0], sigma=1.5, channel_axis=-1, preserve_range=True)).round().astype(np.uint8)
    sb = sharpness(torch.from_numpy(blurred[None])).item()
    print(f"sharpness {ours[0]:.1f} -> blurred {sb:.1f}")
    assert sb < 0.5 * ours[0]
    with pytest.raises(ValueError, match="at least 3x3"):
        sharpness(torch.zeros(1, 2, 5, 3, dtype=torch.uint8))


def test_ssim_equals_scikit_image():
    from skimage.metrics import structural_similarity

    a = _images(3, seed=1)
    b = np.clip(a.astype(int) + np.random.default_rng(2).integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    ours = ssim(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    ref = [structural_similarity(x, y, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False) for x, y in zip(a, b)]
    assert ours == pytest.approx(ref, abs=1e-5)
    assert ssim(torch.from_numpy(a), torch.from_numpy(a)).numpy() == pytest.approx(1.0, abs=1e-6)


@pytest.fixture()
def torch_home(tmp_path, monkeypatch):
    """A torch hub cache holding a random AlexNet in torchvision's file name, as a download would leave it."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = backbone_file("alex")
    assert path.startswith(str(tmp_path)) and path.endswith("alexnet-owt-7be5be79.pth")
    with pytest.raises(LpipsLoadError, match="not in the local cache"):
        check_lpips("alex")
    torch.manual_seed(3)
    state = torchvision.models.alexnet(weights=None).state_dict()
    # LPIPS never runs the classifier: its 58M weights are stored as a broadcast zero (a tiny file, still
    # loaded by torchvision's strict load_state_dict); the convolutional backbone is random
    state = {k: (torch.zeros(1).expand(v.shape) if k.startswith("classifier") else v) for k, v in state.items()}
    Path(path).parent.mkdir(parents=True)
    torch.save(state, path)
    return path


def test_lpips_from_the_cache_equals_torchmetrics(torch_home):
    """lpips (our LPIPS) and torchmetrics' LPIPS both load the cached backbone; same distances."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    a, b = (torch.from_numpy(_images(2, 64, 64, seed=s)) for s in (4, 5))
    ours = lpips_distance(load_lpips("alex"), a, b)
    tm = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none")
    ref = tm(a.permute(0, 3, 1, 2).float() / 127.5 - 1, b.permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert ours.numpy() == pytest.approx(ref.detach().numpy().reshape(-1), rel=1e-4, abs=1e-6)
    assert lpips_distance(load_lpips("alex"), a, a).abs().max() < 1e-6


def test_study_refuses_uncached_lpips_with_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from hpcwalk.cli import app

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    text = (ROOT / "examples" / "study.toml").read_text().replace('lpips = "auto"', 'lpips = "alex"')
    (tmp_path / "s.toml").write_text(text)
    res = CliRunner().invoke(app, ["study", str(tmp_path / "s.toml"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert "LPIPS weights (alex: torchvision alexnet-owt-7be5be79.pth) are not in the local cache" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_study_refuses_frames_too_small_for_lpips_with_one_line(tmp_path):
    """AlexNet's pooling leaves no pixel of a 24x24 frame (it needs 31): refused before any work, not a
    RuntimeError from the backbone after the whole render."""
    import re

    from typer.testing import CliRunner

    from hpcwalk.cli import app

    text = (ROOT / "examples" / "study.toml").read_text()
    text = re.sub(r"(?m)^height = \d+", "height = 24", re.sub(r"(?m)^width = \d+", "width = 24", text))
    (tmp_path / "s.toml").write_text(text)
    res = CliRunner().invoke(app, ["study", str(tmp_path / "s.toml"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert "must be >= 31 for [study] lpips = 'alex-random'" in res.output and 'lpips = "none"' in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_kid_kernel_and_unbiased_mmd_equal_torchmetrics():
    from torchmetrics.image.kid import poly_kernel, poly_mmd

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 6)), rng.normal(0.3, 1, size=(30, 6))  # torchmetrics assumes equal sizes
    assert metrics.poly_kernel(x, y) == pytest.approx(poly_kernel(torch.tensor(x), torch.tensor(y)).numpy())
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(float(poly_mmd(torch.tensor(x), torch.tensor(y))), rel=1e-9)


def test_pairwise_kid_equals_its_definition_term_by_term():
    """The U-statistic over distinct pairs (frames of one pair never compared), by a direct loop."""
    rng = np.random.default_rng(1)
    P, F, G, D = 5, 3, 2, 4
    x, r = rng.normal(size=(P, F, D)), rng.normal(size=(P, G, D))
    k = lambda a, b: (a @ b / D + 1) ** 3  # noqa: E731
    terms = [np.mean([k(a, b) for a in x[p] for b in x[q]]) + np.mean([k(a, b) for a in r[p] for b in r[q]])
             - np.mean([k(a, b) for a in x[p] for b in r[q]]) - np.mean([k(a, b) for a in r[p] for b in x[q]])
             for p, q in itertools.permutations(range(P), 2)]
    kxx, kyy, kxy = (metrics.pair_kernel_means(a, b) for a, b in ((x, x), (r, r), (x, r)))
    assert metrics.kid_from_blocks(kxx, kyy, kxy)[0] == pytest.approx(np.mean(terms), rel=1e-6)  # float32 kernels
    assert metrics.kid_per_pair(kxx, kyy, kxy).mean() == pytest.approx(np.mean(terms), rel=1e-6)
    w = np.array([[2, 0, 1, 1, 1], [5, 0, 0, 0, 0]])  # pair 0 twice: never compared with itself
    got = metrics.kid_from_blocks(kxx, kyy, kxy, w)
    pq = [(p, q) for p, q in itertools.permutations(range(P), 2)]
    kk = kxx + kyy - kxy - kxy.T
    want = sum(w[0, p] * w[0, q] * kk[p, q] for p, q in pq) / sum(w[0, p] * w[0, q] for p, q in pq)
    assert got[0] == pytest.approx(want) and math.isnan(got[1])  # one distinct pair: undefined


def _kid_interval(shift: float, seed: int) -> metrics.Interval:
    rng = np.random.default_rng(seed)
    P, F, G, D = 40, 4, 2, 8
    r = rng.normal(size=(P, G, D))
    x = rng.normal(size=(P, F, D)) + shift * np.eye(D)[0]  # a known shift along one axis, or none
    kxx, kyy, kxy = (metrics.pair_kernel_means(a, b) for a, b in ((x, x), (r, r), (x, r)))
    boots = metrics.kid_from_blocks(kxx, kyy, kxy, metrics.bootstrap_weights(P, 2000, seed))
    return metrics.interval_from_boots(float(metrics.kid_from_blocks(kxx, kyy, kxy)[0]), boots, P)


def test_kid_interval_excludes_zero_for_a_known_shift_and_covers_it_without_one():
    shifted, equal = _kid_interval(1.5, 0), _kid_interval(0.0, 0)
    print(f"KID shifted {shifted}, equal {equal}")
    assert shifted.low > 0
    assert equal.covers(0.0)
    covered = sum(_kid_interval(0.0, s).covers(0.0) for s in range(1, 21))
    assert covered >= 16  # 95% intervals on 20 unshifted samples: binomial(20, 0.95) >= 16 with prob. 0.997


def test_holm_and_the_sign_flip_test_against_their_definitions():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.06 (running max)
    assert metrics.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert (metrics.holm(p) <= 0.05).tolist() == [True, False, False, True]
    assert np.isnan(metrics.holm(np.array([0.2, np.nan]))[1])
    # sign flips: 4 positive differences -> only the two all-same-sign flips are as extreme: 2/16
    assert metrics.sign_flip_p_value(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(2 / 16)
    d = np.random.default_rng(0).normal(0.2, 1, 12)
    flips = np.array(list(itertools.product([-1, 1], repeat=12)))
    assert metrics.sign_flip_p_value(d) == pytest.approx((np.abs(flips @ d) >= abs(d.sum()) - 1e-12).mean())


def test_kendall_tau_b_equals_scipy():
    from scipy.stats import kendalltau

    rng = np.random.default_rng(0)
    for _ in range(30):
        x, y = rng.integers(0, 3, 3).astype(float), rng.normal(size=3)
        ref = kendalltau(x, y).statistic
        ours = metrics.kendall_tau_b(x, y)
        assert (math.isnan(ours) and math.isnan(ref)) or ours == pytest.approx(ref)
    assert metrics.rank_agreement(np.array([[1, 2, 3]]), np.array([[3, 2, 1]])).tolist() == [-1.0]


def _synthetic_study(pairs: int, shift: dict[str, float], seed: int = 0):
    """A study's frames without rendering: CLIP and encoder features, interior frames shifted per method
    (the study's methods are the keys of `shift`)."""
    import pyarrow as pa

    from hpcwalk.job.studyspec import parse_study

    data = tomllib.loads((ROOT / "examples" / "study.toml").read_text())
    data["study"].update(pairs=pairs, frames=7, bootstrap=1000, bins=3, methods=list(shift))
    st = parse_study(data)
    rng = np.random.default_rng(seed)
    D = 16
    rows, feats = [], {"clip_image": [], "encoder_image": []}
    for name, pair, _ in st.spec.units():
        ends = rng.normal(size=(2, D))
        for j, m in enumerate(st.spec.methods):
            for i in range(7):
                rows.append({"walk": name, "method": m, "index": i, "latent_norm": 1.0, "sharpness": 100.0 - j + pair + (rng.normal() if shift.get("slerp", 0) >= 0 else 0),
                             "clip_score": float(20 + j + rng.normal())})
                for col in feats:
                    v = ends[0] if i == 0 else ends[1] if i == 6 else rng.normal(size=D) + shift[m] * np.eye(D)[0]
                    feats[col].append(v / np.linalg.norm(v))
    t = pa.Table.from_pylist(rows)
    for col, v in feats.items():
        t = t.append_column(col, pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(v, np.float16).reshape(-1)), D))
    return st, t


def test_synthetic_study_kid_sees_a_known_shift_and_the_report_says_so():
    from hpcwalk.analyse.interpscore import summarize, walk_table

    st, frames = _synthetic_study(30, {"linear": 2.0, "normalized": 0.0, "slerp": 0.0})
    walks = walk_table(st, frames)
    meta = {"clip_model": "m/openai", "encoder_model": "dino", "model_id": "real", "lpips": "alex"}
    s = summarize(st, frames, walks, meta)
    for prefix in ("clip", "encoder"):
        y = s["yardsticks"][f"kid_{prefix}"]
        assert y["per_method"]["linear"]["low"] > 0  # shifted: interval excludes 0
        assert y["per_method"]["normalized"]["low"] <= 0 <= y["per_method"]["normalized"]["high"]  # equal: covers 0
        assert y["ranking"][-1] == "linear"
        assert y["paired"]["linear - normalized"]["resolved"] and not y["paired"]["normalized - slerp"]["resolved"]
        assert len(s["kid"][prefix]["bins"]) == 3
    assert s["yardsticks"]["interp_score"]["ranking"] == ["slerp", "normalized", "linear"]
    assert s["yardsticks"]["sharpness"]["ranking"] == ["linear", "normalized", "slerp"]
    a = s["answer"]
    assert "KID (dino features): " in a and "> linear, resolved: linear vs normalized (normalized better" in a
    assert "disagrees with sharpness (Kendall's tau -" in a and "agrees with KID (dino features)" in a
    assert a.endswith("CLIP disagrees with at least one other yardstick: its ranking is not the others'.")
    assert s["warnings"] == [] and s["random_weights"] == []
    st4, f4 = _synthetic_study(4, {"linear": 0.0, "normalized": 0.0, "slerp": -0.0 - 1e-9})  # exact sharpness
    few = summarize(st4, f4, walk_table(st4, f4), {**meta, "clip_model": "tiny-clip/none"})
    assert any("Only 4 seed pairs" in w and "35 distinct resamples" in w for w in few["warnings"])
    assert any("Random weights: CLIP tiny-clip/none" in w for w in few["warnings"])
    assert any("are degenerate (zero width or undefined): yardsticks/sharpness/paired/linear - normalized" in w
               for w in few["warnings"])  # every pair differs by exactly 1: a zero-width interval


def test_kid_differences_of_three_pairs_are_never_resolved():
    """3 pairs: all 8 sign flips of the per-pair KID shares are possible, so no p-value is below 2/8; the
    percentile bootstrap's p-value of 0 (its 10 distinct resamples on one side of 0) called this 'resolved'."""
    from hpcwalk.analyse.interpscore import summarize, walk_table

    st, frames = _synthetic_study(3, {"linear": 3.0, "normalized": 0.0, "slerp": 0.0})
    s = summarize(st, frames, walk_table(st, frames), {"clip_model": "m/openai", "encoder_model": "dino",
                                                       "model_id": "real", "lpips": "alex"})
    for prefix in ("clip", "encoder"):
        for name, test in s["yardsticks"][f"kid_{prefix}"]["paired"].items():
            assert test["p"] >= 0.25 and not test["resolved"], (prefix, name, test)


def test_kid_swap_terms_give_every_swapped_difference():
    """D(u) = u . v / (P (P - 1)) equals KID_a - KID_b recomputed after swapping the methods' frames in the pairs
    where u = -1, for all 2^P swaps: the sign-flip test on v is the exact within-pair swap test."""
    import itertools

    from hpcwalk.core import metrics

    rng = np.random.default_rng(0)
    P, F, D = 5, 3, 4
    a, b, y = rng.normal(size=(P, F, D)), rng.normal(size=(P, F, D)) + 0.3, rng.normal(size=(P, 2, D))
    pk = lambda x, z: metrics.pair_kernel_means(x, z, gamma=1.0)  # noqa: E731
    kid = lambda x: metrics.kid_from_blocks(pk(x, x), pk(y, y), pk(x, y))[0]  # noqa: E731
    v = metrics.kid_swap_terms(pk(a, a), pk(b, b), pk(a, b), pk(a, y), pk(b, y))
    for u in itertools.product([1, -1], repeat=P):
        swap = (np.array(u) < 0)[:, None, None]
        assert kid(np.where(swap, b, a)) - kid(np.where(swap, a, b)) == pytest.approx(np.dot(u, v) / (P * (P - 1)), abs=1e-9)


def test_a_one_method_study_and_every_random_built_in_are_reported():
    """One method: nothing to compare, but the analysis runs (KID's comparison list is empty: it raised
    StopIteration); tiny-v and sd21-random are random-weight models like tiny and sd14-random."""
    from hpcwalk.analyse.interpscore import summarize, walk_table

    st, frames = _synthetic_study(5, {"slerp": 0.0})
    for model in ("tiny-v", "sd21-random"):
        s = summarize(st, frames, walk_table(st, frames), {"clip_model": "m/openai", "encoder_model": "dino",
                                                           "model_id": model, "lpips": "alex"})
        assert s["yardsticks"]["kid_clip"]["paired"] == {} and "KID (CLIP features): slerp" in s["answer"]
        assert any(f"Random weights: the Stable Diffusion model ({model})" in w for w in s["warnings"])


def test_agreement_of_two_pairs_is_never_resolved_by_a_degenerate_interval():
    import numpy as _np
    from hpcwalk.analyse import yardsticks as _y
    clip = {"a": _np.array([1.0, 1.0]), "b": _np.array([0.0, 0.0]), "c": _np.array([-1.0, -1.0])}
    other = {m: -v for m, v in clip.items()}  # opposite ranking in both pairs: tau = -1, -1
    v = _y.agreement(clip, other, "higher", 200, 0.95)
    assert v["verdict"] == "not resolved" and v["p"] > 0.05


def test_answer_states_the_minimum_number_of_pairs():
    from hpcwalk.analyse import yardsticks as _y
    ys = {"clip": {"label": "CLIP", "ranking": ["a", "b", "c"], "better": "higher",
                   "paired": {k: {"resolved": False} for k in ("a - b", "a - c", "b - c")}}}
    assert _y.answer(ys, 5, 0.95).startswith("With 5 seed pairs nothing can resolve")
    assert "at least 7 pairs" in _y.answer(ys, 2, 0.95)
    assert not _y.answer(ys, 40, 0.95).startswith("With")

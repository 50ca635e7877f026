"""Tests for hpcwalk.render.interp: exact endpoints, distributional properties, operators, dispatch."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from hpcwalk.job.spec import METHODS, TEXT_METHODS
from hpcwalk.render.interp import SLERP_DOT_THRESHOLD, interpolate, interpolate_text, keyframe_walk, lerp, mix, normalized_lerp, scale_std, segment_gammas, slerp, translate

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(3, 5, 7), (1, 4, 9, 11), (4, 8, 8), (77, 768)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _pair(shape, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return a, b


# ------------------------------------------------------------------ exact endpoints

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_interpolate_endpoints_exact(method, shape, dtype, device):
    a, b = _pair(shape, dtype, device=device)
    out = interpolate(method, a, b, [0.0, 0.25, 0.5, 1.0])
    assert out.shape == (4, *shape) and out.dtype == dtype and out.device == a.device
    assert torch.equal(out[0], a) and torch.equal(out[3], b)
    assert torch.isfinite(out).all()


def test_endpoints_exact_with_signed_zero_and_gamma_tensor():
    a = torch.tensor([-0.0, 1.0, -2.0, 0.0])
    b = torch.tensor([0.0, -0.0, 3.0, -0.0])
    for method in METHODS:
        out = interpolate(method, a, b, torch.tensor([0.0, 1.0], dtype=torch.float64))
        assert torch.equal(out[0].view(torch.int32), a.view(torch.int32))
        assert torch.equal(out[1].view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES[:3])
@pytest.mark.parametrize("shape", [(77, 16), (2, 77, 16)])
@pytest.mark.parametrize("method", TEXT_METHODS)
def test_interpolate_text_endpoints_exact(method, shape, dtype):
    a, b = _pair(shape, dtype, seed=1)
    out = interpolate_text(method, a, b, [0.0, 0.5, 1.0])
    assert out.shape == (3, *shape) and out.dtype == dtype
    assert torch.equal(out[0], a) and torch.equal(out[2], b)


@pytest.mark.parametrize("dtype", DTYPES[:3])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 4, 9, 11)])
@pytest.mark.parametrize("method", METHODS)
def test_keyframe_walk_integer_u_gives_keys(method, shape, dtype):
    keys = torch.randn(4, *shape).to(dtype)
    out = keyframe_walk(keys, [0, 1, 2, 3, 0.5, 2.5], method)
    assert out.shape == (6, *shape) and out.dtype == dtype
    for k in range(4):
        assert torch.equal(out[k], keys[k])


@pytest.mark.parametrize("dtype", DTYPES[:3])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 4, 9, 11)])
def test_translate_and_mix_endpoints_exact(shape, dtype):
    z0, z1 = _pair(shape, dtype, seed=2)
    W = shape[-1]
    for op in (translate, mix):
        out = op(z0, z1, [0, W // 2, W])
        assert out.shape == (3, *shape) and out.dtype == dtype
        assert torch.equal(out[0], z0) and torch.equal(out[2], z1)


# --------------------------------------------------------- distributional properties

def test_normalized_lerp_keeps_unit_variance():
    n = 1_000_000
    a, b = _pair((n,), seed=3)
    gammas = torch.linspace(0, 1, 11)
    var = normalized_lerp(a, b, gammas).var(dim=1)
    # The standard error of a sample variance of n iid N(0,1) is sqrt(2/n) ~ 0.0014 for
    # n = 1e6, so a tolerance of 0.01 is ~7 sigma: it never flakes, yet catches any real
    # shrinkage (plain lerp drops to 0.5 at gamma = 0.5).
    assert torch.all((var - 1).abs() < 0.01), var
    # plain lerp follows the study's Var = gamma (2 gamma - 2) + 1 = gamma^2 + (1 - gamma)^2
    lin_var = lerp(a, b, gammas).var(dim=1)
    expected = gammas * (2 * gammas - 2) + 1
    assert torch.all((lin_var - expected).abs() < 0.01), (lin_var, expected)
    assert abs(float(lin_var[5]) - 0.5) < 0.01


def test_slerp_keeps_norm_for_equal_norm_endpoints():
    a, b = _pair((4, 64, 64), seed=4)
    b = b * (a.norm() / b.norm())
    out = slerp(a, b, torch.linspace(0, 1, 21))
    norms = out.flatten(1).norm(dim=1)
    assert torch.allclose(norms, a.norm().expand(21), rtol=1e-4, atol=0)


def test_slerp_nearly_parallel_falls_back_to_lerp():
    a, _ = _pair((4, 16, 16), seed=5)
    b = a + 1e-6 * torch.randn_like(a)
    gammas = torch.linspace(0, 1, 9)
    out = slerp(a, b, gammas)
    assert torch.isfinite(out).all()
    assert torch.equal(out, lerp(a, b, gammas))
    # identical, anti-parallel and zero endpoints do not produce NaN either
    for bb in (a.clone(), -a, torch.zeros_like(a)):
        out = slerp(a, bb, gammas)
        assert torch.isfinite(out).all()
        assert torch.allclose(out, lerp(a, bb, gammas), atol=1e-6)


def test_slerp_threshold_is_a_cosine_cut():
    a = torch.tensor([1.0, 0.0])
    below = torch.tensor([math.cos(0.1), math.sin(0.1)])  # cos = 0.995 < threshold
    assert math.cos(0.1) < SLERP_DOT_THRESHOLD
    mid = slerp(a, below, [0.5])[0]
    assert torch.allclose(mid, torch.tensor([math.cos(0.05), math.sin(0.05)]), atol=1e-6)
    # same pair with a threshold below its cosine takes the lerp branch
    assert torch.equal(slerp(a, below, [0.5], dot_threshold=0.99), lerp(a, below, [0.5]))


def test_slerp_per_token_equals_tokenwise_slerp():
    a, b = _pair((77, 16), seed=6)
    b[0] = a[0]  # SD's BOS token is the same for every prompt: per-token fallback
    b[1] = 1e-3 * a[1] + 1e-9
    gammas = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    out = slerp(a, b, gammas, dim=-1)
    assert out.shape == (5, 77, 16) and torch.isfinite(out).all()
    assert torch.equal(out, interpolate_text("slerp", a, b, gammas))
    for i in range(77):
        ref = slerp(a[i], b[i], gammas)  # (5, 16), one angle for the lone vector
        torch.testing.assert_close(out[:, i], ref, rtol=1e-6, atol=1e-6)
    # the per-token walk differs from a single whole-tensor angle
    assert not torch.allclose(out, slerp(a, b, gammas), atol=1e-4)


def test_slerp_dim_out_of_range():
    a, b = _pair((3, 4))
    with pytest.raises(ValueError):
        slerp(a, b, [0.5], dim=2)


# ----------------------------------------------------------- translation and mixing

@pytest.mark.parametrize("shape", [(4, 8, 8), (1, 4, 9, 11), (5,)])
def test_translate_matches_literal_slicing(shape):
    z0, z1 = _pair(shape, seed=7)
    W = shape[-1]
    ts = list(range(W + 1))
    out = translate(z0, z1, ts)
    z_cat = torch.cat((z0, z1), dim=-1)
    for t in ts:
        assert torch.equal(out[t], z_cat[..., t:t + W])
    assert torch.equal(translate(z0, z1, torch.tensor([3]))[0], z_cat[..., 3:3 + W])


@pytest.mark.parametrize("shape", [(4, 8, 8), (1, 4, 9, 11), (5,)])
def test_mix_matches_hand_concatenation(shape):
    z0, z1 = _pair(shape, seed=8)
    W = shape[-1]
    ts = list(range(W + 1))
    out = mix(z0, z1, ts)
    for t in ts:
        assert torch.equal(out[t], torch.cat((z1[..., :t], z0[..., t:]), dim=-1))
    # unlike translate, columns stay in place: column j is z_end's iff j < t
    t = W // 2
    assert torch.equal(out[t][..., t - 1], z1[..., t - 1])
    assert torch.equal(out[t][..., t], z0[..., t])


@pytest.mark.parametrize("op", [translate, mix])
def test_translate_mix_reject_bad_t(op):
    z0, z1 = _pair((4, 8, 8))
    for bad in ([-1], [9], [0, 3, 9], torch.tensor([-1])):
        with pytest.raises(ValueError):
            op(z0, z1, bad)
    with pytest.raises(ValueError):
        op(z0, z1, [0.5])


def test_scale_std():
    z = torch.randn(4, 8, 8, dtype=torch.float16)
    out = scale_std(z, [0.5, 1.0, 1.5])
    assert out.shape == (3, 4, 8, 8) and out.dtype == torch.float16
    assert torch.equal(out[1], z)
    torch.testing.assert_close(out[2], (1.5 * z.float()).half())


# ---------------------------------------------- shapes, dtypes and batch invariance

@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),
    gammas=st.lists(st.floats(0, 1, width=32), min_size=1, max_size=24),
    method=st.sampled_from(METHODS),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_batch_invariance_shape_dtype(shape, gammas, method, dtype, seed):
    a, b = _pair(shape, dtype, seed=seed)
    g = torch.tensor(gammas)
    out = interpolate(method, a, b, g)
    assert out.shape == (len(gammas), *shape) and out.dtype == dtype
    assert torch.isfinite(out).all()
    for i in range(len(gammas)):
        assert torch.equal(out[i], interpolate(method, a, b, g[i:i + 1])[0])
        if gammas[i] == 0.0:
            assert torch.equal(out[i], a)
        if gammas[i] == 1.0:
            assert torch.equal(out[i], b)


def test_batch_invariance_long_walk():
    a, b = _pair((4, 8, 8), seed=9)
    g = torch.rand(100, generator=torch.Generator().manual_seed(0))
    for method in METHODS:
        out = interpolate(method, a, b, g)
        for i in range(0, 100, 7):
            assert torch.equal(out[i], interpolate(method, a, b, g[i:i + 1])[0])


# ---------------------------------------------------------------- keyframe walks

@pytest.mark.parametrize("method", METHODS)
def test_keyframe_walk_matches_segments(method):
    keys = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(10))
    local = torch.linspace(0, 1, 9)
    first = keyframe_walk(keys, local, method)
    second = keyframe_walk(keys, local + 1, method)
    torch.testing.assert_close(first, interpolate(method, keys[0], keys[1], local),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(second, interpolate(method, keys[1], keys[2], (local + 1) - 1),
                               rtol=1e-6, atol=1e-6)
    # one call over u in [0, 2] is the concatenation of both segments
    both = keyframe_walk(keys, torch.cat((local, local[1:] + 1)), method)
    torch.testing.assert_close(both, torch.cat((first, second[1:])), rtol=0, atol=0)


def test_keyframe_walk_rejects_single_key_and_bad_method():
    with pytest.raises(ValueError):
        keyframe_walk(torch.randn(1, 4, 8, 8), [0.0], "linear")
    with pytest.raises(ValueError, match="linear, normalized, slerp"):
        keyframe_walk(torch.randn(2, 4), [0.0], "cubic")


def test_segment_gammas():
    seg, gamma = segment_gammas(5, 3)
    assert seg.dtype == torch.long and gamma.dtype == torch.float64
    assert seg.shape == gamma.shape == (3 * 4 + 1,)
    assert seg.tolist() == [0] * 4 + [1] * 4 + [2] * 5
    assert gamma[:5].tolist() == [0.0, 0.25, 0.5, 0.75, 0.0]  # frame 4 starts segment 1
    assert gamma[-1] == 1.0 and gamma[0] == 0.0
    torch.testing.assert_close(seg + gamma, torch.linspace(0, 3, 13, dtype=torch.float64))
    seg, gamma = segment_gammas(2, 1)
    assert seg.tolist() == [0, 0] and gamma.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError):
        segment_gammas(1, 3)
    # planned u feeds keyframe_walk and hits every keyframe exactly
    keys = torch.randn(4, 3, 5)
    seg, gamma = segment_gammas(4, 3)
    out = keyframe_walk(keys, seg + gamma, "slerp")
    for k in range(4):
        assert torch.equal(out[3 * k], keys[k])


# ------------------------------------------------------------------------ dispatch

def test_unknown_method_lists_valid_ones():
    a, b = _pair((4, 4))
    with pytest.raises(ValueError, match="linear, normalized, slerp"):
        interpolate("cubic", a, b, [0.5])
    with pytest.raises(ValueError, match="linear, slerp"):
        interpolate_text("normalized", a, b, [0.5])


def test_dispatch_and_mismatched_shapes():
    a, b = _pair((4, 4))
    g = [0.3]
    assert torch.equal(interpolate("linear", a, b, g), lerp(a, b, g))
    assert torch.equal(interpolate("normalized", a, b, g), normalized_lerp(a, b, g))
    assert torch.equal(interpolate("slerp", a, b, g), slerp(a, b, g))
    assert torch.equal(interpolate_text("linear", a, b, g), lerp(a, b, g))
    with pytest.raises(ValueError):
        lerp(a, b[:3], g)

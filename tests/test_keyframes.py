"""hpcwalk.job.plan: (segment, local gamma) rows of a keyframe walk, cut as job.plan cuts latent walks."""

from __future__ import annotations

import pytest

from hpcwalk.job.spec import NoiseKey
from hpcwalk.job.plan import _segments
from hpcwalk.job.spec import Keyframe
from hpcwalk.job.plan import keyframe_steps

CAT, DOG, FOX = (Keyframe("a cat", NoiseKey(1), 5), Keyframe("a dog", NoiseKey(2, 1), 3), Keyframe("a fox", NoiseKey(3)))


def test_counts_endpoints_and_ends_of_each_segment():
    steps = keyframe_steps([CAT, DOG, FOX])
    assert len(steps) == 1 + (5 - 1) + (3 - 1)
    assert [s.index for s in steps] == list(range(7))
    assert [(s.segment, s.gamma) for s in steps] == [(0, 0.0), (0, 0.25), (0, 0.5), (0, 0.75), (0, 1.0),
                                                     (1, 0.5), (1, 1.0)]
    first, key1, last = steps[0], steps[4], steps[-1]
    assert (first.prompt, first.seed, first.gamma) == ("a cat", NoiseKey(1), 0.0)  # keyframe 0
    assert (key1.prompt_b, key1.seed_b, key1.gamma) == ("a dog", NoiseKey(2, 1), 1.0)  # keyframe 1, shared
    assert (last.prompt_b, last.seed_b, last.gamma) == ("a fox", NoiseKey(3), 1.0)  # keyframe 2
    for s in steps:
        a, b = (CAT, DOG) if s.segment == 0 else (DOG, FOX)
        assert (s.prompt, s.seed, s.prompt_b, s.seed_b) == (a.prompt, a.seed, b.prompt, b.seed)
        assert 0.0 <= s.gamma <= 1.0


@pytest.mark.parametrize("frames, keys", [(2, 2), (5, 2), (4, 3), (9, 5)])
def test_equal_frame_counts_cut_like_job_plan(frames, keys):
    kf = [Keyframe(f"p{k}", NoiseKey(k), frames if k < keys - 1 else 0) for k in range(keys)]
    assert [(s.segment, s.gamma) for s in keyframe_steps(kf)] == _segments(frames, keys)


def test_bad_keyframes():
    with pytest.raises(ValueError, match="at least 2 keyframes"):
        keyframe_steps([CAT])
    with pytest.raises(ValueError, match="last one and starts no segment"):
        keyframe_steps([CAT, Keyframe("a dog", NoiseKey(2), 4)])
    for bad in (0, 1, -3, 10**6, 2.5, True):
        with pytest.raises(ValueError, match="keyframe 1: frames"):
            keyframe_steps([Keyframe("a cat", NoiseKey(1), bad), FOX])
    with pytest.raises(ValueError, match="must be a Keyframe"):
        keyframe_steps([CAT, {"prompt": "a fox", "seed": 3}])

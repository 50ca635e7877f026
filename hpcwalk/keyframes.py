"""Keyframe walks that move prompt and seed together: keyframes -> one (segment, local gamma) row per frame.

A keyframe walk passes through K >= 2 keyframes, each a prompt and a seed; segment k runs from
keyframe k to keyframe k + 1 in `frames` frames of its own (both ends counted, as in a latent walk),
and consecutive segments share their keyframe, so the walk has 1 + sum_k (frames_k - 1) frames. The
cut is the one `job.plan` makes for latent and text walks (`job._segments`): frame 0 is
(segment 0, gamma 0); segment k then adds gammas i / (frames_k - 1), i = 1 .. frames_k - 1, so
keyframe k + 1 is the row (segment k, gamma 1.0). With equal frame counts the rows are exactly
`job._segments(frames, K)`.

Pure and torch-free; rendering a row interpolates the latents of its two seeds and the text
embeddings of its two prompts at its gamma (hpcwalk.interp), which a later change wires in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from hpcwalk.validate import MAX_SEGMENT_FRAMES  # noqa: F401  (the bound lives with the others)

if TYPE_CHECKING:  # annotations only: job.py may import this module without a cycle
    from hpcwalk.job import NoiseKey


@dataclass(frozen=True)
class Keyframe:
    """One keyframe: a prompt and a seed; `frames` counts the frames of the segment to the next keyframe."""

    prompt: str
    seed: NoiseKey
    frames: int = 0  # both ends included (>= 2); 0 on the last keyframe, which starts no segment


@dataclass(frozen=True)
class KeyframeStep:
    """Where frame `index` of a keyframe walk sits: between keyframes `segment` and `segment + 1`."""

    index: int
    segment: int
    gamma: float  # local: 0.0 at keyframe `segment`, 1.0 at keyframe `segment + 1`
    prompt: str  # keyframe `segment`
    seed: NoiseKey
    prompt_b: str  # keyframe `segment + 1`
    seed_b: NoiseKey


def keyframe_steps(keyframes: Sequence[Keyframe]) -> list[KeyframeStep]:
    """frame 0 = (0, 0.0); segment k adds (k, i / (F_k - 1)) for i = 1 .. F_k - 1; N = 1 + sum (F_k - 1)"""
    keys = list(keyframes)
    if len(keys) < 2:
        raise ValueError(f"a keyframe walk needs at least 2 keyframes, got {len(keys)}")
    for k, key in enumerate(keys):
        if not isinstance(key, Keyframe):
            raise ValueError(f"keyframe {k + 1} must be a Keyframe, got {type(key).__name__}")
        f = key.frames
        last = k == len(keys) - 1
        if isinstance(f, bool) or not isinstance(f, int):
            raise ValueError(f"keyframe {k + 1}: frames must be an int, got {f!r}")
        if last and f != 0:
            raise ValueError(f"keyframe {k + 1} is the last one and starts no segment: drop its frames ({f})")
        if not last and not 2 <= f <= MAX_SEGMENT_FRAMES:
            raise ValueError(f"keyframe {k + 1}: frames (of the segment to keyframe {k + 2}, both ends "
                             f"included) must be an int in 2..{MAX_SEGMENT_FRAMES}, got {f}")
    out = [_step(keys, 0, 0, 0.0)]
    for k, key in enumerate(keys[:-1]):
        out.extend(_step(keys, len(out), k, i / (key.frames - 1)) for i in range(1, key.frames))
    return out


def _step(keys: list[Keyframe], index: int, k: int, gamma: float) -> KeyframeStep:
    a, b = keys[k], keys[k + 1]
    return KeyframeStep(index, k, gamma, a.prompt, a.seed, b.prompt, b.seed)

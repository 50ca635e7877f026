"""Latent-space walks: interpolation, translation, mixing and rescaling of SD latents.

Pure tensor math (torch only). Every walk is batched over a 1-D tensor (or python list)
of G gammas / shifts / stds and returns (G, *S) for endpoints of any shape S, in the
endpoints' dtype and device. Arithmetic runs in float32 (float64 for float64 inputs);
gamma == 0 and gamma == 1 return the endpoints bitwise.
"""

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from hpcwalk.job.spec import METHODS, MIX_LAYOUTS, TEXT_METHODS

SLERP_DOT_THRESHOLD = 0.9995

Batch = Union[Tensor, Sequence[float], float]


# ----------------------------------------------------------------------------- helpers

def _compute_dtype(*xs: Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _out_dtype(*xs: Tensor) -> torch.dtype:
    dt = xs[0].dtype
    for x in xs[1:]:
        dt = torch.promote_types(dt, x.dtype)
    return dt if dt.is_floating_point else torch.float32


def _pair(a, b) -> Tuple[Tensor, Tensor, torch.dtype]:
    """(a, b) cast to the compute dtype, plus the output dtype."""
    a = torch.as_tensor(a)
    b = torch.as_tensor(b, device=a.device)
    if a.shape != b.shape:
        raise ValueError(f"endpoint shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    cdt = _compute_dtype(a, b)
    return a.to(cdt), b.to(cdt), _out_dtype(a, b)


def _pair_raw(a, b) -> Tuple[Tensor, Tensor, torch.dtype]:
    a = torch.as_tensor(a)
    b = torch.as_tensor(b, device=a.device)
    if a.shape != b.shape:
        raise ValueError(f"endpoint shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim < 1:
        raise ValueError("translate / mix need latents with at least one dimension")
    return a, b, torch.promote_types(a.dtype, b.dtype)


def _batch(x: Batch, dtype: torch.dtype, device: torch.device) -> Tensor:
    """gammas / stds as a (G,) tensor; a scalar counts as G = 1."""
    x = torch.as_tensor(x).to(device=device, dtype=dtype)
    if x.ndim == 0:
        x = x.reshape(1)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D batch of values, got shape {tuple(x.shape)}")
    return x


def _bview(g: Tensor, ndim: int) -> Tensor:
    return g.reshape(g.shape[0], *([1] * ndim))  # (G, 1, ..., 1)


def _steps(t, width: int, device: torch.device) -> Tensor:
    """integer shifts as a (G,) long tensor on device, checked to lie in 0..width."""
    t = torch.as_tensor(t)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"t must be integers, got dtype {t.dtype}")
    t = t.to("cpu", torch.long)  # range check on host (one small copy if t lives on a GPU)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1:
        raise ValueError(f"t must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > width):
        raise ValueError(f"t must lie in 0..{width} (the last-dim width), got {t.tolist()}")
    return t.to(device)


def _snap(out: Tensor, a: Tensor, b: Tensor, g: Tensor) -> Tensor:
    """exact endpoints: a where g == 0, b where g == 1 (bitwise, also for -0.0 / inf)."""
    return torch.where(g == 0, a, torch.where(g == 1, b, out))


def _check_method(method: str, valid: Tuple[str, ...]) -> None:
    if method not in valid:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(valid)}")


# ------------------------------------------------- cores: a, b (1 or G, *S), g (G, 1, ...)

def _lerp(a: Tensor, b: Tensor, g: Tensor) -> Tensor:
    return _snap((1 - g) * a + g * b, a, b, g)  # (G, *S)


def _nlerp(a: Tensor, b: Tensor, g: Tensor) -> Tensor:
    scale = torch.sqrt(g * g + (1 - g) * (1 - g))  # (G, 1, ...)
    return _snap(((1 - g) * a + g * b) / scale, a, b, g)  # (G, *S)


def _slerp(a: Tensor, b: Tensor, g: Tensor, dim: Optional[int], threshold: float) -> Tensor:
    shape = a.shape  # (B, *S), B in {1, G}
    if dim is None:  # one angle over the whole latent
        a, b, red = a.reshape(shape[0], -1), b.reshape(shape[0], -1), 1
        g = g.reshape(-1, 1)  # (G, 1)
    else:  # one angle per vector along dim
        nd = len(shape) - 1
        if not -nd <= dim < nd:
            raise ValueError(f"dim {dim} out of range for latent shape {tuple(shape[1:])}")
        red = dim % nd + 1
    dot = (a * b).sum(red, keepdim=True)  # (B, *R)
    norms = torch.linalg.vector_norm(a, dim=red, keepdim=True) * torch.linalg.vector_norm(
        b, dim=red, keepdim=True)  # (B, *R)
    ok = norms > 0
    cos = (dot / torch.where(ok, norms, 1)).clamp(-1, 1)  # (B, *R)
    linear = ~ok | (cos.abs() > threshold)  # per-vector fallback, no host sync
    phi = torch.acos(cos)  # (B, *R)
    sin_phi = torch.where(linear, 1, torch.sin(phi))  # (B, *R), never 0
    c0 = torch.where(linear, 1 - g, torch.sin((1 - g) * phi) / sin_phi)  # (G, *R)
    c1 = torch.where(linear, g, torch.sin(g * phi) / sin_phi)  # (G, *R)
    out = _snap(c0 * a + c1 * b, a, b, g)  # (G, *S) or (G, prod S)
    return out.reshape(out.shape[0], *shape[1:])  # (G, *S)


_CORES: Dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "linear": _lerp,
    "normalized": _nlerp,
    "slerp": lambda a, b, g: _slerp(a, b, g, None, SLERP_DOT_THRESHOLD),
}


# ------------------------------------------------------------------------ public API

def lerp(a: Tensor, b: Tensor, gamma: Batch) -> Tensor:
    """(1-g) a + g b"""
    a, b, out_dt = _pair(a, b)  # (*S)
    g = _bview(_batch(gamma, a.dtype, a.device), a.ndim)  # (G, 1, ...)
    return _lerp(a[None], b[None], g).to(out_dt)  # (G, *S)


def normalized_lerp(a: Tensor, b: Tensor, gamma: Batch) -> Tensor:
    """((1-g) a + g b) / sqrt(g^2 + (1-g)^2): iid N(0,I) endpoints give N(0,I)"""
    a, b, out_dt = _pair(a, b)  # (*S)
    g = _bview(_batch(gamma, a.dtype, a.device), a.ndim)  # (G, 1, ...)
    return _nlerp(a[None], b[None], g).to(out_dt)  # (G, *S)


def slerp(a: Tensor, b: Tensor, gamma: Batch, dim: Optional[int] = None,
          dot_threshold: float = SLERP_DOT_THRESHOLD) -> Tensor:
    """sin((1-g) phi)/sin(phi) a + sin(g phi)/sin(phi) b, phi = angle(a, b); lerp where |cos phi| > threshold

    dim=None: one angle over the whole (flattened) tensor, as in the study / Karpathy's gist.
    dim=int: one angle per vector along that dim (text embeddings: per token).
    Vectors with |cos phi| > dot_threshold (default SLERP_DOT_THRESHOLD = 0.9995, nearly
    parallel or anti-parallel) or a zero norm fall back to (1-g) a + g b; the choice is
    made per vector with torch.where (no host sync).
    """
    a, b, out_dt = _pair(a, b)  # (*S)
    g = _bview(_batch(gamma, a.dtype, a.device), a.ndim)  # (G, 1, ...)
    return _slerp(a[None], b[None], g, dim, dot_threshold).to(out_dt)  # (G, *S)


def interpolate(method: str, a: Tensor, b: Tensor, gamma: Batch) -> Tensor:
    """z(g) = {linear: lerp, normalized: normalized_lerp, slerp: slerp (one angle)}[method](a, b, g)"""
    _check_method(method, METHODS)
    return {"linear": lerp, "normalized": normalized_lerp, "slerp": slerp}[method](a, b, gamma)


def interpolate_text(method: str, a: Tensor, b: Tensor, gamma: Batch) -> Tensor:
    """e(g) = {linear: lerp, slerp: slerp(dim=-1), one angle per token}[method](a, b, g)"""
    _check_method(method, TEXT_METHODS)
    if method == "linear":
        return lerp(a, b, gamma)  # (G, ..., 77, D)
    return slerp(a, b, gamma, dim=-1)  # (G, ..., 77, D)


def translate(z_start: Tensor, z_end: Tensor, t) -> Tensor:
    """T(z_concat; t) = z_concat[..., t:t+W], z_concat = cat(z_start, z_end, dim=-1); t in 0..W

    T(0) = z_start, T(W) = z_end; content shifts left by t columns. Pure indexing (exact copies).
    """
    z0, z1, out_dt = _pair_raw(z_start, z_end)
    width = z0.shape[-1]
    t = _steps(t, width, z0.device)  # (G,)
    z_cat = torch.cat((z0, z1), dim=-1)  # (*S[:-1], 2W)
    idx = t[:, None] + torch.arange(width, device=z0.device)  # (G, W)
    out = z_cat.index_select(-1, idx.reshape(-1))  # (*S[:-1], G*W)
    out = out.unflatten(-1, (t.shape[0], width)).movedim(-2, 0)  # (G, *S)
    return out.contiguous().to(out_dt)


def mix(z_start: Tensor, z_end: Tensor, t, layout: str = "end-left") -> Tensor:
    """C(z_start, z_end; t), t in 0..W, every column kept at its own position:
    end-left:  cat(z_end[..., :t], z_start[..., t:], dim=-1)      (z_end enters from the left)
    end-right: cat(z_start[..., :W-t], z_end[..., W-t:], dim=-1)  (z_end enters from the right)

    The study defines C as "the concatenation of z_start[:, :, 64:64+t] and z_end[:, :, t:64]";
    taken literally the first slice is empty (z_start is 64 wide). Two readings fix it:

    - end-left (the default): read both slices as z_concat coordinates, the notation the study
      uses for T(z_concat; t) = z_concat[:, :, t:64+t]: z_concat[64:64+t] = z_end[:t] and
      z_concat[t:64] = z_start[t:], concatenated in the printed order. These are T's own two
      pieces with the order swapped, which puts every column back at its place. It is the one
      reading that keeps the printed indices and order as they are, hence the default (and what
      hpcwalk rendered before `layout` existed).
    - end-right: "T without the shift": T(t) = [z_start[t:], z_end[:t]] lets z_end's columns in
      from the right; end-right takes the same split point W - t with each column in place, so
      z_end enters from the same side as in T.

    Both give C(0) = z_start and C(W) = z_end. Pure indexing (exact copies).
    """
    if layout not in MIX_LAYOUTS:
        raise ValueError(f"unknown mix layout {layout!r}; valid layouts: {', '.join(MIX_LAYOUTS)}")
    z0, z1, out_dt = _pair_raw(z_start, z_end)
    width = z0.shape[-1]
    t = _steps(t, width, z0.device)  # (G,)
    col = torch.arange(width, device=z0.device)  # (W,)
    take_end = col < t[:, None] if layout == "end-left" else col >= width - t[:, None]  # (G, W)
    take_end = take_end.reshape(t.shape[0], *([1] * (z0.ndim - 1)), width)  # (G, 1, ..., W)
    return torch.where(take_end, z1, z0).to(out_dt)  # (G, *S)


def scale_std(z: Tensor, std: Batch) -> Tensor:
    """std * z"""
    z = torch.as_tensor(z)  # (*S)
    cdt = _compute_dtype(z)
    s = _bview(_batch(std, cdt, z.device), z.ndim)  # (G, 1, ...)
    return (s * z.to(cdt)).to(_out_dtype(z))  # (G, *S)


def keyframe_walk(keys: Tensor, u: Batch, method: str) -> Tensor:
    """piecewise walk through K keyframes: u in [0, K-1]; segment k = min(floor(u), K-2), local gamma = u - k, interpolate(method, keys[k], keys[k+1], gamma)

    keys: (K, *S), K >= 2; u: (G,) -> (G, *S). k is also clamped at 0, so u outside
    [0, K-1] extrapolates the first / last segment. For slerp the angle is the one of
    each frame's own segment.
    """
    _check_method(method, METHODS)
    keys = torch.as_tensor(keys)
    if keys.ndim < 1 or keys.shape[0] < 2:
        raise ValueError(f"keyframe_walk needs K >= 2 keys, got shape {tuple(keys.shape)}")
    cdt, out_dt = _compute_dtype(keys), _out_dtype(keys)
    n_seg = keys.shape[0] - 1
    u = _batch(u, cdt, keys.device)  # (G,)
    k = u.floor().clamp(0, n_seg - 1).long()  # (G,)
    g = u - k.to(cdt)  # (G,)
    kc = keys.to(cdt)  # (K, *S)
    a, b = kc[k], kc[k + 1]  # (G, *S)
    return _CORES[method](a, b, _bview(g, a.ndim - 1)).to(out_dt)  # (G, *S)


def segment_gammas(frames_per_segment: int, segments: int) -> Tuple[Tensor, Tensor]:
    """frame i of N = segments (F-1) + 1: segment = min(i // (F-1), segments-1), gamma = i/(F-1) - segment

    F frames per segment include both ends; consecutive segments share their keyframe.
    Returns (segment: LongTensor (N,), gamma: float64 Tensor (N,)); u = segment + gamma
    is the matching keyframe_walk argument.
    """
    frames, segments = int(frames_per_segment), int(segments)
    if frames < 2:
        raise ValueError(f"frames_per_segment must be >= 2, got {frames_per_segment}")
    if segments < 1:
        raise ValueError(f"segments must be >= 1, got {segments}")
    n = frames - 1
    i = torch.arange(segments * n + 1)  # (N,)
    seg = torch.clamp(i // n, max=segments - 1)  # (N,)
    gamma = (i - seg * n).to(torch.float64) / n  # (N,), exactly 0 and 1 at the keyframes
    return seg, gamma

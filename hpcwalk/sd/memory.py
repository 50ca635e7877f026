"""Will a micro-batch fit? The peak memory of one micro-batch, estimated before the run.

The peak of a denoise step and of a VAE decode is measured on the model itself at 1 and 2 frames
(every tensor an op allocates is counted while it lives; weights already on the device are not),
extrapolated linearly to the batch size, and taken with a margin for the allocator and library
workspaces:

    need(B) = MARGIN * max over {UNet step (CFG: 2B latents), VAE decode} of (p1 + (B - 1) * (p2 - p1))

It is compared with the device's free memory (CUDA: `torch.cuda.mem_get_info` plus what torch's
caching allocator holds unused). A batch that will not fit is refused with one line naming the
largest batch that does. On the CPU there is no check (host memory is the operating system's
business) unless `HPCWALK_DEVICE_MEMORY_MIB` is set: it replaces the free memory on any device
(a test hook, and a way to keep room for another process on a shared GPU).
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

BUDGET_ENV = "HPCWALK_DEVICE_MEMORY_MIB"
MARGIN = 1.25  # allocator rounding and fragmentation, cuDNN/cuBLAS workspaces, the NaN guard's float32 VAE
GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimated peak of one micro-batch against what the device has free."""

    batch: int
    first_bytes: int  # measured peak at 1 frame (the larger of UNet step and VAE decode)
    per_frame_bytes: int  # measured increase from 1 to 2 frames
    free_bytes: int
    source: str  # where free_bytes came from

    def need(self, batch: int | None = None) -> int:
        b = self.batch if batch is None else batch
        return int(MARGIN * (self.first_bytes + (b - 1) * self.per_frame_bytes))

    @property
    def fits(self) -> bool:
        return self.need() <= self.free_bytes

    @property
    def largest_batch(self) -> int:
        """The largest batch whose estimate fits (0 when not even one frame does)."""
        if self.need(1) > self.free_bytes:
            return 0
        if self.per_frame_bytes <= 0:
            return self.batch
        return 1 + math.floor((self.free_bytes / MARGIN - self.first_bytes) / self.per_frame_bytes)


def free_memory(device: torch.device) -> tuple[int, str] | None:
    """Free bytes on `device` and where the figure came from; None where nothing is checked (CPU)."""
    budget = os.environ.get(BUDGET_ENV)
    if budget:
        try:
            mib = float(budget)
        except ValueError:
            mib = float("nan")
        if not math.isfinite(mib) or mib <= 0:
            raise ValueError(f"{BUDGET_ENV}={budget!r} is not a positive number of MiB: unset it or give e.g. 20000")
        return int(mib * 2**20), f"{BUDGET_ENV}={budget}"
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached, f"free memory of {torch.cuda.get_device_name(device)}"


class _PeakBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op allocates while a tensor keeps it alive; records the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.holders: dict[int, int] = {}  # storage address -> live tensors on it
        self.size: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {_address(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._hold(t, new=_address(t) not in inputs)
        return out

    def _hold(self, t: torch.Tensor, new: bool) -> None:
        key = _address(t)
        if key not in self.holders:
            if not new:  # a view of a weight or an input: not an allocation
                return
            self.holders[key], self.size[key] = 0, t.untyped_storage().nbytes()
            self.now += self.size[key]
            self.peak = max(self.peak, self.now)
        self.holders[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.holders[key] -= 1
        if self.holders[key] == 0:
            self.now -= self.size.pop(key)
            del self.holders[key]


def _address(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@torch.no_grad()
def peak_bytes(fn: Callable[[], Any]) -> int:
    """The largest number of bytes the tensors `fn` allocates hold at once (inputs made inside count)."""
    with _PeakBytes() as mode:
        fn()
    return mode.peak


def measure(components: Any, frames: int, height: int, width: int, cfg: bool) -> int:
    """Peak bytes of one UNet step and one VAE decode of `frames` frames (the larger), eager modules."""
    c = components
    h, w, n = height // 8, width // 8, frames * (2 if cfg else 1)
    d = c.unet.config.cross_attention_dim

    def step() -> Any:
        x = torch.zeros(n, 4, h, w, device=c.device, dtype=c.dtype)
        emb = torch.zeros(n, 77, d, device=c.device, dtype=c.dtype)
        return c.unet(x, torch.tensor(999, device=c.device), encoder_hidden_states=emb, return_dict=False)[0]

    def decode() -> Any:
        return c.vae.decode(torch.zeros(frames, 4, h, w, device=c.device, dtype=c.dtype), return_dict=False)[0]

    return max(peak_bytes(step), peak_bytes(decode))


def estimate(components: Any, batch: int, height: int, width: int, cfg: bool, free: tuple[int, str]) -> MemoryEstimate:
    """Measure at 1 and 2 frames and extrapolate to `batch` (see the module docstring)."""
    p1 = measure(components, 1, height, width, cfg)
    p2 = measure(components, 2, height, width, cfg)
    return MemoryEstimate(batch, p1, p2 - p1, free[0], free[1])


def check_batch_memory(components: Any, batch: int, height: int, width: int, cfg: bool) -> MemoryEstimate | None:
    """Raise CompileError when a micro-batch of `batch` frames will not fit; None where nothing is checked."""
    from hpcwalk.core.errors import CompileError

    try:
        free = free_memory(components.device)
    except ValueError as e:
        raise CompileError(str(e)) from None
    if free is None:
        return None
    try:
        est = estimate(components, batch, height, width, cfg, free)
    except torch.cuda.OutOfMemoryError:
        raise CompileError(f"[render] batch_size: not even 2 frames of {height}x{width} fit in the memory left on "
                           f"{components.device}: free the GPU (other processes?) or lower height/width") from None
    if not est.fits:
        fix = f"use batch_size {est.largest_batch} or less" if est.largest_batch else "lower height/width"
        raise CompileError(
            f"[render] batch_size {batch} needs about {_size(est.need())} on {components.device} at "
            f"{height}x{width} (estimated: {MARGIN} x the peak measured at 1 and 2 frames, extrapolated), but "
            f"{_size(est.free_bytes)} is free ({est.source}): {fix}")
    return est


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"

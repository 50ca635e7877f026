"""Where a kernel runs: compiled Triton on CUDA, Triton's interpreter on the CPU, or the torch reference.

Every op in this package is a `KernelOp`: it picks its path per call and records it in `last_path`
(and logs the first use of each path on the `hpcwalk.kernels` logger), so which code ran is never
silent. Paths:

- `triton`: the tensor is on a CUDA device and Triton is importable: the compiled kernel.
- `interpreter`: the tensor is on the CPU and `TRITON_INTERPRET=1` is set: the same kernel source run
  by Triton's interpreter (numpy; slow, for tests on machines without a GPU).
- `torch`: anything else (CPU without the interpreter, or Triton missing): the torch reference.

Asking for `triton` or `interpreter` explicitly where it cannot run raises `KernelUnavailable`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch

try:  # torch's CUDA wheels ship Triton; CPU-only wheels do not
    import triton

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None
    HAVE_TRITON = False

PATHS = ("auto", "triton", "interpreter", "torch")
log = logging.getLogger("hpcwalk.kernels")


class KernelUnavailable(RuntimeError):
    """A path was asked for explicitly but cannot run here; the message says why and what to do."""


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET is set to a true value (read at call time, not import time)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def available_path(t: torch.Tensor) -> str:
    """The best path for a tensor on its device: triton, interpreter or torch."""
    if HAVE_TRITON and t.is_cuda:
        return "triton"
    if HAVE_TRITON and t.device.type == "cpu" and interpreter_enabled():
        return "interpreter"
    return "torch"


def pick_path(name: str, t: torch.Tensor, requested: str = "auto") -> str:
    """Resolve `requested` (auto | triton | interpreter | torch) for tensor `t`; never a silent downgrade."""
    if requested not in PATHS:
        raise ValueError(f"kernel path {requested!r} unknown: choose one of {', '.join(PATHS)}")
    can = available_path(t)
    if requested in ("auto", "torch"):
        return can if requested == "auto" else "torch"
    if requested != can:
        why = ("Triton is not installed" if not HAVE_TRITON else
               f"the tensor is on {t.device} (triton needs CUDA; the interpreter needs a CPU tensor and TRITON_INTERPRET=1)")
        raise KernelUnavailable(f"{name}: path {requested!r} cannot run here: {why}; use path='auto' or 'torch'")
    return requested


class TritonKernel:
    """One `@triton.jit`-style function, built on first use as a compiled kernel or an interpreted one."""

    def __init__(self, fn: Callable[..., Any], **jit_kwargs: Any):
        self.fn, self.jit_kwargs = fn, jit_kwargs
        self._built: dict[bool, Any] = {}

    def get(self, interpret: bool) -> Any:
        """The launchable kernel (index it with a grid): interpreted if `interpret`, else JIT-compiled."""
        if interpret not in self._built:
            if interpret:
                from triton.runtime.interpreter import InterpretedFunction as Kind
            else:
                from triton.runtime.jit import JITFunction as Kind
            self._built[interpret] = Kind(self.fn, **self.jit_kwargs)
        return self._built[interpret]


class KernelOp:
    """An op with a Triton launcher and a torch reference; `last_path` says which one ran last."""

    def __init__(self, name: str, launch: Callable[..., Any], reference: Callable[..., Any]):
        self.name, self.launch, self.reference = name, launch, reference
        self.last_path: str | None = None
        self._logged: set[str] = set()

    def __call__(self, *args: Any, path: str = "auto", **kwargs: Any) -> Any:
        first = next(a for a in args if isinstance(a, torch.Tensor))
        chosen = pick_path(self.name, first, path)
        if chosen not in self._logged:
            self._logged.add(chosen)
            log.info("%s: running the %s path on %s", self.name, chosen, first.device)
        self.last_path = chosen
        if chosen == "torch":
            return self.reference(*args, **kwargs)
        return self.launch(*args, interpret=chosen == "interpreter", **kwargs)

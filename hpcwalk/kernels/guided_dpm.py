"""One denoising step in one pass: classifier-free guidance fused with the DPM-Solver++(2M) update.

With eps = (eps_u, eps_c) stacked on the batch axis (uncond first, as the renderer calls the UNet),
guidance g, the current sample x, the previous data prediction x0_prev and the step's row of the
coefficient table `coef[i] = (a, b, c1, c2, c3)`:

    e      = eps_u + g * (eps_c - eps_u)          # guidance (e = eps when there is no CFG)
    x0     = a * x - b * e                        # data prediction (see below)
    x_next = c1 * x + c2 * x0 + c3 * x0_prev      # DPM-Solver++ first or second order (midpoint)

The model output is the noise (epsilon prediction: x0 = (x - sigma_t e) / alpha_t, so a = 1 / alpha_t,
b = sigma_t / alpha_t) or the velocity (v_prediction, SD 2.x-v: x0 = alpha_t x - sigma_t v, so
a = alpha_t, b = sigma_t); guidance is linear in either, as in diffusers' pipeline.

`dpm_coefficients(scheduler)` builds the table once per scheduler setup, in float64 from the
scheduler's own sigmas, following diffusers' `DPMSolverMultistepScheduler.step` (solver_order 2,
dpmsolver++, midpoint, epsilon or v prediction, lower_order_final, final sigma zero), and puts it on the
device, so the loop indexes it with a Python int and never syncs. All arithmetic is float32.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hpcwalk.kernels._dispatch import HAVE_TRITON, KernelOp, TritonKernel

BLOCK = 1024
N_COEF = 5
PREDICTIONS = ("epsilon", "v_prediction")


# ---------------------------------------------------------------------------------------------
# 1. The coefficient table (host, once per scheduler setup)
# ---------------------------------------------------------------------------------------------


def check_scheduler(scheduler: Any) -> None:
    """Raise ValueError unless `scheduler` is the DPM-Solver++(2M) variant this op implements."""
    cfg = scheduler.config
    want = {
        "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
        "thresholding": False, "use_flow_sigmas": False, "variance_type": None, "euler_at_final": False,
    }
    bad = [f"{k}={cfg.get(k)!r} (need {v!r})" for k, v in want.items() if cfg.get(k, v) != v]
    if cfg.get("prediction_type", "epsilon") not in PREDICTIONS:
        bad.append(f"prediction_type={cfg.get('prediction_type')!r} (need one of {', '.join(PREDICTIONS)})")
    if type(scheduler).__name__ != "DPMSolverMultistepScheduler":
        bad.insert(0, f"scheduler {type(scheduler).__name__} (need DPMSolverMultistepScheduler)")
    if bad:
        raise ValueError("the fused guided DPM-Solver++ step does not implement " + ", ".join(bad)
                         + ": use step = 'scheduler' in [compile]")


def dpm_coefficients(scheduler: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """(steps, 5) float32 table (a, b, c1, c2, c3) for a scheduler after `set_timesteps`."""
    check_scheduler(scheduler)
    sig = [float(s) for s in scheduler.sigmas.double()]  # sigmas[i] at step i, sigmas[-1] the final one
    steps = len(scheduler.timesteps)
    v_pred = scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
    lower_final = bool(scheduler.config.lower_order_final) and steps < 15 or scheduler.config.final_sigmas_type == "zero"

    def alpha_sigma(s: float) -> tuple[float, float]:
        alpha = 1.0 / math.sqrt(s * s + 1.0)
        return alpha, s * alpha

    def lam(s: float) -> float:
        alpha, sigma = alpha_sigma(s)
        return math.log(alpha) - math.log(sigma)

    rows = []
    for i in range(steps):
        alpha_s0, sigma_s0 = alpha_sigma(sig[i])
        # x0 = a x - b e: (x - sigma_s0 e) / alpha_s0 for epsilon, alpha_s0 x - sigma_s0 v for v
        a, b = (alpha_s0, sigma_s0) if v_pred else (math.sqrt(sig[i] ** 2 + 1.0), sig[i])
        alpha_t, sigma_t = alpha_sigma(sig[i + 1])
        if sig[i + 1] == 0.0:  # final step to sigma 0: h = inf, x_next = x0
            rows.append((a, b, 0.0, 1.0, 0.0))
            continue
        h = lam(sig[i + 1]) - lam(sig[i])
        phi = alpha_t * (math.exp(-h) - 1.0)
        c1 = sigma_t / sigma_s0
        first_order = i == 0 or (i == steps - 1 and lower_final)
        if first_order:
            rows.append((a, b, c1, -phi, 0.0))
        else:
            r0 = (lam(sig[i]) - lam(sig[i - 1])) / h
            rows.append((a, b, c1, -phi * (1.0 + 0.5 / r0), phi * 0.5 / r0))
    return torch.tensor(rows, dtype=torch.float64).to(torch.float32).to(device)


# ---------------------------------------------------------------------------------------------
# 2. The torch reference
# ---------------------------------------------------------------------------------------------


def reference(eps: torch.Tensor, x: torch.Tensor, x0_prev: torch.Tensor, coef: torch.Tensor, step: int,
              guidance: float, cfg: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: returns (x_next in x's dtype, x0 in float32), shapes of x."""
    c = coef[step]  # (5,) on the device: a view, no host sync
    if cfg:
        eps_u, eps_c = eps.float().chunk(2)
        e = eps_u + guidance * (eps_c - eps_u)
    else:
        e = eps.float()
    x32 = x.float()
    x0 = c[0] * x32 - c[1] * e
    x_next = c[2] * x32 + c[3] * x0 + c[4] * x0_prev.float()
    return x_next.to(x.dtype), x0


# ---------------------------------------------------------------------------------------------
# 3. The Triton kernel and its launcher
# ---------------------------------------------------------------------------------------------

if HAVE_TRITON:
    import triton
    import triton.language as tl

    def _guided_dpm_kernel(eps_ptr, x_ptr, prev_ptr, coef_ptr, out_x_ptr, out_x0_ptr, n, step, guidance,
                           CFG: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        row = coef_ptr + step * 5
        a, b = tl.load(row), tl.load(row + 1)
        c1, c2, c3 = tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)
        e = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if CFG:
            e_c = tl.load(eps_ptr + n + offs, mask=mask, other=0.0).to(tl.float32)
            e = e + guidance * (e_c - e)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        prev = tl.load(prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = a * x - b * e
        x_next = c1 * x + c2 * x0 + c3 * prev
        tl.store(out_x0_ptr + offs, x0, mask=mask)
        tl.store(out_x_ptr + offs, x_next.to(out_x_ptr.dtype.element_ty), mask=mask)

    _KERNEL = TritonKernel(_guided_dpm_kernel, do_not_specialize=["step"])


def _launch(eps: torch.Tensor, x: torch.Tensor, x0_prev: torch.Tensor, coef: torch.Tensor, step: int,
            guidance: float, cfg: bool = True, interpret: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Triton kernel (compiled on CUDA, interpreted on the CPU)."""
    n = x.numel()
    want = 2 * n if cfg else n
    if eps.numel() != want or x0_prev.numel() != n or coef.shape[-1] != N_COEF:
        raise ValueError(f"guided_dpm_step: eps has {eps.numel()} elements, x {n}, x0_prev {x0_prev.numel()}, "
                         f"coef {tuple(coef.shape)}; need eps = {'2x' if cfg else '1x'} x, x0_prev = x, coef (steps, 5)")
    eps, x, x0_prev, coef = eps.contiguous(), x.contiguous(), x0_prev.float().contiguous(), coef.float().contiguous()
    out_x = torch.empty_like(x)
    out_x0 = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, BLOCK),)
    _KERNEL.get(interpret)[grid](eps, x, x0_prev, coef, out_x, out_x0, n, step, float(guidance),
                                 CFG=bool(cfg), BLOCK=BLOCK)
    return out_x, out_x0


guided_dpm_step = KernelOp("guided_dpm_step", _launch, reference)

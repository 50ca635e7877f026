"""The FP8 path (`[compile] quantize`), opt-in: torchao's float8 dynamic quantization of the UNet's Linear layers.

Weights are converted to float8 e4m3 once, activations on the fly (one scale per tensor with `fp8`,
one per row with `fp8-rowwise`), and those matmuls run on FP8 tensor cores (`torch._scaled_mm`), whose
dense peak is twice fp16's on Hopper (1979 vs 989 TFLOP/s, H100 SXM datasheet). Convolutions,
attention, norms and the VAE keep the model dtype. Not exact: frames move by more than the 1-level
bound of the exact options; `hpcwalk bench throughput --quantize fp8` measures the cost against the
fp16 frames (PSNR, max difference, CLIP score and sharpness; hpcwalk/bench/quality.py).

Needs a CUDA GPU with compute capability >= 8.9 (FP8 tensor cores: L4, L40S, H100, H200) and
torchao >= 0.18 (`pip install 'hpcwalk[fp8]'`). Anything else is refused with one line naming the
fix (`CompileError`); nothing falls back to fp16 silently.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first NVIDIA GPUs with FP8 tensor cores
MIN_TORCHAO = (0, 18)  # Float8DynamicActivationFloat8WeightConfig(set_inductor_config=...) as used here
GPUS = "L4, L40S, H100, H200"


def torchao_version() -> str | None:
    """The installed torchao's version, read from its metadata (without importing it), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchao")
    except PackageNotFoundError:
        return None


def fp8_problem(quantize: str, device_type: str, capability: tuple[int, int], torchao: str | None) -> str | None:
    """Why `quantize` cannot run on this device with this torchao (one line naming the fix), or None."""
    head = f"[compile] quantize = {quantize!r}"
    if device_type != "cuda":
        return (f"{head} runs FP8 matmuls on a CUDA GPU with compute capability >= 8.9 ({GPUS}), not on "
                f"{device_type}: set quantize = 'none'")
    if tuple(capability) < MIN_CAPABILITY:
        return (f"{head} needs FP8 tensor cores (compute capability >= 8.9: {GPUS}); this GPU has "
                f"{capability[0]}.{capability[1]}: set quantize = 'none'")
    want = ".".join(map(str, MIN_TORCHAO))
    if torchao is None:
        return f"{head} needs torchao >= {want}, which is not installed: pip install 'hpcwalk[fp8]', or set quantize = 'none'"
    if _release(torchao) < MIN_TORCHAO:
        return f"{head} needs torchao >= {want}, found {torchao}: pip install -U 'torchao>={want}', or set quantize = 'none'"
    return None


def check_fp8(quantize: str, device: torch.device) -> None:
    """Raise CompileError unless the FP8 path can run on `device`: GPU, torchao version, torchao import."""
    import torch

    from hpcwalk.core.errors import CompileError, first_line

    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    version = torchao_version()
    problem = fp8_problem(quantize, device.type, capability, version)
    if problem:
        raise CompileError(problem)
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig  # noqa: F401
    except Exception as e:  # a torchao built for another torch can fail at import
        raise CompileError(f"[compile] quantize = {quantize!r}: torchao {version} does not import here "
                           f"({first_line(e, 200)}): install a torchao built for torch {torch.__version__}, or set "
                           "quantize = 'none'") from None


def fp8_eligible(module: torch.nn.Module) -> bool:
    """A Linear layer whose dimensions FP8 matmuls take (multiples of 16, as torch._scaled_mm needs)."""
    import torch

    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def quantize_unet(unet: torch.nn.Module, quantize: str) -> int:
    """Convert the UNet's eligible Linear layers in place; returns how many (0 eligible is an error)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    from hpcwalk.core.errors import CompileError

    eligible = sum(fp8_eligible(m) for m in unet.modules())
    if not eligible:
        raise CompileError(f"[compile] quantize = {quantize!r}: no Linear layer of this UNet has dimensions that are "
                           "multiples of 16 (what FP8 matmuls take): set quantize = 'none'")
    granularity = PerRow() if quantize == "fp8-rowwise" else PerTensor()
    # set_inductor_config=False: torchao would otherwise change torch._inductor.config for the whole process
    config = Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False)
    quantize_(unet, config, filter_fn=lambda m, _name: fp8_eligible(m))
    return eligible


def describe(quantize: str) -> str:
    """The run-metadata record of the FP8 path: what is quantized, how, by which torchao."""
    scales = "per-row" if quantize == "fp8-rowwise" else "per-tensor"
    return (f"{quantize}: torchao {torchao_version()} float8 e4m3 dynamic activations and weights, {scales} scales, "
            "UNet Linear layers (not exact)")


def _release(version: str) -> tuple[int, ...]:
    """'0.18.0+cu130' -> (0, 18, 0)."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])

"""Every speed option in one place: `CompileConfig` (the job's `[compile]` table) and `prepare`.

`prepare(config, components)` checks that each choice can run on the components' device (an
unusable choice is a `CompileError` with one line naming the option and the fix, never a silent
fallback), applies the in-place options to the modules, and returns the `SpeedModules` the
renderer calls: the UNet, the VAE decode and the decode post-processing.

Options and their numerical risk (every exact option is checked against the plain path, within 1 uint8
level, in tests/test_compile.py on the CPU and tests/test_gpu.py on CUDA):

| option | what it does | risk |
|---|---|---|
| `[render] dtype` | float16 / bfloat16 weights and activations (CUDA; fp16 is refused on the CPU) | fp16 VAE can overflow to inf/NaN: the renderer's NaN guard re-decodes such frames in float32 and records it; bf16 loses ~3 significant digits, frames drift by a few uint8 levels |
| `[render] batch_size` | frames per micro-batch (8, 16, 32: larger GEMMs, fewer launches) | none numerically (batch invariance is tested); memory: the peak of one micro-batch is estimated before the run (`hpcwalk/sd/memory.py`) and a batch that will not fit is refused with the largest one that does |
| `mode` | torch.compile of the UNet (and VAE decode, CLIP, see `scope`): `none`, `default`, `max-autotune`, `max-autotune-no-cudagraphs`, `reduce-overhead` (CUDA graphs) | inductor reorders and fuses float ops: last-bit differences, frames within 1 uint8 level in fp32; `max-autotune*` adds minutes of compile time (it times GEMM/conv candidates); `reduce-overhead` and `max-autotune` replay CUDA graphs whose outputs are overwritten by the next replay (the renderer consumes or clones them first) and need CUDA |
| `scope` | `unet`, `unet+vae` or `unet+vae+clip`: which modules `mode` compiles (`clip`: the CLIP image encoders' `encode_image`) | none beyond `mode`'s; compiling the VAE costs more compile time than it saves on short runs on the CPU; CLIP embeddings move in the last bits (scores within 0.01) |
| `inductor` | `default`, or `+`-joined inductor settings known to help convolutional UNets, passed as `torch.compile(options=...)` (never set globally): `conv1x1-mm` (1x1 convolutions as matmuls), `coordinate-descent` (coordinate-descent tuning of kernel launch parameters, all directions), `no-epilogue-fusion` (no pointwise epilogues fused into matmul templates) | same as `mode`: fusion and tiling change reduction orders (last bits); `coordinate-descent` adds compile time; needs `mode` other than `none` |
| `attention` | `sdpa` (torch's fused attention, default), `xformers` (needs xformers and CUDA), `cudnn` (cuDNN attention via SDPA for the UNet, Hopper) | different reduction orders: last-bit differences; `cudnn` applies to the UNet only: the VAE's attention (one head of 512 channels) is beyond cuDNN's head sizes ("No available kernel" on an H200, 2026-11-26) and keeps torch's default SDPA choice; the UNet's head size is checked at prepare time |
| `channels_last` | NHWC memory format for UNet and VAE convolutions | none numerically beyond different conv algorithms (last bits); slower on the CPU for small models |
| `fuse_qkv` | one matmul for Q, K, V (self-attention) and K, V (cross-attention) | last-bit differences; not combinable with `xformers` |
| `cudnn_benchmark` | `torch.backends.cudnn.benchmark` on during UNet and VAE calls (cuDNN times its convolution algorithms per shape), restored after each call | different conv algorithms: last bits; the first call of each shape is slower; CUDA only |
| `step` | `scheduler` (diffusers' `scheduler.step`) or `fused` (guidance + DPM-Solver++(2M) in one kernel, `hpcwalk.kernels.guided_dpm`; epsilon and v-prediction models) | fused keeps the sample in float32 and folds coefficients: frames within 1 uint8 level of the scheduler path; `dpmsolver++` only |
| `postprocess` | `torch` or `fused` (`hpcwalk.kernels.decode_postprocess`: clamp, scale, round, NHWC uint8 in one pass) | none: bit-equal to the torch post-processing |
| `quantize` | `none`, or the FP8 path (`hpcwalk/sd/fp8.py`, torchao): `fp8` (float8 e4m3 activations and weights, per-tensor scales) or `fp8-rowwise` (per-row scales, bfloat16 only) for the UNet's Linear layers | NOT exact: 8-bit math changes frames by more than 1 level (the benchmark measures PSNR, max difference, CLIP score and sharpness against the fp16 frames); opt-in only, needs CUDA compute capability >= 8.9 and torchao >= 0.18; recorded in the run metadata and part of the job fingerprint |
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:  # torch is imported where it is used: job files and the CLI validate without it
    import torch
from hpcwalk.core.errors import CompileError, first_line

COMPILE_MODES = ("none", "default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # modes whose compiled calls replay CUDA graphs
COMPILE_SCOPES = ("unet", "unet+vae", "unet+vae+clip")
ATTENTION_BACKENDS = ("sdpa", "xformers", "cudnn")
STEP_PATHS = ("scheduler", "fused")
POSTPROCESS_PATHS = ("torch", "fused")
QUANTIZE = ("none", "fp8", "fp8-rowwise")
# `inductor` tokens -> torch._inductor.config settings (the flags diffusers documents for UNets:
# huggingface.co/docs/diffusers/optimization/fp16, "torch.compile")
INDUCTOR_TUNINGS: dict[str, dict[str, Any]] = {
    "conv1x1-mm": {"conv_1x1_as_mm": True},
    "coordinate-descent": {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True},
    "no-epilogue-fusion": {"epilogue_fusion": False},
}


@dataclass(frozen=True)
class CompileConfig:
    """The speed options of a render; the defaults are the plain eager path."""

    mode: str = "none"  # none | default | max-autotune | max-autotune-no-cudagraphs | reduce-overhead
    scope: str = "unet+vae"  # unet | unet+vae | unet+vae+clip: what `mode` compiles
    attention: str = "sdpa"  # sdpa | xformers | cudnn
    channels_last: bool = False
    fuse_qkv: bool = False
    step: str = "scheduler"  # scheduler | fused
    postprocess: str = "torch"  # torch | fused
    inductor: str = "default"  # default | "+"-joined INDUCTOR_TUNINGS, e.g. "conv1x1-mm+coordinate-descent"
    cudnn_benchmark: bool = False
    quantize: str = "none"  # none | fp8 | fp8-rowwise (not exact: hpcwalk/sd/fp8.py)

    @property
    def cuda_graphs(self) -> bool:
        """Whether compiled calls replay CUDA graphs (their outputs are overwritten by the next replay)."""
        return self.mode in CUDA_GRAPH_MODES

    def inductor_options(self) -> dict[str, Any]:
        """The `torch.compile(options=...)` of `mode` plus the `inductor` tunings (empty for mode none)."""
        if self.mode == "none":
            return {}
        from torch._inductor import list_mode_options

        options = dict(list_mode_options(self.mode))
        for token in self._inductor_tokens():
            options.update(INDUCTOR_TUNINGS[token])
        return options

    def _inductor_tokens(self) -> list[str]:
        return [] if self.inductor == "default" else self.inductor.split("+")

    def problems(self, scheduler: str | None = None, dtype: str | torch.dtype | None = None) -> list[str]:
        """Value problems (no environment checks), each one line naming `[compile] <option>`."""
        out = []
        for name, choices in (("mode", COMPILE_MODES), ("scope", COMPILE_SCOPES), ("attention", ATTENTION_BACKENDS),
                              ("step", STEP_PATHS), ("postprocess", POSTPROCESS_PATHS), ("quantize", QUANTIZE)):
            value = getattr(self, name)
            if value not in choices:
                close = difflib.get_close_matches(str(value), choices, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                out.append(f"[compile] {name}: unknown value {value!r}{hint}; choose one of {', '.join(choices)}")
        out += self._inductor_problems()
        dt = None if dtype is None else str(dtype).replace("torch.", "")
        if self.quantize != "none" and dt == "float32":
            out.append(f"[compile] quantize = {self.quantize!r} is a reduced-precision path: set [render] dtype "
                       "'bfloat16' or 'float16', or quantize = 'none'")
        if self.quantize == "fp8-rowwise" and dt == "float16":
            out.append("[compile] quantize = 'fp8-rowwise' needs [render] dtype 'bfloat16' (torchao's per-row "
                       "scales take bfloat16 weights): set dtype = 'bfloat16' or quantize = 'fp8'")
        if self.fuse_qkv and self.attention == "xformers":
            out.append("[compile] fuse_qkv = true needs attention 'sdpa' or 'cudnn' (diffusers' fused QKV "
                       "processor is SDPA-based): set fuse_qkv = false or attention = 'sdpa'")
        if self.attention == "cudnn" and dtype is not None and str(dtype).replace("torch.", "") == "float32":
            out.append("[compile] attention 'cudnn' needs [render] dtype 'float16' or 'bfloat16' (cuDNN attention "
                       "has no float32 kernel): set dtype = 'float16' or attention = 'sdpa'")
        if self.step == "fused" and scheduler is not None and scheduler != "dpmsolver++":
            out.append(f"[compile] step = 'fused' implements DPM-Solver++ only, but [sampling] scheduler is "
                       f"{scheduler!r}: set scheduler = 'dpmsolver++' or step = 'scheduler'")
        return out

    def _inductor_problems(self) -> list[str]:
        tokens = self._inductor_tokens()
        for token in tokens:
            if token not in INDUCTOR_TUNINGS:
                close = difflib.get_close_matches(token, list(INDUCTOR_TUNINGS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                return [f"[compile] inductor: unknown setting {token!r}{hint}; use 'default' or a '+'-joined "
                        f"list of {', '.join(INDUCTOR_TUNINGS)}"]
        if len(set(tokens)) != len(tokens):
            return [f"[compile] inductor: {self.inductor!r} names a setting twice; name each once"]
        if tokens and self.mode == "none":
            return [f"[compile] inductor = {self.inductor!r} tunes torch.compile, but mode is 'none': set mode "
                    "(e.g. 'default') or inductor = 'default'"]
        return []

    def check(self, device: torch.device | str, scheduler: str | None = None, dtype: str | torch.dtype | None = None) -> None:
        """Raise CompileError for a bad value or a choice that cannot run on `device` in `dtype`."""
        import torch

        bad = self.problems(scheduler, dtype)
        if bad:
            raise CompileError(bad[0])
        dev = torch.device(device)
        if self.cuda_graphs and dev.type != "cuda":
            fix = "'max-autotune-no-cudagraphs'" if self.mode == "max-autotune" else "'default'"
            raise CompileError(f"[compile] mode {self.mode!r} replays CUDA graphs and needs a CUDA device, "
                               f"not {dev}: use mode {fix} on the CPU")
        if self.cudnn_benchmark and dev.type != "cuda":
            raise CompileError(f"[compile] cudnn_benchmark = true tunes cuDNN convolutions and needs a CUDA device, "
                               f"not {dev}: set cudnn_benchmark = false")
        if self.quantize != "none":
            from hpcwalk.sd.fp8 import check_fp8

            check_fp8(self.quantize, dev)
        if self.attention == "xformers":
            check_xformers(dev)
        if self.attention == "cudnn":
            check_cudnn_attention(dev)

    def describe_quantize(self) -> str:
        """What the run metadata records for `quantize`: 'none', or the FP8 path with its library version."""
        if self.quantize == "none":
            return "none"
        from hpcwalk.sd.fp8 import describe

        return describe(self.quantize)

    def replace(self, **changes: Any) -> "CompileConfig":
        """A copy with some options changed (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# ---------------------------------------------------------------------------------------------
# Environment checks: can the chosen attention backend run here?
# ---------------------------------------------------------------------------------------------


def check_xformers(device: torch.device) -> None:
    """xformers must import and run its attention kernel on `device` (CUDA)."""
    import torch

    try:
        import xformers.ops as xops
    except Exception as e:  # ImportError, or a binary built for another torch
        raise CompileError(f"[compile] attention 'xformers' is not usable: xformers does not import ({first_line(e, 200)}); "
                           "pip install 'hpcwalk[xformers]' built for this torch, or use attention = 'sdpa'") from None
    if device.type != "cuda":
        raise CompileError(f"[compile] attention 'xformers' needs a CUDA device (its kernels are CUDA-only), "
                           f"not {device}: use attention = 'sdpa'")
    try:
        q = torch.randn(1, 16, 8, 40, device=device, dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize(device)
    except Exception as e:
        raise CompileError(f"[compile] attention 'xformers' imports but its kernel fails on {device} "
                           f"({first_line(e, 200)}): install an xformers build matching torch {torch.__version__}, "
                           "or use attention = 'sdpa'") from None


def check_cudnn_attention(device: torch.device) -> None:
    """cuDNN attention must run on `device` at SD 1.x UNet's head size (40) in fp16 (the VAE never uses it)."""
    if device.type != "cuda":
        raise CompileError(f"[compile] attention 'cudnn' needs a CUDA device (cuDNN attention), not {device}: "
                           "use attention = 'sdpa'")
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        q = torch.randn(2, 8, 64, 40, device=device, dtype=torch.float16)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        torch.cuda.synchronize(device)
    except Exception as e:
        raise CompileError(f"[compile] attention 'cudnn' does not run on {torch.cuda.get_device_name(device)} "
                           f"({first_line(e, 200)}): use attention = 'sdpa'") from None


# ---------------------------------------------------------------------------------------------
# Applying the options
# ---------------------------------------------------------------------------------------------


@dataclass
class SpeedModules:
    """What the renderer calls, prepared once per worker by `prepare`."""

    config: CompileConfig
    unet: Callable[..., Any]  # unet(x, t, encoder_hidden_states=..., return_dict=False)
    vae_decode: Callable[[torch.Tensor], torch.Tensor]  # scaled latents -> image (N, 3, H, W) in [-1, 1]
    postprocess: Callable[[torch.Tensor], torch.Tensor]  # image -> uint8 (N, H, W, 3)
    quantized_layers: int = 0  # UNet Linear layers on the FP8 path (`quantize`)

    @property
    def cuda_graphs(self) -> bool:
        """The compiled calls replay CUDA graphs (the config's mode)."""
        return self.config.cuda_graphs

    def mark_step(self) -> None:
        """Before each compiled call under CUDA graphs: earlier outputs may now be overwritten."""
        if self.cuda_graphs:
            import torch

            torch.compiler.cudagraph_mark_step_begin()

    def scorers(self, scorers: Sequence[Any]) -> tuple[Any, ...]:
        """The CLIP scorers, their image encoders compiled when `scope` includes clip (copies; the models are shared)."""
        if self.config.mode == "none" or "clip" not in self.config.scope.split("+"):
            return tuple(scorers)
        return tuple(dataclasses.replace(s, image_encoder=compiled(s.model.encode_image, self.config)) for s in scorers)


def prepare(config: CompileConfig, components: Any, scheduler: str | None = None) -> SpeedModules:
    """Check the config, apply in-place options to the modules, wrap them for torch.compile.

    In place (on `components`): attention processors, fused QKV, channels_last, FP8 weights.
    torch.compile wraps without changing the modules; compilation itself happens on the first call,
    with the inductor settings passed to that compile only (`CompileConfig.inductor_options`).
    """
    import torch

    from hpcwalk.kernels.decode_postprocess import decode_postprocess, reference

    # 1. validate against the device
    config.check(components.device, scheduler, components.dtype)
    unet, vae = components.unet, components.vae
    # 2. attention (diffusers' default processors already call torch SDPA; cudnn restricts SDPA's backend)
    if config.attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
        vae.enable_xformers_memory_efficient_attention()
    # 3. fused QKV projections, memory format, then FP8 weights (after fusing: one fused matmul per block)
    if config.fuse_qkv:
        unet.fuse_qkv_projections()
        vae.fuse_qkv_projections()
    if config.channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    quantized = 0
    if config.quantize != "none":
        from hpcwalk.sd.fp8 import quantize_unet

        quantized = quantize_unet(unet, config.quantize)
    # 4. torch.compile (lazy: compiled on the first call; fixed shapes, so no dynamic graphs)
    attention = _attention_context(config.attention)

    def vae_decode(z: torch.Tensor) -> torch.Tensor:
        # never under the cuDNN restriction: the VAE's one 512-wide attention head has no cuDNN kernel
        return vae.decode(z, return_dict=False)[0]

    def unet_call(*args: Any, **kwargs: Any) -> Any:
        with attention():
            return unet(*args, **kwargs)

    unet_fn: Callable[..., Any] = unet if config.attention != "cudnn" else unet_call
    decode_fn: Callable[[torch.Tensor], torch.Tensor] = vae_decode
    if config.mode != "none":
        unet_fn = compiled(unet_fn, config)
        if "vae" in config.scope.split("+"):
            decode_fn = compiled(vae_decode, config)
    # 5. cuDNN autotuning around each call (outside the compiled code), restored after it
    if config.cudnn_benchmark:
        unet_fn, decode_fn = _within(cudnn_benchmark, unet_fn), _within(cudnn_benchmark, decode_fn)
    post = decode_postprocess if config.postprocess == "fused" else reference
    return SpeedModules(config, unet_fn, decode_fn, post, quantized_layers=quantized)


def compiled(fn: Callable[..., Any], config: CompileConfig) -> Callable[..., Any]:
    """torch.compile of `fn` with `mode` and the `inductor` tunings as this compile's options (no global config)."""
    import torch

    return torch.compile(fn, dynamic=False, options=config.inductor_options())


@contextlib.contextmanager
def cudnn_benchmark() -> Iterator[None]:
    """`torch.backends.cudnn.benchmark` on for the duration, restored after (also on error)."""
    import torch

    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _within(context: Callable[[], contextlib.AbstractContextManager], fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        with context():
            return fn(*args, **kwargs)

    return call


def _attention_context(attention: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the SDPA backend restriction the attention choice needs inside module calls."""
    if attention != "cudnn":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])

"""What the yardsticks beyond CLIP cost per frame: measured here on the CPU for the tiny models, and counted
FLOPs (torch.utils.flop_counter, models built on the meta device: no weights, no memory) for the real ones,
turned into an estimated GPU time per frame by scaling the measured ViT-L/14 time on an H200.

    python benchmarks/yardstick_cost.py [--out benchmarks/results/yardstick-cost-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

VIT_L_H200_MS = 1.3  # measured: ViT-L/14 embedding per frame at batch 8, fp16, one H200 (README, issue 5 run)


def _ms_per_frame(fn, n: int, repeats: int = 5) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1000 * best / n


def measure_tiny(batch: int = 8, size: int = 64) -> dict[str, float]:
    """Milliseconds per frame on this CPU, tiny models at size x size (best of 5)."""
    from hpcwalk.render.clip import load_clip
    from hpcwalk.render.encoder import load_encoder
    from hpcwalk.render.framestats import sharpness
    from hpcwalk.analyse.pixelsteps import load_lpips, lpips_distance, ssim

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8)
    clip, enc, lp = load_clip("tiny-clip", "none"), load_encoder("tiny-dinov2"), load_lpips("alex-random")
    with torch.no_grad():
        return {"clip_tiny_ms": _ms_per_frame(lambda: clip.embed_images(a), batch),
                "sharpness_ms": _ms_per_frame(lambda: sharpness(a), batch),
                "encoder_tiny_dinov2_ms": _ms_per_frame(lambda: enc.embed_images(a), batch),
                "ssim_step_ms": _ms_per_frame(lambda: ssim(a, b), batch),
                "lpips_alex_step_ms": _ms_per_frame(lambda: lpips_distance(lp, a, b), batch)}


def _flops(build, inputs, meta: bool = True) -> int:
    """FLOPs of one forward: on the meta device (no weights, no memory) where the model allows it."""
    if meta:
        with torch.device("meta"):
            model, x = build(), inputs()
    else:
        model, x = build(), inputs()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(*x) if isinstance(x, tuple) else model(x)
    return int(fc.get_total_flops())


def count_flops(size: int = 512) -> dict[str, float]:
    """FLOPs per frame (one image; LPIPS and SSIM: one pair of frames) at the study's 512x512."""
    import lpips
    import open_clip
    import warnings
    from transformers import Dinov2Config, Dinov2Model

    from hpcwalk.analyse.pixelsteps import SSIM_WINDOW

    out = {"vit_l14_gflop": _flops(lambda: open_clip.create_model("ViT-L-14", device="meta").visual,
                                   lambda: torch.zeros(1, 3, 224, 224)) / 1e9,
           "dinov2_base_gflop": _flops(lambda: Dinov2Model(Dinov2Config()).eval(),
                                       lambda: torch.zeros(1, 3, 224, 224), meta=False) / 1e9}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["lpips_alex_512_gflop"] = _flops(lambda: lpips.LPIPS(net="alex", pnet_rand=True, pretrained=False,
                                                                 verbose=False),
                                             lambda: (torch.zeros(1, 3, size, size), torch.zeros(1, 3, size, size)),
                                             meta=False) / 1e9
    # SSIM: 5 separable 11-tap blurs (x, y, x^2, y^2, xy) of 3 channels, 2 x 11 multiply-adds per pixel each,
    # plus about 20 elementwise operations per pixel; sharpness about 12 per pixel
    px = size * size
    out["ssim_512_gflop"] = (5 * 3 * 2 * 2 * SSIM_WINDOW + 3 * 20) * px / 1e9
    out["sharpness_512_gflop"] = 12 * px / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/yardstick-cost-cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "torch_threads": 1,
           "measured_cpu_ms_per_frame_tiny_64px": measure_tiny(), "counted_flops_per_frame": count_flops()}
    f = res["counted_flops_per_frame"]
    scale = VIT_L_H200_MS / f["vit_l14_gflop"]  # ms per GFLOP at ViT-L/14's measured H200 rate
    res["estimated_h200_ms_per_frame"] = {
        "basis": f"counted FLOPs x the measured ViT-L/14 rate ({VIT_L_H200_MS} ms per frame, "
                 f"{f['vit_l14_gflop']:.0f} GFLOP): an estimate, not a measurement",
        "vit_l14_ms": VIT_L_H200_MS,
        "dinov2_base_ms": round(f["dinov2_base_gflop"] * scale, 3),
        "lpips_alex_512_ms": round(f["lpips_alex_512_gflop"] * scale, 3)}
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

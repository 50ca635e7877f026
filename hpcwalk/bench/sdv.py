"""The stable-diffusion-videos peer (`hpcwalk bench throughput --peer sdv`): the benchmark's model saved to a
folder, `sdv_walk.py` run on it in the peer's own venv (benchmarks/peers/setup_sdv.sh), its JSON read back."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcwalk.bench.systems import PROMPT, SEEDS


def run_sdv(a: Any, components, workdir: Path) -> dict[str, Any]:
    """Save the model to a folder, run sdv_walk.py in the sdv venv (`a.sdv_python`), read its JSON."""
    from diffusers import StableDiffusionPipeline

    from hpcwalk.render.engine import make_scheduler
    from hpcwalk.sd.loaders import clip_tokenizer_files

    if not Path(a.sdv_python).is_file():
        raise SystemExit(f"--peer sdv: {a.sdv_python} not found: run bash benchmarks/peers/setup_sdv.sh from a source "
                         "checkout (or pass --sdv-python / set SDV_PYTHON)")
    model_dir = workdir / "model"
    c = components
    StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
        scheduler=make_scheduler("dpmsolver++", c.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(model_dir, safe_serialization=True)
    # transformers 5 saves the tokenizer as tokenizer.json only; the peer's transformers 4 CLIPTokenizer
    # reads vocab.json + merges.txt: the same BPE files hpcwalk builds its tokenizer from
    for f in clip_tokenizer_files():
        shutil.copy(f, model_dir / "tokenizer" / Path(f).name)
    # transformers 5 saves CLIPTextModel weights without the `text_model.` prefix transformers 4 expects
    # (it would silently re-initialise them): write the same tensors under the old names
    from safetensors.torch import load_file, save_file

    weights = model_dir / "text_encoder" / "model.safetensors"
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v.contiguous() for k, v in load_file(weights).items()}
    save_file(state, weights, metadata={"format": "pt"})
    out = workdir / "sdv.json"
    cmd = [a.sdv_python, str(Path(__file__).resolve().parent / "sdv_walk.py"),
           "--model-dir", str(model_dir), "--prompt", PROMPT, "--seeds", *map(str, SEEDS),
           "--frames", str(a.frames), "--steps", str(a.steps), "--guidance", str(a.guidance),
           "--height", str(a.height), "--width", str(a.width), "--batch", str(a.batch),
           "--repeats", str(a.repeats), "--threads", str(torch.get_num_threads()), "--dtype", a.dtype, "--device", str(c.device),
           "--frames-dir", str(workdir / "sdv-frames"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"sdv peer failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def read_frames(folder: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(folder.rglob("*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]) if files else np.zeros((0,))

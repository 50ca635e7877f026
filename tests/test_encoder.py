"""The non-CLIP encoder: DINOv2 weights found in a Hugging Face hub-cache snapshot (random weights built here,
in the layout huggingface_hub writes), embedded on the device from uint8 frames as transformers' own image
processor and model embed the PIL images; not cached: one line, exit 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hpcwalk.cli import app
from hpcwalk.render.encoder import EncoderLoadError, check_encoder, load_encoder
from jobs import tiny_job_toml, walk

REPO = "facebook/dinov2-small"


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """A hub cache holding a random small DINOv2 as `hf download facebook/dinov2-small` would leave it."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    repo = cache / "models--facebook--dinov2-small"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    torch.manual_seed(1)
    Dinov2Model(Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                             patch_size=8, image_size=48)).save_pretrained(snap)
    BitImageProcessor(size={"shortest_edge": 54}, crop_size={"height": 48, "width": 48}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3,
                      do_convert_rgb=True).save_pretrained(snap)
    return snap


def test_encoder_from_the_hub_cache_matches_transformers_pipeline(hub_cache):
    from transformers import AutoImageProcessor, AutoModel

    enc = load_encoder(REPO)
    rng = np.random.default_rng(0)
    frames = np.stack([np.asarray(Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).resize((80, 64),
                                                                                                       Image.BICUBIC))
                       for _ in range(3)])  # smooth, non-square: resize + center crop both matter
    ours = enc.embed_images(torch.from_numpy(frames))
    proc = AutoImageProcessor.from_pretrained(str(hub_cache), local_files_only=True)
    model = AutoModel.from_pretrained(str(hub_cache), local_files_only=True).eval()
    with torch.no_grad():
        x = proc(images=[Image.fromarray(f) for f in frames], return_tensors="pt")["pixel_values"]
        ref = torch.nn.functional.normalize(model(pixel_values=x).pooler_output, dim=-1)
    cos = torch.nn.functional.cosine_similarity(ours, ref)
    print(f"encoder vs transformers: min cosine {cos.min().item():.7f}")
    assert cos.min().item() >= 0.999
    assert torch.allclose(ours.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_uncached_encoder_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(EncoderLoadError, match="are not in the local cache"):
        check_encoder(REPO)
    assert check_encoder(REPO, here=False) == ""  # a Ray driver checks the name only
    with pytest.raises(EncoderLoadError, match="neither a folder nor a hub id"):
        check_encoder("not-a-model")
    path = tmp_path / "job.toml"
    path.write_text(tiny_job_toml(walk("w", "std", prompt="a", seed=1, frames=2))
                    + f'\n[encoder]\nmodel = "{REPO}"\n')
    res = CliRunner().invoke(app, ["render", str(path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert f"encoder weights {REPO} are not in the local cache" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_the_encoder_looks_in_the_sd_loaders_cache(tmp_path, monkeypatch):
    """HF_HOME unset, XDG_CACHE_HOME set: the encoder's cache is the one `hpcwalk models` and the SD loader use."""
    from hpcwalk.render.encoder import hub_cache

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hub_cache() == str(tmp_path / "huggingface" / "hub")

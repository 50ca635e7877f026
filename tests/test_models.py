"""Model loading: built-ins keep SD's shapes, the tokenizer is CLIP's, bad specs fail clearly."""

from __future__ import annotations

import json

import pytest
import torch

from hpcwalk.sd.models import PRESETS, build_random, check_model_spec, load_components
from hpcwalk.sd.weights import ModelLoadError
from hpcwalk.sd.loaders import clip_tokenizer


def test_tokenizer_matches_open_clip_ids():
    """Our transformers CLIPTokenizer (built offline from open_clip's BPE) gives open_clip's ids."""
    import open_clip

    tok = clip_tokenizer()
    for text in ["An high resolution photo of a cat", "a watercolor, of 3 dogs!", ""]:
        ours = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
        ref = open_clip.tokenize([text])[0].tolist()  # sot ... eot, zero padded
        n = ref.index(49407) + 1
        assert ours[:n] == ref[:n]
        assert ours[n:] == [49407] * (77 - n)  # SD 1.x pads with <|endoftext|>
    assert len(tok) == 49408 and tok.model_max_length == 77


def test_tiny_keeps_sd_shapes(tiny):
    assert tiny.unet.config.in_channels == 4 and tiny.vae.config.latent_channels == 4
    z = torch.randn(1, 4, 5, 7)
    img = tiny.vae.decode(z).sample
    assert img.shape == (1, 3, 40, 56)  # the VAE upsamples by 8, odd latent sizes too
    assert tiny.text_encoder.config.max_position_embeddings == 77


def test_tiny_weights_are_the_same_every_time(tiny):
    unet, _, _ = build_random("tiny")
    for (n, a), (_, b) in zip(unet.state_dict().items(), tiny.unet.state_dict().items()):
        assert torch.equal(a, b), n


def test_sd14_random_has_sd14_parameter_counts():
    """The published sizes of SD 1.4's UNet (859.52M), VAE (83.65M) and CLIP ViT-L/14 text encoder (123.06M)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = PRESETS["sd14-random"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(text) == 123_060_480


def test_bad_model_specs(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        check_model_spec(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_model_spec(str(tmp_path / "x.safetensors"))
    with pytest.raises(ModelLoadError, match="not a built-in"):
        check_model_spec("tinyy")
    with pytest.raises(ModelLoadError, match="float16 on the CPU"):
        check_model_spec("tiny", dtype="float16", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is missing")
def test_cuda_requested_without_cuda():
    with pytest.raises(ModelLoadError, match="CUDA is not available here: use --device cpu"):
        check_model_spec("tiny", device="cuda")


def test_broken_weights_name_what_was_tried(tiny, tmp_path):
    """A diffusers folder whose UNet config is damaged, and a file that is not safetensors, are named."""
    from ldm_checkpoint import write_diffusers_folder

    folder = write_diffusers_folder(tmp_path / "broken", tiny)
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"could not load model .* \(diffusers-folder .*broken\)"):
        load_components(str(folder), device="cpu")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"bad.safetensors is damaged or not a safetensors file"):
        load_components(str(bad), device="cpu")


def test_hub_id_without_network_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelLoadError, match=r"model 'nobody/no-such-model' is not in the Hugging Face cache .*"
                                             r"`hf download nobody/no-such-model`"):
        load_components("nobody/no-such-model", device="cpu")


def test_saved_tiny_folder_round_trips(tiny, tmp_path):
    """A diffusers folder saved from tiny loads back with the same weights."""
    from diffusers import StableDiffusionPipeline

    from hpcwalk.render.engine import make_scheduler

    pipe = StableDiffusionPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        scheduler=make_scheduler("pndm", tiny.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "sd")
    c = load_components(str(tmp_path / "sd"), device="cpu")
    assert torch.equal(next(iter(c.unet.state_dict().values())), next(iter(tiny.unet.state_dict().values())))
    assert c.scheduler_config["beta_schedule"] == "scaled_linear"

"""CLIP scoring against open_clip's own pipeline: the device preprocessing of decoded uint8 frames
must give the embeddings `model.encode_image(preprocess(PIL image))` gives (cosine >= 0.999, float32)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import open_clip
import pyarrow as pa
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from hpcwalk.render.clip import ClipLoadError, ClipScorer, Preprocess, check_clip, clip_score_torch, load_clip
from hpcwalk.render.engine import Renderer
from hpcwalk.job.spec import ClipSpec
from hpcwalk.core.errors import JobError
from hpcwalk.job.parse import parse_job
from hpcwalk.job.plan import plan
from hpcwalk.sd.weights import ModelLoadError

COS_BOUND = 0.999


@pytest.fixture(scope="module")
def scorer():
    return load_clip("tiny-clip", "none", "cpu", torch.float32)


@pytest.fixture(scope="module")
def decoded(tiny, tiny_job):
    """Real decoded frames of the tiny SD model (64x64 uint8), a few steps, with their rows."""
    rows = [r for r in plan(tiny_job) if r.frame_id in ("seeds/linear/00004", "cat-to-dog/slerp/00002", "slide/translate/00003")]
    sampling = dataclasses.replace(tiny_job.sampling, steps=3)
    return rows, Renderer(tiny, sampling, batch_size=4).render(rows).images


def _smooth_images(h: int, w: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC))
                     for _ in range(n)])


def _open_clip_reference(s: ClipScorer, frames: np.ndarray, cfg: PreprocessCfg) -> torch.Tensor:
    """open_clip's pipeline: PIL image -> its eval transform -> encode_image, normalized."""
    transform = image_transform_v2(cfg, is_train=False)
    x = torch.stack([transform(Image.fromarray(f)) for f in frames])
    with torch.no_grad():
        return torch.nn.functional.normalize(s.model.encode_image(x).float(), dim=-1)


def test_device_embeddings_match_open_clip_on_decoded_frames(scorer, decoded):
    _, frames = decoded
    cfg = PreprocessCfg(**open_clip.get_model_preprocess_cfg(scorer.model))
    ref = _open_clip_reference(scorer, frames, cfg)
    ours = scorer.embed_images(torch.from_numpy(frames))
    cos = torch.nn.functional.cosine_similarity(ours, ref)
    print(f"decoded 64x64 frames -> {cfg.size}: min cosine {cos.min().item():.7f}")
    assert frames.std() > 5, "flat frames would make the comparison meaningless"
    assert cos.min().item() >= COS_BOUND


@pytest.mark.parametrize("hw, mode, interp", [((48, 80), "shortest", "bicubic"), ((24, 24), "shortest", "bicubic"),
                                              ((40, 56), "squash", "bilinear"), ((32, 32), "shortest", "bicubic")])
def test_device_preprocessing_matches_open_clip_transform(scorer, hw, mode, interp):
    """Odd shapes (non-square crop, upsampling, squash, no-op resize) against image_transform_v2."""
    cfg = PreprocessCfg(size=32, interpolation=interp, resize_mode=mode)
    s = dataclasses.replace(scorer, preprocess_cfg=Preprocess((32, 32), cfg.mean, cfg.std, interp, mode), _text={})
    frames = _smooth_images(*hw, n=3, seed=hw[0])
    ours = s.embed_images(torch.from_numpy(frames))
    ref = _open_clip_reference(s, frames, cfg)
    cos = torch.nn.functional.cosine_similarity(ours, ref)
    print(f"{hw} {mode}/{interp}: min cosine {cos.min().item():.7f}")
    assert cos.min().item() >= COS_BOUND


def test_text_embeddings_use_the_real_tokenizer_and_are_cached(scorer):
    ids = scorer.tokenizer(["a cat"])[0]
    assert ids[:4].tolist() == [49406, 320, 2368, 49407] and ids.shape[0] == 77  # real CLIP BPE ids
    e = scorer.embed_texts(["a cat", "a dog", "a cat"])
    with torch.no_grad():
        ref = torch.nn.functional.normalize(scorer.model.encode_text(scorer.tokenizer(["a cat", "a dog"])).float(), dim=-1)
    assert torch.allclose(e[:2], ref, atol=1e-6) and torch.equal(e[0], e[2])
    assert set(scorer._text) >= {"a cat", "a dog"}


def test_clip_score_clamps_at_zero():
    img = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.6, 0.8]])
    txt = torch.tensor([[1.0, 0.0]] * 3)
    assert clip_score_torch(img, txt).tolist() == pytest.approx([100.0, 0.0, 60.0])


def test_renderer_stores_clip_columns_from_the_decoded_frames(tiny, tiny_job, scorer, decoded):
    rows, frames = decoded
    sampling = dataclasses.replace(tiny_job.sampling, steps=3)
    out = Renderer(tiny, sampling, batch_size=2, scorers=[scorer]).render(rows)  # 3 rows: a padded last batch
    assert np.abs(out.images.astype(int) - frames.astype(int)).max() <= 1  # batch invariance bound
    frames = out.images
    emb = out.extra["clip_image"]
    assert emb.type == pa.list_(pa.float16(), 32)
    e = emb.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(rows), 32)
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=2e-3)
    ref = scorer.embed_images(torch.from_numpy(frames))
    assert np.allclose(e, ref.numpy(), atol=2e-3)  # float16 storage of the same embeddings
    txt = scorer.embed_texts([r.prompt for r in rows])
    expect = np.maximum(100 * (ref * txt).sum(-1).numpy(), 0)
    assert np.allclose(out.extra["clip_score"].to_numpy(zero_copy_only=False), expect, atol=1e-4)
    score_b = out.extra["clip_score_b"].to_pylist()
    assert [v is None for v in score_b] == [r.prompt_b is None for r in rows]  # only the text walk has an end prompt
    i = next(k for k, r in enumerate(rows) if r.prompt_b)
    txt_b = scorer.embed_texts([rows[i].prompt_b])[0]
    assert score_b[i] == pytest.approx(max(100 * float(ref[i] @ txt_b), 0.0), abs=1e-4)


def test_local_dir_model_loads_through_open_clip_factory(tmp_path, scorer):
    """An open_clip folder (config + weights) goes through open_clip.create_model and gives the same model."""
    from hpcwalk.render.clip import CLIP_PRESETS

    cfg = {"model_cfg": CLIP_PRESETS["tiny-clip"], "preprocess_cfg": open_clip.get_model_preprocess_cfg(scorer.model)}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.save(scorer.model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    other = load_clip(f"local-dir:{tmp_path}", "", "cpu")
    frames = torch.from_numpy(_smooth_images(64, 64, 2, seed=1))
    assert torch.allclose(other.embed_images(frames), scorer.embed_images(frames), atol=1e-6)
    assert torch.allclose(other.embed_texts(["a cat"]), scorer.embed_texts(["a cat"]), atol=1e-6)


@pytest.mark.parametrize("model, tag, needle", [
    ("ViT-L-14", "openai", "ViT-L-14/openai are not in the local cache"),
    ("ViT-L-14", "nonsense", "tag 'nonsense' is unknown for 'ViT-L-14'"),
    ("ViT-Q-99", "openai", "'ViT-Q-99' is not an open_clip architecture"),
    ("tiny-clip", "openai", "set pretrained = \"none\""),
    ("local-dir:/nonexistent/clip", "", "has no open_clip_config.json"),
])
def test_unusable_clip_fails_with_the_fix(model, tag, needle):
    with pytest.raises(ClipLoadError, match=None) as e:
        check_clip(model, tag)
    assert needle in str(e.value)
    assert isinstance(e.value, ModelLoadError)  # the CLI's existing handlers turn it into exit 2


def test_random_weights_of_a_real_architecture_are_explicit():
    assert check_clip("ViT-B-32", "none") == ""  # no weights file: random, and the metadata says "none"


def test_clip_spec_defaults_follow_the_sd_model():
    assert ClipSpec().models("tiny") == (("clip", "tiny-clip", "none"),)
    assert ClipSpec().models("sd14-random") == (("clip", "ViT-L-14", "none"),)
    assert ClipSpec().models("CompVis/stable-diffusion-v1-4") == (("clip", "ViT-L-14", "openai"),)
    assert ClipSpec(enabled=False).models("tiny") == ()
    two = ClipSpec(second_model="ViT-H-14", second_pretrained="laion2b_s32b_b79k").models("x/y")
    assert two[1] == ("clip2", "ViT-H-14", "laion2b_s32b_b79k")
    walk = {"name": "w", "kind": "std", "prompt": "p", "seed": 1, "frames": 2}
    with pytest.raises(JobError, match="second_pretrained"):
        parse_job({"clip": {"second_model": "ViT-H-14"}, "walk": [walk]})
    with pytest.raises(JobError, match=r"\[clip\] pretrained"):
        parse_job({"clip": {"model": "ViT-H-14"}, "walk": [walk]})


def test_cached_weights_are_found_in_a_hugging_face_cache_without_network(tmp_path):
    """The lookup open_clip's downloader would do, against a hub cache laid out as huggingface_hub writes it."""
    from hpcwalk.render.clip import cached_weights

    cfg = open_clip.get_pretrained_cfg("ViT-L-14", "openai")  # hf_hub = 'timm/vit_large_patch14_clip_224.openai/'
    assert cached_weights(cfg, hf_cache=str(tmp_path)) == ""
    repo = tmp_path / "models--timm--vit_large_patch14_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"x")
    assert cached_weights(cfg, hf_cache=str(tmp_path)) == str(snap / "open_clip_pytorch_model.bin")
    (snap / "open_clip_model.safetensors").write_bytes(b"x")  # open_clip prefers safetensors
    assert cached_weights(cfg, hf_cache=str(tmp_path)) == str(snap / "open_clip_model.safetensors")


def test_ray_driver_checks_clip_names_not_this_machines_weights(monkeypatch, tmp_path):
    """On a Ray driver (`here=False`) the weights cache, weights files and local-dir folders belong to
    the workers and are not checked; names and tags still are. Here (`here=True`) all of it is."""
    import hpcwalk.render.clip as hc

    monkeypatch.setattr(hc, "cached_weights", lambda cfg, hf_cache=None: "")  # nothing cached on this machine
    with pytest.raises(ClipLoadError, match="not in the local cache"):
        check_clip("ViT-L-14", "openai")
    assert check_clip("ViT-L-14", "openai", here=False) == ""
    missing = f"local-dir:{tmp_path / 'nope'}"
    with pytest.raises(ClipLoadError, match="no open_clip_config.json"):
        check_clip(missing, "none")
    assert check_clip(missing, "none", here=False) == ""
    assert check_clip("ViT-L-14", "/models/vit-l-14.bin", here=False) == ""  # a file on the workers
    with pytest.raises(ClipLoadError, match="tag 'opneai' is unknown"):
        check_clip("ViT-L-14", "opneai", here=False)
    with pytest.raises(ClipLoadError, match="not an open_clip architecture"):
        check_clip("ViT-Q-99", "none", here=False)


def test_a_prompts_text_embedding_does_not_depend_on_the_prompts_beside_it():
    """Which prompts a micro-batch meets first depends on the shard cut and, on resume or with Ray, on which
    worker took which shard; encoded together, a prompt's embedding moved in the last bits with the batch (a
    resumed run's clip_score then differed from an undisturbed run's), so each prompt is encoded alone."""
    from hpcwalk.render.clip import load_clip

    alone = load_clip("tiny-clip", "none").embed_texts(["a cat"])[0]
    for others in (["a dog"], ["a dog", "a red car", "a bowl of fruit", "a lighthouse", "a city at night"]):
        beside = load_clip("tiny-clip", "none").embed_texts(others + ["a cat"])[-1]
        assert torch.equal(alone, beside), others

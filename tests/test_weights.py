"""Real-weight formats, offline: each artifact is built from a built-in random model in the layout users
hold (tests/ldm_checkpoint.py) and loaded with HF_HUB_OFFLINE=1 and an empty Hugging Face cache; the
loaded tensors must equal the source's exactly (in the stored dtype) and a rendered frame the source
model's within 1 uint8 level. Bad input exits 2 with one line naming the fix and writes nothing."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from hpcwalk.cli import app
from hpcwalk.render.engine import Renderer
from hpcwalk.job.parse import parse_job
from hpcwalk.job.plan import plan
import tomllib
from hpcwalk.sd.loaders import load_pretrained
from hpcwalk.sd.models import load_components
from hpcwalk.store.reader import committed_files
from hpcwalk.sd.weights import ModelLoadError, resolve
from jobs import cat_walk, max_abs_diff, tiny_job_toml
from ldm_checkpoint import (COMPVIS_SCHEDULER, cheap_random, put_in_hub_cache, save_ldm, to_ldm, write_config_folder,
                            write_diffusers_folder)

CLIP_OFF = '\n[clip]\nenabled = false\n'
ARCH_KEYS = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
             "max_position_embeddings", "vocab_size", "layer_norm_eps"}
JOB = tiny_job_toml(cat_walk(methods=["slerp"], frames=3), steps=4, batch_size=3, shard_size=3)


@pytest.fixture(autouse=True)
def offline_empty_cache(tmp_path, monkeypatch):
    """Every test here: no network, and a Hugging Face cache with nothing in it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))


@pytest.fixture(scope="module")
def art(tmp_path_factory, tiny):
    """The artifacts, built once: LDM files (SD 1.x tiny, SD 2.x tiny-v) with config folders, an fp16-only
    variant folder, a CompVis-layout folder."""
    root = tmp_path_factory.mktemp("artifacts")
    tiny_v = load_components("tiny-v", device="cpu")
    half = dataclasses.replace(tiny, unet=copy.deepcopy(tiny.unet).half(), vae=copy.deepcopy(tiny.vae).half(),
                               text_encoder=copy.deepcopy(tiny.text_encoder).half())
    return dict(
        root=root, tiny_v=tiny_v, half=half,
        sd1_file=save_ldm(root / "sd1-tiny.safetensors", to_ldm(tiny.unet, tiny.vae, tiny.text_encoder)),
        sd1_cfg=write_config_folder(root / "cfg-tiny", tiny),
        sd2_file=save_ldm(root / "sd2-tiny-v.safetensors", to_ldm(tiny_v.unet, tiny_v.vae, tiny_v.text_encoder,
                                                                  open_clip=True, v_pred=True)),
        sd2_cfg=write_config_folder(root / "cfg-tiny-v", tiny_v),
        fp16=write_diffusers_folder(root / "fp16-only", half, variant="fp16"),
        compvis=write_diffusers_folder(root / "compvis-layout", tiny, compvis=True),
    )


def _job():
    return parse_job(tomllib.loads(JOB))


def _frames(c) -> np.ndarray:
    job = _job()
    return Renderer(c, job.sampling, batch_size=3).render(plan(job)).images


def _assert_same_weights(loaded, source) -> None:
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(source, name).state_dict()
        assert a.keys() == b.keys(), name
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (name, k)


def _assert_same_frames(loaded, source) -> None:
    ours, ref = _frames(loaded), _frames(source)
    d = max_abs_diff(ours, ref)
    print(f"frames vs the source model: max abs diff {d}")
    assert ref.std() > 5 and d <= 1


# ---------------------------------------------------------------------------------------------
# (a) single LDM .safetensors
# ---------------------------------------------------------------------------------------------


def test_sd1_single_file_with_config_folder(art, tiny):
    c = load_components(str(art["sd1_file"]), device="cpu", config=str(art["sd1_cfg"]))
    assert c.source.format == "ldm-single-file" and c.source.config == str(art["sd1_cfg"])
    _assert_same_weights(c, tiny)
    assert c.tokenizer.pad_token_id == 49407 and c.scheduler_config["_class_name"] == "PNDMScheduler"
    _assert_same_frames(c, dataclasses.replace(tiny, scheduler_config=c.scheduler_config))


def test_sd2_single_file_open_clip_layout_v_prediction(art):
    """SD 2.x layout: OpenCLIP text tower with fused q/k/v and an extra (penultimate-skipped) block."""
    src = art["tiny_v"]
    c = load_components(str(art["sd2_file"]), device="cpu", config=str(art["sd2_cfg"]))
    _assert_same_weights(c, src)
    assert c.tokenizer.pad_token == "!" and c.tokenizer.pad_token_id == 0  # SD 2.x pads with "!"
    assert c.scheduler_config["prediction_type"] == "v_prediction"
    _assert_same_frames(c, dataclasses.replace(src, scheduler_config=c.scheduler_config))


@pytest.mark.slow
def test_full_sd14_single_file_loads_without_any_config(tmp_path):
    """The SD 1.4 architecture as sd-v1-4.safetensors has it (fp16 here), no [model] config: detected
    from its keys and shapes, built with the shipped configs, tensors bit-equal."""
    unet, vae, text = cheap_random("sd14-random", torch.float16)
    path = save_ldm(tmp_path / "sd-v1-4.safetensors", to_ldm(unet, vae, text))
    try:
        _check_full_sd14(path, unet, vae, text)
    finally:
        path.unlink()  # 2.1 GB: not left in pytest's kept temporary folders


def _check_full_sd14(path: Path, unet, vae, text) -> None:
    src = resolve(str(path))
    assert (src.config, src.format) == ("sd-v1", "ldm-single-file"), src
    lu, lv, lt, tok, sched = load_pretrained(src, torch.float16)
    for loaded, source in ((lu, unet), (lv, vae), (lt, text)):
        a, b = loaded.state_dict(), source.state_dict()
        assert a.keys() == b.keys()
        assert all(a[k].dtype == torch.float16 and torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)
        cfg = lambda m: json.loads(json.dumps(m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config)))
        want, got = cfg(source), cfg(loaded)
        is_text = hasattr(source.config, "to_dict")  # transformers: compare the architecture keys only
        keys = [k for k in want if not k.startswith("_") and (k in ARCH_KEYS if is_text else True)]
        assert {k: got[k] for k in keys} == {k: want[k] for k in keys}  # the shipped config is the architecture
    assert tok.pad_token_id == 49407 and sched["_class_name"] == "PNDMScheduler"


# ---------------------------------------------------------------------------------------------
# (b) a folder of fp16 variant files only, (c) CompVis/stable-diffusion-v1-4's layout, the hub cache
# ---------------------------------------------------------------------------------------------


def test_fp16_variant_folder(art, tiny):
    src = resolve(str(art["fp16"]))
    assert src.variant == "fp16"
    unet, vae, text, _, _ = load_pretrained(src, torch.float16)  # as stored (float16 renders need CUDA)
    _assert_same_weights(dataclasses.replace(tiny, unet=unet, vae=vae, text_encoder=text), art["half"])
    c = load_components(str(art["fp16"]), device="cpu")  # float32 render from the fp16 files
    source = dataclasses.replace(art["half"], unet=copy.deepcopy(art["half"].unet).float(),
                                 vae=copy.deepcopy(art["half"].vae).float(),
                                 text_encoder=copy.deepcopy(art["half"].text_encoder).float())
    _assert_same_frames(c, dataclasses.replace(source, scheduler_config=c.scheduler_config))
    with pytest.raises(ModelLoadError, match=r"no diffusion_pytorch_model\.safetensors for \[model\] variant = 'none'"):
        resolve(str(art["fp16"]), variant="none")


def test_compvis_layout_folder(art, tiny, caplog):
    with caplog.at_level(logging.INFO, logger="hpcwalk.sd.models"):
        c = load_components(str(art["compvis"]), device="cpu")
    said = [r.getMessage() for r in caplog.records if "neither loaded nor run" in r.getMessage()]
    assert len(said) == 1 and "feature_extractor, safety_checker" in said[0]
    _assert_same_weights(c, tiny)
    # the repo's scheduler_config.json (no timestep_spacing) as diffusers' PNDMScheduler fills it in
    from diffusers import PNDMScheduler

    assert "timestep_spacing" not in COMPVIS_SCHEDULER
    assert c.scheduler_config == dict(PNDMScheduler.from_config(COMPVIS_SCHEDULER).config)
    prompt = "a watercolor, of 3 dogs!"
    assert c.tokenizer(prompt).input_ids == tiny.tokenizer(prompt).input_ids  # the folder's own vocab.json
    _assert_same_frames(c, dataclasses.replace(tiny, scheduler_config=c.scheduler_config))


def test_hub_id_from_the_local_cache(art, tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    put_in_hub_cache(cache, "CompVis/stable-diffusion-v1-4", art["compvis"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    c = load_components("CompVis/stable-diffusion-v1-4", device="cpu")
    assert c.source.format == "hub-cache" and "snapshots" in c.source.path
    _assert_same_weights(c, tiny)


def test_render_from_a_single_file_records_how_it_loaded(art, tmp_path):
    """The whole CLI on the SD 2.x file; the run metadata says which format, config and prediction."""
    job = tmp_path / "job.toml"
    job.write_text(JOB.replace('id = "tiny"', f'id = "{art["sd2_file"]}"\nconfig = "{art["sd2_cfg"]}"') + CLIP_OFF)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["render", str(job), "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    meta = pq.read_schema(committed_files(str(out))[0]).metadata
    assert meta[b"model_format"] == b"ldm-single-file" and meta[b"model_config"] == str(art["sd2_cfg"]).encode()
    assert meta[b"model_config_rule"] == b"[model] config" and meta[b"prediction_type"] == b"v_prediction"


@pytest.fixture
def library_bars(monkeypatch):
    """Restore the libraries' progress bars (and the environment) that --no-progress switches off."""
    import diffusers.utils.logging as dlog
    import huggingface_hub.utils as hub
    import transformers.utils.logging as tlog

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    dlog.enable_progress_bar()  # an earlier in-process --no-progress (CliRunner) switched them off
    tlog.enable_progress_bar()
    hub.enable_progress_bars()
    yield
    dlog.enable_progress_bar()
    tlog.enable_progress_bar()
    hub.enable_progress_bars()


@pytest.mark.slow
def test_no_progress_silences_the_libraries_bars(art, tmp_path, library_bars):
    """transformers draws a 'Loading weights' bar per model it loads (on by default); with --no-progress
    a render's stderr holds no bar at all, and the three libraries' switches are off."""
    import subprocess
    import sys

    import diffusers.utils.logging as dlog
    import huggingface_hub.utils as hub
    import transformers.utils.logging as tlog

    assert tlog.is_progress_bar_enabled() and dlog.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()
    job = tmp_path / "job.toml"
    job.write_text(JOB.replace('id = "tiny"', f'id = "{art["compvis"]}"') + CLIP_OFF)
    p = subprocess.run([sys.executable, "-m", "hpcwalk.cli", "render", str(job), "--out", str(tmp_path / "run"),
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "it/s]" not in p.stderr and "Loading" not in p.stderr and "%|" not in p.stderr, p.stderr
    assert "neither loaded nor run" in p.stderr  # the log line stays
    r = CliRunner().invoke(app, ["render", str(job), "--out", str(tmp_path / "run2"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert not tlog.is_progress_bar_enabled() and not dlog.is_progress_bar_enabled() and hub.are_progress_bars_disabled()


def test_score_no_progress_silences_the_libraries_bars_too(tmp_path, library_bars):
    import diffusers.utils.logging as dlog
    import huggingface_hub.utils as hub
    import transformers.utils.logging as tlog

    job = tmp_path / "job.toml"
    job.write_text(JOB)
    assert CliRunner().invoke(app, ["render", str(job), "--out", str(tmp_path / "run")]).exit_code == 0
    assert tlog.is_progress_bar_enabled() and dlog.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()
    r = CliRunner().invoke(app, ["score", str(tmp_path / "run"), "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert not tlog.is_progress_bar_enabled() and not dlog.is_progress_bar_enabled() and hub.are_progress_bars_disabled()


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming the fix, nothing written
# ---------------------------------------------------------------------------------------------


def _bad_inputs(art, tmp: Path) -> list[tuple[str, str, str]]:
    """(model id, extra [model] lines, what the one line must say)."""
    truncated = tmp / "truncated.safetensors"
    truncated.write_bytes(Path(art["sd1_file"]).read_bytes()[: 3 * 2**20])
    garbage = tmp / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 64)
    huge = tmp / "huge-header.safetensors"  # a header announcing a 2**40-element tensor in a tiny file
    blob = json.dumps({"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}).encode()
    huge.write_bytes(len(blob).to_bytes(8, "little") + blob + b"\0" * 16)
    lying = tmp / "lying-header.safetensors"  # a 2**40-element tensor said to take 16 bytes
    blob = json.dumps({"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 16]}}).encode()
    lying.write_bytes(len(blob).to_bytes(8, "little") + blob + b"\0" * 16)
    ckpt = tmp / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    disguised = tmp / "pickle.safetensors"
    disguised.write_bytes(ckpt.read_bytes())
    no_weights = write_config_folder(tmp / "no-weights", load_components("tiny", device="cpu"))
    return [
        (str(tmp / "missing.safetensors"), "", "does not exist"),
        (str(truncated), "", "is truncated"),
        (str(garbage), "", "damaged or not a safetensors file"),
        (str(huge), "", "is truncated: its header needs 4398046511"),
        (str(lying), "", "damaged or not a safetensors file"),
        (str(art["sd1_file"]), "", "unknown architecture"),  # tiny is not SD 1.x as shipped: name a config
        (str(art["sd1_file"]), 'config = "sd-v3"', "is not one of sd-v1, sd-v2-base, sd-v2-v nor a folder"),
        (str(ckpt), "", "is a pickle"),
        (str(disguised), "", "is a pickle"),
        (str(no_weights), "", "has no weights"),
        ("nobody/no-such-model", "", "hf download nobody/no-such-model"),
        (str(art["fp16"]), 'variant = "bf16"', "set variant to one of those"),
    ]


def test_bad_model_inputs_exit_2_one_line_nothing_written(art, tmp_path):
    cases = _bad_inputs(art, tmp_path)
    for model, extra, needle in cases:
        job = tmp_path / "job.toml"
        job.write_text(JOB.replace('id = "tiny"', f'id = "{model}"\n{extra}') + CLIP_OFF)
        out = tmp_path / "never"
        r = CliRunner().invoke(app, ["render", str(job), "--out", str(out), "--no-progress"])
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2, (model, r.output)
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (model, r.stderr)
        assert not out.exists(), "bad input must write nothing"
    fixes = {"unknown architecture": "[model] config", "is a pickle": "safetensors", "is truncated": "again"}
    for model, _, needle in cases:
        if needle in fixes:
            with pytest.raises(ModelLoadError, match=fixes[needle].replace("[", r"\[")):
                resolve(model)


def test_weights_that_do_not_fit_the_config_one_line_and_the_cause_in_verbose(art, tmp_path):
    """The tiny SD 1.x file with SD 1.x's real configs: a load-time mismatch, named; --verbose adds the traceback."""
    job = tmp_path / "job.toml"
    job.write_text(JOB.replace('id = "tiny"', f'id = "{art["sd1_file"]}"\nconfig = "sd-v1"') + CLIP_OFF)
    r = CliRunner().invoke(app, ["render", str(job), "--out", str(tmp_path / "o"), "--no-progress"])
    err = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and err[-1].startswith("error: ") and "do not fit config sd-v1" in err[-1], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
    r = CliRunner().invoke(app, ["--verbose", "render", str(job), "--out", str(tmp_path / "o2"), "--no-progress"])
    assert r.exit_code == 2 and "Traceback" in r.stderr and "expected shape" in r.stderr


# ---------------------------------------------------------------------------------------------
# Seeing what is there: hpcwalk models, hpcwalk --version
# ---------------------------------------------------------------------------------------------


def test_models_lists_cache_and_folders_with_format_and_offline(art, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    put_in_hub_cache(cache, "CompVis/stable-diffusion-v1-4", art["compvis"])
    put_in_hub_cache(cache, "someone/fp16-only", art["fp16"])
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "open_clip_config.json").write_text("{}")
    save_ldm(clip / "open_clip_model.safetensors", {"w": torch.zeros(1)})
    put_in_hub_cache(cache, "timm/vit_large_patch14_clip_224.openai", clip)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    extra = tmp_path / "weights"
    extra.mkdir()
    (extra / "sd1-tiny.safetensors").write_bytes(Path(art["sd1_file"]).read_bytes())
    r = CliRunner().invoke(app, ["models", "--json", str(extra)])
    assert r.exit_code == 0, r.output
    rows = {d["name"]: d for d in map(json.loads, r.stdout.splitlines())}
    assert rows["CompVis/stable-diffusion-v1-4"]["offline"] == "yes"
    assert rows["CompVis/stable-diffusion-v1-4"]["format"] == "hub-cache"
    assert rows["someone/fp16-only"]["format"] == "hub-cache, variant fp16"
    assert "ViT-L-14/openai" in rows["timm/vit_large_patch14_clip_224.openai"]["format"]
    assert rows[str(extra / "sd1-tiny.safetensors")]["offline"].startswith("no: ") and "[model] config" in \
        rows[str(extra / "sd1-tiny.safetensors")]["offline"]
    assert {"tiny", "tiny-v", "sd14-random", "sd21-random"} <= set(rows)
    table = CliRunner().invoke(app, ["models", "--no-clip-tags"])
    assert table.exit_code == 0 and "LOADS OFFLINE" in table.stdout and f"hub cache: {cache}" in table.stdout


def test_version():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("hpcwalk 0.1.0 (Python ") and "diffusers " in r.stdout


# ---------------------------------------------------------------------------------------------
# The job's [model] keys and the CLIP defaults of the new built-ins
# ---------------------------------------------------------------------------------------------


def test_model_config_and_variant_keys():
    from hpcwalk.job.spec import ClipSpec

    plain = _job()
    job = parse_job(tomllib.loads(JOB.replace('id = "tiny"', 'id = "/w/x.safetensors"\nconfig = "sd-v2-v"')))
    assert (job.model.config, job.model.variant) == ("sd-v2-v", "auto")
    assert job.with_overrides(batch_size=1).model.config == "sd-v2-v"  # overrides keep them
    explicit = parse_job(tomllib.loads(JOB.replace('id = "tiny"', 'id = "tiny"\nconfig = "auto"\nvariant = "auto"')))
    assert explicit.fingerprint() == plain.fingerprint()  # left at auto, they leave earlier runs' fingerprints alone
    v = parse_job(tomllib.loads(JOB.replace('id = "tiny"', 'id = "tiny"\nvariant = "fp16"')))
    assert v.fingerprint() != plain.fingerprint()  # a chosen variant is part of what decides the frames
    assert ClipSpec().models("tiny-v") == (("clip", "tiny-clip", "none"),)
    assert ClipSpec().models("sd21-random") == (("clip", "ViT-H-14", "none"),)
    with pytest.raises(ModelLoadError, match="applies to single .safetensors files only"):
        resolve("tiny", config="sd-v1")
    with pytest.raises(ModelLoadError, match="applies to diffusers folders and hub ids only"):
        resolve("tiny", variant="fp16")


def test_partial_hub_download_names_its_single_file(art, tmp_path, monkeypatch):
    """`hf download ID v1-5-pruned-emaonly.safetensors` caches one file: the id is refused, the file named."""
    only = tmp_path / "only-file"
    only.mkdir()
    (only / "v1-5-pruned-emaonly.safetensors").write_bytes(Path(art["sd1_file"]).read_bytes())
    put_in_hub_cache(tmp_path / "cache", "runwayml/stable-diffusion-v1-5", only)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match=r"no model_index.json \(a partial download\).*pass its single file as "
                                             r"--model: .*snapshots/.*/v1-5-pruned-emaonly.safetensors"):
        resolve("runwayml/stable-diffusion-v1-5")

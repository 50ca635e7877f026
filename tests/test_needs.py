"""`hpcwalk needs`: every weight a job or study loads, found or not on this machine (an empty Hugging Face
cache and an empty torch hub here), with fetch commands that the real `hf download` parses; a weight in
the cache in its real layout (built from the random models, tests/ldm_checkpoint.py) is found. And the
--clip-model / --clip-pretrained / --encoder overrides of render, which give a job the fingerprint of the
job file that sets the key."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import tomllib
import torch
from typer.testing import CliRunner

from hpcwalk.cli import app
from hpcwalk.cli.common import JobOverrides
from hpcwalk.job.parse import parse_job
from jobs import cat_walk, tiny_job_toml
from ldm_checkpoint import put_in_hub_cache, save_ldm, write_diffusers_folder

ROOT = Path(__file__).resolve().parents[1]
CAT, QUICK, STUDY = (str(ROOT / "examples" / f) for f in ("cat.toml", "quickstart.toml", "study.toml"))
SD14 = "CompVis/stable-diffusion-v1-4"
CLIP_REPO = "timm/vit_large_patch14_clip_224.openai"  # open_clip's hub repo for ViT-L-14/openai
JOB = tiny_job_toml(cat_walk(methods=["slerp"], frames=3), steps=2, batch_size=3, shard_size=3)


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    """No network, an empty Hugging Face cache and an empty torch hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def needs(*args: str):
    r = CliRunner().invoke(app, ["needs", *args])
    data = json.loads(r.stdout) if "--json" in args and r.exit_code in (0, 1) else None
    return r, data


def by_role(data) -> dict[str, dict]:
    return {w["role"]: w for w in data["weights"]}


def hf_download_params(cmd: str) -> dict:
    """The arguments the real `hf download` command line parses out of `cmd` (huggingface_hub's own parser)."""
    from huggingface_hub.cli.hf import app as hf_app

    words = shlex.split(cmd)
    assert words[:2] == ["hf", "download"], cmd
    command = hf_app.commands["download"]
    command = command.materialize() if hasattr(command, "materialize") else command
    return command.make_context("download", words[2:]).params


# ---------------------------------------------------------------------------------------------
# Nothing here: every weight of examples/cat.toml is listed with the commands that fetch it
# ---------------------------------------------------------------------------------------------


def test_cat_lists_every_missing_weight_with_its_fetch_commands(tmp_path):
    r, _ = needs(CAT)
    assert r.exit_code == 1, r.output
    for name in (SD14, "ViT-L-14/openai", "facebook/dinov2-base", "hf download", "0 of 3 weights here, 3 missing"):
        assert name in r.stdout, name
    r, data = needs(CAT, "--json")
    assert r.exit_code == 1 and data["ok"] is False and not any(w["present"] for w in data["weights"])
    hub = str(tmp_path / "hf-home" / "hub")
    sd, clip, enc = (by_role(data)[k] for k in ("SD model", "CLIP", "image encoder"))
    # the SD model: the files a diffusers folder load reads, the fp16 variant for the job's float16
    p = hf_download_params(sd["fetch"][0])
    assert p["repo_id"] == SD14 and p["cache_dir"] == "hf-cache" and not p["filenames"]
    assert set(p["include"]) == {"model_index.json", "scheduler/*", "tokenizer/*", "unet/config.json",
                                 "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
                                 "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/config.json",
                                 "text_encoder/model.fp16.safetensors"}
    assert sd["looked"] == hub and sd["copy_to"] == hub and "HF_HUB_CACHE" in sd["env"]
    assert sd["copy"] == [f"rsync -a hf-cache/models--CompVis--stable-diffusion-v1-4 CLUSTER:{hub}/"]
    # CLIP: open_clip's hub repo for the tag, the safetensors file open_clip reads first
    p = hf_download_params(clip["fetch"][0])
    assert clip["name"] == "ViT-L-14/openai" and p["repo_id"] == CLIP_REPO
    assert p["filenames"] == ("open_clip_model.safetensors",)
    # the encoder: config, weights, preprocessing
    p = hf_download_params(enc["fetch"][0])
    assert p["repo_id"] == "facebook/dinov2-base"
    assert set(p["filenames"]) == {"config.json", "model.safetensors", "preprocessor_config.json"}
    if not torch.cuda.is_available():  # device auto is the CPU here: the dry run's first refusal, as a note
        assert any("float16 on the CPU" in n for n in data["notes"]), data["notes"]


def test_plain_files_for_float32_and_the_revision():
    _, data = needs(CAT, "--dtype", "float32", "--json")
    p = hf_download_params(by_role(data)["SD model"]["fetch"][0])
    assert "unet/diffusion_pytorch_model.safetensors" in p["include"] and not any("fp16" in i for i in p["include"])
    assert not any("float16" in n for n in data["notes"])


def test_built_in_models_are_here_exit_0():
    r, _ = needs(QUICK)
    assert r.exit_code == 0, r.output
    assert "MISSING" not in r.stdout and "3 of 3 weights here" in r.stdout  # tiny, tiny-clip, tiny-dinov2
    r, data = needs(CAT, "--model", "tiny", "--clip-model", "tiny-clip", "--clip-pretrained", "none",
                    "--encoder", "none", "--dtype", "float32", "--json")
    assert r.exit_code == 0 and data["ok"] and [w["role"] for w in data["weights"]] == ["SD model", "CLIP"]
    assert all(w["builtin"] and w["present"] for w in data["weights"])


def test_study_lists_the_lpips_backbone_and_the_encoder(tmp_path):
    r, data = needs(STUDY, "--json")
    assert r.exit_code == 0, r.stdout
    roles = by_role(data)
    assert roles["LPIPS backbone"]["name"] == "alex-random" and roles["image encoder"]["name"] == "tiny-dinov2"
    # a real SD model: lpips auto is torchvision's AlexNet, fetched by URL into the torch hub cache
    r, data = needs(STUDY, "--model", SD14, "--clip-model", "ViT-L-14", "--clip-pretrained", "openai", "--encoder",
                    "facebook/dinov2-small", "--json")
    assert r.exit_code == 1
    lp, enc = by_role(data)["LPIPS backbone"], by_role(data)["image encoder"]
    checkpoints = tmp_path / "torch-home" / "hub" / "checkpoints"
    assert lp["name"] == "alex" and not lp["present"] and lp["copy_to"] == str(checkpoints)
    url = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
    assert lp["fetch"] == [f"curl -L -o alexnet-owt-7be5be79.pth {url}"] and "TORCH_HOME" in lp["env"]
    assert hf_download_params(enc["fetch"][0])["repo_id"] == "facebook/dinov2-small"
    checkpoints.mkdir(parents=True)
    (checkpoints / "alexnet-owt-7be5be79.pth").write_bytes(b"\0" * 100)  # where torchvision looks
    _, data = needs(STUDY, "--model", SD14, "--clip-model", "tiny-clip", "--clip-pretrained", "none",
                    "--encoder", "none", "--json")
    assert by_role(data)["LPIPS backbone"]["present"] and by_role(data)["LPIPS backbone"]["size"] == 100


# ---------------------------------------------------------------------------------------------
# Weights in the hub cache, in the layout `hf download` leaves
# ---------------------------------------------------------------------------------------------


def test_weights_in_the_hub_cache_are_found(tiny, tmp_path):
    from hpcwalk.render.encoder import load_encoder

    cache = tmp_path / "hf-home" / "hub"
    snap = put_in_hub_cache(cache, SD14, write_diffusers_folder(tmp_path / "sd14", tiny, compvis=True))
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "open_clip_config.json").write_text("{}")
    save_ldm(clip / "open_clip_model.safetensors", {"w": torch.zeros(4)})
    clip_snap = put_in_hub_cache(cache, CLIP_REPO, clip)
    load_encoder("tiny-dinov2").model.save_pretrained(tmp_path / "dinov2")  # config.json + model.safetensors
    enc_snap = put_in_hub_cache(cache, "facebook/dinov2-base", tmp_path / "dinov2")
    r, data = needs(CAT, "--json")
    assert r.exit_code == 0 and data["ok"], r.stdout
    sd, cl, enc = (by_role(data)[k] for k in ("SD model", "CLIP", "image encoder"))
    assert sd["present"] and sd["looked"] == str(snap) and sd["size"] > 0 and not sd["fetch"]
    assert cl["present"] and cl["looked"] == str(clip_snap / "open_clip_model.safetensors")
    assert enc["present"] and enc["looked"] == str(enc_snap)
    r, _ = needs(CAT)
    assert r.exit_code == 0 and "3 of 3 weights here" in r.stdout and "GiB" in r.stdout


def test_a_partial_snapshot_is_missing_with_what_lacks(tiny, tmp_path):
    folder = write_diffusers_folder(tmp_path / "sd14", tiny)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    put_in_hub_cache(tmp_path / "hf-home" / "hub", SD14, folder)
    r, data = needs(CAT, "--dtype", "float32", "--json")
    sd = by_role(data)["SD model"]
    assert r.exit_code == 1 and not sd["present"] and "vae has no weights" in sd["why"]
    assert hf_download_params(sd["fetch"][0])["repo_id"] == SD14


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, says", [
    (["no-such.toml"], "not found"),
    ([CAT, "--clip-model", "NoSuchArch", "--clip-pretrained", "openai"], "not an open_clip architecture"),
    ([CAT, "--clip-pretrained", "no-such-tag"], "unknown for 'ViT-L-14'"),
    ([CAT, "--encoder", "not-a-hub-id"], "neither a folder nor a hub id"),
    ([CAT, "--model", "not-a-model"], "is not a built-in"),
])
def test_bad_input_one_line_exit_2(args, says):
    r = CliRunner().invoke(app, ["needs", *args])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and says in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# render --clip-model / --clip-pretrained / --encoder
# ---------------------------------------------------------------------------------------------


def test_overrides_give_the_fingerprint_of_the_job_file_key():
    plain = parse_job(tomllib.loads(JOB))
    keyed = {"[clip]\nmodel = \"tiny-clip\"\n": JobOverrides(clip_model="tiny-clip"),
             "[clip]\nmodel = \"ViT-B-32\"\npretrained = \"none\"\n": JobOverrides(clip_model="ViT-B-32",
                                                                                 clip_pretrained="none"),
             "[encoder]\nmodel = \"none\"\n": JobOverrides(encoder="none"),
             "[encoder]\nmodel = \"facebook/dinov2-small\"\n": JobOverrides(encoder="facebook/dinov2-small")}
    prints = set()
    for table, overrides in keyed.items():
        from_file = parse_job(tomllib.loads(JOB + table))
        assert overrides.apply(plain).fingerprint() == from_file.fingerprint(), table
        assert overrides.apply(plain) == from_file, table
        prints.add(from_file.fingerprint())
    assert len(prints) == 4 and plain.fingerprint() != parse_job(tomllib.loads(JOB + list(keyed)[0])).fingerprint()


def test_render_with_clip_model_resumes_as_the_job_file_with_the_key(tmp_path):
    plain, keyed = tmp_path / "plain.toml", tmp_path / "keyed.toml"
    plain.write_text(JOB)
    keyed.write_text(JOB + '[clip]\nmodel = "tiny-clip"\n[encoder]\nmodel = "none"\n')
    out = str(tmp_path / "run")
    r = CliRunner().invoke(app, ["render", str(plain), "--out", out, "--no-progress", "--clip-model", "tiny-clip",
                                 "--encoder", "none"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["render", str(keyed), "--out", out, "--dry-run"])
    assert r.exit_code == 0 and "1 shards committed and verified" in r.stdout and "0 to render" in r.stdout, r.output
    r = CliRunner().invoke(app, ["render", str(plain), "--out", out, "--dry-run"])  # without them: another job
    assert r.exit_code == 2, r.output


@pytest.mark.parametrize("flags, says", [
    (["--clip-model", "ViT-B-32"], "[clip] pretrained (--clip-pretrained): give the weights tag"),
    (["--clip-model", "NoSuchArch", "--clip-pretrained", "openai"], "not an open_clip architecture"),
    (["--clip-model", "tiny-clip", "--clip-pretrained", "openai"], "set pretrained = \"none\""),
    (["--encoder", "a/b/c"], "neither a folder nor a hub id"),
    (["--encoder", "x" * 5000], "[encoder] model must be at most"),
])
def test_render_bad_override_one_line_exit_2(tmp_path, flags, says):
    job = tmp_path / "job.toml"
    job.write_text(JOB)
    r = CliRunner().invoke(app, ["render", str(job), "--out", str(tmp_path / "run"), "--dry-run", *flags])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and says in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()

"""Teacher loading through the real from_pretrained path; clear errors for what is missing."""

import shutil

import huggingface_hub.constants

import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffusion.errors import UserError
from diffusion.teacher import load_teacher, teacher_fingerprint
from diffusion.tiny import clip_tokenizer


def test_tiny_teacher_is_a_stable_diffusion_pipeline(teacher_dir):
    pipe = StableDiffusionPipeline.from_pretrained(teacher_dir, local_files_only=True, safety_checker=None)
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=3.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)


def test_teacher_is_frozen_and_text_encoding_pads_empty_prompt(teacher):
    assert not any(p.requires_grad for p in teacher.unet.parameters())
    assert not teacher.unet.training and not teacher.vae.training
    uncond = teacher.encode_text([""])
    assert uncond.shape == (1, 77, 32)
    ids = teacher.tokenizer([""], padding="max_length", max_length=77).input_ids[0]
    assert ids[:3] == [49406, 49407, 49407] and len(ids) == 77


def test_cond_uncond_in_one_batch_equals_two_passes(teacher):
    z_t, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
    cond, uncond = teacher.encode_text(["a red circle", "a blue square"]), teacher.encode_text([""])
    eps_cond, eps_uncond = teacher.eps_cond_uncond(z_t, t, cond, uncond)
    with torch.no_grad():
        torch.testing.assert_close(eps_cond, teacher.eps(z_t, t, cond), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(eps_uncond, teacher.eps(z_t, t, uncond.expand(2, -1, -1)), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(eps_cond, eps_uncond)


def test_clip_tokenizer_matches_open_clip():
    import open_clip

    hf, oc = clip_tokenizer(), open_clip.get_tokenizer("ViT-B-32")
    for text in ["a handwritten digit seven", "The NUMBER 7, by hand!", "caf\u00e9 cr\u00e8me"]:
        reference = [i for i in oc([text])[0].tolist() if i]
        assert hf(text).input_ids == reference


def test_missing_teacher_file_is_one_clear_line(tmp_path, teacher_dir):
    broken = tmp_path / "teacher"
    shutil.copytree(teacher_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match=r"no \*\.safetensors in .*unet"):
        load_teacher(broken)
    (broken / "vae" / "config.json").unlink()
    with pytest.raises(UserError, match=r"teacher file missing: .*vae/config\.json"):
        load_teacher(broken)


def test_absent_folder_and_uncached_hub_id_do_not_download(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match="neither a folder nor in the local HF cache"):
        load_teacher("some-org/some-model")
    with pytest.raises(UserError, match="does not exist"):
        load_teacher(tmp_path / "nowhere")


def test_fingerprint_follows_weights(tmp_path, teacher_dir):
    copy = tmp_path / "copy"
    shutil.copytree(teacher_dir, copy)
    assert teacher_fingerprint(copy) == teacher_fingerprint(teacher_dir)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert teacher_fingerprint(copy) != teacher_fingerprint(teacher_dir)


def test_hub_id_in_the_local_cache_loads_without_network(tmp_path, monkeypatch, teacher_dir):
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-sd" / "snapshots" / ("0" * 40)
    shutil.copytree(teacher_dir, snapshot)
    (cache / "models--tiny-org--tiny-sd" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-sd" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import otherwise
    teacher = load_teacher("tiny-org/tiny-sd")
    assert teacher.root == snapshot
    assert teacher.fingerprint == teacher_fingerprint(teacher_dir)

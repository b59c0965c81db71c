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
    assert uncond.hidden.shape == (1, 77, 32) and uncond.pooled is None and uncond.time_ids is None
    ids = teacher.tokenizer([""], padding="max_length", max_length=77).input_ids[0]
    assert ids[:3] == [49406, 49407, 49407] and len(ids) == 77


def test_cond_uncond_in_one_batch_equals_two_passes(teacher):
    z_t, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
    cond, uncond = teacher.encode_text(["a red circle", "a blue square"]), teacher.encode_text([""])
    eps_cond, eps_uncond = teacher.eps_cond_uncond(z_t, t, cond, uncond)
    with torch.no_grad():
        torch.testing.assert_close(eps_cond, teacher.eps(z_t, t, cond), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(eps_uncond, teacher.eps(z_t, t, uncond.expand(2)), atol=1e-5, rtol=1e-4)
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


# Weight variants (`save_pretrained(variant="fp16")`), loading errors, and fp16 files on CPU (issue 13).

WEIGHTED = ("vae", "text_encoder", "unet")


def _save_fp16(teacher_dir, out, components=WEIGHTED, variant="fp16"):
    """Each component of teacher_dir saved in float16 to out/COMPONENT: as `variant` (None: plain file names)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    classes = {"vae": AutoencoderKL, "text_encoder": CLIPTextModel, "unet": UNet2DConditionModel}
    for component in components:
        model = classes[component].from_pretrained(teacher_dir, subfolder=component)
        model.half().save_pretrained(out / component, variant=variant)


@pytest.fixture(scope="module")
def fp16_only_teacher(tmp_path_factory, teacher_dir):
    """The tiny teacher as many hub repos ship: only *.fp16.safetensors weights."""
    folder = tmp_path_factory.mktemp("fp16-only") / "teacher"
    shutil.copytree(teacher_dir, folder)
    for component in WEIGHTED:
        for weights in (folder / component).glob("*.safetensors"):
            weights.unlink()
    _save_fp16(teacher_dir, folder)
    return folder


@pytest.fixture(scope="module")
def both_variants_teacher(tmp_path_factory, teacher_dir, fp16_only_teacher):
    """The plain float32 weights and the fp16 variant side by side (the plain configs)."""
    folder = tmp_path_factory.mktemp("both") / "teacher"
    shutil.copytree(teacher_dir, folder)
    for component in WEIGHTED:
        for weights in (fp16_only_teacher / component).glob("*.fp16.safetensors"):
            shutil.copyfile(weights, folder / component / weights.name)
    return folder


def test_weight_files_group_plain_variant_and_sharded_names(tmp_path):
    from diffusion.teacher import weight_files

    names = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.non_ema.bin", "model.bf16-00001-of-00002.safetensors",
             "model.bf16-00002-of-00002.safetensors", "model.safetensors.index.bf16.json", "README.md"]
    for name in names:
        (tmp_path / name).write_text("{}")
    found = {variant: [f.name for f in files] for variant, files in weight_files(tmp_path).items()}
    assert found == {None: ["diffusion_pytorch_model.safetensors"],
                     "fp16": ["diffusion_pytorch_model.fp16.safetensors"],
                     "non_ema": ["diffusion_pytorch_model.non_ema.bin"],
                     "bf16": ["model.bf16-00001-of-00002.safetensors", "model.bf16-00002-of-00002.safetensors",
                              "model.safetensors.index.bf16.json"]}


@pytest.mark.parametrize("names", ["variant", "plain"])
def test_fp16_weights_on_disk_load_and_run_in_fp32_on_cpu(tmp_path, teacher_dir, fp16_only_teacher, names):
    """An fp16-variant-only teacher is found without --variant; fp16 files under plain names are cast too."""
    if names == "variant":
        folder = fp16_only_teacher
    else:
        folder = tmp_path / "teacher"
        shutil.copytree(teacher_dir, folder)
        _save_fp16(teacher_dir, folder, ("vae", "text_encoder"), variant=None)
    teacher = load_teacher(folder)
    expected = "fp16" if names == "variant" else None
    assert teacher.variants == {"vae": expected, "text_encoder": expected, "unet": expected}
    assert {m.dtype for m in (teacher.unet, teacher.vae, teacher.text_encoder)} == {torch.float32}
    text = teacher.encode_text(["a red circle"])
    z0 = teacher.encode_images(torch.zeros(1, 3, 32, 32), torch.zeros(1, 4, 16, 16))
    with torch.no_grad():
        eps = teacher.eps(z0, torch.tensor([500]), text)
    assert text.hidden.dtype == z0.dtype == eps.dtype == torch.float32 and torch.isfinite(eps).all()


def test_variant_asked_for_but_absent_is_one_line(teacher_dir):
    with pytest.raises(UserError, match=r"teacher weights missing: .*vae/diffusion_pytorch_model\.fp16\.safetensors "
                                        r"\(--variant fp16\)") as error:
        load_teacher(teacher_dir, variant="fp16")
    assert "\n" not in str(error.value)


def test_fingerprint_hashes_the_variant_asked_for(teacher_dir, fp16_only_teacher, both_variants_teacher):
    """Without --variant every weight file counts, as before the option (shards built then still match the
    folder); with --variant fp16 only the fp16 files, so the fp16 teacher is another teacher than the plain one."""
    plain = load_teacher(both_variants_teacher, with_unet_and_vae=False)
    fp16 = load_teacher(both_variants_teacher, with_unet_and_vae=False, variant="fp16")
    assert plain.variants["unet"] is None and fp16.variants["unet"] == "fp16"
    assert plain.fingerprint == teacher_fingerprint(both_variants_teacher) != teacher_fingerprint(teacher_dir)
    assert fp16.fingerprint == teacher_fingerprint(both_variants_teacher, "fp16")
    assert fp16.fingerprint not in (plain.fingerprint, teacher_fingerprint(teacher_dir))
    assert teacher_fingerprint(fp16_only_teacher) == teacher_fingerprint(fp16_only_teacher, "fp16")  # all it has


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BROKEN = {
    "truncated unet": ("unet/diffusion_pytorch_model.safetensors", _truncate, r"cannot load .*unet: OSError"),
    "truncated text encoder": ("text_encoder/model.safetensors", _truncate,
                               r"cannot load .*text_encoder: SafetensorError"),
    "bad unet config": ("unet/config.json", lambda p: p.write_text("{not json"), r"cannot (load|read) .*unet"),
    "bad text encoder config": ("text_encoder/config.json", lambda p: p.write_text("{not json"),
                                r"cannot (load|read) .*text_encoder"),
    "bad tokenizer": ("tokenizer/tokenizer.json", lambda p: p.write_text("{not json"), r"cannot load .*tokenizer"),
    "bad scheduler config": ("scheduler/scheduler_config.json", lambda p: p.write_text("{not json"),
                             r"cannot read .*scheduler_config\.json"),
}


@pytest.mark.parametrize("case, with_unet_and_vae", [  # the trainer's teacher (no UNet) never reads its weights
    (case, with_unet_and_vae) for case in sorted(BROKEN) for with_unet_and_vae in (True, False)
    if with_unet_and_vae or case != "truncated unet"])
def test_unreadable_teacher_file_is_one_line(tmp_path, teacher_dir, case, with_unet_and_vae):
    relative, damage, message = BROKEN[case]
    broken = tmp_path / "teacher"
    shutil.copytree(teacher_dir, broken)
    damage(broken / relative)
    with pytest.raises(UserError, match=message) as error:
        load_teacher(broken, with_unet_and_vae=with_unet_and_vae)
    assert "\n" not in str(error.value)


def test_build_shards_and_fit_with_the_fp16_variant(tmp_path, teacher_dir, both_variants_teacher, clean_source,
                                                    capsys):
    """--variant fp16 builds from the fp16 files and records them; its shards train a student with the same
    --variant and are refused to the fp32 teacher of the same folder."""
    import json

    from helpers import build_args, fit_args
    from pipeline.cli import main
    from trainer.cli import main as trainer_main
    from shards.manifest import check_compatible, read_dataset_info

    out = tmp_path / "shards"
    assert main(build_args(both_variants_teacher, clean_source, out, "--samples", "4", "--variant", "fp16")) == 0
    info = read_dataset_info(out)
    assert info["teacher"]["variants"] == {"vae": "fp16", "text_encoder": "fp16", "unet": "fp16"}
    fp16 = load_teacher(both_variants_teacher, with_unet_and_vae=False, variant="fp16")
    assert info["teacher"]["fingerprint"] == fp16.fingerprint
    check_compatible(info, teacher_fingerprint=fp16.fingerprint)
    with pytest.raises(UserError, match="teacher fingerprint"):
        check_compatible(info, teacher_fingerprint=teacher_fingerprint(teacher_dir))
    assert json.loads((out / "dataset.json").read_text())["samples"] == 4
    assert main(build_args(teacher_dir, clean_source, tmp_path / "absent", "--samples", "4", "--variant", "fp16")) == 2
    assert "vae/diffusion_pytorch_model.fp16.safetensors (--variant fp16)" in capsys.readouterr().err

    fit = fit_args("cfg-distill", both_variants_teacher, out, tmp_path / "student", "--max-steps", "1")
    assert trainer_main(fit) == 2  # the plain (fp32) teacher in the same folder is another teacher
    assert "teacher fingerprint" in capsys.readouterr().err
    assert trainer_main(fit + ["--variant", "fp16"]) == 0
    record = json.loads((tmp_path / "student" / "distillation.json").read_text())
    assert record["teacher"]["fingerprint"] == fp16.fingerprint and record["teacher"]["variants"]["unet"] == "fp16"


def test_variant_options_reach_every_teacher_command(tmp_path, teacher_dir, fp16_only_teacher, capsys):
    """trainer fit takes --variant except for progressive (its --student is ours); evaluation renders an
    fp16-only teacher, and refuses --variant for a student."""
    from evaluation.cli import main as evaluation_main
    from trainer.cli import main as trainer_main

    assert trainer_main(["fit", "--method", "progressive", "--student", str(tmp_path), "--shards", str(tmp_path),
                         "--out", str(tmp_path / "p"), "--variant", "fp16"]) == 2
    assert "--variant does not apply to --method progressive" in capsys.readouterr().err
    png = tmp_path / "image.png"
    assert evaluation_main(["generate", "--model", str(fp16_only_teacher), "--prompt", "a red circle", "--out",
                            str(png), "--num-inference-steps", "2"]) == 0
    assert png.is_file()
    assert evaluation_main(["generate", "--model", str(teacher_dir), "--prompt", "x", "--out", str(png),
                            "--variant", "fp16"]) == 2
    assert "diffusion_pytorch_model.fp16.safetensors (--variant fp16)" in capsys.readouterr().err

"""SDXL teachers through the core: the wrapper's text conditioning against StableDiffusionXLPipeline's own,
the micro-conditioning the shards record, and the methods' fits on a tiny SDXL-layout teacher written to disk."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_args, fit_args, read_records, relative, train_w_student

from pipeline.cli import main as pipeline_main
from trainer.cli import main as trainer_main

PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    from diffusion.teacher import load_teacher

    return load_teacher(sdxl_dir)


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(sdxl_dir, local_files_only=True)


@pytest.fixture(scope="module")
def sdxl_shards(tmp_path_factory, sdxl_dir, clean_source):
    out = tmp_path_factory.mktemp("shards") / "sdxl-cfg"
    assert pipeline_main(build_args(sdxl_dir, clean_source, out, "--store-clean")) == 0
    return out


def test_text_conditioning_is_the_pipelines_own(sdxl, sdxl_pipe):
    """Both encoders' penultimate states, the pooled embedding, zeros for "" and the default time ids: exactly
    what StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids give."""
    cond, uncond = sdxl.encode_text(PROMPTS), sdxl.encode_text([""])
    with torch.no_grad():
        hidden, negative, pooled, negative_pooled = sdxl_pipe.encode_prompt(
            prompt=PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    assert cond.hidden.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)
    torch.testing.assert_close(cond.hidden, hidden, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    assert not uncond.hidden.any() and not uncond.pooled.any() and not negative.any() and not negative_pooled.any()
    time_ids = sdxl_pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(cond.time_ids, time_ids.expand(2, -1))
    assert sdxl.encode_text(PROMPTS, size=64).time_ids[0].tolist() == [64, 64, 0, 0, 64, 64]


def test_eps_is_the_pipelines_unet_call_and_micro_reaches_the_unet(sdxl, sdxl_pipe):
    """eps_cond_uncond = the UNet called as the pipeline calls it (cond and uncond batched, the uncond half with
    the cond half's time ids); another micro-conditioning changes the output."""
    torch.manual_seed(0)
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([700, 300])
    micro = torch.tensor([[48, 64, 0, 6, 32, 32], [30, 60, 16, 0, 32, 32]])
    cond = sdxl.encode_text(PROMPTS).with_micro(micro)
    eps_cond, eps_uncond = sdxl.eps_cond_uncond(z, t, cond, sdxl.encode_text([""]))
    with torch.no_grad():
        hidden, negative, pooled, negative_pooled = sdxl_pipe.encode_prompt(
            prompt=PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
        out = sdxl_pipe.unet(torch.cat([z, z]), torch.cat([t, t]), encoder_hidden_states=torch.cat([hidden, negative]),
                             added_cond_kwargs={"text_embeds": torch.cat([pooled, negative_pooled]),
                                                "time_ids": torch.cat([micro, micro]).float()}).sample
    torch.testing.assert_close(eps_cond, out[:2], rtol=0, atol=0)
    torch.testing.assert_close(eps_uncond, out[2:], rtol=0, atol=0)
    default, _ = sdxl.eps_cond_uncond(z, t, sdxl.encode_text(PROMPTS), sdxl.encode_text([""]))
    assert (default - eps_cond).abs().max() > 1e-4


def test_empty_prompt_is_encoded_when_the_config_does_not_zero_it(tmp_path):
    from diffusion.teacher import load_teacher
    from diffusion.tiny import write_tiny_sdxl_teacher

    teacher = load_teacher(write_tiny_sdxl_teacher(tmp_path / "xl", force_zeros_for_empty_prompt=False))
    uncond = teacher.encode_text([""])
    assert uncond.hidden.abs().sum() > 0 and uncond.pooled.abs().sum() > 0


def test_micro_conditioning_of_a_centre_crop():
    """Hand-computed: the short side resized to R, the crop in that resized image, as SDXL's training records."""
    from pipeline.images import micro_conditioning

    assert micro_conditioning(64, 48, 32) == [48, 64, 0, 5, 32, 32]  # 64x48 -> 42x32 (42.7 truncated), left 5
    assert micro_conditioning(30, 60, 32) == [60, 30, 16, 0, 32, 32]  # 30x60 -> 32x64, crop top 16
    assert micro_conditioning(48, 48, 32) == [48, 48, 0, 0, 32, 32]


def test_sd_shards_of_schema_1_still_read_and_others_are_refused():
    from diffusion.errors import UserError
    from shards.format import recorded_micro
    from shards.manifest import check_compatible

    check_compatible({"schema_version": 1, "kind": "cfg"}, kind="cfg")
    with pytest.raises(UserError, match="schema_version 3"):
        check_compatible({"schema_version": 3, "kind": "cfg"}, kind="cfg")
    assert recorded_micro([{"source_key": "a"}, {"source_key": "b"}]) is None  # schema 1: no micro
    assert recorded_micro([{"micro": [1, 2, 3, 4, 5, 6]}]).tolist() == [[1, 2, 3, 4, 5, 6]]


def test_sdxl_shards_record_micro_and_a_fresh_teacher_pass_recomputes_them(sdxl_shards, sdxl):
    info = json.loads((sdxl_shards / "dataset.json").read_text())
    assert info["schema_version"] == 2 and info["teacher"]["fingerprint"] == sdxl.fingerprint
    records = list(read_records(sdxl_shards).values())
    assert records and all(r.meta["micro"] == [48, 48, 0, 0, 32, 32] for r in records)  # the source's 48 px squares
    uncond = sdxl.encode_text([""])
    for record in records[:6]:
        z_t, t = record.tensors["zt"].float()[None], torch.tensor([record.t])
        cond = sdxl.encode_text([record.caption]).with_micro(torch.tensor(record.meta["micro"]))
        eps_cond, eps_uncond = sdxl.eps_cond_uncond(z_t, t, cond, uncond)
        torch.testing.assert_close(record.tensors["eps_cond"].float(), eps_cond[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(record.tensors["eps_uncond"].float(), eps_uncond[0], atol=2e-3, rtol=2e-3)


def test_sdxl_shards_refuse_the_sd_teacher(sdxl_shards, teacher_dir, tmp_path, capsys):
    assert trainer_main(fit_args("cfg-distill", teacher_dir, sdxl_shards, tmp_path / "s", "--max-steps", 1)) == 2
    assert "teacher fingerprint" in capsys.readouterr().err


def test_cfg_distill_on_sdxl_learns_and_loads_in_the_sdxl_pipeline(sdxl_dir, sdxl, sdxl_shards, tmp_path):
    """The student learns the guided target on the records' own micro-conditioning, and the folder is a
    StableDiffusionXLPipeline that samples with one UNet pass per step."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from helpers import count_unet_calls

    from diffusion.unet import unet_eps
    from shards.format import recorded_micro

    out = tmp_path / "student"
    assert trainer_main(fit_args("cfg-distill", sdxl_dir, sdxl_shards, out, "--max-steps", 30, "--batch-size", 8,
                                 "--lr", "3e-4", "--checkpoint-every", 30)) == 0
    records = list(read_records(sdxl_shards).values())[:16]
    z_t = torch.stack([r.tensors["zt"] for r in records]).float()
    t = torch.tensor([r.t for r in records])
    text = sdxl.encode_text([r.caption for r in records]).with_micro(recorded_micro([r.meta for r in records]))
    eps_cond, eps_uncond = (torch.stack([r.tensors[n] for r in records]).float() for n in ("eps_cond", "eps_uncond"))
    target = eps_uncond + 7.5 * (eps_cond - eps_uncond)
    student = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    with torch.no_grad():
        eps_student = unet_eps(student, sdxl.schedule, z_t, t, text)
    assert (eps_student - target).pow(2).mean() < 0.8 * (eps_cond - target).pow(2).mean()

    pipe = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    calls = count_unet_calls(pipe.unet)
    image = pipe("a red square", num_inference_steps=3, guidance_scale=1.0, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and [c["batch"] for c in calls] == [1, 1, 1]


@pytest.fixture(scope="module")
def sdxl_w_student(tmp_path_factory, sdxl_dir, sdxl_shards):
    return train_w_student(tmp_path_factory.mktemp("w-student") / "w", sdxl_dir, sdxl_shards, 3)


def test_w_distill_on_sdxl_takes_w_through_the_sdxl_pipelines_timestep_cond(sdxl_w_student):
    from diffusers import StableDiffusionXLPipeline
    from helpers import count_unet_calls

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_w_student, local_files_only=True)
    calls = count_unet_calls(pipe.unet)
    pipe("a red square", num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="latent")
    assert [c["batch"] for c in calls] == [1, 1] and all(c["timestep_cond"] is not None for c in calls)


def test_progressive_and_classifier_distill_on_sdxl(sdxl_dir, sdxl_w_student, sdxl_shards, clean_source, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "progressive"
    assert trainer_main(["fit", "--method", "progressive", "--student", str(sdxl_w_student), "--shards",
                         str(sdxl_shards), "--out", str(out), "--start-steps", "2", "--end-steps", "1",
                         "--iters-per-round", "2", "--batch-size", "4", "--ema-decay", "0", "--num-workers", "0",
                         "--report-to", "none"]) == 0
    round_1 = out / "round-01steps"
    assert json.loads((round_1 / "distillation.json").read_text())["steps"] == 1
    StableDiffusionXLPipeline.from_pretrained(round_1, local_files_only=True)

    blue = tmp_path / "blue-shards"
    assert pipeline_main(build_args(sdxl_dir, clean_source, blue, "--guidance", "blue", "--samples", 8)) == 0
    assert trainer_main(fit_args("classifier-distill", sdxl_dir, blue, tmp_path / "blue", "--max-steps", 2,
                                 "--guidance-scale", 10)) == 0
    assert json.loads((tmp_path / "blue" / "distillation.json").read_text())["method"] == "classifier-distill"


def test_sid_lsg_on_sdxl_is_its_stock_pipeline_at_t_init_and_trains_a_lora(sdxl_dir, sdxl, tmp_path):
    """The one-step generator sampled by StableDiffusionXLPipeline with the recorded recipe equals sid_one_step on
    the teacher's default micro-conditioning; a LoRA generator trains on the same teacher."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from helpers import sid_args

    from diffusion.samplers import initial_noise, sid_one_step

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue house\n")
    out = tmp_path / "sid"
    assert trainer_main(sid_args(sdxl_dir, prompts, out, "--max-kimg", 0.002, "--ema-halflife-kimg", 0)) == 0
    t_init = json.loads((out / "distillation.json").read_text())["t_init"]
    generator = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    z = initial_noise([3], (4, 16, 16))
    pipe = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    with torch.no_grad():
        ours = sid_one_step(generator, sdxl.schedule, z, t_init, sdxl.encode_text(["a red cat"]))
        stock = pipe("a red cat", timesteps=[t_init], guidance_scale=1.0, latents=z.clone(),
                     output_type="latent").images
    assert relative(stock, ours) <= 1e-4

    lora = tmp_path / "sid-lora"
    assert trainer_main(sid_args(sdxl_dir, prompts, lora, "--max-kimg", 0.002, "--ema-halflife-kimg", 0,
                                 "--lora-rank", 4, "--merge")) == 0
    StableDiffusionXLPipeline.from_pretrained(lora, local_files_only=True)


def test_cfg_distill_lora_on_sdxl_loads_in_the_sdxl_pipeline_diffusers_and_kohya(sdxl_dir, sdxl_shards, tmp_path):
    """The adapter through StableDiffusionXLPipeline.load_lora_weights (diffusers file, and the kohya file through
    diffusers' converter) gives the merged student's UNet outputs."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors import safe_open

    from students.lora import KOHYA_FILE

    out = tmp_path / "lora"
    assert trainer_main(fit_args("cfg-distill", sdxl_dir, sdxl_shards, out, "--max-steps", 4, "--lr", 1e-2,
                                 "--lora-rank", 4, "--lora-alpha", 8, "--merge")) == 0
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([10, 700]))
    kwargs = dict(encoder_hidden_states=torch.randn(2, 77, 64, generator=generator),
                  added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=generator),
                                     "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)})
    with torch.no_grad():
        merged = UNet2DConditionModel.from_pretrained(out, subfolder="unet")(*inputs, **kwargs).sample
        base = UNet2DConditionModel.from_pretrained(sdxl_dir, subfolder="unet")(*inputs, **kwargs).sample
        assert relative(base, merged) > 1e-3
        for weight_name in (None, KOHYA_FILE):
            pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, local_files_only=True)
            pipe.load_lora_weights(out, **({"weight_name": weight_name} if weight_name else {}))
            assert relative(pipe.unet(*inputs, **kwargs).sample, merged) <= 1e-4
    with safe_open(str(out / KOHYA_FILE), "pt") as kohya:
        assert all(k.startswith("lora_unet_") for k in kohya.keys())

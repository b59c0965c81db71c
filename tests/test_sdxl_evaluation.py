"""`evaluation` on a tiny SDXL-layout teacher (and students in its layout): rendered at the model's side through
the folder's own pipeline class or our samplers, with the same protocol as SD (sockets blocked)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.cli import main
from helpers import assert_images_close, write_tiny_coco

STEPS = 2
SEED = 3


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_tiny_coco(tmp_path_factory.mktemp("coco"), images=4)


@pytest.fixture(scope="module")
def w_student_dir(tmp_path_factory, sdxl_dir):
    """The SDXL teacher's UNet with a (random, so that w matters) guidance embedding, in the teacher's layout."""
    from diffusion.teacher import load_unet
    from diffusion.unet import add_guidance_embedding
    from students.folder import copy_teacher_components

    out = tmp_path_factory.mktemp("students") / "sdxl-w"
    unet = add_guidance_embedding(load_unet(sdxl_dir), embedding_dim=16)
    torch.manual_seed(0)
    torch.nn.init.normal_(unet.time_embedding.cond_proj.weight, std=0.5)
    copy_teacher_components(sdxl_dir, out)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    return out


def _render(model, coco, out, count: int = 3) -> list[np.ndarray]:
    args = ["render", "--model", model, "--coco", str(coco), "--num-images", str(count), "--num-inference-steps",
            str(STEPS), "--seed", str(SEED), "--out", str(out)]
    assert main(args) == 0
    return [np.asarray(Image.open(out / "images" / f"{i:05d}.png")) for i in range(count)]


def test_render_sdxl_teacher_without_and_with_cfg_as_its_own_pipeline(sdxl_dir, coco, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from diffusion.resolution import vae_factor
    from diffusion.samplers import initial_noise

    plain = _render(f"{sdxl_dir}@cfg=1", coco, tmp_path / "plain")
    cfg = _render(f"{sdxl_dir}@cfg=7.5", coco, tmp_path / "cfg")
    blue = _render(f"{sdxl_dir}@blue=100", coco, tmp_path / "blue")  # our classifier-guided DDIM
    for images in (plain, cfg, blue):
        assert [a.shape for a in images] == [(32, 32, 3)] * 3  # the UNet's sample_size x the VAE's factor
    assert np.abs(plain[0].astype(int) - cfg[0]).max() > 0 and np.abs(plain[0].astype(int) - plain[1]).max() > 0
    # The teacher at CFG is StableDiffusionXLPipeline itself: the same image from the same noise.
    prompts = json.loads((tmp_path / "cfg" / "prompts.json").read_text())["prompts"]
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    side = 32 // vae_factor(sdxl_dir)
    noise = initial_noise([SEED], (pipe.unet.config.in_channels, side, side))
    with torch.no_grad():
        stock = pipe(prompts[:1], num_inference_steps=STEPS, guidance_scale=7.5, latents=noise, output_type="np").images
    assert_images_close([(stock[0] * 255).round().astype(np.uint8)], [cfg[0]])


def test_generate_with_the_sdxl_teacher_is_render_image_0(sdxl_dir, coco, tmp_path, capsys):
    rendered = _render(str(sdxl_dir), coco, tmp_path / "r", count=1)
    prompt = json.loads((tmp_path / "r" / "prompts.json").read_text())["prompts"][0]
    out = tmp_path / "one.png"
    assert main(["generate", "--model", str(sdxl_dir), "--prompt", prompt, "--seed", str(SEED), "--out", str(out),
                 "--num-inference-steps", str(STEPS)]) == 0
    assert "teacher cfg 7.5" in capsys.readouterr().out
    assert_images_close([np.asarray(Image.open(out))], rendered[:1])


def test_sdxl_students_render_through_the_pipeline_and_our_samplers(sdxl_dir, w_student_dir):
    """A w-student through StableDiffusionXLPipeline (w as timestep_cond), a progressive student on its own grid
    and a one-step generator: our samplers take the SDXL teacher's conditioning, at the side rendered."""
    from evaluation.models import ModelSpec
    from evaluation.render import Renderer

    cpu = torch.device("cpu")
    prompts, seeds = ["a red circle", "a blue square"], [0, 1]
    images = {}
    for name, spec, resolution in [
        ("w2", ModelSpec(w_student_dir, "w-distill", 2.0), None),
        ("w6", ModelSpec(w_student_dir, "w-distill", 6.0), None),
        ("progressive", ModelSpec(w_student_dir, "progressive", 4.0, steps=2), None),
        ("stochastic", ModelSpec(w_student_dir, "progressive", 4.0, steps=2, sampler="stochastic"), None),
        ("sid", ModelSpec(sdxl_dir, "sid-lsg", 1.0, t_init=625), None),
        ("sid64", ModelSpec(sdxl_dir, "sid-lsg", 1.0, t_init=625), 64),
    ]:
        renderer = Renderer(spec, STEPS, "fp32", cpu, resolution=resolution)
        images[name] = np.stack([np.asarray(image) for image in renderer.render(prompts, seeds)])
        side = resolution or 32
        assert images[name].shape == (2, side, side, 3), name
    assert np.abs(images["w2"].astype(int) - images["w6"]).max() > 0  # w reaches the SDXL UNet
    assert np.abs(images["progressive"].astype(int) - images["stochastic"]).max() > 0


def test_speed_on_the_sdxl_teacher(sdxl_dir, tmp_path):
    """One model only: each is measured in a fresh process, which costs more than the tiny model's runs."""
    out = tmp_path / "speed"
    assert main(["speed", "--model", f"{sdxl_dir}@cfg=7.5", "--out", str(out), "--num-inference-steps", str(STEPS),
                 "--repeats", "1"]) == 0
    (result,) = json.loads((out / "speed.json").read_text())["results"]
    assert result["unet_passes_per_step"] == 2.0  # cond + uncond in one batch
    assert result["seconds_per_image"] > 0 and result["time_over_cfg_teacher"] == 1.0
    assert (out / "speed.md").is_file() and (out / "speed.png").is_file()


def test_each_pipeline_decodes_in_fp16_as_it_does_itself(sdxl_dir, teacher_dir):
    """StableDiffusionXLPipeline upcasts its VAE (the config says force_upcast): UNet float16, decode float32.
    StableDiffusionPipeline decodes in float16, as before SDXL, and still gets no safety checker."""
    from evaluation.models import describe_model
    from evaluation.render import Renderer

    sdxl = Renderer(describe_model(str(sdxl_dir)), STEPS, "fp16", torch.device("cpu"))
    assert type(sdxl.pipe).__name__ == "StableDiffusionXLPipeline"
    assert sdxl.unet.dtype == torch.float16 and sdxl.vae.dtype == torch.float32
    sd = Renderer(describe_model(str(teacher_dir)), STEPS, "fp16", torch.device("cpu"))
    assert type(sd.pipe).__name__ == "StableDiffusionPipeline" and sd.pipe.safety_checker is None
    assert sd.unet.dtype == torch.float16 and sd.vae.dtype == torch.float16

"""Students in stock diffusers: the code each distillation.json records, run as written, against our samplers.

sid-lsg: StableDiffusionPipeline with trailing Euler and timesteps=[t_init] gives sid_one_step's x_g, and the
image `evaluation generate` writes for the seed. Progressive: the round folder's scheduler gives grid_ddim's
latents, also for a step count that does not divide 1000 (3); its img2img and inpainting recipes run on its grid.
"""

from __future__ import annotations

import copy
import json

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.samplers import grid_ddim, initial_noise, sid_one_step, step_grid
from diffusion.unet import add_guidance_embedding
from evaluation.cli import main as evaluation_main
from helpers import assert_images_close, relative, sid_args
from trainer.cli import main as trainer_main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

PROMPT, SEED, W = "a red cat", 11, 3.0
NAMES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
         "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler")


def run_recorded(code: str, **values) -> dict:
    """Execute a recorded recipe as written, with diffusers' classes, torch and `values` in scope; its names."""
    scope = {"torch": torch, **{name: getattr(diffusers, name) for name in NAMES}, **values}
    exec(code, scope)
    return scope


def generated(folder, tmp_path, *extra) -> np.ndarray:
    """The image `evaluation generate` writes for PROMPT and SEED."""
    png = tmp_path / "generate.png"
    assert evaluation_main(["generate", "--model", str(folder), "--prompt", PROMPT, "--seed", str(SEED),
                            "--out", str(png), *extra]) == 0
    return np.asarray(Image.open(png).convert("RGB"))


def test_sid_generator_in_stock_diffusers_is_sid_one_step(teacher_dir, teacher, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue house\n")
    out = tmp_path / "sid"
    assert trainer_main(sid_args(teacher_dir, prompts, out, "--max-kimg", 0.002, "--ema-halflife-kimg", 0)) == 0
    record = json.loads((out / "distillation.json").read_text())
    t_init = record["t_init"]
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert f"timesteps=[{t_init}]" in record["inference"]["diffusers"]
    scope = run_recorded(record["inference"]["diffusers"], prompt=PROMPT, seed=SEED)
    pipe = scope["pipe"]
    generator = diffusers.UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    side = generator.config.sample_size
    z = initial_noise([SEED], (4, side, side))
    with torch.no_grad():  # the generator as trained: the training teacher's schedule, not OUT's scheduler
        ours = sid_one_step(generator, teacher.schedule, z, t_init, teacher.encode_text([PROMPT]))
        stock = pipe(PROMPT, timesteps=[t_init], guidance_scale=1.0, latents=z.clone(), output_type="latent").images
    assert relative(stock, ours) <= 1e-4
    assert_images_close([np.asarray(scope["image"])], [generated(out, tmp_path)])


def export(teacher_dir, teacher, tmp_path, steps: int):
    """A progressive round folder for `steps` as export_round writes it, around a w-conditioned copy of the tiny
    teacher's UNet whose w embedding is random (so w matters); training is tests/test_progressive.py's."""
    from trainer.config import ProgressiveConfig
    from trainer.progressive import export_round
    from trainer.resume import TrainState

    torch.manual_seed(steps)
    unet = add_guidance_embedding(copy.deepcopy(teacher.unet), 16)
    torch.nn.init.normal_(unet.time_embedding.cond_proj.weight, std=0.5)
    cfg = ProgressiveConfig(student=str(teacher_dir), shards=str(tmp_path), out=str(tmp_path),
                            start_steps=2 * steps, end_steps=steps)
    start_record = {"teacher": {"path": str(teacher_dir)}}
    folder = export_round(cfg, unet, start_record, teacher_dir, steps, (1.0, 4.0), TrainState(), 4,
                          {"data_sha256": ""}, teacher.schedule)
    return folder, unet, json.loads((folder / "distillation.json").read_text())


@pytest.mark.parametrize("steps, scheduler", [(3, "DPMSolverMultistepScheduler"), (2, "DDIMScheduler")])
def test_progressive_round_in_stock_diffusers_is_grid_ddim(teacher_dir, teacher, tmp_path, steps, scheduler):
    folder, unet, record = export(teacher_dir, teacher, tmp_path, steps)
    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == ["diffusers", scheduler]
    assert record["inference"]["timesteps"] == step_grid(steps, 1000)
    scope = run_recorded(record["inference"]["diffusers"], prompt=PROMPT, seed=SEED, w=W)
    z = initial_noise([SEED], (4, unet.config.sample_size, unet.config.sample_size))
    with torch.no_grad():
        ours = grid_ddim(unet, teacher.schedule, z, teacher.encode_text([PROMPT]), steps, torch.tensor([W]))
        stock = scope["pipe"](PROMPT, num_inference_steps=steps, guidance_scale=W, latents=z.clone(),
                              output_type="latent").images
    assert relative(stock, ours) <= 1e-4
    assert_images_close([np.asarray(scope["image"])], [generated(folder, tmp_path, "--guidance-scale", str(W))])


def test_progressive_round_img2img_and_inpainting_run_on_its_grid(teacher_dir, teacher, tmp_path):
    folder, unet, record = export(teacher_dir, teacher, tmp_path, 2)
    init_image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = Image.fromarray(np.tile(np.arange(32) >= 16, (32, 1)).astype(np.uint8) * 255)
    seen = []  # (timestep, w given) of each UNet pass
    scope = run_recorded(record["inference"]["diffusers"], prompt=PROMPT, seed=SEED, w=W)
    scope["pipe"].unet.register_forward_pre_hook(
        lambda _module, args, kwargs: seen.append((int(args[1]), kwargs["timestep_cond"] is not None)),
        with_kwargs=True)
    scope = run_recorded(record["inference"]["img2img"], **scope, k=1, init_image=init_image, mask=mask)
    grid = record["inference"]["timesteps"]
    assert seen == [(grid[1], True)] * 2  # img2img, then inpainting: k = 1 step each, from the grid's last point
    assert scope["image"].size == (32, 32)
    for pipe in (scope["img2img"], scope["inpaint"]):
        extra = {"mask_image": mask} if pipe is scope["inpaint"] else {}
        seen.clear()
        image = pipe(PROMPT, image=init_image, strength=1.0, num_inference_steps=2, guidance_scale=W,
                     output_type="np", **extra).images
        assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
        assert [t for t, _ in seen] == grid  # strength 1 = k = N: the whole grid

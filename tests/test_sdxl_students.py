"""Student folders name their teacher's pipeline class (students.folder.pipeline_class) in every recipe, code
string and card they write: an SDXL teacher's say StableDiffusionXLPipeline, and their code samples the folder in
it as written; an SD teacher's say exactly what they always did."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.teacher import load_teacher, load_unet
from students.folder import inference_recipe, pipeline_class, save_student

SD, SDXL = "StableDiffusionPipeline", "StableDiffusionXLPipeline"
FAMILIES = [("teacher_dir", SD), ("sdxl_dir", SDXL)]  # (the tiny teacher's fixture, its pipeline class)


def cfg_record(root) -> dict:
    """trainer/fit.py `_record`'s keys the card reads, with its inference recipe."""
    return {"method": "cfg-distill", "guidance_scale": 7.5, "teacher": {"path": str(root.resolve())}, "steps": 1,
            "inference": inference_recipe("cfg-distill", 7.5, None, pipeline_class(root))}


def sid_record(root) -> dict:
    """trainer/sid.py `_record` itself, for a run that has not trained yet."""
    from trainer.sid import SidState, _record
    from trainer.sid_config import SidConfig

    cfg = SidConfig(teacher=str(root), prompts="prompts.txt", out="out", kappa1=1.2, kappa2=1.2, kappa3=1.2,
                    kappa4=1.5)
    prompts = SimpleNamespace(prompts=["a red cat"], sha256="ab" * 32, empty_skipped=0, undecodable_skipped=0)
    nets = SimpleNamespace(teacher=load_teacher(root, with_unet_and_vae=False))
    return _record(cfg, prompts, SimpleNamespace(truncated=0), nets, SidState(), 1)


def expected(recipe: str, pipeline: str, out) -> tuple[str, str]:
    """The recipe's "pipeline" and "diffusers" as they read before SDXL, with `pipeline` for the class name."""
    load = f'pipe = {pipeline}.from_pretrained("{out.resolve()}")\n'
    if recipe == "cfg":
        return pipeline, load + "image = pipe(prompt, guidance_scale=1.0).images[0]"
    return (f"{pipeline} with EulerDiscreteScheduler (trailing; OUT's own), timesteps=[625], guidance_scale=1.0: "
            "the same x_g and image",
            load + "pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, "
            "timestep_spacing='trailing')\nimage = pipe(prompt, timesteps=[625], guidance_scale=1.0, "
            "generator=torch.Generator().manual_seed(seed)).images[0]")


def card_code(folder) -> str:
    card = (folder / "README.md").read_text()
    return card.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("recipe", ["cfg", "sid"])
@pytest.mark.parametrize("fixture, pipeline", FAMILIES)
def test_student_folder_names_and_loads_in_its_teachers_pipeline(request, tmp_path, fixture, pipeline, recipe):
    root = request.getfixturevalue(fixture)
    out = tmp_path / "student"
    save_student(load_unet(root), root, out, (cfg_record if recipe == "cfg" else sid_record)(root))
    inference = json.loads((out / "distillation.json").read_text())["inference"]
    assert (inference["pipeline"], inference["diffusers"]) == expected(recipe, pipeline, out)
    code = card_code(out)
    assert inference["diffusers"] in code
    assert (f"from diffusers import {pipeline}" if recipe == "cfg"
            else f"import torch\nfrom diffusers import EulerDiscreteScheduler, {pipeline}\n") in code
    exec(code, scope := {})  # the card's code, which is distillation.json's plus its imports, runs as written
    assert type(scope["pipe"]).__name__ == pipeline and scope["image"].size == (32, 32)


def test_sdxl_lora_student_loads_its_adapter_in_stock_sdxl(sdxl_dir, tmp_path):
    """The LoRA file (UNet keys only, written through StableDiffusionPipeline.save_lora_weights) loads whole in
    StableDiffusionXLPipeline by the recorded code; `trainer export --to` names the class too."""
    from peft import get_peft_model_state_dict

    from students.lora import adapter_state, save_lora_student, write_merged_pipeline
    from trainer.student import DEFAULT_ADAPTER, LoraSpec, make_student

    lora, out = LoraSpec(4, 8.0), tmp_path / "lora"
    unet = make_student(load_unet(sdxl_dir), lora)
    torch.manual_seed(0)
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    save_lora_student(unet, DEFAULT_ADAPTER, lora, sdxl_dir, None, out, cfg_record(sdxl_dir), merge=False)
    code = json.loads((out / "distillation.json").read_text())["inference"]["diffusers"]
    assert code.startswith(f'pipe = {SDXL}.from_pretrained("{sdxl_dir.resolve()}")\n'
                           f'pipe.load_lora_weights("{out.resolve()}")\n')
    exec(card_code(out), scope := {})
    loaded = get_peft_model_state_dict(scope["pipe"].unet, adapter_name=scope["pipe"].unet.active_adapters()[0])
    trained = adapter_state(unet, DEFAULT_ADAPTER)
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k].float(), trained[k]) for k in trained)

    applied = write_merged_pipeline(out, sdxl_dir, tmp_path / "applied")
    inference = json.loads((applied / "distillation.json").read_text())["inference"]
    assert inference["diffusers"] == expected("cfg", SDXL, applied)[1]


def test_sdxl_progressive_round_recipes_run_in_the_sdxl_family(sdxl_dir, tmp_path):
    """export_round's text, img2img and inpainting code: StableDiffusionXL{,Img2Img,Inpaint}Pipeline, run as
    written (tests/test_stock_diffusers.py checks the SD round's latents against grid_ddim)."""
    from diffusion.unet import add_guidance_embedding
    from trainer.config import ProgressiveConfig
    from trainer.progressive import export_round
    from trainer.resume import TrainState

    teacher = load_teacher(sdxl_dir)
    unet = add_guidance_embedding(copy.deepcopy(teacher.unet), 16)
    cfg = ProgressiveConfig(student=str(sdxl_dir), shards=str(tmp_path), out=str(tmp_path), start_steps=4,
                            end_steps=2)
    folder = export_round(cfg, unet, {"teacher": {"path": str(sdxl_dir)}}, sdxl_dir, 2, (1.0, 4.0), TrainState(),
                          4, {"data_sha256": ""}, teacher.schedule)
    inference = json.loads((folder / "distillation.json").read_text())["inference"]
    assert inference["pipeline"].startswith(f"{SDXL} with DDIMScheduler (trailing")
    assert inference["diffusers"].startswith(f'pipe = {SDXL}.from_pretrained("{folder.resolve()}")\n')
    assert "StableDiffusionXLImg2ImgPipeline.from_pipe" in inference["img2img"]
    assert "StableDiffusionXLInpaintPipeline.from_pipe" in inference["img2img"]
    init_image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = Image.fromarray(np.tile(np.arange(32) >= 16, (32, 1)).astype(np.uint8) * 255)
    scope = {"torch": torch, "prompt": "a red cat", "seed": 11, "w": 3.0, "k": 1, "init_image": init_image,
             "mask": mask, **{name: getattr(diffusers, name) for name in
                              (SDXL, "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
                               "DDIMScheduler")}}
    exec(inference["diffusers"], scope)
    exec(inference["img2img"], scope)
    assert scope["image"].size == (32, 32)
    assert type(scope["inpaint"]).__name__ == "StableDiffusionXLInpaintPipeline"

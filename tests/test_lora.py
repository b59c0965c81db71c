"""LoRA students (peft): what trains, what is written (diffusers and kohya files, the merged pipeline), that every
way a stock user loads them gives the trained student's outputs, exact resume, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import fit_args, relative
from students.lora import EMBEDDING_FILE, KOHYA_FILE, LORA_FILE
from trainer.cli import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

LORA = ("--lora-rank", 4, "--lora-alpha", 8)


def _inputs(unet, batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    return (torch.randn(batch, 4, size, size, generator=generator), torch.tensor([10, 500, 990][:batch]),
            torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator))


@torch.no_grad()
def _out(unet, inputs, **kwargs):
    return unet(*inputs, **kwargs).sample


def _trained_student(teacher_dir, out, step, w_dim=None):
    """The student as the loop held it at `step`: the teacher's UNet + a fresh adapter + the checkpoint's weights."""
    from diffusion.teacher import load_unet
    from diffusion.unet import add_guidance_embedding
    from trainer.checkpoint import load_state
    from trainer.student import LoraSpec, TrainedWeights, make_student

    unet = load_unet(teacher_dir)
    also = ()
    if w_dim:
        unet, also = add_guidance_embedding(unet, w_dim), ("time_embedding.cond_proj.weight",)
    student = make_student(unet, LoraSpec(4, 8.0), also)
    TrainedWeights(student).load_state_dict(load_state(out / f"checkpoints/step-{step:08d}", "unet"))
    return student.eval()


def test_cfg_distill_lora_files_load_in_stock_diffusers_kohya_and_merged(teacher_dir, cfg_shards, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "lora"
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, out, "--max-steps", 4, "--lr", 1e-2,
                         "--checkpoint-every", 4, *LORA, "--merge")) == 0
    record = json.loads((out / "distillation.json").read_text())
    adapter = record["adapter"]
    assert adapter["rank"] == 4 and adapter["alpha"] == 8.0 and adapter["merged_pipeline"]
    assert "to_q" in adapter["target_modules"] and adapter["files"] == {"diffusers": LORA_FILE, "kohya": KOHYA_FILE}
    checkpoint = load_file(str(out / "checkpoints/step-00000004/unet.safetensors"))
    assert checkpoint and all("lora_" in k for k in checkpoint)  # the adapter alone, not the frozen base

    student = _trained_student(teacher_dir, out, 4)
    inputs = _inputs(student)
    expected = _out(student, inputs)
    teacher = UNet2DConditionModel.from_pretrained(teacher_dir, subfolder="unet")
    assert relative(_out(teacher, inputs), expected) > 1e-3  # the adapter moved the student

    pipe = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None)
    pipe.load_lora_weights(out)  # the stock call: pytorch_lora_weights.safetensors by its default name
    assert relative(_out(pipe.unet, inputs), expected) <= 1e-4
    pipe = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None)
    pipe.load_lora_weights(out, weight_name=KOHYA_FILE)  # the kohya file, through diffusers' kohya converter
    assert relative(_out(pipe.unet, inputs), expected) <= 1e-4
    merged = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert relative(_out(merged, inputs), expected) <= 1e-4

    applied = tmp_path / "applied"  # the acceleration-module path, here onto the adapter's own base
    assert main(["export", str(out), "--base", str(teacher_dir), "--to", str(applied)]) == 0
    merged = UNet2DConditionModel.from_pretrained(applied, subfolder="unet")
    assert relative(_out(merged, inputs), expected) <= 1e-4
    record = json.loads((applied / "distillation.json").read_text())
    assert str(applied.resolve()) in record["inference"]["diffusers"] and record["adapter"]["files"] == {}
    assert main(["export", str(applied)]) == 2  # its adapter files stayed in OUT

    with safe_open(str(out / KOHYA_FILE), "pt") as kohya:
        keys = list(kohya.keys())
        alpha = kohya.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert all(k.startswith("lora_unet_") for k in keys) and alpha.item() == 8.0
    assert any(k.endswith("attn1_to_q.lora_down.weight") for k in keys)


def test_w_distill_lora_ships_its_guidance_embedding_and_export_merges_later(teacher_dir, cfg_shards, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "w-lora"
    assert main(fit_args("w-distill", teacher_dir, cfg_shards, out, "--max-steps", 3, "--lr", 1e-2,
                         "--checkpoint-every", 3, "--w-embedding-dim", 16, *LORA)) == 0
    assert not (out / "unet").exists()  # no merged pipeline unless asked
    embedding = load_file(str(out / EMBEDDING_FILE))["time_embedding.cond_proj.weight"]
    assert embedding.shape[1] == 16 and embedding.abs().max() > 0  # trained from zero

    student = _trained_student(teacher_dir, out, 3, w_dim=16)
    from diffusion.unet import w_condition

    inputs = _inputs(student)
    cond = w_condition(torch.full((3,), 5.0), student)
    expected = _out(student, inputs, timestep_cond=cond)
    # the recipe distillation.json gives: the base UNet with the embedding's shape, the embedding, the adapter
    unet = UNet2DConditionModel.from_pretrained(teacher_dir, subfolder="unet", time_cond_proj_dim=16,
                                                low_cpu_mem_usage=False)
    unet.load_state_dict(load_file(str(out / EMBEDDING_FILE)), strict=False)
    pipe = StableDiffusionPipeline.from_pretrained(teacher_dir, unet=unet, safety_checker=None)
    pipe.load_lora_weights(out)
    assert relative(_out(pipe.unet, inputs, timestep_cond=cond), expected) <= 1e-4
    assert "time_cond_proj_dim=16" in json.loads((out / "distillation.json").read_text())["inference"]["diffusers"]

    assert main(["export", str(out)]) == 0
    merged = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert relative(_out(merged, inputs, timestep_cond=cond), expected) <= 1e-4
    assert json.loads((out / "distillation.json").read_text())["adapter"]["merged_pipeline"]


def test_lora_resume_equals_uninterrupted(teacher_dir, cfg_shards, tmp_path):
    """7 steps, then resume to 12 (with EMA and gradient accumulation) == 12 straight, adapter bit for bit."""
    extra = ["--checkpoint-every", 5, "--ema-decay", 0.99, "--gradient-accumulation-steps", 2, "--lr", 1e-3, *LORA]
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, tmp_path / "a", "--max-steps", 12, *extra)) == 0
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, tmp_path / "b", "--max-steps", 7, *extra)) == 0
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, tmp_path / "b", "--max-steps", 12, "--resume",
                         "latest", *extra)) == 0
    straight, resumed = (load_file(str(tmp_path / run / LORA_FILE)) for run in ("a", "b"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(v.abs().max() > 0 for k, v in straight.items() if "lora_B" in k)  # B starts at zero: it trained


def test_lora_refusals(teacher_dir, cfg_shards, tmp_path, capsys):
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, tmp_path / "x", "--lora-alpha", 4)) == 2
    assert "--lora-alpha and --lora-targets need --lora-rank" in capsys.readouterr().err
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, tmp_path / "x", "--lora-rank", 2,
                         "--lora-targets", "no_such_layer", "--max-steps", 1)) == 2
    assert "--lora-targets no_such_layer" in capsys.readouterr().err
    full = tmp_path / "full"
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, full, "--max-steps", 2, "--checkpoint-every", 1)) == 0
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, full, "--max-steps", 3, "--resume", "latest",
                         "--lora-rank", 2)) == 2
    assert "another run" in capsys.readouterr().err
    assert main(["export", str(full)]) == 2
    assert "not a LoRA student folder" in capsys.readouterr().err


def test_classifier_distill_lora_under_bf16_and_two_processes(teacher_dir, cfg_shards, blue_shards, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "blue-lora"
    assert main(fit_args("classifier-distill", teacher_dir, blue_shards, out, "--max-steps", 2, "--lora-rank", 2,
                         "--mixed-precision", "bf16")) == 0
    weights = load_file(str(out / LORA_FILE))
    assert weights and all(v.dtype == torch.float32 for v in weights.values())  # trained in float32 under autocast
    assert json.loads((out / "distillation.json").read_text())["method"] == "classifier-distill"

    ddp = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "trainer.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = fit_args("cfg-distill", teacher_dir, cfg_shards, ddp, "--max-steps", 3, "--batch-size", 2, "--lora-rank",
                    2, "--num-workers", 0)
    done = subprocess.run(launch + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((ddp / "distillation.json").read_text())
    assert record["global_batch_size"] == 4 and record["adapter"]["rank"] == 2

"""sid-lsg with LoRA: one UNet in memory (the teacher's) carrying the generator's, the fake network's and the EMA's
adapters; the teacher is that UNet with its adapters off. Exact resume, the exported adapter, two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from helpers import sid_args
from students.lora import LORA_FILE
from trainer.cli import main as trainer_main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

LORA = ("--lora-rank", 4, "--lora-alpha", 4)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(f"a {w} {thing}" for w in ("red", "blue", "tiny") for thing in ("cat", "house")) + "\n")
    return path


def test_one_base_carries_three_adapters_and_the_teacher_stays_the_teacher(teacher_dir, prompt_file, tmp_path):
    from diffusion.teacher import load_unet
    from trainer.fit import make_accelerator
    from trainer.prompts import read_prompts
    from trainer.sid import FAKE, GENERATOR, SidLoop, SidState
    from trainer.sid_config import SidConfig

    cfg = SidConfig(teacher=str(teacher_dir), prompts=str(prompt_file), out=str(tmp_path), batch_size=2, lr=1e-2,
                    ema_halflife_kimg=0.002, report_to="none", lora_rank=4)
    loop = SidLoop.build(cfg, make_accelerator(cfg, grad_scaler=False), read_prompts(prompt_file).prompts)
    nets = loop.nets
    base = nets.teacher.unet.base
    assert nets.generator.base is base and nets.fake.base is base and nets.ema.model.base is base
    generator, fake, average = (set(map(id, m.parameters())) for m in (nets.generator, nets.fake, nets.ema.model))
    assert generator and not generator & fake and not generator & average and not fake & average
    assert not any(p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)  # the base is frozen

    plain = load_unet(teacher_dir)
    z, t, text = torch.randn(2, 4, 16, 16), torch.tensor([100, 800]), torch.randn(2, 77, 32)
    state = SidState()
    for _ in range(2):
        steps = loop.iteration(state)
    assert not steps[FAKE].skipped and not steps[GENERATOR].skipped
    with torch.no_grad():
        assert torch.equal(nets.teacher.unet(z, t, text).sample, plain(z, t, text).sample)  # adapters off
        outputs = [m(z, t, text).sample for m in (nets.generator, nets.fake, nets.ema.model)]
    assert all((o - plain(z, t, text).sample).abs().max() > 1e-4 for o in outputs[:2])  # both adapters trained
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4  # and differ


def test_lora_resume_equals_uninterrupted_and_the_export_is_the_ema_adapter(teacher_dir, prompt_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    common = ["--gradient-accumulation-steps", 2, "--ema-halflife-kimg", 0.004, "--checkpoint-every-kimg", 0.004,
              "--kappa", 1.5, "--kappa1", 2.0, "--lr", 1e-3, *LORA]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert trainer_main(sid_args(teacher_dir, prompt_file, straight, "--max-kimg", 0.012, *common, "--merge")) == 0
    assert trainer_main(sid_args(teacher_dir, prompt_file, split, "--max-kimg", 0.004, *common)) == 0
    assert trainer_main(sid_args(teacher_dir, prompt_file, split, "--max-kimg", 0.012, "--resume", "latest",
                                 *common)) == 0
    for part in ("generator", "generator_ema", "fake_score"):
        a = load_file(straight / "checkpoints/step-00000003" / f"{part}.safetensors")
        b = load_file(split / "checkpoints/step-00000003" / f"{part}.safetensors")
        assert a and all(torch.equal(a[k], b[k]) for k in a), part
    exported = load_file(straight / LORA_FILE)
    ema = load_file(straight / "checkpoints/step-00000003/generator_ema.safetensors")
    assert sorted(v.sum().item() for v in exported.values()) == pytest.approx(
        sorted(v.sum().item() for v in ema.values()), rel=1e-6)  # the exported adapter is the EMA's

    z, t, text = torch.randn(2, 4, 16, 16), torch.tensor([625, 625]), torch.randn(2, 77, 32)
    pipe = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None)
    pipe.load_lora_weights(straight)
    merged = StableDiffusionPipeline.from_pretrained(straight, safety_checker=None)
    with torch.no_grad():
        a, b = pipe.unet(z, t, text).sample, merged.unet(z, t, text).sample
    assert ((a - b).norm() / b.norm()).item() <= 1e-4
    record = json.loads((straight / "distillation.json").read_text())
    assert record["adapter"]["rank"] == 4 and record["adapter"]["merged_pipeline"] and record["method"] == "sid-lsg"
    card = (straight / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    assert "load_lora_weights" in code and "EulerDiscreteScheduler" in code
    scope = {}
    exec(code, scope)  # the model card's sampling code runs as written: teacher + adapter + trailing Euler
    assert scope["image"].size == (32, 32)


def test_gradient_checkpointing_is_refused_with_shared_adapters(teacher_dir, prompt_file, tmp_path, capsys):
    assert trainer_main(sid_args(teacher_dir, prompt_file, tmp_path / "o", *map(str, LORA),
                                 "--gradient-checkpointing")) == 2
    assert "--gradient-checkpointing does not apply to sid-lsg with --lora-rank" in capsys.readouterr().err


def test_lora_under_torchrun_two_processes(teacher_dir, prompt_file, tmp_path):
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "trainer.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch + sid_args(teacher_dir, prompt_file, out, "--max-kimg", 0.008, *map(str, LORA)),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "distillation.json").read_text())
    assert record["global_batch_size"] == 4 and record["iterations"] == 2 and record["adapter"]["rank"] == 4

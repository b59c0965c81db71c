"""`trainer fit --method sid-lsg` end to end on the tiny teacher: gradients, NaN guards, exact resume, two
processes, and the exported generator sampled by `evaluation` exactly as it was trained."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from helpers import sid_args
from trainer.cli import main as trainer_main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    words = ["red", "blue", "green", "tiny", "large"]
    path.write_text("\n".join(f"a {w} {thing}" for w in words for thing in ("cat", "house")) + "\n\n")
    return path


def _networks(teacher_dir, prompt_file, tmp_path, **overrides):
    from trainer.fit import make_accelerator
    from trainer.sid import build_networks
    from trainer.sid_config import SidConfig

    cfg = SidConfig(teacher=str(teacher_dir), prompts=str(prompt_file), out=str(tmp_path), batch_size=3, lr=1e-3,
                    ema_halflife_kimg=0, report_to="none", **overrides)
    accelerator = make_accelerator(cfg)
    return cfg, accelerator, build_networks(cfg, accelerator)


def _step(cfg, accelerator, nets, phase, prompt_file, iteration=0):
    from trainer.prompts import PromptSampler, read_prompts
    from trainer.sid import network_step
    from trainer.text_cache import TextEmbeddingCache

    cache = TextEmbeddingCache(nets.teacher.encode_text)
    sampler = PromptSampler(read_prompts(prompt_file).prompts, cfg.seed)
    config = nets.teacher.unet.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    return network_step(cfg, accelerator, nets, phase, sampler, cache, cache([""]), iteration, shape)


def test_generator_step_trains_the_generator_only_and_drops_a_planted_nan(teacher_dir, prompt_file, tmp_path):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    from trainer.sid import FAKE, GENERATOR

    cfg, accelerator, nets = _networks(teacher_dir, prompt_file, tmp_path)
    generator, fake = nets.generator, nets.fake
    fired = set()
    for name, module in (("generator", generator), ("fake", fake)):
        for p in module.parameters():
            p.register_hook(lambda grad, name=name: fired.add(name))
    before = [p.detach().clone() for p in generator.parameters()]

    def plant_nan(_module, _args, output):
        handle.remove()
        sample = output.sample.clone()
        sample[0] = math.nan
        return UNet2DConditionOutput(sample=sample)

    handle = nets.teacher.unet.register_forward_hook(plant_nan)
    _, kept = _step(cfg, accelerator, nets, GENERATOR, prompt_file)
    assert kept == 2  # sample 0's y_real was NaN: dropped, the other two trained on
    assert fired == {"generator"}  # through the fake net's activations, never into its weights
    assert all(p.grad is None for p in nets.teacher.unet.parameters())
    assert all(torch.isfinite(p).all() for p in generator.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, generator.parameters()))
    fired.clear()
    loss, kept = _step(cfg, accelerator, nets, FAKE, prompt_file, iteration=1)
    assert kept == 3 and math.isfinite(loss) and fired == {"fake"}  # the generator ran without gradient


def test_resume_equals_uninterrupted_with_ema_and_accumulation(teacher_dir, prompt_file, tmp_path):
    common = ["--gradient-accumulation-steps", 2, "--ema-halflife-kimg", 0.004, "--checkpoint-every-kimg", 0.004,
              "--kappa", 1.5, "--kappa1", 2.0]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert trainer_main(sid_args(teacher_dir, prompt_file, straight, "--max-kimg", 0.012, *common)) == 0
    assert trainer_main(sid_args(teacher_dir, prompt_file, split, "--max-kimg", 0.004, *common)) == 0
    assert trainer_main(sid_args(teacher_dir, prompt_file, split, "--max-kimg", 0.012, "--resume", "latest",
                                 *common)) == 0
    for part in ("generator", "generator_ema", "fake_score"):
        a = load_file(straight / "checkpoints/step-00000003" / f"{part}.safetensors")
        b = load_file(split / "checkpoints/step-00000003" / f"{part}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), part
    exported = load_file(straight / "unet/diffusion_pytorch_model.safetensors")
    ema = load_file(straight / "checkpoints/step-00000003/generator_ema.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)  # the exported generator is the EMA
    record = json.loads((straight / "distillation.json").read_text())
    assert record["kimg"] == 0.012 and record["iterations"] == 3 and record["global_batch_size"] == 4
    assert record["guidance"]["kappa1"] == 2.0 and record["guidance"]["kappa4"] == 1.5
    assert record["input_scale"] == pytest.approx(0.9286, abs=5e-5)


def test_exported_generator_reproduces_training_x_g_bit_for_bit(teacher_dir, prompt_file, tmp_path):
    from diffusers import UNet2DConditionModel

    from diffusion.samplers import initial_noise, sid_one_step
    from diffusion.teacher import load_teacher
    from evaluation.cli import main as evaluation_main
    from evaluation.models import describe_model
    from evaluation.render import Renderer
    from evaluation.speed import measure

    out = tmp_path / "gen"
    assert trainer_main(sid_args(teacher_dir, prompt_file, out, "--max-kimg", 0.004, "--ema-halflife-kimg", 0,
                                 "--grid-every-kimg", 0.004, "--grid-prompts", 4)) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["kimg-0000000.000.png", "kimg-0000000.004.png"]
    teacher = load_teacher(teacher_dir)
    generator = UNet2DConditionModel.from_pretrained(teacher_dir, subfolder="unet")
    generator.load_state_dict(load_file(out / "checkpoints/step-00000002/generator.safetensors"))
    prompt, seed = "a red cat", 11
    noise = initial_noise([seed], (4, generator.config.sample_size, generator.config.sample_size))
    with torch.no_grad():
        in_training = sid_one_step(generator, teacher.schedule, noise, 625, teacher.encode_text([prompt]))
    spec = describe_model(str(out))
    assert spec.kind == "sid-lsg" and spec.t_init == 625
    renderer = Renderer(spec, steps=50)
    assert renderer.steps == 1
    assert torch.equal(renderer.latents([prompt], [seed]), in_training)
    timing = measure(spec, [prompt] * 2, steps=25, repeats=1, dtype="fp32", device="cpu")
    assert timing["steps"] == 1 and timing["unet_passes_per_step"] == 1.0  # one pass per image, whatever was asked
    pngs = [tmp_path / "a.png", tmp_path / "b.png"]
    for png in pngs:
        assert evaluation_main(["generate", "--model", str(out), "--prompt", prompt, "--seed", str(seed),
                                "--out", str(png)]) == 0
    assert pngs[0].read_bytes() == pngs[1].read_bytes()
    assert evaluation_main(["generate", "--model", str(out), "--prompt", prompt, "--guidance-scale", "3",
                            "--out", str(pngs[0])]) == 2


def test_torchrun_two_processes(teacher_dir, prompt_file, tmp_path):
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "trainer.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch + sid_args(teacher_dir, prompt_file, out, "--max-kimg", 0.008), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "distillation.json").read_text())
    assert record["global_batch_size"] == 4 and record["iterations"] == 2 and record["kimg"] == 0.008
    assert sorted(p.name for p in (out / "checkpoints/step-00000002").glob("rng-rank*.json")) == [
        "rng-rank0.json", "rng-rank1.json"]


@pytest.mark.parametrize("argv, message", [
    (["--shards", "/tmp"], "--shards does not apply to --method sid-lsg"),
    (["--kappa", "0"], None),
    (["--t-min", "900", "--t-max", "100"], "--t-min"),
])
def test_cli_refusals(teacher_dir, prompt_file, tmp_path, capsys, argv, message):
    if message is None:  # a valid option: the run must get past the checks (a zero-image run is refused below)
        argv, message = ["--max-kimg", "0"], "--max-kimg must be positive"
    assert trainer_main(sid_args(teacher_dir, prompt_file, tmp_path / "o", *argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_cli_needs_prompts_and_refuses_sid_options_elsewhere(teacher_dir, tmp_path, capsys):
    assert trainer_main(["fit", "--method", "sid-lsg", "--teacher", str(teacher_dir), "--out", str(tmp_path)]) == 2
    assert trainer_main(["fit", "--method", "cfg-distill", "--teacher", str(teacher_dir), "--shards", str(tmp_path),
                         "--out", str(tmp_path), "--kappa", "2"]) == 2
    err = capsys.readouterr().err
    assert "--method sid-lsg needs --prompts" in err and "--kappa does not apply to --method cfg-distill" in err


def test_bf16_autocast_with_a_bf16_teacher_keeps_float32_weights(teacher_dir, prompt_file, tmp_path):
    out = tmp_path / "bf16"
    assert trainer_main(sid_args(teacher_dir, prompt_file, out, "--max-kimg", 0.004, "--mixed-precision", "bf16",
                                 "--gradient-checkpointing", "--ema-halflife-kimg", 0)) == 0
    weights = load_file(out / "unet/diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    record = json.loads((out / "distillation.json").read_text())
    assert record["mixed_precision"] == "bf16" and record["dropped_nonfinite_samples"] == 0
    config = json.loads((out / "checkpoints/step-00000002/trainer_state.json").read_text())["config"]
    assert config["teacher_precision"] == "bf16"

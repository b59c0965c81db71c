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
    accelerator = make_accelerator(cfg, grad_scaler=False)
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

    from trainer.optim import kernel
    from trainer.sid import FAKE, GENERATOR

    cfg, accelerator, nets = _networks(teacher_dir, prompt_file, tmp_path)
    assert kernel(nets.generator_optimizer) == kernel(nets.fake_optimizer) == "fused"  # trainer.optim's choice
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
    step = _step(cfg, accelerator, nets, GENERATOR, prompt_file)
    assert step.kept == 2 and not step.skipped  # sample 0's y_real was NaN: dropped, the other two trained on
    assert fired == {"generator"}  # through the fake net's activations, never into its weights
    assert all(p.grad is None for p in nets.teacher.unet.parameters())
    assert all(torch.isfinite(p).all() for p in generator.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, generator.parameters()))
    fired.clear()
    step = _step(cfg, accelerator, nets, FAKE, prompt_file, iteration=1)
    assert step.kept == 3 and math.isfinite(step.loss_sum) and fired == {"fake"}  # the generator ran without gradient


def _nan_in_sample_0(module, how: str):
    """A forward hook putting NaN in sample 0 of the module's output. "cut": assigned, so the backward never
    meets it; "product": output x (NaN, 1, 1), so the backward carries 0 x NaN = NaN as a real overflow would."""
    def hook(_module, _args, output):
        sample = output.sample if hasattr(output, "sample") else output
        if how == "cut":
            sample = sample.clone()
            sample[0] = math.nan
        else:
            factor = torch.ones(sample.shape[0], *([1] * (sample.ndim - 1)), dtype=sample.dtype,
                                device=sample.device)
            factor[0] = math.nan
            sample = sample * factor
        return type(output)(sample=sample) if hasattr(output, "sample") else sample
    return module.register_forward_hook(hook)


def test_nan_samples_under_bf16_are_dropped_and_the_steps_go_ahead(teacher_dir, prompt_file, tmp_path):
    """The official behaviour (drop the sample, clean the gradients, step), made real: a NaN that flows back
    from the teacher leaves the generator's gradient exactly that of the finite samples."""
    from trainer.sid import FAKE, GENERATOR, _unwrap

    cfg, accelerator, nets = _networks(teacher_dir, prompt_file, tmp_path, mixed_precision="bf16")
    generator, fake = _unwrap(nets.generator), _unwrap(nets.fake)
    seen = []
    for optimizer in (nets.fake_optimizer, nets.generator_optimizer):  # the gradients each step is taken with
        optimizer.optimizer.register_step_pre_hook(
            lambda opt, _a, _k: seen.append([p.grad.clone() for g in opt.param_groups for p in g["params"]]))
    before = [p.detach().clone() for p in fake.parameters()]
    handle = _nan_in_sample_0(generator, "product")  # a NaN image: the fake network must never see it
    step = _step(cfg, accelerator, nets, FAKE, prompt_file)
    handle.remove()
    assert (step.kept, step.skipped, step.cleaned) == (2, False, False) and len(seen) == 1
    assert all(torch.isfinite(p).all() and not torch.equal(a, p) for a, p in zip(before, fake.parameters()))

    start = {k: v.clone() for k, v in generator.state_dict().items()}
    for how in ("cut", "product"):
        generator.load_state_dict(start)
        handle = _nan_in_sample_0(nets.teacher.unet, how)
        step = _step(cfg, accelerator, nets, GENERATOR, prompt_file)
        handle.remove()
        assert (step.kept, step.skipped, step.cleaned) == (2, False, False), how
    cut, product = seen[1:]
    assert all(torch.equal(a, b) and a.abs().sum() > 0 for a, b in zip(cut, product))
    assert all(torch.isfinite(p).all() and not torch.equal(start[k], p) for k, p in generator.state_dict().items())

    handle = _nan_in_sample_0(generator.conv_in, "product")  # born inside the generator: it reaches the weights
    step = _step(cfg, accelerator, nets, GENERATOR, prompt_file, iteration=1)
    handle.remove()
    assert (step.kept, step.skipped, step.cleaned) == (2, False, True) and len(seen) == 4  # cleaned, still taken
    assert all(torch.isfinite(p).all() for p in generator.parameters())


def test_skipped_steps_are_counted_logged_checkpointed_and_stop_the_run(teacher_dir, prompt_file, tmp_path,
                                                                        monkeypatch, capsys):
    import accelerate

    import trainer.sid
    from diffusion.teacher import load_teacher

    def nan_teacher(*args, **kwargs):  # every y_real is NaN: no generator sample survives
        teacher = load_teacher(*args, **kwargs)
        teacher.unet.register_forward_hook(lambda _m, _a, output: type(output)(sample=output.sample * math.nan))
        return teacher

    logged = []
    monkeypatch.setattr(accelerate.Accelerator, "log", lambda self, values, step=None, **_: logged.append(values))
    monkeypatch.setattr(trainer.sid, "load_teacher", nan_teacher)
    out, common = tmp_path / "nan", ["--max-kimg", 0.012, "--ema-halflife-kimg", 0, "--log-every", 1]
    assert trainer_main(sid_args(teacher_dir, prompt_file, out, "--max-nonfinite-steps", 2, *common)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error:")]  # not tqdm's
    assert len(errors) == 1 and "the generator's last 2 optimiser steps were skipped" in errors[0]
    state = json.loads((out / "checkpoints/step-00000002/trainer_state.json").read_text())["state"]
    counts = {"dropped_samples": 4, "skipped_steps": 2, "cleaned_steps": 0}
    assert {k: state[k] for k in counts} == counts and state["skipped_in_a_row"] == [0, 2]
    assert logged[-1]["skipped_steps"] == 2 and logged[-1]["dropped_samples"] == 4
    assert math.isnan(logged[-1]["loss_generator"]) and math.isfinite(logged[-1]["loss_fake_score"])

    monkeypatch.setattr(trainer.sid, "load_teacher", load_teacher)  # a sound teacher: the counters carry on
    assert trainer_main(sid_args(teacher_dir, prompt_file, out, "--resume", "latest", *common)) == 0
    record = json.loads((out / "distillation.json").read_text())
    assert (record["dropped_nonfinite_samples"], record["skipped_optimizer_steps"]) == (4, 2)
    assert record["cleaned_gradient_steps"] == 0 and logged[-1]["skipped_steps"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast is refused on a CPU")
def test_fp16_drops_a_nan_sample_and_no_grad_scaler_skips_the_step(teacher_dir, prompt_file, tmp_path,
                                                                   monkeypatch):
    import trainer.sid
    from diffusion.teacher import load_teacher

    def half_nan_teacher(*args, **kwargs):  # y_real of sample 0 is NaN, and so is its way back (0 x NaN)
        teacher = load_teacher(*args, **kwargs)
        _nan_in_sample_0(teacher.unet, "product")
        return teacher

    monkeypatch.setattr(trainer.sid, "load_teacher", half_nan_teacher)
    out = tmp_path / "fp16"
    assert trainer_main(sid_args(teacher_dir, prompt_file, out, "--max-kimg", 0.004, "--mixed-precision", "fp16",
                                 "--ema-halflife-kimg", 0)) == 0
    record = json.loads((out / "distillation.json").read_text())
    assert record["dropped_nonfinite_samples"] == 2 and record["skipped_optimizer_steps"] == 0  # 2 steps taken
    assert record["cleaned_gradient_steps"] == 0
    state = json.loads((out / "checkpoints/step-00000002/trainer_state.json").read_text())
    assert state["scaler"] == {}  # accelerate's scaler, disabled: nothing to save
    weights = load_file(out / "unet/diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


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
    assert record["skipped_optimizer_steps"] == record["cleaned_gradient_steps"] == 0
    config = json.loads((out / "checkpoints/step-00000002/trainer_state.json").read_text())["config"]
    assert config["teacher_precision"] == "bf16"


def test_a_run_in_out_is_refused_and_overwrite_starts_over(teacher_dir, prompt_file, tmp_path, capsys):
    out, common = tmp_path / "sid", ["--max-kimg", 0.002, "--ema-halflife-kimg", 0]
    assert trainer_main(sid_args(teacher_dir, prompt_file, out, *common, "--grid-every-kimg", 0.002,
                                 "--grid-prompts", 2)) == 0
    first = load_file(out / "unet/diffusion_pytorch_model.safetensors")
    capsys.readouterr()
    assert trainer_main(sid_args(teacher_dir, prompt_file, out, *common)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"Error: {out} holds a run (checkpoints up to step 1 and a finished student); pass --resume latest to "
        "continue it or --overwrite to start over"]
    assert trainer_main(sid_args(teacher_dir, prompt_file, out, *common, "--overwrite")) == 0
    assert list((out / "samples").iterdir()) == []  # the earlier run's grids went with it (this run draws none)
    again = load_file(out / "unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)  # a fresh start, not a resume

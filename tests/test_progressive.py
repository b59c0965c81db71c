"""Progressive distillation: the round's target and weight by hand, the step grid, the samplers (the stochastic
one's marginal noise levels against the schedule), a round that learns, exact mid-round resume, outputs that
StableDiffusionPipeline loads and samples on the same grid, and the refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from diffusion.samplers import CLEAN, ddim_step, grid_coefficients, grid_ddim, grid_stochastic, step_grid
from diffusion.schedule import NoiseSchedule
from diffusion.tiny import SD_SCHEDULER
from helpers import progressive_args
from trainer.cli import main as trainer_main
from trainer.losses import progressive_loss, progressive_target, truncated_snr_weight

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def sd_schedule() -> NoiseSchedule:
    return NoiseSchedule.from_scheduler_config(SD_SCHEDULER)


def test_target_by_hand_and_its_defining_property():
    a, s, a2, s2 = 0.6, 0.8, 0.9, 0.4
    z_t, z_2 = torch.tensor([2.0]), torch.tensor([1.0])
    # x~ = (z'' - (s''/s) z_t) / (a'' - (s''/s) a) = (1 - 0.5 * 2) / (0.9 - 0.5 * 0.6) = 0
    assert progressive_target(z_t, z_2, a, s, a2, s2).item() == pytest.approx(0.0)
    z_t, z_2 = torch.randn(3, 4), torch.randn(3, 4)
    x = progressive_target(z_t, z_2, a, s, a2, s2)
    eps_hat = (z_t - a * x) / s  # one DDIM step from t with x0 = x~ lands on z''
    assert torch.allclose(a2 * x + s2 * eps_hat, z_2, atol=1e-6)
    assert torch.equal(progressive_target(z_t, z_2, a, s, 1.0, 0.0), z_2)  # t'' = 0: the two-step result itself


def test_truncated_snr_weight_and_loss():
    a, s = torch.tensor([0.8, 0.6]).reshape(2, 1), torch.tensor([0.6, 0.8]).reshape(2, 1)
    assert truncated_snr_weight(a, s).tolist() == pytest.approx([0.64 / 0.36, 1.0])
    x0, target = torch.tensor([[1.0, 3.0], [0.0, 2.0]]), torch.zeros(2, 2)
    assert progressive_loss(x0, target, a, s).tolist() == pytest.approx([5.0 * 0.64 / 0.36, 2.0])


def test_grids_nest_and_end_clean(sd_schedule):
    assert step_grid(4, 1000) == [999, 749, 499, 249] and step_grid(1, 1000) == [999]
    assert all(step_grid(2 * n, 1000)[::2] == step_grid(n, 1000) for n in (1, 2, 3, 5, 8, 32, 64))
    a, s = grid_coefficients(sd_schedule, torch.tensor([CLEAN, 499]), torch.zeros(2, 1))
    assert a[0].item() == 1.0 and s[0].item() == 0.0
    assert a[1].item() == pytest.approx(sd_schedule.alphabar[499].sqrt().item())


class PointMassOracle:
    """The exact eps of data that is a point mass at c: (z - a_t c) / sigma_t. A UNet stand-in."""

    def __init__(self, schedule, c: float):
        self.schedule, self.c = schedule, c
        self.config = type("Config", (), {"time_cond_proj_dim": None})()
        self.dtype = torch.float32

    def __call__(self, z, t, encoder_hidden_states):
        eps = (z - self.schedule.a(t, z) * self.c) / self.schedule.sigma(t, z)
        return type("Out", (), {"sample": eps})()


def test_deterministic_sampler_is_exact_for_an_oracle(sd_schedule):
    oracle = PointMassOracle(sd_schedule, 0.7)
    noise = torch.randn(8, 1, 2, 2)
    out = grid_ddim(oracle, sd_schedule, noise, torch.zeros(8, 1, 1), 4)
    assert torch.allclose(out, torch.full_like(out, 0.7), atol=1e-5)
    t = torch.tensor([999])
    a, s = grid_coefficients(sd_schedule, t, noise), grid_coefficients(sd_schedule, torch.tensor([499]), noise)
    z = ddim_step(a[0] * 0.7 + a[1] * noise, noise, *a, *s)
    assert torch.allclose(z, s[0] * 0.7 + s[1] * noise, atol=1e-6)


def test_stochastic_sampler_marginal_noise_matches_the_schedule(sd_schedule):
    c, n, steps = 0.5, 20000, 8
    oracle = PointMassOracle(sd_schedule, c)
    t0 = torch.tensor([999])
    eps = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    noise = sd_schedule.a(t0, eps) * c + sd_schedule.sigma(t0, eps) * eps  # the true marginal at t_0
    seen = {}
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    out = grid_stochastic(oracle, sd_schedule, noise, torch.zeros(n, 1, 1), steps, generators,
                          trace=lambda t, z: seen.setdefault(t, z.clone()))
    assert sorted(seen, reverse=True) == step_grid(steps, 1000)  # t_0 .. t_{N-1}: one pass from each grid point
    for t, z in seen.items():
        tt = torch.tensor([t])
        residual = z - sd_schedule.a(tt, z) * c
        assert residual.mean().abs().item() < 0.03
        assert residual.std().item() == pytest.approx(sd_schedule.sigma(tt, z).item(), rel=0.03), t
    assert torch.allclose(out, torch.full_like(out, c), atol=1e-4)


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_stochastic_sampler_makes_n_passes_and_depends_on_its_noise(teacher, steps):
    """Meng et al.: N steps are N UNet passes (N - 1 rounds of 2/N forward, 1/N back, then a last 1/N step), counted
    with the hook `evaluation speed` uses; and already at N = 2 the image depends on the fresh noise's seed."""
    from evaluation.speed import count_unet_rows

    unet, schedule = copy.deepcopy(teacher.unet), teacher.schedule  # a copy: the hook stays off the shared teacher
    rows = count_unet_rows(unet)
    size = unet.config.sample_size
    noise = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(0))
    text = teacher.encode_text(["a", "b"])

    def sample(seed):
        generators = [torch.Generator().manual_seed(seed + k) for k in range(2)]
        with torch.no_grad():
            return grid_stochastic(unet, schedule, noise, text, steps, generators)

    first = sample(0)
    assert len(rows) == steps and rows == [2] * steps
    assert (first - sample(0)).abs().max().item() == 0.0
    assert (first - sample(100)).abs().max().item() > 1e-3


def _x0_errors(unet_student, unet_teacher, teacher, shards, w: float = 3.0):
    """On held-out z0 noised at t = 999: the one-step student's x0 and the teacher's own one-step x0, each
    against the teacher's two DDIM steps 999 -> 499 -> clean (mean squared error)."""
    from helpers import read_records

    records = list(read_records(shards).values())
    z0 = torch.stack([r.tensors["z0"] for r in records]).float()
    text = teacher.encode_text([r.caption for r in records])
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    schedule = teacher.schedule
    a, s = grid_coefficients(schedule, torch.tensor([999]), z0)
    z_t = a * z0 + s * noise
    ws = torch.full((len(records),), w)
    with torch.no_grad():
        two = grid_ddim(unet_teacher, schedule, z_t, text, 2, ws)
        one_teacher = grid_ddim(unet_teacher, schedule, z_t, text, 1, ws)
        one_student = grid_ddim(unet_student, schedule, z_t, text, 1, ws)
    return (one_student - two).pow(2).mean().item(), (one_teacher - two).pow(2).mean().item()


def test_a_round_brings_one_step_closer_to_the_teachers_two(w_student, cfg_shards, heldout_cfg_shards, teacher,
                                                           tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "prog"
    assert trainer_main(progressive_args(w_student, cfg_shards, out, "--start-steps", 2, "--end-steps", 1,
                                         "--iters-per-round", 40, "--lr", "3e-5")) == 0
    student = UNet2DConditionModel.from_pretrained(out / "round-01steps", subfolder="unet")
    start = UNet2DConditionModel.from_pretrained(w_student, subfolder="unet")
    student_error, teacher_error = _x0_errors(student, start, teacher, heldout_cfg_shards)
    assert student_error < 0.8 * teacher_error, (student_error, teacher_error)
    record = json.loads((out / "round-01steps" / "distillation.json").read_text())
    assert record["steps"] == 1 and record["timesteps"] == [999] and record["w_range"] == [1.0, 4.0]


def test_mid_round_resume_equals_uninterrupted(w_student, cfg_shards, tmp_path, monkeypatch):
    import trainer.fit
    from trainer.stop import StopRequest

    extra = ["--start-steps", 4, "--end-steps", 1, "--iters-per-round", 3, "--gradient-accumulation-steps", 2,
             "--ema-decay", 0.9, "--checkpoint-every", 2]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert trainer_main(progressive_args(w_student, cfg_shards, straight, *extra)) == 0

    class StopAtStep4(StopRequest):  # Ctrl-C during the second round's first step (global step 4)
        calls = 0

        @property
        def requested(self):
            StopAtStep4.calls += 1
            return StopAtStep4.calls > 6  # 2 reduces per step (accumulation 2): after step 3, inside step 4

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(trainer.fit, "StopRequest", StopAtStep4)
    assert trainer_main(progressive_args(w_student, cfg_shards, split, *extra)) == 130
    assert (split / "checkpoints/step-00000004").is_dir() and not (split / "round-01steps").exists()
    monkeypatch.undo()
    assert trainer_main(progressive_args(w_student, cfg_shards, split, *extra, "--resume", "latest")) == 0
    for steps in ("02", "01"):
        a = load_file(straight / f"round-{steps}steps/unet/diffusion_pytorch_model.safetensors")
        b = load_file(split / f"round-{steps}steps/unet/diffusion_pytorch_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), steps


def test_round_folders_load_and_sample_on_their_grid_with_diffusers(w_student, cfg_shards, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffusion.teacher import load_teacher
    from evaluation.models import describe_model, parse_model_arg
    from evaluation.render import Renderer

    out = tmp_path / "prog"
    assert trainer_main(progressive_args(w_student, cfg_shards, out, "--start-steps", 4, "--end-steps", 2,
                                         "--iters-per-round", 2)) == 0
    folder = out / "round-02steps"
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.unet.config.time_cond_proj_dim == 16
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        by_pipe = pipe("a red cat", num_inference_steps=2, guidance_scale=3.0, latents=noise.clone(),
                       output_type="latent").images
        g = load_teacher(folder)
        ours = grid_ddim(g.unet, g.schedule, noise, g.encode_text(["a red cat"]), 2, torch.tensor([3.0]))
    assert torch.allclose(by_pipe, ours, atol=1e-4)
    spec = describe_model(str(folder), 3.0)
    assert spec.kind == "progressive" and spec.steps == 2 and Renderer(spec, steps=50).steps == 2
    stochastic = parse_model_arg(f"{folder}@cfg=3@stochastic")
    assert stochastic.sampler == "stochastic" and "stochastic" in stochastic.label


def test_refusals(teacher_dir, w_student, cfg_shards, blue_shards, tmp_path, capsys):
    cases = [
        (progressive_args(teacher_dir, cfg_shards, tmp_path / "a"), "must be a w-distill student"),
        (progressive_args(w_student, blue_shards, tmp_path / "b"), "--store-clean"),
        (progressive_args(w_student, cfg_shards, tmp_path / "c", "--start-steps", 12), "power of two"),
        (progressive_args(w_student, cfg_shards, tmp_path / "d", "--w-max", 9), "inside the student's w range"),
        (progressive_args(w_student, cfg_shards, tmp_path / "e", "--prompts", "x.txt"), "--prompts does not apply"),
    ]
    for argv, message in cases:
        assert trainer_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (message, err)


def test_a_round_in_out_is_refused_and_overwrite_never_removes_the_student(w_student, cfg_shards, tmp_path, capsys):
    import shutil

    out = tmp_path / "prog"
    (out / "round-02steps").mkdir(parents=True)
    assert trainer_main(progressive_args(w_student, cfg_shards, out, "--start-steps", 4, "--end-steps", 1)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"Error: {out} holds a run (finished rounds round-02steps); pass --resume latest to continue it or "
        "--overwrite to start over"]
    student = shutil.copytree(w_student, out / "round-04steps")  # going on from a round, into its own OUT
    assert trainer_main(progressive_args(student, cfg_shards, out, "--start-steps", 4, "--end-steps", 1,
                                         "--overwrite")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--overwrite would remove {student}, and the run reads {student}" in err[0]
    assert (student / "distillation.json").is_file() and (out / "round-02steps").is_dir()


def test_damaged_shards_are_refused_before_any_round(w_student, cfg_shards, tmp_path, capsys):
    import shutil

    from shards.manifest import read_manifest

    shards = tmp_path / "shards"
    shutil.copytree(cfg_shards, shards)
    shard = read_manifest(shards)[0]
    (shards / shard.file).write_bytes((shards / shard.file).read_bytes()[:8192])
    assert trainer_main(progressive_args(w_student, shards, tmp_path / "out", "--start-steps", 2)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"Error: --shards {shards} is damaged: {shard.file}: 8192 bytes (manifest says {shard.bytes}); "
                   f"run `pipeline inspect {shards}`"]


def test_lora_rounds_resume_exactly_share_one_base_and_load_in_stock_diffusers(w_student, cfg_shards, tmp_path,
                                                                             monkeypatch):
    """LoRA rounds: every round's adapter sits on the starting student's UNet; a stop inside round 2 resumed ==
    uninterrupted, adapter bit for bit; the stock call (start student + load_lora_weights) == the merged round."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    import trainer.fit
    from diffusion.unet import w_condition
    from students.lora import LORA_FILE
    from trainer.stop import StopRequest

    extra = ["--start-steps", 4, "--end-steps", 1, "--iters-per-round", 3, "--gradient-accumulation-steps", 2,
             "--ema-decay", 0.9, "--checkpoint-every", 2, "--lr", 1e-2, "--lora-rank", 4]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert trainer_main(progressive_args(w_student, cfg_shards, straight, *extra, "--merge")) == 0

    class StopAtStep4(StopRequest):  # Ctrl-C during the second round's first step (global step 4)
        calls = 0

        @property
        def requested(self):
            StopAtStep4.calls += 1
            return StopAtStep4.calls > 6

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(trainer.fit, "StopRequest", StopAtStep4)
    assert trainer_main(progressive_args(w_student, cfg_shards, split, *extra)) == 130
    monkeypatch.undo()
    assert trainer_main(progressive_args(w_student, cfg_shards, split, *extra, "--resume", "latest")) == 0
    adapters = {}
    for steps in ("02", "01"):
        a, b = (load_file(run / f"round-{steps}steps" / LORA_FILE) for run in (straight, split))
        assert a and all(torch.equal(a[k], b[k]) for k in a), steps
        adapters[steps] = a
        record = json.loads((straight / f"round-{steps}steps/distillation.json").read_text())
        assert record["adapter"]["base"] == str(w_student.resolve())  # not the previous round
    assert any(not torch.equal(adapters["02"][k], adapters["01"][k]) for k in adapters["02"])
    assert not (split / "round-01steps/unet").exists()  # no --merge: the adapter files only

    pipe = StableDiffusionPipeline.from_pretrained(w_student, safety_checker=None)
    pipe.load_lora_weights(straight / "round-01steps")
    merged = UNet2DConditionModel.from_pretrained(straight / "round-01steps", subfolder="unet")
    z, t, text = torch.randn(2, 4, 16, 16), torch.tensor([999, 500]), torch.randn(2, 77, 32)
    cond = w_condition(torch.tensor([2.0, 3.0]), merged)
    with torch.no_grad():
        a, b = pipe.unet(z, t, text, timestep_cond=cond).sample, merged(z, t, text, timestep_cond=cond).sample
    assert ((a - b).norm() / b.norm()).item() <= 1e-4

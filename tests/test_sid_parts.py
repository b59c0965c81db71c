"""SiD-LSG's pure parts against hand-computed values: losses, omega, the generator's input, the guided
denoiser, the EMA decay, prompt files and sampling, the guidance strategies by name."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from diffusion.errors import UserError
from diffusion.samplers import sid_one_step
from diffusion.schedule import NoiseSchedule
from diffusion.tiny import SD_SCHEDULER
from diffusion.unet import guided_eps, guided_x0
from trainer.ema import ema_beta
from trainer.losses import finite_samples, sid_fake_score_loss, sid_generator_loss, sid_omega
from trainer.prompts import PromptSampler, read_prompts
from trainer.sid import (FAKE, GENERATOR, SidState, StepResult, clean_gradients, draw_micro_batch,
                         nonfinite_stop, zero_gradient_of_dropped)
from trainer.sid_config import SidConfig


@pytest.fixture(scope="module")
def sd_schedule() -> NoiseSchedule:
    return NoiseSchedule.from_scheduler_config(SD_SCHEDULER)


def test_fake_score_loss_is_the_per_sample_sum_of_squares():
    eps_fake = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]])
    eps = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]]])
    assert sid_fake_score_loss(eps_fake, eps).tolist() == [5.0, 5.0]  # 1 + 4; 1 + 4


def test_generator_loss_by_hand():
    x_g = torch.tensor([[[[0.0, 1.0]]]])
    y_real = torch.tensor([[[[1.0, 3.0]]]])
    y_fake = torch.tensor([[[[0.5, 2.0]]]])
    omega = (1.0 + 2.0) / 2  # mean |x_g - y_real|
    # alpha = 1: (y_real - y_fake)(y_fake - x_g) / omega = (0.5 * 0.5 + 1 * 1) / 1.5
    assert sid_generator_loss(x_g, y_real, y_fake).item() == pytest.approx((0.25 + 1.0) / omega)
    # alpha = 0.5: (y_real - y_fake)((y_real - x_g) - 0.5 (y_real - y_fake)) = 0.5 (1 - 0.25) + 1 (2 - 0.5)
    assert sid_generator_loss(x_g, y_real, y_fake, alpha=0.5).item() == pytest.approx((0.375 + 1.5) / omega)
    # kappa3 != kappa2: the second factor takes y_fake' = 0: 0.5 (1 - 1) + 1 (2 - 3)
    y_fake3 = torch.zeros_like(y_fake)
    assert sid_generator_loss(x_g, y_real, y_fake, 1.0, y_fake3).item() == pytest.approx(-1.0 / omega)


def test_omega_clamps_and_carries_no_gradient():
    x_g = torch.ones(2, 1, 1, 2, requires_grad=True)
    y_real = torch.tensor([[[[1.0, 1.0]]], [[[3.0, 5.0]]]])
    omega = sid_omega(x_g, y_real)
    assert omega.flatten().tolist() == pytest.approx([1e-5, 3.0]) and not omega.requires_grad
    y_fake = torch.tensor([[[[0.0, 2.0]]], [[[2.0, 1.0]]]])
    sid_generator_loss(x_g, y_real, y_fake).sum().backward()
    # with omega held fixed, d/dx_g of (y_real - y_fake)(y_real - x_g - (y_real - y_fake)) / omega = -(y_real - y_fake) / omega
    expected = -(y_real - y_fake) / omega
    assert torch.allclose(x_g.grad, expected)


def test_finite_samples_marks_any_nan_or_inf_row():
    a = torch.zeros(3, 2)
    b = torch.zeros(3, 2)
    a[1, 0], b[2, 1] = math.nan, math.inf
    assert finite_samples(a, b).tolist() == [True, False, False]


def test_a_sample_indexed_out_of_the_loss_still_sends_nan_back_unless_its_gradient_is_zeroed():
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    factor = torch.tensor([[math.nan], [1.0], [1.0]])  # the teacher's NaN on sample 0

    def weight_gradient(zero: bool) -> torch.Tensor:
        w = torch.ones(2, requires_grad=True)  # a weight every sample shares, as the generator's
        x_g = z * w
        y_real = x_g * factor
        keep = finite_samples(y_real)
        if zero:
            zero_gradient_of_dropped(x_g, keep)
        (y_real[keep] * x_g[keep]).sum().backward()
        return w.grad

    assert torch.isnan(weight_gradient(zero=False)).all()  # 0 x NaN: the indexing alone does not stop it
    assert weight_gradient(zero=True).tolist() == [2 * (9.0 + 25.0), 2 * (16.0 + 36.0)]  # samples 1 and 2 only


def test_step_counters_the_stop_line_and_an_old_checkpoints_state():
    state = SidState()
    steps = [(FAKE, StepResult(6.0, 3, False, False)), (GENERATOR, StepResult(0.0, 0, True, False)),
             (FAKE, StepResult(2.0, 2, False, True)), (GENERATOR, StepResult(0.0, 0, True, False))]
    for phase, step in steps:
        state.count(phase, step, 3)
    assert state.nonfinite_counts() == {"dropped_samples": 7, "skipped_steps": 2, "cleaned_steps": 1}
    assert state.skipped_in_a_row == [0, 2] and list(state.recent_fake) == [2.0, 1.0] and not state.recent_generator
    assert nonfinite_stop(state, 3) is None
    assert "the generator's last 2 optimiser steps were skipped" in nonfinite_stop(state, 2)
    assert "\n" not in nonfinite_stop(state, 2)
    assert SidState.from_dict(state.to_dict()) == state
    state.count(GENERATOR, StepResult(1.0, 3, False, False), 3)
    assert state.skipped_in_a_row == [0, 0] and list(state.recent_generator) == [1.0 / 3]
    old = {"iteration": 4, "images": 32, "dropped_samples": 5, "nonfinite_in_a_row": 2, "recent_generator": [1.0],
           "recent_fake": [2.0]}  # a checkpoint's state from before skipped steps were counted
    resumed = SidState.from_dict(old)
    assert resumed.skipped_in_a_row == [0, 2] and resumed.skipped_steps == resumed.cleaned_steps == 0
    assert (resumed.dropped_samples, list(resumed.recent_generator)) == (5, [1.0])


class StubUNet:
    """A stand-in with a UNet's interface: records its input, predicts a constant eps."""

    config = SimpleNamespace(time_cond_proj_dim=None)
    dtype = torch.float32

    def __init__(self, eps_value: float):
        self.eps_value, self.seen = eps_value, []

    def __call__(self, z, t, encoder_hidden_states):
        self.seen.append((z.clone(), t.clone()))
        return SimpleNamespace(sample=torch.full_like(z, self.eps_value))


def test_generator_input_is_sqrt_one_minus_alphabar_z_and_output_is_x0(sd_schedule):
    t = torch.tensor([625])
    sigma, a = sd_schedule.sigma(t, torch.zeros(1)).item(), sd_schedule.a(t, torch.zeros(1)).item()
    assert sigma == pytest.approx(0.9286, abs=5e-5) and sigma / a == pytest.approx(2.50, abs=5e-3)
    unet = StubUNet(0.5)
    seen = unet.seen
    z = torch.randn(2, 4, 3, 3)
    x_g = sid_one_step(unet, sd_schedule, z, 625, torch.zeros(2, 1, 8))
    assert torch.allclose(seen[0][0], sigma * z) and seen[0][1].tolist() == [625, 625]
    assert torch.allclose(x_g, (sigma * z - sigma * 0.5) / a, atol=1e-6)


def test_guided_denoiser_batches_cond_and_uncond_unless_kappa_is_one(teacher, sd_schedule):
    from helpers import count_unet_calls

    calls = count_unet_calls(teacher.unet)
    z = torch.randn(2, 4, 4, 4)
    t = torch.tensor([100, 700])
    cond, uncond = teacher.encode_text(["a cat", "a dog"]), teacher.encode_text([""])
    with torch.no_grad():
        (eps_one,) = guided_eps(teacher.unet, teacher.schedule, z, t, cond, uncond, (1.0,))
        assert [c["batch"] for c in calls] == [2]
        eps_2, eps_3 = guided_eps(teacher.unet, teacher.schedule, z, t, cond, uncond, (2.0, 3.0))
        assert [c["batch"] for c in calls] == [2, 4]
        eps_cond, eps_uncond = teacher.eps_cond_uncond(z, t, cond, uncond)
        (x0,) = guided_x0(teacher.unet, teacher.schedule, z, t, cond, uncond, (3.0,))
    assert torch.allclose(eps_one, eps_cond, atol=1e-5)
    assert torch.allclose(eps_3, eps_uncond + 3.0 * (eps_cond - eps_uncond), atol=1e-5)
    assert torch.allclose(eps_3 - eps_2, eps_cond - eps_uncond, atol=1e-5)
    assert torch.allclose(x0, teacher.schedule.eps_to_x0(z, eps_3, t), atol=1e-6)


def _with_gradients(*grads: list[float]) -> torch.nn.Module:
    module = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(len(g))) for g in grads])
    for parameter, values in zip(module, grads):
        parameter.grad = torch.tensor(values)
    return module


def test_clean_gradients_replaces_only_non_finite_values_and_says_so():
    inf = float("inf")
    module = _with_gradients([1.0, float("nan"), -2.0], [inf, -inf, 3e38])
    assert clean_gradients(module, None)
    assert module[0].grad.tolist() == [1.0, 0.0, -2.0]
    assert module[1].grad.tolist() == [1e5, -1e5, pytest.approx(3e38)]
    huge = _with_gradients([3e38, 3e38], [0.5])  # finite, but its norm overflows float32: nothing to replace
    assert not clean_gradients(huge, None) and huge[0].grad.tolist() == [pytest.approx(3e38)] * 2
    clipped = _with_gradients([0.5, -4.0, float("nan")])
    assert clean_gradients(clipped, 1.0) and clipped[0].grad.tolist() == [0.5, -1.0, 0.0]
    assert not clean_gradients(_with_gradients([1.0, 2.0]), None)


def test_ema_decay_by_half_life_with_ramp_up():
    assert ema_beta(8, 0, 50.0, 0.05) == 0.0  # nothing seen yet: the average is the model
    assert ema_beta(8, 10_000_000, 50.0, 0.05) == pytest.approx(0.5 ** (8 / 50_000))
    assert ema_beta(8, 100_000, 50.0, 0.05) == pytest.approx(0.5 ** (8 / 5_000))  # ramp-up caps the half-life
    assert ema_beta(50_000, 10**9, 50.0, None) == pytest.approx(0.5)  # one half-life of images halves the weight


def test_prompt_files_text_parquet_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    text = tmp_path / "p.txt"
    text.write_text("a cat\n\n  \na dog  \n")
    listed = read_prompts(text)
    assert listed.prompts == ["a cat", "a dog"] and listed.empty_skipped == 2
    table = pa.table({"caption": ["x", None, "y"], "other": [1, 2, 3]})
    pyarrow.parquet.write_table(table, tmp_path / "p.parquet")
    pyarrow.csv.write_csv(table, tmp_path / "p.csv")
    assert read_prompts(tmp_path / "p.parquet").prompts == ["x", "y"]
    assert read_prompts(tmp_path / "p.csv").prompts == ["x", "y"]
    with pytest.raises(UserError, match="no column 'text'.*--prompt-column"):
        read_prompts(tmp_path / "p.parquet", "text")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_prompt_sampler_covers_each_prompt_once_per_epoch_by_position():
    prompts = [f"p{i}" for i in range(7)]
    sampler = PromptSampler(prompts, seed=3)
    first, second = sampler.batch(0, 7), sampler.batch(7, 7)
    assert sorted(first) == sorted(second) == prompts and first != second
    assert PromptSampler(prompts, seed=3).batch(9, 3) == sampler.batch(9, 3)  # a function of position alone
    assert PromptSampler(prompts, seed=4).batch(0, 7) != first


def test_guidance_strategies_by_name():
    base = {"teacher": "T", "prompts": "P", "out": "O"}
    lsg = SidConfig(**base, kappa=2.0)
    assert lsg.kappas == (2.0, 2.0, 2.0, 2.0) and lsg.strategy == "LSG" and lsg.uses_dropout
    long = SidConfig(**base, kappa=1.0, kappa4=4.5)
    assert long.strategy == "Long" and not long.uses_dropout
    assert SidConfig(**base, kappa=1.0, kappa2=0.5, kappa3=0.5).strategy == "Short"
    assert SidConfig(**base, kappa=1.0, kappa1=3.0).strategy == "simplest LSG"
    assert SidConfig(**base, mixed_precision="fp16").adam_epsilon == 1e-6
    assert SidConfig(**base).adam_epsilon == 1e-8 and SidConfig(**base).lr_fake == 1e-6
    with pytest.raises(UserError, match="t-min"):
        SidConfig(**base, t_min=500, t_max=100)


def test_prompt_dropout_is_on_when_only_kappa3_guides():
    base = {"teacher": "T", "prompts": "P", "out": "O", "kappa": 1.0, "prompt_dropout": 0.5, "batch_size": 32}
    sampler = PromptSampler([f"p{i}" for i in range(8)], seed=0)

    def prompts(cfg, phase):
        return draw_micro_batch(cfg, sampler, phase, 0, 0, 0, 1, (1, 2, 2))[0]

    kappa3 = SidConfig(**base, kappa3=0.5)  # the fake network's kappa3 branch needs its unconditional score
    assert kappa3.uses_dropout and "" in prompts(kappa3, FAKE) and "" not in prompts(kappa3, GENERATOR)
    long = SidConfig(**base, kappa4=3.0)
    assert not long.uses_dropout and "" not in prompts(long, FAKE)

"""The distillation losses and the w embedding against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.errors import UserError
from diffusion.guidance import guidance_coefficient
from diffusion.schedule import NoiseSchedule
from diffusion.tiny import SD_SCHEDULER
from diffusion.unet import add_guidance_embedding, guidance_scale_embedding, unet_eps
from trainer.losses import (cfg_distill_loss, classifier_distill_loss, per_sample_mse, sample_w, w_distill_eps_loss,
                            w_distill_loss, w_distill_target)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(len(values), 1, 1, -1)


def test_cfg_distill_loss_by_hand():
    # target = [0, 1] + 2 ([1, 2] - [0, 1]) = [2, 3]; student 0 -> (4 + 9) / 2
    loss = cfg_distill_loss(t([[0.0, 0.0]]), eps_cond=t([[1.0, 2.0]]), eps_uncond=t([[0.0, 1.0]]), guidance_scale=2.0)
    assert loss.tolist() == [6.5]


def test_cfg_distill_scale_one_is_the_conditional_model():
    cond, uncond = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert cfg_distill_loss(cond, cond, uncond, 1.0).max() < 1e-12  # up to rounding of uncond + (cond - uncond)


def test_classifier_distill_loss_by_hand():
    # c_t = sqrt(0.04) = 0.2; target = [1, 0] + 10 * 0.2 * [1, -1] = [3, -2]; student [1, 1] -> (4 + 9) / 2
    c_t = torch.full((1, 1, 1, 1), 0.2)
    loss = classifier_distill_loss(t([[1.0, 1.0]]), eps=t([[1.0, 0.0]]), grad=t([[1.0, -1.0]]), c_t=c_t, gamma=10.0)
    assert loss.item() == pytest.approx(6.5)


def _sd_by_hand(step: int) -> tuple[float, float]:
    """(sqrt(beta_t), sqrt(1 - alphabar_t)) on SD's scaled_linear schedule, 0.00085..0.012, in plain floats."""
    roots = [math.sqrt(0.00085) + i / 999 * (math.sqrt(0.012) - math.sqrt(0.00085)) for i in range(step + 1)]
    return roots[step], math.sqrt(1 - math.prod(1 - r * r for r in roots))


@pytest.mark.parametrize("convention", ["sqrt-beta", "sigma"])
def test_classifier_distill_target_with_each_coefficient(convention):
    schedule = NoiseSchedule.from_scheduler_config(SD_SCHEDULER)
    steps = torch.tensor([1, 100, 500])
    eps, grad = torch.zeros(3, 1, 1, 1), torch.ones(3, 1, 1, 1)
    c_t = guidance_coefficient(schedule, steps, eps, convention)
    loss = classifier_distill_loss(torch.zeros(3, 1, 1, 1), eps, grad, c_t, gamma=100.0)
    by_hand = [_sd_by_hand(step)[convention == "sigma"] for step in steps.tolist()]
    assert loss.tolist() == pytest.approx([(100.0 * c) ** 2 for c in by_hand], rel=1e-5)  # (gamma c_t)^2


def test_the_two_coefficients_differ_as_the_issue_says():
    """sigma_t / sqrt(beta_t) on SD's schedule: 1.41 at t = 1, 8.74 at t = 100, 12.26 at t = 500 (by hand)."""
    schedule = NoiseSchedule.from_scheduler_config(SD_SCHEDULER)
    steps, like = torch.tensor([1, 100, 500]), torch.zeros(3, 1, 1, 1, dtype=torch.float64)
    ratio = guidance_coefficient(schedule, steps, like, "sigma") / guidance_coefficient(schedule, steps, like)
    by_hand = [s / b for b, s in map(_sd_by_hand, (1, 100, 500))]  # diffusers' betas are float32: rel 1e-6
    assert ratio.flatten().tolist() == pytest.approx(by_hand, rel=1e-6)
    assert ratio.flatten().tolist() == pytest.approx([1.412, 8.742, 12.260], abs=1e-3)
    with pytest.raises(UserError, match="unknown guidance coefficient 'dhariwal'"):
        guidance_coefficient(schedule, steps, like, "dhariwal")


def test_w_distill_target_per_sample_w():
    cond, uncond = t([[1.0, 2.0], [1.0, 2.0]]), t([[0.0, 1.0], [0.0, 1.0]])
    target = w_distill_target(cond, uncond, w=torch.tensor([1.0, 3.0]))
    # sample 0: w = 1, the conditional eps; sample 1: [0, 1] + 3 [1, 1] = [3, 4]
    assert target.flatten(1).tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert w_distill_eps_loss(t([[1.0, 2.0], [0.0, 0.0]]), target).tolist() == [0.0, 12.5]


def test_w_distill_loss_is_the_truncated_snr_weighted_x_loss():
    # sample 0: a = 0.8, sigma = 0.6: SNR 16/9 > 1; sample 1: a = 0.6, sigma = 0.8: SNR 9/16, floored at 1
    a, sigma = torch.tensor([0.8, 0.6]).reshape(2, 1, 1, 1), torch.tensor([0.6, 0.8]).reshape(2, 1, 1, 1)
    x_student, x_teacher = t([[1.0, 3.0], [0.0, 2.0]]), torch.zeros(2, 1, 1, 2)
    assert w_distill_loss(x_student, x_teacher, a, sigma).tolist() == pytest.approx([5.0 * 16 / 9, 2.0])


def test_w_distill_x_loss_against_eps_mse_on_sds_schedule():
    """x - x' = -(sigma/a)(eps - eps'): the x loss is max(1, sigma^2/a^2) times the eps-MSE. At t = 999 that is
    (1 - alphabar)/alphabar (about 214), the factor the earlier unweighted eps loss left out; where SNR >= 1 the
    two agree."""
    schedule = NoiseSchedule.from_scheduler_config(SD_SCHEDULER)
    z_t, eps_s, eps_w = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    steps = torch.tensor([999, 500, 50])
    a, sigma = schedule.a(steps, z_t), schedule.sigma(steps, z_t)
    x_loss = w_distill_loss(schedule.eps_to_x0(z_t, eps_s, steps), schedule.eps_to_x0(z_t, eps_w, steps), a, sigma)
    ratio = x_loss / w_distill_eps_loss(eps_s, eps_w)
    alphabar = schedule.alphabar[steps]
    expected = ((1 - alphabar) / alphabar).clamp(min=1.0)
    assert ratio.tolist() == pytest.approx(expected.tolist(), rel=1e-4)
    assert 200 < ratio[0].item() < 230 and ratio[2].item() == pytest.approx(1.0)


def test_per_sample_mse_is_float32_and_unreduced():
    loss = per_sample_mse(torch.ones(2, 3, dtype=torch.float16), torch.zeros(2, 3, dtype=torch.float16))
    assert loss.dtype == torch.float32 and loss.tolist() == [1.0, 1.0]


def test_sample_w_in_range_and_reproducible():
    draw = lambda: sample_w(1000, 2.0, 14.0, torch.Generator().manual_seed(3))  # noqa: E731
    w = draw()
    assert torch.equal(w, draw()) and 2.0 <= w.min() and w.max() <= 14.0 and abs(w.mean().item() - 8.0) < 0.5


def test_guidance_scale_embedding_by_hand_and_as_diffusers_computes_it():
    # w = 0.001 -> 1000 w = 1; dim 4: frequencies [1, 1e-4]
    got = guidance_scale_embedding(torch.tensor([0.001]), 4)
    expected = torch.tensor([[math.sin(1.0), math.sin(1e-4), math.cos(1.0), math.cos(1e-4)]])
    torch.testing.assert_close(got, expected)
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([0.0, 1.5, 6.5, 13.0])
    reference = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(guidance_scale_embedding(w, 256), reference)


def test_w_student_starts_as_the_teachers_conditional_model(teacher):
    student = add_guidance_embedding(teacher.unet, 32)
    z_t, steps = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    text = teacher.encode_text(["a red square", "a blue circle"])
    expected = teacher.eps(z_t, steps, text)
    with torch.no_grad():
        for w in (1.0, 7.5, 14.0):
            torch.testing.assert_close(unet_eps(student, teacher.schedule, z_t, steps, text, torch.full((2,), w)), expected)
        torch.nn.init.normal_(student.time_embedding.cond_proj.weight)  # once trained, w changes the output
        low = unet_eps(student, teacher.schedule, z_t, steps, text, torch.full((2,), 1.0))
        high = unet_eps(student, teacher.schedule, z_t, steps, text, torch.full((2,), 14.0))
    assert (low - high).abs().max() > 1e-3


def test_unet_eps_refuses_a_missing_or_extra_w(teacher):
    z_t, steps, text = torch.randn(1, 4, 16, 16), torch.tensor([5]), teacher.encode_text([""])
    with pytest.raises(ValueError, match="pass guidance_scale"):
        unet_eps(add_guidance_embedding(teacher.unet, 8), teacher.schedule, z_t, steps, text)
    with pytest.raises(ValueError, match="without a guidance embedding"):
        unet_eps(teacher.unet, teacher.schedule, z_t, steps, text, torch.ones(1))

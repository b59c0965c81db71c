"""The distillation losses and the w embedding against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.schedule import NoiseSchedule
from diffusion.tiny import SD_SCHEDULER
from diffusion.unet import add_guidance_embedding, guidance_scale_embedding, unet_eps
from trainer.losses import cfg_distill_loss, classifier_distill_loss, per_sample_mse, sample_w, w_distill_loss


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
    # sqrt(0.04) = 0.2; target = [1, 0] + 10 * 0.2 * [1, -1] = [3, -2]; student [1, 1] -> (4 + 9) / 2
    beta_t = torch.full((1, 1, 1, 1), 0.04)
    loss = classifier_distill_loss(t([[1.0, 1.0]]), eps=t([[1.0, 0.0]]), grad=t([[1.0, -1.0]]), beta_t=beta_t, gamma=10.0)
    assert loss.item() == pytest.approx(6.5)


def test_classifier_distill_uses_the_schedules_beta():
    schedule = NoiseSchedule.from_scheduler_config(SD_SCHEDULER)
    step = 500
    root = math.sqrt(0.00085) + step / 999 * (math.sqrt(0.012) - math.sqrt(0.00085))
    eps, grad = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    beta_t = schedule.beta(torch.tensor([step]), eps)
    loss = classifier_distill_loss(torch.zeros(1, 1, 1, 1), eps, grad, beta_t, gamma=100.0)
    assert loss.item() == pytest.approx((100.0 * root) ** 2, rel=1e-5)  # (gamma sqrt(beta_t))^2, sqrt(beta) = root


def test_w_distill_loss_per_sample_w():
    cond, uncond = t([[1.0, 2.0], [1.0, 2.0]]), t([[0.0, 1.0], [0.0, 1.0]])
    loss = w_distill_loss(t([[1.0, 2.0], [0.0, 0.0]]), cond, uncond, w=torch.tensor([1.0, 3.0]))
    # sample 0: w = 1, target = cond = student -> 0; sample 1: target = [3, 4] -> (9 + 16) / 2
    assert loss.tolist() == [0.0, 12.5]


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

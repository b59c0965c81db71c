"""Schedule and guidance math against hand-computed values."""

import math

import pytest
import torch

from diffusion.guidance import cfg_combine, classifier_guided_eps
from diffusion.schedule import NoiseSchedule
from diffusion.tiny import SD_SCHEDULER


@pytest.fixture
def sd() -> NoiseSchedule:
    return NoiseSchedule.from_scheduler_config(SD_SCHEDULER)


def test_sd_schedule_numbers(sd):
    # scaled_linear: beta_t = (sqrt(0.00085) + t/999 (sqrt(0.012) - sqrt(0.00085)))^2
    betas = [(math.sqrt(0.00085) + t / 999 * (math.sqrt(0.012) - math.sqrt(0.00085))) ** 2 for t in range(1000)]
    alphabar_625 = math.prod(1 - b for b in betas[:626])
    one = torch.ones(1, 1)
    t = torch.tensor([625])
    assert sd.num_timesteps == 1000
    assert sd.alphabar[625].item() == pytest.approx(alphabar_625, rel=1e-5)
    assert (sd.sigma(t, one) / sd.a(t, one)).item() == pytest.approx(2.50, abs=5e-3)
    assert sd.alphabar[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    assert sd.beta(torch.tensor([999]), one).item() == pytest.approx(0.012, rel=1e-5)


def test_noise_and_conversions_invert(sd):
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    z_t = sd.add_noise(x0, eps, t)
    a = sd.alphabar[t].sqrt().float().view(3, 1, 1, 1)
    torch.testing.assert_close(z_t, a * x0 + (1 - a**2).sqrt() * eps)
    torch.testing.assert_close(sd.eps_to_x0(z_t, eps, t), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(sd.x0_to_eps(z_t, x0, t), eps, atol=1e-4, rtol=1e-4)


def test_v_prediction_converts_to_eps():
    schedule = NoiseSchedule.from_scheduler_config({**SD_SCHEDULER, "prediction_type": "v_prediction"})
    x0, eps, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([100, 800])
    z_t = schedule.add_noise(x0, eps, t)
    v = schedule.a(t, x0) * eps - schedule.sigma(t, x0) * x0
    torch.testing.assert_close(schedule.model_output_to_eps(v, z_t, t), eps, atol=1e-5, rtol=1e-5)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.from_scheduler_config({**SD_SCHEDULER, "prediction_type": "flow"})


def test_cfg_combine_by_hand():
    uncond, cond = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    torch.testing.assert_close(cfg_combine(uncond, cond, 7.5), torch.tensor([1.0 + 7.5 * 2.0, -2.0 + 7.5 * 2.0]))
    torch.testing.assert_close(cfg_combine(uncond, cond, 1.0), cond)
    torch.testing.assert_close(cfg_combine(uncond, cond, 0.0), uncond)


def test_classifier_guided_eps_by_hand():
    eps, grad = torch.tensor([0.5]), torch.tensor([2.0])
    out = classifier_guided_eps(eps, grad, torch.tensor([0.1]), 300.0)  # c_t = sqrt(beta_t) = sqrt(0.01)
    assert out.item() == pytest.approx(0.5 + 300 * 0.1 * 2.0)

"""The optimisers (fused where torch has the kernel, else foreach), kept gradient buffers, and the foreach EMAs:
the same updates as the reference implementations, and the states older checkpoints hold still load."""

from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import EMAModel

from trainer.checkpoint import load_state, save_state
from trainer.ema import HalfLifeEMA, WarmupEMA, ema_beta, lerp_toward_
from trainer.optim import clear_gradients, kernel, make_adam

ADAM = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-8}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _train(model, optimizer, steps: int, keep_buffers: bool = False, start: int = 0) -> None:
    for step in range(start, start + steps):
        x = torch.linspace(-1, 1, 20).reshape(4, 5) * (step + 1)
        model(x).pow(2).mean().backward()
        optimizer.step()
        clear_gradients(optimizer, keep_buffers)


@pytest.mark.parametrize("decoupled", [True, False])
def test_make_adam_is_fused_on_cpu_and_steps_as_the_reference_loop(decoupled):
    model, reference = _model(), _model()
    optimizer = make_adam(model.parameters(), decoupled=decoupled, weight_decay=0.1, **ADAM)
    reference_class = torch.optim.AdamW if decoupled else torch.optim.Adam
    reference_optimizer = reference_class(reference.parameters(), foreach=False, weight_decay=0.1, **ADAM)
    assert kernel(optimizer) == "fused" and isinstance(optimizer, reference_class)
    _train(model, optimizer, 5)
    _train(reference, reference_optimizer, 5)
    before = _model()
    for p, q, p0 in zip(model.parameters(), reference.parameters(), before.parameters()):
        assert not torch.equal(p, p0)  # it trained
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # the fused kernel rounds differently, no more


def test_the_shard_loops_build_their_optimiser_in_trainer_optim():
    from trainer.config import FitConfig
    from trainer.fit import make_optimizer

    cfg = FitConfig(method="cfg-distill", teacher="t", shards="s", out="o", lr=0.01, adam_weight_decay=0.5)
    optimizer = make_optimizer(cfg, _model())
    assert kernel(optimizer) == "fused" and isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["weight_decay"] == 0.5


def test_make_adam_falls_back_to_foreach_where_no_fused_kernel_exists():
    parameter = torch.nn.Parameter(torch.zeros(3, device="meta"))
    optimizer = make_adam([parameter], decoupled=True, **ADAM)
    assert kernel(optimizer) == "foreach" and optimizer.defaults["foreach"] is True
    # the device it will train on decides (the optimiser is built before accelerate moves the model)
    assert kernel(make_adam(_model().parameters(), decoupled=True, device=torch.device("meta"), **ADAM)) == "foreach"
    assert kernel(torch.optim.AdamW(_model().parameters(), foreach=False)) == "for-loop"


def test_kept_gradient_buffers_are_reused_and_train_identically():
    kept, freed = _model(), _model()
    kept_optimizer = make_adam(kept.parameters(), decoupled=True, **ADAM)
    freed_optimizer = make_adam(freed.parameters(), decoupled=True, **ADAM)
    _train(kept, kept_optimizer, 1, keep_buffers=True)
    buffers = [p.grad.data_ptr() for p in kept.parameters()]
    assert all(p.grad is not None and not p.grad.any() for p in kept.parameters())  # zeroed, not freed
    _train(kept, kept_optimizer, 3, keep_buffers=True, start=1)
    assert [p.grad.data_ptr() for p in kept.parameters()] == buffers  # the same tensors every step
    _train(freed, freed_optimizer, 4)
    assert all(p.grad is None for p in freed.parameters())
    for p, q in zip(kept.parameters(), freed.parameters()):  # 0 + g is g: the same computation, bit for bit
        assert torch.equal(p, q)


def test_optimizer_state_of_the_unfused_optimizer_resumes_in_the_fused_one(tmp_path):
    """Checkpoints written before the fused kernel hold a for-loop AdamW's state: it loads and steps on."""
    old, new = _model(), _model()
    old_optimizer = torch.optim.AdamW(old.parameters(), foreach=False, **ADAM)
    _train(old, old_optimizer, 3)
    new.load_state_dict(old.state_dict())
    new_optimizer = make_adam(new.parameters(), decoupled=True, **ADAM)
    save_state(tmp_path, "optimizer", old_optimizer.state_dict())  # as a checkpoint holds it
    new_optimizer.load_state_dict(load_state(tmp_path, "optimizer"))
    assert kernel(new_optimizer) == "fused"  # the old state's foreach=False, fused=None do not come along
    for parameter, state in new_optimizer.state.items():  # where torch puts a fused optimiser's step counts
        assert state["step"].dtype == torch.float32 and state["step"].device == parameter.device
    _train(old, old_optimizer, 2, start=3)
    _train(new, new_optimizer, 2, start=3)
    for p, q in zip(old.parameters(), new.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_lerp_toward_moves_each_average_by_the_weight():
    averages = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    lerp_toward_(averages, [torch.tensor([3.0, -2.0]), torch.tensor([[10.0]])], 0.25)
    assert torch.equal(averages[0], torch.tensor([1.5, 1.0])) and torch.equal(averages[1], torch.tensor([[2.5]]))


def test_half_life_ema_matches_the_per_tensor_update_it_replaced():
    model = _model()
    ema = HalfLifeEMA(model, halflife_kimg=0.01, rampup=None)
    expected = [p.detach().clone() for p in model.parameters()]
    optimizer = make_adam(model.parameters(), decoupled=False, **ADAM)
    for images in range(0, 16, 4):
        _train(model, optimizer, 1, start=images)
        ema.update(model, 4, images)
        beta = ema_beta(4, images, 0.01, None)
        expected = [p.detach().lerp(e, beta) for e, p in zip(expected, model.parameters())]  # the old update
    for average, reference, current in zip(ema.model.parameters(), expected, model.parameters()):
        assert not torch.equal(average, current)
        torch.testing.assert_close(average, reference, rtol=1e-6, atol=1e-7)


def test_warmup_ema_is_diffusers_ema_model_in_schedule_and_state_dict(tmp_path):
    model = _model()
    ours = WarmupEMA(model.parameters(), decay=0.99, use_ema_warmup=True, power=2 / 3)
    theirs = EMAModel(model.parameters(), decay=0.99, use_ema_warmup=True, power=2 / 3)
    optimizer = make_adam(model.parameters(), decoupled=True, **ADAM)
    for step in range(6):
        _train(model, optimizer, 1, start=step)
        ours.step(model.parameters())
        theirs.step(model.parameters())
        if step == 2:  # an old checkpoint's EMA (diffusers' EMAModel) resumes into ours and goes on alike
            save_state(tmp_path, "ema", theirs.state_dict())  # as a checkpoint holds it
            ours = WarmupEMA(model.parameters(), decay=0.5)
            ours.load_state_dict(load_state(tmp_path, "ema"))
    assert ours.cur_decay_value == theirs.cur_decay_value and ours.optimization_step == 6
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for s, t, p in zip(ours.shadow_params, theirs.shadow_params, model.parameters()):
        assert not torch.equal(s, p)
        torch.testing.assert_close(s, t, rtol=1e-6, atol=1e-7)


def test_warmup_ema_copies_frozen_parameters():
    model = _model()
    ema = WarmupEMA(model.parameters(), decay=0.9, use_ema_warmup=False)
    frozen = model[0].weight
    frozen.requires_grad_(False)
    with torch.no_grad():
        frozen.add_(1.0)
        model[2].weight.add_(1.0)
    ema.step(model.parameters())
    assert torch.equal(ema.shadow_params[0], frozen)
    torch.testing.assert_close(ema.shadow_params[2], model[2].weight - ema.cur_decay_value)  # moved 1 - decay

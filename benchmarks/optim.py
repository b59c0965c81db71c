"""The choices trainer.optim and trainer.ema make, measured interleaved on the CPU-sized SD-like UNet:

- the Adam step: torch's for-loop, foreach and fused kernels (make_adam picks fused, else foreach);
- a whole training step (forward, backward, fused Adam) with the gradient buffers freed (zero_grad to None,
  the default) or kept and zeroed in place (--keep-grad-buffers);
- the EMA update: diffusers' EMAModel per tensor and with foreach=True, and lerp_toward_ (one
  torch._foreach_lerp_), which WarmupEMA and HalfLifeEMA use.
Each ratio is contender seconds over the reference's, over blocks of turns, median [min-max].

    python benchmarks/optim.py [--resolution 64] [--batch-size 4] [--turns 41] [--blocks 4]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import torch
from diffusers.training_utils import EMAModel

from diffusion.teacher import load_unet
from diffusion.tiny import CPU_SIZES, write_tiny_teacher
from evaluation.timing import Turns, ratio
from trainer.ema import lerp_toward_
from trainer.optim import clear_gradients, make_adam

from figures import blocks_option, emit, json_option  # benchmarks/figures.py: the scripts run from benchmarks/

ADAM = {"lr": 1e-6, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}


def adam_steps(parameters: list[torch.nn.Parameter]) -> dict:
    """One AdamW step per kernel, on fixed random gradients (each optimiser its own copy of the weights)."""
    steps = {}
    for name, kernel in {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}.items():
        copies = [torch.nn.Parameter(p.detach().clone()) for p in parameters]
        for copy in copies:
            copy.grad = torch.randn_like(copy)
        steps[f"adam_{name}"] = torch.optim.AdamW(copies, **ADAM, **kernel).step
    return steps


def training_steps(teacher_dir: Path, batch_size: int) -> dict:
    """A forward + backward + fused AdamW step of its own UNet, ending by freeing or by zeroing the gradients."""
    steps = {}
    for name, keep in {"free": False, "keep": True}.items():
        unet = load_unet(teacher_dir).train()
        optimizer = make_adam(unet.parameters(), decoupled=True, **ADAM)
        side, channels = unet.config.sample_size, unet.config.in_channels
        z = torch.randn(batch_size, channels, side, side)
        t = torch.randint(0, 1000, (batch_size,))
        text = torch.randn(batch_size, 77, unet.config.cross_attention_dim)

        def step(unet=unet, optimizer=optimizer, z=z, t=t, text=text, keep=keep) -> None:
            unet(z, t, encoder_hidden_states=text).sample.pow(2).mean().backward()
            optimizer.step()
            clear_gradients(optimizer, keep)

        steps[f"step_{name}_buffers"] = step
    return steps


def ema_updates(parameters: list[torch.nn.Parameter]) -> dict:
    per_tensor = EMAModel(parameters, decay=0.9999)
    foreach = EMAModel(parameters, decay=0.9999, foreach=True)
    shadow = [p.detach().clone() for p in parameters]
    return {"ema_diffusers": lambda: per_tensor.step(parameters),
            "ema_diffusers_foreach": lambda: foreach.step(parameters),
            "ema_lerp_toward": lambda: lerp_toward_(shadow, parameters, 1e-4)}


@click.command()
@click.option("--resolution", default=64, show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--turns", default=41, show_default=True)
@blocks_option()
@json_option()
def main(resolution: int, batch_size: int, turns: int, blocks: int, json_out: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = write_tiny_teacher(Path(tmp) / "teacher", resolution=resolution, **CPU_SIZES)
        parameters = list(load_unet(teacher_dir).parameters())
        timed = Turns({**adam_steps(parameters), **training_steps(teacher_dir, batch_size),
                       **ema_updates(parameters)})
        for _ in range(turns):
            timed.run()
    s = timed.seconds
    figures = {
        "parameters_millions": sum(p.numel() for p in parameters) / 1e6, "tensors": len(parameters),
        "resolution": resolution, "batch_size": batch_size, "threads": torch.get_num_threads(),
        "adam_foreach_over_loop": ratio(s["adam_foreach"], s["adam_loop"], blocks),
        "adam_fused_over_loop": ratio(s["adam_fused"], s["adam_loop"], blocks),
        "adam_fused_over_foreach": ratio(s["adam_fused"], s["adam_foreach"], blocks),
        "step_keep_over_free_buffers": ratio(s["step_keep_buffers"], s["step_free_buffers"], blocks),
        "ema_diffusers_foreach_over_diffusers": ratio(s["ema_diffusers_foreach"], s["ema_diffusers"], blocks),
        "ema_lerp_toward_over_diffusers": ratio(s["ema_lerp_toward"], s["ema_diffusers"], blocks),
    }
    emit(figures, json_out)


if __name__ == "__main__":
    main()

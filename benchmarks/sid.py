"""SiD-LSG training cost, interleaved in one process: our loop against its plain-torch floor, the guidance
strategies against each other, and (with --official PATH) against the official SiD-LSG code.

Contenders, one iteration each per turn (a fake-network update and a generator update, each on one batch):
- lsg: `trainer fit --method sid-lsg`'s loop (kappa1..4 = K), timed by the loop itself (`after_step`);
- long (kappa4 = K only) and short (kappa2 = kappa3 = 1/K): the same loop's iteration;
- lsg_buffers_kept, lsg_buffers_freed: the LSG iteration with --keep-grad-buffers and --free-grad-buffers;
- floor: the same UNet work in plain torch (generator forward without grad, fake forward 2B + backward +
  Adam; generator forward, teacher forward 2B, fake forward 2B, backward through all three into the
  generator + Adam), fused Adam, buffers freed (measured the faster), nothing else: no EMA, no NaN guards,
  no text encoding;
- official: one iteration of the official code's loop (benchmarks/official_sid.py), when --official is given,
  in a process of its own stepped over a pipe (so its gc.collect() scans its own objects, not ours);
  official_without_gc: the same without the gc.collect() its loop runs every iteration (on this CPU-sized
  model about a quarter of its iteration).
Callables run in rotating order after each loop iteration; each time ratio is over blocks of turns (the first
left out) as median [min-max]. Memory: peak RSS growth of each strategy over a few iterations in a fresh
process (the seed's Table 4 puts LSG at about 1.2x the time and 1.1x the memory of Long or Short).

    python benchmarks/sid.py [--batch-size 4] [--resolution 64] [--iterations 21] [--guidance 1.5]
                             [--official PATH] [--blocks 4] [--json-out FILE]
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from figures import blocks_option, emit, json_option  # benchmarks/figures.py: the scripts run from benchmarks/

STRATEGIES = {  # name -> kappa options (the short-guidance scale is below 1 by definition)
    "long": lambda k: {"kappa": 1.0, "kappa4": k},
    "short": lambda k: {"kappa": 1.0, "kappa2": 1.0 / k, "kappa3": 1.0 / k},
    "lsg": lambda k: {"kappa": k},
}
TARGETS = {"lsg_time_over_floor": "<= 1.05", "lsg_speed_over_official": ">= 1.15"}
SEED = 0
PROMPTS = 10_000


def sid_config(teacher_dir: str, prompts: str, out: str, batch_size: int, iterations: int, options: dict):
    from trainer.sid_config import SidConfig

    return SidConfig(teacher=teacher_dir, prompts=prompts, out=out, batch_size=batch_size, seed=SEED,
                     max_kimg=iterations * batch_size / 1000, checkpoint_every_kimg=1e9, grid_every_kimg=0,
                     report_to="none", **options)


def strategy_iteration(cfg, accelerator):
    """One iteration of the sid-lsg loop for `cfg`, as a callable (its own counters)."""
    from trainer.prompts import read_prompts
    from trainer.sid import SidLoop, SidState

    loop, state = SidLoop.build(cfg, accelerator, read_prompts(cfg.prompts).prompts), SidState()
    return lambda: loop.iteration(state)


def floor_iteration(teacher_dir: str, batch_size: int, kappa: float):
    """The UNet work of one LSG iteration and two fused Adam steps, in plain torch, as a callable."""
    import torch

    from diffusion.teacher import load_teacher, load_unet
    from trainer.optim import clear_gradients, make_adam

    teacher = load_teacher(teacher_dir, with_unet_and_vae=False)
    generator, fake, real = (load_unet(teacher.root).train() for _ in range(3))
    real.requires_grad_(False)
    optimizers = [make_adam(net.parameters(), decoupled=False, lr=1e-6, betas=(0.0, 0.999), eps=1e-8)
                  for net in (fake, generator)]
    side, channels = generator.config.sample_size, generator.config.in_channels
    z, noise = (torch.randn(batch_size, channels, side, side) for _ in range(2))
    t_init, t = torch.full((batch_size,), 625), torch.randint(20, 980, (batch_size,))
    text = teacher.encode_text(["a photo of a cat"] * batch_size)
    both = torch.cat([text, teacher.encode_text([""]).expand(batch_size, -1, -1)])

    def guided(net, x):
        cond, uncond = net(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=both).sample.chunk(2)
        return uncond + kappa * (cond - uncond)

    def iteration() -> None:
        with torch.no_grad():
            x_g = generator(z, t_init, encoder_hidden_states=text).sample
        (guided(fake, x_g + noise) - noise).pow(2).sum().backward()
        optimizers[0].step()
        clear_gradients(optimizers[0], False)
        x_g = generator(z, t_init, encoder_hidden_states=text).sample
        y_real = guided(real, x_g + noise)  # frozen weights; the gradient reaches x_g through it, as in the seed
        fake.requires_grad_(False)
        ((guided(fake, x_g + noise) - y_real) * x_g).sum().backward()
        fake.requires_grad_(True)
        optimizers[1].step()
        clear_gradients(optimizers[1], False)

    return iteration


def interleaved(teacher_dir: str, prompts: str, tmp: Path, batch_size: int, iterations: int, guidance: float,
                official: str | None, blocks: int) -> dict:
    from accelerate.state import AcceleratorState

    from evaluation.timing import Turns, ratio
    from trainer.fit import make_accelerator
    from trainer.sid import run_sid

    configs = {name: sid_config(teacher_dir, prompts, str(tmp / name), batch_size, iterations, kappas(guidance))
               for name, kappas in STRATEGIES.items()}
    accelerator = make_accelerator(configs["lsg"], grad_scaler=False)
    contenders = {name: strategy_iteration(configs[name], accelerator) for name in ("long", "short")}
    for keep in (True, False):  # the LSG iteration (as long and short are timed) with buffers kept and freed
        cfg = dataclasses.replace(configs["lsg"], keep_grad_buffers=keep, out=str(tmp / f"buffers-{keep}"))
        contenders[f"lsg_buffers_{'kept' if keep else 'freed'}"] = strategy_iteration(cfg, accelerator)
    contenders["floor"] = floor_iteration(teacher_dir, batch_size, guidance)
    processes = []
    if official:
        from official_sid import OfficialProcess

        for collect in (True, False):
            processes.append(OfficialProcess(Path(official), Path(teacher_dir), Path(prompts), batch_size, guidance,
                                             SEED, collect_garbage=collect))
            contenders["official" if collect else "official_without_gc"] = processes[-1].step
    turns = Turns(contenders)
    run_sid(configs["lsg"], after_step=turns.between("lsg"))
    AcceleratorState._reset_state(reset_partial_state=True)
    for process in processes:
        process.close()
    seconds = turns.seconds
    lsg = seconds["lsg_buffers_freed"]  # the default settings' iteration, timed as long and short are
    figures = {"lsg_time_over_floor": ratio(seconds["lsg"], seconds["floor"], blocks),
               "lsg_time_over_long": ratio(lsg, seconds["long"], blocks),
               "lsg_time_over_short": ratio(lsg, seconds["short"], blocks),
               "lsg_time_buffers_kept_over_freed": ratio(seconds["lsg_buffers_kept"], lsg, blocks)}
    if official:  # images/s of ours (the loop) over the official code's: its seconds over ours
        figures["lsg_speed_over_official"] = ratio(seconds["official"], seconds["lsg"], blocks)
        figures["lsg_speed_over_official_without_gc"] = ratio(seconds["official_without_gc"], seconds["lsg"], blocks)
    figures["lsg_seconds_per_kimg"] = statistics.median(seconds["lsg"][1:]) * 1000 / batch_size
    return figures


def peak_memory(teacher_dir: str, prompts: str, out: str, batch_size: int, options: dict) -> float:
    """Peak RSS growth (MB) of three iterations of the loop, models and optimiser states included."""
    import torch

    from evaluation.speed import MemoryProbe
    from trainer.sid import run_sid

    probe = MemoryProbe(torch.device("cpu"))
    with probe:
        run_sid(sid_config(teacher_dir, prompts, out, batch_size, 3, options))
    return probe.peak_growth / 2**20


def in_fresh_process(job: dict) -> float:
    script = Path(__file__).resolve()
    done = subprocess.run([sys.executable, str(script), "--child", json.dumps(job)], capture_output=True, text=True,
                          cwd=script.parent)
    if done.returncode != 0:
        raise RuntimeError(f"measuring memory failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--batch-size", default=4, show_default=True)
@click.option("--resolution", default=64, show_default=True)
@click.option("--iterations", default=21, show_default=True, help="Turns: each contender's iterations.")
@click.option("--guidance", default=1.5, show_default=True, help="K: Long kappa4 = K, Short kappa2,3 = 1/K, LSG all K.")
@click.option("--official", default=None, type=click.Path(exists=True, file_okay=False),
              help="A checkout of the official SiD-LSG code (github.com/mingyuanzhou/SiD-LSG): adds it as a contender.")
@blocks_option()
@json_option()
@click.option("--child", default=None, hidden=True)
def main(batch_size: int, resolution: int, iterations: int, guidance: float, official: str | None, blocks: int,
         json_out: str | None, child: str | None) -> None:
    if child:
        print(peak_memory(**json.loads(child)))
        return
    if official:
        from official_sid import official_available

        if (problem := official_available(Path(official))) is not None:
            raise click.BadParameter(problem, param_hint="--official")
    from diffusion.tiny import CPU_SIZES, write_tiny_teacher

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher_dir = str(write_tiny_teacher(tmp / "teacher", resolution=resolution, **CPU_SIZES))
        prompts = tmp / "prompts.txt"
        # distinct prompts, as in a real prompt file: the text cache never hits, every contender encodes its text
        prompts.write_text("\n".join(f"a photo of object number {i}" for i in range(PROMPTS)))
        figures = {"batch_size": batch_size, "resolution": resolution, "iterations": iterations, "guidance": guidance,
                   **interleaved(teacher_dir, str(prompts), tmp, batch_size, iterations, guidance, official, blocks)}
        runs = {name: kappas(guidance) for name, kappas in STRATEGIES.items()}
        runs["lsg_buffers_kept"] = {**runs["lsg"], "keep_grad_buffers": True}
        memory = {name: in_fresh_process({"teacher_dir": teacher_dir, "prompts": str(prompts), "options": options,
                                          "out": str(tmp / f"memory-{name}"), "batch_size": batch_size})
                  for name, options in runs.items()}
    for name, mb in memory.items():
        figures[f"{name}_peak_mb"] = mb
    for other in ("long", "short"):
        figures[f"lsg_memory_over_{other}"] = memory["lsg"] / memory[other]
    figures["lsg_buffers_kept_memory_over_freed"] = memory["lsg_buffers_kept"] / memory["lsg"]
    emit(figures, json_out, TARGETS)


if __name__ == "__main__":
    main()

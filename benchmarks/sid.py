"""SiD-LSG training cost, interleaved in one process: our loop against its plain-torch floor, the guidance
strategies against each other, and (with --official PATH) against the official SiD-LSG code.

Contenders, one iteration each per turn (a fake-network update and a generator update, each on one batch):
- lsg: `trainer fit --method sid-lsg`'s loop (kappa1..4 = K), timed by the loop itself (`after_step`);
- long (kappa4 = K only) and short (kappa2 = kappa3 = 1/K): the same loop's iteration;
- lsg_buffers_kept, lsg_buffers_freed: the LSG iteration with --keep-grad-buffers and --free-grad-buffers;
- lsg_lora: the LSG iteration with LoRA networks (--lora-rank R, default 4, alpha = R, the default targets):
  the teacher's own UNet carries the generator's, the fake network's and the EMA's adapters, so one UNet is
  in memory instead of four, and Adam states and gradients are the adapters' only;
- floor: the same UNet work in plain torch (generator forward without grad, fake forward 2B + backward +
  Adam; generator forward, teacher forward 2B, fake forward 2B, backward through all three into the
  generator + Adam), fused Adam, buffers freed (measured the faster), nothing else: no EMA, no NaN guards,
  no text encoding;
- official: one iteration of the official code's loop (benchmarks/official_sid.py), when --official is given,
  in a process of its own stepped over a pipe (so its gc.collect() scans its own objects, not ours);
  official_without_gc: the same without the gc.collect() its loop runs every iteration (on this CPU-sized
  model about a quarter of its iteration).
Callables run in rotating order after each loop iteration; each time ratio is over blocks of turns (the first
left out) as median [min-max]; lsg_lora and long, short are compared with lsg_buffers_freed (the default
settings' LSG iteration, timed as they are).

Memory: the peak RSS of a fresh process running `trainer fit --method sid-lsg`'s whole run (run_sid: three
iterations, the final checkpoint and the export) above its RSS just before run_sid, i.e. after the imports
(torch, diffusers, transformers, peft, accelerate: about 840 MB here, the same for every contender) and before
the teacher is read. So it includes every model's weights (teacher UNet, text encoder, VAE; generator, fake
network and EMA copies or their adapters), the optimiser states, the gradients, the activations and the
saving. Each contender runs in --memory-runs fresh processes, in rotating order; its peak is their median and
a memory ratio is median [min-max] over the paired runs. The imports' RSS is printed too
(process_baseline_mb), and the LoRA ratio with it added (whole process). The seed's Table 4 puts LSG at about
1.2x the time and 1.1x the memory of Long or Short.

    python benchmarks/sid.py [--batch-size 4] [--resolution 64] [--iterations 21] [--guidance 1.5]
                             [--lora-rank 4] [--memory-runs 2] [--official PATH] [--blocks 4] [--json-out FILE]
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

import click

from figures import blocks_option, emit, json_option, memory_in_turns, peak_memory_of  # benchmarks/figures.py: the scripts run from benchmarks/
from evaluation.timing import ratio  # after figures: it hides CUDA before torch comes in

STRATEGIES = {  # name -> kappa options (the short-guidance scale is below 1 by definition)
    "long": lambda k: {"kappa": 1.0, "kappa4": k},
    "short": lambda k: {"kappa": 1.0, "kappa2": 1.0 / k, "kappa3": 1.0 / k},
    "lsg": lambda k: {"kappa": k},
}
TARGETS = {"lsg_time_over_floor": "<= 1.05", "lsg_speed_over_official": ">= 1.15",
           "lsg_lora_memory_over_lsg": "<= 0.5"}  # LoRA's peak memory against the full networks', same size
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
    both = text.paired_with(teacher.encode_text([""]))  # 2B rows: cond, then uncond
    cond_kwargs, both_kwargs = text.unet_kwargs(generator.dtype), both.unet_kwargs(generator.dtype)

    def guided(net, x):
        cond, uncond = net(torch.cat([x, x]), torch.cat([t, t]), **both_kwargs).sample.chunk(2)
        return uncond + kappa * (cond - uncond)

    def iteration() -> None:
        with torch.no_grad():
            x_g = generator(z, t_init, **cond_kwargs).sample
        (guided(fake, x_g + noise) - noise).pow(2).sum().backward()
        optimizers[0].step()
        clear_gradients(optimizers[0], False)
        x_g = generator(z, t_init, **cond_kwargs).sample
        y_real = guided(real, x_g + noise)  # frozen weights; the gradient reaches x_g through it, as in the seed
        fake.requires_grad_(False)
        ((guided(fake, x_g + noise) - y_real) * x_g).sum().backward()
        fake.requires_grad_(True)
        optimizers[1].step()
        clear_gradients(optimizers[1], False)

    return iteration


def interleaved(teacher_dir: str, prompts: str, tmp: Path, batch_size: int, iterations: int, guidance: float,
                lora_rank: int, official: str | None, blocks: int) -> dict:
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
    lora = dataclasses.replace(configs["lsg"], lora_rank=lora_rank, out=str(tmp / "lora"))
    contenders["lsg_lora"] = strategy_iteration(lora, accelerator)
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
               "lsg_time_buffers_kept_over_freed": ratio(seconds["lsg_buffers_kept"], lsg, blocks),
               "lsg_lora_time_over_lsg": ratio(seconds["lsg_lora"], lsg, blocks)}
    if official:  # images/s of ours (the loop) over the official code's: its seconds over ours
        figures["lsg_speed_over_official"] = ratio(seconds["official"], seconds["lsg"], blocks)
        figures["lsg_speed_over_official_without_gc"] = ratio(seconds["official_without_gc"], seconds["lsg"], blocks)
    figures["lsg_seconds_per_kimg"] = statistics.median(seconds["lsg"][1:]) * 1000 / batch_size
    return figures


def peak_memory(teacher_dir: str, prompts: str, out: str, batch_size: int, options: dict) -> dict:
    """A whole run of three iterations (build, iterations, checkpoint, export) under the memory probe
    (figures.peak_memory_of): the teacher's and every network's weights, optimiser states, gradients and
    activations count, the imports do not."""
    from trainer.sid import run_sid  # imports peft too: a LoRA run imports nothing more inside the probe

    return peak_memory_of(lambda: run_sid(sid_config(teacher_dir, prompts, out, batch_size, 3, options)))


@click.command()
@click.option("--batch-size", default=4, show_default=True)
@click.option("--resolution", default=64, show_default=True)
@click.option("--iterations", default=21, show_default=True, help="Turns: each contender's iterations.")
@click.option("--guidance", default=1.5, show_default=True, help="K: Long kappa4 = K, Short kappa2,3 = 1/K, LSG all K.")
@click.option("--lora-rank", default=4, show_default=True, help="The lsg_lora contender's adapter rank (alpha = rank).")
@click.option("--memory-runs", default=2, show_default=True, help="Fresh processes per contender's peak memory.")
@click.option("--official", default=None, type=click.Path(exists=True, file_okay=False),
              help="A checkout of the official SiD-LSG code (github.com/mingyuanzhou/SiD-LSG): adds it as a contender.")
@blocks_option()
@json_option()
@click.option("--child", default=None, hidden=True)
def main(batch_size: int, resolution: int, iterations: int, guidance: float, lora_rank: int, memory_runs: int,
         official: str | None, blocks: int, json_out: str | None, child: str | None) -> None:
    if child:
        print(json.dumps(peak_memory(**json.loads(child))))
        return
    if lora_rank < 1 or memory_runs < 1:
        raise click.BadParameter("--lora-rank and --memory-runs must be at least 1")
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
                   "lora_rank": lora_rank,
                   **interleaved(teacher_dir, str(prompts), tmp, batch_size, iterations, guidance, lora_rank, official,
                                 blocks)}
        runs = {name: kappas(guidance) for name, kappas in STRATEGIES.items()}
        runs["lsg_buffers_kept"] = {**runs["lsg"], "keep_grad_buffers": True}
        runs["lsg_lora"] = {**runs["lsg"], "lora_rank": lora_rank}
        job = {"teacher_dir": teacher_dir, "prompts": str(prompts), "batch_size": batch_size}
        measured = memory_in_turns(__file__, {name: (lambda turn, name=name: {
            **job, "options": runs[name], "out": str(tmp / f"memory-{name}-{turn}")}) for name in runs}, memory_runs)
    peak = {name: [m["peak_mb"] for m in runs_of] for name, runs_of in measured.items()}
    memory = {name: statistics.median(values) for name, values in peak.items()}
    baseline = statistics.median(m["before_mb"] for runs_of in measured.values() for m in runs_of)
    figures["process_baseline_mb"] = baseline
    for name, mb in memory.items():
        figures[f"{name}_peak_mb"] = mb
    for other in ("long", "short"):
        figures[f"lsg_memory_over_{other}"] = memory["lsg"] / memory[other]
    figures["lsg_buffers_kept_memory_over_freed"] = memory["lsg_buffers_kept"] / memory["lsg"]
    # paired runs (run i of each): one value per pair, as median [min-max]
    figures["lsg_lora_memory_over_lsg"] = ratio(peak["lsg_lora"], peak["lsg"], memory_runs, skip=0)
    figures["lsg_lora_whole_process_memory_over_lsg"] = (baseline + memory["lsg_lora"]) / (baseline + memory["lsg"])
    emit(figures, json_out, TARGETS)


if __name__ == "__main__":
    main()

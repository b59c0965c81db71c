"""`trainer fit` throughput against the bare student step, interleaved in one run.

bare: the student's forward + loss + backward + the same optimiser step (fused AdamW, gradient buffers freed)
on one batch of tensors already in memory (text embeddings included), the same model, batch size and loss;
nothing else. trainer: a `trainer fit` step inside its loop: shard streaming and decoding, caption encoding
(cached), the same step, the cross-rank agreement on finite losses, progress and logging (checkpoints
excluded). The two alternate step by step (`after_step`), so a machine load that comes and goes hits both;
each ratio is bare seconds / trainer seconds (the trainer's rate over the bare rate) over blocks of turns,
the first turn (it starts the data loader) left out, printed as median [min-max].

Contenders: no EMA, with EMA (decay 0.9999), and with one DataLoader worker (on 2 cores a worker takes CPU
from the step, and it also prefetches while the bare step runs: that ratio flatters the trainer).

LoRA: the same loop (no EMA) with a rank-R LoRA student (--lora-rank, default 4, alpha = R, the default
targets) against the full student's loop, both `trainer fit` runs stepped in turns, each in a thread of its own
(`SteppedLoop`: one runs while the other waits at its `after_step`), so each step's seconds are its loop's
whole period, as the other figures time the trainer; fit_lora_time_over_full is LoRA seconds / full seconds.
Their memory: the peak RSS of a fresh process running the whole `trainer fit` run (3 steps, checkpoint and
export) above its RSS just before it (after the imports, before the teacher is read): weights, gradients,
optimiser states, activations and data loading, not the imports (process_baseline_mb). Each in --memory-runs
fresh processes, alternating; the ratio is median [min-max] over the pairs.

    python benchmarks/fit.py [--samples 256] [--batch-size 8] [--resolution 128] [--steps 60] [--blocks 4]
                             [--lora-rank 4] [--memory-runs 2] [--unet-channels 64,128,256]
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
from pathlib import Path

import click
import torch
from accelerate.state import AcceleratorState

from diffusion.teacher import load_teacher, load_unet
from diffusion.tiny import CPU_SIZES
from diffusion.unet import unet_eps
from evaluation.timing import Turns, ratio
from shards.reader import ShardStream
from trainer.config import FitConfig
from trainer.fit import build_student, make_optimizer, run_fit
from trainer.losses import cfg_distill_loss
from trainer.optim import clear_gradients

from figures import build_shard_world, emit, family_option, memory_in_turns, peak_memory_of, shard_world_options  # benchmarks/figures.py: the scripts run from benchmarks/

TARGETS = {"fit_over_bare": ">= 0.98", "fit_ema_over_bare": ">= 0.96"}  # the issue sets LoRA's memory target for sid
MEMORY_STEPS = 3


def bare_step(cfg: FitConfig, shards: Path):
    """One optimiser step on one in-memory batch, as a callable."""
    teacher = load_teacher(cfg.teacher, with_unet_and_vae=False)
    sample = next(iter(ShardStream(shards, shuffle_buffer=1)))
    batch = {k: v.unsqueeze(0).expand(cfg.batch_size, *v.shape).float() for k, v in sample.items()
             if isinstance(v, torch.Tensor) and v.ndim == 3}
    t = sample["t"].repeat(cfg.batch_size)
    text = teacher.encode_text([sample["caption"]] * cfg.batch_size)
    student = build_student(cfg, teacher.root)
    optimizer = make_optimizer(cfg, student)

    def step() -> None:
        eps = unet_eps(student, teacher.schedule, batch["zt"], t, text)
        cfg_distill_loss(eps, batch["eps_cond"], batch["eps_uncond"], cfg.guidance_scale).mean().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        optimizer.step()
        clear_gradients(optimizer, cfg.keep_grad_buffers)

    step()  # warm-up
    return step


def interleaved_ratio(cfg: FitConfig, bare, blocks: int):
    """The trainer's steps alternating with bare steps: bare seconds / trainer seconds."""
    turns = Turns({"bare": bare})
    run_fit(cfg, after_step=turns.between("fit"))
    AcceleratorState._reset_state(reset_partial_state=True)
    return ratio(turns.seconds["bare"], turns.seconds["fit"], blocks)


class SteppedLoop:
    """`run_fit(cfg)` in a thread of its own, one step per call: the thread waits at its `after_step` until the
    next call, so two such loops take turns and never run at once. A call's seconds are the loop's whole
    period, from resuming to the end of its next step (its bookkeeping after the previous step included). The
    first call also builds the run (the warm-up turn, left out of the ratios); `finish` lets it checkpoint and
    export."""

    def __init__(self, cfg: FitConfig):
        self.go, self.done, self.error = threading.Event(), threading.Event(), None
        self.thread = threading.Thread(target=self._run, args=(cfg,), daemon=True)

    def _run(self, cfg: FitConfig) -> None:
        try:
            self._wait()
            run_fit(cfg, after_step=lambda _seconds: (self.done.set(), self._wait()))
        except BaseException as error:  # handed to the caller
            self.error = error
        finally:
            self.done.set()

    def _wait(self) -> None:
        self.go.wait()
        self.go.clear()

    def _resume(self) -> None:
        if not self.thread.is_alive() and self.error is None:
            self.thread.start()
        self.go.set()
        self.done.wait()
        self.done.clear()
        if self.error is not None:
            raise self.error

    def __call__(self) -> None:
        self._resume()
        if not self.thread.is_alive():
            raise RuntimeError("the stepped loop ended before its last step was called")

    def finish(self) -> None:
        self._resume()
        self.thread.join()


def lora_against_full(cfg: dict, lora_rank: int, tmp: Path, steps: int, blocks: int):
    """The LoRA student's loop and the full student's, stepped in turns: LoRA seconds / full seconds."""
    loops = {"full": SteppedLoop(FitConfig(out=str(tmp / "loop-full"), **cfg)),
             "lora": SteppedLoop(FitConfig(out=str(tmp / "loop-lora"), **cfg, lora_rank=lora_rank))}
    turns = Turns(loops)
    for _ in range(steps):
        turns.run()
    for loop in loops.values():
        loop.finish()
    AcceleratorState._reset_state(reset_partial_state=True)
    return ratio(turns.seconds["lora"], turns.seconds["full"], blocks)


def peak_memory(cfg: dict) -> dict:
    """A whole `trainer fit` run of MEMORY_STEPS steps under the memory probe (figures.peak_memory_of)."""
    return peak_memory_of(lambda: run_fit(FitConfig(**cfg)))


def memory_figures(cfg: dict, lora_rank: int, tmp: Path, runs: int) -> dict:
    """Peak memory of the full and the LoRA student's runs, each in `runs` fresh processes, alternating."""
    options = {"full": {}, "lora": {"lora_rank": lora_rank}}
    measured = memory_in_turns(__file__, {name: (lambda turn, name=name: {
        **cfg, **options[name], "max_steps": MEMORY_STEPS, "checkpoint_every": MEMORY_STEPS,
        "out": str(tmp / f"memory-{name}-{turn}")}) for name in options}, runs)
    peak = {name: [m["peak_mb"] for m in runs_of] for name, runs_of in measured.items()}
    before = [m["before_mb"] for runs_of in measured.values() for m in runs_of]
    baseline, full, lora = statistics.median(before), statistics.median(peak["full"]), statistics.median(peak["lora"])
    return {"process_baseline_mb": baseline, "fit_peak_mb": full, "fit_lora_peak_mb": lora,
            "fit_lora_memory_over_full": ratio(peak["lora"], peak["full"], runs, skip=0),
            "fit_lora_whole_process_memory_over_full": (baseline + lora) / (baseline + full)}


@click.command()
@shard_world_options(samples=256, steps=60)
@click.option("--lora-rank", default=4, show_default=True, help="The LoRA student's adapter rank (alpha = rank).")
@click.option("--memory-runs", default=2, show_default=True, help="Fresh processes per student's peak memory.")
@click.option("--unet-channels", default=",".join(map(str, CPU_SIZES["channels"])), show_default=True,
              help="The teacher's UNet block widths (wider: its weights weigh more against the rest of the run).")
@family_option()
@click.option("--child", default=None, hidden=True)
def main(samples: int, batch_size: int, resolution: int, steps: int, blocks: int, json_out: str | None,
         lora_rank: int, memory_runs: int, unet_channels: str, family: str, child: str | None) -> None:
    if child:
        print(json.dumps(peak_memory(json.loads(child))))
        return
    if lora_rank < 1 or memory_runs < 1:
        raise click.BadParameter("--lora-rank and --memory-runs must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        channels = tuple(int(c) for c in unet_channels.split(","))
        teacher_dir, _ = build_shard_world(tmp, samples, resolution, family=family, channels=channels)
        cfg = dict(method="cfg-distill", teacher=str(teacher_dir), shards=str(tmp / "shards"), batch_size=batch_size,
                   max_steps=steps, lr_warmup_steps=0, ema_decay=0.0, report_to="none", checkpoint_every=steps)
        bare = bare_step(FitConfig(out=str(tmp / "bare"), **cfg), tmp / "shards")
        figures = {"family": family, "samples": samples, "batch_size": batch_size, "resolution": resolution,
                   "steps": steps, "threads": torch.get_num_threads(), "unet_channels": unet_channels,
                   "unet_parameters_m": sum(p.numel() for p in load_unet(teacher_dir).parameters()) / 1e6,
                   "lora_rank": lora_rank}
        contenders = {"fit_over_bare": {"num_workers": 0}, "fit_ema_over_bare": {"num_workers": 0, "ema_decay": 0.9999},
                      "fit_1_worker_over_bare": {"num_workers": 1}}
        for name, options in contenders.items():
            figures[name] = interleaved_ratio(FitConfig(out=str(tmp / name), **{**cfg, **options}), bare, blocks)
        cfg["num_workers"] = 0
        figures["fit_lora_time_over_full"] = lora_against_full(cfg, lora_rank, tmp, steps, blocks)
        figures.update(memory_figures(cfg, lora_rank, tmp, memory_runs))
    emit(figures, json_out, TARGETS)


if __name__ == "__main__":
    main()

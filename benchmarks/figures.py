"""What every benchmark script shares: printing its figures (ratios as median [min-max] over blocks of
interleaved turns, with their targets), JSON output, and the shard world the trainer benchmarks read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

# CPU figures: the bare callables build their tensors on the CPU and Turns does not synchronise CUDA here, so
# a GPU the trainers would pick up is hidden (read at CUDA's first use, so setting it after torch's import works).
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from evaluation.timing import Ratio, rotated


def emit(figures: dict, json_out: str | None, targets: dict[str, str] | None = None) -> None:
    """Print `figures` aligned; a Ratio as median [min-max], with its target (e.g. ">= 0.95") and whether the
    median meets it. The machine's load average is printed too: these are ratios of a shared machine."""
    targets = targets or {}
    figures = {**figures, "load_average_1_5_15min": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    width = max(map(len, figures))
    for name, value in figures.items():
        if isinstance(value, Ratio):
            target = targets.get(name)
            verdict = f"   (target {target}: {'met' if _meets(value.median, target) else 'NOT met'})" if target else ""
            print(f"{name:>{width}}: {value}{verdict}")
        else:
            print(f"{name:>{width}}: {value:.3f}" if isinstance(value, float) else f"{name:>{width}}: {value}")
    if json_out:
        plain = {k: asdict(v) if isinstance(v, Ratio) else v for k, v in figures.items()}
        Path(json_out).write_text(json.dumps({**plain, "targets": targets}, indent=2))


def _meets(value: float, target: str) -> bool:
    operator, bound = target.split()
    return value >= float(bound) if operator == ">=" else value <= float(bound)


def shard_world_options(samples: int, steps: int):
    """The options of a benchmark fed from shards: --samples --batch-size --resolution --steps --blocks
    --json-out."""
    import click

    options = [
        click.option("--samples", default=samples, show_default=True),
        click.option("--batch-size", default=8, show_default=True),
        click.option("--resolution", default=128, show_default=True),
        click.option("--steps", default=steps, show_default=True, help="Turns: each contender's steps."),
        blocks_option(),
        json_option(),
    ]

    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def blocks_option():
    import click

    return click.option("--blocks", default=4, show_default=True,
                        help="Blocks of turns each ratio is computed over (median [min-max] of the blocks).")


def json_option():
    import click

    return click.option("--json-out", default=None, type=click.Path(dir_okay=False),
                        help="Also write the figures as JSON.")


FAMILIES = ("sd", "sdxl")


def family_option():
    import click

    return click.option("--family", type=click.Choice(FAMILIES), default="sd", show_default=True,
                        help="The teacher's layout: SD's StableDiffusionPipeline, or SDXL's (two text encoders, "
                             "micro-conditioning), at the same UNet widths.")


def write_cpu_teacher(folder: Path, resolution: int, family: str = "sd", channels: tuple[int, ...] | None = None) -> Path:
    """A CPU-sized teacher of the family's layout (diffusion.tiny's CPU_SIZES / CPU_SDXL_SIZES), its UNet widths
    `channels` when given."""
    from diffusion.tiny import CPU_SDXL_SIZES, CPU_SIZES, write_tiny_sdxl_teacher, write_tiny_teacher

    write, sizes = (write_tiny_teacher, CPU_SIZES) if family == "sd" else (write_tiny_sdxl_teacher, CPU_SDXL_SIZES)
    return write(folder, resolution=resolution, **{**sizes, **({"channels": channels} if channels else {})})


def build_shard_world(folder: Path, samples: int, resolution: int, store_clean: bool = False, family: str = "sd",
                      channels: tuple[int, ...] | None = None) -> tuple[Path, Path]:
    """A CPU-sized teacher of the family and cfg shards of a synthetic img2dataset source: (teacher, shards)."""
    from pipeline.build import BuildConfig, run_build
    from pipeline.synthetic import write_img2dataset_source

    teacher_dir = write_cpu_teacher(folder / "teacher", resolution, family, channels)
    source = write_img2dataset_source(folder / "source", samples=samples, per_tar=64, size=resolution + 32)
    run_build(BuildConfig(teacher=str(teacher_dir), source=str(source), out=str(folder / "shards"),
                          resolution=resolution, batch_size=16, shard_size=64, store_clean=store_clean))
    return teacher_dir, folder / "shards"


def peak_memory_of(run: Callable[[], object]) -> dict:
    """`run()` under a CPU memory probe: its peak RSS above the RSS before it (MB), so every weight, optimiser
    state, gradient and activation it makes counts and the imports do not; and that RSS before it (MB)."""
    import torch

    from evaluation.speed import MemoryProbe

    probe = MemoryProbe(torch.device("cpu"))
    with probe:
        run()
    if probe.peak_growth is None:
        raise RuntimeError("peak RSS is not readable here (/proc/self/clear_refs, VmHWM)")
    return {"peak_mb": probe.peak_growth / 2**20, "before_mb": probe.start / 2**20}


def in_fresh_process(script: str, job: dict) -> dict:
    """Run `script --child JOB` (a benchmark measuring one job) in a new process; its last stdout line, as JSON."""
    script = Path(script).resolve()
    done = subprocess.run([sys.executable, str(script), "--child", json.dumps(job)], capture_output=True, text=True,
                          cwd=script.parent)
    if done.returncode != 0:
        raise RuntimeError(f"measuring memory failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_in_turns(script: str, jobs: dict[str, Callable[[int], dict]], count: int) -> dict[str, list[dict]]:
    """Each named job's peak memory in `count` fresh processes of `script`, the jobs in rotating order;
    `jobs[name](turn)` is the job of that turn (its own output folder)."""
    measured: dict[str, list[dict]] = {name: [] for name in jobs}
    for turn in range(count):
        for name in rotated(list(jobs), turn):
            measured[name].append(in_fresh_process(script, jobs[name](turn)))
    return measured

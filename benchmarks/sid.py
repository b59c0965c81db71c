"""SiD-LSG training cost by guidance strategy, against the plain teacher forward + backward, side by side.

For Long (kappa4 > 1 only), Short (kappa2 = kappa3 < 1) and LSG (kappa1..4 > 1) on a CPU-sized SD-like model:
seconds per 1,000 generated images and peak memory, each measured in a fresh process. The reference, in its
own fresh process, is one training step of the bare UNet: forward + backward + Adam on the same batch.
Time ratios are per iteration of SiD (a fake-network update and a generator update, each on one batch) over
one reference step; memory is the peak RSS growth of the whole run above the process after imports (the
models and optimiser states included: three UNets and an EMA for SiD, one for the reference). The seed's
Table 4 puts LSG at about 1.2x the time and 1.1x the memory of Long or Short.

    python benchmarks/sid.py [--batch-size 4] [--resolution 64] [--iterations 12] [--guidance 1.5]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from figures import emit  # benchmarks/figures.py: the scripts run from benchmarks/

STRATEGIES = {  # name -> kappa options (the short-guidance scale is below 1 by definition)
    "long": lambda k: {"kappa": 1.0, "kappa4": k},
    "short": lambda k: {"kappa": 1.0, "kappa2": 1.0 / k, "kappa3": 1.0 / k},
    "lsg": lambda k: {"kappa": k},
}


def reference_step(teacher_dir: str, batch_size: int, iterations: int) -> dict:
    """Seconds per forward + backward + Adam step of the teacher's UNet on one batch, and its peak memory."""
    import torch
    from diffusers import UNet2DConditionModel

    from diffusion.teacher import load_teacher
    from diffusion.unet import unet_eps
    from evaluation.speed import MemoryProbe

    probe = MemoryProbe(torch.device("cpu"))
    with probe:
        teacher = load_teacher(teacher_dir, with_unet_and_vae=False)
        unet = UNet2DConditionModel.from_pretrained(teacher_dir, subfolder="unet").train()
        optimizer = torch.optim.Adam(unet.parameters(), lr=1e-6, betas=(0.0, 0.999))
        side = unet.config.sample_size
        z, eps = torch.randn(batch_size, 4, side, side), torch.randn(batch_size, 4, side, side)
        t = torch.randint(20, 980, (batch_size,))
        text = teacher.encode_text(["a photo of a cat"] * batch_size)
        seconds = []
        for _ in range(iterations + 1):
            start = time.perf_counter()
            (unet_eps(unet, teacher.schedule, z, t, text) - eps).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - start)
    return {"seconds": sum(seconds[1:]) / iterations, "peak_mb": probe.peak_growth / 2**20}


def sid_iteration(teacher_dir: str, prompts: str, out: str, batch_size: int, iterations: int, kappas: dict) -> dict:
    """Seconds per SiD iteration inside `trainer fit`'s loop (the first, warm-up one excluded), and the peak."""
    import torch

    from evaluation.speed import MemoryProbe
    from trainer.sid import run_sid
    from trainer.sid_config import SidConfig

    probe = MemoryProbe(torch.device("cpu"))
    with probe:
        cfg = SidConfig(teacher=teacher_dir, prompts=prompts, out=out, batch_size=batch_size,
                        max_kimg=(iterations + 1) * batch_size / 1000, checkpoint_every_kimg=1e9, grid_every_kimg=0,
                        report_to="none", **kappas)
        seconds = run_sid(cfg)["iteration_seconds"][1:]
    return {"seconds": sum(seconds) / len(seconds), "peak_mb": probe.peak_growth / 2**20}


def in_fresh_process(job: dict) -> dict:
    script = Path(__file__).resolve()
    done = subprocess.run([sys.executable, str(script), "--child", json.dumps(job)], capture_output=True, text=True,
                          cwd=script.parent)
    if done.returncode != 0:
        raise RuntimeError(f"{job['kind']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--batch-size", default=4, show_default=True)
@click.option("--resolution", default=64, show_default=True)
@click.option("--iterations", default=12, show_default=True)
@click.option("--guidance", default=1.5, show_default=True, help="K: Long kappa4 = K, Short kappa2,3 = 1/K, LSG all K.")
@click.option("--json-out", default=None, type=click.Path(dir_okay=False), help="Also write the figures as JSON.")
@click.option("--child", default=None, hidden=True)
def main(batch_size: int, resolution: int, iterations: int, guidance: float, json_out: str | None,
         child: str | None) -> None:
    if child:
        job = json.loads(child)
        kind = job.pop("kind")
        print(json.dumps(reference_step(**job) if kind == "reference" else sid_iteration(**job)))
        return
    from diffusion.tiny import CPU_SIZES, write_tiny_teacher

    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = str(write_tiny_teacher(Path(tmp) / "teacher", resolution=resolution, **CPU_SIZES))
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(f"a photo of object number {i}" for i in range(100)))
        reference = in_fresh_process({"kind": "reference", "teacher_dir": teacher_dir, "batch_size": batch_size,
                                      "iterations": iterations})
        runs = {name: in_fresh_process({"kind": "sid", "teacher_dir": teacher_dir, "prompts": str(prompts),
                                        "out": str(Path(tmp) / name), "batch_size": batch_size,
                                        "iterations": iterations, "kappas": kappas(guidance)})
                for name, kappas in STRATEGIES.items()}
    figures = {"batch_size": batch_size, "resolution": resolution, "iterations": iterations, "guidance": guidance,
               "reference_step_seconds": reference["seconds"], "reference_peak_mb": reference["peak_mb"]}
    for name, run in runs.items():
        figures[f"{name}_seconds_per_kimg"] = run["seconds"] * 1000 / batch_size
        figures[f"{name}_time_over_reference"] = run["seconds"] / reference["seconds"]
        figures[f"{name}_peak_mb"] = run["peak_mb"]
        figures[f"{name}_memory_over_reference"] = run["peak_mb"] / reference["peak_mb"]
    for other in ("long", "short"):
        figures[f"lsg_time_over_{other}"] = runs["lsg"]["seconds"] / runs[other]["seconds"]
        figures[f"lsg_memory_over_{other}"] = runs["lsg"]["peak_mb"] / runs[other]["peak_mb"]
    emit(figures, json_out)


if __name__ == "__main__":
    main()

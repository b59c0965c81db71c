"""Shard builder throughput against the bare teacher work, measured side by side in one run.

bare: VAE encode + the batched cond/uncond UNet forward on the same batch size, nothing else.
pipeline: `pipeline build-shards` end to end (reading, decoding, text encoding, noising, writing, hashing).
Also: bytes on disk per sample against the tensor payload, for this model's latents and for SD's 4x64x64.

    python benchmarks/build_shards.py [--samples 192] [--batch-size 8] [--resolution 128]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import torch

from diffusion.teacher import load_teacher
from diffusion.tiny import CPU_SIZES, write_tiny_teacher
from pipeline.build import BuildConfig, run_build
from pipeline.synthetic import write_img2dataset_source
from shards.format import Record
from shards.manifest import read_dataset_info
from shards.writer import ShardWriter

from figures import emit  # benchmarks/figures.py: the scripts run from benchmarks/



def bare_teacher_rate(teacher, samples: int, batch_size: int, resolution: int) -> float:
    """Samples/s of VAE encode + one batched (cond, uncond) UNet forward, on random tensors."""
    pixels = torch.rand(batch_size, 3, resolution, resolution) * 2 - 1
    latent = teacher.latent_shape(resolution)
    cond = teacher.encode_text(["a red circle"] * batch_size)
    uncond = teacher.encode_text([""])
    t = torch.randint(0, 1000, (batch_size,))
    start = time.perf_counter()
    for _ in range(samples // batch_size):
        z0 = teacher.encode_images(pixels, torch.randn(batch_size, *latent))
        teacher.eps_cond_uncond(z0, t, cond, uncond)
    return (samples // batch_size) * batch_size / (time.perf_counter() - start)


def pipeline_rates(teacher_dir: Path, source: Path, out: Path, batch_size: int, resolution: int):
    """(end to end samples/s including model loading, samples/s of the build loop alone)."""
    config = BuildConfig(teacher=str(teacher_dir), source=str(source), out=str(out), resolution=resolution,
                         batch_size=batch_size, shard_size=1000)
    start = time.perf_counter()
    info = run_build(config)
    return info["samples"] / (time.perf_counter() - start), info["samples"] / info["build_seconds"]


def bytes_ratio(folder: Path) -> float:
    info = read_dataset_info(folder)
    payload = len(info["tensors"]) * 2 * torch.Size(info["latent_shape"]).numel()
    on_disk = sum(p.stat().st_size for p in folder.glob("*.tar"))
    return on_disk / info["samples"] / payload


def sd_bytes_ratio(tmp: Path, samples: int = 64) -> float:
    """The same record writer on SD-1.5-at-512 latents (4x64x64) with LAION-length captions."""
    writer = ShardWriter(tmp / "sd.tar")
    caption = "a photograph of an astronaut riding a horse on the moon, highly detailed, 4k"
    for i in range(samples):
        tensors = {n: torch.randn(4, 64, 64) for n in ("zt", "eps_cond", "eps_uncond")}
        writer.write(Record(f"00000_{i:09d}", tensors, 500, caption, {"source_key": f"00000/{i:09d}", "unit": "00000"}))
    info = writer.finish()
    return info.bytes / samples / (3 * 2 * 4 * 64 * 64)


@click.command()
@click.option("--samples", default=192, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--resolution", default=128, show_default=True)
@click.option("--json-out", default=None, type=click.Path(dir_okay=False), help="Also write the figures as JSON.")
def main(samples: int, batch_size: int, resolution: int, json_out: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher_dir = write_tiny_teacher(tmp / "teacher", resolution=resolution, **CPU_SIZES)
        source = write_img2dataset_source(tmp / "source", samples=samples, per_tar=samples, size=resolution + 32)
        teacher = load_teacher(teacher_dir)
        bare_teacher_rate(teacher, batch_size, batch_size, resolution)  # warm-up
        bare = [bare_teacher_rate(teacher, samples, batch_size, resolution)]
        end_to_end, loop = pipeline_rates(teacher_dir, source, tmp / "out", batch_size, resolution)
        bare.append(bare_teacher_rate(teacher, samples, batch_size, resolution))
        figures = {
            "samples": samples, "batch_size": batch_size, "resolution": resolution,
            "latent_shape": list(teacher.latent_shape(resolution)), "threads": torch.get_num_threads(),
            "bare_samples_per_s": sum(bare) / len(bare),
            "pipeline_samples_per_s": loop, "pipeline_end_to_end_samples_per_s": end_to_end,
            "throughput_ratio": loop / (sum(bare) / len(bare)),
            "throughput_ratio_end_to_end": end_to_end / (sum(bare) / len(bare)),
            "bytes_ratio_this_model": bytes_ratio(tmp / "out"), "bytes_ratio_sd512": sd_bytes_ratio(tmp),
        }
    emit(figures, json_out)


if __name__ == "__main__":
    main()

"""Shard builder throughput against the bare teacher work, interleaved in one run.

bare: VAE encode + the batched cond/uncond UNet forward of one batch (random tensors), nothing else.
bare_with_text: the same and the text encoding of the batch's captions, which the loop must also do: the
loop over it is what reading, decoding, noising and writing cost.
loop: one batch of `pipeline build-shards`' loop: reading and decoding images, text encoding, noising, the
same teacher work, writing and hashing records. A loop batch, then bare and bare_with_text in rotating
order (`after_batch`); the ratio is bare seconds / loop seconds over blocks of batches (the first left out), as
median [min-max]. End to end (model loading and the merge included) is one figure of the whole run.
Also: bytes on disk per sample against the tensor payload, for this model's latents and for SD's 4x64x64.

    python benchmarks/build_shards.py [--samples 384] [--batch-size 8] [--resolution 128] [--blocks 4]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import torch

from diffusion.teacher import load_teacher
from evaluation.timing import Turns, ratio
from pipeline.build import BuildConfig, run_build
from pipeline.synthetic import write_img2dataset_source
from shards.format import Record
from shards.manifest import read_dataset_info
from shards.writer import ShardWriter

from figures import blocks_option, emit, family_option, json_option, write_cpu_teacher  # benchmarks/figures.py: the scripts run from benchmarks/

TARGETS = {"loop_over_bare": ">= 0.95"}


def bare_teacher_batch(teacher, batch_size: int, resolution: int, encode_text: bool):
    """VAE encode + one batched (cond, uncond) UNet forward of one batch (+ the captions' text encoding), as a
    callable."""
    pixels = torch.rand(batch_size, 3, resolution, resolution) * 2 - 1
    latent = teacher.latent_shape(resolution)
    captions = [f"a red circle number {i}" for i in range(batch_size)]
    cond = teacher.encode_text(captions)
    uncond = teacher.encode_text([""])
    t = torch.randint(0, 1000, (batch_size,))

    def batch() -> None:
        z0 = teacher.encode_images(pixels, torch.randn(batch_size, *latent))
        teacher.eps_cond_uncond(z0, t, teacher.encode_text(captions) if encode_text else cond, uncond)

    batch()  # warm-up
    return batch


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
@click.option("--samples", default=384, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--resolution", default=128, show_default=True)
@family_option()
@blocks_option()
@json_option()
def main(samples: int, batch_size: int, resolution: int, family: str, blocks: int, json_out: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher_dir = write_cpu_teacher(tmp / "teacher", resolution, family)
        source = write_img2dataset_source(tmp / "source", samples=samples, per_tar=samples, size=resolution + 32)
        teacher = load_teacher(teacher_dir)
        turns = Turns({"bare": bare_teacher_batch(teacher, batch_size, resolution, encode_text=False),
                       "bare_with_text": bare_teacher_batch(teacher, batch_size, resolution, encode_text=True)})
        config = BuildConfig(teacher=str(teacher_dir), source=str(source), out=str(tmp / "out"),
                             resolution=resolution, batch_size=batch_size, shard_size=1000)
        start = time.perf_counter()
        info = run_build(config, after_batch=turns.between("loop"))
        interleaved = sum(sum(turns.seconds[name]) for name in ("bare", "bare_with_text"))
        end_to_end = info["samples"] / (time.perf_counter() - start - interleaved)
        bare_rate = batch_size * len(turns.seconds["bare"]) / sum(turns.seconds["bare"])
        figures = {
            "family": family, "samples": samples, "batch_size": batch_size, "resolution": resolution,
            "latent_shape": info["latent_shape"], "threads": torch.get_num_threads(),
            "loop_over_bare": ratio(turns.seconds["bare"], turns.seconds["loop"], blocks),
            "loop_over_bare_with_text": ratio(turns.seconds["bare_with_text"], turns.seconds["loop"], blocks),
            "end_to_end_over_bare_one_run": end_to_end / bare_rate,
            "bytes_ratio_this_model": bytes_ratio(tmp / "out"), "bytes_ratio_sd512": sd_bytes_ratio(tmp),
        }
    emit(figures, json_out, TARGETS)


if __name__ == "__main__":
    main()

"""`evaluation speed` on a CPU-sized SD-like model: the unguided teacher, the CFG teacher, the CLIP-guided
teacher and a cfg-distilled student, timed in rotating turns in one process (the seed's Figures 3-4 and 8-9).

The CLIP model is open_clip's ViT-B-32 with random weights saved to a local file: the cost of a pass and a
backward does not depend on the weights' values. The student is a real (1-step) `trainer fit` output.

    python benchmarks/speed.py [--resolution 128] [--steps 10] [--batch-size 1] [--out runs/bench-speed]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import open_clip
from safetensors.torch import save_file

from diffusion.tiny import CPU_SIZES, write_tiny_teacher
from evaluation.cli import main as evaluation_main
from pipeline.build import BuildConfig, run_build
from pipeline.synthetic import write_img2dataset_source
from trainer.config import FitConfig
from trainer.fit import run_fit


@click.command()
@click.option("--resolution", default=128, show_default=True)
@click.option("--steps", default=10, show_default=True)
@click.option("--batch-size", default=1, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--out", default="runs/bench-speed", show_default=True, type=click.Path(file_okay=False))
def main(resolution: int, steps: int, batch_size: int, repeats: int, out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = write_tiny_teacher(tmp / "teacher", resolution=resolution, **CPU_SIZES)
        source = write_img2dataset_source(tmp / "source", samples=16, per_tar=16, size=resolution + 32)
        run_build(BuildConfig(teacher=str(teacher), source=str(source), out=str(tmp / "shards"),
                              resolution=resolution, batch_size=8, shard_size=16))
        run_fit(FitConfig(method="cfg-distill", teacher=str(teacher), shards=str(tmp / "shards"),
                          out=str(tmp / "student"), max_steps=1, batch_size=2, report_to="none"))
        save_file(open_clip.create_model("ViT-B-32").state_dict(), tmp / "clip.safetensors")
        code = evaluation_main([
            "speed", "--model", f"{teacher}@cfg=1", "--model", f"{teacher}@cfg=7.5",
            "--model", f"{teacher}@clip=300", "--model", str(tmp / "student"), "--out", out,
            "--num-inference-steps", str(steps), "--batch-size", str(batch_size), "--repeats", str(repeats),
            "--clip-model", "ViT-B-32", "--clip-weights", str(tmp / "clip.safetensors"),
        ])
    raise SystemExit(code)


if __name__ == "__main__":
    main()

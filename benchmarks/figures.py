"""What every benchmark script does with its figures: print them aligned, and optionally write them as JSON."""

from __future__ import annotations

import json
from pathlib import Path


def emit(figures: dict, json_out: str | None) -> None:
    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name:>{width}}: {value:.3f}" if isinstance(value, float) else f"{name:>{width}}: {value}")
    if json_out:
        Path(json_out).write_text(json.dumps(figures, indent=2))


def shard_world_options(samples: int, steps: int):
    """The options of a benchmark fed from shards: --samples --batch-size --resolution --steps --json-out."""
    import click

    options = [
        click.option("--samples", default=samples, show_default=True),
        click.option("--batch-size", default=8, show_default=True),
        click.option("--resolution", default=128, show_default=True),
        click.option("--steps", default=steps, show_default=True),
        click.option("--json-out", default=None, type=click.Path(dir_okay=False),
                     help="Also write the figures as JSON."),
    ]

    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def build_shard_world(folder: Path, samples: int, resolution: int, store_clean: bool = False) -> tuple[Path, Path]:
    """A CPU-sized SD-like teacher and cfg shards of a synthetic img2dataset source: (teacher, shards)."""
    from diffusion.tiny import CPU_SIZES, write_tiny_teacher
    from pipeline.build import BuildConfig, run_build
    from pipeline.synthetic import write_img2dataset_source

    teacher_dir = write_tiny_teacher(folder / "teacher", resolution=resolution, **CPU_SIZES)
    source = write_img2dataset_source(folder / "source", samples=samples, per_tar=64, size=resolution + 32)
    run_build(BuildConfig(teacher=str(teacher_dir), source=str(source), out=str(folder / "shards"),
                          resolution=resolution, batch_size=16, shard_size=64, store_clean=store_clean))
    return teacher_dir, folder / "shards"

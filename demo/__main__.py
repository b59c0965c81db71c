"""`python -m demo --out DIR`: the main job on the embedded default.

Until the digits world lands (its own issue), this builds a tiny random-weight teacher and a generated
img2dataset-style source (with bad inputs), then runs `pipeline build-shards` for CFG and for blue-tone
classifier guidance, resumes a build to show it is idempotent, inspects the shards and writes report.md.
Everything is cached under --out; a second run reuses it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from diffusion.tiny import write_tiny_teacher
from pipeline.cli import main as pipeline_main
from pipeline.inspect_shards import format_summary, inspect_folder
from pipeline.synthetic import write_img2dataset_source


def _run(argv: list[str]) -> None:
    click.secho("$ pipeline " + " ".join(argv), fg="cyan")
    if pipeline_main(argv) != 0:
        raise SystemExit(f"demo step failed: pipeline {' '.join(argv)}")


@click.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--samples", default=256, show_default=True, help="Good images in the generated source.")
def main(out: str, samples: int) -> None:
    root = Path(out)
    teacher, source = root / "teacher", root / "source"
    if not (teacher / "model_index.json").is_file():
        click.echo(f"writing a tiny StableDiffusionPipeline teacher to {teacher}")
        write_tiny_teacher(teacher, resolution=32)
    if not source.is_dir():
        click.echo(f"writing an img2dataset-style source with bad inputs to {source}")
        write_img2dataset_source(source, samples=samples, per_tar=64, bad_inputs=True)
    common = ["--teacher", str(teacher), "--source", str(source), "--resolution", "32", "--batch-size", "16",
              "--shard-size", "50"]
    timings = {}
    for name, extra in (("cfg", ["--store-clean"]), ("blue", ["--guidance", "blue"])):
        start = time.perf_counter()
        _run(["build-shards", *common, "--out", str(root / f"shards-{name}"), *extra])
        timings[name] = time.perf_counter() - start
    _run(["build-shards", *common, "--out", str(root / "shards-cfg"), "--store-clean"])  # resumes: nothing to do
    summaries = [inspect_folder(root / f"shards-{name}") for name in timings]
    report = root / "report.md"
    lines = ["# Demo report", "", "Tiny random-weight teacher; a generated source with every kind of bad input.", ""]
    for summary, (name, seconds) in zip(summaries, timings.items()):
        lines += [f"## shards-{name} ({seconds:.1f}s)", "", "```", format_summary(summary), "```", ""]
    lines += ["Methods that use these shards (trainer, evaluation) join this report as they land."]
    report.write_text("\n".join(lines) + "\n")
    for summary in summaries:
        click.echo(format_summary(summary))
    if not all(s["valid"] for s in summaries):
        sys.exit(1)
    click.echo(f"report: {report.resolve()}")


if __name__ == "__main__":
    main()

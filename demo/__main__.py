"""`python -m demo --out DIR`: the main job on the embedded default.

Until the digits world lands (its own issue), this builds a tiny random-weight teacher and generated
img2dataset-style sources (one with bad inputs, one held out), then runs the real commands:
`pipeline build-shards` for CFG and blue-tone classifier guidance (and a resume that has nothing to do),
`pipeline inspect`, `trainer fit` for cfg-distill, classifier-distill and w-distill, and `evaluation speed`.
The report gives each student's eps error against the guided target on held-out records, and the time and memory
per step of the teacher with and without CFG against the students. Everything is cached under --out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from diffusion.teacher import load_teacher
from diffusion.tiny import write_tiny_teacher
from pipeline.cli import main as pipeline_main
from pipeline.inspect_shards import format_summary, inspect_folder
from pipeline.synthetic import write_img2dataset_source
from evaluation.cli import main as evaluation_main
from trainer.cli import main as trainer_main
from trainer.export import read_distillation
from trainer.heldout import heldout_errors

# (name, method, shards, scale flag, the scales at which the held-out error is reported)
STUDENTS = (
    ("cfg", "cfg-distill", "shards-cfg", ["--guidance-scale", "7.5"], (7.5,)),
    ("blue", "classifier-distill", "shards-blue", ["--guidance-scale", "100"], (100.0,)),
    ("w", "w-distill", "shards-cfg", ["--w-min", "2", "--w-max", "14"], (2.0, 7.5, 14.0)),
)


def _run(program: str, entry, argv: list[str]) -> None:
    click.secho(f"$ {program} " + " ".join(argv), fg="cyan")
    if entry(argv) != 0:
        raise SystemExit(f"demo step failed: {program} {' '.join(argv)}")


def build_all_shards(root: Path, teacher: Path, source: Path, heldout: Path) -> dict[str, float]:
    common = ["--teacher", str(teacher), "--resolution", "32", "--batch-size", "16", "--shard-size", "50"]
    timings = {}
    for name, src, extra in (("cfg", source, ["--store-clean"]), ("blue", source, ["--guidance", "blue"]),
                             ("heldout-cfg", heldout, ["--seed", "1"]),
                             ("heldout-blue", heldout, ["--seed", "1", "--guidance", "blue"])):
        start = time.perf_counter()
        _run("pipeline", pipeline_main, ["build-shards", *common, "--source", str(src),
                                         "--out", str(root / f"shards-{name}"), *extra])
        timings[name] = time.perf_counter() - start
    _run("pipeline", pipeline_main, ["build-shards", *common, "--source", str(source), "--out",
                                     str(root / "shards-cfg"), "--store-clean"])  # resumes: nothing to do
    return timings


def fit_students(root: Path, teacher: Path, steps: int) -> None:
    for name, method, shards, scale, _ in STUDENTS:
        _run("trainer", trainer_main, [
            "fit", "--method", method, "--teacher", str(teacher), "--shards", str(root / shards),
            "--out", str(root / f"student-{name}"), *scale, "--max-steps", str(steps), "--batch-size", "8",
            "--lr", "1e-4", "--lr-warmup-steps", "10", "--ema-decay", "0", "--checkpoint-every", str(steps),
            "--resume", "latest", "--report-to", "none",
        ])


def measure_speed(root: Path, teacher: Path) -> list[str]:
    """`evaluation speed`: the teacher without and with CFG against each student, one pass per step."""
    out = root / "speed"
    _run("evaluation", evaluation_main, [
        "speed", "--model", f"{teacher}@cfg=1", "--model", f"{teacher}@cfg=7.5", "--model", str(root / "student-cfg"),
        "--model", f"{root / 'student-w'}@cfg=7.5", "--out", str(out), "--num-inference-steps", "10",
        "--batch-size", "4", "--repeats", "3",
    ])
    return (out / "speed.md").read_text().splitlines()


def report_lines(root: Path, teacher_dir: Path, shard_timings: dict, summaries: list) -> list[str]:
    teacher = load_teacher(teacher_dir)
    lines = ["# Demo report", "",
             "Tiny random-weight teacher (32 px, until the digits world lands); generated sources, one with every "
             "kind of bad input, one held out from training.", ""]
    for summary, (name, seconds) in zip(summaries, shard_timings.items()):
        lines += [f"## shards-{name} ({seconds:.1f}s)", "", "```", format_summary(summary), "```", ""]
    lines += ["## Students (`trainer fit`)", "",
              "eps error against the guided target on held-out records: the student, and the teacher's unguided "
              "prediction it started from (ratio < 1: the guidance was learned); and the share of the guidance "
              "correction (target - unguided) the student has taken on (0 at the start, 1 when it matches).", "",
              "| student | method | scale | student MSE | unguided teacher MSE | ratio | guidance learned | steps | "
              "final loss |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, method, shards, _, scales in STUDENTS:
        heldout = root / ("shards-heldout-blue" if "blue" in shards else "shards-heldout-cfg")
        record = read_distillation(root / f"student-{name}")
        final = next(v for k, v in record["final_losses"].items() if k.startswith("mean"))
        for scale in scales:
            e = heldout_errors(root / f"student-{name}", heldout, teacher, scale)
            lines.append(f"| student-{name} | {method} | {scale:g} | {e['student']:.4g} | {e['baseline']:.4g} | "
                         f"{e['ratio']:.3f} | {e['guidance_learned']:.2f} | {record['steps']} | {final:.4g} |")
    lines += ["", "## Time and memory (`evaluation speed`, 10 steps, batch 4, this CPU)", "",
              "Peak memory is the growth of peak RSS over the runs, above the loaded model. At 32 px, fixed "
              "per-call overhead weighs more than the UNet batch, so the ratios sit above the 0.5 of large models.",
              "", *measure_speed(root, teacher_dir), ""]
    return lines


@click.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--samples", default=256, show_default=True, help="Good images in the generated source.")
@click.option("--steps", default=150, show_default=True, help="Optimiser steps of each student.")
def main(out: str, samples: int, steps: int) -> None:
    root = Path(out)
    teacher, source, heldout = root / "teacher", root / "source", root / "source-heldout"
    if not (teacher / "model_index.json").is_file():
        click.echo(f"writing a tiny StableDiffusionPipeline teacher to {teacher}")
        write_tiny_teacher(teacher, resolution=32)
    if not source.is_dir():
        click.echo(f"writing an img2dataset-style source with bad inputs to {source}")
        write_img2dataset_source(source, samples=samples, per_tar=64, bad_inputs=True)
    if not heldout.is_dir():
        write_img2dataset_source(heldout, samples=48, per_tar=48, seed=1)
    shard_timings = build_all_shards(root, teacher, source, heldout)
    summaries = [inspect_folder(root / f"shards-{name}") for name in shard_timings]
    for summary in summaries:
        click.echo(format_summary(summary))
    if not all(s["valid"] for s in summaries):
        sys.exit(1)
    fit_students(root, teacher, steps)
    report = root / "report.md"
    report.write_text("\n".join(report_lines(root, teacher, shard_timings, summaries)) + "\n")
    click.echo(f"report: {report.resolve()}")


if __name__ == "__main__":
    main()

"""`python -m demo --out DIR`: the main job on the embedded default, the digits world.

It builds (or reuses) the world (data in the real formats, a trained teacher, a digit classifier), then runs
each method through the real commands: `pipeline build-shards` -> `trainer fit` -> `evaluation`, and ends with
DIR/report.md (tables, plots, grids). `--fast` runs a few steps of everything (the test suite uses it).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from demo.report import write_report
from demo.settings import FAST, FULL, DemoSettings
from digits.data import prompt_list
from digits.world import build_world
from evaluation.cli import main as evaluation_main
from pipeline.cli import main as pipeline_main
from trainer.cli import main as trainer_main


def _run(program: str, entry, argv: list) -> None:
    argv = [str(a) for a in argv]
    click.secho(f"$ {program} " + " ".join(argv), fg="cyan")
    if entry(argv) != 0:
        raise SystemExit(f"demo step failed: {program} {' '.join(argv)}")


def build_shards(root: Path, world, s: DemoSettings) -> None:
    common = ["--teacher", world.teacher, "--source", world.source, "--resolution", 32, "--batch-size", 64,
              "--shard-size", 500, "--samples", s.shard_samples]
    _run("pipeline", pipeline_main, ["build-shards", *common, "--out", root / "shards-cfg", "--store-clean"])
    _run("pipeline", pipeline_main, ["build-shards", *common, "--out", root / "shards-blue", "--guidance", "blue"])
    for name in ("cfg", "blue"):
        _run("pipeline", pipeline_main, ["inspect", root / f"shards-{name}"])


def fit_students(root: Path, world, s: DemoSettings) -> None:
    students = {
        "cfg": ["--method", "cfg-distill", "--shards", root / "shards-cfg", "--guidance-scale", s.alpha],
        "blue": ["--method", "classifier-distill", "--shards", root / "shards-blue", "--guidance-scale", s.gamma],
        "w": ["--method", "w-distill", "--shards", root / "shards-cfg", "--w-min", s.w_min, "--w-max", s.w_max],
    }
    for name, method in students.items():
        _run("trainer", trainer_main, [
            "fit", *method, "--teacher", world.teacher, "--out", root / f"student-{name}", "--max-steps", s.fit_steps,
            "--batch-size", s.fit_batch, "--lr", s.fit_lr, "--lr-warmup-steps", s.fit_steps // 10,
            "--ema-decay", 0, "--checkpoint-every", s.fit_steps, "--resume", "latest", "--report-to", "none",
        ])


def fit_one_step(root: Path, world, s: DemoSettings) -> None:
    """SiD-LSG from prompts alone: every caption template for every digit, no images."""
    prompts = root / "sid-prompts.txt"
    prompts.write_text("\n".join(prompt_list()) + "\n")
    kimg = s.sid_kimg
    _run("trainer", trainer_main, [
        "fit", "--method", "sid-lsg", "--teacher", world.teacher, "--prompts", prompts, "--out", root / "student-sid",
        "--kappa", s.sid_kappa, "--batch-size", s.sid_batch, "--lr", s.sid_lr, "--max-kimg", kimg,
        "--ema-halflife-kimg", s.sid_ema_kimg, "--checkpoint-every-kimg", kimg / 2, "--grid-every-kimg", kimg / 4,
        "--resume", "latest", "--report-to", "none",
    ])


def evaluate(root: Path, world, s: DemoSettings) -> None:
    """Renders afresh each run (the students may have changed); the reference features stay cached."""
    for folder in (root / "eval").glob("*"):
        if folder.is_dir() and folder.name != "cache":
            shutil.rmtree(folder)
    common = ["--coco", world.coco, "--evaluator", "digits", "--digits-classifier", world.classifier,
              "--num-images", s.eval_images, "--num-inference-steps", s.sample_steps, "--batch-size", 64,
              "--cache-dir", root / "eval" / "cache"]
    _run("evaluation", evaluation_main, [
        "sweep", "--teacher", world.teacher, "--scales", ",".join(map(str, s.sweep_scales)),
        "--model", root / "student-cfg", "--model", f"{root / 'student-w'}@cfg={s.alpha}",
        "--model", root / "student-sid", "--out", root / "eval" / "sweep", *common])
    for name, model in s.blue_models(world.teacher, root).items():
        _run("evaluation", evaluation_main, ["coco30k", "--model", model, "--metrics", "blue,clip",
                                             "--out", root / "eval" / name, *common])
    teacher = world.teacher
    _run("evaluation", evaluation_main, [
        "speed", "--model", f"{teacher}@cfg=1", "--model", f"{teacher}@cfg={s.alpha}",
        "--model", f"{teacher}@blue={s.gamma}", "--model", root / "student-cfg", "--model", root / "student-blue",
        "--model", f"{root / 'student-w'}@cfg={s.alpha}", "--model", root / "student-sid",
        "--out", root / "eval" / "speed",
        "--num-inference-steps", s.sample_steps, "--batch-size", s.speed_batch, "--repeats", s.speed_repeats])


@click.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--fast", is_flag=True, help="A few steps of everything: proves the chain, not the quality.")
def main(out: str, fast: bool) -> None:
    settings = FAST if fast else FULL
    root = Path(out)
    start = time.perf_counter()
    world = build_world(root / "world", settings.world, log=click.echo)
    build_shards(root, world, settings)
    fit_students(root, world, settings)
    fit_one_step(root, world, settings)
    evaluate(root, world, settings)
    report = write_report(root, world, settings, time.perf_counter() - start)
    click.echo(f"report: {report.resolve()}")


if __name__ == "__main__":
    main()

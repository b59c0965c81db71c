"""`python -m demo --out DIR`: the main job on the embedded default, the digits world.

It builds (or reuses) the world (data in the real formats, a trained teacher, a digit classifier), then runs
each method through the real commands: `pipeline build-shards` -> `trainer fit` -> `evaluation`, and ends with
DIR/report.md (tables, plots, grids). `--fast` runs a few steps of everything (the test suite uses it).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

from demo.report import write_report
from demo.sdxl import sdxl_teacher, write_check
from demo.settings import FAST, FULL, DemoSettings
from digits.data import prompt_list
from digits.variant import train_variant
from digits.world import build_world
from evaluation.cli import main as evaluation_main
from pipeline.cli import main as pipeline_main
from pipeline.inspect_shards import inspect_folder
from pipeline.synthetic import write_damaged_tars, write_img2dataset_source
from shards.manifest import read_dataset_info, read_manifest
from shards.writer import atomic_write_json
from trainer.cli import main as trainer_main
from trainer.progressive import round_folder, use_grid_scheduler

SDXL_PROCESSES = 2  # the SDXL student's FSDP run: the student sharded over 2 processes (global batch 16)


def _run(program: str, entry, argv: list) -> None:
    argv = [str(a) for a in argv]
    click.secho(f"$ {program} " + " ".join(argv), fg="cyan")
    if entry(argv) != 0:
        raise SystemExit(f"demo step failed: {program} {' '.join(argv)}")


def _torchrun(processes: int, argv: list) -> None:
    """`torchrun --nproc_per_node N -m trainer.cli ARGV`: a real N-process run (gloo on CPUs), as users launch
    one; its output goes to the terminal."""
    argv = [str(a) for a in argv]
    click.secho(f"$ torchrun --nproc_per_node {processes} -m trainer.cli " + " ".join(argv), fg="cyan")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    # on the CPUs whatever the machine has: the model is tiny, and two ranks cannot share one GPU under NCCL
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or processes) // processes)), "CUDA_VISIBLE_DEVICES": ""}
    if subprocess.run([*launch, "-m", "trainer.cli", *argv], env={**os.environ, **threads}).returncode != 0:
        raise SystemExit(f"demo step failed: torchrun trainer {' '.join(argv)}")


def _timed(stage, *args) -> None:
    """Run one stage and say how long it took (what README's "Measured" is made of)."""
    start = time.perf_counter()
    stage(*args)
    click.secho(f"stage {stage.__name__}: {time.perf_counter() - start:.0f} s", fg="green")


def build_shards(root: Path, world, s: DemoSettings) -> None:
    common = ["--teacher", world.teacher, "--source", world.source, "--resolution", 32, "--batch-size", 64,
              "--shard-size", 500, "--samples", s.shard_samples]
    _run("pipeline", pipeline_main, ["build-shards", *common, "--out", root / "shards-cfg", "--store-clean"])
    _run("pipeline", pipeline_main, ["build-shards", *common, "--out", root / "shards-blue", "--guidance", "blue"])
    for name in ("cfg", "blue"):
        _run("pipeline", pipeline_main, ["inspect", root / f"shards-{name}"])


def check_inputs(root: Path, world) -> None:
    """The inputs users bring from outside: every kind of bad image and caption and every broken tar, built with
    the digits teacher (each counted by reason, the shards valid); then one shard of the result truncated, which
    `pipeline inspect` reports and `trainer fit` refuses before any step. The report reads inputs-check.json."""
    source, shards, damaged = root / "bad-source", root / "shards-bad", root / "shards-bad-truncated"
    if not source.is_dir():
        write_img2dataset_source(source, samples=16, per_tar=8, bad_inputs=True)
        write_damaged_tars(source)
    _run("pipeline", pipeline_main, ["build-shards", "--teacher", world.teacher, "--source", source, "--out", shards,
                                     "--resolution", 32, "--batch-size", 16, "--shard-size", 8])
    _run("pipeline", pipeline_main, ["inspect", shards])
    shutil.rmtree(damaged, ignore_errors=True)
    shutil.copytree(shards, damaged)
    first = damaged / read_manifest(damaged)[0].file
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    inspected = inspect_folder(damaged)
    fit_error = io.StringIO()
    with contextlib.redirect_stderr(fit_error):
        code = trainer_main(["fit", "--method", "cfg-distill", "--teacher", str(world.teacher), "--shards",
                             str(damaged), "--out", str(root / "student-from-truncated"), "--report-to", "none"])
    atomic_write_json(root / "inputs-check.json", {
        "dataset": read_dataset_info(shards), "truncated_shard": first.name,
        "inspect_valid": inspected["valid"], "inspect_problems": inspected["problems"],
        "fit_exit_code": code, "fit_error": fit_error.getvalue().strip().splitlines()[-1:]})
    click.echo(f"inputs check: {read_dataset_info(shards)['skipped']}; truncated shard: inspect "
               f"{'valid' if inspected['valid'] else 'INVALID'}, fit exit code {code}")


def _fit_student(root: Path, world, s: DemoSettings, name: str, method: list) -> None:
    _run("trainer", trainer_main, [
        "fit", *method, "--teacher", world.teacher, "--out", root / f"student-{name}", "--max-steps", s.fit_steps,
        "--batch-size", s.fit_batch, "--lr", s.fit_lr, "--lr-warmup-steps", s.fit_steps // 10,
        "--ema-decay", 0, "--checkpoint-every", s.fit_steps, "--resume", "latest", "--report-to", "none",
    ])


def _w_distill(root: Path, s: DemoSettings) -> list:
    return ["--method", "w-distill", "--shards", root / "shards-cfg", "--w-min", s.w_min, "--w-max", s.w_max]


def _cfg_distill(root: Path, s: DemoSettings) -> list:
    return ["--method", "cfg-distill", "--shards", root / "shards-cfg", "--guidance-scale", s.alpha]


def fit_students(root: Path, world, s: DemoSettings) -> None:
    students = {
        "cfg": _cfg_distill(root, s),
        "blue": ["--method", "classifier-distill", "--shards", root / "shards-blue", "--guidance-scale", s.gamma],
        "w": _w_distill(root, s),
    }
    for name, method in students.items():
        _fit_student(root, world, s, name, method)


def _fit_sid(root: Path, world, s: DemoSettings, name: str, extra: list = ()) -> None:
    """SiD-LSG from prompts alone: every caption template for every digit, no images."""
    prompts = root / "sid-prompts.txt"
    prompts.write_text("\n".join(prompt_list()) + "\n")
    kimg = s.sid_kimg
    _run("trainer", trainer_main, [
        "fit", "--method", "sid-lsg", "--teacher", world.teacher, "--prompts", prompts,
        "--out", root / f"student-{name}", "--kappa", s.sid_kappa, "--batch-size", s.sid_batch, "--lr", s.sid_lr,
        "--max-kimg", kimg, "--ema-halflife-kimg", s.sid_ema_kimg, "--checkpoint-every-kimg", kimg / 2,
        "--grid-every-kimg", kimg / 4, "--resume", "latest", "--report-to", "none", *extra,
    ])


def fit_one_step(root: Path, world, s: DemoSettings) -> None:
    _fit_sid(root, world, s, "sid")


def fit_lora_students(root: Path, world, s: DemoSettings) -> None:
    """student-cfg and student-sid again as LoRA adapters on the frozen teacher UNet, with the same settings;
    merged, so that evaluation reads them like any student."""
    lora = ["--lora-rank", s.lora_rank, "--merge"]
    _fit_student(root, world, s, "cfg-lora", [*_cfg_distill(root, s), *lora])
    _fit_sid(root, world, s, "sid-lora", lora)


def lora_on_variant(root: Path, world, s: DemoSettings) -> None:
    """LoRA students as acceleration modules: a red-ink fine-tune of the teacher (a style the base lacks, cached),
    and the cfg LoRA learnt on the base folded into it (`trainer export --base`)."""
    variant = train_variant(world.teacher, root / "variant-red", s.variant, log=click.echo)
    _run("trainer", trainer_main, ["export", root / "student-cfg-lora", "--base", variant,
                                   "--to", root / "student-cfg-lora-on-variant"])


def _progressive(root: Path, s: DemoSettings, student: Path, out: Path) -> None:
    _run("trainer", trainer_main, [
        "fit", "--method", "progressive", "--student", student, "--shards", root / "shards-cfg",
        "--out", out, "--start-steps", s.progressive_start_steps, "--end-steps", 1,
        "--iters-per-round", s.progressive_iters, "--batch-size", s.fit_batch, "--lr", s.progressive_lr,
        "--ema-decay", 0, "--checkpoint-every", s.progressive_iters, "--resume", "latest", "--report-to", "none",
    ])


def fit_few_step(root: Path, world, s: DemoSettings) -> None:
    """Progressive distillation of the w-student, round after round down to one step; and, as the baseline, the
    w-student itself on the same trailing DDIM grid (a copy whose scheduler is that grid)."""
    _progressive(root, s, root / "student-w", root / "student-progressive")
    baseline = root / "student-w-trailing"
    shutil.rmtree(baseline, ignore_errors=True)
    shutil.copytree(root / "student-w", baseline, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    use_grid_scheduler(baseline)


def sdxl_chain(root: Path, world, s: DemoSettings) -> None:
    """The same commands on an SDXL-layout teacher (tiny, random weights: the chain, not quality), the student
    trained sharded over SDXL_PROCESSES processes with FSDP2, then the checks the report shows (demo/sdxl.py)."""
    # the student's own folder: an earlier demo's single-process sdxl/student-cfg is another run (batch 16 per
    # process), which --resume latest would refuse
    teacher, shards, student = sdxl_teacher(root), root / "sdxl" / "shards", root / "sdxl" / "student-cfg-fsdp"
    _run("pipeline", pipeline_main, ["build-shards", "--teacher", teacher, "--source", world.source, "--resolution",
                                     32, "--batch-size", 64, "--shard-size", 500, "--samples", s.sdxl_samples,
                                     "--out", shards])
    _torchrun(SDXL_PROCESSES, [
        "fit", "--method", "cfg-distill", "--teacher", teacher, "--shards", shards, "--out", student, "--fsdp",
        "--guidance-scale", s.alpha, "--max-steps", s.sdxl_fit_steps, "--batch-size", 16 // SDXL_PROCESSES,
        "--lr", 3e-4, "--lr-warmup-steps", 0, "--ema-decay", 0, "--checkpoint-every", s.sdxl_fit_steps,
        "--num-workers", 0, "--resume", "latest", "--report-to", "none"])
    check = write_check(root, teacher, shards, student)
    click.echo(f"sdxl: {check['samples']} records, recompute error {check['recompute_max_abs_error']:.1e}, "
               f"loss {check['loss_first']:.4f} -> {check['loss_last']:.4f}, "
               f"UNet batches {check['unet_batches_4_steps']}")


def fit_w_loss_arm(root: Path, world, s: DemoSettings) -> None:
    """--compare-w-loss: the same w-student and progressive rounds, trained on the earlier unweighted eps loss."""
    _fit_student(root, world, s, "w-eps", [*_w_distill(root, s), "--w-loss", "eps"])
    _progressive(root, s, root / "student-w-eps", root / "student-progressive-eps")


def w_loss_models(root: Path, s: DemoSettings) -> dict[str, tuple[str, int]]:
    """name -> (model argument, steps) of the w-loss comparison: both w-students at each scale, and the eps arm's
    progressive rounds (the x0 arm's are the few-step table's)."""
    models = {}
    for loss, suffix in (("x0", ""), ("eps", "-eps")):
        for w in s.w_loss_scales:
            models[f"{loss}-w{w:g}"] = (f"{root / f'student-w{suffix}'}@cfg={w}", s.sample_steps)
    for n in s.few_steps:
        models[f"eps-progressive-{n}"] = (f"{round_folder(root / 'student-progressive-eps', n)}@cfg={s.alpha}", n)
    return models


def few_step_models(root: Path, s: DemoSettings) -> dict[str, tuple[str, int]]:
    """name -> (model argument, steps) for the report's few-step table, all at w = alpha; "reference" is the
    w-student at the steps the first round starts from."""
    models = {"reference": (f"{root / 'student-w-trailing'}@cfg={s.alpha}", s.progressive_start_steps)}
    for n in s.few_steps:
        models[f"w-{n}"] = (f"{root / 'student-w-trailing'}@cfg={s.alpha}", n)
        models[f"progressive-{n}"] = (f"{round_folder(root / 'student-progressive', n)}@cfg={s.alpha}", n)
        if n in s.stochastic_steps:
            models[f"stochastic-{n}"] = (f"{round_folder(root / 'student-progressive', n)}@cfg={s.alpha}@stochastic", n)
    return models


def evaluate(root: Path, world, s: DemoSettings, compare_w_loss: bool = False, lora: bool = False) -> None:
    """Renders afresh each run (the students may have changed); the reference features stay cached."""
    for folder in (root / "eval").glob("*"):
        if folder.is_dir() and folder.name != "cache":
            shutil.rmtree(folder)
    scoring = ["--coco", world.coco, "--evaluator", "digits", "--digits-classifier", world.classifier,
               "--num-images", s.eval_images, "--batch-size", 64, "--cache-dir", root / "eval" / "cache"]
    common = [*scoring, "--num-inference-steps", s.sample_steps]
    students = [root / "student-cfg", f"{root / 'student-w'}@cfg={s.alpha}", root / "student-sid"]
    if lora:
        students += [root / "student-cfg-lora", root / "student-sid-lora"]
    _run("evaluation", evaluation_main, [
        "sweep", "--teacher", world.teacher, "--scales", ",".join(map(str, s.sweep_scales)),
        *[arg for student in students for arg in ("--model", student)], "--out", root / "eval" / "sweep", *common])
    for name, model in s.blue_models(world.teacher, root).items():
        _run("evaluation", evaluation_main, ["coco30k", "--model", model, "--metrics", "blue,clip",
                                             "--out", root / "eval" / name, *common])
    for name, (_, model, _) in (s.lora_module_models(world.teacher, root) if lora else {}).items():
        _run("evaluation", evaluation_main, ["coco30k", "--model", model, "--metrics", "fid,clip,red",
                                             "--out", root / "eval" / "lora-module" / name, *common])
    for name, (model, steps) in few_step_models(root, s).items():
        _run("evaluation", evaluation_main, ["coco30k", "--model", model, "--metrics", "fid,clip",
                                             "--out", root / "eval" / "few-step" / name, *scoring,
                                             "--num-inference-steps", steps])
    for name, (model, steps) in (w_loss_models(root, s) if compare_w_loss else {}).items():
        _run("evaluation", evaluation_main, ["coco30k", "--model", model, "--metrics", "fid,clip",
                                             "--out", root / "eval" / "w-loss" / name, *scoring,
                                             "--num-inference-steps", steps])
    teacher = world.teacher
    _run("evaluation", evaluation_main, [
        "speed", "--model", f"{teacher}@cfg=1", "--model", f"{teacher}@cfg={s.alpha}",
        "--model", f"{teacher}@blue={s.gamma}", "--model", root / "student-cfg",
        *(["--model", root / "student-cfg-lora"] if lora else []), "--model", root / "student-blue",
        "--model", f"{root / 'student-w'}@cfg={s.alpha}", "--model", root / "student-sid",
        "--model", few_step_models(root, s)[f"progressive-{s.few_steps[-1]}"][0],
        "--out", root / "eval" / "speed",
        "--num-inference-steps", s.sample_steps, "--batch-size", s.speed_batch, "--repeats", s.speed_repeats])


@click.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--fast", is_flag=True, help="A few steps of everything: proves the chain, not the quality.")
@click.option("--compare-w-loss", is_flag=True,
              help="Also train the w-student and its progressive rounds on the unweighted eps loss, and report "
                   "both losses side by side (about 8 more minutes; `make demo-wloss`).")
@click.option("--lora", is_flag=True,
              help="Also train the cfg-distill and sid-lsg students as LoRA adapters, fine-tune the teacher into a "
                   "red-ink variant and fold the cfg LoRA into it, and report both LoRA tables (about 17 more "
                   "minutes; `make demo-lora`).")
def main(out: str, fast: bool, compare_w_loss: bool, lora: bool) -> None:
    settings = FAST if fast else FULL
    root = Path(out)
    start = time.perf_counter()
    world = build_world(root / "world", settings.world, log=click.echo)
    _timed(build_shards, root, world, settings)
    _timed(check_inputs, root, world)
    optional = [*([fit_lora_students, lora_on_variant] if lora else []), *([fit_w_loss_arm] if compare_w_loss else [])]
    for stage in (fit_students, fit_one_step, fit_few_step, sdxl_chain, *optional):
        _timed(stage, root, world, settings)
    _timed(evaluate, root, world, settings, compare_w_loss, lora)
    report = write_report(root, world, settings, time.perf_counter() - start, compare_w_loss, lora)
    click.echo(f"report: {report.resolve()}")


if __name__ == "__main__":
    main()

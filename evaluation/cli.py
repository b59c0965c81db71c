"""`evaluation`: render and score any model the trainer writes, or the teacher (see docs/evaluation.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from diffusion.cli import config_option, dataclass_option, run_group
from diffusion.teacher import DTYPES, VARIANT_HELP
from evaluation.coco30k import EvalConfig

option = dataclass_option(EvalConfig)
TEACHER_VARIANT_HELP = VARIANT_HELP + " Teachers only: a student loads what its folder has."


def model_options(function):
    """Which model to render, and with what guidance."""
    for decorator in reversed([
        option("model", "SD or SDXL pipeline folder: a teacher or any student `trainer fit` wrote (or "
               "PATH@cfg=S, PATH@blue=GAMMA; a final @sigma scales classifier guidance by sigma_t instead of "
               "sqrt(beta_t)).", required=True),
        option("guidance_scale", "CFG scale for a teacher [7.5], w for a w- or progressive student, gamma with "
               "--classifier-guidance (eps + gamma sqrt(beta_t) grad).", type=float),
        option("classifier_guidance", "Teacher only: clip, blue or MODULE:FUNCTION guidance instead of CFG."),
        option("sampler", "Progressive students: deterministic DDIM on their grid, or Meng et al.'s stochastic "
               "sampler.", type=click.Choice(["ddim", "stochastic"])),
        option("variant", TEACHER_VARIANT_HELP),
    ]):
        function = decorator(function)
    return function


def render_options(function):
    """What every command needs to render images."""
    for decorator in reversed([
        option("num_inference_steps", "Sampling steps.", type=int),
        option("resolution", "Image side in pixels [the model's].", type=int),
        option("batch_size", "Images per batch per process.", type=int),
        option("seed", "Image i uses noise seeded with seed + i.", type=int),
        option("dtype", "Compute dtype of the models.", type=click.Choice(sorted(DTYPES))),
        option("clip_model", "open_clip model (name or config .json) for CLIP score and CLIP guidance."),
        option("clip_weights", "Local open_clip weights file (laion2b_s12b_b42k for ViT-g-14 paper numbers).",
               type=click.Path(dir_okay=False)),
    ]):
        function = decorator(function)
    return function


def metric_options(function):
    for decorator in reversed([
        option("coco", "COCO-2014 folder: annotations/captions_val2014.json + val2014/.", type=click.Path(file_okay=False)),
        option("prompts", "A fixed prompt list instead of the seeded COCO draw (GigaGAN's captions.txt): .txt, one "
               "caption per line, or .csv/.tsv/.parquet/.json with a caption (and image_id) column.",
               type=click.Path(dir_okay=False)),
        option("prompt_column", "The caption column of a .csv/.tsv/.parquet/.json prompt list."),
        option("num_images", "How many prompts [COCO: 30000 drawn with seed 2014; a prompt file: the first N, "
               "default all of it].", type=int),
        option("inception_weights", "TorchScript inception-2015-12-05.pt (FID).", type=click.Path(dir_okay=False)),
        option("pr_features", "Precision/recall features: vgg16 (fc2, Kynkaanniemi et al.) or inception (the FID "
               "pool3 features, as SiD-LSG's metrics).", type=click.Choice(["vgg16", "inception"])),
        option("vgg_weights", "VGG16 for precision/recall: NVlabs vgg16.pt or torchvision vgg16-397923af.pth.",
               type=click.Path(dir_okay=False)),
        option("cache_dir", "Where reference statistics are cached.", type=click.Path(file_okay=False)),
        option("evaluator", "Feature extractors: standard (Inception, open_clip, VGG16) or digits (the digits "
               "world's classifier for digit-FID, digit-CLIP and PR)."),
        option("digits_classifier", "--evaluator digits: the classifier folder (runs/demo/world/classifier).",
               type=click.Path(file_okay=False)),
    ]):
        function = decorator(function)
    return function


@click.group(name="evaluation")
def cli() -> None:
    """Render and score students and teachers: COCO-2014 FID / CLIP / precision-recall, sweeps, speed."""


@cli.command("render")
@config_option
@model_options
@option("out", "Output folder (images/NNNNN.png, prompts.json); re-runs skip what exists.", required=True,
        type=click.Path(file_okay=False))
@render_options
@option("coco", "COCO-2014 folder whose captions to render.", type=click.Path(file_okay=False))
@option("prompts", "Prompt file: .txt, one per line, or .csv/.tsv/.parquet/.json with a caption column.",
        type=click.Path(dir_okay=False))
@option("prompt_column", "The caption column of a table or JSON records prompt file.")
@option("num_images", "How many prompts [COCO: 30000; a prompt file: all of it].", type=int)
def render(**options) -> None:
    """Render prompts to PNG with any model; split across ranks under torchrun/accelerate; resumable."""
    import torch
    from accelerate import PartialState

    from evaluation.coco30k import evaluate_spec, model_spec, prompt_selection

    cfg = EvalConfig(**options, metrics="")
    spec = model_spec(cfg)
    selection = prompt_selection(cfg)
    state = PartialState(cpu=not torch.cuda.is_available())
    evaluate_spec(spec, selection.prompts, selection.source, Path(cfg.out), cfg, {}, state, selection.image_ids)


@cli.command("generate")
@model_options
@click.option("--prompt", required=True, help="The text prompt.")
@click.option("--seed", default=0, show_default=True, help="Seed of the initial noise (the image for a seed is fixed).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The PNG to write.")
@option("num_inference_steps", "Sampling steps (a one-step or progressive student takes its own).", type=int)
@option("dtype", "Compute dtype of the models.", type=click.Choice(sorted(DTYPES)))
@option("resolution", "Image side in pixels [the model's].", type=int)
def generate(model, guidance_scale, classifier_guidance, sampler, variant, prompt, seed, out, num_inference_steps,
             dtype, resolution) -> None:
    """One image for one prompt and seed, with any model: a one-step generator, a student or a teacher.

    The same noise and sampler as `evaluation render` image 0 with --seed SEED, so the two agree."""
    from evaluation.coco30k import model_spec
    from evaluation.render import Renderer, save_png

    spec = model_spec(EvalConfig(model=model, out="", guidance_scale=guidance_scale,
                                 classifier_guidance=classifier_guidance, sampler=sampler, variant=variant))
    renderer = Renderer(spec, num_inference_steps, dtype, resolution=resolution)
    (image,) = renderer.render([prompt], [seed])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_png(image, Path(out))
    click.echo(f"{out}: {spec.label}, seed {seed}, {renderer.steps} step(s)")


@cli.command("coco30k")
@config_option
@model_options
@option("out", "Output folder: images/, prompts.json, metrics.json, report.md, grid.png.", required=True,
        type=click.Path(file_okay=False))
@option("metrics", "Comma list of fid, clip, pr, blue, red (the share of blue or red pixels).")
@metric_options
@render_options
def coco30k(**options) -> None:
    """Render COCO-2014 validation captions and score FID (clean-fid), CLIP score and precision/recall."""
    from evaluation.coco30k import run_coco30k

    record = run_coco30k(EvalConfig(**options))
    if record is not None:
        names = ("fid", "clip_score", "precision", "recall")
        click.echo(json.dumps({k: record[k] for k in names if k in record}))
        click.echo(f"report: {Path(options['out']).resolve() / 'report.md'}")


@cli.command("sweep")
@config_option
@click.option("--teacher", required=True, help="The teacher folder.")
@click.option("--scales", default="1,1.5,2,3,4,5,6,7,8", show_default=True, help="Teacher CFG scales.")
@click.option("--model", "models", multiple=True, help="A student as PATH or PATH@cfg=W (repeatable).")
@option("variant", VARIANT_HELP)
@option("out", "Output folder: one sub-folder per point, sweep.csv, sweep.png.", required=True,
        type=click.Path(file_okay=False))
@metric_options
@render_options
def sweep(teacher: str, scales: str, models: tuple[str, ...], **options) -> None:
    """The teacher across CFG scales and the students, CLIP score against FID."""
    from evaluation.sweep import run_sweep

    values = [float(s) for s in scales.split(",") if s.strip()]
    rows = run_sweep(EvalConfig(model=teacher, **options), teacher, values, list(models))
    if rows is not None:
        click.echo(f"sweep: {Path(options['out']).resolve() / 'sweep.png'}")


@cli.command("speed")
@click.option("--model", "models", multiple=True, required=True,
              help="PATH, PATH@cfg=S (teacher CFG or student w) or PATH@clip=GAMMA / @blue= (repeatable); a final "
                   "@stochastic samples a progressive student stochastically; a final @sigma scales classifier "
                   "guidance by sigma_t instead of sqrt(beta_t).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="speed.json, speed.md, speed.png.")
@click.option("--batch-size", default=1, show_default=True)
@click.option("--num-inference-steps", default=10, show_default=True)
@click.option("--repeats", default=3, show_default=True,
              help="Timed turns after one warm-up turn; in each, every model renders one batch, in rotating order "
                   "(a model's median is kept, its per-turn ratios give min and max).")
@click.option("--prompt", default="a photograph of an astronaut riding a horse", show_default=True)
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(sorted(DTYPES)))
@click.option("--variant", default=None, help=TEACHER_VARIANT_HELP)
@click.option("--clip-model", default="ViT-g-14", show_default=True)
@click.option("--clip-weights", default=None, type=click.Path(dir_okay=False))
def speed(models, out, batch_size, num_inference_steps, repeats, prompt, dtype, variant, clip_model,
          clip_weights) -> None:
    """Time per step, time per image and peak memory of each model, side by side, with ratios. Times: all models
    in this process, interleaved in turns of rotating order; memory: each model in a fresh process."""
    import torch

    from evaluation.models import parse_model_arg, with_variant
    from evaluation.speed import bar_chart, format_table, measure_all

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    specs = with_variant([parse_model_arg(m) for m in models], variant)
    results = measure_all(specs, [prompt] * batch_size, num_inference_steps, repeats, dtype, device, clip_model,
                          clip_weights)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "speed.json").write_text(json.dumps({"device": str(device), "results": results}, indent=2))
    table = format_table(results)
    (folder / "speed.md").write_text("\n".join(table) + "\n")
    bar_chart(results, folder / "speed.png")
    click.echo("\n".join(table))


def main(argv: list[str] | None = None) -> int:
    return run_group(cli, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`pipeline`: build teacher-prediction shards once, for many fine-tunes, and inspect them."""

from __future__ import annotations

import json
import sys

import click

from diffusion.cli import config_option, run_group
from diffusion.guidance import COEFFICIENTS
from diffusion.teacher import DTYPES, VARIANT_HELP


@click.group(name="pipeline")
def cli() -> None:
    """Build and check shards of teacher predictions (see docs/pipeline.md)."""


@cli.command("build-shards")
@config_option
@click.option("--teacher", required=True, help="SD (StableDiffusionPipeline) or SDXL (StableDiffusionXLPipeline) folder, or a hub id in the local HF cache.")
@click.option("--source", required=True, help="img2dataset tars (folder, glob or {a..b} pattern), image folder, or csv/parquet.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output shard folder (resumable).")
@click.option("--guidance", default="cfg", show_default=True, help="cfg, clip, blue, or MODULE:FUNCTION (a loss to minimise).")
@click.option("--guidance-coefficient", default=None, type=click.Choice(COEFFICIENTS),
              help="Classifier guidance: c_t in eps + gamma c_t grad, recorded in dataset.json for `trainer fit` "
              "(sqrt-beta: the seed's sqrt(beta_t); sigma: Dhariwal & Nichol's sqrt(1 - alphabar_t)) [sqrt-beta].")
@click.option("--resolution", default=512, show_default=True, type=int, help="Square image side, centre-cropped.")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--samples", default=None, type=int, help="Read at most this many source entries, in order.")
@click.option("--seed", default=0, show_default=True, type=int, help="With the source key, fixes each sample's t and noise.")
@click.option("--shard-size", default=1000, show_default=True, type=int, help="Records per output shard.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(sorted(DTYPES)), help="Teacher compute dtype (stored tensors are float16).")
@click.option("--variant", default=None, help=VARIANT_HELP)
@click.option("--t-min", default=0, show_default=True, type=int)
@click.option("--t-max", default=999, show_default=True, type=int)
@click.option("--store-clean", is_flag=True, help="Also store the clean latent z0 and the added noise.")
@click.option("--clip-model", default="ViT-g-14", show_default=True, help="open_clip model name (or config .json) for --guidance clip.")
@click.option("--clip-weights", default=None, type=click.Path(dir_okay=False), help="Local open_clip weights file for --guidance clip.")
@click.option("--min-image-size", default=None, type=int, help="Skip images whose short side is smaller [default: resolution/2].")
@click.option("--file-column", default="file", show_default=True, help="Image path column of a csv/parquet source.")
@click.option("--caption-column", default="caption", show_default=True, help="Caption column of a csv/parquet source.")
def build_shards(**options) -> None:
    """Encode, noise and run the teacher over a source; write WebDataset shards + manifest.

    Runs unchanged under `accelerate launch` / `torchrun` (each rank takes its share of the input);
    re-running the same command resumes: complete units are skipped, partial ones redone.
    """
    from pipeline.build import BuildConfig, run_build

    run_build(BuildConfig(**options))


@cli.command("inspect")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(folder: str, as_json: bool) -> None:
    """Validate a shard folder (counts, checksums, schema, NaN/Inf); exit 1 if anything is wrong."""
    from pipeline.inspect_shards import format_summary, inspect_folder

    summary = inspect_folder(folder)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
    if not summary["valid"]:
        raise click.exceptions.Exit(1)


def main(argv: list[str] | None = None) -> int:
    return run_group(cli, argv)


if __name__ == "__main__":
    sys.exit(main())

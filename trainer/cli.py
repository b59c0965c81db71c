"""`trainer`: distil guidance into a student from shards (see docs/trainer.md)."""

from __future__ import annotations

import sys

import click

from diffusion.cli import config_option, dataclass_option, run_group
from trainer.config import LR_SCHEDULES, MIXED_PRECISION, SHARD_KIND, FitConfig

option = dataclass_option(FitConfig)


@click.group(name="trainer")
def cli() -> None:
    """Distil CFG, classifier guidance or a guidance range into a one-pass-per-step student."""


@cli.command("fit")
@config_option
@option("method", "What to distil.", required=True, type=click.Choice(sorted(SHARD_KIND)))
@option("teacher", "The teacher the shards were built with: StableDiffusionPipeline folder or cached hub id.", required=True)
@option("shards", "Shard folder from `pipeline build-shards` (cfg kind, or classifier kind for classifier-distill).", required=True)
@option("out", "Output: a StableDiffusionPipeline folder + distillation.json, with checkpoints/ and logs/.", required=True, type=click.Path(file_okay=False))
@option("guidance_scale", "alpha for cfg-distill [7.5], gamma for classifier-distill [100; 300 for CLIP in the seed].", type=float)
@option("w_min", "w-distill: lowest guidance scale w (diffusers' guidance_scale units).", type=float)
@option("w_max", "w-distill: highest guidance scale w.", type=float)
@option("w_embedding_dim", "w-distill: size of the sinusoidal w embedding (the UNet's time_cond_proj_dim).", type=int)
@option("max_steps", "Optimiser steps in all.", type=int)
@option("batch_size", "Samples per process per micro-batch.", type=int)
@option("gradient_accumulation_steps", "Micro-batches per optimiser step.", type=int)
@option("lr", "Peak learning rate (AdamW).", type=float)
@option("lr_scheduler", "Learning-rate schedule (diffusers.optimization).", type=click.Choice(LR_SCHEDULES))
@option("lr_warmup_steps", "Linear warm-up steps.", type=int)
@option("adam_beta1", "AdamW beta1.", type=float)
@option("adam_beta2", "AdamW beta2.", type=float)
@option("adam_weight_decay", "AdamW weight decay.", type=float)
@option("adam_epsilon", "AdamW epsilon.", type=float)
@option("max_grad_norm", "Clip the gradient norm to this (0: no clipping).", type=float)
@option("mixed_precision", "Autocast precision; the trained weights stay float32.", type=click.Choice(MIXED_PRECISION))
@option("gradient_checkpointing", "Recompute UNet activations in the backward pass to save memory.", is_flag=True)
@option("xformers", "Use xformers attention instead of PyTorch SDPA (needs the xformers extra).", is_flag=True)
@option("ema_decay", "EMA decay of the student weights, with warm-up (0: no EMA). The exported UNet is the EMA.", type=float)
@option("checkpoint_every", "Write a checkpoint every N steps (and at the end, and on Ctrl-C/SIGTERM).", type=int)
@option("checkpoints_total_limit", "Keep the last K checkpoints.", type=int)
@option("resume", "Continue from `latest` (in OUT/checkpoints; a fresh start if none) or a checkpoint folder.")
@option("seed", "Seed of the data order, the w draws and initialisation.", type=int)
@click.option("--resampled/--epochs", "resampled", default=FitConfig.resampled, show_default=True,
              help="Draw shards at random forever, or read epoch after epoch.")
@option("shuffle_buffer", "Samples in each reader's shuffle buffer.", type=int)
@option("num_workers", "DataLoader workers per process that read and decode shards [2 with CUDA, 0 on CPU].", type=int)
@option("text_cache_size", "Caption embeddings kept between batches.", type=int)
@option("report_to", "accelerate tracker for logs in OUT/logs (tensorboard, wandb, ..., or none).")
@option("log_every", "Log to the tracker every N steps.", type=int)
@option("max_nonfinite_steps", "Stop after this many steps in a row skipped for a non-finite loss.", type=int)
@option("record_keys", "Write OUT/logs/keys-rankR.tsv: the step and key of every record each rank trained on.", is_flag=True)
def fit(**options) -> None:
    """Distil the guided teacher into a student that needs one UNet pass per step.

    Runs unchanged under `accelerate launch` / `torchrun`. A --config FILE (JSON, YAML or TOML) holds the
    same names as the flags; flags override it. Ctrl-C or SIGTERM writes a checkpoint before stopping.
    """
    from trainer.fit import run_fit

    result = run_fit(FitConfig(**options))
    if result["status"] == "interrupted":
        click.echo(f"interrupted at step {result['step']}; continue with --resume latest", err=True)
        raise click.exceptions.Exit(130)


def main(argv: list[str] | None = None) -> int:
    return run_group(cli, argv)


if __name__ == "__main__":
    sys.exit(main())

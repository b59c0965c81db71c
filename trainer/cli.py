"""`trainer`: distil guidance into a student from shards (see docs/trainer.md)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from diffusion.cli import config_option, dataclass_option, run_group
from diffusion.errors import UserError
from diffusion.guidance import COEFFICIENTS
from trainer.config import (FSDP_TEACHER, LR_SCHEDULES, MIXED_PRECISION, SHARD_KIND, W_LOSSES, FitConfig,
                            ProgressiveConfig, options_of_other_methods)
from trainer.sid_config import SidConfig

option = dataclass_option(FitConfig)
sid_option = dataclass_option(SidConfig)
progressive_option = dataclass_option(ProgressiveConfig)
CONFIG_CLASS = {**{method: FitConfig for method in SHARD_KIND}, "sid-lsg": SidConfig, "progressive": ProgressiveConfig}


@click.group(name="trainer")
def cli() -> None:
    """Distil CFG, classifier guidance or a guidance range into a one-pass-per-step student, steps into a
    few-step student (progressive), or guidance and sampling into a one-step generator (SiD-LSG)."""


@cli.command("fit")
@config_option
@option("method", "What to distil.", required=True, type=click.Choice(sorted(CONFIG_CLASS)))
@option("teacher", "The teacher (the shards' own): an SD or SDXL pipeline folder, or cached hub id [all but progressive].")
@option("variant", "The teacher's weight variant, e.g. fp16 for *.fp16.safetensors; the shards' teacher must be the "
        "same files [per component: the plain weights, else the only variant there is; all but progressive].")
@option("shards", "Shard folder from `pipeline build-shards` (cfg kind, or classifier kind for classifier-distill; "
        "progressive: built with --store-clean).")
@option("out", "Output: a pipeline folder in the teacher's layout + distillation.json, with checkpoints/ and logs/.", required=True, type=click.Path(file_okay=False))
@option("guidance_scale", "alpha for cfg-distill [7.5], gamma for classifier-distill [100; 300 for CLIP in the seed].", type=float)
@option("guidance_coefficient", "classifier-distill: c_t in eps + gamma c_t grad: sqrt-beta (the seed's "
        "sqrt(beta_t)) or sigma (Dhariwal & Nichol's sqrt(1 - alphabar_t)) [the shards' dataset.json; sqrt-beta].",
        type=click.Choice(COEFFICIENTS))
@option("w_min", "w-distill: lowest guidance scale w (diffusers' guidance_scale units); progressive: [the student's].", type=float)
@option("w_max", "w-distill: highest guidance scale w; progressive: [the student's].", type=float)
@option("w_embedding_dim", "w-distill: size of the sinusoidal w embedding (the UNet's time_cond_proj_dim).", type=int)
@option("w_loss", "w-distill: x0 (seed 001: max(SNR, 1) ||x_student - x_teacher^w||^2, as progressive weighs) or eps (unweighted eps-MSE) [x0].", type=click.Choice(W_LOSSES))
@option("max_steps", "Optimiser steps in all.", type=int)
@option("batch_size", "Samples per process per micro-batch.", type=int)
@option("gradient_accumulation_steps", "Micro-batches per optimiser step.", type=int)
@option("lr", "Peak learning rate (AdamW); sid-lsg: the generator's Adam lr [1e-6].", type=float)
@option("lr_scheduler", "Learning-rate schedule (diffusers.optimization) [progressive: constant, per round].", type=click.Choice(LR_SCHEDULES))
@option("lr_warmup_steps", "Linear warm-up steps [progressive: 0, per round].", type=int)
@option("adam_beta1", "AdamW beta1 [sid-lsg: 0].", type=float)
@option("adam_beta2", "AdamW beta2.", type=float)
@option("adam_weight_decay", "AdamW weight decay.", type=float)
@option("adam_epsilon", "AdamW epsilon [sid-lsg: 1e-8, 1e-6 under fp16].", type=float)
@option("max_grad_norm", "Clip the gradient norm to this (0: no clipping).", type=float)
@click.option("--keep-grad-buffers/--free-grad-buffers", "keep_grad_buffers", default=FitConfig.keep_grad_buffers,
              show_default=True, help="Zero the gradients in place between optimiser steps instead of freeing them "
              "(the same weights; measured slower and larger on a CPU, see trainer/optim.py).")
@option("mixed_precision", "Autocast precision; the trained weights stay float32.", type=click.Choice(MIXED_PRECISION))
@option("gradient_checkpointing", "Recompute UNet activations in the backward pass to save memory.", is_flag=True)
@option("xformers", "Use xformers attention instead of PyTorch SDPA (needs the xformers extra).", is_flag=True)
@option("fsdp", "Shard the trained networks' weights, gradients, Adam states and EMA over the processes (FSDP2; "
        "torchrun/accelerate launch with 2+ processes; every method's full students, and LoRA students of cfg-, "
        "classifier-, w-distill; see docs/trainer.md). An `accelerate launch` FSDP config does the same without "
        "it.", is_flag=True)
@progressive_option("fsdp_teacher", "progressive, sid-lsg under FSDP: shard the frozen teacher UNet too, or "
                    "keep a whole copy on each process.", type=click.Choice(FSDP_TEACHER))
@option("ema_decay", "EMA decay of the student weights, with warm-up (0: no EMA). The exported UNet is the EMA.", type=float)
@option("checkpoint_every", "Write a checkpoint every N steps (and at the end, and on Ctrl-C/SIGTERM).", type=int)
@option("checkpoints_total_limit", "Keep the last K checkpoints.", type=int)
@option("resume", "Continue from `latest` (the newest readable checkpoint in OUT/checkpoints; a fresh start if none) or a checkpoint folder.")
@option("overwrite", "Start over in an OUT that holds a run: its checkpoints, student and logs are removed first.", is_flag=True)
@option("seed", "Seed of the data order, the w draws and initialisation.", type=int)
@click.option("--resampled/--epochs", "resampled", default=FitConfig.resampled, show_default=True,
              help="Draw shards at random forever, or read epoch after epoch.")
@option("shuffle_buffer", "Samples in each reader's shuffle buffer.", type=int)
@option("num_workers", "DataLoader workers per process that read and decode shards [2 with CUDA, 0 on CPU].", type=int)
@option("text_cache_size", "Caption embeddings kept between batches.", type=int)
@option("report_to", "accelerate tracker for logs in OUT/logs (tensorboard, wandb, ..., or none).")
@option("log_every", "Log to the tracker every N steps.", type=int)
@option("validate_every", "Write OUT/samples/step-N.png (and log it to the tracker) every N steps and at step 0: the "
        "student, its EMA if any, on --validation-prompts (0: never; sid-lsg: --grid-every-kimg).", type=int)
@option("validation_prompts", "The prompts of the validation grids, seed i for prompt i: .txt one per line, or "
        ".csv/.tsv/.parquet/.json with a caption column [needed by --validate-every].", type=click.Path(dir_okay=False))
@option("max_nonfinite_steps", "Stop after this many steps in a row skipped for a non-finite loss.", type=int)
@option("record_keys", "Write OUT/logs/keys-rankR.tsv: the step and key of every record each rank trained on.", is_flag=True)
@option("verify", "Check every shard's sha256 against the manifest before training (the size check always runs).", is_flag=True)
@option("lora_rank", "Train a rank-R LoRA adapter (peft) on the frozen UNet instead of the whole UNet (0: full); sid-lsg: adapters for the generator and the fake network on the teacher's own UNet.", type=int)
@option("lora_alpha", "LoRA alpha: the adapter's output is scaled by alpha / rank [the rank].", type=float)
@option("lora_targets", "LoRA target modules, comma-separated [to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2: attention and feed-forward projections].")
@option("merge", "LoRA: also write the merged pipeline (base UNet + adapter folded in) into OUT; `trainer export OUT` does it later.", is_flag=True)
@sid_option("prompts", "sid-lsg: prompt file: .txt, one per line (UTF-8 or UTF-16), or .csv/.tsv/.parquet/.json with --prompt-column.", type=click.Path(dir_okay=False))
@sid_option("prompt_column", "sid-lsg: the caption column of a table or JSON prompt file.")
@sid_option("kappa", "sid-lsg: kappa1 = kappa2 = kappa3 = kappa4 (LSG); 1 = no guidance.", type=float)
@sid_option("kappa1", "sid-lsg: guidance of the fake score network's training target [--kappa].", type=float)
@sid_option("kappa2", "sid-lsg: the fake network's guidance in the generator loss [--kappa].", type=float)
@sid_option("kappa3", "sid-lsg: kappa3 (= kappa2 in the seed) [--kappa].", type=float)
@sid_option("kappa4", "sid-lsg: the teacher's guidance in the generator loss [--kappa]; Long guidance: only this > 1.", type=float)
@sid_option("alpha", "sid-lsg: alpha of the generator loss.", type=float)
@sid_option("t_init", "sid-lsg: the generator's timestep; its input is sqrt(1 - alphabar[t_init]) z.", type=int)
@sid_option("t_min", "sid-lsg: lowest diffusion time of the score losses.", type=int)
@sid_option("t_max", "sid-lsg: highest diffusion time of the score losses.", type=int)
@sid_option("prompt_dropout", "sid-lsg: probability of \"\" for the fake network's prompts (when kappa1, kappa2 or kappa3 != 1).", type=float)
@sid_option("lr_fake", "sid-lsg: the fake score network's Adam lr [--lr].", type=float)
@sid_option("ema_halflife_kimg", "sid-lsg: EMA half-life of the generator in thousands of images (0: none).", type=float)
@sid_option("ema_rampup", "sid-lsg: cap the half-life at this fraction of the images seen.", type=float)
@sid_option("teacher_precision", "sid-lsg: dtype of the frozen teacher [follows --mixed-precision].", type=click.Choice(["fp32", "fp16", "bf16"]))
@sid_option("max_kimg", "sid-lsg: train until this many thousand generated images.", type=float)
@sid_option("checkpoint_every_kimg", "sid-lsg: write a checkpoint every N thousand images.", type=float)
@sid_option("grid_every_kimg", "sid-lsg: write OUT/samples/kimg-*.png every N thousand images (0: never).", type=float)
@sid_option("grid_prompts", "sid-lsg: the first N prompts (seeds 0..N-1) in the sample grids.", type=int)
@progressive_option("student", "progressive: the w-distill student to halve (or a round folder, to go on from it).", type=click.Path(file_okay=False))
@progressive_option("start_steps", "progressive: the steps the starting student is sampled with (the first round's teacher).", type=int)
@progressive_option("end_steps", "progressive: the last round's student steps.", type=int)
@progressive_option("iters_per_round", "progressive: optimiser steps per round.", type=int)
def fit(**options) -> None:
    """Distil the guided teacher into a student that needs one UNet pass per step (cfg-distill,
    classifier-distill, w-distill: from shards), halve a w-student's steps round after round (progressive:
    OUT/round-NNsteps/), or distil into a one-step generator (sid-lsg: from prompts alone).

    Runs unchanged under `accelerate launch` / `torchrun`. A --config FILE (JSON, YAML or TOML) holds the
    same names as the flags; flags override it. Ctrl-C or SIGTERM writes a checkpoint before stopping.
    Options marked sid-lsg or progressive apply to it only; options that do not apply to a method are refused.
    """
    cfg = config_for_method(options)
    if isinstance(cfg, SidConfig):
        from trainer.sid import run_sid

        result = run_sid(cfg)
        where = f"{result['kimg']:g} kimg"
    elif isinstance(cfg, ProgressiveConfig):
        from trainer.progressive import run_progressive

        result = run_progressive(cfg)
        where = f"step {result['step']}"
    else:
        from trainer.fit import run_fit

        result = run_fit(cfg)
        where = f"step {result['step']}"
    if result["status"] == "interrupted":
        click.echo(f"interrupted at {where}; continue with --resume latest", err=True)
        raise click.exceptions.Exit(130)


@cli.command("export")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--base", type=click.Path(exists=True, file_okay=False),
              help="Apply the adapter to this pipeline instead (same architecture: a fine-tune of the base).")
@click.option("--to", type=click.Path(file_okay=False), help="With --base: the student folder to write.")
def export(out: str, base: str | None, to: str | None) -> None:
    """Write the merged pipeline of the LoRA student in OUT into OUT: its base's UNet with the adapter folded
    in (and the base's other components), which evaluation, progressive and the stock pipeline load
    like a full student. The adapter files stay beside it. With --base B --to DIR: the adapter folded into
    B's UNet instead, as the student folder DIR (a LoRA student as an acceleration module for a fine-tune)."""
    from students.lora import write_merged_pipeline

    if (base is None) != (to is None):
        raise UserError("--base and --to go together")
    written = write_merged_pipeline(Path(out), base and Path(base), to and Path(to))
    click.echo(f"merged pipeline written to {written}")


def config_for_method(options: dict) -> FitConfig | SidConfig | ProgressiveConfig:
    """The method's config from the options given (on the command line or in --config); the rest keep the
    dataclass's defaults. An option the method does not take, or a missing one it needs, is a one-line error."""
    ctx = click.get_current_context()
    method = options["method"]
    config_class = CONFIG_CLASS[method]
    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    if stray := sorted(set(given) - set(fields)) or options_of_other_methods(method, given):
        raise UserError(f"--{stray[0].replace('_', '-')} does not apply to --method {method}")
    for name, f in fields.items():
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in given:
            raise UserError(f"--method {method} needs --{name.replace('_', '-')}")
    return config_class(**given)


def main(argv: list[str] | None = None) -> int:
    return run_group(cli, argv)


if __name__ == "__main__":
    sys.exit(main())

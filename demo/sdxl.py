"""The demo's SDXL stage: the same commands on an SDXL-layout teacher, proving the chain (not quality).

There is no trained SDXL digits teacher (training one would take the demo's whole budget), so the teacher is a
tiny random-weight StableDiffusionXLPipeline folder (two CLIP text encoders, the second with a projection, a
UNet with `addition_embed_type="text_time"`), built once and cached. Over the digits world's source images it
runs `pipeline build-shards` and `trainer fit --method cfg-distill` (under torchrun, the student sharded with
FSDP2), then checks what the report shows: the records' micro-conditioning, a fresh teacher pass recomputing the
stored predictions, the training loss, and the student sampled by stock `StableDiffusionXLPipeline` at one UNet
pass per step. The result is sdxl-check.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

import torch

from shards.writer import atomic_write_json

CHECKED_RECORDS = 16


def sdxl_teacher(root: Path) -> Path:
    """The cached tiny SDXL-layout teacher (32 px, like the digits teacher)."""
    from diffusion.tiny import write_tiny_sdxl_teacher

    folder = root / "sdxl" / "teacher"
    if not (folder / "model_index.json").is_file():
        write_tiny_sdxl_teacher(folder, resolution=32)
    return folder


def records(shards: Path):
    """Every record of a shard folder, in manifest order."""
    import webdataset as wds

    from shards.format import Record
    from shards.manifest import read_manifest

    for shard in read_manifest(shards):
        for sample in wds.tarfile_samples([{"url": str(shards / shard.file)}]):
            yield Record.decode(sample)


def recompute_error(teacher_dir: Path, checked: list) -> float:
    """Largest |stored - fresh| over the records' eps_cond and eps_uncond, the fresh pass on the stored z_t, t,
    caption and micro-conditioning."""
    from diffusion.teacher import load_teacher
    from shards.format import recorded_micro

    teacher = load_teacher(teacher_dir)
    stack = lambda name: torch.stack([r.tensors[name] for r in checked]).float()  # noqa: E731
    cond = teacher.encode_text([r.caption for r in checked]).with_micro(recorded_micro([r.meta for r in checked]))
    eps_cond, eps_uncond = teacher.eps_cond_uncond(stack("zt"), torch.tensor([r.t for r in checked]), cond,
                                                   teacher.encode_text([""]))
    return max((stack("eps_cond") - eps_cond).abs().max().item(), (stack("eps_uncond") - eps_uncond).abs().max().item())


def stock_passes(student: Path, prompt: str) -> tuple[list[int], list[int]]:
    """(UNet batch of each call, image shape) when StableDiffusionXLPipeline samples the student in 4 steps."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(student, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    batches = []
    pipe.unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    image = pipe(prompt, num_inference_steps=4, guidance_scale=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    return batches, list(image.shape)


def write_check(root: Path, teacher_dir: Path, shards: Path, student: Path) -> dict:
    from shards.manifest import read_dataset_info

    info = read_dataset_info(shards)
    every = list(records(shards))
    saved = json.loads(max((student / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    state, losses = saved["state"], saved["state"]["recent_losses"]
    tenth = max(1, len(losses) // 10)  # the loss over the first and the last tenth of the steps
    batches, shape = stock_passes(student, "a handwritten digit seven")
    record = json.loads((student / "distillation.json").read_text())
    check = {"samples": info["samples"], "schema_version": info["schema_version"], "fit_steps": state["step"],
             "fit_processes": saved["run"]["data_layout"]["world_size"], "fit_fsdp": saved["config"]["fsdp"],
             "global_batch_size": record["global_batch_size"],
             "micro": sorted({tuple(r.meta["micro"]) for r in every}),
             "recompute_max_abs_error": recompute_error(teacher_dir, every[:CHECKED_RECORDS]),
             "checked_records": min(CHECKED_RECORDS, len(every)), "loss_first": mean(losses[:tenth]),
             "loss_last": mean(losses[-tenth:]),
             "pipeline": record["inference"]["pipeline"],
             "unet_batches_4_steps": batches, "image_shape": shape}
    atomic_write_json(root / "sdxl-check.json", check)
    return check

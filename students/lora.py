"""A LoRA student's files: the adapter in diffusers' format (what `pipe.load_lora_weights(OUT)` reads), the same
adapter in the kohya format that ComfyUI and AUTOMATIC1111 load, w-distill's guidance embedding beside them, and
the merged pipeline (base + adapter folded into one UNet) that evaluation and stock pipelines load like any
student. The key conversions are diffusers' and peft's own; nothing here renames a key by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from diffusion.errors import UserError
from diffusion.resolution import set_trained_resolution
from diffusion.teacher import load_unet
from diffusion.unet import add_guidance_embedding
from students.folder import (copy_teacher_components, pipeline_class, read_distillation, with_stock_code,
                             write_record)
from students.recipes import use_recorded_scheduler

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name: load_lora_weights(OUT) finds it
KOHYA_FILE = "lora_kohya.safetensors"  # for ComfyUI's models/loras and AUTOMATIC1111's models/Lora
EMBEDDING_FILE = "guidance_embedding.safetensors"  # w-distill: time_embedding.cond_proj.weight, not in any LoRA format
EMBEDDING_WEIGHT = "time_embedding.cond_proj.weight"


def adapter_state(unet: UNet2DConditionModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """One adapter's weights in peft's naming (`...to_q.lora_A.weight`), float32, on the CPU."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def kohya_state(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The kohya format of a peft-named UNet adapter (`lora_unet_..._to_q.lora_down.weight`, `.alpha`), by
    diffusers' `convert_state_dict_to_kohya`; that function writes every alpha as the rank, so the adapter's own
    alpha is set after it (kohya loaders scale by alpha / rank)."""
    from diffusers.utils import convert_state_dict_to_kohya

    converted = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    return {k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous() for k, v in converted.items()}


def save_lora_files(unet: UNet2DConditionModel, out: Path, adapter_name: str, lora, with_embedding: bool) -> dict:
    """Write the adapter `adapter_name` of `unet` (`lora`: its trainer.student.LoraSpec) in both formats, and
    the guidance embedding when asked; returns the file names for distillation.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = adapter_state(unet, adapter_name)
    metadata = {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": list(lora.targets)}
    # the file is UNet keys only (`unet.` + peft's names), which every family's pipeline loads the same way
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=state, weight_name=LORA_FILE,
                                              unet_lora_adapter_metadata=metadata)
    save_file(kohya_state(state, lora.alpha), str(out / KOHYA_FILE),
              metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(lora.rank),
                        "ss_network_alpha": str(lora.alpha)})
    files = {"diffusers": LORA_FILE, "kohya": KOHYA_FILE}
    if with_embedding:
        weight = dict(unet.named_parameters())[EMBEDDING_WEIGHT]
        save_file({EMBEDDING_WEIGHT: weight.detach().float().cpu().contiguous()}, str(out / EMBEDDING_FILE))
        files["guidance_embedding"] = EMBEDDING_FILE
    return files


def lora_loading_code(base: Path, base_variant: str | None, out: Path, embedding_dim: int | None) -> str:
    """The stock diffusers lines that make `pipe`: the base pipeline (its own class: pipeline_class; its weight
    variant) with the adapter loaded (and for w-distill the base UNet built with the embedding's shape and the
    trained embedding put in it first)."""
    base, out = Path(base).resolve(), Path(out).resolve()
    variant = f', variant="{base_variant}"' if base_variant else ""
    if embedding_dim is None:
        make = f'pipe = {pipeline_class(base)}.from_pretrained("{base}"{variant})'
    else:
        make = "\n".join([
            f'unet = UNet2DConditionModel.from_pretrained("{base}", subfolder="unet"{variant}, '
            f"time_cond_proj_dim={embedding_dim}, low_cpu_mem_usage=False)",
            f'unet.load_state_dict(safetensors.torch.load_file("{out / EMBEDDING_FILE}"), strict=False)',
            f'pipe = {pipeline_class(base)}.from_pretrained("{base}"{variant}, unet=unet)'])
    return f'{make}\npipe.load_lora_weights("{out}")'


def adapter_record(lora, base: Path, base_variant: str | None, files: dict, merged: bool) -> dict[str, Any]:
    """distillation.json's "adapter": what the adapter is and which pipeline folder's UNet it sits on."""
    return {**lora.to_dict(), "base": str(Path(base).resolve()), "base_variant": base_variant, "files": files,
            "merged_pipeline": merged}


def load_adapter_weights(unet: UNet2DConditionModel, folder: Path, adapter_name: str) -> None:
    """Copy the diffusers-format adapter in `folder` into `unet`'s existing adapter `adapter_name` (peft's own
    loader; every key must land)."""
    from peft import set_peft_model_state_dict

    state = {k.removeprefix("unet."): v for k, v in load_file(str(Path(folder) / LORA_FILE)).items()}
    result = set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    missing = [k for k in getattr(result, "missing_keys", []) if f".{adapter_name}." in k and "lora_" in k]
    if wrong := list(getattr(result, "unexpected_keys", [])) + missing:
        raise UserError(f"{Path(folder) / LORA_FILE} does not fit this UNet's adapter: {wrong[0]}")


def merged_unet(folder: Path, record: dict[str, Any], base: Path | None = None) -> UNet2DConditionModel:
    """The base UNet (the adapter's own, or `base`: another pipeline of the same architecture, e.g. a fine-tune
    of it) with the folder's adapter (and guidance embedding) folded in, float32: a plain diffusers UNet that
    samples as the trained LoRA student does. Built the way a stock user would (diffusers' `load_lora_adapter`,
    `fuse_lora`), so it also checks the files."""
    adapter, folder = record["adapter"], Path(folder)
    base = Path(base or adapter["base"])
    unet = load_unet(base, variant=None if base != Path(adapter["base"]) else adapter.get("base_variant"))
    if "guidance_embedding" in adapter["files"]:
        embedding = load_file(str(folder / adapter["files"]["guidance_embedding"]))[EMBEDDING_WEIGHT]
        if unet.config.time_cond_proj_dim is None:
            unet = add_guidance_embedding(unet, embedding.shape[1])
        unet.time_embedding.cond_proj.weight.data.copy_(embedding)
    try:
        unet.load_lora_adapter(str(folder), weight_name=adapter["files"]["diffusers"], prefix="unet",
                               adapter_name="student")
    except (RuntimeError, ValueError) as error:
        raise UserError(f"the adapter in {folder} does not fit the UNet of {base}: {str(error).splitlines()[0]}")
    unet.fuse_lora(adapter_names=["student"])
    unet.unload_lora()
    if record.get("resolution"):
        set_trained_resolution(unet, record["resolution"], base)
    return unet


def save_lora_student(unet: UNet2DConditionModel, adapter_name: str, lora, base: Path, base_variant: str | None,
                      out: Path, record: dict[str, Any], merge: bool) -> None:
    """A LoRA student folder: both adapter files (+ the guidance embedding when the base lacks it: w-distill),
    distillation.json with its "adapter" entry, and with `merge` the merged pipeline beside them."""
    embedding = dict(unet.named_parameters()).get(EMBEDDING_WEIGHT)
    files = save_lora_files(unet, out, adapter_name, lora, with_embedding=embedding is not None
                            and embedding.requires_grad)
    loading = lora_loading_code(base, base_variant, out, embedding.shape[1] if "guidance_embedding" in files else None)
    inference = with_stock_code(record["inference"], loading)
    write_record(out, {**record, "inference": inference,
                       "adapter": adapter_record(lora, base, base_variant, files, merged=False)})
    if merge:
        write_merged_pipeline(out)


def write_merged_pipeline(folder: Path, base: Path | None = None, to: Path | None = None) -> Path:
    """Fold a LoRA student folder's adapter into its base UNet and write the full pipeline (the base's other
    components copied) into the folder: evaluation, progressive and any stock pipeline then load it like a full
    student. With `base` and `to`: the adapter applied to another pipeline of the same architecture (a
    fine-tune of the base: LoRA students as acceleration modules), written as a student folder `to`.
    `trainer export` and `trainer fit --merge` both come here."""
    folder = Path(folder)
    record = read_distillation(folder)
    if record is None or not record.get("adapter", {}).get("files"):
        raise UserError(f"{folder} is not a LoRA student folder (its distillation.json names no adapter files)")
    record = {k: v for k, v in record.items() if k != "format_version"}
    base, to = Path(base or record["adapter"]["base"]), Path(to or folder)
    unet = merged_unet(folder, record, base)
    copy_teacher_components(base, to)
    unet.save_pretrained(to / "unet", safe_serialization=True)
    use_recorded_scheduler(to, record["inference"])
    adapter = {**record["adapter"], "merged_pipeline": True}
    if to != folder:  # DIR is a full student of the other base; the adapter files stay in OUT
        adapter.update(base=str(base.resolve()), base_variant=None, applied_from=str(folder.resolve()), files={})
        inference = {k: v for k, v in record["inference"].items() if k != "diffusers"}
        load = f'pipe = {pipeline_class(to)}.from_pretrained("{to.resolve()}")'
        record = {**record, "inference": with_stock_code(inference, load)}
    write_record(to, {**record, "adapter": adapter})
    return to


def refuse_unmerged(folder: Path, record: dict[str, Any] | None, what: str) -> None:
    """Loops and evaluation read a pipeline folder; a LoRA student folder has one only once merged."""
    if record is not None and "adapter" in record and not (Path(folder) / "model_index.json").is_file():
        raise UserError(f"{what} {folder} is a LoRA student without its merged pipeline: run `trainer export "
                        f"{folder}` (or train with --merge), or load it in diffusers as its distillation.json says")

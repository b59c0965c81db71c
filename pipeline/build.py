"""`pipeline build-shards`: the loop that turns a source into shards, once, resumably, on any number of ranks.

Each rank takes units[rank::world]; a unit with a completion marker is skipped, any other is redone from
scratch (its partial shards removed first), so a re-run after a crash or kill ends with the same records.
Rank 0 merges the markers into manifest.parquet and dataset.json when all units are done.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from diffusion.classifier_guidance import GRADIENT_IMAGES, resolve_guidance
from diffusion.errors import UserError
from diffusion.guidance import COEFFICIENTS, DEFAULT_COEFFICIENT
from diffusion.launch import check_world_size
from diffusion.resolution import check_resolution
from diffusion.teacher import load_teacher
from pipeline.images import Skip, prepare
from pipeline.output import OutputFolder
from pipeline.sources import TarUnit, limit_units, list_units
from pipeline.teacher_pass import Prepared, draw, teacher_outputs, to_records
from shards.format import SCHEMA_VERSION, tensor_names
from shards.manifest import DATASET_JSON, read_dataset_info, recorded_coefficient
from shards.writer import ShardWriter


@dataclass
class BuildConfig:
    teacher: str
    source: str
    out: str
    guidance: str = "cfg"
    guidance_coefficient: str | None = None  # classifier kinds: recorded for fit [sqrt-beta]; no effect on records
    resolution: int = 512
    batch_size: int = 8
    samples: int | None = None
    seed: int = 0
    shard_size: int = 1000
    dtype: str = "fp32"
    t_min: int = 0
    t_max: int = 999
    store_clean: bool = False
    clip_model: str = "ViT-g-14"
    clip_weights: str | None = None
    min_image_size: int | None = None  # default: resolution // 2
    file_column: str = "file"
    caption_column: str = "caption"
    variant: str | None = None  # the teacher's weight variant (e.g. fp16) [what its folder has]

    def validate(self, teacher) -> None:
        num_timesteps = teacher.schedule.num_timesteps
        check_resolution(self.resolution, teacher.root)
        if not 0 <= self.t_min <= self.t_max < num_timesteps:
            raise UserError(f"need 0 <= --t-min <= --t-max < {num_timesteps}; got {self.t_min}, {self.t_max}")
        for name in ("resolution", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if self.samples is not None and self.samples < 1:
            raise UserError("--samples must be positive")
        if self.guidance_coefficient is not None:
            if self.guidance == "cfg":
                raise UserError("--guidance-coefficient does not apply to --guidance cfg (no classifier gradient)")
            if (value := self.guidance_coefficient) not in COEFFICIENTS:
                raise UserError(f"unknown --guidance-coefficient {value!r}; expected one of {COEFFICIENTS}")

    @property
    def min_size(self) -> int:
        return self.resolution // 2 if self.min_image_size is None else self.min_image_size


def _prepared_batches(unit, cfg: BuildConfig, latent_shape, skipped: Counter, converted: Counter, read: list):
    batch = []
    for raw in unit.samples():
        read[0] += 1
        try:
            pixels, caption, mode, micro = prepare(raw, cfg.resolution, cfg.min_size)
        except Skip as reason:
            skipped[str(reason)] += 1
            continue
        if mode != "RGB":
            converted[mode] += 1
        t, noise, vae_noise = draw(cfg.seed, raw.source_key, latent_shape, cfg.t_min, cfg.t_max)
        batch.append(Prepared(raw.source_key, unit.name, pixels, caption, t, noise, vae_noise, micro))
        if len(batch) == cfg.batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def build_unit(unit, cfg, teacher, guidance, uncond, out: OutputFolder, progress,
               after_batch: Callable[[float], None] | None = None) -> None:
    """Batch k's teacher work is launched, batch k+1 decoded (overlapping on CUDA), then batch k written.
    `after_batch(seconds)` follows each batch, outside its time (benchmarks interleave other work there).

    No decode thread: on a CPU every core already runs the teacher, and a thread only adds contention (measured:
    a decode thread did not raise benchmarks/build_shards.py's loop/bare ratio, 0.936 against 0.943 without,
    medians of three runs each).
    """
    out.clear_unit(unit.name)
    skipped, converted, read, shards = Counter(), Counter(), [0], []
    writer, reported = None, 0
    batches = _prepared_batches(unit, cfg, teacher.latent_shape(cfg.resolution), skipped, converted, read)
    batch = next(batches, None)
    while batch is not None:
        started = time.perf_counter()
        outputs = teacher_outputs(teacher, guidance, batch, uncond, cfg.store_clean)
        following = next(batches, None)
        for record in to_records(batch, outputs):
            writer = writer or ShardWriter(out.shard_path(unit.name, len(shards)))
            writer.write(record)
            if writer.samples == cfg.shard_size:
                shards.append(writer.finish())
                writer = None
        progress.update(read[0] - reported)
        reported, batch = read[0], following
        if after_batch is not None:
            after_batch(time.perf_counter() - started)
    if writer is not None:
        shards.append(writer.finish())
    progress.update(read[0] - reported)
    out.finish_unit(unit.name, shards, skipped, converted)


def _identity(cfg: BuildConfig, fingerprint: str, guidance, units) -> dict[str, Any]:
    """Everything that determines the records (not the batch size, nor paths whose content is hashed, nor the
    coefficient fit is told to use); for classifier kinds, the images the loss saw (no clamp since it was
    recorded: a folder built with the clamp is not resumed)."""
    ignored = ("out", "batch_size", "teacher", "clip_model", "clip_weights", "guidance_coefficient", "variant")
    settings = {k: v for k, v in asdict(cfg).items() if k not in ignored}
    images = {"gradient_images": GRADIENT_IMAGES} if guidance.kind == "classifier" else {}
    return {**settings, **images, "schema_version": SCHEMA_VERSION, "teacher_fingerprint": fingerprint,
            "guidance_params": guidance.params, "units": [[u.name, u.limit] for u in units]}


def _guidance_info(cfg: BuildConfig, guidance) -> dict[str, Any]:
    """dataset.json's `guidance`; classifier kinds add the coefficient c_t fit uses by default (eps + gamma c_t
    grad) and the images the loss saw on the gradient path."""
    info = {"name": guidance.name, "params": guidance.params}
    if guidance.kind == "classifier":
        info.update(coefficient=_coefficient(cfg), images=GRADIENT_IMAGES)
    return info


def _coefficient(cfg: BuildConfig) -> str:
    """--guidance-coefficient; without it, the one the folder already records (a re-run keeps it), else sqrt-beta."""
    if cfg.guidance_coefficient is not None:
        return cfg.guidance_coefficient
    if (Path(cfg.out) / DATASET_JSON).is_file():
        return recorded_coefficient(read_dataset_info(cfg.out))
    return DEFAULT_COEFFICIENT


def _dataset_info(cfg: BuildConfig, teacher, guidance) -> dict[str, Any]:
    return {
        "kind": guidance.kind,
        "guidance": _guidance_info(cfg, guidance),
        "teacher": {"fingerprint": teacher.fingerprint, "source": str(cfg.teacher), "variants": teacher.variants},
        "tensors": list(tensor_names(guidance.kind, cfg.store_clean)),
        "resolution": cfg.resolution,
        "latent_shape": list(teacher.latent_shape(cfg.resolution)),
        "vae_scaling_factor": teacher.vae.config.scaling_factor,
        "dtype": "float16",
        "compute_dtype": cfg.dtype,
        "scheduler_config": teacher.scheduler_config,
        "seed": cfg.seed,
        "t_min": cfg.t_min,
        "t_max": cfg.t_max,
        "source": cfg.source,
    }


def run_build(cfg: BuildConfig, after_batch: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Build (or resume) the shard folder; on rank 0 return dataset.json's content plus the loop's seconds.
    `after_batch` as in build_unit."""
    state = PartialState(cpu=not torch.cuda.is_available())
    check_world_size(state.num_processes)
    guidance = resolve_guidance(cfg.guidance, clip_model=cfg.clip_model, clip_weights=cfg.clip_weights,
                                device=state.device)
    teacher = load_teacher(cfg.teacher, cfg.dtype, state.device, variant=cfg.variant)
    cfg.validate(teacher)
    units = limit_units(list_units(cfg.source, cfg.shard_size, cfg.file_column, cfg.caption_column), cfg.samples)
    out = OutputFolder(cfg.out)
    identity = _identity(cfg, teacher.fingerprint, guidance, units)
    _claim(out, identity, state)

    mine = [u for u in units[state.process_index :: state.num_processes] if not out.is_done(u.name)]
    uncond = teacher.encode_text([""])
    start = time.perf_counter()
    with tqdm(desc=f"build-shards rank {state.process_index}", unit="input", disable=not state.is_main_process,
              total=sum(u.count() for u in mine) if cfg.samples or not _any_tar(mine) else None) as progress:
        for unit in mine:
            build_unit(unit, cfg, teacher, guidance, uncond, out, progress, after_batch)
    if not state.is_main_process:
        return {}
    if missing := out.missing_units([u.name for u in units]):
        print(f"rank 0 done; waiting for {len(missing)} unit(s) on other ranks", flush=True)
    while out.missing_units([u.name for u in units]):
        time.sleep(2.0)
    out.merge([u.name for u in units], _dataset_info(cfg, teacher, guidance))
    return _summary(out, time.perf_counter() - start)


def _any_tar(units) -> bool:
    """Counting a tar's entries means reading all its headers: skip it for the progress total."""
    return any(isinstance(u, TarUnit) for u in units)


def _claim(out: OutputFolder, identity: dict, state: PartialState) -> None:
    """All ranks check the folder read-only, then rank 0 claims it, then the others confirm."""
    if out.run_json.is_file() or (out.root.exists() and any(out.root.iterdir())):
        out.claim(identity)  # validates without writing when the folder holds this run
    state.wait_for_everyone()
    if state.is_main_process:
        out.claim(identity)
    state.wait_for_everyone()
    out.check_claimed(identity)


def _summary(out: OutputFolder, seconds: float) -> dict[str, Any]:
    info = read_dataset_info(out.root)
    skipped = ", ".join(f"{k} {v}" for k, v in info["skipped"].items()) or "none"
    print(f"wrote {info['samples']} samples in {info['shards']} shards to {out.root} "
          f"in {seconds:.1f}s; skipped: {skipped}")
    return {**info, "build_seconds": seconds}

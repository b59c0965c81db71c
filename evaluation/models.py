"""What to render with: any folder the trainer writes, or the teacher itself, read from its `distillation.json`.

| model folder | how it is sampled | UNet passes per step |
|---|---|---|
| teacher, `--guidance-scale s` | its own pipeline (SD or SDXL) with CFG at s (s = 1: no guidance) | 2 (one batch of 2B), 1 at s = 1 |
| teacher, `--classifier-guidance clip|blue|M:F` | DDIM with eps + gamma c_t grad (gamma = --guidance-scale; c_t = sqrt(beta_t), or sigma_t with `PATH@NAME=GAMMA@sigma`) | 1 + decode + backward |
| cfg-distill / classifier-distill student | its teacher's pipeline class at guidance_scale 1 | 1 |
| w-distill student, `--guidance-scale w` | its teacher's pipeline class at guidance_scale w (fed as timestep_cond) | 1 |
| sid-lsg one-step generator | x_g = f(sqrt(1 - alphabar[t_init]) z, t_init, c), VAE decode in float32 | 1 per image |
| progressive student (N steps), `--guidance-scale w` | N-step DDIM on its own grid, or Meng et al.'s stochastic sampler | 1 |

A folder loads in the pipeline class its model_index.json names (StableDiffusionPipeline or
StableDiffusionXLPipeline; a student's is its teacher's); our own samplers take the teacher wrapper's text
conditioning, so nothing here asks which family a model is.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from diffusion.errors import UserError, one_line
from diffusion.guidance import COEFFICIENTS, DEFAULT_COEFFICIENT
from diffusion.teacher import (DTYPES, LOAD_ERRORS, check_teacher_files, decoding_vae, load_model,
                               quiet_library_progress, resolve_teacher_dir)
from students.folder import pipeline_class, read_distillation
from students.lora import refuse_unmerged

DEFAULT_TEACHER_SCALE = 7.5
ONE_STEP_KINDS = ("sid-lsg",)
TEACHER_KINDS = ("teacher", "teacher-classifier")
SAMPLERS = ("ddim", "stochastic")


@dataclass
class ModelSpec:
    folder: Path
    kind: str  # "teacher", "teacher-classifier" or a trainer method
    guidance_scale: float  # CFG s, classifier gamma, or w
    classifier_guidance: str | None = None
    t_init: int | None = None  # one-step generators
    steps: int | None = None  # few-step students: they sample on their own grid, in this many steps
    sampler: str = "ddim"  # few-step students: "ddim" (deterministic) or "stochastic" (Meng et al.)
    coefficient: str = DEFAULT_COEFFICIENT  # classifier-guided teacher: c_t in eps + gamma c_t grad
    variant: str | None = None  # a teacher's weight variant (--variant); None: what each component folder has

    @property
    def one_step(self) -> bool:
        return self.kind in ONE_STEP_KINDS

    @property
    def label(self) -> str:
        if self.kind == "teacher":
            return f"teacher cfg {self.guidance_scale:g}" if self.guidance_scale != 1 else "teacher no guidance"
        if self.kind == "teacher-classifier":
            convention = "" if self.coefficient == DEFAULT_COEFFICIENT else f" ({self.coefficient})"
            return f"teacher {self.classifier_guidance} guidance {self.guidance_scale:g}{convention}"
        if self.kind == "w-distill":
            return f"{self.folder.name} (w-distill, w {self.guidance_scale:g})"
        if self.kind == "progressive":
            sampler = ", stochastic" if self.sampler == "stochastic" else ""
            return f"{self.folder.name} (progressive, {self.steps} steps{sampler}, w {self.guidance_scale:g})"
        return f"{self.folder.name} ({self.kind})"

    def to_dict(self) -> dict:
        return {"folder": str(self.folder), "kind": self.kind, "guidance_scale": self.guidance_scale,
                "classifier_guidance": self.classifier_guidance, "t_init": self.t_init, "steps": self.steps,
                "sampler": self.sampler, "coefficient": self.coefficient, "variant": self.variant,
                "label": self.label}


def describe_model(model: str, guidance_scale: float | None = None, classifier_guidance: str | None = None,
                   sampler: str = "ddim", coefficient: str | None = None) -> ModelSpec:
    """Read the model kind from distillation.json (absent: the teacher) and check the scale makes sense for it.
    `coefficient` (c_t of classifier guidance: sqrt-beta or sigma) applies to a classifier-guided teacher only."""
    folder = resolve_teacher_dir(model)
    record = read_distillation(folder)
    refuse_unmerged(folder, record, "--model")
    if not (folder / "model_index.json").is_file():
        raise UserError(f"{folder} is not an SD or SDXL pipeline folder (no model_index.json)")
    if coefficient is not None and not (record is None and classifier_guidance):
        raise UserError(f"guidance coefficient {coefficient!r} applies to a teacher with classifier guidance "
                        "(PATH@NAME=GAMMA@sigma)")
    if coefficient is not None and coefficient not in COEFFICIENTS:
        raise UserError(f"unknown guidance coefficient {coefficient!r}; expected one of {COEFFICIENTS}")
    if record is None:
        if classifier_guidance:
            return ModelSpec(folder, "teacher-classifier", 100.0 if guidance_scale is None else guidance_scale,
                             classifier_guidance, coefficient=coefficient or DEFAULT_COEFFICIENT)
        return ModelSpec(folder, "teacher", DEFAULT_TEACHER_SCALE if guidance_scale is None else guidance_scale)
    method = record["method"]
    if classifier_guidance:
        raise UserError(f"--classifier-guidance applies to a teacher; {folder} is a {method} student")
    if sampler not in SAMPLERS:
        raise UserError(f"unknown --sampler {sampler!r}; expected one of {SAMPLERS}")
    if sampler != "ddim" and method != "progressive":
        raise UserError(f"--sampler {sampler} applies to a progressive student; {folder} is a {method} model")
    if method in ("w-distill", "progressive"):
        low, high = record["w_range"]
        w = min(max(DEFAULT_TEACHER_SCALE, low), high) if guidance_scale is None else guidance_scale
        if not low <= w <= high:
            raise UserError(f"--guidance-scale {w} is outside the w range [{low}, {high}] this student was trained on")
        steps = record["steps"] if method == "progressive" else None  # a w-student's "steps" are training steps
        return ModelSpec(folder, method, w, steps=steps, sampler=sampler)
    if method in ("cfg-distill", "classifier-distill"):
        if guidance_scale not in (None, 1.0):
            raise UserError(f"{folder} has its guidance distilled in (scale {record['guidance_scale']}); sample it at "
                            "--guidance-scale 1 (the default)")
        return ModelSpec(folder, method, 1.0)
    if method in ONE_STEP_KINDS:
        if guidance_scale not in (None, 1.0):
            kappas = record["guidance"]
            raise UserError(f"{folder} is a one-step generator with its guidance distilled in (kappa "
                            f"{kappas['kappa1']}/{kappas['kappa2']}/{kappas['kappa3']}/{kappas['kappa4']}); it takes "
                            "no --guidance-scale")
        return ModelSpec(folder, method, 1.0, t_init=int(record["t_init"]))
    raise UserError(f"{folder}: cannot render a {method!r} model yet")


def with_variant(specs: list[ModelSpec], variant: str | None) -> list[ModelSpec]:
    """--variant: the weight variant of the teachers among `specs` (checked now, one line if a file is missing);
    a student's folder always loads what it has. An error when none of them is a teacher."""
    if variant is None:
        return specs
    if not any(spec.kind in TEACHER_KINDS for spec in specs):
        raise UserError(f"--variant applies to a teacher; {specs[0].folder} is a {specs[0].kind} student (a student "
                        "loads what its folder has)")
    for spec in specs:
        if spec.kind in TEACHER_KINDS:
            check_teacher_files(spec.folder, variant)
    return [replace(spec, variant=variant) if spec.kind in TEACHER_KINDS else spec for spec in specs]


NO_SAFETY_CHECKER = {"safety_checker": None, "requires_safety_checker": False}


def load_pipeline(spec: ModelSpec, dtype: str, device: torch.device):
    """The folder's own pipeline class (model_index.json's `_class_name`: StableDiffusionPipeline or
    StableDiffusionXLPipeline) from local files, progress bars off (ours counts images). A class that takes a
    safety checker gets none; the VAE is in the dtype the pipeline decodes with (see decoding_vae)."""
    import diffusers

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    class_name = pipeline_class(spec.folder)
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise UserError(f"cannot load {spec.folder}: its model_index.json names {class_name!r}, not a diffusers "
                        "pipeline")
    quiet_library_progress()
    variants = check_teacher_files(spec.folder, spec.variant)  # each part in `dtype`, whatever its files hold
    parts = {name: load_model(spec.folder, name, DTYPES[dtype], variant) for name, variant in variants.items()}
    parts["vae"] = decoding_vae(spec.folder, parts["vae"])
    accepted = inspect.signature(cls.__init__).parameters
    no_checker = {key: value for key, value in NO_SAFETY_CHECKER.items() if key in accepted}
    try:
        pipe = cls.from_pretrained(spec.folder, **parts, torch_dtype=DTYPES[dtype], local_files_only=True,
                                   **no_checker)
    except LOAD_ERRORS as error:
        raise UserError(f"cannot load {spec.folder}: {one_line(error)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def parse_model_arg(text: str) -> ModelSpec:
    """`PATH`, or `PATH@cfg=S` (CFG scale, or w for a w- or progressive student), or `PATH@NAME=GAMMA` for
    classifier guidance of a teacher (NAME: clip, blue or MODULE:FUNCTION); `@stochastic` at the end samples a
    progressive student with Meng et al.'s stochastic sampler, and `@sigma` (or `@sqrt-beta`, the default) at the
    end picks classifier guidance's c_t in eps + gamma c_t grad."""
    sampler, coefficient = "ddim", None
    head, _, tail = text.rpartition("@")
    while head and tail in ("stochastic", *COEFFICIENTS):
        if tail == "stochastic":
            sampler = "stochastic"
        else:
            coefficient = tail
        text = head
        head, _, tail = text.rpartition("@")
    path, _, option = text.partition("@")
    if not option:
        return describe_model(path, sampler=sampler, coefficient=coefficient)
    name, _, value = option.rpartition("=")
    try:
        scale = float(value)
    except ValueError:
        raise UserError(f"model {text!r}: expected PATH@cfg=SCALE or PATH@clip=GAMMA, got {option!r}") from None
    if name in ("cfg", "w"):
        return describe_model(path, scale, sampler=sampler, coefficient=coefficient)
    return describe_model(path, scale, classifier_guidance=name, coefficient=coefficient)

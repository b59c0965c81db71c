"""`evaluation coco30k`: render the COCO-2014 prompts, score them, write metrics.json and report.md.

Rendering runs on every rank; the metrics run on rank 0 once all images exist. Every metric sees the images
through `prepare_256` (centre crop, PIL LANCZOS 256), generated and reference alike.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState

from diffusion.errors import UserError
from evaluation.coco import prepare_256, prompts_sha256, reference_images, write_prompts
from evaluation.metrics import colour_fraction, feature_statistics, frechet_distance, precision_recall
from evaluation.models import describe_model, parse_model_arg, with_variant
from evaluation.prompt_list import PromptSelection, select_prompts
from evaluation.reference import reference_features, reference_statistics, reference_subset
from evaluation.render import Renderer, load_images, render_prompts
from evaluation.report import write_report
from students.card import write_scored_card

COLOUR_METRICS = ("blue", "red")  # the share of pixels of that colour: `{name}_fraction` in metrics.json
METRICS = ("fid", "clip", "pr", *COLOUR_METRICS)
PR_FEATURES = ("vgg16", "inception")
DEFAULT_CACHE = Path.home() / ".cache" / "guided-distill" / "reference"


@dataclass
class EvalConfig:
    model: str
    out: str
    coco: str | None = None
    prompts: str | None = None
    prompt_column: str = "caption"  # the caption column of a .csv/.tsv/.parquet/.json prompt list
    num_images: int | None = None  # COCO: 30000 drawn with seed 2014; a prompt file: all of it
    metrics: str = "fid,clip,pr"
    evaluator: str = "standard"
    inception_weights: str | None = None
    clip_model: str = "ViT-g-14"
    clip_weights: str | None = None
    vgg_weights: str | None = None
    pr_features: str = "vgg16"  # vgg16 (Kynkaanniemi et al.'s fc2) or inception (the FID pool3, as SiD-LSG)
    digits_classifier: str | None = None
    guidance_scale: float | None = None
    classifier_guidance: str | None = None
    sampler: str = "ddim"  # progressive students: ddim or stochastic
    num_inference_steps: int = 50
    resolution: int | None = None
    batch_size: int = 8
    seed: int = 0
    dtype: str = "fp32"
    variant: str | None = None  # the teacher's weight variant (e.g. fp16) [what its folder has]
    cache_dir: str = str(DEFAULT_CACHE)

    def metric_list(self) -> list[str]:
        chosen = [m.strip() for m in self.metrics.split(",") if m.strip()]
        if unknown := [m for m in chosen if m not in METRICS]:
            raise UserError(f"unknown --metrics {unknown}; expected a comma list of {', '.join(METRICS)}")
        if chosen and ("fid" in chosen or "pr" in chosen) and not self.coco:
            raise UserError("--metrics fid/pr need reference images: pass --coco DIR")
        return chosen


def prompt_selection(cfg: EvalConfig) -> PromptSelection:
    """--prompts FILE, or --num-images COCO-2014 captions drawn with seed 2014 (evaluation/prompt_list.py)."""
    return select_prompts(cfg.coco, cfg.prompts, cfg.num_images, cfg.prompt_column)


def load_prompt_list(cfg: EvalConfig) -> tuple[list[str], str]:
    selection = prompt_selection(cfg)
    return selection.prompts, selection.source


def build_evaluators(cfg: EvalConfig, metrics: list[str], device) -> dict[str, Any]:
    """The extractors the chosen metrics need, from local files (see evaluation/extractors.py)."""
    from evaluation.extractors import ClipScorer, InceptionFeatures, VGG16Features

    if cfg.evaluator == "digits":  # the digits world: one small classifier stands in for all three
        from digits.classifier import DigitFeatures, DigitScorer

        evaluators = {m: c(cfg.digits_classifier) for m, c in (("fid", DigitFeatures), ("clip", DigitScorer))
                      if m in metrics}
        if "pr" in metrics:  # the same features as digit-FID, from one instance (see `score`)
            evaluators["pr"] = evaluators.get("fid") or DigitFeatures(cfg.digits_classifier)
        return evaluators
    if cfg.evaluator != "standard":
        raise UserError(f"unknown --evaluator {cfg.evaluator!r}; expected standard or digits")
    if cfg.pr_features not in PR_FEATURES:
        raise UserError(f"unknown --pr-features {cfg.pr_features!r}; expected {' or '.join(PR_FEATURES)}")
    evaluators = {}
    if "fid" in metrics:
        evaluators["fid"] = InceptionFeatures(cfg.inception_weights, device)
    if "clip" in metrics:
        evaluators["clip"] = ClipScorer(cfg.clip_model, cfg.clip_weights, device)
    if "pr" in metrics and cfg.pr_features == "inception":  # FID's own extractor, so its features serve both
        evaluators["pr"] = evaluators.get("fid") or InceptionFeatures(cfg.inception_weights, device)
    elif "pr" in metrics:
        evaluators["pr"] = VGG16Features(cfg.vgg_weights, device)
    return evaluators


def score(images: list[np.ndarray], prompts: list[str], evaluators: dict, coco: Path | None, cache: Path,
          metrics: list[str] = ()) -> dict:
    """Every chosen metric on prepared (256 px) generated images. An extractor that serves two metrics (PR on
    the FID features) sees the generated images once."""
    result: dict[str, Any] = {}
    for colour in (m for m in COLOUR_METRICS if m in metrics):
        result[f"{colour}_fraction"] = colour_fraction(images, colour)
    refs = reference_images(coco) if coco else []
    extracted: dict[int, np.ndarray] = {}

    def fake_features(extractor) -> np.ndarray:
        if id(extractor) not in extracted:
            extracted[id(extractor)] = extractor.features(images)
        return extracted[id(extractor)]

    if "fid" in evaluators:
        fake = fake_features(evaluators["fid"])
        result["fid"] = frechet_distance(*reference_statistics(evaluators["fid"], refs, cache), *feature_statistics(fake))
    if "clip" in evaluators:
        result["clip_score"] = float(np.mean(evaluators["clip"].scores(images, prompts)))
    if "pr" in evaluators:
        real = reference_features(evaluators["pr"], reference_subset(refs, len(images)), cache)
        fake = fake_features(evaluators["pr"])
        count = min(len(real), len(fake))
        result["precision"], result["recall"] = precision_recall(real[:count], fake[:count], k=3)
    return result


REFERENCES = ("COCO-2014 val2014: every image for FID (as GigaGAN's clean-fid evaluation); for PR as many as "
              "generated, drawn with seed 0 (never chosen by a prompt list's image ids)")


def protocol(cfg: EvalConfig, selection: PromptSelection, evaluators: dict) -> dict:
    """What the numbers depend on, for metrics.json: prompts (and the list file's sha256), sizes, extractors."""
    prompts = selection.prompts
    return {
        "num_images": len(prompts), "prompt_source": selection.source, "prompts_sha256": prompts_sha256(prompts),
        "prompt_list": selection.info, "reference_images": REFERENCES if cfg.coco else None,
        "eval_size": 256, "resize": "centre crop + PIL LANCZOS", "fid_mode": "clean (clean-fid)",
        "num_inference_steps": cfg.num_inference_steps, "seed": cfg.seed,
        "dtype": cfg.dtype, "evaluator": cfg.evaluator, "clip_text_prefix": "A photo depicts ", "pr_k": 3,
        "pr_features": ("digits" if cfg.evaluator == "digits" else cfg.pr_features) if "pr" in evaluators else None,
        "weights_sha256": {name: e.checksum for name, e in evaluators.items()},
    }


def evaluate_spec(spec, prompts: list[str], source: str, out: Path, cfg: EvalConfig, evaluators: dict,
                  state: PartialState, image_ids: list[int] | None = None) -> dict | None:
    """Render one model's images into OUT/images (all ranks), then score them (rank 0; None elsewhere)."""
    renderer = Renderer(spec, cfg.num_inference_steps, cfg.dtype, state.device, cfg.clip_model, cfg.clip_weights,
                        resolution=cfg.resolution)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_prompts(out / "prompts.json", prompts, source, image_ids)
    timing = render_prompts(renderer, prompts, out, cfg.seed, cfg.batch_size)
    resolution = renderer.resolution
    del renderer
    if not state.is_main_process:
        return None
    record = {"model": spec.to_dict(), "render": timing, "resolution": resolution,
              "num_inference_steps": 1 if spec.one_step else spec.steps or cfg.num_inference_steps}
    metrics = cfg.metric_list()
    if not metrics:  # `evaluation render`: images only
        return record
    images = [prepare_256_array(a) for a in load_images(out, len(prompts))]
    coco = Path(cfg.coco) if cfg.coco else None
    return {**score(images, prompts, evaluators, coco, Path(cfg.cache_dir), metrics), **record}


def model_spec(cfg: EvalConfig):
    """--model PATH with --guidance-scale / --classifier-guidance, or the PATH@cfg=S / PATH@blue=G shorthand."""
    if "@" in cfg.model:
        spec = parse_model_arg(cfg.model)
    else:
        spec = describe_model(cfg.model, cfg.guidance_scale, cfg.classifier_guidance, cfg.sampler)
    return with_variant([spec], cfg.variant)[0]


def run_coco30k(cfg: EvalConfig) -> dict | None:
    """Render, then (rank 0) score and report. Returns metrics.json's content on rank 0."""
    metrics = cfg.metric_list()
    spec = model_spec(cfg)
    selection = prompt_selection(cfg)
    prompts = selection.prompts
    out = Path(cfg.out)
    state = PartialState(cpu=not torch.cuda.is_available())
    evaluators = build_evaluators(cfg, metrics, state.device) if state.is_main_process else {}  # fail early
    record = evaluate_spec(spec, prompts, selection.source, out, cfg, evaluators, state, selection.image_ids)
    if record is None:
        return None
    record["protocol"] = {**protocol(cfg, selection, evaluators), "resolution": record["resolution"],
                          "num_inference_steps": record["num_inference_steps"]}
    record["config"] = asdict(cfg)
    (out / "metrics.json").write_text(json.dumps(record, indent=2))
    write_report(out, record, prompts)
    write_scored_card(spec.folder, record)
    return record


def prepare_256_array(array: np.ndarray) -> np.ndarray:
    from PIL import Image

    return prepare_256(Image.fromarray(array))


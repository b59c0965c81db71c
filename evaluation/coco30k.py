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
from evaluation.coco import (
    choose_prompts, prepare_256, prompts_sha256, read_prompt_file, reference_images, write_prompts,
)
from evaluation.metrics import blue_fraction, feature_statistics, frechet_distance, precision_recall
from evaluation.models import describe_model, parse_model_arg
from evaluation.reference import reference_features, reference_statistics, reference_subset
from evaluation.render import Renderer, load_images, render_prompts
from evaluation.report import write_report

METRICS = ("fid", "clip", "pr", "blue")
DEFAULT_CACHE = Path.home() / ".cache" / "guided-distill" / "reference"


@dataclass
class EvalConfig:
    model: str
    out: str
    coco: str | None = None
    prompts: str | None = None
    num_images: int = 30000
    metrics: str = "fid,clip,pr"
    evaluator: str = "standard"
    inception_weights: str | None = None
    clip_model: str = "ViT-g-14"
    clip_weights: str | None = None
    vgg_weights: str | None = None
    digits_classifier: str | None = None
    guidance_scale: float | None = None
    classifier_guidance: str | None = None
    sampler: str = "ddim"  # progressive students: ddim or stochastic
    num_inference_steps: int = 50
    resolution: int | None = None
    batch_size: int = 8
    seed: int = 0
    dtype: str = "fp32"
    cache_dir: str = str(DEFAULT_CACHE)

    def metric_list(self) -> list[str]:
        chosen = [m.strip() for m in self.metrics.split(",") if m.strip()]
        if unknown := [m for m in chosen if m not in METRICS]:
            raise UserError(f"unknown --metrics {unknown}; expected a comma list of {', '.join(METRICS)}")
        if chosen and ("fid" in chosen or "pr" in chosen) and not self.coco:
            raise UserError("--metrics fid/pr need reference images: pass --coco DIR")
        return chosen


def load_prompt_list(cfg: EvalConfig) -> tuple[list[str], str]:
    if cfg.prompts:
        prompts = read_prompt_file(Path(cfg.prompts))[: cfg.num_images]
        return prompts, str(cfg.prompts)
    if not cfg.coco:
        raise UserError("pass --coco DIR (COCO-2014 captions) or --prompts FILE")
    return choose_prompts(Path(cfg.coco), cfg.num_images), f"{cfg.coco}/annotations/captions_val2014.json"


def build_evaluators(cfg: EvalConfig, metrics: list[str], device) -> dict[str, Any]:
    """The extractors the chosen metrics need, from local files (see evaluation/extractors.py)."""
    from evaluation.extractors import ClipScorer, InceptionFeatures, VGG16Features

    if cfg.evaluator == "digits":  # the digits world: one small classifier stands in for all three
        from digits.classifier import DigitFeatures, DigitScorer

        chosen = {"fid": DigitFeatures, "clip": DigitScorer, "pr": DigitFeatures}
        return {m: chosen[m](cfg.digits_classifier) for m in metrics if m in chosen}
    if cfg.evaluator != "standard":
        raise UserError(f"unknown --evaluator {cfg.evaluator!r}; expected standard or digits")
    evaluators = {}
    if "fid" in metrics:
        evaluators["fid"] = InceptionFeatures(cfg.inception_weights, device)
    if "clip" in metrics:
        evaluators["clip"] = ClipScorer(cfg.clip_model, cfg.clip_weights, device)
    if "pr" in metrics:
        evaluators["pr"] = VGG16Features(cfg.vgg_weights, device)
    return evaluators


def score(images: list[np.ndarray], prompts: list[str], evaluators: dict, coco: Path | None, cache: Path,
          metrics: list[str] = ()) -> dict:
    """Every chosen metric on prepared (256 px) generated images."""
    result: dict[str, Any] = {}
    if "blue" in metrics:
        result["blue_fraction"] = blue_fraction(images)
    refs = reference_images(coco) if coco else []
    if "fid" in evaluators:
        fake = evaluators["fid"].features(images)
        result["fid"] = frechet_distance(*reference_statistics(evaluators["fid"], refs, cache), *feature_statistics(fake))
    if "clip" in evaluators:
        result["clip_score"] = float(np.mean(evaluators["clip"].scores(images, prompts)))
    if "pr" in evaluators:
        real = reference_features(evaluators["pr"], reference_subset(refs, len(images)), cache)
        fake = evaluators["pr"].features(images)
        count = min(len(real), len(fake))
        result["precision"], result["recall"] = precision_recall(real[:count], fake[:count], k=3)
    return result


def protocol(cfg: EvalConfig, prompts: list[str], source: str, evaluators: dict) -> dict:
    return {
        "num_images": len(prompts), "prompt_source": source, "prompts_sha256": prompts_sha256(prompts),
        "eval_size": 256, "resize": "centre crop + PIL LANCZOS", "fid_mode": "clean (clean-fid)",
        "num_inference_steps": cfg.num_inference_steps, "seed": cfg.seed,
        "dtype": cfg.dtype, "evaluator": cfg.evaluator, "clip_text_prefix": "A photo depicts ", "pr_k": 3,
        "weights_sha256": {name: e.checksum for name, e in evaluators.items()},
    }


def evaluate_spec(spec, prompts: list[str], source: str, out: Path, cfg: EvalConfig, evaluators: dict,
                  state: PartialState) -> dict | None:
    """Render one model's images into OUT/images (all ranks), then score them (rank 0; None elsewhere)."""
    renderer = Renderer(spec, cfg.num_inference_steps, cfg.dtype, state.device, cfg.clip_model, cfg.clip_weights,
                        resolution=cfg.resolution)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_prompts(out / "prompts.json", prompts, source)
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
        return parse_model_arg(cfg.model)
    return describe_model(cfg.model, cfg.guidance_scale, cfg.classifier_guidance, cfg.sampler)


def run_coco30k(cfg: EvalConfig) -> dict | None:
    """Render, then (rank 0) score and report. Returns metrics.json's content on rank 0."""
    metrics = cfg.metric_list()
    spec = model_spec(cfg)
    prompts, source = load_prompt_list(cfg)
    out = Path(cfg.out)
    state = PartialState(cpu=not torch.cuda.is_available())
    evaluators = build_evaluators(cfg, metrics, state.device) if state.is_main_process else {}  # fail early
    record = evaluate_spec(spec, prompts, source, out, cfg, evaluators, state)
    if record is None:
        return None
    record["protocol"] = {**protocol(cfg, prompts, source, evaluators), "resolution": record["resolution"],
                          "num_inference_steps": record["num_inference_steps"]}
    record["config"] = asdict(cfg)
    (out / "metrics.json").write_text(json.dumps(record, indent=2))
    write_report(out, record, prompts)
    return record


def prepare_256_array(array: np.ndarray) -> np.ndarray:
    from PIL import Image

    return prepare_256(Image.fromarray(array))


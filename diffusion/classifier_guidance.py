"""Classifier guidance losses and the gradient the shard builder stores (feed-forward guidance distillation).

A guidance loss takes decoded images, nominally in [0, 1] (B x 3 x H x W), and their captions and returns a
per-sample loss to minimise (B,). `eps_and_grad` gives the teacher's conditional eps and d(loss)/d z_t, taken
through the predicted x0 = (z_t - sigma_t eps) / a_t and the VAE decoder, so that eps + gamma c_t grad
(`diffusion.guidance`) steers toward lower loss.

The gradient path has no clamp: the loss sees decode(x0_hat) / 2 + 0.5 as it is, a little outside [0, 1]
where the decoder overshoots, as in Whitaker's notebook, and `grad` is the exact gradient of the loss computed
(the seed's Algorithm 2: "backward prop. of the classifier loss" with respect to z_t). A clamp to [0, 1] would
zero the gradient of every pixel outside it, the ones furthest from any target, and make the stored gradient
that of another function than the one whose value a finite difference sees.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from diffusion.errors import UserError
from diffusion.files import sha256_file
from diffusion.teacher import Teacher

GuidanceLoss = Callable[[torch.Tensor, list[str]], torch.Tensor]
BLUE_TARGET = 0.9  # the blue channel's target, images in [0, 1] (Whitaker 2022)
GRADIENT_IMAGES = "decoded/2+0.5, unclamped"  # what the loss sees on the gradient path (dataset.json)


def blue_tone_loss(images: torch.Tensor, captions: list[str] | None = None) -> torch.Tensor:
    """Blue loss guidance (Whitaker 2022, the seed's 'blue' example): per sample, the mean over pixels of
    |B - 0.9|, B the blue channel of images in [0, 1]. Red and green are free."""
    return (images[:, 2] - BLUE_TARGET).abs().mean(dim=(1, 2))


def load_open_clip(model: str, weights: str | Path | None, device: torch.device | str = "cpu"):
    """(model, tokenizer, model name) from a local weights file; `model` is an open_clip name or a config .json."""
    import open_clip

    if model.endswith(".json"):
        if not Path(model).is_file():
            raise UserError(f"--clip-model config {model} does not exist")
        open_clip.add_model_config(model)
        model = Path(model).stem
    if model not in open_clip.list_models():
        raise UserError(f"unknown open_clip model {model!r}; see open_clip.list_models() or pass a config .json")
    if weights is None or not Path(weights).is_file():
        raise UserError(
            f"CLIP weights file {weights} not found; pass --clip-weights FILE (for ViT-g-14, the "
            "laion2b_s12b_b42k open_clip_pytorch_model.bin from the hub, downloaded once)"
        )
    network = open_clip.create_model(model, pretrained=str(weights), device=device).eval().requires_grad_(False)
    return network, open_clip.get_tokenizer(model), model


class ClipLoss:
    """Minus the cosine similarity between the open_clip embeddings of an image and its caption."""

    def __init__(self, model: str, weights: str | Path | None, device: torch.device | str = "cpu"):
        self.model, self.tokenizer, model = load_open_clip(model, weights, device)
        cfg = self.model.visual.preprocess_cfg
        self.size = self.model.visual.image_size
        self.mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1)
        self.params = {"model": model, "weights_sha256": sha256_file(Path(weights))}

    def __call__(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        size = self.size if isinstance(self.size, (tuple, list)) else (self.size, self.size)
        pixels = F.interpolate(images.float(), size=tuple(size), mode="bicubic", align_corners=False, antialias=True)
        pixels = (pixels - self.mean) / self.std
        image_features = F.normalize(self.model.encode_image(pixels), dim=-1)
        with torch.no_grad():
            text_features = F.normalize(self.model.encode_text(self.tokenizer(captions).to(pixels.device)), dim=-1)
        return -(image_features * text_features).sum(dim=-1)


def load_user_loss(spec: str) -> GuidanceLoss:
    """Import MODULE:FUNCTION; the function maps (images in [0, 1], captions) to a per-sample loss."""
    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise UserError(f"cannot load guidance {spec!r}: {error}") from None
    if not callable(function):
        raise UserError(f"guidance {spec!r} is not callable")
    return function


@dataclass
class GuidanceSpec:
    """What the builder computes: kind 'cfg' (no loss) or 'classifier' (with a loss), and what to record."""

    name: str
    kind: str
    loss: GuidanceLoss | None = None
    params: dict[str, Any] = field(default_factory=dict)


def resolve_guidance(name: str, *, clip_model: str = "ViT-g-14", clip_weights=None, device="cpu") -> GuidanceSpec:
    if name == "cfg":
        return GuidanceSpec("cfg", "cfg")
    if name == "blue":
        return GuidanceSpec("blue", "classifier", blue_tone_loss, {"loss": "mean |B - 0.9|", "blue": BLUE_TARGET})
    if name == "clip":
        clip = ClipLoss(clip_model, clip_weights, device)
        return GuidanceSpec("clip", "classifier", clip, clip.params)
    if ":" in name:
        return GuidanceSpec(name, "classifier", load_user_loss(name), {"function": name})
    raise UserError(f"unknown guidance {name!r}: expected cfg, clip, blue or MODULE:FUNCTION")


def decoded_images(teacher: Teacher, x0: torch.Tensor) -> torch.Tensor:
    """What a guidance loss sees: decode(x0) / 2 + 0.5 in float32, not clamped (differentiable)."""
    return teacher.decode(x0).float() / 2 + 0.5


def eps_and_grad(
    teacher: Teacher, z_t: torch.Tensor, t: torch.Tensor, text_embeddings: torch.Tensor, captions: list[str],
    loss_fn: GuidanceLoss,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, d loss / d z_t) with the loss on decode(x0_hat(z_t)) / 2 + 0.5, unclamped (module docstring);
    per-sample independent."""
    with torch.enable_grad():
        z_t = z_t.detach().float().requires_grad_(True)
        eps = teacher.eps(z_t, t, text_embeddings)
        x0 = teacher.schedule.eps_to_x0(z_t, eps, t)
        images = decoded_images(teacher, x0)
        loss = loss_fn(images, captions)
        if loss.shape != (z_t.shape[0],):
            raise UserError(f"guidance loss must return one value per sample, shape ({z_t.shape[0]},); got {tuple(loss.shape)}")
        (grad,) = torch.autograd.grad(loss.sum(), z_t)
    return eps.detach(), grad

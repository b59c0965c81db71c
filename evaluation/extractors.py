"""Feature extractors behind two small interfaces, each loaded from a local file; nothing downloads.

`FeatureExtractor.features(images) -> (N, D)` takes uint8 HxWx3 arrays already centre-cropped and resized to
256 with PIL LANCZOS (`evaluation.images.prepare_256`), as published FID numbers are made.
`TextImageScorer.scores(images, captions) -> (N,)` gives one image-text score per pair.
Inception (clean-fid), VGG16 fc2 and open_clip implement them; the digits world plugs in its own.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion.errors import UserError
from diffusion.files import sha256_file
from evaluation.metrics import paired_cosines

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
VGG_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/vgg16.pt"
CLIP_PREFIX = "A photo depicts "


class FeatureExtractor(Protocol):
    name: str
    checksum: str  # sha256 of the weights: part of every cache key and of the metrics' protocol

    def features(self, images: list[np.ndarray]) -> np.ndarray: ...


class TextImageScorer(Protocol):
    name: str
    checksum: str

    def scores(self, images: list[np.ndarray], captions: list[str]) -> np.ndarray: ...


def require_file(path: str | Path | None, flag: str, what: str, how: str) -> Path:
    if path is None or not Path(path).is_file():
        raise UserError(f"{what} not found at {path}: pass {flag} FILE; {how}")
    return Path(path)


class InceptionFeatures:
    """clean-fid's `clean` mode: PIL bicubic resize to 299 in float, then the TorchScript Inception's pool3."""

    name = "inception"

    def __init__(self, weights: str | Path | None, device: torch.device | str = "cpu", batch_size: int = 64):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        path = require_file(weights, "--inception-weights", "Inception weights (inception-2015-12-05.pt)",
                            f"download it once from {INCEPTION_URL}")
        self.checksum = sha256_file(path)
        with tempfile.TemporaryDirectory() as folder:  # clean-fid wants the file under its own name
            (Path(folder) / "inception-2015-12-05.pt").symlink_to(path.resolve())
            self.model = InceptionV3W(folder, download=False, resize_inside=False).to(device).eval()
        self.resize, self.device, self.batch_size = build_resizer("clean"), torch.device(device), batch_size

    @torch.no_grad()
    def features(self, images: list[np.ndarray]) -> np.ndarray:
        from cleanfid.fid import get_batch_features

        out = []
        for start in range(0, len(images), self.batch_size):
            batch = np.stack([self.resize(image) for image in images[start:start + self.batch_size]])
            out.append(get_batch_features(torch.from_numpy(batch).permute(0, 3, 1, 2), self.model, self.device))
        return np.concatenate(out)


class VGG16Features:
    """VGG16 fc2 features for precision/recall: NVlabs' TorchScript `vgg16.pt` (uint8 images in, resized
    inside, as in StyleGAN2-ADA's metrics), or torchvision's `vgg16-397923af.pth` state dict (fc2 after ReLU)."""

    name = "vgg16-fc2"

    def __init__(self, weights: str | Path | None, device: torch.device | str = "cpu", batch_size: int = 64):
        path = require_file(weights, "--vgg-weights", "VGG16 weights (vgg16.pt)", f"download it once from {VGG_URL}")
        self.checksum, self.device, self.batch_size = sha256_file(path), torch.device(device), batch_size
        self.torchscript = path.suffix != ".pth"
        if self.torchscript:
            self.model = torch.jit.load(str(path), map_location=self.device).eval()
        else:
            import torchvision

            vgg = torchvision.models.vgg16()
            vgg.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            vgg.classifier = vgg.classifier[:5]  # fc1, ReLU, dropout, fc2, ReLU
            self.model = vgg.to(self.device).eval()

    @torch.no_grad()
    def _batch(self, images: list[np.ndarray]) -> torch.Tensor:
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(self.device)
        if self.torchscript:
            return self.model(pixels, return_features=True)
        x = F.interpolate(pixels.float() / 255, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor([0.485, 0.456, 0.406], device=self.device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=self.device).view(1, 3, 1, 1)
        return self.model((x - mean) / std)

    def features(self, images: list[np.ndarray]) -> np.ndarray:
        batches = [self._batch(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return torch.cat(batches).float().cpu().numpy()


class ClipScorer:
    """open_clip cosine between the image (256 px, then the model's own preprocessing) and
    "A photo depicts " + caption."""

    name = "clip"

    def __init__(self, model: str, weights: str | Path | None, device: torch.device | str = "cpu",
                 batch_size: int = 64):
        import open_clip

        from diffusion.classifier_guidance import load_open_clip

        self.model, self.tokenizer, self.model_name = load_open_clip(model, weights, device)
        self.preprocess = open_clip.image_transform(self.model.visual.image_size, is_train=False,
                                                    mean=self.model.visual.preprocess_cfg["mean"],
                                                    std=self.model.visual.preprocess_cfg["std"])
        self.checksum, self.device, self.batch_size = sha256_file(Path(weights)), torch.device(device), batch_size

    @torch.no_grad()
    def embeddings(self, images: list[np.ndarray], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        image_out, text_out = [], []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(Image.fromarray(a)) for a in images[start:start + self.batch_size]])
            tokens = self.tokenizer([CLIP_PREFIX + c for c in captions[start:start + self.batch_size]])
            image_out.append(self.model.encode_image(pixels.to(self.device)).float().cpu())
            text_out.append(self.model.encode_text(tokens.to(self.device)).float().cpu())
        return torch.cat(image_out).numpy(), torch.cat(text_out).numpy()

    def scores(self, images: list[np.ndarray], captions: list[str]) -> np.ndarray:
        return paired_cosines(*self.embeddings(images, captions))

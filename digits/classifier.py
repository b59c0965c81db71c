"""The digits world's evaluators: a small CNN trained on the train split. Its penultimate features stand in for
Inception (digit-FID, precision/recall) and its probability of the prompted digit for CLIP (digit-CLIP), behind
the same interfaces as evaluation/extractors.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffusion.errors import UserError
from diffusion.files import sha256_file
from digits.data import digit_in

SIDE = 32
WEIGHTS, CONFIG = "digit_classifier.safetensors", "digit_classifier.json"


class DigitNet(torch.nn.Module):
    """Three conv blocks (32 -> 16 -> 8 -> 4 px), a 128-d feature layer, 10 logits."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        )
        self.features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 128), torch.nn.ReLU())
        self.head = torch.nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of grayscale images in [0, 1], N x 1 x 32 x 32."""
        features = self.features(self.convs(x))
        return features, self.head(features)


def to_input(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 images of any size -> N x 1 x 32 x 32 grayscale in [0, 1] (PIL BOX downsampling)."""
    small = [np.asarray(Image.fromarray(a).convert("L").resize((SIDE, SIDE), Image.BOX)) for a in images]
    return torch.from_numpy(np.stack(small)).float().unsqueeze(1) / 255.0


def _shift(batch: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    dx, dy = (int(v) for v in torch.randint(-pixels, pixels + 1, (2,), generator=generator))
    return torch.roll(batch, shifts=(dy, dx), dims=(2, 3))


def train_classifier(train_images: list[np.ndarray], train_labels, eval_images, eval_labels, out: Path,
                     epochs: int = 15, seed: int = 0) -> dict:
    """Adam on cross-entropy with +-2 px shifts; saves weights + a JSON with the held-out accuracy."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net, x, y = DigitNet(), to_input(train_images), torch.as_tensor(np.asarray(train_labels))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in tqdm(range(epochs), desc="digits classifier", unit="epoch"):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            index = order[start:start + 64]
            loss = F.cross_entropy(net(_shift(x[index], generator))[1], y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        predictions = net(to_input(eval_images))[1].argmax(dim=1).numpy()
    accuracy = float((predictions == np.asarray(eval_labels)).mean())
    out.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(out / WEIGHTS))
    info = {"heldout_accuracy": accuracy, "heldout_images": len(eval_images), "train_images": len(train_images),
            "epochs": epochs, "input": f"grayscale {SIDE}x{SIDE} in [0, 1], PIL BOX downsampling"}
    (out / CONFIG).write_text(json.dumps(info, indent=2))
    return info


def load_classifier(folder: str | Path | None) -> tuple[DigitNet, str]:
    path = Path(folder) / WEIGHTS if folder else None
    if path is None or not path.is_file():
        raise UserError(f"digit classifier not found at {path}: pass --digits-classifier DIR (built by `make demo` "
                        "in runs/demo/world/classifier)")
    net = DigitNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval(), sha256_file(path)


class DigitFeatures:
    """The classifier's 128-d penultimate features: the digits world's Inception (digit-FID) and VGG (PR)."""

    name = "digit-features"

    def __init__(self, folder, batch_size: int = 256):
        self.net, self.checksum = load_classifier(folder)
        self.batch_size = batch_size

    @torch.no_grad()
    def features(self, images: list[np.ndarray]) -> np.ndarray:
        chunks = [self.net(to_input(images[i:i + self.batch_size]))[0] for i in range(0, len(images), self.batch_size)]
        return torch.cat(chunks).numpy()

    @torch.no_grad()
    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        chunks = [self.net(to_input(images[i:i + self.batch_size]))[1] for i in range(0, len(images), self.batch_size)]
        return torch.cat(chunks).softmax(dim=1).numpy()


class DigitScorer(DigitFeatures):
    """digit-CLIP: the classifier's probability of the digit the caption names."""

    name = "digit-clip"

    def scores(self, images: list[np.ndarray], captions: list[str]) -> np.ndarray:
        digits = [digit_in(c) for c in captions]
        if None in digits:
            raise UserError(f"digit-CLIP needs captions that name a digit; got {captions[digits.index(None)]!r}")
        return self.probabilities(images)[np.arange(len(images)), digits]

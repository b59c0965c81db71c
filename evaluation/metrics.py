"""Metrics as pure functions on features (extractors live in evaluation/extractors.py).

- FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to two feature sets; the matrix square
  root is clean-fid's `frechet_distance`.
- Precision and recall (Kynkaanniemi et al. 2019): a sample is "covered" when it lies inside the k-NN ball of
  some sample of the other set; distances are computed in row blocks so memory stays bounded.
- CLIP score: the mean cosine between paired image and text embeddings, raw (about 0.30 for SD 1.5), not x100.
- Colour fraction (blue, red): the share of pixels whose channel of that colour exceeds both others by a margin
  (how far blue-tone guidance has taken the images; how much of a red-ink style a model keeps).
"""

from __future__ import annotations

import numpy as np
import torch
from cleanfid.fid import frechet_distance as _cleanfid_frechet_distance


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64, sigma with the N - 1 normalisation as clean-fid and pytorch-fid use."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))."""
    return float(_cleanfid_frechet_distance(mu1, sigma1, mu2, sigma2))


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


def _kth_neighbour_radii(features: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (itself excluded)."""
    radii = []
    for start in range(0, len(features), block):
        distances = torch.cdist(features[start:start + block], features)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # the 1st is the row itself, at distance 0
    return torch.cat(radii)


def _covered(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """Whether each query lies within radius of at least one support point."""
    inside = []
    for start in range(0, len(queries), block):
        distances = torch.cdist(queries[start:start + block], support)
        inside.append((distances <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Improved precision (fake inside the real manifold) and recall (real inside the fake manifold)."""
    real_t = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    fake_t = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    precision = _covered(fake_t, real_t, _kth_neighbour_radii(real_t, k, block), block).double().mean().item()
    recall = _covered(real_t, fake_t, _kth_neighbour_radii(fake_t, k, block), block).double().mean().item()
    return precision, recall


def paired_cosines(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """cos(image_i, text_i) for each pair."""
    image = np.asarray(image_features, dtype=np.float64)
    text = np.asarray(text_features, dtype=np.float64)
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    return (image * text).sum(axis=1)


def paired_mse(images: list[np.ndarray], references: list[np.ndarray]) -> float:
    """Mean squared difference, in [0, 1] pixel units, between image i and reference i (same prompt and seed):
    how closely a few-step sampler reproduces a many-step one."""
    a = np.stack(images).astype(np.float64) / 255.0
    b = np.stack(references).astype(np.float64) / 255.0
    return float(((a - b) ** 2).mean())


def clip_score(image_features: np.ndarray, text_features: np.ndarray) -> float:
    """Mean over pairs of cos(image_i, text_i)."""
    return float(paired_cosines(image_features, text_features).mean())


COLOUR_CHANNELS = {"red": 0, "green": 1, "blue": 2}


def colour_fraction(images: list[np.ndarray], colour: str, margin: int = 25) -> float:
    """Mean over images of the fraction of pixels whose `colour` channel exceeds both others by more than margin
    (uint8 HxWx3 images; colour: red, green or blue)."""
    stack = np.stack(images).astype(np.int16)
    channel = COLOUR_CHANNELS[colour]
    first, second = (stack[..., c] for c in COLOUR_CHANNELS.values() if c != channel)
    return float((stack[..., channel] > np.maximum(first, second) + margin).mean())


def blue_fraction(images: list[np.ndarray], margin: int = 25) -> float:
    """colour_fraction of blue: B > max(R, G) + margin."""
    return colour_fraction(images, "blue", margin)

"""Reference-side features, computed once and cached in an npz keyed by everything they depend on:
extractor and its weights' checksum, evaluation size, clean-fid mode, and the checksum of the image list."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from evaluation.coco import EVAL_SIZE, load_prepared
from evaluation.metrics import feature_statistics

CHUNK = 256


def image_list_sha256(paths: list[Path]) -> str:
    """Names and sizes of the reference files (cheap; a changed or added image changes it)."""
    listing = [f"{p.name}:{p.stat().st_size}" for p in paths]
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()


def _cache_path(cache_dir: Path, extractor, what: str, paths: list[Path]) -> Path:
    key = {"extractor": extractor.name, "weights_sha256": extractor.checksum, "size": EVAL_SIZE, "mode": "clean",
           "what": what, "images_sha256": image_list_sha256(paths)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{extractor.name}-{what}-{digest}.npz"


def extract(extractor, paths: list[Path], desc: str) -> np.ndarray:
    chunks = []
    with tqdm(total=len(paths), desc=desc, unit="img") as progress:
        for start in range(0, len(paths), CHUNK):
            chunks.append(extractor.features(load_prepared(paths[start:start + CHUNK])))
            progress.update(min(CHUNK, len(paths) - start))
    return np.concatenate(chunks)


def reference_statistics(extractor, paths: list[Path], cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the extractor's features over all reference images, cached."""
    cache = _cache_path(cache_dir, extractor, "stats", paths)
    if cache.is_file():
        stored = np.load(cache)
        return stored["mu"], stored["sigma"]
    mu, sigma = feature_statistics(extract(extractor, paths, f"reference {extractor.name}"))
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, mu=mu, sigma=sigma)
    return mu, sigma


def reference_subset(paths: list[Path], count: int, seed: int = 0) -> list[Path]:
    """`count` reference images chosen with a fixed seed (precision/recall wants equal numbers)."""
    return sorted(random.Random(seed).sample(paths, min(count, len(paths))))


def reference_features(extractor, paths: list[Path], cache_dir: Path) -> np.ndarray:
    cache = _cache_path(cache_dir, extractor, "features", paths)
    if cache.is_file():
        return np.load(cache)["features"]
    features = extract(extractor, paths, f"reference {extractor.name}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, features=features)
    return features

"""Metrics on synthetic features with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from cleanfid.fid import fid_from_feats

from evaluation.metrics import clip_score, fid_from_features, frechet_distance, precision_recall


def gaussian(n, dim=8, mean=0.0, seed=0):
    return np.random.default_rng(seed).normal(mean, 1.0, size=(n, dim))


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric():
    a, b = gaussian(500), gaussian(500, mean=0.5, seed=1)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid_from_features(a, b) == pytest.approx(fid_from_features(b, a), rel=1e-6)


def test_fid_equals_clean_fid_and_the_closed_form():
    a, b = gaussian(400, seed=2), gaussian(400, mean=1.0, seed=3)
    assert fid_from_features(a, b) == pytest.approx(fid_from_feats(a, b), rel=1e-9)
    # two Gaussians with identity covariance: only the mean term, ||mu1 - mu2||^2
    eye = np.eye(4)
    assert frechet_distance(np.zeros(4), eye, np.full(4, 2.0), eye) == pytest.approx(16.0)


def brute_force_precision_recall(real, fake, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=2)
        return np.sort(d, axis=1)[:, k]

    def covered(q, s, r):
        d = np.linalg.norm(q[:, None] - s[None], axis=2)
        return (d <= r[None]).any(axis=1).mean()

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_equals_brute_force_with_small_blocks():
    real, fake = gaussian(120, dim=5, seed=4), gaussian(90, dim=5, mean=0.7, seed=5)
    got = precision_recall(real, fake, k=3, block=16)
    assert got == pytest.approx(brute_force_precision_recall(real, fake, 3))
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0


def test_precision_recall_identical_and_far_apart():
    a = gaussian(100, seed=6)
    assert precision_recall(a, a.copy(), k=3) == (1.0, 1.0)
    assert precision_recall(a, gaussian(100, mean=100.0, seed=7), k=3) == (0.0, 0.0)


def test_clip_score_is_the_raw_mean_cosine():
    image = np.array([[1.0, 0.0], [0.0, 2.0]])
    text = np.array([[1.0, 1.0], [0.0, 1.0]])
    assert clip_score(image, text) == pytest.approx((1 / np.sqrt(2) + 1.0) / 2)


def test_blue_fraction_by_hand():
    from evaluation.metrics import blue_fraction

    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[0, 0] = (0, 0, 200)  # blue
    image[0, 1] = (180, 0, 200)  # blue beats red by 20 < 25: not blue
    image[1, 0] = (255, 255, 255)  # white
    assert blue_fraction([image]) == 0.25
    assert blue_fraction([image, np.zeros_like(image)]) == 0.125


def test_paired_mse_in_unit_pixels():
    from evaluation.metrics import paired_mse

    black, white = np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 255, np.uint8)
    grey = np.full((2, 2, 3), 51, np.uint8)  # 0.2
    assert paired_mse([black, white], [black, white]) == 0.0
    assert paired_mse([black, black], [white, grey]) == pytest.approx((1.0 + 0.04) / 2)

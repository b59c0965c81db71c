"""The red metric (colour_fraction of red) and the red-ink images the digits variant is fine-tuned on."""

from __future__ import annotations

import random

import numpy as np


def test_red_fraction_by_hand_and_in_score():
    from evaluation.coco30k import score
    from evaluation.metrics import colour_fraction

    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[0, 0] = (200, 0, 0)  # red
    image[0, 1] = (200, 180, 0)  # red beats green by 20 < 25: not red
    image[1, 0] = (0, 0, 200)  # blue
    assert colour_fraction([image], "red") == 0.25 and colour_fraction([image], "blue") == 0.25
    assert colour_fraction([image, np.zeros_like(image)], "red") == 0.125
    assert score([image], ["a"], {}, None, None, ["red", "blue"]) == {"red_fraction": 0.25, "blue_fraction": 0.25}


def test_red_ink_images_are_red_on_the_usual_backgrounds():
    from digits.data import load_digits
    from digits.variant import red_ink_image
    from evaluation.metrics import colour_fraction

    images, _ = load_digits()
    rng = random.Random(0)
    reds = [red_ink_image(images[i], rng) for i in range(20)]
    assert reds[0].shape == (32, 32, 3) and reds[0].dtype == np.uint8
    assert colour_fraction(reds, "red") > 0.25  # the ink: about a third of each image
    for red in (np.asarray(r, dtype=np.int16) for r in reds):  # full ink: red ~ 240, green and blue ~ 25
        assert (red[..., 0] - np.maximum(red[..., 1], red[..., 2])).max() > 150

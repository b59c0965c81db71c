"""User guidance functions (MODULE:FUNCTION) for the tests."""

import torch


def redness_loss(images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Minimise: distance of the red channel from 1."""
    return (1 - images[:, 0]).mean(dim=(1, 2))


def scalar_loss(images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    return images.mean()

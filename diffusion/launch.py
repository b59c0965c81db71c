"""What every stage checks about how it was launched (torchrun / accelerate launch, or a plain process)."""

from __future__ import annotations

import os

from diffusion.errors import UserError


def check_world_size(num_processes: int) -> None:
    """accelerate must see as many processes as the launcher started, else each would think it is alone."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if num_processes != expected:
        raise UserError(f"accelerate sees {num_processes} processes but WORLD_SIZE is {expected}")

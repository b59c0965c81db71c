"""What every stage checks about how it was launched (torchrun / accelerate launch, or a plain process)."""

from __future__ import annotations

import os

from diffusion.errors import UserError

CPU_PROCESSES = "for N processes on CPUs use `torchrun --nproc_per_node N -m <stage>.cli ...`"


def check_world_size(num_processes: int) -> None:
    """accelerate must see as many processes as the launcher started, else each would think it is alone; and
    `accelerate launch --num_processes N --cpu` (N > 1), which starts one process only, is refused: it sets
    MASTER_PORT (for N > 1) and ACCELERATE_USE_CPU but no WORLD_SIZE."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if num_processes != expected:
        raise UserError(f"accelerate sees {num_processes} processes but WORLD_SIZE is {expected}")
    cpu_launch = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cpu_launch and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        raise UserError("`accelerate launch --num_processes N --cpu` starts one process, not N (accelerate's "
                        f"behaviour); {CPU_PROCESSES}")

"""The optimisers of every loop, chosen in one place: Adam/AdamW with torch's fused kernel where it has one for
the parameters' device and dtype (CUDA, CPU, MPS, XPU in the torch this project installs), else the
multi-tensor (foreach) kernel. Both compute the same update; fused is a few times faster per step (see
benchmarks/README.md), foreach is what torch itself picks on CUDA when nothing is asked.

`clear_gradients` is the one place a loop ends a step: gradients set to None (`--free-grad-buffers`, the
default) or zeroed in place (`--keep-grad-buffers`: no step frees and reallocates one tensor per
parameter). Kept buffers cost an extra pass (zero, then the backward adds instead of handing its result
over) and hold every network's gradients all the time: in sid-lsg the idle network's too. Measured on the
CPU (benchmarks/README.md), keeping was level to 1.03x the time of a sid-lsg iteration and 1.11x its peak
memory, and 1.04x the time of a bare training step: so freeing is the default. Both give the same weights
bit for bit (tested) as long as every parameter gets a gradient in every step, as every UNet weight does
(with kept buffers, one that got none would be stepped on a zero gradient instead of skipped).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices


def fused_supported(parameters: list[torch.Tensor], device: torch.device) -> bool:
    """torch's own rule (which Adam only applies at its first step): floating point parameters, on a device
    type with the kernel. `device` is where they will train (the optimiser is built before accelerate moves
    the model)."""
    return device.type in _get_fused_kernels_supported_devices() and all(p.is_floating_point() for p in parameters)


def make_adam(parameters: Iterable[torch.nn.Parameter], *, decoupled: bool, lr: float, betas: tuple[float, float],
              eps: float, weight_decay: float = 0.0, device: torch.device | None = None) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or Adam over `parameters`, fused if torch can on `device` (default: the
    parameters' own), else foreach."""
    parameters = list(parameters)
    device = device or (parameters[0].device if parameters else torch.device("cpu"))
    optimizer_class = torch.optim.AdamW if decoupled else torch.optim.Adam
    chosen = {"fused": True} if fused_supported(parameters, torch.device(device)) else {"foreach": True}
    optimizer = optimizer_class(parameters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **chosen)
    optimizer.register_load_state_dict_pre_hook(_keep_kernel)
    return optimizer


def _keep_kernel(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """A saved state brings its param groups' kernel flags along: a checkpoint from before the fused kernel
    (foreach False, fused None) would turn it off for the rest of the run. The kernel is this optimiser's, and
    it is set before torch loads the state, so that torch also puts each `step` where the fused kernel wants it
    (float32 on the parameter's device; a for-loop optimiser keeps it on the CPU)."""
    groups = [{**group, "fused": optimizer.defaults["fused"], "foreach": optimizer.defaults["foreach"]}
              for group in state_dict["param_groups"]]
    return {**state_dict, "param_groups": groups}


def kernel(optimizer: torch.optim.Optimizer) -> str:
    """Which kernel the optimiser's steps run: fused, foreach or for-loop."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    for name in ("fused", "foreach"):
        if all(group.get(name) for group in optimizer.param_groups):
            return name
    return "for-loop"


def clear_gradients(optimizer: torch.optim.Optimizer, keep_buffers: bool) -> None:
    """End of a step: zero the gradients in place (keep_buffers) or free them."""
    optimizer.zero_grad(set_to_none=not keep_buffers)

"""FSDP2 (torch.distributed.fsdp.fully_shard, through accelerate) for the full students of cfg-distill,
classifier-distill and w-distill: each process holds a shard of the student's weights, gradients, AdamW
state and EMA instead of a whole copy (docs/trainer.md, "FSDP").

Turned on by `--fsdp` (this module's plugin) or by `accelerate launch` with an FSDP config (accelerate sets
ACCELERATE_USE_FSDP and FSDP_* in the environment; the plugin is then built from them). The UNet's
BasicTransformerBlock and ResnetBlock2D modules are each their own FSDP unit (all-gathered for their forward and
backward, resharded after), the rest (conv_in/out, time embedding, the transformers' proj_in/out and norms, up-
and downsamplers: about 9% of SD 1.5's UNet) is the root unit.

Checkpoints and exports are the same files a DDP run writes: every rank takes part in gathering the full state
dicts (the model's through torch.distributed.checkpoint.state_dict, the optimizer's and the EMA's tensor by
tensor), the main process writes them; on resume every rank reads the full files and keeps its shard. The EMA
is kept on the local shards (a DTensor per parameter, updated by the same foreach lerp) and gathered the same
way. The checkpoint parts below are what trainer.resume calls `collective`: their state_dict() and
load_state_dict() run on every rank, and state_dict() returns the full state on the main process, None
elsewhere.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from diffusion.errors import UserError
from trainer.config import fsdp_not_supported

# Each its own FSDP unit: 91% of the parameters of an SD 1.5-sized UNet in 38 units (the largest 49M
# parameters), each called once per forward; diffusers' `_no_split_modules` also names the up-block classes,
# which would only add a unit around already-wrapped children and their upsampler.
WRAPPED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")  # added by activation checkpointing / compile


def launched_with_fsdp() -> bool:
    """`accelerate launch` with an FSDP config (or --use_fsdp) sets ACCELERATE_USE_FSDP=true."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def wants_fsdp(cfg) -> bool:
    return bool(getattr(cfg, "fsdp", False)) or launched_with_fsdp()


def check_fsdp_supported(cfg) -> None:
    """What FSDP runs on, checked before any Accelerator is made: one UserError line otherwise."""
    method = getattr(cfg, "method", None)
    if (problem := fsdp_not_supported(method, cfg.lora is not None, getattr(cfg, "validate_every", 0))) is not None:
        raise UserError(problem)
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UserError("FSDP shards the student over processes: start 2 or more (`torchrun --nproc_per_node N -m "
                        "trainer.cli fit ...`, or `accelerate launch --config_file fsdp.yaml -m trainer.cli fit ...` "
                        "on GPUs)")
    if not getattr(cfg, "fsdp", False) and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError(f"the accelerate FSDP config asks for fsdp_version {os.environ.get('FSDP_VERSION', '1')}; "
                        "this trainer runs FSDP2: set fsdp_version: 2 (or pass --fsdp)")


def fsdp_plugin(cfg):
    """The FullyShardedDataParallelPlugin to give the Accelerator, or None for a DDP (or single-process) run.

    --fsdp: FSDP2, parameters resharded after each unit's forward (FULL_SHARD), WRAPPED_BLOCKS as units; any
    other FSDP_* setting in the environment (accelerate launch) still applies. Launched with an FSDP config
    alone: accelerate's settings, with WRAPPED_BLOCKS as units when the config names no wrap policy. Either way
    --mixed-precision bf16/fp16 computes the forward and backward in that dtype with float32 master weights and
    float32 gradient reduction (FSDP2's MixedPrecisionPolicy; accelerate's own default reduces in bf16/fp16)."""
    if not wants_fsdp(cfg):
        return None
    check_fsdp_supported(cfg)
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    mixed = None if precision is None else MixedPrecisionPolicy(param_dtype=precision, reduce_dtype=torch.float32)
    blocks = {"auto_wrap_policy": "transformer_based_wrap", "transformer_cls_names_to_wrap": list(WRAPPED_BLOCKS)}
    if getattr(cfg, "fsdp", False):
        return FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True, mixed_precision_policy=mixed,
                                              **blocks)
    return FullyShardedDataParallelPlugin(mixed_precision_policy=mixed,
                                          **({} if "FSDP_AUTO_WRAP_POLICY" in os.environ else blocks))


def enable_fsdp(accelerator, plugin) -> None:
    """Make sure the Accelerator shards with `plugin`. accelerate 1.16 turns FSDP on for GPU (and other
    accelerator) processes only: on CPUs (gloo) it keeps MULTI_CPU and drops the plugin without a word. There,
    this does what its AcceleratorState does for GPUs (the distributed type, the plugin), so `prepare`,
    `clip_grad_norm_` and `no_sync` take their FSDP2 paths: the same code as on GPUs, which is how the tests run
    FSDP on two CPU processes."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if not is_fsdp(accelerator):
        raise UserError(f"FSDP was asked for but accelerate runs {state.distributed_type} "
                        "(start 2 or more processes with torchrun or accelerate launch)")


def is_fsdp(accelerator) -> bool:
    """Whether `accelerator` shards its model with FSDP2 (then checkpoints and exports gather: sharded_parts,
    gathered_student)."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def drop_unreduced_gradients(model) -> None:
    """Forget the gradients of micro-batches run without sync (gradient accumulation): FSDP2 keeps them on its
    unsharded parameters until the last micro-batch's backward reduce-scatters them, where the optimizer's
    zero_grad does not reach. A step skipped for a non-finite loss calls this, so they do not leak into the
    next step (DDP accumulates into the parameters' .grad, which zero_grad clears)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        groups = groups if groups is not None else [g for g in [state._fsdp_param_group] if g is not None]
        for group in groups:
            for param in group.fsdp_params:
                param.unsharded_accumulated_grad = None
                if getattr(param, "_unsharded_param", None) is not None:
                    param._unsharded_param.grad = None


def canonical_name(name: str) -> str:
    """A parameter's name as the state dicts have it (no activation-checkpointing or compile wrappers)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def trainable_names(model) -> list[str]:
    """The names of trainer.student.trainable_parameters(model), in its order (the EMA's and AdamW's)."""
    return [canonical_name(n) for n, p in model.named_parameters() if p.requires_grad]


def full_tensor(tensor, keep: bool = True):
    """The whole of a (possibly sharded) tensor on the CPU; a DTensor is all-gathered: every rank calls this.
    keep=False (the ranks that write nothing): None, so they never hold more than one gathered tensor."""
    from torch.distributed.tensor import DTensor

    whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return whole.detach().cpu() if keep else None


def shard_like(full, like):
    """`full` sharded as `like` is (a DTensor: this rank's shard of the same placements); every rank holds the
    same `full`, so no data moves between them."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full.to(like.device)
    return distribute_tensor(full.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def full_state_dict(model) -> dict:
    """The model's full state dict (float32, on the CPU) on the main process, {} on the others; every rank calls
    it (one all-gather per parameter)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model, state: dict) -> None:
    """Load a full state dict, the same on every rank, into the sharded model: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def full_optimizer_state_dict(optimizer, keep: bool = True) -> dict:
    """The optimizer's state_dict() (torch's layout: states and param_groups by parameter index, as a DDP run
    saves it) with every sharded state tensor gathered whole onto the CPU; every rank calls it (keep=False: the
    tensors are None, see full_tensor).

    Not torch.distributed.checkpoint's get_optimizer_state_dict: that keys states by parameter name, takes a
    zero-lr step first when the optimizer has no state yet, and its loading twin turns the betas tuple into a
    list; AdamW's states are elementwise, sharded as their parameters are, so gathering them is all it takes."""
    from torch.utils._pytree import tree_map_only

    return tree_map_only(torch.Tensor, lambda tensor: full_tensor(tensor, keep), _inner(optimizer).state_dict())


def load_full_optimizer_state_dict(optimizer, state: dict) -> None:
    """Load a full optimizer state in torch's layout (full_optimizer_state_dict's, or a DDP run's), the same on
    every rank: each state tensor shaped like its (sharded) parameter keeps this rank's shard of it."""
    inner = _inner(optimizer)
    params = [p for group in inner.param_groups for p in group["params"]]

    def local(value, param):
        return shard_like(value, param) if isinstance(value, torch.Tensor) and value.shape == param.shape else value

    inner.load_state_dict({**state, "state": {i: {k: local(v, params[i]) for k, v in values.items()}
                                              for i, values in state["state"].items()}})


def _is_main() -> bool:
    from accelerate.state import PartialState

    return PartialState().is_main_process


class _Collective:
    """A checkpoint part whose state_dict() and load_state_dict() run on every rank (trainer.resume)."""

    collective = True
    weights = False  # True: saved as a module's weights (NAME.safetensors alone), else as a nested state


class ShardedModel(_Collective):
    """The sharded student as a checkpoint part: its full weights, saved as a DDP run saves its module."""

    weights = True

    def __init__(self, model):
        self.model = model

    def state_dict(self) -> dict | None:
        state = full_state_dict(self.model)
        return state if _is_main() else None

    def load_state_dict(self, state: dict) -> None:
        load_full_state_dict(self.model, state)

    def shapes(self) -> dict[str, list[int]]:
        """The full shape of every tensor of its state dict (what trainer.checkpoint.check_weights checks)."""
        return {canonical_name(k): list(v.shape) for k, v in self.model.state_dict().items()}


class ShardedOptimizer(_Collective):
    def __init__(self, optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict | None:
        main = _is_main()
        state = full_optimizer_state_dict(self.optimizer, keep=main)
        return state if main else None

    def load_state_dict(self, state: dict) -> None:
        load_full_optimizer_state_dict(self.optimizer, state)


class ShardedEMA(_Collective):
    """trainer.ema.WarmupEMA over the sharded parameters (its averages sharded alike): saved with its averages
    gathered, in the DDP layout (EMAModel.state_dict with full tensors)."""

    def __init__(self, ema):
        self.ema = ema

    def state_dict(self) -> dict | None:
        main = _is_main()
        state = self.ema.state_dict()
        averages = [full_tensor(p, keep=main) for p in state["shadow_params"]]
        return {**state, "shadow_params": averages} if main else None

    def load_state_dict(self, state: dict) -> None:
        averages = [shard_like(full, like) for full, like in zip(state["shadow_params"], self.ema.shadow_params)]
        self.ema.load_state_dict({**state, "shadow_params": averages})


def sharded_parts(parts: dict[str, Any], model) -> dict[str, Any]:
    """trainer.fit's checkpoint parts for a sharded `model`: the model, its optimizer and the EMA become
    collective parts that gather (and scatter) their full states; the rest (the LR schedule) stays as it is."""
    from trainer.ema import WarmupEMA

    def collective(part):
        if part is model:
            return ShardedModel(model)
        if isinstance(part, torch.optim.Optimizer):  # accelerate's AcceleratedOptimizer is one too
            return ShardedOptimizer(part)
        if isinstance(part, WarmupEMA):
            return ShardedEMA(part)
        return part

    return {name: None if part is None else collective(part) for name, part in parts.items()}


def gathered_student(model, ema=None):
    """For the export: on the main process, a plain (unsharded) copy of the student's class with the full
    weights, the EMA's averages in place of the trained ones when there is an EMA; None on the other ranks.
    Every rank calls it. The copy is built on the meta device and takes the gathered tensors as they are."""
    from torch.distributed.fsdp import FSDPModule

    main = _is_main()
    state = full_state_dict(model)
    if ema is not None:
        for name, average in zip(trainable_names(model), ema.shadow_params):
            average = full_tensor(average, keep=main)
            if main:
                state[name] = average
    if not main:
        return None
    plain_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = plain_class.from_config(model.config)
    plain.load_state_dict(state, assign=True)
    return plain.train(model.training)

"""FSDP2 (torch.distributed.fsdp.fully_shard, through accelerate) for the full students of every method and the
LoRA students of cfg-, classifier- and w-distill: each process holds a shard of the trained networks' weights
(a LoRA student's frozen base too), gradients, Adam states and EMA instead of a whole copy, and of the frozen
teacher UNet unless --fsdp-teacher replicate (docs/trainer.md, "FSDP").

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
elsewhere. Validation grids and exports sample from a gathered whole copy on the main process (`unsharded`).

Every loop calls these helpers whether it shards or not (`collective_parts`, `shard_frozen`, `unsharded`,
`load_whole`): without FSDP they hand their argument back, so no loop asks which it runs.
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
    if (problem := fsdp_not_supported(cfg.method, cfg.lora is not None)) is not None:
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
    """Whether `accelerator` shards its models with FSDP2 (then checkpoints and exports gather: collective_parts,
    unsharded)."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def is_sharded(module) -> bool:
    """Whether `module` is an FSDP2 module (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_frozen(accelerator, module, shard: bool = True):
    """A frozen network (progressive's round teacher, sid-lsg's teacher and EMA generator) sharded as the trained
    ones are (accelerate's FSDP2 preparation of a model without an optimizer), when FSDP runs and `shard`;
    otherwise `module` itself, on the accelerator's device."""
    if not (shard and is_fsdp(accelerator)):
        return module.to(accelerator.device)
    return accelerator.prepare(module)


def unsharded(module, device=None):
    """`module` itself when it is not sharded (on every rank); a sharded one's whole copy on the main process
    (None on the others; every rank must call it), on `device` (sampling) or the CPU (export: a whole SDXL UNet
    in float32 is 10 GB, which the GPU FSDP is used for may not have)."""
    if not is_sharded(module):
        return module
    whole = _whole_copy(module)
    return whole if whole is None or device is None else whole.to(device)


def load_whole(module, state: dict) -> None:
    """Load a full state dict (the same on every rank) into `module`, sharded or not."""
    if is_sharded(module):
        load_full_state_dict(module, {k: v.to(module.dtype) for k, v in state.items()})
    else:
        module.load_state_dict(state)


def local_tensor(tensor):
    """This rank's shard of a DTensor; any other tensor as it is (elementwise work on gradients)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def drop_unreduced_gradients(model) -> None:
    """What a step skipped for a non-finite loss leaves behind under FSDP2, undone. The gradients of micro-batches
    run without sync (gradient accumulation): FSDP2 keeps them on its unsharded parameters until the last
    micro-batch's backward reduce-scatters them, where the optimizer's zero_grad does not reach, so they would
    leak into the next step (DDP accumulates into the parameters' .grad, which zero_grad clears). And the root
    unit's gathered parameters: a forward without its backward leaves them in place of the shards, where an EMA
    swap (validation) or a LoRA checkpoint would read them (reshard)."""
    from torch.distributed.fsdp import FSDPModule

    reshard(model)
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


def reshard(model) -> None:
    """Put every FSDP unit of `model` back in its sharded state. A frozen network only ever run forward (a round
    teacher, an EMA) keeps its root unit's parameters gathered after the forward, as FSDP2 does for a root that
    expects a backward; state dicts read and written in that state mix whole tensors with shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state_dict(model) -> dict:
    """The model's full state dict (float32, on the CPU) on the main process, {} on the others; every rank calls
    it (one all-gather per parameter)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model, state: dict) -> None:
    """Load a full state dict, the same on every rank, into the sharded model: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    reshard(model)
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


class ShardedTrainedWeights(_Collective):
    """A sharded LoRA student's checkpoint part (trainer.student.TrainedWeights: its adapter, and w-distill's
    embedding, by name) with each tensor gathered whole: the DDP layout."""

    def __init__(self, part):
        self.part = part

    def state_dict(self) -> dict | None:
        main = _is_main()
        reshard(self.part.module)  # the shards, not a root left gathered (in the compute dtype) by a forward
        state = {canonical_name(n): full_tensor(t, keep=main) for n, t in self.part.state_dict().items()}
        return state if main else None

    def load_state_dict(self, state: dict) -> None:
        parameters = {canonical_name(n): (n, p) for n, p in self.part.module.named_parameters()}
        self.part.load_state_dict({parameters[n][0]: shard_like(v, parameters[n][1]) if n in parameters else v
                                   for n, v in state.items()})


def _any_sharded(tensors) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in tensors)


def collective_parts(parts: dict[str, Any]) -> dict[str, Any]:
    """A loop's checkpoint parts with every sharded one made a collective part that gathers (and scatters) its
    full state: an FSDP module, an optimizer of sharded parameters, an EMA of sharded averages. The rest (LR
    schedules, anything of a run without FSDP) stays as it is."""
    from trainer.ema import WarmupEMA
    from trainer.student import TrainedWeights

    def collective(part):
        if is_sharded(part):
            return ShardedModel(part)
        if isinstance(part, torch.optim.Optimizer):  # accelerate's AcceleratedOptimizer is one too
            params = [p for group in _inner(part).param_groups for p in group["params"]]
            return ShardedOptimizer(part) if _any_sharded(params) else part
        if isinstance(part, WarmupEMA) and _any_sharded(part.shadow_params):
            return ShardedEMA(part)
        if isinstance(part, TrainedWeights) and is_sharded(part.module):
            return ShardedTrainedWeights(part)
        return part

    return {name: None if part is None else collective(part) for name, part in parts.items()}


def _whole_copy(model):
    """On the main process, a plain (unsharded) copy of the sharded model's class with its full weights (and a
    LoRA student's adapters, trainable as in the student); None on the other ranks. Every rank calls it. The copy
    is built on the meta device and takes the gathered tensors as they are."""
    from torch.distributed.fsdp import FSDPModule

    state = full_state_dict(model)
    if not _is_main():
        return None
    plain_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = plain_class.from_config(model.config)
        for name, config in getattr(model, "peft_config", {}).items():  # a LoRA student's adapters, alike
            plain.add_adapter(config, adapter_name=name)
    plain.load_state_dict(state, assign=True)
    trained = set(trainable_names(model))
    for name, parameter in plain.named_parameters():
        parameter.requires_grad_(name in trained)
    return plain.train(model.training)

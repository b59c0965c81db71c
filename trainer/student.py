"""The one student factory: what a loop trains is a full copy of a UNet, or that UNet frozen with peft LoRA
adapters on it (the library diffusers itself uses). Loops see the same things either way: a module to call, the
parameters to optimise and average, and a checkpoint part; nothing else in them knows which it is.

One base can carry several adapters (sid-lsg: the generator's and the fake score network's on the teacher's own
UNet, which with its adapters off is the teacher): `AdapterView` is a module that calls the base with one adapter
on (or none) and whose parameters are that adapter's alone, so DDP, optimisers and `requires_grad_` act on it only.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from diffusion.errors import UserError

# The attention projections and the feed-forward layers of every transformer block, and the blocks' in/out
# projections: the LoRA targets of diffusers' text-to-image and LCM-LoRA scripts without the ResNet convolutions.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
DEFAULT_ADAPTER = "default"


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter's shape: rank r, alpha (its output is scaled by alpha / r) and the modules it targets."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS

    @classmethod
    def from_options(cls, rank: int, alpha: float | None, targets: str | None) -> "LoraSpec | None":
        """--lora-rank (0: a full student), --lora-alpha [rank], --lora-targets (comma-separated) [default]."""
        if rank < 0:
            raise UserError(f"--lora-rank must be 0 (a full student) or more, got {rank}")
        if rank == 0:
            if alpha is not None or targets:
                raise UserError("--lora-alpha and --lora-targets need --lora-rank")
            return None
        names = tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else DEFAULT_LORA_TARGETS
        return cls(rank, float(rank if alpha is None else alpha), names)

    def config(self):
        from peft import LoraConfig

        # B starts at zero, so the adapted UNet starts equal to its base
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets),
                          init_lora_weights=True)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "target_modules": list(self.targets)}


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def add_adapters(unet: UNet2DConditionModel, spec: LoraSpec, names: tuple[str, ...]) -> None:
    """Freeze `unet` and put a fresh float32 adapter of `spec` on it for each name; every adapter is trainable
    (peft's add_adapter makes only the last one so). A target that matches nothing is one clear error."""
    unet.requires_grad_(False)
    for name in names:
        try:
            with warnings.catch_warnings():  # several adapters on one model is the design here, not a mistake
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                unet.add_adapter(spec.config(), adapter_name=name)
        except ValueError as error:
            raise UserError(f"--lora-targets {','.join(spec.targets)}: {str(error).splitlines()[0]}") from None
    for parameter in adapter_parameters(unet, names):
        parameter.data = parameter.data.float()  # trained in float32 whatever the base's dtype
        parameter.requires_grad_(True)


def adapter_parameters(unet: torch.nn.Module, names: tuple[str, ...] = (DEFAULT_ADAPTER,)) -> list[torch.nn.Parameter]:
    """The parameters of the named adapters, in module order."""
    return [p for n, p in unet.named_parameters() if "lora_" in n and _adapter_of(n) in names]


def _adapter_of(parameter_name: str) -> str:
    """peft names an adapter's weights `...lora_A.NAME.weight`."""
    return parameter_name.split(".")[-2]


def make_student(unet: UNet2DConditionModel, lora: LoraSpec | None,
                 also_train: tuple[str, ...] = ()) -> UNet2DConditionModel:
    """The network to train: `unet` itself, all trainable (a full student); or `unet` frozen with one LoRA
    adapter, plus the parameters named in `also_train` (w-distill's new guidance embedding) trainable."""
    if lora is None:
        return unet.train().requires_grad_(True)
    add_adapters(unet, lora, (DEFAULT_ADAPTER,))
    names = dict(unet.named_parameters())
    for name in also_train:
        names[name].requires_grad_(True)
    return unet.train()


class TrainedWeights:
    """A checkpoint part holding only a module's trainable tensors, by name: a LoRA student's checkpoint is its
    adapter (and embedding), not the frozen base it sits on."""

    def __init__(self, module: torch.nn.Module):
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        parameters = dict(self.module.named_parameters())
        return {name: parameters[name].detach() for name in self.names}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if sorted(state) != sorted(self.names):
            missing = sorted(set(self.names) - set(state)) or sorted(set(state) - set(self.names))
            raise ValueError(f"the checkpoint's trained weights differ from this student's (first: {missing[0]})")
        parameters = dict(self.module.named_parameters())
        for name in self.names:
            parameters[name].copy_(state[name])


def checkpoint_part(student: torch.nn.Module, lora: LoraSpec | None):
    """What a checkpoint stores of the student: the whole module (a full student, the format of every earlier
    checkpoint) or its trained weights alone (LoRA)."""
    inner = getattr(student, "module", student)
    return student if lora is None else TrainedWeights(inner)


class AdapterView(torch.nn.Module):
    """`base` called with adapter `name` on, or with every adapter off (name None: the base alone). Its
    parameters are that adapter's only; the base is not a submodule, so several views share it, and DDP,
    optimisers and `requires_grad_` see one adapter each. Switching adapters leaves every requires_grad flag as
    it was (peft's set_adapter would change them)."""

    def __init__(self, base: UNet2DConditionModel, name: str | None):
        super().__init__()
        object.__setattr__(self, "base", base)
        self.name = name
        self.adapter = torch.nn.ParameterList(adapter_parameters(base, (name,)) if name else [])
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._layers = [m for m in base.modules() if isinstance(m, BaseTunerLayer)]
        # every adapter's weights, found once (views are made after their base's adapters), not per forward
        self._every_adapter = [p for n, p in base.named_parameters() if "lora_" in n]

    @property
    def config(self):
        return self.base.config

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    def forward(self, *args, **kwargs):
        with _flags_kept(self._every_adapter):
            for layer in self._layers:
                if self.name is None:
                    layer.enable_adapters(False)
                else:
                    layer.enable_adapters(True)
                    layer.set_adapter(self.name)
        return self.base(*args, **kwargs)


@contextmanager
def _flags_kept(parameters: list[torch.nn.Parameter]) -> Iterator[None]:
    flags = [p.requires_grad for p in parameters]
    try:
        yield
    finally:
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)


def save_trained_student(unet: UNet2DConditionModel, lora: LoraSpec | None, base: Path, base_variant: str | None,
                         out: Path, record: dict, merge: bool = False) -> None:
    """Write the student folder: a full student's pipeline folder, or a LoRA student's adapter files (and its
    merged pipeline with `merge`); `record` becomes distillation.json, with the LoRA recipe for a LoRA."""
    from students.folder import save_student
    from students.lora import save_lora_student

    if lora is None:
        save_student(unet, base, out, record)
    elif isinstance(unet, AdapterView):  # one adapter of a shared base (sid-lsg)
        save_lora_student(unet.base, unet.name, lora, base, base_variant, out, record, merge)
    else:
        save_lora_student(unet, DEFAULT_ADAPTER, lora, base, base_variant, out, record, merge)


@contextmanager
def averaged_weights(ema, parameters: list[torch.nn.Parameter]) -> Iterator[None]:
    """The EMA's weights in `parameters` for the block (diffusers EMAModel's store/copy_to/restore); no EMA:
    the weights as they are."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)

"""Per-GPU memory plan for SD 1.5 and SDXL: every method, full and LoRA students, DDP and FSDP (FULL_SHARD).

Three sources, each printed with its figures:
- parameter counts: the published configs (below, written out: nothing is downloaded) instantiated on the meta
  device (no memory, no weights), counted; LoRA adapter sizes summed as (in + out) x rank over the matching
  nn.Linear / 1x1 nn.Conv2d modules (peft's own adapters on the meta UNet are counted too, as a check);
- bytes per parameter per role, as the trainer holds each network (trainer/fit.py, progressive.py, sid.py:
  fp32 master weights, fp32 gradients and Adam states, fp32 EMA, frozen networks in their dtype, DDP's gradient
  buckets, the bf16 weight copies autocast keeps for the backward);
- activation memory per sample, measured: one forward + backward of the full-size UNet on the CPU at a small
  latent size (bf16 autocast, SDPA attention, CUDA's autocast policy for the norms: see `_cuda_norms`), in a
  fresh process per model (a warm-up step, then batch 1 and 2 of each regime, the peak RSS reset before each);
  per sample = batch 2 - batch 1 (the larger of the peaks' and the held-after-forward RSS' differences), so
  weights and every batch-independent buffer cancel; scaled to 512 px (SD 1.5) and 1024 px (SDXL) by latent area.

    python benchmarks/memory_plan.py [--world 8] [--lora-rank 64] [--batch 1] [--sd-side 32] [--sdxl-side 32]
                                     [--check-side 16] [--sdxl-regimes full,through] [--weights bf16]
                                     [--activations FILE] [--json-out FILE]

`--activations FILE` reads the measurements of an earlier `--json-out FILE` instead of measuring (seconds, not
minutes). Figures are GiB (2^30 bytes).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch

from evaluation.speed import reset_peak_rss, rss

REPO = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
FP32, BF16, ADAM = 4, 2, 8  # bytes per parameter: fp32 weight or gradient, bf16 weight, Adam's two fp32 moments

# --- The published configs (config.json of each component, the keys that differ from the classes' defaults) ---

# huggingface.co/runwayml/stable-diffusion-v1-5 (now stable-diffusion-v1-5/stable-diffusion-v1-5), unet/config.json
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "center_input_sample": False,
}
# text_encoder/config.json of SD 1.5 (CLIP ViT-L/14's text tower) and SDXL's text_encoder (the same shapes)
CLIP_L_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
               "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu"}
# vae/config.json of SD 1.5; SDXL's VAE has the same shapes (sample_size 1024, scaling_factor 0.13025)
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
       "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
       "up_block_types": ["UpDecoderBlock2D"] * 4, "act_fn": "silu", "norm_num_groups": 32, "sample_size": 512}
# huggingface.co/stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "mid_block_scale_factor": 1,
}
# SDXL's text_encoder_2/config.json: OpenCLIP ViT-bigG/14's text tower, with its projection
BIGG_TEXT = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
             "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 1280, "hidden_act": "gelu"}


@dataclass(frozen=True)
class Family:
    name: str
    unet: dict
    text: tuple[tuple[str, dict], ...]  # (transformers class, config) of each text encoder
    resolution: int  # the pixels the table is for
    context_dim: int  # the text encoders' hidden states the UNet cross-attends to
    pooled_dim: int | None  # SDXL's pooled text embedding (added_cond_kwargs), None for SD


FAMILIES = {
    "sd15": Family("SD 1.5", SD15_UNET, (("CLIPTextModel", CLIP_L_TEXT),), 512, 768, None),
    "sdxl": Family("SDXL", SDXL_UNET, (("CLIPTextModel", CLIP_L_TEXT), ("CLIPTextModelWithProjection", BIGG_TEXT)),
                   1024, 2048, 1280),
}
METHODS = ("cfg-distill", "w-distill", "progressive", "sid-lsg")
W_EMBEDDING_DIM = 256  # trainer.config's --w-embedding-dim default: w-distill's cond_proj input
FSDP_UNITS = ("BasicTransformerBlock", "ResnetBlock2D")  # trainer.fsdp.WRAPPED_BLOCKS


# --- Parameter counts on the meta device ---

def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_unet(config: dict, **overrides):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**{**config, **overrides})


def meta_text_encoder(class_name: str, config: dict):
    import transformers

    with torch.device("meta"):
        return getattr(transformers, class_name)(transformers.CLIPTextConfig(**config))


def meta_vae():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(**VAE)


def lora_parameters(module: torch.nn.Module, targets: tuple[str, ...], rank: int) -> int:
    """The parameters of a rank-`rank` LoRA adapter on `module`'s targets, as peft builds it: a module matches when
    its name is a target or ends with "." + a target; an nn.Linear gets A (rank x in) and B (out x rank), an
    nn.Conv2d gets A (rank x in x kh x kw) and a 1x1 B (out x rank): (in + out) x rank for a Linear or 1x1 conv."""
    total = 0
    for name, child in module.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(child, torch.nn.Linear):
            total += rank * (child.in_features + child.out_features)
        elif isinstance(child, torch.nn.Conv2d):
            kh, kw = child.kernel_size
            total += rank * (child.in_channels // child.groups * kh * kw + child.out_channels)
    return total


def peft_lora_parameters(unet, rank: int) -> int:
    """The same count from peft's own adapter, added to the meta UNet the trainer's way (trainer.student)."""
    from trainer.student import DEFAULT_ADAPTER, LoraSpec, add_adapters

    add_adapters(unet, LoraSpec(rank, float(rank)), (DEFAULT_ADAPTER,))
    return sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)


def fsdp_units(unet) -> dict[str, int]:
    """FSDP2's units of trainer.fsdp: each FSDP_UNITS module, and the root (everything else)."""
    units = [count(m) for m in unet.modules() if type(m).__name__ in FSDP_UNITS]
    return {"units": len(units), "largest": max(units), "root": count(unet) - sum(units)}


@dataclass(frozen=True)
class Counts:
    unet: int
    w_unet: int  # with w-distill's cond_proj (time_cond_proj_dim = W_EMBEDDING_DIM)
    text: dict[str, int]
    vae: int
    lora: int  # rank-`rank` adapter on trainer.student.DEFAULT_LORA_TARGETS
    lora_peft: int
    rank: int
    fsdp: dict[str, int]

    @property
    def cond_proj(self) -> int:
        return self.w_unet - self.unet

    @property
    def text_total(self) -> int:
        return sum(self.text.values())


def family_counts(family: Family, rank: int) -> Counts:
    from trainer.student import DEFAULT_LORA_TARGETS

    unet = meta_unet(family.unet)
    lora = lora_parameters(unet, DEFAULT_LORA_TARGETS, rank)
    return Counts(unet=count(unet), w_unet=count(meta_unet(family.unet, time_cond_proj_dim=W_EMBEDDING_DIM)),
                  text={name: count(meta_text_encoder(name, config)) for name, config in family.text},
                  vae=count(meta_vae()), lora=lora, lora_peft=peft_lora_parameters(meta_unet(family.unet), rank),
                  rank=rank, fsdp=fsdp_units(unet))


# --- What each method holds per GPU ---

@dataclass(frozen=True)
class Held:
    """`params` x `bytes_per_param` held on every GPU; under FSDP FULL_SHARD divided by the world size when
    `sharded`; `ddp` / `fsdp`: held under that strategy at all."""

    what: str
    params: int
    bytes_per_param: int
    sharded: bool = True
    ddp: bool = True
    fsdp: bool = True

    def bytes(self, strategy: str, world: int) -> float:
        if not (self.ddp if strategy == "ddp" else self.fsdp):
            return 0.0
        total = self.params * self.bytes_per_param
        return total / world if strategy == "fsdp" and self.sharded else float(total)


def trained(name: str, params: int, ema: bool = True, grads: bool = True) -> list[Held]:
    """A trained network (or adapter): fp32 master weights (accelerate's bf16 autocast keeps them fp32), Adam's
    two fp32 moments, fp32 gradients, the fp32 EMA, and DDP's gradient buckets (torch's default
    gradient_as_bucket_view=False: a second fp32 gradient-sized buffer, allocated when DDP wraps the module)."""
    held = [Held(f"{name}: fp32 weights", params, FP32), Held(f"{name}: Adam moments (2 x fp32)", params, ADAM)]
    if grads:
        held.append(Held(f"{name}: fp32 gradients", params, FP32))
    if ema:
        held.append(Held(f"{name}: fp32 EMA", params, FP32))
    return held + [Held(f"{name}: DDP gradient buckets (fp32)", params, FP32, fsdp=False)]


def autocast_copies(name: str, params: int) -> Held:
    """Under DDP, bf16 autocast casts each fp32 weight a forward uses to bf16, and the copy is saved for the
    backward (a weight's gradient needs no copy, an input's gradient needs the weight): 2 bytes per parameter
    of every fp32 network whose forward keeps a graph, from forward to backward. FSDP2 with the mixed-precision
    policy all-gathers bf16 weights instead (in its working set)."""
    return Held(f"bf16 copies of {name}'s fp32 weights (autocast, forward to backward)", params, BF16,
                sharded=False, fsdp=False)


def fsdp_working_set(counts: Counts, sharded_unets: int, weight_grads: bool) -> list[Held]:
    """FSDP2 all-gathers one unit at a time (bf16): the unit running and the one prefetched; the root unit is not
    resharded after the forward (FSDP2 keeps the root's parameters for the backward) - once per sharded UNet;
    a trained unit's gradient exists unsharded (bf16, then its fp32 copy for the fp32 reduce-scatter)."""
    held = [Held("FSDP: root units kept gathered (bf16)", counts.fsdp["root"] * sharded_unets, BF16, sharded=False,
                 ddp=False),
            Held("FSDP: two largest units gathered (bf16)", 2 * counts.fsdp["largest"], BF16, sharded=False, ddp=False)]
    if weight_grads:
        held.append(Held("FSDP: one unit's unsharded gradient (bf16 + fp32)", counts.fsdp["largest"], BF16 + FP32,
                         sharded=False, ddp=False))
    return held


def held_networks(counts: Counts, method: str, lora: bool) -> list[Held]:
    """What a GPU holds besides activations, from trainer/fit.py, progressive.py and sid.py (with their defaults:
    bf16 mixed precision, EMA on, gradient buffers freed after each step)."""
    text = [Held(f"text encoder {name} (frozen, bf16)", n, BF16, sharded=False) for name, n in counts.text.items()]
    unet = counts.w_unet if method in ("w-distill", "progressive") else counts.unet
    adapter = counts.lora
    if method in ("cfg-distill", "w-distill"):  # one trained UNet; the teacher's predictions come from shards
        if not lora:
            return text + trained("student UNet", unet) + [autocast_copies("the student", unet)] + \
                fsdp_working_set(counts, 1, True)
        # the base loads in fp32 (trainer.fit.build_student: load_unet's default) and stays frozen
        extra = counts.cond_proj if method == "w-distill" else 0  # w-distill also trains its new cond_proj
        return text + [Held("base UNet (frozen, fp32)", unet, FP32)] + \
            trained("LoRA adapter" + (" + cond_proj" if extra else ""), adapter + extra) + \
            [autocast_copies("the base", unet)] + fsdp_working_set(counts, 1, False)
    if method == "progressive":  # the round's student and its frozen teacher (the previous round)
        if not lora:
            return text + trained("student UNet", unet) + [Held("round teacher UNet (frozen, bf16)", unet, BF16),
                                                           autocast_copies("the student", unet)] + \
                fsdp_working_set(counts, 2, True)
        # one fp32 base (trainer.progressive.round_networks: load_unet's default) with two adapters
        return text + [Held("base UNet (frozen, fp32)", unet, FP32)] + trained("student adapter", adapter) + \
            [Held("round teacher adapter (frozen, fp32)", adapter, FP32), autocast_copies("the base", unet)] + \
            fsdp_working_set(counts, 1, False)
    if method == "sid-lsg":  # trainer.sid.build_networks
        vae = Held("VAE (fp32: decodes sample grids)", counts.vae, FP32, sharded=False)
        if not lora:
            # gradients of one network at a time: each step's are freed after it (--free-grad-buffers)
            return text + [vae, Held("teacher UNet (frozen, bf16)", unet, BF16)] + \
                trained("generator UNet", unet, grads=False) + \
                trained("fake score UNet", unet, ema=False, grads=False) + \
                [Held("fp32 gradients of one network at a time", unet, FP32),
                 autocast_copies("the generator and the fake network", 2 * unet)] + fsdp_working_set(counts, 3, True)
        # the teacher's UNet in bf16 (--teacher-precision follows --mixed-precision) carries three adapters
        return text + [vae, Held("teacher UNet = shared base (frozen, bf16)", unet, BF16)] + \
            trained("generator adapter", adapter, grads=False) + \
            trained("fake adapter", adapter, ema=False, grads=False) + \
            [Held("fp32 gradients of one adapter at a time", adapter, FP32)] + fsdp_working_set(counts, 1, False)
    raise ValueError(method)


def activation_forwards(method: str, lora: bool) -> dict[str, dict[str, float]]:
    """Per sample: how many of each measured kind of forward keep their activations at the step's peak.
    trained: the network's weights train (full UNet or its LoRA adapter); through: weights frozen, the gradient
    flows through to the input. cfg-/w-distill: one trained forward. progressive: the student's; the teacher's two
    DDIM forwards run under no_grad (nothing kept). sid-lsg with the default kappa 1.5 everywhere (LSG): the fake
    step runs the fake network trained on 2B (cond + uncond); the generator step runs the generator trained on B,
    then the fake network and the teacher on 2B each, frozen but differentiated through to x_g
    (trainer/sid.py generator_loss): the larger of the two steps is the peak."""
    kind = "lora" if lora else "full"
    if method == "sid-lsg":
        return {"fake step": {kind: 2.0}, "generator step": {kind: 1.0, "through": 4.0}}
    return {"step": {kind: 1.0}}


def activation_bytes(method: str, lora: bool, per_sample: dict[str, float]) -> float:
    return max(sum(n * per_sample[k] for k, n in forwards.items())
               for forwards in activation_forwards(method, lora).values())


@dataclass
class Row:
    family: str
    method: str
    student: str
    static_ddp: float
    static_fsdp: float
    activations_per_sample: float
    ddp: float
    fsdp: float


def plan_row(family: str, counts: Counts, method: str, lora: bool, per_sample: dict[str, float], batch: int,
             world: int) -> Row:
    held = held_networks(counts, method, lora)
    static_ddp = sum(h.bytes("ddp", world) for h in held)
    static_fsdp = sum(h.bytes("fsdp", world) for h in held)
    act = activation_bytes(method, lora, per_sample)
    return Row(family, method, "LoRA" if lora else "full", static_ddp, static_fsdp, act,
               static_ddp + batch * act, static_fsdp + batch * act)


# --- Activation measurement: forward + backward steps, one fresh process per model ---

REGIMES = {
    "full": "every weight trained",
    "full-gc": "every weight trained, unet.enable_gradient_checkpointing()",
    "through": "weights frozen, gradient to the input latent only",
    "lora": "rank-R LoRA adapter trained on the frozen base (trainer.student.add_adapters)",
}


def _cuda_norms() -> None:
    """CUDA's autocast runs group_norm and layer_norm in fp32 (their outputs, and the SiLU after them, are fp32
    activations); the CPU's autocast leaves them in the input's dtype. Make the CPU do what CUDA does."""
    import torch.nn.functional as F

    def fp32(function):
        def wrapped(input, *args, **kwargs):
            if torch.is_autocast_enabled("cpu"):
                with torch.autocast("cpu", enabled=False):
                    cast = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
                    kw = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                          for k, v in kwargs.items()}
                    return function(input.float(), *cast, **kw)
            return function(input, *args, **kwargs)

        return wrapped

    F.group_norm, F.layer_norm = fp32(F.group_norm), fp32(F.layer_norm)


def _configure(unet, regime: str, rank: int) -> None:
    """Put the UNet in `regime` (REGIMES); the LoRA adapter, once added, stays (so "lora" comes last)."""
    from trainer.student import DEFAULT_ADAPTER, LoraSpec, add_adapters

    if regime == "lora" and not any("lora_" in n for n, _ in unet.named_parameters()):
        add_adapters(unet, LoraSpec(rank, float(rank)), (DEFAULT_ADAPTER,))
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.register_post_accumulate_grad_hook(_free_gradient)
    if regime in ("full", "full-gc"):
        unet.requires_grad_(True)
    elif regime == "through":
        unet.requires_grad_(False)
    if regime == "full-gc":
        unet.enable_gradient_checkpointing()
    elif unet.is_gradient_checkpointing:
        unet.disable_gradient_checkpointing()


def _free_gradient(parameter: torch.Tensor) -> None:
    parameter.grad = None


def measure_steps(family: str, steps: list[dict], weights: str, policy: str, rank: int) -> list[dict]:
    """In this process: the full-size UNet (random weights in `weights`' dtype) built once; each step (regime,
    batch, side) runs one forward under bf16 autocast and one backward of a mean-square loss, with the peak RSS
    (VmHWM) reset just before it. Weight gradients are freed as they are made (they are batch-independent, and
    would cancel anyway). Returns, per step, the RSS held after the forward and the peak RSS, both above the RSS
    just before the forward (which is printed too: it must come back to the same value after every step)."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # .to(bf16): "modules that should be kept in float32: []"
    if policy == "cuda":
        _cuda_norms()
    torch.manual_seed(0)
    spec = FAMILIES[family]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[weights]
    unet = meta_unet(spec.unet).to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0.0, 0.02)  # the values do not change the memory; they only need to be finite
            parameter.register_post_accumulate_grad_hook(_free_gradient)
    unet.train()
    results = []
    for step in steps:
        regime, batch, side = step["regime"], step["batch"], step["side"]
        _configure(unet, regime, rank)
        x = torch.randn(batch, 4, side, side, requires_grad=regime == "through")
        t = torch.randint(0, 1000, (batch,))
        context = torch.randn(batch, 77, spec.context_dim).to(torch.bfloat16)  # the text encoders' output, bf16
        extra = {}
        if spec.pooled_dim:
            size = side * 8
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, spec.pooled_dim).to(torch.bfloat16),
                "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32)}
        gc.collect()
        reset = reset_peak_rss()
        before = rss("VmRSS")
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(x, t, context, **extra).sample
        held = rss("VmRSS") - before
        out.float().square().mean().backward()
        seconds = time.perf_counter() - start
        import resource

        peak = rss("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        del out, x, context, extra
        results.append({**step, "held_after_forward": held, "peak": peak - before, "seconds": seconds,
                        "rss_before": before, "peak_reset": reset})
        label = f"{family} {regime}{' (warm-up)' if step.get('warmup') else ''} batch {batch} at {side}x{side}"
        print(f"  {label}: peak {(peak - before) / GIB:.3f} GiB above {before / GIB:.3f} GiB, {seconds:.0f} s",
              file=sys.stderr, flush=True)
    return results


def measure_in_subprocess(**spec) -> list[dict]:
    """measure_steps in a fresh interpreter; large blocks go straight back to the OS (a fixed mmap threshold),
    so the RSS follows the live tensors and the steps do not inherit each other's freed memory."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "MALLOC_MMAP_THRESHOLD_": "131072",
           "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, stdout=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed (its stderr is above)")
    return json.loads(done.stdout.strip().splitlines()[-1])


def planned_steps(sd_side: int, sdxl_side: int, check_side: int, sdxl_regimes: tuple[str, ...]) -> dict[str, list]:
    """Per family, the steps of its one process: a warm-up step (not recorded: a process's first forward +
    backward allocates for good what later ones reuse: thread pools, kernel caches), then batch 1 and 2 of each
    (regime, side): every regime for SD 1.5, and SD 1.5's full regime again at `check_side` (is the per-sample
    figure linear in the latent area?); `sdxl_regimes` for SDXL (each SDXL step takes a minute or more here)."""
    def pairs(regimes, side):
        return [{"regime": r, "batch": b, "side": side} for r in regimes for b in (1, 2)]

    def warmup(side):
        return [{"regime": "full", "batch": 2, "side": side, "warmup": True}]

    sd = warmup(sd_side) + pairs(("full", "through", "full-gc"), sd_side) + \
        (pairs(("full",), check_side) if check_side else []) + pairs(("lora",), sd_side)
    return {"sd15": sd, "sdxl": warmup(sdxl_side) + pairs(sorted(sdxl_regimes, key=list(REGIMES).index), sdxl_side)}


def run_measurements(steps: dict[str, list], weights: str, rank: int) -> dict[str, dict]:
    """{family/regime/side: {family, regime, side, weights, batch1, batch2}} from one process per family."""
    measured = {}
    for family, family_steps in steps.items():
        for r in measure_in_subprocess(family=family, steps=family_steps, weights=weights, policy="cuda", rank=rank):
            if r.get("warmup"):
                continue
            entry = measured.setdefault(f"{family}/{r['regime']}/{r['side']}", {
                "family": family, "regime": r["regime"], "side": r["side"], "weights": weights})
            entry[f"batch{r['batch']}"] = r
    return measured


def per_sample(result: dict, full_side: int) -> dict[str, float]:
    """From batch 1 and 2: the per-sample activation at the measured side, scaled by latent area to `full_side`,
    and the batch-independent part of a step (2 x batch 1 - batch 2). Per sample is the larger of two
    differences: of the peaks, and of the RSS held after the forward (what autograd saved, and the output). At a
    small size a step's peak can fall late in the backward, on a batch-independent transient (a weight's
    gradient) after most activations are freed: the peaks' difference then misses them, the held one does not
    (measured: SD 1.5 at 16x16, 14 MiB against 71; at 32x32, 269 against 281). At full size the peak comes at the
    start of the backward, above everything held."""
    one, two = result["batch1"], result["batch2"]
    peaks, held = two["peak"] - one["peak"], two["held_after_forward"] - one["held_after_forward"]
    scale = (full_side / result["side"]) ** 2
    return {"side": result["side"], "per_sample_measured": max(peaks, held), "peak_per_sample_measured": peaks,
            "held_per_sample_measured": held, "batch_independent": 2 * one["peak"] - two["peak"],
            "batch_independent_held": 2 * one["held_after_forward"] - two["held_after_forward"],
            "scale": scale, "per_sample_full": max(peaks, held) * scale}


# --- Plain attention's quadratic term, counted on the meta device ---

def plain_attention_bytes(family: Family) -> int:
    """Per sample at the table's resolution: the attention matrices plain attention (diffusers' AttnProcessor,
    no SDPA) keeps for the backward, heads x queries x keys per layer at about 6 bytes each (CUDA autocast's fp32
    softmax output, saved by the softmax, and its bf16 copy, saved by the next matmul). SDPA's fused kernels keep
    none of them. Shapes come from a forward on the meta device (no compute)."""
    from diffusers.models.attention_processor import Attention

    unet = meta_unet(family.unet)
    elements = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        keys = hidden.shape[1] if context is None else context.shape[1]
        elements.append(module.heads * hidden.shape[1] * keys)

    for module in unet.modules():
        if isinstance(module, Attention):
            module.register_forward_pre_hook(hook, with_kwargs=True)
    side = family.resolution // 8
    extra = {}
    if family.pooled_dim:
        extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, family.pooled_dim, device="meta"),
                                      "time_ids": torch.zeros(1, 6, device="meta")}
    with torch.no_grad():
        unet(torch.zeros(1, 4, side, side, device="meta"), torch.tensor([1], device="meta"),
             torch.zeros(1, 77, family.context_dim, device="meta"), **extra)
    return 6 * sum(elements)


# --- Output ---

def gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def markdown_table(rows: list[Row], world: int, batch: int) -> str:
    lines = [f"| model | method | student | weights & states, DDP | weights & states, FSDP-{world} "
             f"| activations / sample | **DDP per GPU** | **FSDP-{world} per GPU** |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {FAMILIES[r.family].name} | {r.method} | {r.student} | {gib(r.static_ddp)} | "
                     f"{gib(r.static_fsdp)} | {gib(r.activations_per_sample)} | **{gib(r.ddp)}** | **{gib(r.fsdp)}** |")
    return "\n".join(lines) + f"\n\nGiB; per GPU at {batch} sample(s) per GPU (512 px for SD 1.5, 1024 px for SDXL)."


def counts_table(counts: dict[str, Counts]) -> str:
    rank = next(iter(counts.values())).rank
    lines = [f"| model | UNet | UNet + w cond_proj | text encoder(s) | VAE | LoRA r{rank} adapter "
             "| FSDP units (largest, root) |", "|---|---:|---:|---:|---:|---:|---|"]
    for family, c in counts.items():
        text = " + ".join(f"{n:,}" for n in c.text.values())
        lines.append(f"| {FAMILIES[family].name} | {c.unet:,} | {c.w_unet:,} | {text} | {c.vae:,} | {c.lora:,} | "
                     f"{c.fsdp['units']} ({c.fsdp['largest']:,}, {c.fsdp['root']:,}) |")
    return "\n".join(lines)


def table_activations(derived: dict[str, dict], sides: dict[str, int]) -> tuple[dict[str, dict], list[str]]:
    """Per family, the per-sample activations at the table's resolution of each kind (full, through, lora) from
    its measurement at the family's side; a regime not measured for SDXL is SDXL's full figure times SD 1.5's
    ratio of that regime to full (listed in the second value)."""
    table, estimated = {}, []
    for family, side in sides.items():
        table[family] = {r: d["per_sample_full"] for key, d in derived.items()
                         for f, r, s in [key.split("/")] if f == family and int(s) == side}
    for family in table:
        for regime in REGIMES:
            if regime not in table[family]:
                table[family][regime] = table[family]["full"] * table["sd15"][regime] / table["sd15"]["full"]
                estimated.append(f"{family}/{regime}")
    return table, estimated


@click.command()
@click.option("--world", default=8, show_default=True, help="GPUs FSDP shards over.")
@click.option("--lora-rank", default=64, show_default=True)
@click.option("--batch", default=1, show_default=True, help="Samples per GPU in the per-GPU columns.")
@click.option("--sd-side", default=32, show_default=True, help="SD 1.5's measured latent side (32: 256 px).")
@click.option("--sdxl-side", default=32, show_default=True, help="SDXL's measured latent side (32: 256 px).")
@click.option("--check-side", default=16, show_default=True,
              help="SD 1.5's full regime measured again at this side, to check the linear scaling (0: skip).")
@click.option("--sdxl-regimes", default="full,through", show_default=True,
              help=f"SDXL's measured regimes, of {','.join(REGIMES)}; the others scale by SD 1.5's ratios.")
@click.option("--weights", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="The measured UNets' weights (the per-sample figure does not depend on them; fp32 adds autocast's "
                   "weight copies and their time to every step).")
@click.option("--activations", "activations_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Reuse the measurements of an earlier --json-out instead of measuring.")
@click.option("--json-out", default=None, type=click.Path(dir_okay=False), help="Also write the figures as JSON.")
@click.option("--child", default=None, hidden=True)
def main(world: int, lora_rank: int, batch: int, sd_side: int, sdxl_side: int, check_side: int, sdxl_regimes: str,
         weights: str, activations_file: str | None, json_out: str | None, child: str | None) -> None:
    if child is not None:
        print(json.dumps(measure_steps(**json.loads(child))))
        return
    start = time.perf_counter()
    counts = {family: family_counts(spec, lora_rank) for family, spec in FAMILIES.items()}
    for family, c in counts.items():
        if c.lora != c.lora_peft:
            raise SystemExit(f"{family}: LoRA formula {c.lora:,} != peft's adapter {c.lora_peft:,}")
    if activations_file:
        measured = json.loads(Path(activations_file).read_text())["measurements"]
    else:
        regimes = tuple(r.strip() for r in sdxl_regimes.split(",") if r.strip())
        if set(regimes) - set(REGIMES) or "full" not in regimes:
            raise click.BadParameter(f"{sdxl_regimes!r}: needs full, and only {', '.join(REGIMES)}",
                                     param_hint="--sdxl-regimes")
        measured = run_measurements(planned_steps(sd_side, sdxl_side, check_side, regimes), weights, lora_rank)
    derived = {key: per_sample(m, FAMILIES[m["family"]].resolution // 8) for key, m in measured.items()}
    activations, estimated = table_activations(derived, {"sd15": sd_side, "sdxl": sdxl_side})
    rows = [plan_row(family, counts[family], method, lora, activations[family], batch, world)
            for family in FAMILIES for method in METHODS for lora in (False, True)]
    plain = {family: plain_attention_bytes(spec) for family, spec in FAMILIES.items()}
    print(counts_table(counts))
    print()
    print("Activation measurements (CPU, bf16 autocast, SDPA; per sample = batch 2 - batch 1, the larger of the "
          "peaks' and the held RSS' differences):")
    for key, d in derived.items():
        m = measured[key]
        print(f"  {key}: {d['per_sample_measured'] / 2**20:.1f} MiB/sample at {d['side']}x{d['side']} latents "
              f"(peaks {d['peak_per_sample_measured'] / 2**20:.1f}, held after forward "
              f"{d['held_per_sample_measured'] / 2**20:.1f}); x{d['scale']:.0f} -> "
              f"{gib(d['per_sample_full'])} GiB at {FAMILIES[m['family']].resolution} px; batch-independent "
              f"{gib(d['batch_independent'])} GiB (held {gib(d['batch_independent_held'])}); "
              f"{m['batch1']['seconds']:.0f}+{m['batch2']['seconds']:.0f} s")
    for key in estimated:
        family, regime = key.split("/")
        print(f"  {key}: not measured; SDXL full x SD 1.5's {regime}/full -> {gib(activations[family][regime])} GiB")
    for family, value in plain.items():
        print(f"  plain attention (no SDPA) would add {gib(value)} GiB/sample for {FAMILIES[family].name} "
              f"at {FAMILIES[family].resolution} px")
    print()
    print(markdown_table(rows, world, batch))
    seconds = time.perf_counter() - start
    print(f"\n{seconds:.0f} s; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if json_out:
        Path(json_out).write_text(json.dumps({
            "world": world, "batch_per_gpu": batch, "lora_rank": lora_rank,
            "counts": {f: {**asdict(c), "cond_proj": c.cond_proj} for f, c in counts.items()},
            "held": {f"{f}/{method}/{'lora' if lora else 'full'}": [
                {**asdict(h), "ddp_bytes": h.bytes("ddp", world), "fsdp_bytes": h.bytes("fsdp", world)}
                for h in held_networks(counts[f], method, lora)]
                for f in FAMILIES for method in METHODS for lora in (False, True)},
            "measurements": measured, "derived": derived, "activations_per_sample": activations,
            "estimated": estimated, "plain_attention_bytes_per_sample": plain,
            "rows": [asdict(r) for r in rows], "seconds": seconds,
        }, indent=2))


if __name__ == "__main__":
    main()

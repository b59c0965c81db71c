"""benchmarks/memory_plan.py without its measurements: the published configs give the published parameter counts
on the meta device, the LoRA count formula matches a hand count (and peft's own adapter), and the memory model
adds up a row as a hand computation does."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plan():
    spec = importlib.util.spec_from_file_location("memory_plan", REPO / "benchmarks" / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_plan"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("memory_plan", None)


@pytest.mark.parametrize("config, published", [("SD15_UNET", 859_520_964), ("SDXL_UNET", 2_567_463_684)])
def test_meta_unets_have_the_published_parameter_counts(plan, config, published):
    unet = plan.meta_unet(getattr(plan, config))
    assert next(unet.parameters()).device.type == "meta"
    assert plan.count(unet) == published


def test_w_embedding_adds_its_cond_proj_only(plan):
    # TimestepEmbedding's cond_proj: Linear(time_cond_proj_dim, 320, bias=False)
    w_unet = plan.meta_unet(plan.SD15_UNET, time_cond_proj_dim=plan.W_EMBEDDING_DIM)
    assert plan.count(w_unet) - 859_520_964 == 256 * 320


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.to_q = torch.nn.Linear(8, 16, bias=False)
        self.attn.to_k = torch.nn.Linear(4, 16)  # a bias adds nothing to the adapter
        self.attn.to_qx = torch.nn.Linear(8, 8)  # not a target: "to_q" must match a whole name part
        self.attn.to_out = torch.nn.ModuleList([torch.nn.Linear(16, 8), torch.nn.Dropout()])
        self.proj_in = torch.nn.Conv2d(16, 8, 1)
        self.proj_out = torch.nn.Conv2d(8, 4, 3, padding=1)
        self.ff = torch.nn.Module()
        self.ff.net = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Dropout(), torch.nn.Linear(32, 8)])
        self.ff.net[0].proj = torch.nn.Linear(8, 32)
        self.conv = torch.nn.Conv2d(8, 8, 3)  # not a target


TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def test_lora_count_formula_on_a_hand_built_module(plan):
    r = 2
    by_hand = (r * (8 + 16)  # to_q
               + r * (4 + 16)  # to_k
               + r * (16 + 8)  # to_out.0
               + r * (16 + 8)  # proj_in, 1x1 conv
               + r * 8 * 3 * 3 + 4 * r  # proj_out, 3x3 conv: A is r x 8 x 3 x 3, B is 4 x r x 1 x 1
               + r * (8 + 32)  # ff.net.0.proj
               + r * (32 + 8))  # ff.net.2
    assert by_hand == 496
    assert plan.lora_parameters(_Tiny(), TARGETS, r) == by_hand

    from peft import LoraConfig, inject_adapter_in_model

    with_adapter = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, target_modules=list(TARGETS)), _Tiny())
    assert sum(p.numel() for n, p in with_adapter.named_parameters() if "lora_" in n) == by_hand


def _counts(plan):
    return plan.Counts(unet=1000, w_unet=1010, text={"clip": 100}, vae=50, lora=10, lora_peft=10, rank=4,
                       fsdp={"units": 3, "largest": 200, "root": 100})


PER_SAMPLE = {"full": 300.0, "full-gc": 30.0, "through": 100.0, "lora": 50.0}


def test_memory_model_cfg_distill_full_row_by_hand(plan):
    row = plan.plan_row("sd15", _counts(plan), "cfg-distill", False, PER_SAMPLE, batch=2, world=8)
    text = 100 * 2  # frozen bf16
    trained = 1000 * (4 + 8 + 4 + 4)  # fp32 weights, Adam moments, fp32 gradients, fp32 EMA
    ddp = text + trained + 1000 * 4 + 1000 * 2  # + DDP's gradient buckets + autocast's bf16 weight copies
    fsdp = text + trained / 8 + 100 * 2 + 2 * 200 * 2 + 200 * (2 + 4)  # + root, two units, one unit's gradients
    assert (row.static_ddp, row.static_fsdp) == (ddp, fsdp) == (26_200, 4_900)
    assert row.activations_per_sample == 300
    assert (row.ddp, row.fsdp) == (ddp + 2 * 300, fsdp + 2 * 300)


def test_memory_model_sid_lsg_full_row_by_hand(plan):
    row = plan.plan_row("sd15", _counts(plan), "sid-lsg", False, PER_SAMPLE, batch=1, world=8)
    ddp = (100 * 2 + 50 * 4  # text encoder bf16, VAE fp32
           + 1000 * 2  # teacher bf16
           + 1000 * (4 + 8 + 4 + 4)  # generator: weights, Adam, EMA, DDP buckets
           + 1000 * (4 + 8 + 4)  # fake: weights, Adam, DDP buckets
           + 1000 * 4  # one network's gradients at a time
           + 2 * 1000 * 2)  # autocast's bf16 copies of generator and fake in the generator step
    assert row.static_ddp == ddp == 46_400
    # fake step: 2B trained; generator step: B trained + 2B through the fake network + 2B through the teacher
    assert row.activations_per_sample == max(2 * 300, 300 + 4 * 100) == 700
    assert row.ddp == ddp + 700


def test_memory_model_lora_rows_hold_the_base_once(plan):
    counts = _counts(plan)
    row = plan.plan_row("sd15", counts, "sid-lsg", True, PER_SAMPLE, batch=1, world=8)
    ddp = 100 * 2 + 50 * 4 + 1000 * 2 + 10 * (4 + 8 + 4 + 4) + 10 * (4 + 8 + 4) + 10 * 4
    assert row.static_ddp == ddp
    assert row.activations_per_sample == max(2 * 50, 50 + 4 * 100)
    w = plan.plan_row("sd15", counts, "w-distill", True, PER_SAMPLE, batch=1, world=8)
    # fp32 frozen base (with cond_proj), the adapter + cond_proj trained, autocast copies of the base
    assert w.static_ddp == 100 * 2 + 1010 * 4 + (10 + 10) * (4 + 8 + 4 + 4 + 4) + 1010 * 2


def test_unmeasured_sdxl_regimes_scale_by_sd15_ratios(plan):
    derived = {f"sd15/{r}/16": {"per_sample_full": v} for r, v in PER_SAMPLE.items()}
    derived |= {"sdxl/full/32": {"per_sample_full": 900.0}, "sdxl/through/32": {"per_sample_full": 250.0},
                "sd15/full/32": {"per_sample_full": 1.0}}
    table, estimated = plan.table_activations(derived, {"sd15": 16, "sdxl": 32})
    assert table["sd15"] == PER_SAMPLE
    assert table["sdxl"] == {"full": 900.0, "through": 250.0, "lora": 150.0, "full-gc": 90.0}
    assert sorted(estimated) == ["sdxl/full-gc", "sdxl/lora"]

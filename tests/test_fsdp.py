"""FSDP2 (--fsdp, or an accelerate FSDP environment) on two CPU processes (gloo, under torchrun), for every method:
it trains as DDP does (cfg-distill, progressive with its round teacher sharded, sid-lsg with its teacher and EMA
sharded), writes the same checkpoints, validation grids and exports, resumes exactly, runs bf16 with gradient
checkpointing, shards LoRA students of the shard-loop methods; and what it does not support yet (LoRA students
of progressive and sid-lsg) is refused in one line. The DDP reference runs are also the tests of progressive and
sid-lsg under DDP."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from helpers import assert_images_close, fit_args, progressive_args, sid_args
from trainer.cli import main

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
# Adam's epsilon is raised so that weights whose gradient is zero up to rounding (biases in front of a GroupNorm)
# are not moved by lr-sized steps of rounding noise: DDP and FSDP sum the gradients in another order, so with
# the default 1e-8 such weights end up ~2e-5 apart while the rest agree to the last bit or two. With 1e-3 the
# two runs differ by rounding only, and a real difference (gradients not averaged, a shard lost, a wrong
# clipping norm: the update then scales with the gradient) moves weights by the size of an update.
STEPS = ("--max-steps", 4, "--checkpoint-every", 2, "--gradient-accumulation-steps", 2, "--ema-decay", 0.99,
         "--adam-epsilon", 1e-3, "--num-workers", 0)
# docs/trainer.md's fsdp.yaml for 2 processes, with accelerate's activation checkpointing on. Without GPUs
# `accelerate launch` still starts the processes with torchrun; trainer.fsdp turns FSDP on for them.
ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: true
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: BasicTransformerBlock,ResnetBlock2D
  fsdp_offload_params: false
  fsdp_cpu_ram_efficient_loading: false
  fsdp_activation_checkpointing: true
"""
# what that config puts in the environment (less the wrap policy: trainer.fsdp then wraps the same blocks)
ACCELERATE_FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true",
                       "FSDP_OFFLOAD_PARAMS": "false", "FSDP_ACTIVATION_CHECKPOINTING": "true"}
UNET = "unet/diffusion_pytorch_model.safetensors"


def _launch(command: list) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    done = subprocess.run(list(map(str, command)), cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"{command[2:]} exited {done.returncode}:\n{done.stderr[-4000:]}"


def _torchrun(args) -> None:
    _launch([*TORCHRUN, "-m", "trainer.cli", *args])


def _accelerate_launch(config, args) -> None:
    with socket.socket() as probe:  # a free port: other tests' torchruns may hold the default one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--main_process_port", port,
             "-m", "trainer.cli", *args])


def _assert_close(a: dict, b: dict, tolerance: float, relative: bool = False) -> None:
    """Every tensor within `tolerance`, absolute or (relative) of the tensor's largest value."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    scale = {k: a[k].float().abs().max().item() if relative else 1.0 for k in a}
    differences = {k: (a[k].float() - b[k].float()).abs().max().item() / max(scale[k], 1e-30) for k in a}
    worst = max(differences, key=differences.get)
    assert differences[worst] <= tolerance, f"{worst} differs by {differences[worst]:.3g}"


def _assert_moments_close(a: dict, b: dict) -> None:
    """Adam's states, each kind (exp_avg, exp_avg_sq, step) within 1e-4 of its largest value over all tensors.
    sid-lsg's moments (beta1 = 0: exp_avg is the last gradient) differ by up to 1.6e-5 of that scale (measured):
    the generator's gradient goes through differences of the teacher's and the fake network's outputs, which
    turn the fake network's rounding-level differences into relative ones, and some tensors' gradients are
    rounding noise themselves. A gradient not averaged, or one shard's lost, is off by its own size."""
    for kind in ("exp_avg", "exp_avg_sq", "step"):
        keys = [k for k in a if k.endswith(f".{kind}")]
        scale = max(a[k].float().abs().max().item() for k in keys)
        _assert_close({k: a[k] for k in keys}, {k: b[k] for k in keys}, 1e-4 * scale)


def _checkpoint(out, step: int, name: str) -> dict:
    return load_file(str(out / "checkpoints" / f"step-{step:08d}" / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, teacher_dir, cfg_shards):
    out = tmp_path_factory.mktemp("fsdp") / "ddp"
    _torchrun(fit_args("cfg-distill", teacher_dir, cfg_shards, out, *STEPS))
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, teacher_dir, cfg_shards):
    out = tmp_path_factory.mktemp("fsdp") / "fsdp"
    _torchrun(fit_args("cfg-distill", teacher_dir, cfg_shards, out, *STEPS, "--fsdp"))
    return out


def test_fsdp_trains_as_ddp_and_writes_the_same_checkpoints(ddp_run, fsdp_run, teacher_dir):
    """4 steps of 2 micro-batches of 4 per process, with clipping and EMA. Measured: the exported (EMA) UNets
    and the step-4 weights differ by at most 6e-8 (one float32 ulp of the weights near 0.5-1); the update itself
    is up to 3.6e-4, so a bug of its size is far above the tolerance."""
    teacher = load_file(str(teacher_dir / UNET))
    exported, trained = load_file(str(fsdp_run / UNET)), _checkpoint(fsdp_run, 4, "unet")
    assert max((trained[k] - teacher[k]).abs().max().item() for k in teacher) > 1e-4  # it trained
    _assert_close(load_file(str(ddp_run / UNET)), exported, 1e-6)
    _assert_close(_checkpoint(ddp_run, 4, "unet"), trained, 1e-6)
    _assert_close(_checkpoint(ddp_run, 4, "ema"), _checkpoint(fsdp_run, 4, "ema"), 1e-6)
    # one format whatever the run type: the same files, tensors (names, shapes, dtypes) and structures
    for step in (2, 4):
        folders = [run / "checkpoints" / f"step-{step:08d}" for run in (ddp_run, fsdp_run)]
        assert sorted(p.name for p in folders[0].iterdir()) == sorted(p.name for p in folders[1].iterdir())
        for name in ("unet", "optimizer", "ema", "lr_scheduler"):
            ddp, fsdp = (load_file(str(folder / f"{name}.safetensors")) for folder in folders)
            assert {k: (v.shape, v.dtype) for k, v in ddp.items()} == {k: (v.shape, v.dtype) for k, v in fsdp.items()}
            if name != "unet":
                assert json.loads((folders[0] / f"{name}.json").read_text()) == \
                       json.loads((folders[1] / f"{name}.json").read_text())
    configs = [json.loads((run / "unet" / "config.json").read_text()) for run in (ddp_run, fsdp_run)]
    assert configs[0] == configs[1]


def test_fsdp_resume_equals_uninterrupted(fsdp_run, teacher_dir, cfg_shards, tmp_path):
    """--fsdp to step 2 under torchrun, then on to 4 from its checkpoint under `accelerate launch --config_file
    fsdp.yaml` (no --fsdp; with accelerate's activation checkpointing, so its wrapped parameter names are loaded
    into too) == the 4 steps straight. Measured: bit-equal weights, optimizer state and EMA."""
    out = tmp_path / "resumed"
    args = fit_args("cfg-distill", teacher_dir, cfg_shards, out, *STEPS)
    _torchrun([*args, "--max-steps", 2, "--fsdp"])
    (tmp_path / "fsdp.yaml").write_text(ACCELERATE_CONFIG)
    _accelerate_launch(tmp_path / "fsdp.yaml", [*args, "--resume", "latest"])
    _assert_close(load_file(str(fsdp_run / UNET)), load_file(str(out / UNET)), 1e-6)
    for name in ("unet", "ema"):
        _assert_close(_checkpoint(fsdp_run, 4, name), _checkpoint(out, 4, name), 1e-6)
    _assert_close(_checkpoint(fsdp_run, 4, "optimizer"), _checkpoint(out, 4, "optimizer"), 1e-6, relative=True)


LORA = ("--lora-rank", 4, "--w-embedding-dim", 16)  # w-distill's adapter and its w embedding


def test_lora_student_under_fsdp_trains_as_ddp_and_resumes_from_a_ddp_checkpoint(teacher_dir, cfg_shards, tmp_path):
    """A w-distill LoRA student (the frozen base sharded with its adapter; the w embedding trained whole): 4 DDP
    steps against 2 DDP steps continued with --fsdp from their checkpoint (gathered adapter and EMA in the DDP
    layout, scattered on resume). The exported adapter files and the checkpoint's trained weights agree within
    rounding: measured 1.6e-10, where the last 2 steps move them by 1.8e-4 (the w embedding's weights are
    themselves at most 1.7e-4, hence the tolerance 1e-8)."""
    from students.lora import EMBEDDING_FILE, LORA_FILE

    ddp, mixed = tmp_path / "ddp", tmp_path / "mixed"
    _torchrun(fit_args("w-distill", teacher_dir, cfg_shards, ddp, *STEPS, *LORA))
    (mixed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ddp / "checkpoints" / "step-00000002", mixed / "checkpoints" / "step-00000002")
    _torchrun(fit_args("w-distill", teacher_dir, cfg_shards, mixed, *STEPS, *LORA, "--resume", "latest", "--fsdp"))
    for name in ("unet", "ema"):
        _assert_close(_checkpoint(ddp, 4, name), _checkpoint(mixed, 4, name), 1e-8)
    for name in (LORA_FILE, EMBEDDING_FILE):
        _assert_close(load_file(str(ddp / name)), load_file(str(mixed / name)), 1e-8)
    trained = _checkpoint(mixed, 4, "unet")
    assert any("lora_B" in k for k in trained) and any("cond_proj" in k for k in trained)
    assert max(v.abs().max().item() for k, v in trained.items() if "lora_B" in k) > 0  # B starts at 0: it trained
    record = json.loads((mixed / "distillation.json").read_text())
    assert record["adapter"]["rank"] == 4 and record["adapter"]["files"]["guidance_embedding"] == EMBEDDING_FILE


def test_w_distill_bf16_gradient_checkpointing_exports_a_pipeline(teacher_dir, cfg_shards, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "w"
    _torchrun(fit_args("w-distill", teacher_dir, cfg_shards, out, "--max-steps", 2, "--num-workers", 0, "--fsdp",
                       "--mixed-precision", "bf16", "--gradient-checkpointing"))
    weights = load_file(str(out / UNET))
    assert weights.keys() == _checkpoint(out, 2, "unet").keys()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    assert weights["time_embedding.cond_proj.weight"].abs().max() > 0  # the w embedding (zero at start) trained
    record = json.loads((out / "distillation.json").read_text())
    assert record["method"] == "w-distill" and record["mixed_precision"] == "bf16" and record["steps"] == 2
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    image = pipe("a red square", num_inference_steps=2, guidance_scale=6.0, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()


# progressive from 4 steps to 1: two rounds of 2 steps, a checkpoint after each, validation grids at steps 0, 2, 4
PROGRESSIVE = ("--start-steps", 4, "--end-steps", 1, "--iters-per-round", 2, "--checkpoint-every", 1,
               "--batch-size", 2, "--epochs", "--ema-decay", 0.9, "--adam-epsilon", 1e-3, "--validate-every", 2)


@pytest.fixture(scope="module")
def validation_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("validation") / "prompts.txt"
    path.write_text("a red square\na blue circle\n")
    return path


def _progressive_run(tmp_path_factory, w_student, cfg_shards, prompts, *extra):
    out = tmp_path_factory.mktemp("progressive") / "out"
    _torchrun(progressive_args(w_student, cfg_shards, out, *PROGRESSIVE, "--validation-prompts", prompts, *extra))
    return out


@pytest.fixture(scope="module")
def progressive_ddp(tmp_path_factory, w_student, cfg_shards, validation_prompts):
    return _progressive_run(tmp_path_factory, w_student, cfg_shards, validation_prompts)


@pytest.fixture(scope="module")
def progressive_fsdp(tmp_path_factory, w_student, cfg_shards, validation_prompts):
    return _progressive_run(tmp_path_factory, w_student, cfg_shards, validation_prompts, "--fsdp")


def _round(out, steps: int) -> dict:
    return load_file(str(out / f"round-{steps:02d}steps" / UNET))


def _pixels(path):
    from PIL import Image

    return [np.asarray(Image.open(path))]


def test_progressive_under_fsdp_trains_validates_and_exports_as_ddp(progressive_ddp, progressive_fsdp, w_student):
    """Both rounds' students (EMA, written by the main process from the gathered shards), the checkpoints and the
    validation grids (gathered for sampling) of an FSDP run, student and round teacher sharded, against DDP's.
    Measured: the round students 6e-8 and 1.2e-7 apart, where step 4 alone moves the student by 9.7e-5."""
    start = load_file(str(w_student / UNET))
    assert max((_round(progressive_fsdp, 1)[k] - start[k]).abs().max().item() for k in start) > 1e-4  # it trained
    for steps in (2, 1):
        _assert_close(_round(progressive_ddp, steps), _round(progressive_fsdp, steps), 1e-6)
    for name in ("unet", "ema"):
        _assert_close(_checkpoint(progressive_ddp, 3, name), _checkpoint(progressive_fsdp, 3, name), 1e-6)
    grids = sorted(p.name for p in (progressive_fsdp / "samples").iterdir())
    assert grids == ["step-00000000.png", "step-00000002.png", "step-00000004.png"], grids
    for grid in grids:
        assert_images_close(_pixels(progressive_ddp / "samples" / grid), _pixels(progressive_fsdp / "samples" / grid),
                            max_fraction=1e-2)  # 2 images of 32 px: 25 pixels
    records = [json.loads((progressive_fsdp / f"round-0{n}steps" / "distillation.json").read_text()) for n in (2, 1)]
    assert [r["global_batch_size"] for r in records] == [4, 4] and [r["round"] for r in records] == [1, 2]
    assert sorted(p.name for p in (progressive_ddp / "checkpoints/step-00000004").glob("rng-rank*.json")) == [
        "rng-rank0.json", "rng-rank1.json"]


def test_progressive_fsdp_resume_mid_round_with_a_replicated_teacher(progressive_fsdp, w_student, cfg_shards,
                                                                     validation_prompts, tmp_path):
    """The FSDP run's checkpoint inside round 2 (step 3), continued with the round teacher replicated instead of
    sharded, ends where the uninterrupted run does: bit-equal on this CPU (the teacher only runs forward), held
    to 1e-6 since whole and gathered weights may take other kernels elsewhere (sid-lsg's do: one ulp)."""
    out = tmp_path / "resumed"
    shutil.copytree(progressive_fsdp, out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    shutil.rmtree(out / "round-01steps")
    _torchrun(progressive_args(w_student, cfg_shards, out, *PROGRESSIVE, "--validation-prompts", validation_prompts,
                               "--fsdp", "--fsdp-teacher", "replicate", "--resume", "latest"))
    _assert_close(_round(progressive_fsdp, 1), _round(out, 1), 1e-6)
    _assert_moments_close(_checkpoint(progressive_fsdp, 4, "optimizer"), _checkpoint(out, 4, "optimizer"))


# sid-lsg: 2 iterations of 2 micro-batches of 2 per process, EMA, prompt dropout, a checkpoint and a grid each
SID = ("--max-kimg", 0.016, "--gradient-accumulation-steps", 2, "--ema-halflife-kimg", 0.008,
       "--checkpoint-every-kimg", 0.008, "--grid-every-kimg", 0.008, "--grid-prompts", 2, "--adam-epsilon", 1e-3)


@pytest.fixture(scope="module")
def sid_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("sid") / "prompts.txt"
    path.write_text("".join(f"a {colour} {thing}\n" for colour in ("red", "blue") for thing in ("cat", "house")))
    return path


@pytest.fixture(scope="module")
def sid_ddp(tmp_path_factory, teacher_dir, sid_prompts):
    out = tmp_path_factory.mktemp("sid") / "ddp"
    _torchrun(sid_args(teacher_dir, sid_prompts, out, *SID))
    return out


@pytest.fixture(scope="module")
def sid_fsdp(tmp_path_factory, teacher_dir, sid_prompts):
    out = tmp_path_factory.mktemp("sid") / "fsdp"
    _torchrun(sid_args(teacher_dir, sid_prompts, out, *SID, "--fsdp"))
    return out


SID_PARTS = ("generator", "fake_score", "generator_ema")


def test_sid_lsg_under_fsdp_trains_samples_and_exports_as_ddp(sid_ddp, sid_fsdp, teacher_dir):
    """Generator, fake score network, their Adam states and the EMA sharded, and the frozen teacher too: the
    checkpoints, the exported EMA generator and the grids (sampled from the gathered EMA) against DDP's.
    Measured: the generator and its EMA 7.0e-7 apart, the fake network 3.3e-7, where iteration 2 alone moves the
    generator by 1.4e-4 (the generator's gradient goes through differences of the teacher's and the fake
    network's outputs, which make rounding relative); the tolerance, 5e-6, is 3.5 % of that one update."""
    teacher = load_file(str(teacher_dir / UNET))
    generator = _checkpoint(sid_fsdp, 2, "generator")
    assert max((generator[k] - teacher[k]).abs().max().item() for k in teacher) > 1e-4  # it trained
    for name in SID_PARTS:
        _assert_close(_checkpoint(sid_ddp, 2, name), _checkpoint(sid_fsdp, 2, name), 5e-6)
    for name in ("generator_optimizer", "fake_optimizer"):
        _assert_moments_close(_checkpoint(sid_ddp, 2, name), _checkpoint(sid_fsdp, 2, name))
    _assert_close(load_file(str(sid_fsdp / UNET)), _checkpoint(sid_fsdp, 2, "generator_ema"), 0.0)
    grids = sorted(p.name for p in (sid_fsdp / "samples").iterdir())
    assert grids == ["kimg-0000000.000.png", "kimg-0000000.008.png", "kimg-0000000.016.png"], grids
    for grid in grids:
        assert_images_close(_pixels(sid_ddp / "samples" / grid), _pixels(sid_fsdp / "samples" / grid),
                            max_fraction=1e-2)
    record = json.loads((sid_fsdp / "distillation.json").read_text())
    assert record["global_batch_size"] == 8 and record["iterations"] == 2 and record["kimg"] == 0.016
    assert sorted(p.name for p in (sid_ddp / "checkpoints/step-00000002").glob("rng-rank*.json")) == [
        "rng-rank0.json", "rng-rank1.json"]


def test_sid_lsg_fsdp_resume_equals_uninterrupted(sid_fsdp, teacher_dir, sid_prompts, tmp_path):
    """The FSDP run's first-iteration checkpoint, continued under FSDP, ends where the uninterrupted run does: bit
    for bit. (With the teacher replicated instead, the same run ends 1 float32 ulp away: the generator's
    gradient goes through the teacher, whose sharded and whole parameters take other kernels' rounding.)"""
    out = tmp_path / "resumed"
    shutil.copytree(sid_fsdp, out)
    shutil.rmtree(out / "checkpoints" / "step-00000002")
    _torchrun(sid_args(teacher_dir, sid_prompts, out, *SID, "--fsdp", "--resume", "latest"))
    for name in (*SID_PARTS, "generator_optimizer", "fake_optimizer"):
        _assert_close(_checkpoint(sid_fsdp, 2, name), _checkpoint(out, 2, name), 0.0)


SKIPPED_STEP = """\
import contextlib
import torch
from accelerate import Accelerator
from diffusion.tiny import tiny_components
from trainer.config import FitConfig
from trainer.fsdp import drop_unreduced_gradients, enable_fsdp, fsdp_plugin, is_sharded, shard_frozen
plugin = fsdp_plugin(FitConfig(method="cfg-distill", teacher="t", shards="s", out="o", fsdp=True))
accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
enable_fsdp(accelerator, plugin)
torch.manual_seed(0)
unet = tiny_components(resolution=32)["unet"].train()
model, optimizer = accelerator.prepare(unet, torch.optim.SGD(unet.parameters(), lr=1.0))
def backward(seed, sync):
    g = torch.Generator().manual_seed(2 * seed + accelerator.process_index)
    x, text = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
        accelerator.backward(model(x, torch.tensor([10, 500]), encoder_hidden_states=text).sample.pow(2).mean())
def gradients():
    found = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    optimizer.zero_grad(set_to_none=True)
    return found
backward(1, sync=False)  # the first micro-batch of a step that a later non-finite loss skips
optimizer.zero_grad(set_to_none=True)
drop_unreduced_gradients(model)
backward(2, sync=True)
after_skip = gradients()
backward(2, sync=True)
clean = gradients()
difference = max((after_skip[n] - clean[n]).abs().max().item() for n in clean)
assert difference == 0, difference
from torch.distributed.tensor import DTensor
g = torch.Generator().manual_seed(3)
model(torch.randn(2, 4, 4, 4, generator=g), torch.tensor([10, 500]),
      encoder_hidden_states=torch.randn(2, 77, unet.config.cross_attention_dim, generator=g))  # no backward: skipped
assert not all(isinstance(p, DTensor) for p in model.parameters())  # the root unit is left gathered
drop_unreduced_gradients(model)
assert all(isinstance(p, DTensor) for p in model.parameters())  # shards again, for the EMA swap and checkpoints
frozen = [tiny_components(resolution=32)["unet"].eval().requires_grad_(False) for _ in range(2)]
assert is_sharded(shard_frozen(accelerator, frozen[0], True))  # --fsdp-teacher shard
assert not is_sharded(shard_frozen(accelerator, frozen[1], False))  # --fsdp-teacher replicate
"""


def test_a_skipped_step_leaves_no_accumulated_gradients_behind(tmp_path):
    """train_step skips a step whose later micro-batch has a non-finite loss: the earlier micro-batches'
    gradients, which FSDP2 keeps unreduced on its unsharded parameters (out of zero_grad's reach), are dropped
    with it (without drop_unreduced_gradients they are added into the next step: measured 0.066 off); and the
    root unit, which a forward without its backward leaves gathered, is sharded again (else a validation's EMA
    swap mixes whole tensors with shards, and a LoRA checkpoint saves the gathered bf16 copies)."""
    (tmp_path / "skipped.py").write_text(SKIPPED_STEP)
    _launch([*TORCHRUN, tmp_path / "skipped.py"])


def _one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    return lines[0]


def test_what_fsdp_does_not_support_yet_is_refused_in_one_line(teacher_dir, cfg_shards, w_student, tmp_path,
                                                               capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    out = tmp_path / "out"
    lora = ("--lora-rank", 4)
    assert main(sid_args(teacher_dir, prompts, out, "--fsdp", *lora)) == 2
    assert "with --lora-rank is not supported yet for --method sid-lsg" in _one_line_error(capsys)
    assert main(progressive_args(w_student, cfg_shards, out, "--fsdp", *lora)) == 2
    assert "with --lora-rank is not supported yet for --method progressive" in _one_line_error(capsys)
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, out, "--fsdp")) == 2  # one process
    assert "start 2 or more" in _one_line_error(capsys)
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, out, "--fsdp-teacher", "replicate")) == 2
    assert "--fsdp-teacher does not apply to --method cfg-distill" in _one_line_error(capsys)
    # an accelerate FSDP environment is held to the same rules, before any Accelerator exists
    for name, value in ACCELERATE_FSDP_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(sid_args(teacher_dir, prompts, out, *lora)) == 2
    assert "with --lora-rank is not supported yet for --method sid-lsg" in _one_line_error(capsys)
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, out)) == 2
    assert "set fsdp_version: 2" in _one_line_error(capsys)
    assert not out.exists()

"""SIGKILL in the middle of writing, then the same command again: `trainer fit --resume latest` and `evaluation
render` end with what an uninterrupted run gives (the build's kill test is in test_build_shards.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import torch
from helpers import fit_args
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO
from evaluation.cli import main as evaluation_main
from trainer.cli import main as trainer_main

# Run a stage's main with one function patched to SIGKILL the process right after its KILL_AT-th call.
KILLER = """
import os, signal, sys, importlib
module, name, stage = sys.argv[1:4]
target = importlib.import_module(module)
original, calls = getattr(target, name), [0]
def killing(*args, **kwargs):
    result = original(*args, **kwargs)
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(target, name, killing)
sys.exit(importlib.import_module(stage).main(sys.argv[4:]))
"""


def _killed(out, patch: tuple[str, str], stage: str, args: list, kill_at: int) -> None:
    env = {**os.environ, "KILL_AT": str(kill_at), "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", KILLER, *patch, stage, *map(str, args)], env=env,
                         capture_output=True, cwd=REPO)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]


def test_fit_killed_while_writing_a_checkpoint_resumes_to_the_same_student(teacher_dir, cfg_shards, tmp_path):
    """Killed inside step 2's checkpoint (its UNet weights written, the rest not): the half-written `.tmp` folder
    is never taken for a checkpoint; --resume latest continues from step 1 and exports the uninterrupted
    run's weights, bit for bit (the same computation on the same shapes)."""
    steps = ("--max-steps", 2, "--checkpoint-every", 1)
    assert trainer_main(fit_args("cfg-distill", teacher_dir, cfg_shards, tmp_path / "whole", *steps)) == 0
    out = tmp_path / "killed"
    args = fit_args("cfg-distill", teacher_dir, cfg_shards, out, *steps)
    _killed(out, ("trainer.resume", "save_weights"), "trainer.cli", args, kill_at=2)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001", "step-00000002.tmp"]
    assert trainer_main([*args, "--resume", "latest"]) == 0
    whole = load_file(tmp_path / "whole" / "unet" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]


def test_render_killed_between_images_resumes_to_the_same_images(teacher_dir, tmp_path):
    """Killed after its third PNG: the re-run renders only the missing ones, and every image equals an
    uninterrupted run's (batch size 1 in both: the same computation on the same shapes)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a {c} circle\n" for c in ("red", "green", "blue", "yellow", "grey")))
    common = ["--model", teacher_dir, "--prompts", prompts, "--num-inference-steps", 2, "--batch-size", 1]
    assert evaluation_main(["render", *common, "--out", tmp_path / "whole"]) == 0
    out = tmp_path / "killed"
    _killed(out, ("evaluation.render", "save_png"), "evaluation.cli", ["render", *common, "--out", out], kill_at=3)
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert evaluation_main(["render", *map(str, common), "--out", str(out)]) == 0
    for i in range(5):
        a, b = (np.asarray(Image.open(folder / "images" / f"{i:05d}.png")) for folder in (tmp_path / "whole", out))
        assert np.array_equal(a, b), i

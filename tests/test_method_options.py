"""What the stages take from the user beyond the data: options of other methods refused by name, the training
resolution checked, recorded and used to sample, and a CPU launch that would start fewer processes than asked."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import build_args, fit_args
from PIL import Image

from evaluation.cli import main as evaluation_main
from pipeline.cli import main as pipeline_main
from trainer.cli import main as trainer_main


@pytest.mark.parametrize("method, option, value", [
    ("w-distill", "--guidance-scale", 3),
    ("w-distill", "--guidance-coefficient", "sigma"),
    ("cfg-distill", "--w-min", 2),
    ("cfg-distill", "--w-max", 8),
    ("classifier-distill", "--w-embedding-dim", 16),
    ("classifier-distill", "--w-loss", "eps"),
])
def test_options_of_other_methods_are_refused_by_name(tmp_path, teacher_dir, cfg_shards, capsys, method, option,
                                                      value):
    """Before: --guidance-scale for w-distill and --w-min/--w-max/--w-embedding-dim for cfg- or classifier-distill
    were accepted and silently ignored."""
    out = tmp_path / "o"
    assert trainer_main(fit_args(method, teacher_dir, cfg_shards, out, option, value)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"Error: {option} does not apply to --method {method}"
    assert not out.exists()


def test_a_config_file_option_of_another_method_is_refused_too(tmp_path, teacher_dir, cfg_shards, capsys):
    config = tmp_path / "fit.json"
    config.write_text(json.dumps({"w-min": 1.0}))
    assert trainer_main(fit_args("cfg-distill", teacher_dir, cfg_shards, tmp_path / "o", "--config", config)) == 2
    assert "--w-min does not apply to --method cfg-distill" in capsys.readouterr().err


def _prompts(folder):
    (folder / "prompts.txt").write_text("a red circle\n")
    return folder / "prompts.txt"


def test_a_student_is_recorded_and_rendered_at_its_training_resolution(tmp_path, teacher_dir, clean_source):
    """Shards at 40 px from a 32-px teacher: the student's distillation.json and UNet config say 40, and
    `evaluation render` draws 40-px images from it (before: 32, the teacher's size, and nothing recorded)."""
    shards, student = tmp_path / "shards", tmp_path / "student"
    assert pipeline_main(build_args(teacher_dir, clean_source, shards, "--resolution", 40, "--samples", 8)) == 0
    assert trainer_main(fit_args("cfg-distill", teacher_dir, shards, student, "--max-steps", 1)) == 0
    assert json.loads((student / "distillation.json").read_text())["resolution"] == 40
    assert json.loads((student / "unet" / "config.json").read_text())["sample_size"] == 20  # VAE factor 2
    assert evaluation_main(["render", "--model", student, "--prompts", _prompts(tmp_path), "--num-inference-steps", 1,
                            "--out", tmp_path / "render"]) == 0
    assert np.asarray(Image.open(tmp_path / "render" / "images" / "00000.png")).shape == (40, 40, 3)


def test_shards_at_a_resolution_the_pipeline_cannot_sample_are_refused_at_fit_time(tmp_path, teacher_dir, cfg_shards,
                                                                                    capsys):
    """Shards recorded at 36 px (built before the check): fit stops at start-up with one line, not at sampling
    time with StableDiffusionPipeline's traceback."""
    shards = tmp_path / "shards"
    shutil.copytree(cfg_shards, shards)
    info = json.loads((shards / "dataset.json").read_text())
    (shards / "dataset.json").write_text(json.dumps({**info, "resolution": 36}))
    assert trainer_main(fit_args("cfg-distill", teacher_dir, shards, tmp_path / "o", "--max-steps", 1)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"Error: --shards {shards}: built at --resolution 36 is not a multiple of 8")
    assert "try 32" in err and "\n" not in err


def test_evaluation_refuses_a_resolution_the_pipeline_cannot_sample(tmp_path, teacher_dir, capsys):
    assert evaluation_main(["render", "--model", teacher_dir, "--prompts", _prompts(tmp_path), "--resolution", 36,
                            "--out", tmp_path / "render"]) == 2
    assert "--resolution 36 is not a multiple of 8" in capsys.readouterr().err


def test_accelerate_cpu_launch_of_several_processes_is_refused(tmp_path, teacher_dir, clean_source, capsys,
                                                               monkeypatch):
    """The environment `accelerate launch --num_processes 2 --cpu` gives its one process (no WORLD_SIZE): refused
    with one line pointing to torchrun, where before it silently ran one process."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert pipeline_main(build_args(teacher_dir, clean_source, tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert "starts one process, not N" in err and "torchrun --nproc_per_node N" in err and "\n" not in err

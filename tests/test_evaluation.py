"""`evaluation` on tiny models, tiny extractors and a tiny COCO in the real layout (sockets blocked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from diffusion.errors import UserError
from evaluation.cli import main
from helpers import assert_images_close, fit_args, write_tiny_coco, write_tiny_inception, write_tiny_vgg


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_tiny_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def extractors(tmp_path_factory, tiny_clip):
    folder = tmp_path_factory.mktemp("weights")
    config, weights = tiny_clip
    return ["--inception-weights", str(write_tiny_inception(folder / "inception-2015-12-05.pt")),
            "--vgg-weights", str(write_tiny_vgg(folder / "vgg16.pt")), "--clip-model", str(config),
            "--clip-weights", str(weights), "--cache-dir", str(folder / "cache")]


@pytest.fixture(scope="module")
def cfg_student(tmp_path_factory, teacher_dir, cfg_shards):
    from trainer.cli import main as trainer_main

    out = tmp_path_factory.mktemp("students") / "cfg"
    assert trainer_main(fit_args("cfg-distill", teacher_dir, cfg_shards, out, "--max-steps", 2)) == 0
    return out


def _images(folder, count):
    return [np.asarray(Image.open(folder / "images" / f"{i:05d}.png")) for i in range(count)]


def test_render_is_per_prompt_seeded_and_resumes(teacher_dir, coco, tmp_path):
    common = ["--model", str(teacher_dir), "--coco", str(coco), "--num-images", 5, "--num-inference-steps", 2]
    assert main(["render", *map(str, common), "--out", str(tmp_path / "a"), "--batch-size", "5"]) == 0
    assert main(["render", *map(str, common), "--out", str(tmp_path / "b"), "--batch-size", "2"]) == 0
    a, b = _images(tmp_path / "a", 5), _images(tmp_path / "b", 5)
    assert a[0].shape == (32, 32, 3)
    assert_images_close(a, b)  # batches of 5 and of 2, 2, 1: the same images up to rounding
    assert np.abs(a[0].astype(int) - a[1]).max() > 10  # other seeds, prompts: other images
    (tmp_path / "b" / "images" / "00003.png").unlink()
    assert main(["render", *map(str, common), "--out", str(tmp_path / "b"), "--batch-size", "2"]) == 0
    log = json.loads((tmp_path / "b" / "render-rank0.json").read_text())
    assert log["rendered"] == [3] and log["skipped"] == 4
    assert_images_close([_images(tmp_path / "b", 5)[3]], [a[3]])
    prompts = json.loads((tmp_path / "a" / "prompts.json").read_text())
    assert len(prompts["prompts"]) == 5 and len(prompts["sha256"]) == 64


def test_coco30k_end_to_end_and_reference_cache(cfg_student, coco, extractors, tmp_path, capsys):
    args = ["coco30k", "--model", str(cfg_student), "--coco", str(coco), "--num-images", "8",
            "--num-inference-steps", "2", "--out", str(tmp_path / "eval"), *extractors]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for name in ("fid", "clip_score", "precision", "recall"):
        assert isinstance(metrics[name], float) and np.isfinite(metrics[name])
    assert -1.0 <= metrics["clip_score"] <= 1.0 and 0.0 <= metrics["precision"] <= 1.0
    assert metrics["model"]["kind"] == "cfg-distill" and metrics["model"]["guidance_scale"] == 1.0
    protocol = metrics["protocol"]
    assert protocol["num_images"] == 8 and protocol["eval_size"] == 256 and protocol["resolution"] == 32
    assert set(protocol["weights_sha256"]) == {"fid", "clip", "pr"}
    assert (tmp_path / "eval" / "grid.png").is_file() and "| fid |" in (tmp_path / "eval" / "report.md").read_text()
    cached = sorted(Path(extractors[-1]).glob("*.npz"))
    assert [p.name.split("-")[0] for p in cached] == ["inception", "vgg16"]
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert main(args) == 0  # all images on disk, reference features from the cache
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["fid"] == pytest.approx(metrics["fid"])


def test_missing_weights_file_is_one_clear_line(cfg_student, coco, tmp_path, capsys):
    assert main(["coco30k", "--model", str(cfg_student), "--coco", str(coco), "--metrics", "fid", "--num-images", "4",
                 "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--inception-weights FILE" in err and "inception-2015-12-05.pt" in err
    assert not (tmp_path / "e" / "images").exists()  # it stopped before rendering anything


def test_clip_scorer_loads_through_pretrained_file_and_scores(tiny_clip):
    import open_clip

    from evaluation.extractors import CLIP_PREFIX, ClipScorer

    config, weights = tiny_clip
    scorer = ClipScorer(str(config), weights)
    images = [np.full((256, 256, 3), value, dtype=np.uint8) for value in (30, 200)]
    got = scorer.scores(images, ["a dark square", "a bright square"])
    model = open_clip.create_model("tiny-clip", pretrained=str(weights)).eval()
    tokenizer = open_clip.get_tokenizer("tiny-clip")
    with torch.no_grad():
        image = model.encode_image(torch.stack([scorer.preprocess(Image.fromarray(a)) for a in images]))
        text = model.encode_text(tokenizer([CLIP_PREFIX + "a dark square", CLIP_PREFIX + "a bright square"]))
    expected = torch.nn.functional.cosine_similarity(image, text).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_model_kinds_and_their_refusals(teacher_dir, cfg_student):
    from evaluation.models import describe_model, parse_model_arg

    assert describe_model(str(teacher_dir)).kind == "teacher" and describe_model(str(teacher_dir)).guidance_scale == 7.5
    assert parse_model_arg(f"{teacher_dir}@blue=50").kind == "teacher-classifier"
    assert parse_model_arg(str(cfg_student)).guidance_scale == 1.0
    with pytest.raises(UserError, match="guidance distilled in"):
        describe_model(str(cfg_student), 7.5)
    with pytest.raises(UserError, match="applies to a teacher"):
        describe_model(str(cfg_student), None, "blue")


def test_speed_counts_passes_per_step(teacher_dir, cfg_student, tmp_path):
    out = tmp_path / "speed"
    assert main(["speed", "--model", f"{teacher_dir}@cfg=7.5", "--model", f"{teacher_dir}@blue=100",
                 "--model", str(cfg_student), "--out", str(out), "--num-inference-steps", "3", "--repeats", "2",
                 "--batch-size", "2"]) == 0
    results = {r["kind"]: r for r in json.loads((out / "speed.json").read_text())["results"]}
    assert results["teacher"]["unet_passes_per_step"] == 2.0  # cond + uncond
    assert results["cfg-distill"]["unet_passes_per_step"] == 1.0
    assert results["teacher-classifier"]["unet_passes_per_step"] == 1.0
    assert results["teacher-classifier"]["backward_per_step"] is True
    assert results["teacher"]["time_over_cfg_teacher"] == 1.0 and "time_over_classifier_teacher" in results["cfg-distill"]
    for result in results.values():  # times from 2 interleaved turns, the median batch; memory from a fresh process
        turns = result["seconds_per_batch_by_turn"]
        assert len(turns) == 2 and result["seconds_per_image"] == pytest.approx(sum(turns) / 2 / 2)
        assert result["peak_memory_mb"] is None or result["peak_memory_mb"] >= 0
    references = [("teacher", "time_over_cfg_teacher"), ("teacher-classifier", "time_over_classifier_teacher")]
    for teacher, field in references:
        assert [results[teacher][f"{field}{s}"] for s in ("", "_median", "_min", "_max")] == [1.0] * 4
        for result in results.values():
            assert result[f"{field}_min"] <= result[field] <= result[f"{field}_max"]
            assert result[f"{field}_min"] <= result[f"{field}_median"] <= result[f"{field}_max"]
    header = (out / "speed.md").read_text().splitlines()[0]
    assert "seconds_per_step" in header and "time_over_cfg_teacher_min | time_over_cfg_teacher_max" in header
    assert (out / "speed.png").is_file()


def test_speed_interleaves_models_in_rotating_turns(monkeypatch):
    from functools import partial
    from types import SimpleNamespace

    from evaluation import speed

    calls = []
    seconds = speed.interleaved_seconds({name: partial(calls.append, name) for name in "abc"}, repeats=3)
    assert "".join(calls) == "abc" + "bca" + "cab" + "abc"  # a warm-up turn, then 3 timed turns, rotating
    assert {name: len(s) for name, s in seconds.items()} == {"a": 3, "b": 3, "c": 3}

    def fake_fresh(spec, prompts, steps, repeats, **_):  # memory process: 1 run after warm-up, times discarded
        assert repeats == speed.MEMORY_REPEATS == 1
        return {"label": spec.label, "kind": spec.kind, "guidance_scale": spec.guidance_scale,
                "batch_size": len(prompts), "steps": 4, "seconds_per_image": 99.0, "peak_memory_mb": 10.0}

    turns = [[2.0, 4.0, 3.0], [1.0, 1.0, 3.0]]  # reference, then a model at 1/2, 1/4, 1
    monkeypatch.setattr(speed, "measure_in_fresh_process", fake_fresh)
    monkeypatch.setattr(speed, "time_interleaved", lambda specs, *a, **k: turns[:len(specs)])
    specs = [SimpleNamespace(label=label, kind=kind, guidance_scale=scale)
             for label, kind, scale in [("cfg", "teacher", 7.5), ("student", "cfg-distill", 1.0)]]
    teacher, student = speed.measure_all(specs, ["p", "p"], 4, 3, "fp32", "cpu")
    assert teacher["seconds_per_image"] == 1.5 and teacher["seconds_per_step"] == 0.75
    assert student["time_over_cfg_teacher"] == 1 / 3  # median 1 over median 3
    assert (student["time_over_cfg_teacher_median"], student["time_over_cfg_teacher_min"],
            student["time_over_cfg_teacher_max"]) == (0.5, 0.25, 1.0)
    assert [teacher[f"time_over_cfg_teacher{s}"] for s in ("", "_median", "_min", "_max")] == [1.0] * 4


def test_sweep_writes_csv_and_plot(teacher_dir, cfg_student, coco, extractors, tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", "--teacher", str(teacher_dir), "--scales", "1,4", "--model", str(cfg_student),
                 "--coco", str(coco), "--num-images", "4", "--num-inference-steps", "2", "--out", str(out),
                 *extractors]) == 0
    rows = (out / "sweep.csv").read_text().splitlines()
    assert rows[0] == "label,kind,guidance_scale,fid,clip_score" and len(rows) == 4
    assert (out / "sweep.png").is_file()


def test_torchrun_render_splits_prompts_without_overlap(teacher_dir, coco, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "evaluation.cli",
               "render", "--model", str(teacher_dir), "--coco", str(coco), "--num-images", "5",
               "--num-inference-steps", "2", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = [json.loads((out / f"render-rank{r}.json").read_text())["rendered"] for r in (0, 1)]
    assert logs == [[0, 2, 4], [1, 3]] and len(list((out / "images").glob("*.png"))) == 5

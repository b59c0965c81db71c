"""The demo's fast variant: the digits world and every method through the real commands, end to end.

It proves the chain (world -> build-shards -> fit -> evaluation -> report), not the quality: the fast world's
teacher trains for a few steps only. `make demo` runs the full version.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory):
    from demo.__main__ import main

    out = tmp_path_factory.mktemp("demo")
    with pytest.raises(SystemExit) as done:
        main(["--out", str(out), "--fast", "--compare-w-loss", "--lora"])
    assert done.value.code in (0, None)
    return out


def test_world_is_in_the_real_formats(fast_demo):
    from diffusers import StableDiffusionPipeline

    from digits.data import digit_in
    from evaluation.coco import read_captions, reference_images
    from pipeline.sources import list_units

    world = fast_demo / "world"
    info = json.loads((world / "world.json").read_text())
    assert info["data"]["train_images"] + info["data"]["eval_images"] == 1797
    assert 0.0 <= info["classifier"]["heldout_accuracy"] <= 1.0
    units = list_units(str(world / "source"), 500, "file", "caption")
    assert sum(u.count() for u in units) == info["data"]["train_records"]
    captions = read_captions(world / "coco")
    assert len(captions) == 2 * info["data"]["eval_images"] and all(digit_in(c["caption"]) is not None for c in captions)
    assert len(reference_images(world / "coco")) == info["data"]["eval_images"]
    pipe = StableDiffusionPipeline.from_pretrained(world / "teacher", local_files_only=True)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32


def test_train_and_eval_splits_are_disjoint():
    from digits.data import load_digits, split

    _, labels = load_digits()
    train, evaluation = split(labels)
    assert not set(train) & set(evaluation) and len(train) + len(evaluation) == len(labels)
    assert set(labels[evaluation]) == set(range(10))


def test_report_has_every_section_and_grids(fast_demo):
    report = (fast_demo / "report.md").read_text()
    for heading in ("Table 5 of the seed", "One-step generation", "Fewer steps", "across CFG scales",
                    "Blue-tone guidance", "Time and memory", "Samples", "w-distill's loss", "Bad inputs",
                    "LoRA students against full ones", "LoRA as an acceleration module",
                    "SDXL teachers: the same commands"):
        assert heading in report
    sdxl = json.loads((fast_demo / "sdxl-check.json").read_text())
    assert sdxl["schema_version"] == 2 and sdxl["micro"] == [[32, 32, 0, 0, 32, 32]]  # the world's 32 px images
    assert sdxl["recompute_max_abs_error"] < 2e-3 and sdxl["pipeline"] == "StableDiffusionXLPipeline"
    assert sdxl["unet_batches_4_steps"] == [1, 1, 1, 1] and sdxl["image_shape"] == [1, 32, 32, 3]
    assert (sdxl["fit_processes"], sdxl["fit_fsdp"], sdxl["global_batch_size"]) == (2, True, 16)
    check = json.loads((fast_demo / "inputs-check.json").read_text())
    assert set(check["dataset"]["skipped"]) == {
        "unreadable_image", "image_too_small", "image_too_large", "missing_caption", "empty_caption",
        "caption_not_utf8", "truncated_tar", "empty_tar", "not_a_tar", "duplicate_key"}
    assert check["dataset"]["converted_image_modes"]["I;16"] == 1
    assert not check["inspect_valid"] and check["fit_exit_code"] == 2 and "is damaged" in check["fit_error"][0]
    for loss in ("x0", "eps"):
        w_loss_row = next(line for line in report.splitlines() if line.startswith(f"| {loss},"))
        assert w_loss_row.count("|") == 6 and "|  |" not in w_loss_row  # digit-CLIP and -FID at w = 1 and 3
    record = json.loads((fast_demo / "student-w-eps" / "distillation.json").read_text())
    assert record["w_loss"] == "eps" and json.loads((fast_demo / "student-w" / "distillation.json").read_text())[
        "w_loss"] == "x0"
    assert "| student-cfg (distilled, no guidance) |" in report
    grid = np.asarray(Image.open(fast_demo / "grids.png"))
    # sweep points (2 scales + 5 students), three blue rows, progressive at 1 and 2, three red-ink variant rows
    assert grid.shape[0] == 64 * 15
    assert "| student-sid, one step (SiD-LSG, kappa 3) | 1 |" in report
    sid = json.loads((fast_demo / "student-sid" / "distillation.json").read_text())
    assert sid["method"] == "sid-lsg" and sid["kimg"] == 0.016 and sid["iterations"] == 2
    assert len(list((fast_demo / "student-sid" / "samples").glob("*.png"))) == 3  # start, then each of 2 iterations
    rounds = [json.loads((fast_demo / "student-progressive" / f"round-0{n}steps" / "distillation.json").read_text())
              for n in (2, 1)]
    assert [r["steps"] for r in rounds] == [2, 1] and [r["timesteps"] for r in rounds] == [[999, 499], [999]]
    few_section = report.split("## Fewer steps")[1].split("\n## ")[0]
    few = [line for line in few_section.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(few) == 2 and few[1].count("|") == 10 and "|  |" not in few[1]  # 2 steps: every column filled
    w_loss_section = report.split("## w-distill's loss")[1].split("\n## ")[0]
    progressive = [line for line in w_loss_section.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(progressive) == 2 and all(line.count("|") == 6 and "|  |" not in line for line in progressive)
    for name in ("cfg", "blue", "w"):
        record = json.loads((fast_demo / f"student-{name}" / "distillation.json").read_text())
        assert record["steps"] == 4
    assert (fast_demo / "eval" / "sweep" / "sweep.png").is_file()


def test_lora_students_and_the_acceleration_module(fast_demo):
    report = (fast_demo / "report.md").read_text()
    assert "| student-cfg-lora (LoRA rank 8, merged; no guidance) | 3 |" in report
    for name, method in (("cfg-lora", "cfg-distill"), ("sid-lora", "sid-lsg")):
        record = json.loads((fast_demo / f"student-{name}" / "distillation.json").read_text())
        assert record["method"] == method and record["adapter"]["rank"] == 8 and record["adapter"]["merged_pipeline"]
    lora_rows = [line for line in report.split("## LoRA students")[1].split("\n## ")[0].splitlines()
                 if line.startswith(("| cfg-distill |", "| sid-lsg |"))]
    assert len(lora_rows) == 2 and all(line.count("|") == 8 and "|  |" not in line for line in lora_rows)
    applied = json.loads((fast_demo / "student-cfg-lora-on-variant" / "distillation.json").read_text())
    variant = fast_demo / "variant-red"
    assert applied["adapter"]["base"] == str(variant.resolve()) and applied["method"] == "cfg-distill"
    assert json.loads((variant / "variant.json").read_text())["recipe"]["steps"] == 2
    module = report.split("## LoRA as an acceleration module")[1].split("\n## ")[0]
    rows = [line for line in module.splitlines() if line.startswith(("| red-ink", "| base teacher"))]
    assert len(rows) == 5 and all(line.count("|") == 6 and "|  |" not in line for line in rows)
    assert [line.rsplit("|", 2)[1].strip() for line in rows] == ["1", "2", "1", "2", "1"]  # UNet passes per step


def test_report_without_the_lora_stages(fast_demo, tmp_path):
    """`make demo` without --lora: the report leaves out the LoRA rows, sections and grid rows, nothing else."""
    import shutil

    from demo.report import write_report
    from demo.settings import FAST
    from digits.world import build_world

    root = tmp_path / "demo"
    shutil.copytree(fast_demo, root, ignore=shutil.ignore_patterns("student-*-lora*", "variant-red", "lora-module"))
    world = build_world(root / "world", FAST.world, log=lambda _: None)
    report = write_report(root, world, FAST, 60.0).read_text()
    assert "## Table 5 of the seed" in report and "## Bad inputs" in report
    assert "LoRA" not in report and "w-distill's loss" not in report
    assert np.asarray(Image.open(root / "grids.png")).shape[0] == 64 * 12  # 15 rows less the three red-ink ones


def test_captions_name_their_digit_and_images_are_coloured():
    import random

    from digits.data import TEMPLATES, WORDS, caption, digit_in, load_digits, to_image

    rng = random.Random(0)
    assert all(digit_in(caption(d, rng)) == d for d in range(10) for _ in range(20))
    assert all(digit_in(t.format(word=WORDS[3], digit=3)) == 3 for t in TEMPLATES)
    images, _ = load_digits()
    plain = np.asarray(to_image(images[0]))
    assert plain.shape == (32, 32, 3) and (plain[..., 0] == plain[..., 2]).all()  # white on black
    coloured = np.asarray(to_image(images[0], rng=random.Random(1)))
    assert not (coloured[..., 0] == coloured[..., 2]).all()

"""The student folder's model card (README.md): Hub front matter, recipe, sampling code, metrics; written by
save_student and rewritten with evaluation's scores. Records are hand-written with the keys the trainers write."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffusion.errors import UserError
from shards.writer import TMP_SUFFIX
from students.card import model_card, write_model_card, write_scored_card
from students.folder import inference_recipe, read_distillation, save_student, with_stock_code, write_record
from students.lora import lora_loading_code

FINGERPRINT = "0123456789abcdef" * 4


def teacher_entry(path: Path) -> dict:
    return {"path": str(path), "fingerprint": FINGERPRINT, "variants": {}}


def fit_record(teacher: Path, out: Path, method: str = "cfg-distill") -> dict:
    """trainer/fit.py `_record`, with the stock code save_student adds."""
    w_distill = method == "w-distill"
    load = f'pipe = StableDiffusionPipeline.from_pretrained("{out}")'
    return {
        "method": method, "guidance_scale": None if w_distill else 7.5, "guidance_coefficient": None,
        "w_range": [2.0, 14.0] if w_distill else None, "w_convention": "..." if w_distill else None,
        "w_loss": "x0", "guidance": {"name": "cfg", "params": {}}, "teacher": teacher_entry(teacher),
        "shards": {"path": "/data/shards/sd15-cfg", "kind": "cfg", "manifest_sha256": "ab" * 32, "samples": 1000},
        "steps": 20000, "resolution": 512, "global_batch_size": 128, "ema_decay": 0.9999, "mixed_precision": "fp16",
        "nonfinite_steps_skipped": 0, "final_losses": {"last_step": 0.1, "mean_last_100_steps": 0.1},
        "inference": with_stock_code(inference_recipe(method, 7.5, (2.0, 14.0)), load),
    }


def lora_record(teacher: Path, out: Path) -> dict:
    """A LoRA student's record (students/lora.py `save_lora_student`): the LoRA loading code and "adapter"."""
    record = fit_record(teacher, out, "w-distill")
    loading = lora_loading_code(teacher, None, out, None)
    inference = with_stock_code(inference_recipe("w-distill", None, (2.0, 14.0)), loading)
    adapter = {"rank": 4, "alpha": 8.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "base": str(teacher),
               "base_variant": None, "files": {"diffusers": "pytorch_lora_weights.safetensors",
                                               "kohya": "lora_kohya.safetensors"}, "merged_pipeline": False}
    return {**record, "inference": inference, "adapter": adapter}


def sid_record(teacher: Path) -> dict:
    """trainer/sid.py `_record`."""
    return {
        "method": "sid-lsg",
        "guidance": {"kappa1": 1.2, "kappa2": 1.2, "kappa3": 1.2, "kappa4": 1.5, "strategy": "lsg", "alpha": 1.2},
        "guidance_scale": None, "t_init": 625, "t_range": [20, 979], "input_scale": 0.9,
        "teacher": teacher_entry(teacher),
        "prompts": {"path": "/data/prompts.txt", "sha256": "cd" * 32, "count": 5000, "empty_lines_skipped": 0,
                    "undecodable_lines_skipped": 0, "truncated_by_tokenizer_seen": 0},
        "kimg": 10.0, "iterations": 2500, "global_batch_size": 4, "ema_halflife_kimg": 0.5, "mixed_precision": "fp16",
        "dropped_nonfinite_samples": 0, "skipped_optimizer_steps": 0, "cleaned_gradient_steps": 0,
        "final_losses": {"generator_mean_recent": 0.1, "fake_score_mean_recent": 0.2},
        "inference": {"sampler": "sid-one-step", "t_init": 625, "unet_passes_per_image": 1, "x_g": "...",
                      "command": "evaluation generate --model OUT --prompt TEXT --seed N --out FILE.png"},
    }


def progressive_record(teacher: Path) -> dict:
    """trainer/progressive.py `export_round` (no stock code: save_student adds none without a "call")."""
    return {
        "method": "progressive", "steps": 4, "timesteps": [999, 749, 499, 249], "teacher_steps": 8,
        "w_range": [2.0, 14.0], "w_convention": "...", "guidance_scale": None, "teacher": teacher_entry(teacher),
        "start_student": "/runs/sd15-w/round-08steps", "shards": {"path": "/data/shards", "manifest_sha256": "ab"},
        "resolution": 512, "round": 2, "rounds": 4, "iters_per_round": 5000, "global_batch_size": 64,
        "ema_decay": None, "mixed_precision": "fp16", "nonfinite_steps_skipped": 0, "final_losses": {},
        "inference": {"sampler": "grid-ddim", "steps": 4, "timesteps": [999, 749, 499, 249],
                      "unet_passes_per_step": 1, "w_range": [2.0, 14.0], "pipeline": "..."},
    }


def split(card: str) -> tuple[dict, str]:
    """(front matter parsed by yaml.safe_load, body)."""
    assert card.startswith("---\n")
    header, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_full_cfg_distill_card(tmp_path):
    teacher, out = tmp_path / "sd15", tmp_path / "student"
    header, body = split(model_card(fit_record(teacher, out), folder=out))
    assert header == {"base_model": "sd15", "library_name": "diffusers", "pipeline_tag": "text-to-image",
                      "tags": ["text-to-image", "diffusers", "guided-distill", "cfg-distill"], "inference": True}
    assert "scale 7.5" in body and "20000 optimiser steps" in body and "decay 0.9999" in body and "fp16" in body
    assert f'pipe = StableDiffusionPipeline.from_pretrained("{out}")\n' in body
    assert "image = pipe(prompt, guidance_scale=1.0).images[0]" in body
    assert "once `evaluation coco30k" in body  # not scored yet


def test_classifier_distill_card_names_the_guidance(tmp_path):
    record = {**fit_record(tmp_path / "sd15", tmp_path / "out", "classifier-distill"), "guidance_scale": 300.0,
              "guidance": {"name": "clip", "params": {}, "coefficient": "sqrt-beta"},
              "guidance_coefficient": "sqrt-beta"}
    header, body = split(model_card(record))
    assert header["tags"][-1] == "classifier-distill"
    assert "`clip` classifier guidance, gamma 300, c_t `sqrt-beta`" in body and "no classifier" in body


def test_lora_card_loads_the_adapter_on_the_teacher(tmp_path):
    teacher, out = tmp_path / "sd15", tmp_path / "student"
    header, body = split(model_card(lora_record(teacher, out), folder=out))
    assert header["tags"] == ["text-to-image", "diffusers", "guided-distill", "w-distill", "lora"]
    assert header["base_model"] == "sd15"
    code = python_code(body)
    assert (f'StableDiffusionPipeline.from_pretrained("{teacher.resolve()}")\n'
            f'pipe.load_lora_weights("{out.resolve()}")') in code
    assert "w = 8  # any w in [2, 14]" in code and "guidance_scale=w" in code
    assert "rank 4, alpha 8" in body and "`lora_kohya.safetensors`" in body


def test_verbatim_code_gets_the_imports_it_names(tmp_path):
    """A w-distill LoRA's code (a UNet with the embedding, safetensors) plus a scheduler line and a seeded call."""
    teacher, out = tmp_path / "sd15", tmp_path / "student"
    code = "\n".join([lora_loading_code(teacher, None, out, 256),
                      "pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)",
                      "image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]"])
    record = {**lora_record(teacher, out), "inference": {"diffusers": code}}
    assert python_code(split(model_card(record))[1]).startswith(
        "import torch\nimport safetensors.torch\n"
        "from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel\n"
        f'prompt = "a photo of a corgi"\n{code}')


def test_sid_lsg_card(tmp_path):
    out = tmp_path / "sid"
    header, body = split(model_card(sid_record(tmp_path / "sd15"), folder=out))
    assert header["tags"][-1] == "sid-lsg" and header["base_model"] == "sd15"
    assert "kappa1-4 = 1.2, 1.2, 1.2, 1.5" in body and "10 kimg (2500 iterations)" in body
    assert "half-life 0.5 kimg" in body and "5000 prompts" in body
    assert f'load_teacher("{out}")' in body and "sid_one_step(g.unet, g.schedule, z, 625," in body
    assert f"evaluation generate --model {out} --prompt TEXT" in body


def test_progressive_card_samples_in_its_steps(tmp_path):
    header, body = split(model_card(progressive_record(tmp_path / "sd15"), folder=tmp_path / "round"))
    assert header["tags"][-1] == "progressive"
    assert "image = pipe(prompt, num_inference_steps=4, guidance_scale=w).images[0]" in body
    assert "round 2 of 4" in body and "EMA: off" in body


def test_hf_cache_teacher_and_its_license(tmp_path):
    snapshot = tmp_path / "hub" / "models--runwayml--stable-diffusion-v1-5" / "snapshots" / "1d0c4eb"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: creativeml-openrail-m\ntags:\n- stable-diffusion\n---\n# SD\n")
    header, _ = split(model_card(fit_record(snapshot, tmp_path / "out")))
    assert header["base_model"] == "runwayml/stable-diffusion-v1-5"
    assert header["license"] == "creativeml-openrail-m"
    assert list(header) == ["base_model", "library_name", "pipeline_tag", "tags", "license", "inference"]


@pytest.mark.parametrize("readme", ["# no front matter\n", "---\nlicense: [unclosed\n---\n", "---\ntags: [a]\n---\n"])
def test_no_license_when_the_teacher_readme_gives_none(tmp_path, readme):
    teacher = tmp_path / "sd15"
    teacher.mkdir()
    (teacher / "README.md").write_text(readme)
    header, _ = split(model_card(fit_record(teacher, tmp_path / "out")))
    assert "license" not in header


def test_metrics_table_when_given(tmp_path):
    metrics = {"protocol": "evaluation coco30k", "FID": 12.3456, "CLIP score": 0.31}
    _, body = split(model_card(fit_record(tmp_path / "sd15", tmp_path / "out"), metrics))
    assert "| FID | 12.35 |" in body and "| CLIP score | 0.31 |" in body and "| protocol | evaluation coco30k |" in body
    assert "once `evaluation coco30k" not in body


def test_write_model_card_replaces_the_card_whole(tmp_path):
    out = tmp_path / "student"
    write_record(out, fit_record(tmp_path / "sd15", out))
    (out / "README.md").write_text("an old card")
    path = write_model_card(out, {"FID": 10.0})
    assert path == out / "README.md"
    assert path.read_text() == model_card(read_distillation(out), {"FID": 10.0}, out.resolve())
    assert not list(out.glob(f"*{TMP_SUFFIX}"))
    with pytest.raises(UserError, match="not a student folder"):
        write_model_card(tmp_path / "sd15")


def test_evaluation_scores_rewrite_a_students_card_only(tmp_path):
    out, teacher = tmp_path / "student", tmp_path / "sd15"
    teacher.mkdir()
    write_record(out, fit_record(teacher, out))
    protocol = {"evaluator": "standard", "num_images": 30000, "resolution": 512, "num_inference_steps": 50,
                "seed": 0, "prompt_source": "/data/coco/annotations/captions_val2014.json"}
    result = {"fid": 14.2, "clip_score": 0.305, "model": {"label": "student (cfg-distill)"}, "protocol": protocol}
    assert write_scored_card(out, result) == out / "README.md"
    card = (out / "README.md").read_text()
    assert "| FID | 14.2 |" in card and "| CLIP score | 0.305 |" in card and "30000 images at 512 px" in card
    assert write_scored_card(teacher, result) is None and not (teacher / "README.md").exists()
    assert write_scored_card(out, {"model": result["model"], "protocol": protocol}) is None  # nothing scored


def test_save_student_writes_the_card(teacher_dir, tmp_path):
    from diffusion.tiny import tiny_components

    out = tmp_path / "student"
    record = fit_record(teacher_dir, out)
    record["inference"] = inference_recipe("cfg-distill", 7.5, None)  # save_student adds the stock code
    save_student(tiny_components()["unet"], teacher_dir, out, record)
    header, body = split((out / "README.md").read_text())
    assert header["base_model"] == teacher_dir.name and "license" not in header
    assert f'StableDiffusionPipeline.from_pretrained("{out.resolve()}")' in body
    exec(python_code(body), namespace := {})  # the card's code samples the student as written
    assert namespace["image"].size == (32, 32)


def test_sid_lsg_card_code_runs(teacher_dir):
    """The tiny teacher folder stands in for a one-step generator's folder (the same layout)."""
    _, body = split(model_card(sid_record(teacher_dir), folder=teacher_dir))
    exec(python_code(body), namespace := {})
    assert namespace["image"].shape == (1, 3, 32, 32)


def python_code(body: str) -> str:
    return body.split("```python\n", 1)[1].split("```", 1)[0]

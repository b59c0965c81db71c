"""`trainer fit` end to end on the tiny teacher: learning, export, resume, ranks, refusals, interrupts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import count_unet_calls, fit_args, read_records
from conftest import REPO
from trainer.cli import main
from trainer.heldout import heldout_errors


def _student_weights(out):
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def _held_out(folder, teacher):
    records = list(read_records(folder).values())
    stack = lambda name: torch.stack([r.tensors[name] for r in records]).float()  # noqa: E731
    return (stack("zt"), torch.tensor([r.t for r in records]), teacher.encode_text([r.caption for r in records]),
            stack("eps_cond"), stack("eps_uncond"))


def test_cfg_distill_learns_the_guided_target_and_exports_a_pipeline(teacher_dir, teacher, cfg_shards,
                                                                     heldout_cfg_shards, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from diffusion.unet import unet_eps

    out = tmp_path / "student"
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, out, "--max-steps", 40, "--batch-size", 8,
                         "--checkpoint-every", 40)) == 0
    record = json.loads((out / "distillation.json").read_text())
    assert record["method"] == "cfg-distill" and record["guidance_scale"] == 7.5 and record["steps"] == 40
    assert record["teacher"]["fingerprint"] == teacher.fingerprint and len(record["shards"]["manifest_sha256"]) == 64
    losses = json.loads((out / "checkpoints/step-00000040/trainer_state.json").read_text())["state"]["recent_losses"]
    assert len(losses) == 40 and sum(losses[-8:]) < 0.5 * sum(losses[:8])  # the training loss falls

    z_t, steps, text, eps_cond, eps_uncond = _held_out(heldout_cfg_shards, teacher)
    target = eps_uncond + 7.5 * (eps_cond - eps_uncond)
    student = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    with torch.no_grad():
        eps_student = unet_eps(student, teacher.schedule, z_t, steps, text)
    teacher_error = (eps_cond - target).pow(2).mean().item()
    assert (eps_student - target).pow(2).mean().item() < 0.8 * teacher_error  # on records it never saw
    errors = heldout_errors(out, heldout_cfg_shards, teacher, 7.5)
    assert errors["baseline"] == pytest.approx(teacher_error, rel=1e-5) and errors["ratio"] < 0.8

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    calls = count_unet_calls(pipe.unet)
    image = pipe("a red square", num_inference_steps=3, guidance_scale=1.0, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and [c["batch"] for c in calls] == [1, 1, 1]  # one pass per step


def test_resume_equals_uninterrupted_w_distill(teacher_dir, cfg_shards, tmp_path):
    """7 steps, then resume to 12 (mid-pass, with EMA and gradient accumulation) == 12 straight."""
    extra = ["--checkpoint-every", 5, "--ema-decay", 0.99, "--gradient-accumulation-steps", 2, "--lr", 1e-3]
    assert main(fit_args("w-distill", teacher_dir, cfg_shards, tmp_path / "a", "--max-steps", 12, *extra)) == 0
    assert main(fit_args("w-distill", teacher_dir, cfg_shards, tmp_path / "b", "--max-steps", 7, *extra)) == 0
    assert main(fit_args("w-distill", teacher_dir, cfg_shards, tmp_path / "b", "--max-steps", 12, "--resume",
                         "latest", *extra)) == 0
    straight, resumed = _student_weights(tmp_path / "a"), _student_weights(tmp_path / "b")
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6
    moved = _student_weights(tmp_path / "a")["time_embedding.cond_proj.weight"]
    assert moved.abs().max() > 0  # the w embedding was trained (it starts at zero)
    record = json.loads((tmp_path / "b" / "distillation.json").read_text())
    assert record["w_range"] == [2.0, 14.0] and "s - 1" in record["w_convention"]


def test_w_student_takes_w_through_the_pipelines_timestep_cond(teacher_dir, cfg_shards, tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffusion.unet import w_condition

    out = tmp_path / "w"
    assert main(fit_args("w-distill", teacher_dir, cfg_shards, out, "--max-steps", 2, "--w-embedding-dim", 16)) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    calls = count_unet_calls(pipe.unet)
    pipe("a digit", num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="np")
    assert [c["batch"] for c in calls] == [1, 1]  # guidance_scale 5 and still one pass per step
    torch.testing.assert_close(calls[0]["timestep_cond"], w_condition(torch.tensor([5.0]), pipe.unet))


def test_w_distill_trains_on_the_seeds_x_loss_unless_told_eps(teacher_dir, teacher, cfg_shards, tmp_path, capsys):
    """Default: max(SNR, 1) ||x_student - x_teacher^w||^2 = max(1, sigma^2/a^2) ||eps_student - eps_teacher^w||^2,
    computed here by hand from the same records and w draws; --w-loss eps: the unweighted eps-MSE."""
    from diffusion.unet import unet_eps
    from trainer.config import FitConfig
    from trainer.fit import build_student, micro_batch_loss
    from trainer.losses import sample_w

    zt, t, text, cond, uncond = (x[:4] for x in _held_out(cfg_shards, teacher))
    batch = {"zt": zt, "t": t, "eps_cond": cond, "eps_uncond": uncond}
    losses = {}
    for w_loss in ("x0", "eps"):
        cfg = FitConfig(method="w-distill", teacher=str(teacher_dir), shards=str(cfg_shards), out=str(tmp_path),
                        w_embedding_dim=16, **({"w_loss": "eps"} if w_loss == "eps" else {}))
        torch.manual_seed(0)
        student = build_student(cfg, teacher_dir).eval()
        with torch.no_grad():
            losses[w_loss] = micro_batch_loss(cfg, student, teacher.schedule, "cpu", batch, text,
                                              torch.Generator().manual_seed(1)).item()
            w = sample_w(4, cfg.w_min, cfg.w_max, torch.Generator().manual_seed(1))
            eps_mse = (unet_eps(student, teacher.schedule, zt, t, text, guidance_scale=w)
                       - (uncond + w.reshape(-1, 1, 1, 1) * (cond - uncond))).pow(2).flatten(1).mean(1)
    alphabar = teacher.schedule.alphabar[t]
    weight = ((1 - alphabar) / alphabar).clamp(min=1.0)
    assert losses["x0"] == pytest.approx((weight * eps_mse).mean().item(), rel=1e-4)
    assert losses["eps"] == pytest.approx(eps_mse.mean().item(), rel=1e-4)
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, tmp_path / "c", "--w-loss", "eps")) == 2
    assert "--w-loss does not apply to --method cfg-distill" in capsys.readouterr().err


def test_classifier_distill_and_kind_refusals(teacher_dir, cfg_shards, blue_shards, tmp_path, capsys):
    out = tmp_path / "blue"
    assert main(fit_args("classifier-distill", teacher_dir, blue_shards, out, "--max-steps", 3,
                         "--report-to", "tensorboard", "--log-every", 1)) == 0  # the last --report-to wins
    record = json.loads((out / "distillation.json").read_text())
    assert record["guidance_scale"] == 100.0 and record["guidance"]["name"] == "blue"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "fit"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert main(fit_args("cfg-distill", teacher_dir, blue_shards, tmp_path / "x", "--max-steps", 1)) == 2
    assert "--method cfg-distill needs 'cfg' shards (eps_cond + eps_uncond)" in capsys.readouterr().err
    assert main(fit_args("classifier-distill", teacher_dir, cfg_shards, tmp_path / "y", "--max-steps", 1)) == 2
    assert "holds 'cfg' shards" in capsys.readouterr().err


def test_refuses_shards_of_another_teacher_and_missing_folders(cfg_shards, tmp_path, capsys):
    from diffusion.tiny import write_tiny_teacher

    other = write_tiny_teacher(tmp_path / "other", seed=1)
    assert main(fit_args("cfg-distill", other, cfg_shards, tmp_path / "o", "--max-steps", 1)) == 2
    err = capsys.readouterr().err
    assert "shards do not match: teacher fingerprint" in err and len(err.strip().splitlines()) == 1
    assert main(fit_args("cfg-distill", other, tmp_path / "nowhere", tmp_path / "o", "--max-steps", 1)) == 2
    assert "dataset.json is missing" in capsys.readouterr().err


def test_non_finite_losses_stop_with_a_message_and_a_checkpoint(teacher_dir, cfg_shards, tmp_path, capsys):
    out = tmp_path / "nan"
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, out, "--guidance-scale", 1e38, "--max-steps", 50,
                         "--max-nonfinite-steps", 3)) == 2
    assert "3 non-finite losses in a row" in capsys.readouterr().err
    state = json.loads((out / "checkpoints/step-00000003/trainer_state.json").read_text())["state"]
    assert state["nonfinite_total"] == 3 and state["recent_losses"] == []
    assert not (out / "distillation.json").exists()


def test_config_file_yaml_and_toml_flags_override(teacher_dir, cfg_shards, tmp_path):
    common = fit_args("cfg-distill", teacher_dir, cfg_shards, tmp_path / "unused")[1:]
    keys = dict(zip(common[::2], common[1::2]))
    (tmp_path / "fit.yaml").write_text("".join(f"{k[2:]}: {v}\n" for k, v in keys.items() if k != "--out")
                                       + "max-steps: 3\nguidance_scale: 4.0\n")
    (tmp_path / "fit.toml").write_text("".join(f'{k[2:].replace("-", "_")} = "{v}"\n' for k, v in keys.items()
                                               if k != "--out") + "max_steps = 3\n")
    assert main(["fit", "--config", str(tmp_path / "fit.yaml"), "--out", str(tmp_path / "y"), "--max-steps", 2]) == 0
    record = json.loads((tmp_path / "y" / "distillation.json").read_text())
    assert record["steps"] == 2 and record["guidance_scale"] == 4.0
    assert main(["fit", "--config", str(tmp_path / "fit.toml"), "--out", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "distillation.json").read_text())["steps"] == 3


def test_fp16_on_cpu_is_a_clear_error_and_bf16_trains(teacher_dir, cfg_shards, tmp_path, capsys):
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, tmp_path / "h", "--mixed-precision", "fp16")) == 2
    assert "fp16 needs a GPU" in capsys.readouterr().err
    out = tmp_path / "bf16"
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, out, "--mixed-precision", "bf16",
                         "--max-steps", 2, "--gradient-checkpointing")) == 0
    weights = _student_weights(out)
    assert all(w.dtype == torch.float32 for w in weights.values())  # trainable weights stay fp32


def _fit_command(*args) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", *map(str, args)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_torchrun_two_ranks_train_on_disjoint_records(teacher_dir, cfg_shards, tmp_path):
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "trainer.cli"]
    args = fit_args("cfg-distill", teacher_dir, cfg_shards, out, "--epochs", "--batch-size", 2, "--max-steps", 6,
                    "--record-keys", "--num-workers", 0)
    done = subprocess.run(launch + args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    keys = [{line.split("\t")[1] for line in (out / f"logs/keys-rank{r}.tsv").read_text().splitlines()}
            for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 12 and not keys[0] & keys[1]  # one epoch of 24 records, split
    assert sorted((out / "checkpoints/step-00000006").glob("rng-rank*.json"))[-1].name == "rng-rank1.json"
    assert json.loads((out / "distillation.json").read_text())["global_batch_size"] == 4


def test_ctrl_c_writes_a_checkpoint_then_resume_finishes(teacher_dir, cfg_shards, tmp_path):
    out = tmp_path / "sigint"
    args = fit_args("cfg-distill", teacher_dir, cfg_shards, out, "--max-steps", 100000, "--checkpoint-every", 1000,
                    "--record-keys")
    process = subprocess.Popen(_fit_command(*args), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    keys, deadline = out / "logs" / "keys-rank0.tsv", time.time() + 120
    while not (keys.is_file() and keys.stat().st_size) and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # until the loop has taken its first batch
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "continue with --resume latest" in err
    (checkpoint,) = (out / "checkpoints").iterdir()
    step = int(checkpoint.name.split("-")[1])
    assert 0 < step < 100000 and not (out / "distillation.json").exists()
    assert main([*args[:args.index("--max-steps")], "--max-steps", step + 2, "--resume", "latest",
                 *args[args.index("--max-steps") + 2:]]) == 0
    assert json.loads((out / "distillation.json").read_text())["steps"] == step + 2


TWO_STEPS = ("--max-steps", 2, "--checkpoint-every", 1)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, teacher_dir, cfg_shards):
    """A finished cfg-distill run of 2 steps, a checkpoint after each; tests work on copies of it."""
    out = tmp_path_factory.mktemp("two-steps") / "run"
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, out, *TWO_STEPS)) == 0
    return out


def _copy_of(run, folder):
    shutil.copytree(run, folder)
    return folder


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path):
    """Not JSON any more, with the same size (so only reading it finds the damage)."""
    path.write_bytes(b"x" + path.read_bytes()[1:])


def _truncate_without_marker(folder):
    (folder / "checkpoint.json").unlink()  # as a checkpoint of an earlier version
    _truncate(folder / "unet.safetensors")


def _empty(folder):
    shutil.rmtree(folder)
    folder.mkdir()


# damage -> (what it does to a checkpoint folder, what the warning says)
DAMAGES = {
    "truncated unet": (lambda f: _truncate(f / "unet.safetensors"), "unet.safetensors: "),
    "truncated unet, no marker": (_truncate_without_marker, "unet.safetensors: Error while deserializing header"),
    "bad trainer_state.json": (lambda f: _garble(f / "trainer_state.json"), "trainer_state.json: Expecting value"),
    "bad optimizer.json": (lambda f: _garble(f / "optimizer.json"), "optimizer.json: Expecting value"),
    "empty folder": (_empty, "trainer_state.json: missing"),
    "missing part": (lambda f: (f / "optimizer.safetensors").unlink(), "optimizer.safetensors: missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_resume_latest_skips_a_damaged_checkpoint_for_the_one_before(two_steps, teacher_dir, cfg_shards, tmp_path,
                                                                     capsys, damage):
    out = _copy_of(two_steps, tmp_path / "run")
    damaged = out / "checkpoints/step-00000002"
    DAMAGES[damage][0](damaged)
    shutil.rmtree(out / "unet")  # so the student compared below is this run's export
    capsys.readouterr()
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, out, *TWO_STEPS, "--resume", "latest")) == 0
    printed = capsys.readouterr().out.splitlines()
    warnings = [line for line in printed if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: skipping {damaged} ({DAMAGES[damage][1]}")
    assert warnings[0].endswith("; trying step-00000001")
    assert f"resumed from {out / 'checkpoints/step-00000001'} at step 1" in printed
    straight, resumed = _student_weights(two_steps), _student_weights(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # no part of the damaged one leaked in
    assert (damaged / "checkpoint.json").is_file()  # written again, whole


def test_resume_refuses_a_damaged_explicit_checkpoint_none_readable_and_another_run(two_steps, teacher_dir,
                                                                                   cfg_shards, tmp_path, capsys):
    out = _copy_of(two_steps, tmp_path / "run")
    first, last = out / "checkpoints/step-00000001", out / "checkpoints/step-00000002"
    size = (last / "unet.safetensors").stat().st_size
    _truncate(last / "unet.safetensors")
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, out, *TWO_STEPS, "--resume", last)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"Error: --resume {last}: unet.safetensors: {size // 2} bytes, checkpoint.json says {size}"]
    _garble(first / "trainer_state.json")
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, out, *TWO_STEPS, "--resume", "latest")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"Error: --resume latest: no checkpoint in {out / 'checkpoints'} "
                                               "can be read: step-00000002 (unet.safetensors: ")
    assert "; step-00000001 (trainer_state.json: Expecting value" in err[0]

    legacy = _copy_of(two_steps, tmp_path / "legacy")
    (legacy / "checkpoints/step-00000002/checkpoint.json").unlink()  # written before the marker: still resumes
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, legacy, *TWO_STEPS, "--resume", "latest")) == 0
    assert f"resumed from {legacy / 'checkpoints/step-00000002'} at step 2" in capsys.readouterr().out
    args = fit_args("cfg-distill", teacher_dir, cfg_shards, legacy, *TWO_STEPS, "--resume", "latest", "--seed", 1)
    assert main(args) == 2  # another run is an error, never a damaged checkpoint to skip
    captured = capsys.readouterr()
    assert "step-00000002: this checkpoint is from another run (seed 0 -> 1)" in captured.err
    assert "warning: skipping" not in captured.out


def test_a_run_in_out_is_refused_unless_resumed_or_overwritten(two_steps, teacher_dir, cfg_shards, tmp_path,
                                                               capsys):
    out = _copy_of(two_steps, tmp_path / "run")
    files = lambda: {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, out, *TWO_STEPS)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"Error: {out} holds a run (checkpoints up to step 2 and a finished student); pass --resume latest to "
        "continue it or --overwrite to start over"]
    assert files() == before  # the finished student and its checkpoints untouched
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, out, *TWO_STEPS, "--overwrite", "--resume",
                         "latest")) == 2
    assert "pass one of them, not both" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, out, "--max-steps", 1, "--checkpoint-every", 1,
                         "--overwrite")) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]  # the old run's step 2 is gone
    assert json.loads((out / "distillation.json").read_text())["steps"] == 1
    fresh, after_one = load_file(two_steps / "checkpoints/step-00000001/unet.safetensors"), _student_weights(out)
    assert all(torch.equal(fresh[k], after_one[k]) for k in fresh)  # what a fresh 1-step run gives
    assert (out / "notes.txt").read_text() == "mine"  # only what trainer fit writes is removed
    teacher = _copy_of(teacher_dir, tmp_path / "teacher")  # --out the teacher's folder: never, even with --overwrite
    assert main(fit_args("cfg-distill", teacher_dir, cfg_shards, teacher, *TWO_STEPS, "--overwrite")) == 2
    assert "is a pipeline folder that no `trainer fit` run wrote" in capsys.readouterr().err


def _shard_copy(cfg_shards, folder):
    from shards.manifest import read_manifest

    shutil.copytree(cfg_shards, folder)
    return folder, read_manifest(folder)


def test_a_truncated_or_deleted_shard_is_refused_before_any_step(teacher_dir, cfg_shards, tmp_path, capsys):
    shards, manifest = _shard_copy(cfg_shards, tmp_path / "shards")
    first, second = manifest[:2]
    (shards / first.file).write_bytes((cfg_shards / first.file).read_bytes()[:8192])
    assert main(fit_args("cfg-distill", teacher_dir, shards, tmp_path / "a", "--max-steps", 1)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"Error: --shards {shards} is damaged: {first.file}: 8192 bytes (manifest says {first.bytes}); "
        f"run `pipeline inspect {shards}`"]
    shutil.copy(cfg_shards / first.file, shards / first.file)
    (shards / second.file).unlink()
    assert main(fit_args("w-distill", teacher_dir, shards, tmp_path / "b", "--max-steps", 1)) == 2
    assert f"is damaged: {second.file}: missing; run" in capsys.readouterr().err
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()


def test_verify_finds_a_flipped_byte_and_duplicate_keys_the_size_check_passes(teacher_dir, cfg_shards, tmp_path,
                                                                              capsys):
    from helpers import add_shard_copy

    shards, manifest = _shard_copy(cfg_shards, tmp_path / "flipped")
    data = bytearray((shards / manifest[0].file).read_bytes())
    data[700] ^= 0xFF  # same size, inside the first record
    (shards / manifest[0].file).write_bytes(bytes(data))
    assert main(fit_args("cfg-distill", teacher_dir, shards, tmp_path / "a", "--max-steps", 1)) == 0
    assert main(fit_args("cfg-distill", teacher_dir, shards, tmp_path / "b", "--max-steps", 1, "--verify")) == 2
    assert f"is damaged: {manifest[0].file}: sha256 " in capsys.readouterr().err
    twice, manifest = _shard_copy(cfg_shards, tmp_path / "twice")
    add_shard_copy(twice, "zz-0000.tar", index=1)
    assert main(fit_args("cfg-distill", teacher_dir, twice, tmp_path / "c", "--max-steps", 1, "--verify")) == 2
    err = capsys.readouterr().err
    assert "is damaged: zz-0000.tar: record " in err and f" again (first in {manifest[1].file}) (and " in err


def test_verify_does_not_apply_to_sid_lsg(teacher_dir, tmp_path, capsys):
    from helpers import sid_args

    (tmp_path / "prompts.txt").write_text("a red circle\n")
    assert main(sid_args(teacher_dir, tmp_path / "prompts.txt", tmp_path / "sid", "--verify")) == 2
    assert "--verify does not apply to --method sid-lsg" in capsys.readouterr().err


def test_a_shard_that_passes_the_size_check_but_does_not_read_stops_with_one_line(teacher_dir, cfg_shards, tmp_path,
                                                                                  capsys):
    shards, manifest = _shard_copy(cfg_shards, tmp_path / "shards")
    for shard in manifest:  # same sizes, random bytes: as if replaced after start-up
        (shards / shard.file).write_bytes(os.urandom(shard.bytes))
    assert main(fit_args("cfg-distill", teacher_dir, shards, tmp_path / "out", "--max-steps", 1)) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert "Traceback" not in err and last.startswith(f"Error: shard {shards}/") and last.endswith(
        f".tar is unreadable (ReadError: invalid header); run `pipeline inspect {shards}`"), err

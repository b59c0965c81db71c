"""`pipeline build-shards` end to end on a tiny teacher over a generated img2dataset-style source."""

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from helpers import build_args, read_records

from pipeline.cli import main
from pipeline.teacher_pass import draw
from shards.manifest import read_dataset_info, read_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 24 good samples + 3 unusual but valid (CMYK, grayscale, alpha) + 2 good in the truncated tar.
EXPECTED_SAMPLES = 29
EXPECTED_SKIPPED = {"caption_not_utf8": 1, "empty_caption": 1, "image_too_small": 1, "missing_caption": 1,
                    "truncated_tar": 1, "unreadable_image": 3}


def _assert_same_records(a: dict, b: dict, atol=2e-3):
    assert sorted(a) == sorted(b)
    for key, record in a.items():
        other = b[key]
        assert (record.t, record.caption, record.meta) == (other.t, other.caption, other.meta)
        for name, value in record.tensors.items():
            torch.testing.assert_close(value.float(), other.tensors[name].float(), atol=atol, rtol=1e-2)


def test_bad_inputs_are_skipped_and_counted(cfg_shards):
    info = read_dataset_info(cfg_shards)
    assert info["samples"] == EXPECTED_SAMPLES
    assert info["skipped"] == EXPECTED_SKIPPED
    assert info["converted_image_modes"] == {"CMYK": 1, "L": 1, "RGBA": 1}
    assert info["kind"] == "cfg" and info["latent_shape"] == [4, 16, 16]
    assert info["tensors"] == ["zt", "eps_cond", "eps_uncond", "z0", "noise"]
    records = read_records(cfg_shards)
    assert len(records) == EXPECTED_SAMPLES
    assert not any(name in key for key in records for name in ("zero_byte", "not_an_image", "tiny", "no_caption"))
    assert all(len(s.file.split(".")) == 2 for s in read_manifest(cfg_shards))
    assert not list(cfg_shards.glob("*.tmp"))


def test_stored_predictions_equal_a_fresh_teacher_pass(cfg_shards, teacher):
    records = read_records(cfg_shards)
    uncond = teacher.encode_text([""])
    for record in list(records.values())[:12]:
        z_t, t = record.tensors["zt"].float()[None], torch.tensor([record.t])
        with torch.no_grad():
            eps_cond = teacher.eps(z_t, t, teacher.encode_text([record.caption]))
            eps_uncond = teacher.eps(z_t, t, uncond)
        torch.testing.assert_close(record.tensors["eps_cond"].float(), eps_cond[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(record.tensors["eps_uncond"].float(), eps_uncond[0], atol=2e-3, rtol=2e-3)
        z0, noise = record.tensors["z0"].float()[None], record.tensors["noise"].float()[None]
        torch.testing.assert_close(teacher.schedule.add_noise(z0, noise, t)[0], z_t[0], atol=3e-3, rtol=3e-3)


def test_t_and_noise_are_a_function_of_seed_and_source_key(cfg_shards):
    for record in list(read_records(cfg_shards).values())[:5]:
        t, noise, _ = draw(0, record.meta["source_key"], (4, 16, 16), 0, 999)
        assert record.t == int(t)
        torch.testing.assert_close(record.tensors["noise"], noise.half(), atol=0, rtol=0)


def test_records_do_not_depend_on_batch_size(tmp_path, teacher_dir, bad_source, cfg_shards):
    out = tmp_path / "b3"
    args = build_args(teacher_dir, bad_source, out, "--store-clean")
    args[args.index("--batch-size") + 1] = "3"
    assert main(args) == 0
    _assert_same_records(read_records(out), read_records(cfg_shards))


def test_rerun_of_a_finished_build_changes_nothing(tmp_path, teacher_dir, clean_source):
    out = tmp_path / "out"
    assert main(build_args(teacher_dir, clean_source, out)) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert main(build_args(teacher_dir, clean_source, out)) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before


KILLER = """
import os, signal, sys
from shards import writer
write, n = writer.ShardWriter.write, [0]
def killing_write(self, record):
    write(self, record)
    n[0] += 1
    if n[0] == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
writer.ShardWriter.write = killing_write
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_build_resumes_to_the_same_records(tmp_path, teacher_dir, bad_source, cfg_shards):
    out = tmp_path / "killed"
    args = build_args(teacher_dir, bad_source, out, "--store-clean")
    env = {**os.environ, "KILL_AFTER": "12", "PYTHONPATH": REPO}
    run = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, cwd=REPO)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    assert list(out.glob("*.tar.tmp")), "the kill should leave a half-written shard"
    assert not (out / "manifest.parquet").exists()
    assert main(args) == 0
    assert not list(out.glob("*.tmp"))
    _assert_same_records(read_records(out), read_records(cfg_shards))
    assert [(s.file, s.samples) for s in read_manifest(out)] == [(s.file, s.samples) for s in read_manifest(cfg_shards)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_torchrun_build_equals_one_process(tmp_path, teacher_dir, bad_source, cfg_shards):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "pipeline.cli", *build_args(teacher_dir, bad_source, out, "--store-clean")]
    run = subprocess.run(command, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    _assert_same_records(read_records(out), read_records(cfg_shards))
    assert read_dataset_info(out) == read_dataset_info(cfg_shards) | {"source": str(bad_source)}
    assert [(s.file, s.samples) for s in read_manifest(out)] == [(s.file, s.samples) for s in read_manifest(cfg_shards)]


def test_samples_caps_source_entries_in_order(tmp_path, teacher_dir, clean_source):
    out = tmp_path / "capped"
    assert main(build_args(teacher_dir, clean_source, out, "--samples", 10)) == 0
    keys = sorted(r.meta["source_key"] for r in read_records(out).values())
    assert keys == [f"{i // 7:05d}/{i:09d}" for i in range(10)]
    from pipeline.sources import limit_units, list_units

    assert [u.count() for u in limit_units(list_units(str(clean_source), 5), 10)] == [7, 3]


def test_folder_and_table_sources(tmp_path, teacher_dir):
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (40, 30), colour).save(folder / "sub" / f"img{i}.png")
        if i < 2:
            (folder / "sub" / f"img{i}.txt").write_text(f"a {colour} picture")
    assert main(build_args(teacher_dir, folder, tmp_path / "out1")) == 0
    info = read_dataset_info(tmp_path / "out1")
    assert info["samples"] == 2 and info["skipped"] == {"missing_caption": 1}
    (folder / "captions.csv").write_text("file,caption\nsub/img0.png,zero\nsub/img2.png,two\nsub/gone.png,x\n")
    assert main(build_args(teacher_dir, folder / "captions.csv", tmp_path / "out2")) == 0
    records = read_records(tmp_path / "out2")
    assert sorted(r.caption for r in records.values()) == ["two", "zero"]
    assert read_dataset_info(tmp_path / "out2")["skipped"] == {"missing_file": 1}


def test_glob_and_brace_sources(tmp_path, teacher_dir, clean_source):
    assert main(build_args(teacher_dir, f"{clean_source}/0000{{0..1}}.tar", tmp_path / "brace")) == 0
    assert read_dataset_info(tmp_path / "brace")["samples"] == 14
    assert main(build_args(teacher_dir, f"{clean_source}/*.tar", tmp_path / "glob")) == 0
    assert read_dataset_info(tmp_path / "glob")["samples"] == 20


@pytest.mark.parametrize("extra, message", [
    (["--guidance", "sharpness"], "unknown guidance 'sharpness'"),
    (["--t-min", "500", "--t-max", "100"], "--t-min <= --t-max"),
    (["--resolution", "33"], "--resolution 33 is not a multiple of 8"),
    (["--resolution", "36"], "--resolution 36 is not a multiple of 8"),
])
def test_bad_options_are_one_line_errors(tmp_path, teacher_dir, clean_source, capsys, extra, message):
    assert main(build_args(teacher_dir, clean_source, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_output_folder_of_another_run_or_other_files_is_refused(tmp_path, teacher_dir, clean_source, capsys):
    out = tmp_path / "o"
    assert main(build_args(teacher_dir, clean_source, out)) == 0
    assert main(build_args(teacher_dir, clean_source, out, "--seed", 1)) == 2
    assert "holds shards of another run (seed: 0 there vs 1 now)" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(build_args(teacher_dir, clean_source, other)) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"


def test_missing_teacher_is_one_line(tmp_path, clean_source, capsys):
    assert main(build_args(tmp_path / "no-teacher", clean_source, tmp_path / "o")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bf16_teacher_build(tmp_path, teacher_dir, clean_source, cfg_shards):
    out = tmp_path / "bf16"
    assert main(build_args(teacher_dir, clean_source, out, "--dtype", "bf16", "--samples", 4)) == 0
    info = read_dataset_info(out)
    assert info["compute_dtype"] == "bf16" and info["dtype"] == "float16"
    record = next(iter(read_records(out).values()))
    assert record.tensors["eps_cond"].dtype == torch.float16 and torch.isfinite(record.tensors["eps_cond"]).all()

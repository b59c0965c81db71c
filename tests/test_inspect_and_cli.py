"""`pipeline inspect` catches corruption; every console script answers --help."""

import json
import shutil
import subprocess
import sys

import pytest
from helpers import read_records

from pipeline.cli import main
from shards.manifest import read_manifest
from shards.writer import ShardWriter


def test_inspect_a_valid_folder_as_json(cfg_shards, capsys):
    assert main(["inspect", str(cfg_shards), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["valid"] and summary["samples"] == 29 and summary["problems"] == []
    assert summary["tensors"] == ["zt", "eps_cond", "eps_uncond", "z0", "noise"]


def test_inspect_finds_corrupt_and_missing_shards(cfg_shards, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(cfg_shards, copy)
    shards = read_manifest(copy)
    data = bytearray((copy / shards[0].file).read_bytes())
    data[700] ^= 0xFF  # inside the first record's payload
    (copy / shards[0].file).write_bytes(bytes(data))
    (copy / shards[1].file).unlink()
    assert main(["inspect", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "INVALID" in out
    assert f"{shards[0].file}: size or sha256 differs" in out and f"{shards[1].file}: missing" in out


def test_inspect_finds_nan(cfg_shards, tmp_path, capsys):
    copy = tmp_path / "nan"
    shutil.copytree(cfg_shards, copy)
    shard = read_manifest(copy)[0]
    records = list(read_records(copy).values())
    first = [r for r in records if r.meta["unit"] == shard.file.split("-")[0]][: shard.samples]
    first[0].tensors["eps_cond"][0, 0, 0] = float("nan")
    writer = ShardWriter(copy / shard.file)
    for record in first:
        writer.write(record)
    writer.finish()
    assert main(["inspect", str(copy), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert any(p.endswith("/eps_cond: NaN or Inf") for p in problems)


@pytest.mark.parametrize("script", ["pipeline", "trainer", "evaluation"])
def test_console_scripts_answer_help(script):
    bin_dir = __import__("pathlib").Path(sys.executable).parent
    run = subprocess.run([str(bin_dir / script), "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "Usage:" in run.stdout


def test_build_shards_help_lists_the_options(capsys):
    assert main(["build-shards", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--teacher", "--source", "--guidance", "--shard-size", "--dtype", "--t-min", "--clip-weights",
                   "--store-clean", "--config"):
        assert option in text


def test_config_file_fills_options(tmp_path, teacher_dir, clean_source):
    config = tmp_path / "build.json"
    config.write_text(json.dumps({"teacher": str(teacher_dir), "source": str(clean_source), "resolution": 32,
                                  "shard-size": 4, "samples": 6}))
    assert main(["build-shards", "--config", str(config), "--out", str(tmp_path / "o")]) == 0
    assert [s.samples for s in read_manifest(tmp_path / "o")] == [4, 2]

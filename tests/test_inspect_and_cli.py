"""`pipeline inspect` catches corruption; every console script answers --help."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds
from helpers import add_shard_copy, read_records

from diffusion.files import sha256_file
from pipeline.cli import main
from shards.format import Record
from shards.manifest import read_manifest, write_manifest
from shards.writer import ShardInfo, ShardWriter


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
    assert f"{shards[0].file}: sha256 " in out and f"{shards[1].file}: missing" in out


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


def _inspect(folder, capsys) -> tuple[int, str]:
    """`pipeline inspect FOLDER`: its exit code and output; it must not crash, whatever the folder holds."""
    code = main(["inspect", str(folder)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out + captured.err


def test_inspect_reports_a_truncated_tar_and_random_bytes_without_crashing(cfg_shards, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(cfg_shards, copy)
    first, second = read_manifest(copy)[:2]
    (copy / first.file).write_bytes((copy / first.file).read_bytes()[:30000])  # mid-record
    (copy / second.file).write_bytes(np.random.default_rng(0).bytes(second.bytes))  # same size, not a tar
    code, out = _inspect(copy, capsys)
    assert code == 1 and "INVALID" in out
    assert f"{first.file}: 30000 bytes (manifest says {first.bytes})" in out
    assert f"{first.file}: unreadable after 1 records (ReadError: unexpected end of data)" in out
    assert f"{second.file}: sha256 " in out and f"{second.file}: unreadable after 0 records (ReadError" in out


def test_inspect_reports_duplicate_keys_in_a_shard_and_across_shards(cfg_shards, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(cfg_shards, copy)
    shards = read_manifest(copy)
    records = [Record.decode(s) for s in wds.tarfile_samples([{"url": str(copy / shards[0].file)}])]
    writer = ShardWriter(copy / shards[0].file)
    for record in [records[0]] + records[:-1]:  # the first record twice in a row, the count unchanged
        writer.write(record)
    write_manifest(copy, [writer.finish()] + shards[1:])
    add_shard_copy(copy, "zz-copy-0000.tar", index=1)
    copied = next(wds.tarfile_samples([{"url": str(copy / shards[1].file)}]))["__key__"]
    code, out = _inspect(copy, capsys)
    assert code == 1
    duplicate = f"(ValueError: {records[0].key}.json: duplicate file name in tar file"
    assert f"{shards[0].file}: unreadable after 0 records {duplicate}" in out
    assert f"{copied}: 2 copies" in out


def test_inspect_reports_a_record_that_does_not_decode(cfg_shards, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(cfg_shards, copy)
    shards = read_manifest(copy)
    samples = list(wds.tarfile_samples([{"url": str(copy / shards[0].file)}]))
    samples[1]["safetensors"] = b"not safetensors"
    samples[2]["json"] = b"{not json"
    path = copy / shards[0].file
    with wds.TarWriter(str(path), encoder=False) as tar:
        for sample in samples:
            tar.write({k: v for k, v in sample.items() if k != "__url__"})
    write_manifest(copy, [ShardInfo(path.name, len(samples), path.stat().st_size, sha256_file(path))] + shards[1:])
    code, out = _inspect(copy, capsys)
    assert code == 1
    assert f"{shards[0].file}: record {samples[1]['__key__']} does not decode (SafetensorError" in out
    assert f"{shards[0].file}: record {samples[2]['__key__']} does not decode (JSONDecodeError" in out


def test_unreadable_metadata_is_one_error_line(cfg_shards, tmp_path, capsys):
    for name, content, message in [
        ("dataset.json", b"{not json", "dataset.json is unreadable (JSONDecodeError: "),
        ("dataset.json", b"[1, 2]", "dataset.json is unreadable (a JSON list, not an object)"),
        ("manifest.parquet", b"PAR1 not parquet", "manifest.parquet is unreadable (Arrow"),
    ]:
        copy = tmp_path / f"copy-{len(content)}"
        shutil.copytree(cfg_shards, copy)
        (copy / name).write_bytes(content)
        assert main(["inspect", str(copy)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


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

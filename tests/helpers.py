"""Helpers the tests share."""

from __future__ import annotations

from pathlib import Path


def build_args(teacher_dir, source, out, *extra) -> list[str]:
    return ["build-shards", "--teacher", str(teacher_dir), "--source", str(source), "--out", str(out),
            "--resolution", "32", "--batch-size", "4", "--shard-size", "5", *map(str, extra)]


def read_records(folder: Path) -> dict:
    """key -> Record over every shard of a folder (asserting keys are unique)."""
    import webdataset as wds

    from shards.format import Record
    from shards.manifest import read_manifest

    records = {}
    for shard in read_manifest(folder):
        for sample in wds.tarfile_samples([{"url": str(folder / shard.file)}]):
            record = Record.decode(sample)
            assert record.key not in records
            records[record.key] = record
    return records


def fit_args(method, teacher_dir, shards, out, *extra) -> list[str]:
    """`trainer fit` for the tiny teacher: quick, quiet, deterministic."""
    return ["fit", "--method", method, "--teacher", str(teacher_dir), "--shards", str(shards), "--out", str(out),
            "--batch-size", "4", "--lr", "1e-4", "--lr-warmup-steps", "0", "--ema-decay", "0", "--num-workers", "1",
            "--report-to", "none", *map(str, extra)]


def count_unet_calls(unet) -> list[dict]:
    """Record the keyword arguments of every forward of a diffusers UNet (a forward pre-hook)."""
    calls = []
    unet.register_forward_pre_hook(lambda _m, args, kwargs: calls.append({"batch": args[0].shape[0], **kwargs}),
                                   with_kwargs=True)
    return calls

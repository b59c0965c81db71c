"""`pipeline inspect DIR`: validate a shard folder end to end and summarise it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from diffusion.files import sha256_file
from shards.format import SCHEMA_VERSION, STORED_DTYPE, Record
from shards.manifest import read_dataset_info, read_manifest


def _check_record(record: Record, info: dict[str, Any], problems: list[str]) -> None:
    expected = set(info["tensors"])
    if set(record.tensors) != expected:
        problems.append(f"{record.key}: tensors {sorted(record.tensors)} (expected {sorted(expected)})")
        return
    for name, value in record.tensors.items():
        if list(value.shape) != info["latent_shape"] or value.dtype != STORED_DTYPE:
            problems.append(f"{record.key}/{name}: {value.dtype} {list(value.shape)} (expected float16 {info['latent_shape']})")
        elif not torch.isfinite(value).all():
            problems.append(f"{record.key}/{name}: NaN or Inf")
    if not info["t_min"] <= record.t <= info["t_max"]:
        problems.append(f"{record.key}: t = {record.t} outside [{info['t_min']}, {info['t_max']}]")


def inspect_folder(folder: str | Path) -> dict[str, Any]:
    """Counts, checksums, schema and finiteness of every record; `problems` lists what is wrong (empty: valid)."""
    folder = Path(folder)
    info = read_dataset_info(folder)
    shards = read_manifest(folder)
    problems: list[str] = []
    if info.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version {info.get('schema_version')} (this tool reads {SCHEMA_VERSION})")
    keys: Counter = Counter()
    t_values = []
    for shard in shards:
        path = folder / shard.file
        if not path.is_file():
            problems.append(f"{shard.file}: missing")
            continue
        if path.stat().st_size != shard.bytes or sha256_file(path) != shard.sha256:
            problems.append(f"{shard.file}: size or sha256 differs from the manifest")
        count = 0
        for sample in wds.tarfile_samples([{"url": str(path)}]):
            record = Record.decode(sample)
            _check_record(record, info, problems)
            keys[record.key] += 1
            t_values.append(record.t)
            count += 1
        if count != shard.samples:
            problems.append(f"{shard.file}: {count} samples (manifest says {shard.samples})")
    problems += [f"{key}: {n} copies" for key, n in keys.items() if n > 1]
    total = sum(keys.values())
    if total != info.get("samples"):
        problems.append(f"{total} samples in shards (dataset.json says {info.get('samples')})")
    return {
        "folder": str(folder), "kind": info.get("kind"), "guidance": info.get("guidance", {}).get("name"),
        "teacher_fingerprint": info.get("teacher", {}).get("fingerprint"), "samples": total, "shards": len(shards),
        "bytes": sum(s.bytes for s in shards), "latent_shape": info.get("latent_shape"),
        "tensors": info.get("tensors"), "t_range": [min(t_values), max(t_values)] if t_values else None,
        "skipped": info.get("skipped", {}), "problems": problems, "valid": not problems,
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['folder']}: {'valid' if summary['valid'] else 'INVALID'}",
        f"  kind {summary['kind']} (guidance {summary['guidance']}), teacher {str(summary['teacher_fingerprint'])[:12]}",
        f"  {summary['samples']} samples in {summary['shards']} shards, {summary['bytes'] / 2**20:.1f} MiB, "
        f"latent {summary['latent_shape']}, tensors {', '.join(summary['tensors'] or [])}, t in {summary['t_range']}",
        f"  skipped inputs: {summary['skipped'] or 'none'}",
    ]
    lines += [f"  problem: {p}" for p in summary["problems"][:20]]
    if len(summary["problems"]) > 20:
        lines.append(f"  ... and {len(summary['problems']) - 20} more problems")
    return "\n".join(lines)

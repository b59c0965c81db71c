"""The shard folder's metadata: `dataset.json` (what the records are) and `manifest.parquet` (one row a shard)."""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from diffusion.errors import UserError, one_line
from diffusion.guidance import DEFAULT_COEFFICIENT
from shards.format import READABLE_SCHEMA_VERSIONS, SCHEMA_VERSION
from shards.writer import ShardInfo, atomic_write_bytes, atomic_write_json

DATASET_JSON = "dataset.json"
MANIFEST = "manifest.parquet"
_SCHEMA = pa.schema([("file", pa.string()), ("samples", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string())])


def write_manifest(folder: str | Path, shards: list[ShardInfo]) -> None:
    rows = sorted(shards, key=lambda s: s.file)
    table = pa.Table.from_pylist([asdict(s) for s in rows], schema=_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(Path(folder) / MANIFEST, buffer.getvalue())


def read_manifest(folder: str | Path) -> list[ShardInfo]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path} is missing: not a finished shard folder (run `pipeline build-shards` to completion)")
    try:
        return [ShardInfo(**row) for row in pq.read_table(path).to_pylist()]
    except (pa.ArrowException, OSError, TypeError) as error:  # not parquet, or not our columns
        raise UserError(f"{path} is unreadable ({one_line(error)})") from None


def write_dataset_info(folder: str | Path, info: dict[str, Any]) -> None:
    atomic_write_json(Path(folder) / DATASET_JSON, {"schema_version": SCHEMA_VERSION, **info})


def read_dataset_info(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / DATASET_JSON
    if not path.is_file():
        raise UserError(f"{path} is missing: not a finished shard folder (run `pipeline build-shards` to completion)")
    try:
        info = json.loads(path.read_text())
    except (ValueError, OSError) as error:  # not JSON, or not UTF-8
        raise UserError(f"{path} is unreadable ({one_line(error)})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path} is unreadable (a JSON {type(info).__name__}, not an object)")
    return info


def recorded_coefficient(info: dict[str, Any]) -> str:
    """The guidance coefficient c_t recorded for classifier shards (`guidance.coefficient`); shards built
    before the option was recorded read as the seed's, "sqrt-beta"."""
    return info.get("guidance", {}).get("coefficient") or DEFAULT_COEFFICIENT


def schema_problem(info: dict[str, Any], reader: str) -> str | None:
    """What is wrong with dataset.json's schema version for `reader` (which reads every readable one), or None."""
    if info.get("schema_version") in READABLE_SCHEMA_VERSIONS:
        return None
    readable = ", ".join(map(str, READABLE_SCHEMA_VERSIONS))
    return f"schema_version {info.get('schema_version')} ({reader} reads {readable})"


def check_compatible(info: dict[str, Any], *, teacher_fingerprint: str | None = None, kind: str | None = None) -> None:
    """Refuse shards whose schema, kind or teacher differ from what the reader expects, saying what differs."""
    problems = []
    if (problem := schema_problem(info, "this reader")) is not None:
        problems.append(problem)
    if kind is not None and info.get("kind") != kind:
        problems.append(f"kind {info.get('kind')!r} (expected {kind!r})")
    if teacher_fingerprint is not None and info.get("teacher", {}).get("fingerprint") != teacher_fingerprint:
        problems.append(
            f"teacher fingerprint {str(info.get('teacher', {}).get('fingerprint'))[:12]} "
            f"(this run's teacher is {teacher_fingerprint[:12]})"
        )
    if problems:
        raise UserError("shards do not match: " + "; ".join(problems))

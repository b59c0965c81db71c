"""A shard folder's integrity without decoding a record: what the manifest promises against what is on disk.

Fast by default (one stat a shard); `verify=True` also hashes every shard and reads its tar headers. Record-level
checks (decoding, shapes, NaN/Inf) are `pipeline inspect`'s, which reads every record.
"""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

from diffusion.errors import one_line
from diffusion.files import sha256_file
from shards.manifest import read_dataset_info, read_manifest
from shards.writer import ShardInfo


def folder_problems(folder: str | Path, *, verify: bool = False) -> list[str]:
    """What a reader must refuse the folder for: `file_problems`, and with `verify`, once the files match the
    manifest, `key_problems` too."""
    problems = file_problems(folder, verify=verify)
    if verify and not problems:
        problems = key_problems(folder, read_manifest(folder))
    return problems


def file_problems(folder: str | Path, *, verify: bool = False) -> list[str]:
    """One line per problem, each starting with the shard it names (empty: the files match the manifest).

    Every manifest file exists and has the manifest's size; no file is listed twice; the manifest's sample
    counts add up to dataset.json's `samples`; with `verify`, each file's sha256 is the manifest's too.
    """
    folder = Path(folder)
    info, shards = read_dataset_info(folder), read_manifest(folder)
    problems = [f"{name}: listed {n} times in the manifest"
                for name, n in Counter(s.file for s in shards).items() if n > 1]
    for shard in shards:
        path = folder / shard.file
        if not path.is_file():
            problems.append(f"{shard.file}: missing")
        elif (size := path.stat().st_size) != shard.bytes:
            problems.append(f"{shard.file}: {size} bytes (manifest says {shard.bytes})")
        elif verify and (digest := sha256_file(path)) != shard.sha256:
            problems.append(f"{shard.file}: sha256 {digest[:12]} (manifest says {shard.sha256[:12]})")
    if (listed := sum(s.samples for s in shards)) != info.get("samples"):
        problems.append(f"manifest.parquet: {listed} samples (dataset.json says {info.get('samples')})")
    return problems


def key_problems(folder: str | Path, shards: list[ShardInfo]) -> list[str]:
    """Each record key once in the folder, and each shard holding the manifest's count of records, from the tar
    headers alone."""
    first: dict[str, str] = {}
    problems = []
    for shard in shards:
        try:
            keys = record_keys(Path(folder) / shard.file)
        except (tarfile.TarError, OSError) as error:
            problems.append(f"{shard.file}: unreadable ({one_line(error)})")
            continue
        if len(keys) != shard.samples:
            problems.append(f"{shard.file}: {len(keys)} records (manifest says {shard.samples})")
        for key in keys:
            if key in first:
                problems.append(f"{shard.file}: record {key} again (first in {first[key]})")
            first.setdefault(key, shard.file)
    return problems


def record_keys(path: str | Path) -> list[str]:
    """A shard's record keys in order, one per record (its `KEY.json` member, shards.format), headers only."""
    with tarfile.open(path, "r:") as tar:
        return [m.name.removesuffix(".json") for m in tar if m.isfile() and m.name.endswith(".json")]

"""Prompt files, for every stage that reads a list of prompts (sid-lsg's training prompts, evaluation's lists).

Accepted files:
- `.txt` (any suffix but those below): one prompt per line;
- `.csv` / `.tsv` (csv quoting rules) and `.parquet`: a table whose caption column is `column` (default
  `caption`), with an optional `image_id` column;
- `.json`: a list of captions, `{"prompts": [...]}` (the `prompts.json` an evaluation writes, with its `image_ids`
  if any), a list of `{"caption", "image_id"}` records, or `{"annotations": [...]}` of such records (COCO's layout).

Text is UTF-8 with or without a byte-order mark, or UTF-16 (`diffusion.text_files`). In text and csv/tsv files a
line whose bytes do not decode is skipped and counted; captions are stripped, and empty ones are skipped and
counted (with their image ids, so pairs stay aligned). `info` holds the counts, the format and the file's sha256.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from diffusion.errors import UserError
from diffusion.files import sha256_file
from diffusion.text_files import decode_lines, decode_text

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")


@dataclass
class PromptFile:
    prompts: list[str]
    image_ids: list[int] | None = None
    info: dict = field(default_factory=dict)


def _lines(path: Path, option: str) -> tuple[list[str], int]:
    """(the decodable lines, how many were not)."""
    decoded = decode_lines(path.read_bytes())
    if decoded.undecodable and not decoded.lines:
        raise UserError(f"{option} {path} is neither UTF-8 nor UTF-16 text")
    return decoded.lines, decoded.undecodable


def _records_from_json(path: Path, data, column: str, option: str) -> list[tuple[str, object]]:
    """(caption, image_id or None) from the JSON layouts named in the module docstring."""
    if isinstance(data, dict) and "prompts" in data:
        ids = data.get("image_ids") or [None] * len(data["prompts"])
        if len(ids) != len(data["prompts"]):
            raise UserError(f"{option} {path}: {len(data['prompts'])} prompts but {len(ids)} image_ids")
        return list(zip(data["prompts"], ids))
    if isinstance(data, dict) and "annotations" in data:
        data = data["annotations"]
    if not isinstance(data, list):
        raise UserError(f"{option} {path}: expected a JSON list of captions or of {{{column!r}, 'image_id'}} "
                        "records, or {'prompts': [...]}")
    if all(isinstance(item, str) for item in data):
        return [(item, None) for item in data]
    if not all(isinstance(item, dict) for item in data):
        raise UserError(f"{option} {path}: a JSON list must hold only captions or only records")
    for i, item in enumerate(data):
        if column not in item:
            raise UserError(f"{option} {path}: record {i} has no column {column!r} (keys: {', '.join(item)}); "
                            "pick one with --prompt-column")
    return [(item[column], item.get("image_id")) for item in data]


def _json_records(path: Path, column: str, option: str) -> list[tuple[str, object]]:
    try:
        data = json.loads(decode_text(path.read_bytes()))
    except UnicodeDecodeError as error:
        raise UserError(f"{option} {path} is neither UTF-8 nor UTF-16 text (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{option} {path}: not valid JSON ({error})") from None
    return _records_from_json(path, data, column, option)


def _table(path: Path, option: str) -> tuple[dict[str, list], int]:
    """(columns, undecodable lines skipped) of a .csv/.tsv (Python's csv module) or .parquet (pyarrow) file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet

        try:
            return pyarrow.parquet.read_table(path).to_pydict(), 0
        except Exception as error:  # pyarrow's own errors for a malformed file
            raise UserError(f"{option} {path}: cannot read it as a parquet table ({error})") from None
    lines, undecodable = _lines(path, option)
    try:
        rows = list(csv.reader(io.StringIO("\n".join(lines), newline=""),
                               delimiter="\t" if path.suffix == ".tsv" else ","))
    except csv.Error as error:
        raise UserError(f"{option} {path}: cannot read it as a {path.suffix[1:]} table ({error})") from None
    if not rows:
        return {}, undecodable
    header, body = [name.strip() for name in rows[0]], rows[1:]
    if (bad := next((i for i, row in enumerate(body) if row and len(row) != len(header)), None)) is not None:
        raise UserError(f"{option} {path}: row {bad + 2} has {len(body[bad])} fields, the header {len(header)}")
    body = [row for row in body if row]
    return {name: [row[i] for row in body] for i, name in enumerate(header)}, undecodable


def _table_records(path: Path, column: str, option: str) -> tuple[list[tuple[str, object]], int]:
    columns, undecodable = _table(path, option)
    if column not in columns:
        raise UserError(f"{option} {path} has no column {column!r} (columns: {', '.join(columns) or 'none'}); "
                        "pick one with --prompt-column")
    captions = columns[column]
    return list(zip(captions, columns.get("image_id") or [None] * len(captions))), undecodable


def _image_id(path: Path, value, row: int, option: str) -> int:
    if isinstance(value, float) and value.is_integer():  # a pandas-written parquet/JSON column of floats
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise UserError(f"{option} {path}: image_id {value!r} of entry {row} is not an integer") from None


def read_prompt_file(path: str | Path, column: str = "caption", option: str = "--prompts") -> PromptFile:
    """Every prompt of a file in order, with its image ids if the file has them (formats: module doc). `option`
    names the flag in error messages."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option} {path}: no such file")
    undecodable = 0
    if path.suffix in TABLE_SUFFIXES:
        (records, undecodable), kind = _table_records(path, column, option), path.suffix[1:]
    elif path.suffix == ".json":
        records, kind = _json_records(path, column, option), "json"
    else:
        lines, undecodable = _lines(path, option)
        records, kind = [(line, None) for line in lines], "text"
    kept = [("" if c is None else str(c).strip(), i) for c, i in records]
    kept = [(c, i) for c, i in kept if c]
    if not kept:
        raise UserError(f"{option} {path} holds no prompts")
    with_ids = [i for _, i in kept if i not in (None, "")]
    if with_ids and len(with_ids) != len(kept):
        raise UserError(f"{option} {path}: {len(kept) - len(with_ids)} of {len(kept)} captions have no image_id")
    ids = [_image_id(path, i, n, option) for n, i in enumerate(with_ids)] if with_ids else None
    info = {"kind": "file", "path": str(path), "format": kind, "sha256": sha256_file(path), "count": len(kept),
            "empty_skipped": len(records) - len(kept), "undecodable_skipped": undecodable,
            "image_ids": ids is not None}
    return PromptFile([c for c, _ in kept], ids, info)

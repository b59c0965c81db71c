"""The prompts an evaluation renders: a seeded draw of COCO-2014 captions (the default), or a fixed list in a file.

A fixed list is how published tables are made comparable. GigaGAN's evaluation (github.com/mingukkang/GigaGAN,
`evaluation/data_util.py`) renders the 30k captions of its `captions.txt`, one per line, image i from line i; the
SiD-LSG README points to that same file for its zero-shot COCO-2014 FID. Accepted files:

- `.txt` (any suffix but those below): one caption per line;
- `.csv` / `.tsv` (csv quoting rules) and `.parquet`: a table whose caption column is `--prompt-column` (default
  `caption`), with an optional `image_id` column;
- `.json`: a list of captions, `{"prompts": [...]}` (the `prompts.json` a run writes, with its `image_ids` if
  any), a list of `{"caption", "image_id"}` records, or `{"annotations": [...]}` of such records (COCO's layout).

Text is decoded as UTF-8 (a byte-order mark is dropped). Captions are stripped; empty ones are skipped and counted
(with their image ids, so pairs stay aligned). The file's sha256 and counts go into the run's protocol.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from diffusion.errors import UserError
from diffusion.files import sha256_file

COCO_DRAW_SEED = 2014  # the default: captions drawn without replacement from all annotations sorted by id
COCO_DEFAULT_COUNT = 30000
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")


@dataclass
class PromptSelection:
    """The prompts in render order, their COCO image ids where known, and what the protocol records of them."""

    prompts: list[str]
    source: str
    image_ids: list[int] | None = None
    info: dict = field(default_factory=dict)


def _text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"--prompts {path} is not UTF-8 text (byte {error.start}: {error.reason})") from None


def _records_from_json(path: Path, data, column: str) -> list[tuple[str, object]]:
    """(caption, image_id or None) from the JSON layouts named in the module docstring."""
    if isinstance(data, dict) and "prompts" in data:
        ids = data.get("image_ids") or [None] * len(data["prompts"])
        if len(ids) != len(data["prompts"]):
            raise UserError(f"--prompts {path}: {len(data['prompts'])} prompts but {len(ids)} image_ids")
        return list(zip(data["prompts"], ids))
    if isinstance(data, dict) and "annotations" in data:
        data = data["annotations"]
    if not isinstance(data, list):
        raise UserError(f"--prompts {path}: expected a JSON list of captions or of {{{column!r}, 'image_id'}} "
                        "records, or {'prompts': [...]}")
    if all(isinstance(item, str) for item in data):
        return [(item, None) for item in data]
    if not all(isinstance(item, dict) for item in data):
        raise UserError(f"--prompts {path}: a JSON list must hold only captions or only records")
    for i, item in enumerate(data):
        if column not in item:
            raise UserError(f"--prompts {path}: record {i} has no column {column!r} (keys: {', '.join(item)}); "
                            "pick one with --prompt-column")
    return [(item[column], item.get("image_id")) for item in data]


def _table(path: Path) -> dict[str, list]:
    """Columns of a .csv/.tsv (read with Python's csv module, UTF-8) or .parquet (pyarrow) file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet

        try:
            return pyarrow.parquet.read_table(path).to_pydict()
        except Exception as error:  # pyarrow's own errors for a malformed file
            raise UserError(f"--prompts {path}: cannot read it as a parquet table ({error})") from None
    try:
        rows = list(csv.reader(io.StringIO(_text(path), newline=""), delimiter="\t" if path.suffix == ".tsv" else ","))
    except csv.Error as error:
        raise UserError(f"--prompts {path}: cannot read it as a {path.suffix[1:]} table ({error})") from None
    if not rows:
        return {}
    header, body = [name.strip() for name in rows[0]], rows[1:]
    if (bad := next((i for i, row in enumerate(body) if row and len(row) != len(header)), None)) is not None:
        raise UserError(f"--prompts {path}: row {bad + 2} has {len(body[bad])} fields, the header {len(header)}")
    body = [row for row in body if row]
    return {name: [row[i] for row in body] for i, name in enumerate(header)}


def _records_from_table(path: Path, column: str) -> list[tuple[str, object]]:
    columns = _table(path)
    if column not in columns:
        raise UserError(f"--prompts {path} has no column {column!r} (columns: {', '.join(columns) or 'none'}); "
                        "pick one with --prompt-column")
    captions = columns[column]
    return list(zip(captions, columns.get("image_id") or [None] * len(captions)))


def _image_id(path: Path, value, row: int) -> int:
    if isinstance(value, float) and value.is_integer():  # a pandas-written parquet/JSON column of floats
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise UserError(f"--prompts {path}: image_id {value!r} of entry {row} is not an integer") from None


def read_prompt_list(path: str | Path, column: str = "caption") -> PromptSelection:
    """Every caption of a prompt file in order, with its image ids if the file has them (formats: module doc)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file")
    if path.suffix in TABLE_SUFFIXES:
        records, kind = _records_from_table(path, column), path.suffix[1:]
    elif path.suffix == ".json":
        try:
            data = json.loads(_text(path))
        except json.JSONDecodeError as error:
            raise UserError(f"--prompts {path}: not valid JSON ({error})") from None
        records, kind = _records_from_json(path, data, column), "json"
    else:
        records, kind = [(line, None) for line in _text(path).splitlines()], "text"
    kept = [("" if c is None else str(c).strip(), i) for c, i in records]
    kept = [(c, i) for c, i in kept if c]
    if not kept:
        raise UserError(f"--prompts {path} holds no prompts")
    with_ids = [i for _, i in kept if i not in (None, "")]
    if with_ids and len(with_ids) != len(kept):
        raise UserError(f"--prompts {path}: {len(kept) - len(with_ids)} of {len(kept)} captions have no image_id")
    ids = [_image_id(path, i, n) for n, i in enumerate(with_ids)] if with_ids else None
    info = {"kind": "file", "path": str(path), "format": kind, "sha256": sha256_file(path), "count": len(kept),
            "empty_skipped": len(records) - len(kept), "image_ids": ids is not None}
    return PromptSelection([c for c, _ in kept], str(path), ids, info)


def first_prompts(selection: PromptSelection, num: int | None) -> PromptSelection:
    """The first `num` prompts of a file (all of them when num is None); a file with fewer is an error."""
    if num is None:
        return selection
    if num > len(selection.prompts):
        raise UserError(f"--prompts {selection.source} holds {len(selection.prompts)} prompts, fewer than "
                        f"--num-images {num}")
    ids = selection.image_ids[:num] if selection.image_ids is not None else None
    return PromptSelection(selection.prompts[:num], selection.source, ids, dict(selection.info))


def _normal(caption: str) -> str:
    return " ".join(caption.lower().split())


def coco_match(selection: PromptSelection, coco: Path) -> dict:
    """How many of the listed captions (lower-cased, whitespace collapsed) and image ids are in COCO-2014's
    annotations: a check that a list is the COCO-2014 list it claims to be. It does not change the references."""
    from evaluation.coco import read_captions

    annotations = read_captions(coco)
    captions = {_normal(a["caption"]) for a in annotations}
    out = {"captions_in_coco": sum(_normal(c) in captions for c in selection.prompts)}
    if selection.image_ids is not None:
        ids = {a["image_id"] for a in annotations}
        out["image_ids_in_coco"] = sum(i in ids for i in selection.image_ids)
    return out


def coco_draw(coco: Path, num: int | None) -> PromptSelection:
    """The default: `num` (30000) captions drawn with seed 2014 from all COCO-2014 val annotations sorted by id."""
    from evaluation.coco import CAPTIONS, choose_annotations

    chosen = choose_annotations(coco, COCO_DEFAULT_COUNT if num is None else num, COCO_DRAW_SEED)
    source = f"{coco}/{CAPTIONS.as_posix()}"
    info = {"kind": "coco-draw", "path": source, "seed": COCO_DRAW_SEED, "image_ids": True}
    return PromptSelection([a["caption"] for a in chosen], source, [a["image_id"] for a in chosen], info)


def select_prompts(coco: str | None, prompts: str | None, num_images: int | None,
                   column: str = "caption") -> PromptSelection:
    """--prompts FILE (its first --num-images, default all) if given, else the seeded draw from --coco."""
    if num_images is not None and num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {num_images}")
    if prompts:
        selection = first_prompts(read_prompt_list(prompts, column), num_images)
        if coco:
            selection.info.update(coco_match(selection, Path(coco)))
        return selection
    if not coco:
        raise UserError("pass --coco DIR (COCO-2014 captions) or --prompts FILE")
    return coco_draw(Path(coco), num_images)

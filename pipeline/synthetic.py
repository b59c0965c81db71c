"""Write a small img2dataset-style source (tars of KEY.jpg/png + KEY.txt + KEY.json, with parquet and stats),
of coloured shapes with captions, optionally with every kind of bad input the builder must survive; and
`damaged_tars`, the broken tar files users download (empty, not a tar, cut short, repeated keys, oversized and
16-bit images, captions in other encodings), each with what the build counts for it.

The tests use both; the demo's input check builds from both and reports the counts.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def shape_image(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _bad_samples(size: int, rng: random.Random) -> list[tuple[str, dict[str, bytes]]]:
    """(name, members) for each bad or unusual input; the name says what it is."""
    good = shape_image("red", "circle", size, rng)
    jpeg = _encode(good, "JPEG")
    caption = b"a red circle"
    return [
        ("zero_byte", {"jpg": b"", "txt": caption}),
        ("not_an_image", {"jpg": b"<html>404 not found</html>", "txt": caption}),
        ("truncated_jpeg", {"jpg": jpeg[: len(jpeg) // 2], "txt": caption}),
        ("cmyk", {"jpg": _encode(good.convert("CMYK"), "JPEG"), "txt": caption}),
        ("grayscale", {"png": _encode(good.convert("L"), "PNG"), "txt": caption}),
        ("alpha", {"png": _encode(good.convert("RGBA"), "PNG"), "txt": caption}),
        ("tiny", {"png": _encode(good.resize((4, 4)), "PNG"), "txt": caption}),
        ("no_caption", {"jpg": jpeg}),
        ("empty_caption", {"jpg": jpeg, "txt": b"  \n"}),
        ("latin1_caption", {"jpg": jpeg, "txt": "caf\u00e9 cr\u00e8me".encode("latin-1")}),
    ]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_source(
    folder: str | Path, samples: int = 64, per_tar: int = 16, size: int = 48, seed: int = 0, bad_inputs: bool = False
) -> Path:
    """Write tars 00000.tar, 00001.tar, ... (+ a truncated tar when bad_inputs); return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    entries: list[tuple[str, dict[str, bytes]]] = []
    for i in range(samples):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        image = shape_image(colour, shape, size, rng)
        fmt = "png" if i % 3 == 0 else "jpg"
        entries.append((f"{i:09d}", {fmt: _encode(image, "PNG" if fmt == "png" else "JPEG"),
                                     "txt": f"a {colour} {shape}".encode()}))
    if bad_inputs:
        bad = _bad_samples(size, rng)
        entries[1 : 1] = [(f"{samples + j:09d}_{name}", members) for j, (name, members) in enumerate(bad)]
    for shard, start in enumerate(range(0, len(entries), per_tar)):
        rows = []
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for key, members in entries[start : start + per_tar]:
                meta = {"key": key, "status": "success", "url": f"https://example.invalid/{key}"}
                for extension, data in {**members, "json": json.dumps(meta).encode()}.items():
                    _add(tar, f"{key}.{extension}", data)
                rows.append(meta)
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(rows)}))
    if bad_inputs:
        _write_truncated_tar(folder / f"{shard + 1:05d}.tar", size, rng)
    return folder


def _write_truncated_tar(path: Path, size: int, rng: random.Random) -> None:
    """Two good samples, then the tar is cut in the middle of the third sample's image."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(3):
            key = f"trunc{i:04d}"
            _add(tar, f"{key}.jpg", _encode(shape_image("blue", "square", size, rng), "JPEG"))
            _add(tar, f"{key}.txt", b"a blue square")
    data = buffer.getvalue()
    cut = data.find(b"trunc0002.jpg") + 512 + 100  # past the header, inside the image data
    path.write_bytes(data[:cut])


CAPTION = b"a grey square"
GREY_PNG_SIDE = 32


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            _add(tar, name, data)
    return buffer.getvalue()


def _cut_after(data: bytes, member: str) -> bytes:
    """The tar cut on the 512-byte boundary right after `member`'s data: no later member, no end blocks."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        info = tar.getmember(member)
    return data[: info.offset_data + -(-info.size // 512) * 512]


def gradient_16bit(size: int = GREY_PNG_SIDE) -> tuple[Image.Image, np.ndarray]:
    """(a 16-bit grayscale image whose columns go 0..65535, the same gradient in 8 bits)."""
    columns = np.arange(size) / (size - 1)
    wide = np.tile(np.round(columns * 65535).astype(np.uint16), (size, 1))
    return Image.fromarray(wide), np.tile(np.round(columns * 255), (size, 1))


GREY_PNG = _encode(Image.new("RGB", (GREY_PNG_SIDE, GREY_PNG_SIDE), (90, 90, 90)), "PNG")


def damaged_tars() -> list[tuple[str, bytes, dict[str, int]]]:
    """(tar name, its bytes, what a build counts for it: "records" and skips by reason); deterministic."""
    grey, caption = GREY_PNG, CAPTION
    return [
        ("empty", b"", {"empty_tar": 1}),
        ("no_members", _tar_bytes([]), {"empty_tar": 1}),
        ("junk", random.Random(0).randbytes(3000), {"not_a_tar": 1}),
        ("cut_on_boundary", _cut_after(_tar_bytes([("a.png", grey), ("a.txt", caption), ("b.png", grey),
                                                   ("b.txt", caption)]), "b.png"), {"records": 1, "truncated_tar": 1}),
        ("repeated_key", _tar_bytes([("a.png", grey), ("a.txt", caption), ("b.png", grey), ("b.txt", caption),
                                     ("a.png", grey), ("a.txt", b"again")]), {"records": 2, "duplicate_key": 1}),
        ("too_large", _tar_bytes([("big.png", _encode(Image.new("L", (9000, 9000)), "PNG")), ("big.txt", caption)]),
         {"image_too_large": 1}),
        ("sixteen_bit", _tar_bytes([("g.png", _encode(gradient_16bit()[0], "PNG")), ("g.txt", caption)]),
         {"records": 1}),
        ("captions", _tar_bytes([("u16.png", grey), ("u16.txt", "café".encode("utf-16")),
                                 ("u16le.png", grey), ("u16le.txt", "café".encode("utf-16-le")),
                                 ("bom.png", grey), ("bom.txt", "\ufeffcafé".encode("utf-8")),
                                 ("latin1.png", grey), ("latin1.txt", "café".encode("latin-1"))]),
         {"records": 3, "caption_not_utf8": 1}),
    ]


def write_damaged_tars(folder: str | Path) -> dict[str, int]:
    """damaged_tars() as FOLDER/NAME.tar; returns the counts a build of them gives, summed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    total: dict[str, int] = {}
    for name, data, counts in damaged_tars():
        (folder / f"{name}.tar").write_bytes(data)
        for reason, n in counts.items():
            total[reason] = total.get(reason, 0) + n
    return total

"""What users bring to `pipeline build-shards` that is not a clean img2dataset tar: repeated keys, high-bit-depth
images, broken tars, tables with bad rows, captions in other encodings. Every input becomes records that
`pipeline inspect` accepts, or a skip counted by reason in dataset.json."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import build_args, read_records
from PIL import Image

from pipeline.cli import main
from pipeline.images import Skip, decode_caption, decode_image
from pipeline.synthetic import GREY_PNG as GOOD
from pipeline.synthetic import damaged_tars, gradient_16bit, write_damaged_tars
from shards.manifest import read_dataset_info



def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _build(teacher_dir, source, out) -> dict:
    assert main(build_args(teacher_dir, source, out)) == 0
    assert main(["inspect", str(out)]) == 0
    return read_dataset_info(out)


def test_every_bad_tar_is_counted_by_reason(tmp_path, teacher_dir):
    expected = write_damaged_tars(tmp_path / "tars")
    info = _build(teacher_dir, tmp_path / "tars", tmp_path / "out")
    assert info["samples"] == expected.pop("records")
    assert info["skipped"] == dict(sorted(expected.items()))
    assert info["converted_image_modes"] == {"I;16": 1}
    records = read_records(tmp_path / "out")
    assert sorted(r.caption for r in records.values() if r.meta["unit"] == "captions") == ["café"] * 3
    repeated = {r.meta["source_key"]: r.caption for r in records.values() if r.meta["unit"] == "repeated_key"}
    assert repeated == {"repeated_key/a": "a grey square", "repeated_key/b": "a grey square"}


def test_a_tar_counts_the_entries_it_yields(tmp_path):
    """--samples caps entries by count(): it must agree with what samples() yields, skips included."""
    from pipeline.sources import TarUnit

    for name, data, counts in damaged_tars():
        (tmp_path / f"{name}.tar").write_bytes(data)
        unit = TarUnit(name, tmp_path / f"{name}.tar")
        assert unit.count() == len(list(unit.samples())) == sum(counts.values()), name


def test_table_with_several_captions_per_image_gives_one_record_each(tmp_path, teacher_dir):
    """COCO-style: one row per caption. Repeats are numbered over the whole table, so they stay unique across
    units of --shard-size 5 rows; the first row of an image keeps the key it always had."""
    (tmp_path / "img").mkdir()
    for name in "abcdef":
        (tmp_path / "img" / f"{name}.png").write_bytes(GOOD)
    rows = ["a", "a", "b", "c", "d", "e", "a", "f", "b"]
    lines = ["file,caption"] + [f"img/{name}.png,caption {i} of {name}" for i, name in enumerate(rows)]
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    info = _build(teacher_dir, tmp_path / "captions.csv", tmp_path / "out")
    assert info["samples"] == len(rows) and info["skipped"] == {}
    records = {r.meta["source_key"]: r for r in read_records(tmp_path / "out").values()}
    keys = {key: r.caption for key, r in records.items()}
    assert keys["img/a"] == "caption 0 of a" and keys["img/a#1"] == "caption 1 of a"
    assert keys["img/a#2"] == "caption 6 of a" and keys["img/b#1"] == "caption 8 of b"
    assert not records["img/a"].tensors["zt"].equal(records["img/a#1"].tensors["zt"])  # their own noise draws


def test_source_keys_are_unique_and_keep_the_plain_key_where_they_can():
    from pipeline.sources import source_keys

    files = ["a.jpg", "a.png", "b.png", "b.png", "a.jpg", "c.png", "sub/c.png", "b#1.png"]
    assert source_keys(files) == ["a.jpg", "a.png", "b", "b#1", "a.jpg#1", "c", "sub/c", "b#1#1"]


def test_images_sharing_a_stem_are_two_records_with_one_caption(tmp_path, teacher_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(GOOD)
    Image.new("RGB", (32, 32), "red").save(folder / "a.jpg")
    (folder / "a.txt").write_text("shared caption")
    (folder / "b.png").write_bytes(GOOD)
    (folder / "b.txt").write_text("own caption")
    _build(teacher_dir, folder, tmp_path / "out")
    keys = {r.meta["source_key"]: r.caption for r in read_records(tmp_path / "out").values()}
    assert keys == {"a.jpg": "shared caption", "a.png": "shared caption", "b": "own caption"}


def test_table_rows_without_a_file_and_utf16_tables(tmp_path, teacher_dir):
    (tmp_path / "a.png").write_bytes(GOOD)
    text = "file,caption\na.png,café\n,no file\nmissing.png,gone\na.png,\n"
    (tmp_path / "captions.csv").write_bytes(text.encode("utf-16"))
    info = _build(teacher_dir, tmp_path / "captions.csv", tmp_path / "out")
    assert info["samples"] == 1 and info["skipped"] == {"empty_caption": 1, "missing_file": 2}
    assert [r.caption for r in read_records(tmp_path / "out").values()] == ["café"]


def test_unreadable_table_is_one_line(tmp_path, teacher_dir, capsys):
    (tmp_path / "captions.csv").write_bytes("file,caption\na.png,caf\u00e9\n".encode("latin-1"))
    assert main(build_args(teacher_dir, tmp_path / "captions.csv", tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert "captions.csv" in err and "\n" not in err


def _decoded_grey(image: Image.Image) -> np.ndarray:
    pixels, mode, _micro = decode_image(_png(image) if image.mode == "I;16" else _tiff(image), 32, 16)
    assert mode == image.mode
    return ((pixels[0].numpy() + 1.0) * 127.5).astype(np.float64)


def _tiff(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_images_keep_their_gradient(mode):
    wide, expected = gradient_16bit()
    image = {"I;16": wide, "I": wide.convert("I"),
             "F": Image.fromarray(np.asarray(wide, dtype=np.float32) / 65535.0)}[mode]
    assert np.abs(_decoded_grey(image) - expected).max() <= 1.0


def test_big_endian_16_bit_is_scaled_too():
    from pipeline.images import to_rgb

    wide, expected = gradient_16bit()
    big = Image.frombytes("I;16B", wide.size, np.asarray(wide).astype(">u2").tobytes())
    assert np.abs(np.asarray(to_rgb(big))[..., 0] - expected).max() <= 1.0


def test_images_above_the_pixel_limit_are_too_large(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = _png(Image.new("RGB", (15, 15)))  # 225 pixels: more than 2x the limit (PIL raises an error)
    with pytest.raises(Skip, match="image_too_large"):
        decode_image(data, 32, 1)
    with pytest.raises(Skip, match="image_too_large"):  # between 1x and 2x (PIL warns)
        decode_image(_png(Image.new("RGB", (12, 12))), 32, 1)


@pytest.mark.parametrize("data", ["café".encode("utf-16"), "café".encode("utf-16-be"), b"\xef\xbb\xbfcaf\xc3\xa9 "])
def test_captions_in_utf16_or_with_a_bom(data):
    assert decode_caption(data) == "café"

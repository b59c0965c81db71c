"""Text users bring: UTF-8 with or without a BOM, UTF-16 with or without one, and lines that decode in neither,
for every reader of prompt files (sid-lsg's prompts, evaluation's lists) and for sidecar captions."""

from __future__ import annotations

import codecs

import pytest

from diffusion.errors import UserError
from diffusion.prompt_files import read_prompt_file
from diffusion.text_files import decode_lines, decode_text, text_encoding
from evaluation.prompt_list import read_prompt_list
from trainer.prompts import read_prompts

PROMPTS = ["a café", "naïve crème", "東京の夜"]
ENCODINGS = {
    "utf-8": lambda text: text.encode("utf-8"),
    "utf-8-bom": lambda text: codecs.BOM_UTF8 + text.encode("utf-8"),
    "utf-16-bom": lambda text: text.encode("utf-16"),  # the platform's byte order, with its BOM
    "utf-16-le": lambda text: text.encode("utf-16-le"),  # no BOM: found by its NUL bytes
    "utf-16-be": lambda text: text.encode("utf-16-be"),
}


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_decode_text_reads_utf8_and_utf16_with_or_without_a_bom(encoding):
    text = "\r\n".join(PROMPTS) + "\r\n"
    data = ENCODINGS[encoding](text)
    assert decode_text(data) == text
    assert decode_lines(data).lines == PROMPTS and decode_lines(data).undecodable == 0


def test_lines_that_do_not_decode_are_dropped_and_counted():
    data = "a cat\n".encode() + "caf\xe9 latin-1\n".encode("latin-1") + b"\xff\xfe\xfd\n" + "a dog\n".encode()
    decoded = decode_lines(data)
    assert decoded.lines == ["a cat", "a dog"] and decoded.undecodable == 2 and decoded.encoding == "utf-8"
    with pytest.raises(UnicodeDecodeError):
        decode_text(data)


def test_plain_ascii_is_utf8_not_utf16():
    assert text_encoding(b"a red circle") == ("utf-8", 0)
    assert text_encoding(b"") == ("utf-8", 0)


@pytest.mark.parametrize("encoding", ["utf-8-bom", "utf-16-bom", "utf-16-le"])
@pytest.mark.parametrize("suffix", [".txt", ".csv", ".tsv", ".json"])
def test_prompt_files_of_every_format_in_every_encoding(tmp_path, encoding, suffix):
    path = tmp_path / f"prompts{suffix}"
    text = {".txt": "\n".join(PROMPTS) + "\n", ".csv": "caption,image_id\n" + "".join(
        f'"{p}",{i}\n' for i, p in enumerate(PROMPTS)), ".tsv": "caption\timage_id\n" + "".join(
        f"{p}\t{i}\n" for i, p in enumerate(PROMPTS)), ".json": '["' + '", "'.join(PROMPTS) + '"]'}[suffix]
    path.write_bytes(ENCODINGS[encoding](text))
    listed = read_prompt_file(path)
    assert listed.prompts == PROMPTS and listed.info["undecodable_skipped"] == 0
    assert read_prompts(path).prompts == PROMPTS  # sid-lsg
    assert read_prompt_list(path).prompts == PROMPTS  # evaluation render / coco30k / sweep


def test_prompt_file_with_latin1_lines_keeps_the_others_and_counts_them(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes("a cat\n".encode() + "caf\xe9\n".encode("latin-1") + "\n".encode() + "a dog\n".encode())
    listed = read_prompts(path)
    assert listed.prompts == ["a cat", "a dog"]
    assert listed.undecodable_skipped == 1 and listed.empty_skipped == 1
    table = tmp_path / "mixed.csv"
    table.write_bytes(b"caption\na cat\ncaf\xe9\na dog\n")
    assert read_prompt_list(table).prompts == ["a cat", "a dog"]
    assert read_prompt_list(table).info["undecodable_skipped"] == 1


def test_prompt_file_of_which_nothing_decodes_is_one_line(tmp_path):
    path = tmp_path / "binary.txt"
    path.write_bytes(b"\x80\x81\x82\n\xc3\x28\n")
    with pytest.raises(UserError, match="neither UTF-8 nor UTF-16"):
        read_prompts(path)
    bad_json = tmp_path / "bad.json"
    bad_json.write_bytes(b'["caf\xe9"]')
    with pytest.raises(UserError, match="neither UTF-8 nor UTF-16"):
        read_prompt_list(bad_json)


def test_sid_lsg_reads_a_utf16_prompt_file_from_the_command_line(teacher_dir, tmp_path):
    """Before: UnicodeDecodeError traceback. Now: the run trains on the file's prompts."""
    import json

    from helpers import sid_args
    from trainer.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(("\n".join(PROMPTS) + "\n").encode("utf-16"))
    out = tmp_path / "sid"
    assert main(sid_args(teacher_dir, prompts, out, "--max-kimg", "0.003")) == 0
    record = json.loads((out / "distillation.json").read_text())
    assert record["prompts"]["count"] == 3 and record["prompts"]["undecodable_lines_skipped"] == 0

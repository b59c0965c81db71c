"""Decoding text users bring (prompt files, sidecar captions, caption tables): UTF-8 with or without a byte-order
mark, or UTF-16 (with a BOM, or without one when the NUL bytes give it away, as Windows tools write it).

`decode_text` decodes one piece of text or raises UnicodeDecodeError; `decode_lines` decodes a whole file line by
line, so a file with a few undecodable lines keeps the others and counts what it dropped.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def text_encoding(data: bytes) -> tuple[str, int]:
    """(encoding, length of the byte-order mark) of `data`: a BOM decides; without one, text of which a quarter or
    more of the bytes are NUL, mostly at odd (even) offsets, is UTF-16-LE (-BE); anything else is UTF-8."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return encoding, len(bom)
    sample = data[:4096]
    if len(sample) >= 2 and sample.count(0) * 4 >= len(sample):
        odd, even = sample[1::2].count(0), sample[0::2].count(0)
        return ("utf-16-le" if odd >= even else "utf-16-be"), 0
    return "utf-8", 0


def decode_text(data: bytes) -> str:
    """The text of `data` (see text_encoding); UnicodeDecodeError if it is not valid in that encoding."""
    encoding, bom = text_encoding(data)
    return data[bom:].decode(encoding)


@dataclass(frozen=True)
class DecodedLines:
    lines: list[str]
    undecodable: int  # lines dropped because their bytes are not valid in the file's encoding
    encoding: str


def decode_lines(data: bytes) -> DecodedLines:
    """Every line of a text file (without line ends); lines that do not decode are dropped and counted."""
    encoding, bom = text_encoding(data)
    body = data[bom:]
    try:
        return DecodedLines(body.decode(encoding).splitlines(), 0, encoding)
    except UnicodeDecodeError:
        pass
    if encoding != "utf-8":  # a broken UTF-16 file: decode what decodes, one replacement per bad unit, then drop those
        lines = body.decode(encoding, errors="replace").splitlines()
        kept = [line for line in lines if "\ufffd" not in line]
        return DecodedLines(kept, len(lines) - len(kept), encoding)
    lines, undecodable = [], 0
    for raw in body.split(b"\n"):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError:
            undecodable += 1
    if lines and lines[-1] == "" and body.endswith(b"\n"):
        lines.pop()
    return DecodedLines(lines, undecodable, encoding)

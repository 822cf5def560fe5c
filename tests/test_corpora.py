"""Tests for the pure-Python reader of R lazy-load databases (janeaustenr)."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import pytest

from shortgpt_deploy.corpora import AUSTEN_TITLES, austen_novels, data_dir, read_lazyload_db, unserialize

# Serialization building blocks, following R Internals "Serialization formats".
SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 1, 2, 9, 10, 13, 14, 16, 19
NILVALUE = struct.pack(">i", 254)
ASCII, UTF8, LATIN1 = 64, 8, 4  # CHARSXP encoding levels
NA_INT = -(2**31)
NA_REAL = struct.pack(">II", 0x7FF00000, 1954)


def ints(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def flags(sexptype: int, *, levels: int = 0, attr: bool = False, tag: bool = False) -> bytes:
    return ints(sexptype | attr << 9 | tag << 10 | levels << 12)


def charsxp(text: str | None, levels: int = ASCII, encoding: str = "utf-8") -> bytes:
    if text is None:
        return flags(CHARSXP) + ints(-1)
    raw = text.encode(encoding)
    return flags(CHARSXP, levels=levels) + ints(len(raw)) + raw


def strsxp(*elements: bytes) -> bytes:
    return flags(STRSXP) + ints(len(elements)) + b"".join(elements)


class Symbols:
    """Writes a symbol in full the first time, then as a REFSXP, as R does."""

    def __init__(self) -> None:
        self.table: list[str] = []

    def __call__(self, name: str) -> bytes:
        if name in self.table:
            return ints((self.table.index(name) + 1) << 8 | 255)
        self.table.append(name)
        return flags(SYMSXP) + charsxp(name)


def named_list(symbols: Symbols, items: dict[str, bytes]) -> bytes:
    names = strsxp(*(charsxp(name) for name in items))
    attributes = flags(LISTSXP, tag=True) + symbols("names") + names + NILVALUE
    return flags(VECSXP, attr=True) + ints(len(items)) + b"".join(items.values()) + attributes


def serialization(body: bytes) -> bytes:
    header = b"X\n" + ints(3, 0x040201, 0x030500) + ints(5) + b"UTF-8"
    return header + body


def lazyload_blob(serialized: bytes) -> bytes:
    return struct.pack(">I", len(serialized)) + zlib.compress(serialized)


def write_db(tmp_path: Path, variables: dict[str, bytes], compressed: bytes | None = None) -> Path:
    """Write <tmp>/Rdata.rdx + Rdata.rdb; the .rdx is gzipped like makeLazyLoadDB's saveRDS() call."""
    rdb, offsets = b"", {}
    for name, serialized in variables.items():
        blob = lazyload_blob(serialized)
        offsets[name] = flags(INTSXP) + ints(2, len(rdb), len(blob))
        rdb += blob
    symbols = Symbols()
    index = named_list(
        symbols,
        {
            "variables": named_list(symbols, offsets),
            "references": named_list(symbols, {}),
            "compressed": compressed or flags(LGLSXP) + ints(1, 1),
        },
    )
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    rdx = tmp_path / "Rdata.rdx"
    rdx.write_bytes(gzip.compress(serialization(index)))
    return rdx


def test_read_lazyload_db_handwritten(tmp_path: Path) -> None:
    text = strsxp(
        charsxp(None),
        charsxp("Ünïcödé £", levels=UTF8),
        charsxp("café", levels=LATIN1, encoding="latin-1"),
        charsxp("plain"),
    )
    counts = flags(INTSXP) + ints(3, 1, NA_INT, 3)
    weights = flags(REALSXP) + ints(3) + struct.pack(">d", 1.5) + NA_REAL + struct.pack(">d", math.nan)
    flags_vec = flags(LGLSXP) + ints(3, 1, NA_INT, 0)
    sample = serialization(named_list(Symbols(), {"text": text, "counts": counts}))
    rdx = write_db(
        tmp_path,
        {"sample": sample, "weights": serialization(weights), "flags": serialization(flags_vec)},
    )

    db = read_lazyload_db(rdx)

    assert list(db) == ["sample", "weights", "flags"]
    assert db["sample"] == {"text": [None, "Ünïcödé £", "café", "plain"], "counts": [1, None, 3]}
    assert db["flags"] == [True, None, False]
    real = db["weights"]
    assert isinstance(real, list) and len(real) == 3
    assert real[0] == 1.5 and real[1] is None and math.isnan(real[2])


def test_unsupported_inputs_raise(tmp_path: Path) -> None:
    closure = flags(3) + NILVALUE  # CLOSXP: not data, so the minimal reader refuses it
    with pytest.raises(ValueError, match="unsupported R SEXP type 3"):
        unserialize(serialization(closure))
    xz = flags(INTSXP) + ints(1, 3)
    rdx = write_db(tmp_path, {"x": serialization(flags(INTSXP) + ints(0))}, compressed=xz)
    with pytest.raises(ValueError, match="compression"):
        read_lazyload_db(rdx)
    with pytest.raises(FileNotFoundError, match="make data"):
        austen_novels(tmp_path / "nowhere")


def test_real_janeaustenr_package() -> None:
    # `make test` runs `make data` first, so a missing package is a failure here, not a skip.
    folder = data_dir() / "janeaustenr"

    novels = austen_novels(folder)

    assert list(novels) == list(AUSTEN_TITLES)
    assert len(novels) == 6
    assert novels["persuasion"].startswith("Persuasion\n")
    assert len(novels["persuasion"].split()) > 50_000
    assert all(isinstance(text, str) and text for text in novels.values())
    lines = read_lazyload_db(folder / "data" / "Rdata.rdx")
    for name in AUSTEN_TITLES:
        novel_lines = lines[name]
        assert isinstance(novel_lines, list) and None not in novel_lines

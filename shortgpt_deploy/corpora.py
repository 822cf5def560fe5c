"""Text corpora shipped as R data packages, read without R.

Jane Austen's six novels come from the Debian package ``r-cran-janeaustenr``.
Its ``data/Rdata.rdx`` / ``data/Rdata.rdb`` pair is an R "lazy-load database":

* ``Rdata.rdx`` is written by ``saveRDS()`` (so it is gzip-compressed) and holds
  ``list(variables = <name -> c(offset, length)>, references = ..., compressed = ...)``.
* each object is stored in ``Rdata.rdb`` at ``[offset, offset + length)`` as a
  4-byte big-endian uncompressed length followed by a zlib stream (when
  ``compressed`` is ``TRUE``) of an R serialization.

The serialization reader below implements the subset of the XDR format ('X\\n',
versions 2 and 3) described in "R Internals", section "Serialization Formats"
(https://cran.r-project.org/doc/manuals/r-release/R-ints.html), and in
``src/main/serialize.c`` of the R sources. It covers what data packages of plain
vectors use; anything else (closures, environments, ALTREP, ...) raises
``ValueError``.

Values map to Python as: character vectors -> ``list[str | None]``; integer and
logical vectors -> ``list[int | None]`` / ``list[bool | None]``; double vectors
-> ``list[float | None]`` (``NA`` is ``None``, other NaNs stay NaN); ``NULL`` ->
``None``; symbols -> ``str``; generic lists and pairlists whose names are all
present and unique -> ``dict``. Other vectors are returned as :class:`RVector`,
a ``list`` that also carries the R attributes.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import sys
import zlib
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "AUSTEN_TITLES",
    "RVector",
    "austen_novels",
    "data_dir",
    "offline_corpus",
    "read_lazyload_db",
    "unserialize",
]

# R variable name -> title, in publication order, spelled as janeaustenr's austen_books() does.
AUSTEN_TITLES: dict[str, str] = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}

_INSTALL_HINT = (
    "run `make data`, which runs `apt-get download r-cran-janeaustenr` and "
    "`dpkg -x r-cran-janeaustenr_*.deb <dir>`, then point to <dir>"
)

# SEXP type codes (Rinternals.h) and serialize.c pseudo-types.
SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP = 255, 254
_NA_INT = -(2**31)  # NA_integer_ and NA (logical) are both INT_MIN on the wire.
_NA_REAL_LOW_WORD = 1954  # R's NA_real_ is the NaN whose low 32 bits are 1954.
_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10
_LATIN1, _UTF8, _ASCII = 1 << 2, 1 << 3, 1 << 6  # CHARSXP "levels" (gp bits) encoding flags


class RVector(list[object]):
    """An R vector that had attributes other than plain unique names."""

    def __init__(self, values: list[object], attributes: dict[str, object]) -> None:
        super().__init__(values)
        self.attributes = attributes


class _Reader:
    """Cursor over one XDR serialization; keeps the reference table REFSXP indexes into."""

    def __init__(self, data: bytes) -> None:
        self.buf, self.pos = memoryview(data), 0
        self.refs: list[object] = []
        self.native_encoding = "utf-8"

    def read_ints(self, n: int = 1) -> tuple[int, ...]:
        values = struct.unpack_from(f">{n}i", self.buf, self.pos)
        self.pos += 4 * n
        return values

    def read_int(self) -> int:
        return self.read_ints(1)[0]

    def header(self) -> None:
        if bytes(self.buf[:2]) != b"X\n":
            raise ValueError(f"not an XDR R serialization (header {bytes(self.buf[:2])!r}); only 'X\\n' is supported")
        self.pos = 2
        version, _writer, _min_reader = self.read_ints(3)
        if version == 3:  # v3 records the writer's native encoding for unflagged strings.
            n = self.read_int()
            self.native_encoding = bytes(self.buf[self.pos : self.pos + n]).decode("ascii")
            self.pos += n
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def length(self) -> int:
        n = self.read_int()
        if n == -1:  # long vector: length split into two 32-bit words.
            hi, lo = self.read_ints(2)
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        return n

    def charsxp(self, levels: int) -> str | None:
        n = self.read_int()
        if n == -1:
            return None  # NA_character_
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        if levels & _LATIN1:
            return raw.decode("latin-1")
        return raw.decode("utf-8" if levels & (_UTF8 | _ASCII) else self.native_encoding)

    def attributes(self, flags: int) -> dict[str, object]:
        if not flags & _HAS_ATTR:
            return {}
        attrs = self.item()
        if not isinstance(attrs, dict):
            raise ValueError(f"malformed attribute pairlist: {attrs!r}")
        return attrs

    def item(self) -> object:
        flags = self.read_int()
        sexptype, levels = flags & 0xFF, flags >> 12
        if sexptype == NILVALUE_SXP:
            return None
        if sexptype == REFSXP:  # index is packed in the flags, or follows when it did not fit
            index = (flags >> 8) or self.read_int()
            return self.refs[index - 1]
        if sexptype == SYMSXP:
            name = self.item()  # the symbol's CHARSXP
            self.refs.append(name)
            return name
        if sexptype == LISTSXP:
            # Pairlists are written attributes, tag, CAR, then the CDR as the next item;
            # iterate rather than recurse so long pairlists cannot hit the recursion limit.
            tags: list[str | None] = []
            values: list[object] = []
            attrs: dict[str, object] = {}
            while sexptype == LISTSXP:
                attrs |= self.attributes(flags)
                tag = self.item() if flags & _HAS_TAG else None
                if tag is not None and not isinstance(tag, str):
                    raise ValueError(f"pairlist tag is not a symbol: {tag!r}")
                tags.append(tag)
                values.append(self.item())
                flags = self.read_int()
                sexptype = flags & 0xFF
            if sexptype != NILVALUE_SXP:
                raise ValueError(f"dotted pairlist ending in SEXP type {sexptype} is not supported")
            return _named(values, {"names": tags, **attrs} if any(t is not None for t in tags) else attrs)
        if sexptype == CHARSXP:
            return self.charsxp(levels)
        if sexptype in (LGLSXP, INTSXP):
            raw = self.read_ints(self.length())
            conv = bool if sexptype == LGLSXP else int
            values = [None if v == _NA_INT else conv(v) for v in raw]
        elif sexptype == REALSXP:
            n = self.length()
            floats = struct.unpack_from(f">{n}d", self.buf, self.pos)
            words = struct.unpack_from(f">{n}Q", self.buf, self.pos)
            self.pos += 8 * n
            values = [
                None if math.isnan(x) and w & 0xFFFFFFFF == _NA_REAL_LOW_WORD else x
                for x, w in zip(floats, words, strict=True)
            ]
        elif sexptype == STRSXP:
            values = []
            for _ in range(self.length()):
                char_flags = self.read_int()
                if char_flags & 0xFF != CHARSXP:
                    raise ValueError(f"STRSXP element has SEXP type {char_flags & 0xFF}, expected CHARSXP")
                values.append(self.charsxp(char_flags >> 12))
        elif sexptype == VECSXP:
            values = [self.item() for _ in range(self.length())]
            return _named(values, self.attributes(flags))
        else:
            raise ValueError(f"unsupported R SEXP type {sexptype} (flags 0x{flags:08x}) at byte {self.pos - 4}")
        attrs = self.attributes(flags)
        return RVector(values, attrs) if attrs else values


def _named(values: list[object], attrs: dict[str, object]) -> object:
    """Turn a generic list into a dict when its names make that lossless."""
    names = attrs.get("names")
    # Only unique, non-NA names and no other attributes make a dict lossless.
    if len(attrs) == 1 and isinstance(names, list) and None not in names and len(set(names)) == len(values):
        return dict(zip(names, values, strict=True))
    return RVector(values, attrs) if attrs else values


def unserialize(data: bytes) -> object:
    """Decode one uncompressed R XDR serialization (what ``serialize()`` / ``saveRDS()`` produce)."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def _read_rds(path: Path) -> object:
    raw = path.read_bytes()
    # saveRDS() gzips by default, which is what makeLazyLoadDB() uses for the .rdx index.
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    elif raw[:2] != b"X\n":
        raise ValueError(f"{path}: unsupported RDS compression (starts {raw[:6]!r}); only gzip or none is handled")
    return unserialize(raw)


def read_lazyload_db(rdx_path: Path | str) -> dict[str, object]:
    """Read every variable of an R lazy-load database (``<base>.rdx`` + ``<base>.rdb``)."""
    rdx_path = Path(rdx_path)
    index = _read_rds(rdx_path)
    if not isinstance(index, dict) or "variables" not in index:
        raise ValueError(f"{rdx_path}: not a lazy-load index (expected a list with 'variables')")
    compressed = index.get("compressed")
    # TRUE/1 means zlib; 2 (bzip2) and 3 (xz) add a type byte after the length, which no file we need uses.
    if compressed not in ([True], [1]):
        raise ValueError(
            f"{rdx_path}: lazy-load compression {compressed!r} is not supported; "
            "only zlib (compressed=TRUE) is handled (2 means bzip2, 3 means xz)"
        )
    variables = index["variables"] or {}
    if not isinstance(variables, dict):
        raise ValueError(f"{rdx_path}: 'variables' is not a named list")
    rdb = rdx_path.with_suffix(".rdb").read_bytes()
    result: dict[str, object] = {}
    for name, (offset, length) in variables.items():
        blob = rdb[int(offset) : int(offset) + int(length)]
        expected = struct.unpack(">I", blob[:4])[0]
        data = zlib.decompress(blob[4:])
        if len(data) != expected:
            raise ValueError(f"{rdx_path}: {name!r} decompressed to {len(data)} bytes, header says {expected}")
        result[name] = unserialize(data)
    logger.debug("read %d variables from %s", len(result), rdx_path)
    return result


def _janeaustenr_dir(package_dir: Path) -> Path:
    for candidate in (package_dir, package_dir / "usr/lib/R/site-library/janeaustenr"):
        if (candidate / "data" / "Rdata.rdx").is_file() and (candidate / "data" / "Rdata.rdb").is_file():
            return candidate
    raise FileNotFoundError(
        f"janeaustenr data (data/Rdata.rdx and data/Rdata.rdb) not found under {package_dir}; {_INSTALL_HINT}"
    )


def austen_novels(package_dir: Path | str) -> dict[str, str]:
    """Return R variable name -> full text of each novel (lines joined by newlines, NA lines dropped).

    ``package_dir`` is either the ``dpkg -x`` root or the ``janeaustenr`` folder itself.
    """
    data_dir = _janeaustenr_dir(Path(package_dir)) / "data"
    variables = read_lazyload_db(data_dir / "Rdata.rdx")
    missing = [name for name in AUSTEN_TITLES if name not in variables]
    if missing:
        raise ValueError(f"{data_dir}: novels missing from the lazy-load database: {', '.join(missing)}")
    novels: dict[str, str] = {}
    for name in AUSTEN_TITLES:
        lines = variables[name]
        if not isinstance(lines, list) or not all(line is None or isinstance(line, str) for line in lines):
            raise ValueError(f"{data_dir}: variable {name!r} is not a character vector")
        novels[name] = "\n".join(line for line in lines if line is not None)
    logger.info("loaded %d Austen novels from %s", len(novels), data_dir)
    return novels


def data_dir() -> Path:
    """Where `make data` puts packaged text: $SHORTGPT_DATA_DIR, else inside the active environment.

    Inside the environment (sys.prefix) rather than the repository, so an installed CLI finds it from any folder.
    """
    env = os.environ.get("SHORTGPT_DATA_DIR")
    return Path(env) if env else Path(sys.prefix) / "share" / "shortgpt-deploy"


OFFLINE_CORPORA = tuple(f"austen:{name}" for name in AUSTEN_TITLES)


def offline_corpus(name: str) -> list[str]:
    """Documents of a packaged corpus: `austen:emma` is one novel, `austen:all` all six.

    Calibration and evaluation must not share text, so recipes name one novel each (the default calibrates
    on Emma; held-out perplexity uses Persuasion).
    """
    kind, _, which = name.partition(":")
    if kind != "austen" or (which not in AUSTEN_TITLES and which != "all"):
        known = ", ".join((*OFFLINE_CORPORA, "austen:all"))
        raise ValueError(f"unknown offline corpus {name!r}; known: {known}")
    novels = austen_novels(data_dir() / "janeaustenr")
    return list(novels.values()) if which == "all" else [novels[which]]

"""Census tables as offices publish them: CSV/TSV/XLSX with junk rows, thousands separators, mojibake and ids as text.

:func:`read_table` finds the id and count columns, parses counts ("1 234", "1.234", "1,234"),
repairs UTF-8 read as Latin-1 and keeps each published id verbatim (``"000107"`` stays
``"000107"``); :func:`_norm_id` is only for matching ids between files.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from popcorn.errors import PopcornInputError

log = logging.getLogger("popcorn.prep.census")


_MAX_LIST = 20


_DELIMITERS = (",", ";", "\t", "|")


def _fmt(ids: Sequence[Any]) -> str:
    ids = list(ids)
    shown = ", ".join(str(i) for i in ids[:_MAX_LIST])
    return shown + (f", ... ({len(ids)} in total)" if len(ids) > _MAX_LIST else "")


# ============================================================================ tables
_MOJIBAKE = re.compile("[\u00c3\u00c2][\u0080-\u00bf]|\u00e2\u20ac|\u00c3[\u00a0-\u00bf]|\u00c5[\u0080-\u00bf\u2019\u201c\u201d\u0161\u0178]")


def repair_mojibake(text: str) -> str:
    """Undo UTF-8 text decoded as cp1252/latin-1 (``"BÃ¨ja"`` -> ``"Bèja"``), when it is that.

    Applied at most twice (double encodings); text that does not round-trip is kept as is.
    """
    for _ in range(2):
        if not isinstance(text, str) or not _MOJIBAKE.search(text):
            return text
        for enc in ("cp1252", "latin-1"):
            try:
                fixed = text.encode(enc).decode("utf-8")
            except (UnicodeEncodeError, UnicodeDecodeError):
                continue
            text = fixed
            break
        else:
            return text
    return text


def _decode(raw: bytes, path: Path) -> str:
    if raw.startswith(b"\xff\xfe") or raw.startswith(b"\xfe\xff"):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.warning("%s is not UTF-8; read as cp1252", path)
        return raw.decode("cp1252", errors="replace")


_THOUSANDS = re.compile(r"^[+-]?\d{1,3}([ \u00a0\u202f',.’]\d{3})+$")


def parse_count(value: Any) -> float | None:
    """A published count as a float: ``"662 694"``, ``"1,018,373"``, ``"1.018.373"``,
    ``"410000.5"``; None if it is not a number."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    text = str(value).strip().replace("\u00a0", " ").replace("\u202f", " ")
    if not text:
        return None
    if _THOUSANDS.match(text):
        sep = text[-4]
        if not (sep in ",." and text.count(sep) == 1 and sep == "."):  # "1.018" stays decimal
            text = re.sub(r"[ ',.’]", "", text)
    text = text.replace(" ", "")
    try:
        out = float(text)
    except ValueError:
        return None
    return out if math.isfinite(out) else None


@dataclass
class Table:
    """A cleaned census table: ``frame`` with ``source_id`` (str, verbatim as published), ``key``
    (str, :func:`_norm_id` of it, for matching), ``count`` (float), ``name``."""

    frame: pd.DataFrame
    path: str
    notes: list[str] = field(default_factory=list)


def _split_rows(text: str, delim: str) -> list[list[str]]:
    return [row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delim)]


def _cut_junk(cell: str, delim: str) -> str:
    """Cut a cell at a stray secondary delimiter (``"Gafsa;;;;;;Siliana;227 992"`` -> ``"Gafsa"``)."""
    for other in _DELIMITERS:
        if other != delim and other != "," and other in cell:
            cell = cell.split(other, 1)[0]
    return cell.strip()


def read_table(path: str | os.PathLike[str], id_column: str, count_column: str,
               name_column: str | None = None, sheet: str | int | None = None) -> Table:
    """Read a census table as published (CSV or XLSX) and clean it.

    CSV: BOM, CRLF, any of ``, ; TAB |`` as delimiter (the one whose header holds both
    columns), stray secondary-delimiter junk after the cells, empty and trailing text rows
    (kept out and reported), thousands separators in counts, mojibake in text.
    Raises a PopcornInputError naming the file, column and rows for missing columns,
    non-numeric or negative counts and duplicate ids.
    """
    path = Path(path)
    if not path.exists():
        raise PopcornInputError(f"census table {path} does not exist")
    rows, delim = _raw_rows(path, id_column, count_column, sheet)
    # header = first non-empty row holding both columns
    start = None
    for i, r in enumerate(rows):
        cells = [repair_mojibake(_cut_junk(c, delim)) for c in r]
        if id_column in cells and count_column in cells:
            start, header = i, cells
            break
    if start is None:
        raise PopcornInputError(
            f"{path}: columns {id_column!r} and {count_column!r} not found; set --id-column / "
            "--count-column"
        )
    if name_column is not None and name_column not in header:
        raise PopcornInputError(f"{path}: name column {name_column!r} not found; columns: {header}")
    columns = (header.index(id_column), header.index(count_column),
               header.index(name_column) if name_column else None)
    records, text_rows, repaired = _records(path, rows[start + 1 :], start + 2, delim, columns, count_column)
    notes: list[str] = []
    if text_rows:
        notes.append(f"{path}: ignored {len(text_rows)} row(s) without a count (text/notes) at "
                     f"line(s) {_fmt(text_rows)}")
    if not records:
        raise PopcornInputError(f"{path}: no data row with an id and a count")
    frame = pd.DataFrame(records)
    dup = frame.source_id[frame.key.duplicated(keep=False)].tolist()
    if dup:
        raise PopcornInputError(
            f"{path}: duplicate ids in column {id_column!r}: {_fmt(dup)} (ids are compared as text, "
            "integers without leading zeros); each region must appear once"
        )
    if repaired:
        notes.append(f"{path}: repaired mis-encoded text (UTF-8 read as cp1252) in {repaired} cell(s)")
    for n in notes:
        log.info(n)
    return Table(frame, str(path), notes)


def _raw_rows(path: Path, id_column: str, count_column: str, sheet: str | int | None) -> tuple[list[list[str]], str]:
    """The table's rows as text cells and the delimiter (CSV: the one whose header holds both columns)."""
    if path.suffix.lower() in (".xlsx", ".xlsm", ".xls"):
        try:
            raw = pd.read_excel(path, sheet_name=sheet if sheet is not None else 0, dtype=object,
                                header=None)
        except ImportError as err:
            raise PopcornInputError(f"reading {path} needs openpyxl, popcorn's 'xlsx' extra: pip install 'popcorn[xlsx]'") from err
        except Exception as err:
            raise PopcornInputError(f"cannot read census table {path} ({err})") from err
        return [[_id_text(v) for v in r] for r in raw.itertuples(index=False)], ","
    text = _decode(path.read_bytes(), path)
    for cand in _DELIMITERS:
        cand_rows = _split_rows(text, cand)
        header = next((r for r in cand_rows if any(c.strip() for c in r)), [])
        cleaned = [repair_mojibake(_cut_junk(c, cand)) for c in header]
        if id_column in cleaned and count_column in cleaned:
            return cand_rows, cand
    first = text.splitlines()[0] if text else ""
    raise PopcornInputError(
        f"{path}: no header line with both columns {id_column!r} and {count_column!r} "
        f"(first line: {first[:120]!r}); set --id-column / --count-column to the names used"
    )


def _records(path: Path, rows: list[list[str]], first_line: int, delim: str, columns: tuple[int, int, int | None],
             count_column: str) -> tuple[list[dict[str, Any]], list[int], int]:
    """Data rows -> records (source_id verbatim, matching key, count, name), the line numbers of
    text rows (notes, totals) and the number of repaired cells; bad counts raise, all listed."""
    ic, cc, nc = columns
    records, text_rows, bad = [], [], []
    repaired = 0
    for lineno, r in enumerate(rows, start=first_line):
        cut = [_cut_junk(c, delim) for c in r]
        cells = [repair_mojibake(c) for c in cut]
        repaired += sum(a != b for a, b in zip(cut, cells, strict=True))
        get = lambda k: cells[k] if k is not None and k < len(cells) else ""  # noqa: E731
        rid, raw_count = get(ic), get(cc)
        if not any(cells):
            continue
        if re.fullmatch(r"(?i)(grand )?(total|totaal|summe|gesamt|ensemble|sum)\b.*", rid):
            text_rows.append(lineno)  # totals are not regions
            continue
        if not raw_count and not re.fullmatch(r"[A-Za-z]{0,4}[-_.]?\d+[A-Za-z0-9_.-]*", rid or "x x"):
            text_rows.append(lineno)  # notes, sources, footers
            continue
        if not rid:
            bad.append(f"line {lineno}: count {raw_count!r} without an id")
            continue
        value = parse_count(raw_count)
        if value is None:
            bad.append(f"line {lineno} (id {rid}): {raw_count!r}")
            continue
        if value < 0:
            bad.append(f"line {lineno} (id {rid}): negative {raw_count!r}")
            continue
        records.append({"source_id": rid, "key": _norm_id(rid), "count": value,
                        "name": get(nc) if nc is not None else ""})
    if bad:
        raise PopcornInputError(
            f"{path}: column {count_column!r} must hold non-negative numbers; bad values at "
            + "; ".join(bad[:_MAX_LIST]) + (f" ... ({len(bad)} in total)" if len(bad) > _MAX_LIST else "")
        )
    return records, text_rows, repaired


def _id_text(value: Any) -> str:
    """A cell or field as the text it was published as, for storage: text is kept (surrounding
    blanks removed), so "000107" stays "000107"; a number (an XLSX numeric cell, an integer or
    real vector field) is written as it reads, integral values without ".0" (107.0 -> "107");
    missing -> "". Never through int/float for text."""
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        if math.isfinite(value) and float(value).is_integer():
            return str(int(value))
        return repr(float(value))
    return str(value).strip()


def _norm_id(value: Any) -> str:
    """The matching key of an id (never stored): ``"7"``, ``7``, ``7.0``, ``"007"`` and
    ``"+7"`` are the same id; other text is compared as it is."""
    text = _id_text(value)
    m = re.fullmatch(r"([+-]?)(\d+)(\.0+)?", text)
    if m:
        digits = m.group(2).lstrip("0") or "0"
        return ("-" if m.group(1) == "-" and digits != "0" else "") + digits
    return text

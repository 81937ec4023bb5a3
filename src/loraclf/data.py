"""Examples in, batches out: readers per format, up-front row validation, label maps,
splits, tokenization and length-grouped batching.

Every row is checked before any training step, so a bad row 90,000 rows into a file is
reported in seconds with its row number, not an hour into a run.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import os
import re
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .config import DataConfig
from .errors import DataError, brief

AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
# "1.0" is an integer too: pandas writes an integer column that holds a missing value as floats
_INT_RE = re.compile(r"^\s*[+-]?\d+(\.0*)?\s*$")


@dataclass
class Table:
    """Raw rows of one source before labels are mapped. ``row_ids`` are 1-based data rows."""

    columns: dict[str, list[Any]]
    source: str
    label_names: list[str] | None = None  # names carried by the source (hub ClassLabel)
    one_based: bool = False  # a headerless label,title,description file: classes count from 1
    # JSON / Parquet / hub values carry their type: a string label there is a name even when it
    # looks like a number ("1".."5" star ratings); in CSV/TSV every value is text
    typed: bool = False
    fingerprint: dict[str, Any] = field(default_factory=dict)
    # the line of the file each data row starts on (CSV, TSV, JSON Lines), for messages: with a
    # header, blank lines or quoted line breaks, data row i is not line i
    lines: list[int] | None = None

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def row(self, i: int) -> str:
        """'row i' (1-based data row) for a message, with its line in the file where that differs."""
        return _row(i, self.lines[i - 1] if self.lines is not None and 0 < i <= len(self.lines) else i)


def _row(i: int, line: int) -> str:
    return f"row {i}" if line == i else f"row {i} (line {line})"


@dataclass
class Examples:
    """Validated examples: ``labels`` are int64 class indices, shape [N]; ``named``: the source
    gave the labels as class names, not integers; ``sampled_from``: for a random subset drawn by
    :func:`limit`, the number of rows it was drawn from (None: these are all the rows)."""

    texts: list[str]
    labels: np.ndarray
    source: str
    named: bool = False
    sampled_from: int | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int] | np.ndarray) -> Examples:
        idx = np.asarray(idx, dtype=np.int64)
        return Examples([self.texts[i] for i in idx], self.labels[idx], self.source, self.named)


@dataclass
class Splits:
    train: Examples
    validation: Examples
    test: Examples | None
    label_names: list[str]
    fingerprints: dict[str, Any]
    # whether an integer label in other data is a class index: not when the classes are names
    # sorted from the training labels, whose order no one chose (see to_examples)
    int_labels: bool = True


# ----------------------------------------------------------------------------- readers


def is_hub_name(source: str) -> bool:
    """A source is local when it exists or looks like a file path (including one inside an
    existing local folder: a missing file there is "file not found"); otherwise a hub dataset name."""
    path = Path(source).expanduser()
    if path.exists() or (path.parent != Path(".") and path.parent.is_dir()):
        return False
    suffixes = {".csv", ".tsv", ".gz", ".jsonl", ".json", ".parquet", ".txt"}
    return not (source.startswith((".", "/", "~")) or Path(source).suffix.lower() in suffixes)


def file_fingerprint(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"path": str(path.resolve()), "sha256": h.hexdigest(), "bytes": path.stat().st_size}


def same_data(now: Any, then: Any) -> bool:
    """Fingerprints compared by content: a data file copied or moved elsewhere is the same data."""
    def content(fp: Any) -> Any:
        if isinstance(fp, dict):
            return {k: content(v) for k, v in fp.items() if k != "path"}
        return fp

    return content(json.loads(json.dumps(now))) == content(then)


def _is_gzip(path: Path) -> bool:
    return path.suffix.lower() == ".gz"


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it is ``.gz`` (any case)."""
    with (gzip.open if _is_gzip(path) else open)(path, "rb") as f:
        try:
            return f.read()
        except zlib.error as e:  # damaged deflate data (not a bad header, checksum or end): what callers catch
            raise gzip.BadGzipFile(f"damaged compressed data: {e}") from None


def _read_text(path: Path) -> str:
    """The whole file as text. utf-8-sig drops a BOM, which would otherwise glue itself to the
    first column name; bytes that are not UTF-8 are an error naming their line."""
    raw = _read_bytes(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"line {line} is not valid UTF-8 (byte {e.start:,} of the file"
                        f"{', decompressed' if _is_gzip(path) else ''})", where=str(path),
                        fix="re-save the file as UTF-8") from None


def detect_format(path: Path, fix: str | None = None) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith((".csv", ".txt")):
        # The canonical AG News release (like the other Zhang et al. 2015 text classification
        # sets: DBpedia, Yelp, Amazon, Yahoo) has no header and starts with the class number.
        try:
            with (gzip.open if _is_gzip(path) else open)(path, "rb") as f:
                line = f.readline().decode("utf-8-sig")
        except (UnicodeDecodeError, OSError, gzip.BadGzipFile, EOFError, zlib.error):
            return "csv"  # the real reader reports the problem with its location
        try:  # newline="": a file whose lines end in a bare CR (old Mac style) is one readline()
            first = next(csv.reader(io.StringIO(line, newline="")), [])
        except csv.Error:
            return "csv"
        return "agnews" if len(first) == 3 and _INT_RE.match(first[0] or "") else "csv"
    raise DataError(
        f"cannot tell the format of '{path.name}'",
        where=str(path),
        fix=fix or "use .csv, .tsv, .jsonl or .parquet (optionally .gz), or set --data.format",
    )


def _numbered(reader: Any) -> Iterator[tuple[list[str], int]]:
    """Each row of a csv reader with the line it starts on (a quoted text may span lines)."""
    end = 0
    for row in reader:
        yield row, end + 1
        end = reader.line_num


def _read_delimited(path: Path, fmt: str) -> tuple[dict[str, list[Any]], list[int]]:
    """The columns, and the line each data row starts on."""
    delimiter = "\t" if fmt == "tsv" else ","
    try:
        text = _read_text(path)
    except (gzip.BadGzipFile, PermissionError):
        raise
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read file ({e})", where=str(path), fix="check the file is a complete .gz or plain file") from None
    if "\x00" in text:
        raise DataError("file contains NUL bytes", where=str(path), fix="remove the NUL bytes; the file may be binary")
    # Long texts are checked against data.max_text_chars with a row number, not csv's own limit.
    csv.field_size_limit(2**31 - 1)
    # newline="" as the csv module asks: rows end at \n, \r\n or a bare \r, and a quoted text
    # keeps its line breaks as they are
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[tuple[list[str], int]] = []
    try:
        for numbered in _numbered(reader):
            rows.append(numbered)
    except csv.Error as e:
        # Many TSV files (GLUE's among them) do not quote at all, so a text may start with '"':
        # read such a file as it is when every line then has the same number of fields.
        unquoted = []
        if fmt == "tsv":
            with contextlib.suppress(csv.Error):
                unquoted = [(r, n) for r, n in _numbered(csv.reader(io.StringIO(text, newline=""), delimiter="\t",
                                                                    quoting=csv.QUOTE_NONE)) if r]
        if not unquoted or len({len(r) for r, _ in unquoted}) != 1:
            raise DataError(f"malformed {fmt.upper()} near line {reader.line_num} ({e})", where=str(path),
                            fix="check quoting: every opened quote must close") from None
        rows = unquoted
    while rows and not rows[-1][0]:
        rows.pop()
    # A blank line carries no row of a table of several columns. In a table of one column (texts
    # to predict) it is an empty text, refused with its row number like any other: skipping it
    # would shift every later prediction against its input row.
    one_column = bool(rows) and len(rows[0][0]) == 1 and fmt != "agnews"
    rows = [(r or [""], n) for r, n in rows] if one_column else [(r, n) for r, n in rows if r]
    if fmt == "agnews":
        header = ["label", "title", "description"]
        body_start = 0
    else:
        if not rows:
            raise DataError("file is empty", where=str(path), fix="give a file with a header row and data rows")
        header = [h.strip() for h in rows[0][0]]
        if len(header) == 1 and len(rows) > 1:
            other = next((d for d in ("\t", ";", "|") if d != delimiter and d in rows[0][0][0]), None)
            if other is not None:
                raise DataError(f"only one column found; the file looks delimited by {other!r}", where=str(path),
                                fix="use commas for .csv and tabs for .tsv (or name the file .tsv / set --data.format)")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise DataError(f"duplicate column name(s) {dupes}", where=str(path), fix="give every column a unique name")
        body_start = 1
    body = [r for r, _ in rows[body_start:]]
    lines = [n for _, n in rows[body_start:]]
    if not body:
        raise DataError("file has no data rows", where=str(path), fix="add rows below the header")
    width = len(header)
    for i, r in enumerate(body, start=1):
        if len(r) != width:
            hint = " (is the delimiter right? TSV files need a .tsv name or --data.format tsv)" if width == 1 or len(r) == 1 else ""
            if "\r" in text.replace("\r\n", ""):
                hint = " (a carriage return (\\r) inside an unquoted text ends its row)"
            raise DataError(f"{_row(i, lines[i - 1])} has {len(r)} fields, the header has {width}{hint}", where=str(path),
                            fix="make every row have the same number of fields")
    columns = {h: [r[j] for r in body] for j, h in enumerate(header)}
    if fmt == "agnews":
        columns["text"] = [f"{t} {d}" for t, d in zip(columns["title"], columns["description"])]
    return columns, lines


def _read_jsonl(path: Path) -> tuple[dict[str, list[Any]], list[int] | None]:
    """JSON Lines, or (a ``.json`` file starting with "[") one JSON array of objects: what pandas'
    ``to_json(orient="records")`` writes and the ``datasets`` "json" loader reads. Also the line
    of each record (None for an array)."""
    text = _read_text(path)
    if path.name.lower().removesuffix(".gz").endswith(".json") and text.lstrip().startswith("["):
        return _records_to_columns(_read_json_array(path, text), path), None
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    # only \n ends a record: str.splitlines() also splits at U+2028 and the like, which JSON
    # strings may hold unescaped
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"line {line_no} is not valid JSON ({e.msg})", where=str(path),
                            fix="write one JSON object per line") from None
        except RecursionError:  # Python's parser recurses per nesting level: "[[[[..." ended in a traceback
            raise DataError(f"line {line_no} is nested too deeply to read", where=str(path),
                            fix="write one flat JSON object per line") from None
        if not isinstance(obj, dict):
            raise DataError(f"line {line_no} is a JSON {type(obj).__name__}, not an object", where=str(path),
                            fix="write one JSON object per line, e.g. {\"text\": ..., \"label\": ...}")
        records.append(obj)
        lines.append(line_no)
    return _records_to_columns(records, path), lines


def _read_json_array(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON at line {e.lineno} ({e.msg})", where=str(path),
                        fix="give a JSON array of objects, or JSON Lines (one object per line)") from None
    except RecursionError:
        raise DataError("JSON nested too deeply to read", where=str(path),
                        fix="give a JSON array of flat objects, or JSON Lines (one object per line)") from None
    for i, obj in enumerate(records, start=1):
        if not isinstance(obj, dict):
            raise DataError(f"element {i} of the array is a JSON {type(obj).__name__}, not an object", where=str(path),
                            fix="give an array of objects, e.g. [{\"text\": ..., \"label\": ...}]")
    return records


def _records_to_columns(records: list[dict[str, Any]], path: Path) -> dict[str, list[Any]]:
    if not records:
        raise DataError("file has no records", where=str(path), fix="write one JSON object per line")
    keys: list[str] = []
    for r in records:
        keys.extend(k for k in r if k not in keys)
    return {k: [r.get(k) for r in records] for k in keys}


def _read_parquet(path: Path) -> dict[str, list[Any]]:
    import pyarrow.parquet as pq

    source = io.BytesIO(_read_bytes(path)) if _is_gzip(path) else path
    try:
        table = pq.read_table(source)
    except (gzip.BadGzipFile, EOFError, PermissionError):
        raise  # the caller's messages
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        dupes: list[str] = []
        with contextlib.suppress(Exception):  # pyarrow's "Multiple matches for FieldRef" says it obscurely
            names = pq.read_schema(source).names
            dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"duplicate column name(s) {dupes}", where=str(path),
                            fix="give every column a unique name") from None
        raise DataError(f"cannot read Parquet ({brief(e)})", where=str(path),
                        fix="check the file is a complete Parquet file") from None
    if table.num_rows == 0:
        raise DataError("file has no rows", where=str(path), fix="give a Parquet file with data")
    return {name: table.column(name).to_pylist() for name in table.column_names}


def _read_hub(source: str, role: str, cfg: DataConfig) -> Table:
    import datasets

    name, _, split = source.partition(":")
    split = split or ("train" if role == "train" else role)
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets wraps network, auth and not-found problems in many types
        reason = brief(e, 200)
        raise DataError(
            f"cannot load dataset '{name}' split '{split}' from the Hugging Face Hub ({reason})",
            where=f"data.{role}",
            fix="check the name and your connection, or pass a local file (e.g. --data.{role} path/to/file.csv)".format(role=role),
        ) from None
    names = None
    feat = ds.features.get(cfg.label_column)
    if feat is not None and hasattr(feat, "names"):
        names = list(feat.names)
    columns = {c: ds[c] for c in ds.column_names}
    fp = {"dataset": name, "split": split, "fingerprint": getattr(ds, "_fingerprint", None),
          "version": str(ds.info.version) if ds.info.version else None}
    return Table(columns, source=f"{name}:{split}", label_names=names, fingerprint=fp, typed=True)


def _gzip_error(path: Path, e: Exception) -> DataError:
    return DataError(f"not a valid gzip file ({e})", where=str(path), fix="re-compress the file or remove .gz")


def is_lines_file(path: Path) -> bool:
    """A plain list of texts, one per line: ``.txt``, ``.txt.gz`` or no suffix (tables have theirs)."""
    name = path.name.lower()
    return path.suffix.lower() in {".txt", ""} or name.endswith(".txt.gz")


def read_lines(path: Path, flag: str) -> list[str]:
    """The texts of a one-text-per-line file (``.gz`` decompressed, a BOM dropped); ``flag``: the
    option that named it, for error messages."""
    if path.is_dir():
        raise DataError("is a directory, not a file of texts", where=str(path), fix=f"give a file to {flag}")
    if not path.exists():  # a named pipe or <(process substitution) is no regular file, and fine
        raise DataError("file not found", where=str(path), fix=f"check the path given to {flag}")
    try:
        return decode_lines(_read_bytes(path), str(path))
    except PermissionError:
        raise DataError("permission denied", where=str(path), fix="make the file readable") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise _gzip_error(path, e) from None


def decode_lines(raw: bytes, where: str) -> list[str]:
    """:func:`split_lines` of UTF-8 bytes (a BOM dropped); bytes that are not UTF-8 are an error
    naming their line, whatever the locale would have made of them."""
    try:
        return split_lines(raw.decode("utf-8-sig"), where)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"line {line} is not valid UTF-8", where=where, fix="give the texts as UTF-8") from None


def split_lines(text: str, where: str) -> list[str]:
    """One text per line (\\n or \\r\\n). Empty lines at the end are ignored; an empty line before a
    text is an error, not skipped: skipping it would shift every later output row against its
    input line. Only these end a line: str.splitlines() also splits at form feeds, U+2028 and
    other characters that occur inside scraped texts, which would give more outputs than lines."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataError(f"line {i} is empty", where=where, fix="give one non-empty text per line")
    return lines


def read_table(source: str, role: str, cfg: DataConfig, flag: str | None = None, format_fix: str | None = None) -> Table:
    """Read one source (local file or hub dataset) into raw columns; ``flag``: the option that
    named it, for error messages (default ``--data.<role>``); ``format_fix``: what to do about a
    file whose format cannot be told (default: use a known extension or set --data.format)."""
    if is_hub_name(source):
        return _read_hub(source, role, cfg)
    flag = flag or f"--data.{role}"
    if not source.strip():  # Path("") is the working directory
        raise DataError("no file named (the value is empty)", where=flag, fix=f"give {flag} a file")
    path = Path(source).expanduser()
    if not path.exists():
        # a relative path in a YAML config is read from where loraclf runs, not from the YAML's folder
        relative = "" if path.is_absolute() else f" (a relative path is read from the working directory, {Path.cwd()})"
        raise DataError("file not found", where=str(path), fix=f"check the path given to {flag}{relative}")
    if path.is_dir():
        raise DataError("is a directory, not a data file", where=str(path), fix=f"give a file to {flag}")
    if not path.is_file():
        # a table is read more than once (its format, its rows, its fingerprint): a named pipe hung
        # at the second open, and <(process substitution) was fingerprinted as empty
        raise DataError("is not a regular file (a named pipe or a device)", where=str(path),
                        fix=f"save the data to a file and give that to {flag}")
    fmt = cfg.format if cfg.format != "auto" else detect_format(path, format_fix)
    try:
        if fmt in ("csv", "tsv", "agnews"):
            cols, lines = _read_delimited(path, fmt)
        elif fmt == "jsonl":
            cols, lines = _read_jsonl(path)
        else:
            cols, lines = _read_parquet(path), None
    except PermissionError:
        raise DataError("permission denied", where=str(path), fix="make the file readable") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise _gzip_error(path, e) from None
    return Table(cols, source=str(path), one_based=fmt == "agnews", fingerprint=file_fingerprint(path),
                 typed=fmt in ("jsonl", "parquet"), lines=lines)


# ----------------------------------------------------------------------------- validation


def unicode_problem(text: str) -> str | None:
    """Why ``text`` cannot be tokenized, or None. A lone surrogate ("\\ud800": valid JSON, and what
    Python makes of undecodable bytes on stdin or argv) makes the tokenizer raise a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode (an unpaired surrogate or undecodable byte at character {e.start + 1})"
    return None


def _texts(table: Table, cfg: DataConfig) -> list[str]:
    missing = [c for c in cfg.text_columns if c not in table.columns]
    if missing:
        fix = "set --data.text_columns to existing columns"
        if len(table.columns) == 1 and table.source.lower().removesuffix(".gz").endswith(".txt"):
            # a text per line, read as a table whose first text is its header: naming columns cannot help
            fix = ("a .txt file is read as a CSV table here, its first line naming the columns; texts without "
                   "labels are for loraclf predict --input: give training and evaluation a table with text and "
                   "label columns (CSV, TSV, JSONL or Parquet)")
        raise DataError(f"no column(s) {missing} (columns: {list(table.columns)})", where=table.source, fix=fix)
    texts = table_texts(table, cfg.text_columns)
    for i, text in enumerate(texts, start=1):
        if len(text) > cfg.max_text_chars:
            raise DataError(f"{table.row(i)}: text is {len(text):,} characters, over the limit of {cfg.max_text_chars:,}",
                            where=table.source, fix="shorten or drop the row, or raise --data.max_text_chars")
    return texts


def table_texts(table: Table, columns: list[str]) -> list[str]:
    """Each row's text: its ``columns`` joined by a space. A value that is not a string (null,
    a number) or a row with no text is an error naming the row, never the text "None"."""
    texts = []
    for i, parts in enumerate(zip(*(table.columns[c] for c in columns)), start=1):
        for c, v in zip(columns, parts):
            if not isinstance(v, str):
                raise DataError(f"{table.row(i)}: column '{c}' holds {type(v).__name__} {v!r}, not text", where=table.source,
                                fix="make every text a string")
        text = " ".join(parts).strip()
        if not text:
            raise DataError(f"{table.row(i)}: empty text in column(s) {columns}", where=table.source,
                            fix="remove the row or fill in its text")
        problem = unicode_problem(text)
        if problem:
            raise DataError(f"{table.row(i)}: text {problem}", where=table.source, fix="fix or remove the row")
        texts.append(text)
    return texts


def _index_names(names: Sequence[str]) -> bool:
    """Names "0".."K-1" in order: an integer label and the name it writes are the same class."""
    return list(names) == [str(i) for i in range(len(names))]


def _raw_labels(table: Table, cfg: DataConfig, names: list[str] | None = None) -> list[int | str]:
    """Each row's label: an int (a class index, shifted to 0-based for 1-based files) or a name.
    ``names``: the classes already known. Where they are all numbers but not the indices
    "0".."K-1" (star ratings "1".."5"), a number label is read as the name it writes, in every
    file alike: as an index, "1" would be the class named "2"."""
    if cfg.label_column not in table.columns:
        raise DataError(f"no label column '{cfg.label_column}' (columns: {list(table.columns)})", where=table.source,
                        fix="set --data.label_column to an existing column")
    out: list[int | str] = []
    kinds = set()
    by_name = bool(names) and all(_INT_RE.match(n) for n in names) and not _index_names(names)
    for i, v in enumerate(table.columns[cfg.label_column], start=1):
        if isinstance(v, bool) or v is None or (isinstance(v, float) and not v.is_integer()):
            raise DataError(f"{table.row(i)}: label {v!r} is not a class", where=table.source,
                            fix="use integer class ids or class names")
        if isinstance(v, (int, float)):
            out.append(str(int(v)) if by_name else int(v))
            kinds.add("str" if by_name else "int")
        elif isinstance(v, str):
            s = v.strip()
            if not s:
                raise DataError(f"{table.row(i)}: empty label", where=table.source, fix="fill in every label")
            if _INT_RE.match(s) and by_name:
                out.append(str(int(s.partition(".")[0])))  # "01" and "1.0" name class "1"
                kinds.add("str")
            elif _INT_RE.match(s) and not table.typed:
                out.append(int(s.partition(".")[0]))
                kinds.add("int")
            else:
                out.append(s)
                kinds.add("str")
        else:
            raise DataError(f"{table.row(i)}: label {v!r} is a {type(v).__name__}", where=table.source,
                            fix="use integer class ids or class names")
    if len(kinds) > 1:
        first_str = next(i for i, v in enumerate(out, 1) if isinstance(v, str))
        raise DataError(f"mixed label types: integers and names (first name at {table.row(first_str)})", where=table.source,
                        fix="use either integer class ids or class names throughout")
    if table.one_based and kinds == {"int"}:
        zero = next((i for i, v in enumerate(out, 1) if v == 0), None)  # type: ignore[operator]
        if zero is not None:
            raise DataError(f"{table.row(zero)}: class 0 in a headerless label,title,description file, whose classes count "
                            "from 1 (the AG News release)", where=table.source,
                            fix="add the header row label,title,description to read the labels as they are, "
                                "and set --data.text_columns [title,description]")
        out = [v - 1 for v in out]  # type: ignore[operator]
    return out


def _first_gaps(present: set[int], k: int, n: int = 5) -> list[int]:
    """The first ``n`` of 0..k-1 not in ``present``, without building range(k) (k may be huge);
    negative labels are not classes and are left to the range check."""
    gaps: list[int] = []
    expect = 0
    for v in sorted(present):
        while expect < v and len(gaps) < n:
            gaps.append(expect)
            expect += 1
        if len(gaps) >= n:
            break
        expect = max(expect, v + 1)
    while expect < k and len(gaps) < n:
        gaps.append(expect)
        expect += 1
    return gaps


def label_vocabulary(raw: list[int | str], table: Table, cfg: DataConfig) -> list[str]:
    """Class names in index order, decided from the training labels.

    Integer labels are always class indices 0..K-1; names come from the config, the source
    (a hub ClassLabel) or, failing both, are the labels written as text (a headerless
    label,title,description file: its 1-based numbers, or AG News's names when the highest is 4).
    String labels are names; without configured names they are sorted.
    """
    names = cfg.label_names or table.label_names
    if names is not None:
        return list(names)
    if raw and isinstance(raw[0], int):
        present: set[int] = set(raw)  # type: ignore[arg-type]
        k = max(present) + 1
        if table.one_based and k == len(AG_NEWS_LABELS):
            # the layout of the AG News release (no other of its family has 4 classes): its classes
            # are known, so a small sample that lacks one is still AG News
            return list(AG_NEWS_LABELS)
        missing = _first_gaps(present, k)
        if missing:
            first = 1 if table.one_based else 0
            raise DataError(
                f"integer labels must be class indices {first}..{k - 1 + first}, but no training row has class "
                f"{[m + first for m in missing]}"
                f"{' (and more)' if k - sum(v >= 0 for v in present) > len(missing) else ''}",
                where=table.source,
                fix="relabel the classes from 1 (or add a header row label,title,description to count them from 0), "
                    "or set --data.label_names (index order)" if table.one_based else
                    "relabel the classes from 0, or set --data.label_names (index order)",
            )
        return [str(i + 1) if table.one_based else str(i) for i in range(k)]
    return sorted(set(raw))  # type: ignore[arg-type]


def encode_labels(raw: list[int | str], names: list[str], table: Table, fix: str) -> np.ndarray:
    """Map raw labels to indices into ``names``: integers are indices, strings are names."""
    index = {n: i for i, n in enumerate(names)}
    out = np.empty(len(raw), dtype=np.int64)
    first = 1 if table.one_based else 0  # say what the file says, not the shifted index
    for i, v in enumerate(raw):
        if isinstance(v, int):
            if not 0 <= v < len(names):
                raise DataError(f"{table.row(i + 1)}: label {v + first} out of range for {len(names)} classes "
                                f"({first}..{len(names) - 1 + first})", where=table.source, fix=fix)
            out[i] = v
        elif v in index:
            out[i] = index[v]
        else:
            raise DataError(f"{table.row(i + 1)}: label {v!r} is not one of the classes {names}", where=table.source, fix=fix)
    return out


def to_examples(table: Table, cfg: DataConfig, names: list[str] | None = None,
                int_labels: bool = True) -> tuple[Examples, list[str]]:
    """Validate every row; returns the examples and the class names (decided here when None).
    ``int_labels`` False: integer labels are refused (the classes ``names`` have no index order)."""
    texts = _texts(table, cfg)
    known = names or cfg.label_names
    raw = _raw_labels(table, cfg, known)
    if table.label_names and known and set(known) == set(table.label_names) and raw and isinstance(raw[0], int):
        # a source that names its classes (a hub ClassLabel) with the run's names is read by name,
        # so their order in the run maps each row right; other names (label_names renaming the
        # classes) name the indices, as documented; an int it does not name meets the range check
        raw = [table.label_names[v] if 0 <= v < len(table.label_names) else v for v in raw]  # type: ignore[index]
    named = bool(raw) and isinstance(raw[0], str)
    if names is None:
        names = label_vocabulary(raw, table, cfg)
        fix = "set --data.label_names to all classes, in index order"
    else:
        fix = "remove rows whose class the model was not trained on"
        if not int_labels and raw and not named and not _index_names(names):
            first = 1 if table.one_based else 0  # as the file writes it, not the shifted index
            raise DataError(f"{table.row(1)}: label {raw[0] + first} is an integer, but the classes were learnt as names {names}, "
                            "which have no index order", where=table.source,
                            fix="write class names in the label column (or train with --data.label_names, "
                                "which gives the names their indices)")
    return Examples(texts, encode_labels(raw, names, table, fix), table.source, named), names


# ----------------------------------------------------------------------------- splits


def _carve_size(n: int, size: float) -> int:
    k = int(round(n * size)) if size < 1 else int(size)
    if k < 1:
        raise DataError(f"validation_size {size} of {n} rows gives no validation row", where="data.validation_size",
                        fix=f"use a fraction of at least {1 / n:.2g} or a row count such as {max(1, n // 20)}")
    if k >= n:
        raise DataError(f"validation_size {size} leaves {n - k} of {n} rows for training", where="data.validation_size",
                        fix="use a fraction below 1 or a row count below the number of training rows")
    return k


def load_splits(cfg: DataConfig, label_names: list[str] | None = None, need_test: bool = True) -> Splits:
    """Read and validate every split. Validation is carved from train (seeded) when not given;
    sample limits take a seeded random subset so that small runs see every class."""
    rng = np.random.default_rng(cfg.split_seed)
    train_table = read_table(cfg.train, "train", cfg)
    train, names = to_examples(train_table, cfg, label_names)
    int_labels = cfg.label_names is not None or train_table.label_names is not None or not train.named
    if label_names is None and len(np.unique(train.labels)) < 2:
        raise DataError(f"the training rows hold only one class ({names[int(train.labels[0])]!r}): a classifier needs "
                        "at least two", where=train_table.source,
                        fix=f"check --data.label_column (now '{cfg.label_column}') and that the file holds every class")
    fingerprints: dict[str, Any] = {"train": train_table.fingerprint}

    perm = rng.permutation(len(train))
    if cfg.validation is None:
        k = _carve_size(len(train), cfg.validation_size)
        validation = train.subset(perm[:k])
        train = train.subset(perm[k:])
        fingerprints["validation"] = {"carved_from": "train", "size": k, "seed": cfg.split_seed}
    else:
        val_table = read_table(cfg.validation, "validation", cfg)
        validation, _ = to_examples(val_table, cfg, names, int_labels)
        fingerprints["validation"] = val_table.fingerprint
        train = train.subset(perm)
    if cfg.max_train_samples is not None:
        train = train.subset(np.arange(min(cfg.max_train_samples, len(train))))
    if label_names is None and len(np.unique(train.labels)) < 2:  # what the limit (or carving) left
        cut = "--data.max_train_samples" if cfg.max_train_samples is not None else "the validation split"
        raise DataError(f"the {len(train)} training row(s) left after {cut} hold only one class "
                        f"({names[int(train.labels[0])]!r}): a classifier needs at least two", where=train_table.source,
                        fix="raise --data.max_train_samples" if cfg.max_train_samples is not None
                        else "lower --data.validation_size, or give more rows")
    validation = limit(validation, cfg.max_eval_samples, cfg.split_seed)

    test = None
    if cfg.test is not None and need_test:
        test = load_eval_split(cfg, cfg.test, names, int_labels=int_labels)
        fingerprints["test"] = test.fingerprint  # type: ignore[attr-defined]
    return Splits(train, validation, test, names, fingerprints, int_labels)


def limit(examples: Examples, n: int | None, seed: int) -> Examples:
    """A seeded random subset of ``n`` rows (all rows, in order, when n is None or larger)."""
    if n is None or n >= len(examples):
        return examples
    idx = np.sort(np.random.default_rng(seed).permutation(len(examples))[:n])
    sample = examples.subset(idx)
    sample.sampled_from = len(examples)
    return sample


def load_eval_split(cfg: DataConfig, source: str, names: list[str], role: str = "test",
                    flag: str | None = None, int_labels: bool = True) -> Examples:
    """Read an evaluation source and encode its labels with the trained class names; ``flag``:
    where the source was named, for error messages (default ``--data.<role>``); ``int_labels``:
    see :class:`Splits` (a run records it in run.json)."""
    table = read_table(source, role, cfg, flag=flag)
    examples, _ = to_examples(table, cfg, names, int_labels)
    examples = limit(examples, cfg.max_eval_samples, cfg.split_seed)
    examples.fingerprint = table.fingerprint  # type: ignore[attr-defined]
    return examples


# ----------------------------------------------------------------------------- batches


def tokenize(texts: Sequence[str], tokenizer: Any, max_length: int) -> list[list[int]]:
    """Token ids per text, truncated, unpadded: padding happens per batch."""
    max_length = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]


def cache_root() -> Path:
    """Where loraclf keeps caches: $LORACLF_CACHE, else $XDG_CACHE_HOME/loraclf, else ~/.cache/loraclf."""
    env = os.environ.get("LORACLF_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraclf"


def _token_cache_key(texts: Sequence[str], tokenizer: Any, max_length: int) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # The serialised fast tokenizer covers vocabulary, merges, normaliser and post-processor;
    # special tokens and truncation length are added because they change the ids too.
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Truncation/padding state is left behind by the previous call, not part of the tokenizer.
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((type(tokenizer).__name__, tokenizer.all_special_tokens, max_length,
                   getattr(tokenizer, "model_max_length", None),
                   getattr(tokenizer, "truncation_side", None),
                   getattr(tokenizer, "split_special_tokens", None))).encode())
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))  # length-prefixed: no text boundary is ambiguous
        h.update(b)
    return h.hexdigest()[:32]


def _sweep_stale_temporaries(folder: Path, older_than_s: float = 24 * 3600) -> None:
    """Remove the temporaries of cache writers killed mid-write (kill -9, an OOM kill): never
    renamed into place, never read, each the size of a dataset's tokens. Only old ones: a younger
    one may be another process's write in progress."""
    cutoff = time.time() - older_than_s
    for tmp in folder.glob(".*.npz"):
        with contextlib.suppress(OSError):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()


def tokenize_cached(texts: Sequence[str], tokenizer: Any, max_length: int,
                    cache_dir: Path | None) -> list[list[int]]:
    """``tokenize`` through an on-disk cache keyed by tokenizer, max_length and the texts
    themselves, so a rerun, a resume or another recipe on the same data skips tokenization.
    ``cache_dir`` None: no cache. A damaged or unwritable cache is never an error."""
    if cache_dir is None:
        return tokenize(texts, tokenizer, max_length)
    path = cache_dir / "tokens" / f"{_token_cache_key(texts, tokenizer, max_length)}.npz"
    try:
        with np.load(path) as z:
            flat, offsets = z["ids"], z["offsets"]
        if len(offsets) == len(texts) + 1 and offsets[0] == 0 and offsets[-1] == len(flat):
            return [flat[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # missing or damaged (a truncated file is a BadZipFile): tokenize again
    ids = tokenize(texts, tokenizer, max_length)
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale_temporaries(path.parent)
        np.savez(tmp, ids=flat, offsets=offsets)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    except OSError:
        with contextlib.suppress(OSError):  # (a cache "folder" that is a file fails here too)
            tmp.unlink(missing_ok=True)  # a full disk must not leave half a file behind
    return ids


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, input_ids: list[list[int]], labels: np.ndarray | None = None):
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.input_ids[i], (int(self.labels[i]) if self.labels is not None else -1)


class IndexedDataset(TokenizedDataset):
    """Items carry their row index, for collators that look rows up elsewhere (the prefix cache)."""

    def __getitem__(self, i: int) -> tuple[list[int], int, int]:  # type: ignore[override]
        return (*super().__getitem__(i), i)


class PadCollator:
    """Pads a batch to its own longest row, rounded up to ``multiple`` tokens when given (fewer
    distinct shapes: CUDA graphs record one per shape). Output: input_ids/attention_mask [B, T],
    labels [B], and ``n_tokens``, the real tokens as a Python int (counted here, on the host, so the
    training loop never waits for the device to count them)."""

    def __init__(self, pad_id: int, multiple: int | None = None, max_width: int | None = None):
        self.pad_id = pad_id
        self.multiple = multiple
        self.max_width = max_width  # rounding never passes max_length (position embeddings end there)

    def width(self, longest: int) -> int:
        """The padded length [tokens] of a batch whose longest row has ``longest`` tokens: what a
        token budget must count (the batchers take this as ``width``)."""
        if not self.multiple:
            return longest
        rounded = _round_up(longest, self.multiple)
        return max(longest, min(rounded, self.max_width or rounded))

    def __call__(self, items: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
        """``items``: (token ids, label, ...) tuples; fields after the label are left to subclasses."""
        # Filled in NumPy, the mask in one comparison: a torch tensor and two indexed writes per
        # row cost ~13 us a row, ~5x this, which on a GPU is host time in every batch
        # (BENCHMARKS.md, "Host cost of a prediction").
        lengths = np.fromiter((len(it[0]) for it in items), dtype=np.int64, count=len(items))
        width = self.width(int(lengths.max()))
        input_ids = np.full((len(items), width), self.pad_id, dtype=np.int64)
        for row, it in enumerate(items):
            input_ids[row, : lengths[row]] = it[0]
        attention_mask = (np.arange(width) < lengths[:, None]).astype(np.int64)
        labels = torch.tensor([it[1] for it in items], dtype=torch.long)
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
                "labels": labels, "n_tokens": int(lengths.sum())}


class LengthGroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches of rows of similar length, so little of each batch is padding.

    As in transformers' group_by_length: a seeded permutation is cut into mega-batches of
    ``mega`` batches, each sorted by length and cut into batches; batch order is then shuffled.
    Call ``begin_epoch`` before each epoch for a new, reproducible order. ``width``: the padded
    length of a batch from its longest row (:meth:`PadCollator.width`; default: that row's).

    ``accumulate``: micro-batches per optimizer step. Rows are grouped per step: ``batch_size`` x
    ``accumulate`` rows, or with ``max_tokens`` (a micro-batch's budget) as many rows of similar
    length as ``accumulate`` micro-batches within the budget hold. A step's group is yielded whole
    (``split=False``: fused accumulation) or as ``accumulate`` consecutive micro-batches of equal
    rows (``split=True``), so that fused and unfused accumulation train every step on the same
    rows. A group too small to split (fewer rows than ``accumulate``: the end of the data) comes
    last in the epoch, where the training loop expects its one short step.

    ``processes``: for a run in several processes, which accelerate deals the batches out to in
    turn, each epoch's step groups are made a multiple of them by repeating its first groups (and
    a short last group up to ``accumulate`` rows by repeating its first rows), and the parts of
    each round of groups are interleaved so that every process trains one whole group per step,
    the group a fused run gives it. accelerate would even the batches out otherwise
    (``even_batches``) by size, taking a short or token-budget batch for the end of the data;
    here every process gets as many batches, every row is seen, and the list does not depend on
    where a resumed epoch starts.
    """

    # Not the rows per batch (``rows``): accelerate reads a batch sampler's ``batch_size`` as the
    # size of every batch it yields, which a short last batch or a token budget contradicts.
    batch_size = None

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = True,
                 mega: int = 50, max_tokens: int | None = None, width: Callable[[int], int] | None = None,
                 processes: int = 1, accumulate: int = 1, split: bool = True):
        self.lengths = np.asarray(lengths)
        self.rows = batch_size
        self.processes = processes
        self.accumulate = accumulate
        self.split = split and accumulate > 1
        self.max_tokens = max_tokens
        self.width = width or (lambda n: n)
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega = mega
        self.epoch = 0
        self.skip = 0
        self._memo: tuple[int | None, list[np.ndarray]] = (None, [])  # one epoch's batches, made once

    def begin_epoch(self, epoch: int, skip: int = 0) -> None:
        """Order for ``epoch``; ``skip`` leaves out its first batches (resuming mid-epoch).

        Not named set_epoch on purpose: accelerate calls set_epoch with its own counter, which
        restarts at 0 in a resumed process and would change the order."""
        self.epoch = epoch
        self.skip = skip

    def __len__(self) -> int:
        """Batches in a full epoch (``skip`` aside): the schedule is planned on full epochs."""
        return len(self._batches(self.epoch))

    def batches_in_epoch(self, epoch: int) -> int:
        """With a token budget the count varies by epoch; the schedule sums them up front."""
        return len(self._batches(epoch))

    def _cut(self, rows: np.ndarray) -> list[np.ndarray]:
        """Consecutive step groups of ``rows``: ``batch_size`` x ``accumulate`` rows each, or with
        ``max_tokens`` as many as split into ``accumulate`` micro-batches within the budget: at
        most ``accumulate`` x (budget // padded width of the longest row). Every group holds a
        multiple of ``accumulate`` rows, so its micro-batches are equal and their mean loss is the
        group's, except a last group of the remaining rows, fewer than ``accumulate``."""
        k = self.accumulate
        if not self.max_tokens:
            step = self.rows * k
            out = [rows[i : i + step] for i in range(0, len(rows), step)]
        else:
            out, start, lengths = [], 0, self.lengths[rows]
            while start < len(rows):
                end, longest = start, 0
                while end < len(rows):
                    longest = max(longest, int(lengths[end]))
                    if end > start and end + 1 - start > k * (self.max_tokens // self.width(longest)):
                        break
                    end += 1
                if end < len(rows) and end - start >= k:  # cut by the budget: whole micro-batches
                    end = start + (end - start) // k * k
                out.append(rows[start:end])
                start = end
        whole = len(out[-1]) // k * k
        if 0 < whole < len(out[-1]):
            out[-1:] = [out[-1][:whole], out[-1][whole:]]
        return out

    def _batches(self, epoch: int) -> list[np.ndarray]:
        if self._memo[0] == epoch:
            return self._memo[1]
        k, n = self.accumulate, self.processes
        rng = np.random.default_rng((self.seed, epoch))
        perm = rng.permutation(len(self.lengths))
        if not self.group_by_length:
            groups = self._cut(perm)
        else:
            size = self.rows * k * self.mega
            grouped, short = [], perm[:0]
            for start in range(0, len(perm), size):
                chunk = np.concatenate([short, perm[start : start + size]])
                cut = self._cut(chunk[np.argsort(-self.lengths[chunk], kind="stable")])
                # a group too small to split goes on with the next chunk's rows, or last
                short = cut.pop() if len(cut[-1]) < k else perm[:0]
                grouped.extend(cut)
            order = rng.permutation(len(grouped))
            groups = [grouped[i] for i in order] + ([short] if len(short) else [])
        if n > 1:
            # Several processes: every process's step must be one whole group (as when fused),
            # so the short last group is made up to `accumulate` rows with the epoch's first
            # rows, and the groups to a multiple of the processes by repeating the first groups
            # (cycled: fewer groups than processes repeat more than once).
            if len(groups[-1]) < k:
                groups[-1] = np.concatenate([groups[-1], np.resize(perm, k - len(groups[-1]))])
            groups += [groups[i % len(groups)] for i in range(_round_up(len(groups), n) - len(groups))]
        batches = groups
        if self.split:
            # accelerate deals batches out to the processes in turn: the parts of each round of
            # n groups are interleaved so that process q gets every part of the round's group q
            batches = []
            for r in range(0, len(groups), n):
                parts = [np.array_split(g, min(k, len(g))) for g in groups[r : r + n]]
                batches += [p[j] for j in range(max(map(len, parts))) for p in parts if j < len(p)]
        self._memo = (epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for b in self._batches(self.epoch)[self.skip :]:
            yield b.tolist()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None,
                   width: Callable[[int], int] | None = None) -> list[list[int]]:
    """Inference batches: rows sorted by length (longest first), so padding is minimal; at
    most ``batch_size`` rows and, with ``max_tokens``, at most that many padded tokens (rows x
    ``width`` of the longest row: :meth:`PadCollator.width`; default that row's length)."""
    width = width or (lambda n: n)
    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"batch_size and max_tokens must be >= 1, got {batch_size} and {max_tokens}")
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    out, start = [], 0
    while start < len(order):
        rows = batch_size if not max_tokens else max(1, min(batch_size, max_tokens // max(1, width(int(lengths[order[start]])))))
        out.append(order[start : start + rows].tolist())
        start += rows
    return out

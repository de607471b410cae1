"""Label files: a CSV or TSV with a header row naming the columns `path` and `label`, and optionally
`split` (train, val or test), one image per row, paths relative to the file.

`find_label_file` decides whether DATA is one; `read_label_file` reads it. A problem with the file
itself (no header, a missing column, an unknown split value) is a `DatasetError`; a problem with
one row (no path, no label, the same image listed again) skips the row with a warning naming the
file and its row number, as the scan skips a bad image in a folder.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from collections.abc import Callable

from search.data._index import DatasetError

# File name endings read as label files (compared in lower case).
LABEL_FILE_EXTENSIONS = (".csv", ".tsv")
# The split column's accepted values (compared stripped, in lower case) -> the split they name.
SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# Columns a label file must name in its header row, and the optional one.
REQUIRED_COLUMNS = ("path", "label")
SPLIT_COLUMN = "split"
# Delimiters tried in a .csv file's header, in order (a .tsv is tab-separated).
_CSV_DELIMITERS = (",", ";", "\t")
# Image name endings that tell a data row from a header row.
_IMAGE_HINTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


@dataclass(frozen=True)
class LabelRow:
    """One usable-looking row of a label file (its image not yet checked)."""

    row: int  # the row's number in the file, the header being row 1 (what a spreadsheet shows)
    path: str  # the image, absolute
    label: str  # the class name, stripped
    split: str | None  # "train" | "val" | "test"; None when the file has no split column


@dataclass(frozen=True)
class LabelFile:
    """What `read_label_file` found in a label file."""

    path: str  # the label file, absolute
    rows: tuple[LabelRow, ...]  # rows kept, in file order
    classes: tuple[str, ...]  # every label a row names (sorted), also those of rows skipped later
    has_split: bool  # the header names a split column
    n_rows: int  # data rows read, skipped ones included


# Called for a row left out: (row number, the image path or "", reason).
SkipRowFn = Callable[[int, str, str], None]


def is_label_file(path: str) -> bool:
    """True for a .csv or .tsv file name (any case)."""
    return os.path.splitext(path)[1].lower() in LABEL_FILE_EXTENSIONS


def find_label_file(root: str, subdirs: list[str]) -> str | None:
    """The label file a dataset folder without train/ stands for, or None (an ImageFolder).

    The rule: a folder without train/ whose top level holds label files (.csv/.tsv) is read from
    the one whose header names `path` and `label`. With none such, the folder is an ImageFolder
    when it has sub-folders (a stray CSV beside class folders is metadata, not labels), and the
    single label file is read, and its header reported, when it has none.

    Args:
        root: the dataset folder, absolute.
        subdirs: its visible sub-folders.

    Returns:
        The label file's absolute path, or None.
    """
    with os.scandir(root) as it:
        files = sorted(e.path for e in it if not e.name.startswith(".") and is_label_file(e.name) and e.is_file())
    if not files:
        return None
    headed = [f for f in files if _has_required_columns(f)]
    if len(headed) > 1:
        names = ", ".join(os.path.basename(f) for f in headed)
        raise DatasetError(f"several label files in {root} ({names}); pass the one to use as DATA")
    if headed:
        return headed[0]
    if subdirs or len(files) > 1:
        return None
    return files[0]  # reading it reports what its header lacks


def read_label_file(path: str, skip_row: SkipRowFn) -> LabelFile:
    """Reads a label file's header and rows; images are checked later, by the scan.

    Args:
        path: the .csv or .tsv file, absolute.
        skip_row: called for each row left out (no path, no label, a duplicate).

    Returns:
        The rows kept and the classes named.
    """
    name = os.path.basename(path)
    lines = _read_rows(path)
    if not lines:
        raise DatasetError(f"{path} is empty; expected a header row naming the columns path and label (and optionally split)")
    header = [cell.strip().lower() for cell in lines[0][1]]
    columns = _columns(path, header)
    folder = os.path.dirname(path)
    has_split = SPLIT_COLUMN in columns
    rows: list[LabelRow] = []
    first_row_of: dict[str, LabelRow] = {}
    classes: set[str] = set()
    n_rows = 0
    for number, cells in lines[1:]:
        if not any(cell.strip() for cell in cells):
            continue  # a blank line is no row
        n_rows += 1
        cell = {col: (cells[i].strip() if i < len(cells) else "") for col, i in columns.items()}
        split = _split_value(cell.get(SPLIT_COLUMN), name, number) if has_split else None
        if not cell["path"]:
            skip_row(number, "", "no path")
            continue
        image = os.path.normpath(os.path.join(folder, os.path.expanduser(cell["path"])))
        if not cell["label"]:
            skip_row(number, image, "no label")
            continue
        classes.add(cell["label"])
        first = first_row_of.get(image)
        if first is not None:
            skip_row(number, image, _duplicate_reason(first, cell["label"], split))
            continue
        row = LabelRow(row=number, path=image, label=cell["label"], split=split)
        first_row_of[image] = row
        rows.append(row)
    if n_rows == 0:
        raise DatasetError(f"{path} has a header but no row; expected one row per image ({', '.join(header)})")
    return LabelFile(path=path, rows=tuple(rows), classes=tuple(sorted(classes)), has_split=has_split, n_rows=n_rows)


def _read_rows(path: str) -> list[tuple[int, list[str]]]:
    """[(row number, cells)] of the whole file, with the delimiter its extension (or header) says."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8 CSV") from None
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from None
    delimiter = "\t" if path.lower().endswith(".tsv") else _csv_delimiter(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    out = []
    try:
        for cells in reader:
            # csv counts lines; a quoted cell may span several, the row number is where it starts.
            out.append((len(out) + 1, cells))
    except csv.Error as e:
        raise DatasetError(f"{path} row {len(out) + 1}: cannot parse: {e}") from None
    return out


def _csv_delimiter(text: str) -> str:
    """The delimiter that makes the first line name path and label; ',' when none does."""
    first = text.split("\n", 1)[0]
    for delimiter in _CSV_DELIMITERS:
        names = {cell.strip().lower() for cell in next(csv.reader([first], delimiter=delimiter), [])}
        if set(REQUIRED_COLUMNS) <= names:
            return delimiter
    return ","


def _has_required_columns(path: str) -> bool:
    """Whether the file's first line names path and label (read alone: a label file may be long)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        return False
    delimiter = "\t" if path.lower().endswith(".tsv") else _csv_delimiter(first)
    names = {c.strip().lower() for c in next(csv.reader([first], delimiter=delimiter), [])}
    return set(REQUIRED_COLUMNS) <= names


def _columns(path: str, header: list[str]) -> dict[str, int]:
    """{column name: index} of path, label and split, or the error that says what the header lacks."""
    wanted = (*REQUIRED_COLUMNS, SPLIT_COLUMN)
    columns: dict[str, int] = {}
    for i, name in enumerate(header):
        if name in wanted:
            if name in columns:
                raise DatasetError(f"{path}: the header names the column {name!r} twice")
            columns[name] = i
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if not missing:
        return columns
    if not columns and any(cell.endswith(_IMAGE_HINTS) or "/" in cell for cell in header):
        raise DatasetError(
            f"{path} has no header row: its first row ({', '.join(header)}) is data; add a first row "
            "naming the columns, e.g. path,label or path,label,split"
        )
    raise DatasetError(
        f"{path}: missing column(s) {', '.join(missing)}; the header names {', '.join(header) or 'nothing'} "
        "(expected path, label and optionally split)"
    )


def _split_value(value: str | None, name: str, number: int) -> str:
    split = SPLIT_VALUES.get((value or "").lower())
    if split is None:
        raise DatasetError(
            f"{name} row {number}: unknown split {value!r}; valid values: train, val (or valid, validation), test"
        )
    return split


def _duplicate_reason(first: LabelRow, label: str, split: str | None) -> str:
    if (first.label, first.split) == (label, split):
        return f"duplicate of row {first.row}"
    said = f"label {first.label!r}" + (f", split {first.split}" if first.split else "")
    return f"the same image as row {first.row}, which says {said}: the first row is kept"

"""A study's labels.csv: reading it (any delimiter a spreadsheet writes), checking its columns,
dropping bad rows with one warning each, and telling a classification from a regression task."""

from __future__ import annotations

import csv
import difflib
import io
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mrsfm_model.data.io import reference_candidates, supported_files
from mrsfm_model.errors import MRSDataError
from mrsfm_model.logs import Log

TASKS = ("classification", "regression")
MISSING_VALUES = {"", "nan", "na", "n/a", "null", "none", "?"}


class Warnings:
    """Collects warnings for the JSON and prints each as one `warning: ...` line."""

    def __init__(self, log: Log):
        self.log, self.items = log, []

    def __call__(self, msg: str) -> None:
        self.items.append(msg)
        self.log(f"warning: {msg}")


# --------------------------------------------------------------------------- labels.csv
@dataclass
class LabelRow:
    line: int  # line number in labels.csv (header = line 1)
    file: str  # as written in labels.csv
    path: Path
    value: str
    group: str  # as written; "" when none

    @property
    def unit(self) -> str:
        """The group CV keeps together: the given group, else the file itself."""
        return self.group or f"file:{self.file}"


def _read_table(labels_csv: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line, fields) of every non-blank row; delimiter , ; or tab (spreadsheet exports)."""
    if not labels_csv.is_file():
        raise MRSDataError(labels_csv, "labels file not found")
    try:
        text = labels_csv.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise MRSDataError(labels_csv, "not a UTF-8 text CSV file (spreadsheets: save as 'CSV UTF-8')") from None
    if not text.strip():
        raise MRSDataError(labels_csv, "is empty; expected a header line such as 'file,group,diagnosis' "
                                       "and one row per spectrum")
    first = text.lstrip().splitlines()[0]
    delimiter = max(",;\t", key=first.count) if any(d in first for d in ",;\t") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    lines = []
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                lines.append((reader.line_num, row))
    except csv.Error as exc:
        raise MRSDataError(labels_csv, f"not a readable CSV file (line {reader.line_num}: {exc})") from None
    header = [h.strip() for h in lines[0][1]]
    return header, lines[1:]


def _check_columns(labels_csv: Path, header: list[str], target: str) -> None:
    dupes = sorted(h for h, n in Counter(header).items() if n > 1)
    if dupes:
        raise MRSDataError(labels_csv, f"column names appear twice: {', '.join(dupes)}")
    label_cols = [h for h in header if h not in ("file", "group") and h]
    if "file" not in header:
        raise MRSDataError(labels_csv, f"no 'file' column (columns: {', '.join(header)}); one column must be "
                                       "'file' with each spectrum's path relative to the data folder")
    if target in ("file", "group"):
        raise MRSDataError(labels_csv, f"the target must be a label column, not {target!r} "
                                       f"(label columns: {', '.join(label_cols) or 'none'})")
    if target not in header:
        close = difflib.get_close_matches(target, label_cols, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise MRSDataError(labels_csv, f"no column {target!r}; label columns: {', '.join(label_cols) or 'none'}{hint}")


@dataclass
class LabelTable:
    rows: list[LabelRow]  # labelled, not duplicated (files not yet checked)
    grouped: bool  # labels.csv has a group column
    listed: set[Path]  # every file it names, usable or not

    def __len__(self) -> int:
        return len(self.rows)


def read_labels(labels_csv: Path, data_dir: Path, target: str, warn: Log) -> LabelTable:
    """The labelled, de-duplicated rows of labels.csv; each dropped row gets one warning."""
    header, lines = _read_table(labels_csv)
    _check_columns(labels_csv, header, target)
    if not lines:
        raise MRSDataError(labels_csv, "has a header but no rows")
    col = {h: i for i, h in enumerate(header)}
    grouped = "group" in col
    rows: list[LabelRow] = []
    listed: set[Path] = set()
    for line, fields in lines:
        if len(fields) > len(header) and any(f.strip() for f in fields[len(header):]):
            warn(f"{labels_csv.name} line {line}: {len(fields)} fields but the header has {len(header)}; row dropped")
            continue
        fields = [f.strip() for f in fields] + [""] * (len(header) - len(fields))
        name, value = fields[col["file"]], fields[col[target]]
        listed.add((data_dir / name).resolve())
        if not name:
            warn(f"{labels_csv.name} line {line}: empty 'file'; row dropped")
            continue
        if value.lower() in MISSING_VALUES:
            warn(f"{labels_csv.name} line {line} ({name}): no value for {target!r} ({value or 'empty'}); row dropped")
            continue
        group = fields[col["group"]] if grouped else ""
        if grouped and not group:
            warn(f"{labels_csv.name} line {line} ({name}): empty group; treated as a group of its own")
        rows.append(LabelRow(line, name, data_dir / name, value, group))
    return LabelTable(_drop_duplicates(rows, labels_csv, warn), grouped, listed)


def _drop_duplicates(rows: list[LabelRow], labels_csv: Path, warn: Log) -> list[LabelRow]:
    """A file listed twice: the repeat is ignored when it agrees, every copy dropped when it does not."""
    by_path: dict[Path, list[LabelRow]] = {}
    for r in rows:
        by_path.setdefault(r.path.resolve(), []).append(r)
    bad: set[int] = set()
    for copies in (c for c in by_path.values() if len(c) > 1):
        first = copies[0]
        lines = ", ".join(str(c.line) for c in copies)
        if len({(c.value, c.group) for c in copies}) == 1:
            warn(f"{labels_csv.name}: file {first.file!r} is listed {len(copies)} times (lines {lines}); "
                 f"the repeats are ignored")
            bad |= {c.line for c in copies[1:]}
        else:
            found = ", ".join(repr(c.value) for c in copies)
            warn(f"{labels_csv.name}: file {first.file!r} is listed {len(copies)} times (lines {lines}) with "
                 f"different labels or groups ({found}); all its rows dropped")
            bad |= {c.line for c in copies}
    return [r for r in rows if r.line not in bad]


def existing_rows(rows: list[LabelRow], data_dir: Path, labels_csv: Path, warn: Log) -> list[LabelRow]:
    """Rows whose file exists inside the data folder (`../x`, absolute paths or links out are dropped:
    a labels file must not make the study read spectra from elsewhere)."""
    out, root = [], data_dir.resolve()
    for r in rows:
        if not r.path.resolve().is_relative_to(root):
            warn(f"{labels_csv.name} line {r.line}: file {r.file!r} is outside {data_dir}; row dropped")
        elif r.path.is_file():
            out.append(r)
        else:
            what = "is a folder, not a file" if r.path.is_dir() else f"not found in {data_dir}"
            warn(f"{labels_csv.name} line {r.line}: file {r.file!r} {what}; row dropped")
    return out


def unlisted_files(data_dir: Path, listed: set[Path]) -> list[str]:
    """Spectra files in DIR that labels.csv does not name (water references of named files aside)."""

    refs = {c.resolve() for p in listed if p.is_file() for c in reference_candidates(p)}
    return [str(f.relative_to(data_dir)) for f in supported_files(data_dir) if f.resolve() not in listed | refs]


# --------------------------------------------------------------------------- task and targets
def _number(value: str) -> float | None:
    try:
        out = float(value)
    except ValueError:
        return None
    return out if math.isfinite(out) else None


def resolve_task(rows: list[LabelRow], task: str | None, target: str, labels_csv: Path, warn: Log) -> str:
    """Categorical target -> classification, numeric -> regression, unless `task` says otherwise."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    numbers = [_number(r.value) for r in rows]
    if task is None:
        task = "regression" if rows and all(n is not None for n in numbers) else "classification"
        distinct = {n for n in numbers if n is not None}
        if task == "regression" and len(distinct) <= 10 and all(float(n).is_integer() for n in distinct):
            warn(f"{target!r} holds only the numbers {sorted(int(n) for n in distinct)}: treated as a number "
                 f"(regression); if these are class codes, use task classification (--task classification)")
        others = [r.value for r, n in zip(rows, numbers) if n is None]
        if task == "classification" and others and len(others) <= 0.2 * len(rows):
            warn(f"{target!r} is mostly numbers but {len(others)} values are not (e.g. {others[0]!r}): treated as "
                 "class names; use task regression (--task regression) to drop those rows instead")
    if task == "classification":
        by_case: dict[str, set[str]] = {}
        for r in rows:
            by_case.setdefault(r.value.casefold(), set()).add(r.value)
        for names in (sorted(v) for v in by_case.values() if len(v) > 1):
            warn(f"labels {', '.join(map(repr, names))} of {target!r} differ only in letter case: "
                 "they are treated as different classes")
    elif task == "regression" and rows and not any(n is not None for n in numbers):
        raise MRSDataError(labels_csv, f"task regression needs numbers in {target!r}, found e.g. {rows[0].value!r}")
    return task


def numeric_rows(rows: list[LabelRow], target: str, labels_csv: Path, warn: Log) -> list[LabelRow]:
    out = []
    for r in rows:
        if _number(r.value) is None:
            warn(f"{labels_csv.name} line {r.line} ({r.file}): {target!r} = {r.value!r} is not a number; row dropped")
        else:
            out.append(r)
    return out

"""Text classification datasets: labelled strings read from files.

None of these ships an official split: the test split is a seeded, stratified ``dataset.test_fraction``
(0.2) of all rows and validation a ``dataset.val_fraction`` of the rest. A row that cannot be used (no
text, no label, bytes that do not decode, a line that does not parse) is left out, counted in
``DataSplits.skipped`` and described in the run log and summary: never dropped silently.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from transfer_cli.config import DatasetConfig
from transfer_cli.data.splits import DATASETS, DataSplits, stratified_split
from transfer_cli.errors import UserError

TABLES = (".csv", ".tsv", ".jsonl")


class TextSamples(Dataset):
    """(text, label) pairs held in memory."""

    def __init__(self, texts: list[str], labels: list[int] | np.ndarray) -> None:
        self.texts = list(texts)
        self.targets = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.texts[index], int(self.targets[index])


class BadRows:
    """Why rows were left out, with the first few line numbers of each reason, for one report line."""

    def __init__(self) -> None:
        self.lines: dict[str, list[str]] = defaultdict(list)

    def add(self, reason: str, where: str) -> None:
        self.lines[reason].append(where)

    def __len__(self) -> int:
        return sum(len(v) for v in self.lines.values())

    def note(self, name: str, total: int) -> list[str]:
        if not self:
            return []
        parts = [f"{len(where)} {reason} ({', '.join(where[:3])}{', ...' if len(where) > 3 else ''})"
                 for reason, where in self.lines.items()]
        return [f"dataset={name}: {len(self)} of {total:,} rows left out: {'; '.join(parts)}."]


def _root(cfg: DatasetConfig) -> Path:
    if not cfg.root:
        raise UserError(f"dataset={cfg.name} needs dataset.root=PATH: where its files are.")
    return Path(cfg.root).expanduser()


def _byte_lines(path: Path) -> list[bytes]:
    """Lines split on b"\\n" only: decoded text must not be split with ``str.splitlines``, which also breaks
    at U+0085 and the other Unicode line separators some 8-bit files contain."""
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line.rstrip(b"\r") for line in lines]


def text_splits(name: str, texts: list[str], labels: list[int], classes: list[str], cfg: DatasetConfig,
                bad: BadRows, total: int) -> DataSplits:
    counts = Counter(labels)
    if len(counts) < 2:
        raise UserError(f"dataset={name} (dataset.root={cfg.root!r}): {len(texts)} usable rows with "
                        f"{len(counts)} distinct label(s); classification needs at least two.")
    rare = [classes[c] for c, n in counts.items() if n < 3]
    if rare:
        raise UserError(f"dataset={name}: label(s) {rare} occur fewer than 3 times, too few for a stratified "
                        "train/val/test split. Remove those rows or merge the labels.")
    full = TextSamples(texts, labels)
    rest = full
    try:
        rest, test = stratified_split(full, cfg.test_fraction, cfg.split_seed)
        train, val = stratified_split(rest, cfg.val_fraction, cfg.split_seed)
    except ValueError as err:  # a split too small to hold every class
        key, value = ("test_fraction", cfg.test_fraction) if rest is full else ("val_fraction", cfg.val_fraction)
        raise UserError(f"dataset.{key}={value} of dataset={name}'s {len(rest)} rows cannot hold every one of its "
                        f"{len(classes)} classes ({err}). Give more rows, or a larger dataset.{key} "
                        "(dataset.val_fraction=0 keeps no validation split).") from None
    return DataSplits(train, val, test, classes, channels=0, size=None, skipped=len(bad),
                      notes=bad.note(name, total), text=True)


@DATASETS.register("rt_polarity")
def rt_polarity(cfg: DatasetConfig) -> DataSplits:
    """Pang & Lee's sentence polarity data: rt-polarity.neg / rt-polarity.pos, one sentence per line, in
    Windows-1252 (its 0x85, 0x91, 0x96 and 0x97 are punctuation, not latin-1 control characters)."""
    root = _root(cfg)
    texts, labels, bad, total = [], [], BadRows(), 0
    classes = ["negative", "positive"]
    for label, suffix in enumerate(("neg", "pos")):
        path = root / f"rt-polarity.{suffix}"
        if not path.is_file():
            raise UserError(f"dataset=rt_polarity: {path} not found. dataset.root must be the folder holding "
                            "rt-polarity.neg and rt-polarity.pos (sentence polarity dataset v1.0).")
        for number, line in enumerate(_byte_lines(path), 1):
            total += 1
            try:
                text = line.decode("cp1252").strip()
            except UnicodeDecodeError:
                bad.add("undecodable as cp1252", f"{path.name}:{number}")
                continue
            if not text:
                bad.add("empty", f"{path.name}:{number}")
                continue
            texts.append(text)
            labels.append(label)
    return text_splits("rt_polarity", texts, labels, classes, cfg, bad, total)


@DATASETS.register("sms_spam")
def sms_spam(cfg: DatasetConfig) -> DataSplits:
    """The UCI SMS Spam Collection: ``label<TAB>text`` per line, UTF-8. Messages contain double quotes, so
    a line is split at its first tab, never parsed with CSV quoting."""
    root = _root(cfg)
    path = root / "SMSSpamCollection" if root.is_dir() else root
    if not path.is_file():
        raise UserError(f"dataset=sms_spam: {path} not found. dataset.root must be the folder holding "
                        "SMSSpamCollection (or that file).")
    classes = ["ham", "spam"]
    texts, labels, bad = [], [], BadRows()
    lines = _byte_lines(path)
    for number, line in enumerate(lines, 1):
        where = f"line {number}"
        label, tab, body = line.partition(b"\t")
        try:
            label, text = label.decode("utf-8").strip(), body.decode("utf-8").strip()
        except UnicodeDecodeError:
            bad.add("undecodable as UTF-8", where)
            continue
        if not tab:
            bad.add("without a tab", where)
        elif label not in classes:
            bad.add("with a label other than ham/spam", where)
        elif not text:
            bad.add("with an empty message", where)
        else:
            texts.append(text)
            labels.append(classes.index(label))
    return text_splits("sms_spam", texts, labels, classes, cfg, bad, len(lines))


def _read_rows(path: Path, bad: BadRows) -> tuple[list[dict], list[str], int]:
    """Rows of a .csv (standard quoting), .tsv (tab-separated, quoting off) or .jsonl file as dicts of
    strings, undecodable bytes kept as surrogates so each row can be judged on its own."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if path.suffix.lower() == ".jsonl":
        rows, columns = [], {}
        lines = text.split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad.add("not valid JSON", f"line {number}")
                continue
            if not isinstance(row, dict):
                bad.add("not a JSON object", f"line {number}")
                continue
            rows.append({k: None if v is None else str(v) for k, v in row.items()})
            columns.update(dict.fromkeys(row))
        return rows, list(columns), sum(1 for line in lines if line.strip())
    tsv = path.suffix.lower() == ".tsv"
    malformed: list[list[str]] = []
    if not text.strip():
        raise UserError(f"{path} is empty: a text table needs a header row and at least one row per class.")
    # object, not str: pandas 3 backs str columns with pyarrow when it is installed (mlflow brings it), and
    # pyarrow refuses the surrogate-escaped bytes by which undecodable rows are found and reported
    frame = pd.read_csv(io.StringIO(text), sep="\t" if tsv else ",", dtype=object, keep_default_na=False,
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL, engine="python",
                        on_bad_lines=lambda fields: malformed.append(fields))
    for i in range(len(malformed)):
        bad.add("with the wrong number of fields", f"malformed row {i + 1}")
    return frame.to_dict("records"), [str(c) for c in frame.columns], len(frame) + len(malformed)


def _sorted_labels(values: set[str]) -> list[str]:
    """Class names in numeric order when every label is a finite number (1 < 2 < 10), else alphabetical.
    Labels are strings: "1" and "1.0" are two classes, ordered by their text where their values tie, so the
    order never depends on a set's (hash-seeded) iteration order."""
    try:
        numbers = {v: float(v) for v in values}
    except ValueError:
        return sorted(values)
    if not all(math.isfinite(n) for n in numbers.values()):
        return sorted(values)
    return sorted(values, key=lambda v: (numbers[v], v))


@DATASETS.register("csv_text")
def csv_text(cfg: DatasetConfig) -> DataSplits:
    """Any table of texts and labels: ``dataset.root`` a .csv, .tsv or .jsonl file (UTF-8) with the columns
    ``dataset.text_column`` and ``dataset.label_column``; the labels (any strings) become the classes."""
    path = _root(cfg)
    if not path.is_file() or path.suffix.lower() not in TABLES:
        found = "is not a file" if not path.is_file() else "has another extension"
        raise UserError(f"dataset=csv_text: dataset.root={cfg.root!r} {found}; it must be a {', '.join(TABLES)} file.")
    bad = BadRows()
    rows, columns, total = _read_rows(path, bad)
    missing = [f"dataset.{key}={column!r}" for key, column in
               (("text_column", cfg.text_column), ("label_column", cfg.label_column)) if column not in columns]
    if missing:
        raise UserError(f"dataset=csv_text: {path.name} has no column {' or '.join(missing)}. Its columns: "
                        f"{', '.join(columns[:20]) or 'none'}.")
    usable = []
    for number, row in enumerate(rows, 2 if path.suffix.lower() != ".jsonl" else 1):
        text, label = (row.get(cfg.text_column) or "").strip(), (row.get(cfg.label_column) or "").strip()
        where = f"row {number}"
        if not text:
            bad.add("without text", where)
        elif not label:
            bad.add("without a label", where)
        elif any("\udc80" <= ch <= "\udcff" for ch in text + label):
            bad.add("undecodable as UTF-8", where)
        else:
            usable.append((text, label))
    classes = _sorted_labels({label for _, label in usable})
    index = {c: i for i, c in enumerate(classes)}
    return text_splits("csv_text", [t for t, _ in usable], [index[label] for _, label in usable], classes, cfg,
                       bad, total)


def read_texts(value: str, column: str = "text") -> list[str]:
    """The texts ``input=`` names for prediction: a .txt file (one text per line) or a .csv / .tsv / .jsonl
    table (its ``column``, else its only column). Empty lines and rows are kept (and predicted) so the
    output has one row per input row."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"input={value!r} is not a file. A text model predicts the lines of a .txt file or the "
                        f"'{column}' column of a {', '.join(TABLES)} table.")
    if not path.read_bytes().strip():
        raise UserError(f"input={value!r} is empty: give one text per line (or a table with a '{column}' column).")
    if path.suffix.lower() in TABLES:
        rows, columns, _ = _read_rows(path, BadRows())
        if column not in columns and len(columns) != 1:
            raise UserError(f"input={value!r} has no '{column}' column (its columns: {', '.join(columns[:20])}).")
        key = column if column in columns else columns[0]
        return [(row.get(key) or "").strip() for row in rows]
    try:
        return [line.decode("utf-8").strip() for line in _byte_lines(path)]
    except UnicodeDecodeError as err:
        raise UserError(f"input={value!r} is not UTF-8 text ({err}).") from None

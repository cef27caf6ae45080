"""Labels for any image folder: a CSV of attribute columns, or the first-level subfolders.

Two sources, as the command line names them:

- ``--labels FILE.csv``: a header row, then one row per image: the file (its path relative to
  the image folder, as ``data.find_images`` lists it), then one column per attribute. Any names
  and values; a column named ``forced`` (what ``animeddim data avatars --balanced`` forced) is a
  note, not an attribute.
- ``--labels folders``: one attribute, ``class``, whose value is the first-level subfolder
  (torchvision's ImageFolder convention).

Names and values are compared and kept in Unicode normal form NFC (:func:`canonical`): a
folder named on macOS spells 'grün' as 'u' + a combining diaeresis, the same text as the
'grün' typed at a prompt. A row's file is matched to the images in NFC too ('grün.png' typed
in the CSV labels the 'grün.png' macOS wrote decomposed).

The result is a vocabulary (attribute -> ordered values) and, per image, one integer code per
attribute, aligned with the image list. An unknown entry is an error naming the file and row.
An empty entry, and an image without a label, are errors too unless ``missing="null"``: an
empty entry then gets the null code :data:`NULL` (that attribute unknown for that image, the
others kept: partially labelled data), an image without a row :data:`NULL` for every attribute
(trained as unlabelled). A column that no row fills has no values (``vocab[a] == ()``); what
trains on it refuses it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import unicodedata
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import LABELS_MISSING
from .data import DataError
from .words import counted

NULL = -1  # the code of an unlabelled entry
FOLDERS = "folders"  # --labels folders
FOLDER_ATTRIBUTE = "class"
NOTE_COLUMNS = ("forced",)


class LabelError(DataError):
    """A labels file or folder layout that cannot be used (a user error)."""


@dataclass
class Labels:
    """Attribute codes of an image list.

    ``vocab``: attribute -> its values, in code order (none for a column no row fills).
    ``codes``: ``(N, A)`` int64, column ``a`` holds the index of image n's value in
    ``vocab[attributes[a]]``, or :data:`NULL`.
    """

    vocab: dict[str, tuple[str, ...]]
    codes: np.ndarray

    @property
    def attributes(self) -> list[str]:
        return list(self.vocab)

    def column(self, attribute: str) -> np.ndarray:
        """Codes of one attribute, ``(N,)``."""
        return self.codes[:, self.attributes.index(attribute)]

    def values(self, n: int) -> dict[str, str | None]:
        """Image n's labels by name (None where unlabelled)."""
        return {
            a: (self.vocab[a][c] if c != NULL else None)
            for a, c in zip(self.vocab, self.codes[n].tolist(), strict=True)
        }


def canonical(text: str) -> str:
    """``text`` in Unicode normal form NFC: how attribute names and values are kept and
    compared, so that two spellings of one text ('\u00fc' and 'u\u0308') are one value."""
    return unicodedata.normalize("NFC", text)


def quoted(items: Iterable[str]) -> str:
    """Names or values for a message, each quoted: ``'red', 'red, dark'`` (a value may hold a
    comma, which a plain ``", "`` join would make read as two)."""
    return ", ".join(repr(x) for x in items)


def _relative(root: Path, paths: Sequence[str | Path]) -> list[str]:
    """Posix paths relative to ``root`` (paths already relative are kept)."""
    out = []
    for p in map(Path, paths):
        try:
            out.append(p.relative_to(root).as_posix())
        except ValueError:
            out.append(p.as_posix())
    return out


# For the commands that take --labels-missing (train, attributes train).
UNLABELLED_REMEDY = "pass --labels-missing null to use them as unlabelled"


def _csv_text(path: Path, data: bytes) -> str:
    """The text of a labels file; LabelError, with how to save it, for one that is not UTF-8
    (a spreadsheet's UTF-16 'Unicode text', Latin-1) or not text at all (an archive)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\0" not in data:
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError:
            pass
        raise LabelError(
            f"labels file '{path}' is not UTF-8 text; save it as UTF-8 (a spreadsheet's "
            "'CSV UTF-8')"
        )
    raise LabelError(f"labels file '{path}' is not a text file (a CSV: file,attribute,...)")


def read_csv_rows(
    path: str | Path,
    attributes: Collection[str] = (),
    *,
    missing: str = "error",
    remedy: str = UNLABELLED_REMEDY,
) -> tuple[list[str], list[tuple[int, str, list[str | None]]]]:
    """The attribute names and ``(line, file, values)`` rows of a labels CSV.

    Note columns (:data:`NOTE_COLUMNS`) are dropped. An empty value is None under
    ``missing="null"``, else an error whose message ends with ``remedy``. Raises
    :class:`LabelError` for an empty file, a header without attribute columns, duplicate
    names, a short or long row, an empty file name, a file named twice, or a first column
    named as one of ``attributes`` (a model's: the file has no file column, and that attribute
    would be read as file names).
    """
    _check_missing(missing)
    path = Path(path)
    try:
        text = _csv_text(path, path.read_bytes())
    except FileNotFoundError:
        raise LabelError(f"labels file '{path}' does not exist") from None
    except IsADirectoryError:
        raise LabelError(
            f"labels file '{path}' is a folder; give the CSV file itself (e.g. "
            f"'{path / 'labels.csv'}')"
        ) from None
    # newline="": a quoted value keeps its line breaks (splitting the text into lines first
    # would join them away); each row is numbered by the line it starts on, blank lines counted
    table, start = [], 1
    reader = csv.reader(io.StringIO(text, newline=""))
    for r in reader:
        if any(c.strip() for c in r):
            table.append((start, r))
        start = reader.line_num + 1
    if not table:
        raise LabelError(f"labels file '{path}' is empty (expected a header: file,attribute,...)")
    header = [canonical(c.strip()) for c in table[0][1]]
    if header[0] in {canonical(a) for a in attributes}:
        raise LabelError(
            f"labels file '{path}': its first column is the file column, but it is named "
            f"{header[0]!r}, an attribute of the model; a labels CSV starts with the file "
            f"(file,{','.join(header)})"
        )
    keep = [k for k, name in enumerate(header) if k > 0 and name not in NOTE_COLUMNS]
    names = [header[k] for k in keep]
    if not names:
        sep = next((c for c in ";\t|" if len(header) == 1 and c in header[0]), None)
        if sep is not None:  # a spreadsheet's CSV in a language whose decimal mark is a comma
            raise LabelError(
                f"labels file '{path}' separates its columns with {sep!r}, not commas; save it "
                "with commas (file,attribute,...)"
            )
        raise LabelError(f"labels file '{path}' has no attribute columns after the file column")
    if "" in names or len(set(names)) != len(names):
        raise LabelError(
            f"labels file '{path}': attribute names must be distinct and non-empty, got {names}"
        )
    rows, seen = [], {}
    for line, row in table[1:]:
        if len(row) != len(header):
            raise LabelError(
                f"labels file '{path}' row {line}: {counted(len(row), 'entry', 'entries')}, "
                f"the header has {len(header)}"
            )
        file = row[0].strip()
        if not file:
            raise LabelError(f"labels file '{path}' row {line} (?): the file name is empty")
        values: list[str | None] = [canonical(row[k].strip()) or None for k in keep]
        empty = [n for n, v in zip(names, values, strict=True) if v is None]
        if empty and missing != "null":
            raise LabelError(
                f"labels file '{path}' row {line} ({file}): the value of {quoted(empty)} is "
                f"empty; fill it in, or {remedy}"
            )
        if file in seen:
            raise LabelError(
                f"labels file '{path}' row {line}: '{file}' is already labelled in row {seen[file]}"
            )
        seen[file] = line
        rows.append((line, file, values))
    return names, rows


def csv_labels(
    path: str | Path,
    root: str | Path,
    paths: Sequence[str | Path],
    *,
    missing: str = "error",
    vocab: Mapping[str, Sequence[str]] | None = None,
    remedy: str = UNLABELLED_REMEDY,
    others: str = "error",
) -> Labels:
    """Codes of the images ``paths`` (under ``root``) from a labels CSV.

    ``vocab``: the known values (e.g. a trained model's); a value outside it is an error. When
    None, each attribute's values are those found, sorted. A row naming a file that does not
    exist under ``root`` is an error (a typo would otherwise go unnoticed); a row for a file that
    exists but is not in ``paths`` (skipped as unreadable) is ignored. ``others="ignore"``:
    rows for files not under ``root`` are ignored too, with a warning that counts them (the
    labels of a whole data set used for a few of its images), unless none is labelled then.
    ``remedy``: what the errors for unlabelled images and empty entries (``missing="error"``)
    tell the user to do.
    """
    path, root = Path(path), Path(root)
    names, rows = read_csv_rows(path, missing=missing, remedy=remedy)
    if vocab is not None:  # its names as written, NFC or not (a run from before NFC)
        absent = [n for n in vocab if canonical(n) not in names]
        if absent:
            raise LabelError(f"labels file '{path}' has no column for {quoted(absent)}")
        names_used = list(vocab)
    else:
        names_used = names
    index = {n: names.index(canonical(n)) for n in names_used}
    found: dict[str, set[str]] = {n: set() for n in names_used}
    for _, _, values in rows:
        for n in names_used:
            v = values[index[n]]
            if v is not None:
                found[n].add(v)
    known = {
        n: tuple(vocab[n]) if vocab is not None else tuple(sorted(found[n])) for n in names_used
    }
    lookup = {n: {canonical(v): c for c, v in enumerate(vals)} for n, vals in known.items()}

    rels = _relative(root, paths)
    position = {rel: k for k, rel in enumerate(rels)}
    composed: dict[str, int] = {}  # a name typed in NFC finds the NFD name macOS wrote
    for k, rel in enumerate(rels):
        composed.setdefault(canonical(rel), k)
    on_disk = _FileNames(root)
    codes = np.full((len(rels), len(names_used)), NULL, dtype=np.int64)
    labelled = np.zeros(len(rels), dtype=bool)
    row_of: dict[int, tuple[int, str]] = {}
    elsewhere: list[tuple[int, str]] = []
    for line, file, values in rows:
        rel = Path(file).as_posix()
        k = position.get(rel, composed.get(canonical(rel)))
        if k is None:
            if not on_disk.is_file(file):
                if others == "ignore":
                    elsewhere.append((line, file))
                    continue
                raise LabelError(
                    f"labels file '{path}' row {line}: '{file}' is not a file in '{root}'"
                )
            continue
        if k in row_of:  # one name in two spellings, NFC and NFD
            first, other = row_of[k]
            raise LabelError(
                f"labels file '{path}' row {line}: '{file}' is already labelled in row {first} "
                f"(as '{other}', the same name in another Unicode spelling)"
            )
        row_of[k] = (line, file)
        for a, n in enumerate(names_used):
            v = values[index[n]]
            if v is None:  # this attribute unknown for this image (missing="null")
                continue
            code = lookup[n].get(v)
            if code is None:
                raise LabelError(
                    f"labels file '{path}' row {line} ({file}): unknown {n} value {v!r}; known: "
                    f"{quoted(known[n])}"
                )
            codes[k, a] = code
        labelled[k] = True
    if elsewhere and not labelled.any():  # a file for other images, or names all mistyped
        line, file = elsewhere[0]
        raise LabelError(
            f"labels file '{path}': none of its rows names an image in '{root}' (row {line}: "
            f"'{file}' is not a file there); file names are relative to that folder"
        )
    if elsewhere:
        warnings.warn(
            f"labels file '{path}': {len(elsewhere)} of its {counted(len(rows), 'row')} name "
            f"files not in "
            f"'{root}' and were not used",
            stacklevel=2,
        )
    _check_unlabelled(rels, labelled, missing, f"labels file '{path}'", remedy)
    return Labels(known, codes)


class _FileNames:
    """Whether a labels CSV's file name is a file under ``root``, its name compared in NFC:
    the file system keeps names as written (Linux) or in NFD (macOS), and the CSV as typed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.listings: dict[Path, dict[str, str]] = {}  # folder -> NFC name -> name on disk

    def is_file(self, file: str) -> bool:
        if (self.root / file).is_file():
            return True
        full = self.root / file
        here = Path(full.anchor) if full.is_absolute() else Path()
        for part in full.parts[1:] if full.is_absolute() else full.parts:
            name = part if part in (".", "..") else self._names(here).get(canonical(part))
            if name is None:
                return False
            here = here / name
        return here.is_file()

    def _names(self, folder: Path) -> dict[str, str]:
        if folder not in self.listings:
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                names = []
            self.listings[folder] = {}
            for name in names:
                self.listings[folder].setdefault(canonical(name), name)
        return self.listings[folder]


def folder_labels(
    root: str | Path,
    paths: Sequence[str | Path],
    *,
    missing: str = "error",
    vocab: Mapping[str, Sequence[str]] | None = None,
) -> Labels:
    """One attribute, ``class``: each image's first-level subfolder under ``root``."""
    _check_missing(missing)
    root = Path(root)
    rels = _relative(root, paths)
    classes = [canonical(rel.split("/")[0]) if "/" in rel else None for rel in rels]
    if vocab is not None:
        if list(vocab) != [FOLDER_ATTRIBUTE]:
            raise LabelError(
                f"folder labels have one attribute, '{FOLDER_ATTRIBUTE}'; the "
                f"vocabulary asks for {quoted(vocab)}"
            )
        values = tuple(vocab[FOLDER_ATTRIBUTE])
    else:
        values = tuple(sorted({c for c in classes if c is not None}))
    if not values:
        raise LabelError(f"'{root}' has no subfolders: --labels folders needs one per class")
    lookup = {canonical(v): k for k, v in enumerate(values)}
    codes = np.full((len(rels), 1), NULL, dtype=np.int64)
    for k, c in enumerate(classes):
        if c is None:
            continue
        if c not in lookup:
            raise LabelError(f"'{root / rels[k]}': unknown class {c!r}; known: {quoted(values)}")
        codes[k, 0] = lookup[c]
    _check_unlabelled(rels, codes[:, 0] != NULL, missing, f"'{root}' (not in a class subfolder)")
    return Labels({FOLDER_ATTRIBUTE: values}, codes)


def load_labels(
    spec: str | Path,
    root: str | Path,
    paths: Sequence[str | Path],
    *,
    missing: str = "error",
    vocab: Mapping[str, Sequence[str]] | None = None,
) -> Labels:
    """``--labels SPEC``: ``folders``, or the path of a labels CSV."""
    if str(spec) == FOLDERS:
        return folder_labels(root, paths, missing=missing, vocab=vocab)
    return csv_labels(spec, root, paths, missing=missing, vocab=vocab)


def codes_digest(codes: np.ndarray) -> str:
    """sha256 of ``(N, A)`` attribute codes in the image order (a run's ``data.labels_digest``):
    what a conditional run trains on, the same for a labels file moved, re-saved or with its
    rows reordered, another for any image labelled otherwise."""
    codes = np.ascontiguousarray(codes, dtype="<i8")
    h = hashlib.sha256(f"{codes.shape[0]}x{codes.shape[1]}:".encode())
    h.update(codes.tobytes())
    return h.hexdigest()


def _check_missing(missing: str) -> None:
    if missing not in LABELS_MISSING:
        raise LabelError(
            f"labels-missing must be one of {', '.join(LABELS_MISSING)}, got {missing!r}"
        )


def _check_unlabelled(
    rels: list[str],
    labelled: np.ndarray,
    missing: str,
    where: str,
    remedy: str = UNLABELLED_REMEDY,
) -> None:
    if missing == "null" or labelled.all():
        return
    without = [rels[k] for k in np.flatnonzero(~labelled)]
    more = f" and {len(without) - 3} more" if len(without) > 3 else ""
    raise LabelError(
        f"{counted(len(without), 'image')} {'has' if len(without) == 1 else 'have'} no label "
        f"in {where}: {', '.join(without[:3])}{more}; "
        f"label them, or {remedy}"
    )

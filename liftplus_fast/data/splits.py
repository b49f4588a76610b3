"""Split files on disk: locating them, reading list files and class names, counting classes."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

from ..errors import MissingInputError, UserInputError

LIST_FORMAT = "one 'relative/path label' pair per line"


def resolve_split_file(split_dir: str, filename: str, dataset: str, what: str) -> str:
    """Path of ``filename`` inside ``split_dir``; ``FileNotFoundError`` naming it if absent.

    ``what`` describes the file's role (e.g. ``"train split"``) for the error message.
    """
    path = os.path.join(split_dir, filename)
    if not os.path.isfile(path):
        raise MissingInputError(
            f"{dataset}: {what} file not found: {path!r}. Expected the split files "
            f"(train.txt / val.txt / test.txt with {LIST_FORMAT}, plus classnames.txt or "
            f"categories.json) in split_dir={split_dir!r}; pass split_dir= to point elsewhere."
        )
    return path


def _text_lines(path: str) -> List[str]:
    # utf-8-sig: a byte-order mark (Windows editors write one) must not become part of the
    # first path or class name.
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as exc:
        raise UserInputError(
            f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); save it as UTF-8"
        ) from None


def read_list_file(list_file: str) -> Tuple[List[str], List[int], List[int]]:
    """Parse a ``relative/path label`` list file.

    Returns ``(paths, labels, line_numbers)``; blank lines are skipped and the path may
    contain spaces (the label is the last field). A malformed line raises ``ValueError``
    naming the file and the 1-based line number.
    """
    paths, labels, lines = [], [], []
    for lineno, line in enumerate(_text_lines(list_file), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise UserInputError(f"{list_file}:{lineno}: expected {LIST_FORMAT}; got {line!r}")
        try:
            label = int(parts[1])
        except ValueError:
            raise UserInputError(f"{list_file}:{lineno}: label {parts[1]!r} is not an integer") from None
        paths.append(parts[0])
        labels.append(label)
        lines.append(lineno)
    return paths, labels, lines


def read_classnames(path: str) -> List[str]:
    """Class names, one per line, in label order (blank trailing lines ignored).

    A blank name inside the list raises ``ValueError`` naming the file and line: it would shift
    every later label by one.
    """
    names = [line.strip() for line in _text_lines(path)]
    while names and not names[-1]:
        names.pop()
    for lineno, name in enumerate(names, start=1):
        if not name:
            raise UserInputError(f"{path}:{lineno}: blank class name (one name per line, in label order)")
    return names


def read_inat_categories(path: str, key: str = "name") -> Tuple[List[str], List[int]]:
    """iNaturalist ``categories.json`` -> (sorted unique names, remap from category id to label).

    The category id of an entry is its position in the JSON list (as the published code
    reads it); its label is the index of its ``key`` value among the sorted unique values.
    """
    try:
        with open(path, "rb") as f:
            cats = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserInputError(f"{path} is not a JSON list of categories: {exc}") from None
    if not isinstance(cats, list):
        raise UserInputError(f"{path} is not a JSON list of categories (got a {type(cats).__name__})")
    for i, c in enumerate(cats):
        if not (isinstance(c, dict) and isinstance(c.get(key), str)):
            raise UserInputError(f"{path}: category {i} has no {key!r} string; got {c!r:.80}")
    names_by_id = [c[key] for c in cats]
    classnames = sorted(set(names_by_id))
    index = {n: i for i, n in enumerate(classnames)}
    return classnames, [index[n] for n in names_by_id]


def count_per_class(labels: Sequence[int], num_classes: int) -> List[int]:
    """Number of samples of each class 0..num_classes-1 (zeros included)."""
    counts = [0] * num_classes
    for y in labels:
        counts[y] += 1
    return counts


def split_files(mapping: Dict[str, str], split: str, dataset: str) -> str:
    """The file name of ``split`` in ``mapping``, or ``ValueError`` listing the known splits."""
    if split not in mapping:
        raise UserInputError(f"{dataset}: unknown split {split!r}; expected one of {sorted(mapping)}")
    return mapping[split]

"""Datalists: which scans (and masks, segmentations, class labels) a job reads.

A datalist is a folder, a glob, a CSV/TSV file, a Decathlon-style ``dataset.json``, a
single volume file, or a list of these. This module imports neither torch nor MONAI, so
command-line tools that only list files stay fast; the datasets built from datalists are
in :mod:`medidiff.data.datasets`.

Datalist fields (:class:`DatalistEntry`) and where they come from:

========================  ===========================  ==============================
field                     CSV column                   Decathlon ``dataset.json`` key
========================  ===========================  ==============================
``image``                 ``image`` (required)         ``image`` (or a bare string)
``mask`` (brain/fg mask)  ``mask``                     ``mask``
``segmentation`` (truth)  ``segmentation``             ``label`` when it is a path, or
                                                       ``segmentation``
``class_label`` (cond.)   ``label`` (e.g. contrast,    ``label`` when it is a number,
                          diagnosis), ``class_label``  or ``class_label``
``extra``                 any other column             any other key (e.g. ``kind``)
========================  ===========================  ==============================

So a CSV's ``label`` is a *class* label for conditional generation (as the issue
specifies), while a Decathlon ``label`` path is a ground-truth segmentation (as in the
Medical Segmentation Decathlon). Relative paths resolve against the CSV's / JSON's
folder (or ``base_dir``).

Example:
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> from medidiff.io import Volume, save_volume
    >>> from medidiff.data.datalist import load_datalist
    >>> d = Path(tempfile.mkdtemp())
    >>> for i in range(2):
    ...     _ = save_volume(Volume(np.ones((4, 4, 4), np.float32), np.eye(4)), d / f"sub-{i}.nii.gz")
    >>> [e.name for e in load_datalist(d)]
    ['sub-0', 'sub-1']
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medidiff.errors import DataError
from medidiff.io import VOLUME_SUFFIXES, is_dicom_folder, is_volume_path, scan_name

__all__ = [
    "DatalistEntry",
    "class_names_of",
    "datalist_splits",
    "load_datalist",
    "stratified_by_kind",
    "volume_files",
]

_MAX_NAMED = 3  # how many missing files an error message names


def _is_volume_file(path: Path) -> bool:
    return not path.name.startswith(".") and is_volume_path(path) and path.is_file()


def volume_files(folder: str | os.PathLike) -> list[Path]:
    """The visible volume files directly in ``folder``, sorted (no DICOM series, no recursion).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for name in ("b.nii.gz", "a.mha", "notes.txt", ".hidden.nii"):
        ...     _ = (d / name).write_bytes(b"x")
        >>> [p.name for p in volume_files(d)]
        ['a.mha', 'b.nii.gz']
    """
    return sorted(p for p in Path(folder).iterdir() if _is_volume_file(p))


@dataclass(frozen=True)
class DatalistEntry:
    """One case of a datalist.

    Attributes:
        image: the scan.
        mask: brain/foreground mask on the scan's grid, if any.
        segmentation: ground-truth anomaly segmentation on the scan's grid, if any.
        class_label: class for conditional generation (e.g. ``"T1"``, ``"AD"``), if any.
        extra: any other CSV columns / JSON keys, e.g. ``{"kind": "tumour"}``.
    """

    image: Path
    mask: Path | None = None
    segmentation: Path | None = None
    class_label: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name in ("image", "mask", "segmentation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))

    @property
    def name(self) -> str:
        """The name of the case's outputs: the image file name without its volume suffix,
        e.g. ``sub-000``; for a DICOM series folder ``patient7/T1/``, ``patient7_T1``
        (see :func:`medidiff.io.volume.scan_name`)."""
        return scan_name(self.image)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (paths as strings, ``None`` kept)."""
        return {
            "image": str(self.image),
            "mask": None if self.mask is None else str(self.mask),
            "segmentation": None if self.segmentation is None else str(self.segmentation),
            "class_label": self.class_label,
            "extra": dict(self.extra),
        }


def stratified_by_kind(entries: Sequence[DatalistEntry], limit: int | None) -> list[DatalistEntry]:
    """Up to ``limit`` entries taking the kinds in turn (``extra["kind"]``: tumor, ms, ...).

    Keeps the datalist order within a kind and the order of first appearance between kinds,
    so a small limit still covers every kind. ``None`` (or a limit >= the count) keeps all.
    """
    entries = list(entries)
    if limit is None or limit >= len(entries):
        return entries
    by_kind: dict[str, list[DatalistEntry]] = {}
    for e in entries:
        by_kind.setdefault(str(e.extra.get("kind") or "unknown"), []).append(e)
    chosen: list[DatalistEntry] = []
    while len(chosen) < limit:
        for queue in by_kind.values():
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    return chosen


def load_datalist(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    split: str | None = None,
    base_dir: str | os.PathLike | None = None,
) -> list[DatalistEntry]:
    """Read the cases named by a folder, glob, CSV, ``dataset.json``, file, or a list of these.

    Args:
        source: one of
            a folder (its volume files and DICOM series subfolders, sorted; other and
            hidden files ignored; a folder that is itself a DICOM series is one case),
            a glob pattern (``data/*/images/*.nii.gz``; ``**`` recurses),
            a CSV/TSV file (columns ``image``, optional ``mask``, ``label`` (class
            label), ``segmentation``, ``split``; others go to ``extra``),
            a Decathlon-style JSON file (a dict of lists of ``{"image", "mask",
            "label", ...}`` or bare image strings; or a plain list of such entries),
            a single volume file, or a list of any of these (concatenated in order).
        split: which list of a JSON datalist (default ``"training"``), or which rows of
            a CSV with a ``split`` column (default all). Sources without splits
            (folders, globs, files, CSVs without a ``split`` column) are taken whole.
        base_dir: resolve relative paths inside CSV/JSON datalists against this
            folder instead of the datalist's own folder.

    Returns:
        The entries, in datalist order (sorted by path for folders and globs).

    Raises:
        DataError: nothing matched, a missing ``image`` column, listed files that do not
            exist (the first few named), an unknown split (the available ones listed).
    """
    if isinstance(source, (str, os.PathLike)):
        sources: list[str | os.PathLike] = [source]
    else:
        sources = list(source)
    if not sources:
        raise DataError("no inputs given: pass files, a folder, a glob or a datalist")
    base = Path(base_dir).expanduser() if base_dir is not None else None
    entries: list[DatalistEntry] = []
    for item in sources:
        entries.extend(_load_source(item, split, base))
    return entries


def _load_source(source: str | os.PathLike, split: str | None, base_dir: Path | None) -> list[DatalistEntry]:
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_folder(path)
    if path.is_file():
        low = path.name.lower()
        if low.endswith((".csv", ".tsv")):
            return _checked_exist(_from_csv(path, split, base_dir or path.parent), path)
        if low.endswith(".json"):
            return _checked_exist(_from_json(path, split, base_dir or path.parent), path)
        if is_volume_path(path) or path.name.lower().endswith(".dcm"):
            return [DatalistEntry(path)]
        raise DataError(
            f"{path}: not a volume file, CSV, dataset.json or folder; "
            f"volume files end in {', '.join(VOLUME_SUFFIXES)}"
        )
    if any(c in text for c in "*?["):
        return _from_glob(text)
    raise DataError(f"{text}: no such file or folder")


def _from_folder(folder: Path) -> list[DatalistEntry]:
    """The folder's volume files (sorted), its DICOM series subfolders, or itself if a series."""
    children = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    entries = [DatalistEntry(p) for p in children if _is_volume_file(p)]
    entries += [DatalistEntry(p) for p in children if p.is_dir() and is_dicom_folder(p)]
    entries.sort(key=lambda e: str(e.image))
    if entries:
        return entries
    if is_dicom_folder(folder):
        return [DatalistEntry(folder)]
    hints = [p.name for p in children if p.suffix.lower() in (".json", ".csv", ".tsv")]
    hint = f"; it holds {', '.join(hints)}: pass that datalist instead" if hints else ""
    if not hint:
        hint = _subfolder_hint(folder, children)
    raise DataError(
        f"{folder}: no volume files ({', '.join(VOLUME_SUFFIXES)}) or DICOM series in this folder{hint}"
    )


def _subfolder_hint(folder: Path, children: list[Path]) -> str:
    """``"; its subfolder images/ holds 6 volume files: pass FOLDER/images"`` when the
    volumes sit one level down (sample_data's ``SPLIT/images/`` layout), else ``""``."""
    counts = {}
    for child in children:
        if child.is_dir():
            try:
                n = sum(1 for p in child.iterdir() if _is_volume_file(p))
            except OSError:
                continue
            if n:
                counts[child.name] = n
    if not counts:
        return ""
    pick = "images" if "images" in counts else next(iter(counts))
    listed = ", ".join(f"{name}/ ({n})" for name, n in counts.items())
    return (f"; its subfolders hold volume files: {listed}: pass the scans' folder, "
            f"e.g. {folder / pick}")


def _from_glob(pattern: str) -> list[DatalistEntry]:
    matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(pattern), recursive=True))]
    files = [m for m in matches if _is_volume_file(m) or (m.is_dir() and is_dicom_folder(m))]
    if not files:
        other = f" (it matched {len(matches)} other files)" if matches else ""
        raise DataError(f"{pattern}: the pattern matched no volume files{other}")
    return [DatalistEntry(p) for p in files]


def _resolve(value: str, base: Path) -> Path:
    path = Path(os.path.expanduser(value.strip()))
    if not path.is_absolute():
        path = base / path
    return Path(os.path.normpath(path))


def _class_label(value: Any, where: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise DataError(f"{where}: class label {value!r} is a boolean; use a string or integer")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, float, str)):
        return str(value).strip()
    raise DataError(f"{where}: class label must be a string or number; got {type(value).__name__}")


def _from_csv(path: Path, split: str | None, base: Path) -> list[DatalistEntry]:
    delimiter = "\t" if path.name.lower().endswith(".tsv") else ","
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f, delimiter=delimiter))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the CSV ({exc})") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"{path}: empty CSV; expected a header with an 'image' column")
    header = [h.strip().lower() for h in rows[0]]
    if "image" not in header:
        raise DataError(
            f"{path}: no 'image' column (found: {', '.join(header) or 'none'}); "
            "columns are image, optional mask, label (class label), segmentation"
        )
    records = []
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) > len(header):
            raise DataError(f"{path}:{lineno}: {len(row)} cells but the header has {len(header)} columns")
        records.append((lineno, {h: c.strip() for h, c in zip(header, row)}))
    if split is not None and "split" in header:
        available = sorted({r.get("split", "") for _, r in records} - {""})
        records = [(n, r) for n, r in records if r.get("split") == split]
        if not records:
            raise DataError(f"{path}: no rows with split {split!r}; available: {', '.join(available) or 'none'}")
    if not records:
        raise DataError(f"{path}: the CSV has a header but no rows")
    entries = []
    known = {"image", "mask", "label", "class_label", "segmentation", "split"}
    for lineno, r in records:
        where = f"{path}:{lineno}"
        if not r.get("image"):
            raise DataError(f"{where}: empty 'image' cell")
        if r.get("label") and r.get("class_label"):
            raise DataError(f"{where}: both 'label' and 'class_label' are set; keep one")
        entries.append(
            DatalistEntry(
                image=_resolve(r["image"], base),
                mask=_resolve(r["mask"], base) if r.get("mask") else None,
                segmentation=_resolve(r["segmentation"], base) if r.get("segmentation") else None,
                class_label=_class_label(r.get("label") or r.get("class_label"), where),
                extra={k: v for k, v in r.items() if k not in known and v != ""},
            )
        )
    return entries


def _from_json(path: Path, split: str | None, base: Path) -> list[DatalistEntry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if isinstance(data, list):
        items, where = data, str(path)
    elif isinstance(data, dict):
        available = _json_splits(data)
        key = "training" if split is None else split
        if key not in available:
            raise DataError(
                f"{path}: no split {key!r}; available splits: {', '.join(available) or 'none'}"
            )
        items, where = data[key], f"{path} [{key}]"
    else:
        raise DataError(f"{path}: expected a JSON object of lists (Decathlon style) or a list of entries")
    if not items:
        raise DataError(f"{where}: the list is empty")
    return [_json_entry(item, base, f"{where} entry {i}") for i, item in enumerate(items)]


def _json_splits(data: dict) -> list[str]:
    """The splits of a Decathlon-style object: lists of entries (dicts or path strings), not
    e.g. ``"spacing_mm": [2, 2, 2]``."""
    return [k for k, v in data.items()
            if isinstance(v, list) and all(isinstance(x, (dict, str)) for x in v)]


def datalist_splits(source: str | os.PathLike) -> list[str] | None:
    """The splits a datalist offers: the lists of a Decathlon ``dataset.json``, or the values
    of a CSV's ``split`` column; ``None`` for a source without splits (a folder, a glob, a
    file, a plain list, a CSV without that column) or one that cannot be read (loading it
    then says why).

    Example:
        >>> import json, tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "dataset.json"
        >>> _ = path.write_text(json.dumps({"training": ["a.nii.gz"], "test": ["b.nii.gz"],
        ...                                 "spacing_mm": [2.0]}))
        >>> datalist_splits(path), datalist_splits(path.parent)
        (['training', 'test'], None)
    """
    path = Path(os.fspath(source)).expanduser()
    low = path.name.lower()
    if not path.is_file():
        return None
    try:
        if low.endswith(".json"):
            data = json.loads(path.read_text(encoding="utf-8"))
            return _json_splits(data) if isinstance(data, dict) else None
        if low.endswith((".csv", ".tsv")):
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, delimiter="\t" if low.endswith(".tsv") else ",")
                fields = {(h or "").strip().lower(): h for h in reader.fieldnames or []}
                if "split" not in fields:
                    return None
                return sorted({(r.get(fields["split"]) or "").strip() for r in reader} - {""})
    except (OSError, UnicodeDecodeError, ValueError, csv.Error):
        return None
    return None


def _json_path(value: Any, base: Path, where: str, key: str) -> Path | None:
    if value is None or value == "":
        return None
    if isinstance(value, list):
        raise DataError(f"{where}: '{key}' is a list (multi-channel); medidiff needs one file per field")
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a path string; got {type(value).__name__}")
    return _resolve(value, base)


def _json_entry(item: Any, base: Path, where: str) -> DatalistEntry:
    if isinstance(item, str):
        return DatalistEntry(_resolve(item, base))
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object with 'image' or a path string; got {type(item).__name__}")
    if "image" not in item:
        raise DataError(f"{where}: no 'image' key (keys: {', '.join(item) or 'none'})")
    label = item.get("label")
    segmentation = item.get("segmentation")
    class_label = item.get("class_label")
    if isinstance(label, (str, list)):  # Decathlon: label is the segmentation file
        if segmentation is not None:
            raise DataError(f"{where}: both 'label' (a path) and 'segmentation' are set; keep one")
        segmentation = label
    elif label is not None:  # a number: a class label (MONAI classification datalists)
        if class_label is not None:
            raise DataError(f"{where}: both 'label' (a number) and 'class_label' are set; keep one")
        class_label = label
    known = {"image", "mask", "label", "segmentation", "class_label"}
    return DatalistEntry(
        image=_json_path(item["image"], base, where, "image"),  # type: ignore[arg-type]
        mask=_json_path(item.get("mask"), base, where, "mask"),
        segmentation=_json_path(segmentation, base, where, "label"),
        class_label=_class_label(class_label, where),
        extra={k: v for k, v in item.items() if k not in known},
    )


def _checked_exist(entries: list[DatalistEntry], source: Path) -> list[DatalistEntry]:
    missing = [
        str(p)
        for e in entries
        for p in (e.image, e.mask, e.segmentation)
        if p is not None and not p.exists()
    ]
    if missing:
        named = ", ".join(missing[:_MAX_NAMED])
        more = f" and {len(missing) - _MAX_NAMED} more" if len(missing) > _MAX_NAMED else ""
        raise DataError(f"{source}: {len(missing)} listed file(s) do not exist: {named}{more}")
    return entries


def class_names_of(entries: Sequence[DatalistEntry]) -> list[str]:
    """The sorted distinct class labels of ``entries`` (integers sort numerically).

    Raises:
        DataError: some entries have a class label and others do not, or none has one.
    """
    labelled = [e for e in entries if e.class_label is not None]
    if not labelled:
        raise DataError("no entry has a class label; add a 'label' column to the CSV datalist")
    if len(labelled) != len(entries):
        first = next(e for e in entries if e.class_label is None)
        raise DataError(f"{first.image}: no class label while other entries have one; label every entry")
    names = {e.class_label for e in labelled}
    return sorted(names, key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))  # type: ignore[union-attr]

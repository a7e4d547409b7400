"""Writing files so that a crash never leaves a half-written output under its final name.

Every writer in medidiff (NIfTI volumes, JSON, CSV, checkpoints, figures) writes to a
temporary file in the destination folder and renames it over the final name
(``os.replace``, atomic on POSIX and Windows within one file system). The finished file
gets the permissions a plain ``open()`` would give (``0o666`` less the umask), not
``mkstemp``'s ``0600``, so shared run folders stay readable.

Example:
    >>> import os, tempfile
    >>> from medidiff.io.atomic import write_json_atomic
    >>> path = write_json_atomic(os.path.join(tempfile.mkdtemp(), "m.json"), {"auroc": 0.9})
    >>> path.read_text()
    '{\\n  "auroc": 0.9\\n}\\n'
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.errors import OutputError

__all__ = [
    "atomic_path",
    "atomic_write",
    "check_writable_folder",
    "current_umask",
    "json_default",
    "write_json_atomic",
    "write_text_atomic",
]


def current_umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_open_mode(path: Path) -> None:
    """Give ``path`` the mode a plain ``open()`` would have (``mkstemp`` makes 0600)."""
    os.chmod(path, 0o666 & ~current_umask())


def check_writable_folder(folder: str | os.PathLike) -> Path:
    """Fail before any work when files cannot be written into ``folder``.

    Nothing is left behind: the folder is not created; a temporary file is created and
    removed in ``folder`` or, when it does not exist yet, in its nearest existing
    ancestor (where creating it would have to write). Permission bits, read-only mounts
    and immutable folders are all caught, since the probe really writes.

    Args:
        folder: the output folder (it may not exist yet).

    Returns:
        ``folder`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: ``folder`` or an ancestor is a file, or nothing can be written there.

    Example:
        >>> import tempfile
        >>> check_writable_folder(tempfile.mkdtemp()).is_dir()
        True
    """
    folder = Path(folder).expanduser()
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{folder}: {probe} is a file, not a folder; choose another output")
    where = "cannot write here" if probe == folder else f"cannot create it in {probe}"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".medidiff-write-test-", dir=probe)
    except OSError as exc:
        raise OutputError(f"{folder}: {where} ({exc.strerror})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    The temporary name keeps the full suffix (``.nii.gz``) so writers that look at the
    extension behave. If the body raises, the temporary file is removed, ``path`` keeps
    its old content (or stays absent) and the body's exception propagates unchanged; the
    written file gets the permissions a plain ``open()`` would give (umask), not
    ``mkstemp``'s 0600.

    Args:
        path: the final destination; missing parent folders are created.
        overwrite: replace an existing file (else :class:`OutputError` before writing).

    Raises:
        OutputError: ``path`` exists and ``overwrite`` is False, or the folder cannot be
            created or written.

    Example:
        >>> import os, tempfile
        >>> target = os.path.join(tempfile.mkdtemp(), "a.txt")
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> open(target).read()
        'done'
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{parent}: cannot create output folder ({exc.strerror})") from None
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=parent)
    except OSError as exc:
        raise OutputError(f"{parent}: cannot write here ({exc.strerror})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with contextlib.suppress(OSError):
            _plain_open_mode(tmp_path)
        try:
            os.replace(tmp_path, path)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, rename it over ``path``.

    For large binary files that must survive a power cut (checkpoints): the data is on
    disk before the rename makes it visible. Unlike :func:`atomic_path`, an ``OSError``
    raised by ``write`` becomes an :class:`OutputError` naming ``path``.

    Args:
        path: the final destination; missing parent folders are created.
        write: writes the complete file to the path it is given.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: the folder cannot be created or written, or writing failed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write here ({exc.strerror or exc})") from None
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        _plain_open_mode(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: writing failed ({exc.strerror or exc})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Args:
        path: destination file.
        text: the content.
        overwrite: replace an existing file (else :class:`OutputError`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        try:
            tmp.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror})") from None
    return path


def json_default(obj: Any) -> Any:
    """``json.dumps(..., default=json_default)``: the few non-JSON types medidiff writes.

    numpy scalars and arrays become numbers and lists, paths strings, sets sorted lists,
    dataclass instances dicts; anything else is a ``TypeError`` naming its type.

    Example:
        >>> import json, numpy as np
        >>> json.dumps({"n": np.int64(3), "v": np.zeros(2)}, default=json_default)
        '{"n": 3, "v": [0.0, 0.0]}'
    """
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} {obj!r} is not JSON-serialisable")


def write_json_atomic(
    path: str | os.PathLike, obj: Any, *, overwrite: bool = True, indent: int = 2
) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (numpy scalars/arrays and paths allowed).

    Non-finite floats are written as ``NaN``/``Infinity`` (Python's json default).

    Args:
        path: destination file.
        obj: a JSON-serialisable object (see :func:`json_default` for the extra types).
        overwrite: replace an existing file (else :class:`OutputError`).
        indent: indentation of the written JSON.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    text = json.dumps(obj, indent=indent, default=json_default) + "\n"
    return write_text_atomic(path, text, overwrite=overwrite)

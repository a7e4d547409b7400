"""Folders of paired synthetic data: ``NAME_synth.nii.gz`` + ``NAME_label.nii.gz`` and a
``manifest.csv``, sharded over ranks, seeded per pair and resumable.

A run is a list of :class:`PairJob` (one per output pair: its name, seed, input scan and
mask source) and a function that makes one pair (:class:`~medidiff.synthesis.inpaint.PairedScan`).
:func:`write_pairs` gives each rank every ``world_size``-th job, skips pairs whose two
files exist (writes are atomic, so a file present is complete), writes the rest, and
rank 0 writes the manifest (:data:`MANIFEST_COLUMNS`, one row per pair, rows of pairs
made earlier rebuilt from their files) and ``pairs_config.json`` (what defines the pairs;
a folder made with other settings is refused unless ``overwrite``).

Example:
    >>> import tempfile, pathlib, numpy as np
    >>> from medidiff.io import Volume
    >>> from medidiff.synthesis.inpaint import PairedScan
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> def make(job):
    ...     v = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4))
    ...     lab = v.with_array(np.ones((4, 4, 4), np.uint8))
    ...     return PairedScan(v, lab, np.ones((4, 4, 4), bool), nfe=1, seconds=0.0)
    >>> jobs = [PairJob(name=f"p{i}", seed=i, mask_source="random:tumor", kind="tumor") for i in range(2)]
    >>> s = write_pairs(jobs, make, out, settings={"k": 1})
    >>> s.generated, [r["lesion_ml"] for r in read_pairs_manifest(s.manifest)]
    (('p0', 'p1'), ['0.064', '0.064'])
    >>> write_pairs(jobs, make, out, settings={"k": 1}).skipped
    ('p0', 'p1')
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.errors import OutputError
from medidiff.synthesis.folder import read_manifest

__all__ = [
    "MANIFEST_COLUMNS",
    "PAIRS_CONFIG",
    "PairJob",
    "PairsSummary",
    "pair_file_names",
    "read_pairs_manifest",
    "write_pairs",
]

#: Columns of ``DIR/manifest.csv``, in order.
MANIFEST_COLUMNS = (
    "name", "image", "label", "seed", "mask_source", "kind", "lesion_ml", "source_scan",
    "nfe", "seconds",
)
MANIFEST_NAME = "manifest.csv"
PAIRS_CONFIG = "pairs_config.json"


@dataclass(frozen=True)
class PairJob:
    """One pair to make.

    Attributes:
        name: the output stem: ``NAME_synth.nii.gz`` and ``NAME_label.nii.gz``.
        seed: all the pair's randomness (mask draw and sampling noise).
        mask_source: the mask or label-map file, or ``random:KIND`` for a drawn mask.
        kind: the lesion kind (``tumor``, ``ms``, ...), or empty when not known.
        scan: the input scan (inpainting), or ``None`` (synthesis from a label map).
        brain: the scan's brain mask, if known.
        mask: the mask or label-map file, or ``None`` (drawn).
    """

    name: str
    seed: int
    mask_source: str
    kind: str | None = None
    scan: str | None = None
    brain: str | None = None
    mask: str | None = None


@dataclass(frozen=True)
class PairsSummary:
    """What :func:`write_pairs` did.

    Attributes:
        out_dir: the folder.
        generated: names made by this call (this rank's on other ranks).
        skipped: names already complete.
        manifest: ``manifest.csv`` (rank 0).
        seconds: wall time.
    """

    out_dir: Path
    generated: tuple[str, ...]
    skipped: tuple[str, ...]
    manifest: Path
    seconds: float


def pair_file_names(name: str) -> tuple[str, str]:
    """``(NAME_synth.nii.gz, NAME_label.nii.gz)``."""
    return f"{name}_synth.nii.gz", f"{name}_label.nii.gz"


#: The rows of a pairs ``manifest.csv`` (``[]`` when missing or unreadable): the same reader
#: as the sample folders' manifests.
read_pairs_manifest = read_manifest


def _write_manifest(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    from medidiff.io.atomic import write_text_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_text_atomic(path, buffer.getvalue())


def _lesion_ml(label: Any) -> float:
    voxel_ml = abs(float(np.linalg.det(np.asarray(label.affine)[:3, :3]))) / 1000.0
    return float((np.asarray(label.array) > 0).sum()) * voxel_ml


def _row(job: PairJob, lesion_ml: float, nfe: Any = "", seconds: Any = "") -> dict[str, str]:
    image, label = pair_file_names(job.name)
    return {
        "name": job.name, "image": image, "label": label, "seed": str(job.seed),
        "mask_source": job.mask_source, "kind": job.kind or "", "lesion_ml": f"{lesion_ml:.3f}",
        "source_scan": job.scan or "", "nfe": str(nfe),
        "seconds": f"{seconds:.2f}" if isinstance(seconds, float) else str(seconds),
    }


def _check_config(out: Path, settings: Mapping[str, Any], overwrite: bool) -> None:
    path = out / PAIRS_CONFIG
    if not path.is_file() or overwrite:
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    wanted = json.loads(json.dumps(dict(settings)))
    differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differ:
        key = differ[0]
        raise OutputError(
            f"{out}: holds pairs made with other settings ({key}: {saved.get(key)!r}, now "
            f"{wanted.get(key)!r}); use another --out or pass --overwrite"
        )


def _collectives(info: Any) -> bool:
    """True in a real torchrun job (not a DistInfo made up for one rank's share)."""
    if info is None or not getattr(info, "enabled", False):
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _barrier(info: Any) -> None:
    if _collectives(info):
        import torch.distributed as dist

        dist.barrier()


def _gather(rows: list[dict[str, str]], info: Any) -> list[dict[str, str]]:
    if not _collectives(info):
        return rows
    import torch.distributed as dist
    gathered: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(rows, gathered, dst=0)
    return [r for part in (gathered or []) for r in (part or [])] if info.is_main else rows


def write_pairs(
    jobs: Sequence[PairJob],
    make_pair: Callable[[PairJob], Any],
    out: str | os.PathLike,
    *,
    settings: Mapping[str, Any],
    info: Any = None,
    overwrite: bool = False,
    progress: bool = False,
) -> PairsSummary:
    """Make the pairs of ``jobs`` that are not in ``out`` yet, and the manifest.

    Args:
        jobs: every pair of the run (all ranks pass the same list).
        make_pair: ``job -> PairedScan``.
        out: the folder.
        settings: what defines the pairs (checkpoint, steps, ...), JSON-ready; stored in
            ``pairs_config.json`` and compared on resume.
        info: the :class:`~medidiff.runtime.distributed.DistInfo` (``None``: one process).
        overwrite: remake every pair, whatever the folder holds.
        progress: a progress bar on rank 0.

    Raises:
        OutputError: the folder holds pairs of other settings, or cannot be written.
    """
    from medidiff.io import check_writable_folder, load_volume, save_volume, write_text_atomic
    from medidiff.runtime.distributed import DistInfo, shard

    began = time.perf_counter()
    info = info or DistInfo()
    out = Path(out)
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise OutputError("two pairs would get the same name; give each scan a distinct file name")
    if info.is_main:
        check_writable_folder(out)
        _check_config(out, settings, overwrite)
        write_text_atomic(out / PAIRS_CONFIG, json.dumps(dict(settings), indent=2, sort_keys=True))
    _barrier(info)
    previous = {r.get("name"): r for r in read_pairs_manifest(out / MANIFEST_NAME)}
    mine = shard(list(jobs), info)
    if progress and info.is_main:
        from tqdm.auto import tqdm

        mine = tqdm(mine, desc="pairs", unit="pair")
    rows, generated, skipped = [], [], []
    for job in mine:
        image_name, label_name = pair_file_names(job.name)
        if not overwrite and (out / image_name).is_file() and (out / label_name).is_file():
            skipped.append(job.name)
            continue
        pair = make_pair(job)
        save_volume(pair.label, out / label_name)
        save_volume(pair.image, out / image_name)
        rows.append(_row(job, _lesion_ml(pair.label), pair.nfe, float(pair.seconds)))
        generated.append(job.name)
    rows = _gather(rows, info)
    if info.is_main:
        fresh = {r["name"]: r for r in rows}
        ordered = []
        for job in jobs:
            if job.name in fresh:
                ordered.append(fresh[job.name])
                continue
            image_name, label_name = pair_file_names(job.name)
            if not (out / label_name).is_file():
                continue
            old = previous.get(job.name) or {}
            ordered.append(_row(job, _lesion_ml(load_volume(out / label_name)),
                                old.get("nfe", ""), old.get("seconds", "")))
        _write_manifest(out / MANIFEST_NAME, ordered)
    _barrier(info)
    return PairsSummary(out_dir=out, generated=tuple(generated), skipped=tuple(skipped),
                        manifest=out / MANIFEST_NAME, seconds=time.perf_counter() - began)

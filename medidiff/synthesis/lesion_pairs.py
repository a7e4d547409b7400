"""The jobs of ``medidiff inpaint`` and ``medidiff synthesize --mask``, and how one pair is made.

:func:`inpaint_jobs` turns scans (datalist entries) and a mask source (a mask file, a folder
of masks named like the scans, or random masks of a kind) into :class:`PairJob` s: pair
``k`` gets seed ``seed + k``, a drawn kind (for ``any``) fixed by that seed, and the name
of its scan (``NAME-jjj`` when there are several pairs per scan). :class:`InpaintPairMaker`
makes one pair from a job: loads the scan (and brain mask), takes or draws the lesion mask,
paints it. :func:`label_map_jobs` and :class:`LabelMapPairMaker` do the same for whole scans
generated from label maps.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.errors import ConfigError, DataError
from medidiff.io import Volume, load_volume
from medidiff.synthesis.pairs import PairJob

__all__ = [
    "InpaintPairMaker",
    "LabelMapPairMaker",
    "RANDOM_PREFIX",
    "inpaint_jobs",
    "label_map_jobs",
    "mask_files",
]

#: ``mask_source`` of a drawn mask: ``random:KIND``.
RANDOM_PREFIX = "random:"


def mask_files(source: str | os.PathLike) -> dict[str, Path]:
    """The volume files of a mask source by name: one file (name ``*``, used for every
    scan) or a folder (matched to scans by file name).

    Raises:
        DataError: the source does not exist or holds no volume file.
    """
    from medidiff.io.volume import is_volume_path, strip_volume_suffix

    path = Path(source).expanduser()
    if path.is_file():
        return {"*": path}
    if path.is_dir():
        found = {strip_volume_suffix(p.name): p for p in sorted(path.iterdir())
                 if p.is_file() and is_volume_path(p) and not p.name.startswith(".")}
        if found:
            return found
        raise DataError(f"--mask {source}: the folder holds no volume files")
    raise DataError(f"--mask {source}: no such file or folder")


def inpaint_jobs(
    entries: Sequence[Any],
    *,
    seed: int,
    masks: str | os.PathLike | None = None,
    random_kind: str | None = None,
    kind: str | None = None,
    per_scan: int = 1,
    shape_model: Any = None,
) -> list[PairJob]:
    """One job per (scan, draw).

    Args:
        entries: the scans (datalist entries; ``mask`` is the brain mask).
        seed: pair ``k`` (scan-major) uses ``seed + k``.
        masks: a lesion mask file or a folder of masks named like the scans.
        random_kind: draw masks of this kind (or ``any``) instead.
        kind: the lesion kind of given masks.
        per_scan: pairs per scan (several only with random masks).
        shape_model: the :class:`~medidiff.synthesis.lesion_shapes.LesionShapeModel`
            (random masks).

    Raises:
        ConfigError: both or neither of masks and random_kind, or per_scan > 1 with given masks.
        DataError: a scan without a mask in the folder.
    """
    if (masks is None) == (random_kind is None):
        raise ConfigError("give exactly one of --mask MASKS and --random-masks KIND")
    if isinstance(per_scan, bool) or not isinstance(per_scan, int) or per_scan < 1:
        raise ConfigError(f"--per-scan must be an integer >= 1; got {per_scan!r}")
    if masks is not None and per_scan != 1:
        raise ConfigError("--per-scan applies to --random-masks (a given mask makes one pair per scan)")
    lookup = mask_files(masks) if masks is not None else {}
    jobs: list[PairJob] = []
    for i, e in enumerate(entries):
        mask = None
        if masks is not None:
            mask = lookup.get("*", lookup.get(e.name))
            if mask is None:
                raise DataError(f"--mask {masks}: no mask named like the scan {e.name!r}")
        for j in range(per_scan):
            k = i * per_scan + j
            pair_seed = int(seed) + k
            name = e.name if per_scan == 1 else f"{e.name}-{j:03d}"
            if mask is not None:
                jobs.append(PairJob(name=name, seed=pair_seed, mask_source=str(mask), kind=kind,
                                    scan=str(e.image), brain=None if e.mask is None else str(e.mask),
                                    mask=str(mask)))
            else:
                drawn_kind = shape_model.resolve_kind(random_kind, np.random.default_rng([pair_seed, 1]))
                jobs.append(PairJob(name=name, seed=pair_seed, mask_source=RANDOM_PREFIX + drawn_kind,
                                    kind=drawn_kind, scan=str(e.image),
                                    brain=None if e.mask is None else str(e.mask)))
    return jobs


class InpaintPairMaker:
    """``job -> PairedScan``: load the scan, take or draw the lesion, paint it.

    Args:
        inpainter: the :class:`~medidiff.synthesis.inpaint.Inpainter`.
        shape_model: the lesion-shape model (random masks), or ``None``.
    """

    def __init__(self, inpainter: Any, shape_model: Any = None) -> None:
        self.inpainter = inpainter
        self.shape_model = shape_model

    def brain_of(self, scan: Volume, brain_path: str | None) -> Volume:
        """The brain mask: the given file, else the scan's foreground."""
        if brain_path is not None:
            brain = load_volume(brain_path)
            if brain.shape != scan.shape:
                raise DataError(f"{brain_path}: brain mask shape {brain.shape} differs from its scan's {scan.shape}")
            return brain
        threshold = self.inpainter.preprocessing.foreground_threshold
        return scan.with_array((np.asarray(scan.array) > threshold).astype(np.uint8))

    def __call__(self, job: PairJob) -> Any:
        scan = load_volume(job.scan)
        brain = self.brain_of(scan, job.brain)
        if job.mask is not None:
            mask = load_volume(job.mask)
            if mask.shape != scan.shape:
                raise DataError(f"{job.mask}: mask shape {mask.shape} differs from the scan {job.scan}'s {scan.shape}")
            lesion = np.asarray(mask.array) > 0
        else:
            if self.shape_model is None:
                raise ConfigError("random masks need a lesion-shape model")
            lesion = self.shape_model.draw(job.kind, brain, job.seed).mask > 0
        return self.inpainter.inpaint(scan, lesion, seed=job.seed, kind=job.kind,
                                      brain=brain if job.brain is not None else None)


def label_map_jobs(masks: str | os.PathLike, *, seed: int, num: int | None = None) -> list[PairJob]:
    """Jobs of ``synthesize --mask``: pair ``i`` uses label map ``i % n`` and seed ``seed + i``;
    named like its map (``MAP-iiiii`` when maps repeat).

    Raises:
        ConfigError: a bad ``num``.
    """
    lookup = mask_files(masks)
    files = sorted(lookup.values())
    count = len(files) if num is None else num
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"--num must be an integer >= 1; got {num!r}")
    from medidiff.io.volume import strip_volume_suffix

    jobs = []
    for i in range(count):
        f = files[i % len(files)]
        stem = strip_volume_suffix(f.name)
        name = stem if count == len(files) else f"{stem}-{i:05d}"
        jobs.append(PairJob(name=name, seed=int(seed) + i, mask_source=str(f), mask=str(f)))
    return jobs


class LabelMapPairMaker:
    """``job -> PairedScan`` from a label map (:func:`~medidiff.synthesis.inpaint.synthesize_from_label_map`)."""

    def __init__(self, inpainter: Any) -> None:
        self.inpainter = inpainter

    def __call__(self, job: PairJob) -> Any:
        from medidiff.synthesis.inpaint import synthesize_from_label_map

        return synthesize_from_label_map(self.inpainter, load_volume(job.mask), seed=job.seed)

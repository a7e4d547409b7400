"""A lesion-shape model fitted to real lesion masks: draws new, random lesion masks inside
a brain, for lesion inpainting (``medidiff inpaint --random-masks KIND``).

Fitting keeps, per lesion kind, every real mask of the training datalist with where it
sat in its brain: the lesion's centroid relative to the brain mask's bounding box in
world (RAS mm) coordinates, so location transfers between scans of any orientation or
spacing. Drawing (:meth:`LesionShapeModel.draw`) picks one real lesion of the kind and
perturbs it:

- **location**: the real relative position plus Gaussian jitter (5 % of the brain's
  extent per axis), re-drawn until the centre lies inside the target brain mask;
- **rigid**: rotation about the superior axis by up to 25 degrees and tilts of up to
  10 degrees, a left-right mirror with probability 1/2;
- **scale**: isotropic, 0.75 to 1.3 (volume x 0.42 to 2.2);
- **elastic**: a smooth random displacement (Gaussian-filtered noise, about 1.5 mm);

then resamples it onto the target grid through the world coordinates (trilinear on the
binary mask, threshold 0.5) and keeps only voxels inside the brain. A draw that loses
more than half its volume to the brain boundary is drawn again. Volumes are reported in
ml (voxel volume from the target affine).

The same seed on the same brain mask gives the same mask.

Example:
    >>> import numpy as np
    >>> from medidiff.io import Volume
    >>> brain = np.zeros((40, 40, 40), np.uint8); brain[5:35, 5:35, 5:35] = 1
    >>> lesion = np.zeros_like(brain); lesion[15:21, 15:21, 15:21] = 1
    >>> affine = np.diag([2.0, 2.0, 2.0, 1.0])
    >>> model = LesionShapeModel.from_arrays([("tumor", lesion, brain, affine)])
    >>> drawn = model.draw("tumor", Volume(brain, affine), seed=3)
    >>> drawn.kind, bool(drawn.mask.any()), bool((drawn.mask <= brain).all())
    ('tumor', True, True)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medidiff.errors import ConfigError, DataError
from medidiff.io import Volume, load_volume

__all__ = ["DrawnLesion", "LesionExample", "LesionShapeModel", "ANY_KIND"]

#: ``--random-masks any``: a kind drawn per sample, uniformly over the fitted kinds.
ANY_KIND = "any"

_MAX_TRIES = 30


@dataclass(frozen=True, eq=False)
class LesionExample:
    """One real lesion the model keeps.

    Attributes:
        kind: its kind (``tumor``, ``ms``, ``stroke``, ...).
        mask: the lesion's bounding-box crop, bool ``(x, y, z)`` voxels of its scan.
        affine: voxel-to-world of the crop (the scan's affine shifted to the crop).
        centroid: the lesion's centroid, world mm.
        relative: the centroid relative to the brain's world bounding box (0..1 per axis).
        volume_ml: the lesion's volume.
        source: the label file.
    """

    kind: str
    mask: np.ndarray
    affine: np.ndarray
    centroid: np.ndarray
    relative: np.ndarray
    volume_ml: float
    source: str


@dataclass(frozen=True, eq=False)
class DrawnLesion:
    """A random lesion on a target grid.

    Attributes:
        mask: uint8 0/1 on the target brain mask's grid, inside the brain.
        kind: the lesion kind.
        volume_ml: the drawn lesion's volume.
        example: the source lesion's file.
        tries: draws needed.
    """

    mask: np.ndarray
    kind: str
    volume_ml: float
    example: str
    tries: int


def _world(affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """``(N, 3)`` voxel indices -> ``(N, 3)`` world mm."""
    return voxels @ affine[:3, :3].T + affine[:3, 3]


def _brain_box(brain: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    corners_lo = np.argwhere(brain > 0).min(axis=0)
    corners_hi = np.argwhere(brain > 0).max(axis=0)
    box = np.array(np.meshgrid(*zip(corners_lo, corners_hi), indexing="ij")).reshape(3, -1).T
    world = _world(affine, box.astype(np.float64))
    return world.min(axis=0), world.max(axis=0)


def _voxel_ml(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0


def _rotation(rng: np.random.Generator) -> np.ndarray:
    def axis_rot(angle: float, axis: int) -> np.ndarray:
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        return r

    deg = np.pi / 180
    r = axis_rot(rng.uniform(-25, 25) * deg, 2) @ axis_rot(rng.uniform(-10, 10) * deg, 0) \
        @ axis_rot(rng.uniform(-10, 10) * deg, 1)
    if rng.random() < 0.5:  # left-right mirror
        r = r @ np.diag([-1.0, 1.0, 1.0])
    return r


class LesionShapeModel:
    """Real lesion masks by kind, and random perturbed draws of them (see the module doc).

    Args:
        examples: the real lesions.

    Raises:
        DataError: no examples.
    """

    def __init__(self, examples: Sequence[LesionExample]) -> None:
        if not examples:
            raise DataError("the lesion-shape model needs at least one labelled lesion")
        self.examples = tuple(examples)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The fitted lesion kinds, sorted."""
        return tuple(sorted({e.kind for e in self.examples}))

    def volumes_ml(self, kind: str) -> np.ndarray:
        """The real lesions' volumes of ``kind``, ml."""
        return np.array([e.volume_ml for e in self.examples if e.kind == kind])

    # ---- fitting ------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, cases: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                    sources: Sequence[str] | None = None) -> "LesionShapeModel":
        """Fit from ``(kind, lesion mask, brain mask, affine)`` tuples (masks on one grid)."""
        examples = []
        for i, (kind, lesion, brain, affine) in enumerate(cases):
            lesion = np.asarray(lesion) > 0
            if not lesion.any():
                continue
            if not (np.asarray(brain) > 0).any():
                raise DataError(f"case {i} ({kind}): empty brain mask")
            affine = np.asarray(affine, dtype=np.float64)
            idx = np.argwhere(lesion)
            lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
            crop = lesion[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            crop_affine = affine.copy()
            crop_affine[:3, 3] = _world(affine, lo[None].astype(np.float64))[0]
            centroid = _world(affine, idx.mean(axis=0)[None])[0]
            bmin, bmax = _brain_box(np.asarray(brain), affine)
            relative = (centroid - bmin) / np.maximum(bmax - bmin, 1e-6)
            examples.append(LesionExample(
                kind=str(kind), mask=crop, affine=crop_affine, centroid=centroid, relative=relative,
                volume_ml=float(lesion.sum()) * _voxel_ml(affine),
                source=sources[i] if sources is not None else f"case-{i}",
            ))
        return cls(examples)

    @classmethod
    def fit(cls, entries: Iterable[Any]) -> "LesionShapeModel":
        """Fit from datalist entries with a lesion label (``segmentation``), a brain
        ``mask`` and a ``kind``; entries without any of these are skipped.

        Raises:
            DataError: no usable entry, or a label on another grid than its brain mask.
        """
        cases, sources = [], []
        for e in entries:
            kind = e.extra.get("kind") if hasattr(e, "extra") else None
            if e.segmentation is None or e.mask is None or not kind:
                continue
            label, brain = load_volume(e.segmentation), load_volume(e.mask)
            if label.shape != brain.shape or not np.allclose(label.affine, brain.affine, atol=1e-4):
                raise DataError(f"{e.segmentation}: lesion label and brain mask {e.mask} are on different grids")
            cases.append((str(kind), label.array, brain.array, label.affine))
            sources.append(str(e.segmentation))
        if not cases:
            raise DataError("no datalist entry has a lesion label, a brain mask and a kind to fit lesion shapes on")
        return cls.from_arrays(cases, sources)

    @classmethod
    def fit_datalist(cls, datalist: str | os.PathLike, split: str | None = "training_lesions") -> "LesionShapeModel":
        """Fit from a datalist (e.g. sample_data's ``dataset.json``, split ``training_lesions``)."""
        from medidiff.data.datalist import load_datalist

        return cls.fit(load_datalist(datalist, split=split))

    # ---- drawing ----------------------------------------------------------------------------
    def resolve_kind(self, kind: str, rng: np.random.Generator) -> str:
        """``kind`` itself, or a uniformly drawn fitted kind for :data:`ANY_KIND`.

        Raises:
            ConfigError: a kind the model was not fitted on.
        """
        if kind == ANY_KIND:
            return self.kinds[int(rng.integers(len(self.kinds)))]
        if kind not in self.kinds:
            raise ConfigError(
                f"lesion kind {kind!r} is not among the fitted kinds ({', '.join(self.kinds)}, or {ANY_KIND})"
            )
        return kind

    def draw(self, kind: str, brain: Volume, seed: int) -> DrawnLesion:
        """A random lesion of ``kind`` inside ``brain`` (a brain mask volume).

        Args:
            kind: a fitted kind or :data:`ANY_KIND`.
            brain: the target brain mask (non-zero inside); the lesion is on its grid.
            seed: fixes the draw.

        Raises:
            ConfigError: unknown kind.
            DataError: an empty brain mask, or no draw fits inside the brain.
        """
        from scipy.ndimage import gaussian_filter, map_coordinates

        rng = np.random.default_rng(int(seed))
        kind = self.resolve_kind(kind, rng)
        pool = [e for e in self.examples if e.kind == kind]
        inside = np.asarray(brain.array) > 0
        if not inside.any():
            raise DataError(f"{brain.meta.get('source', 'brain mask')}: empty brain mask; nowhere to draw a lesion")
        affine = np.asarray(brain.affine, dtype=np.float64)
        bmin, bmax = _brain_box(inside, affine)
        inverse = np.linalg.inv(affine)
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        for tries in range(1, _MAX_TRIES + 1):
            example = pool[int(rng.integers(len(pool)))]
            rotation, scale = _rotation(rng), float(rng.uniform(0.75, 1.3))
            # the centre: the real relative position, jittered, inside the brain
            centre = bmin + np.clip(example.relative + rng.normal(0, 0.05, 3), 0, 1) * (bmax - bmin)
            cv = np.rint(_world(inverse, centre[None])[0]).astype(int)
            if not (np.all(cv >= 0) and np.all(cv < inside.shape) and inside[tuple(cv)]):
                continue
            # the target box that can hold the perturbed lesion
            extent_mm = np.asarray(example.mask.shape) * np.sqrt((example.affine[:3, :3] ** 2).sum(axis=0))
            radius = np.ceil(np.linalg.norm(extent_mm) * scale * 0.6 / spacing + 3).astype(int)
            lo = np.maximum(cv - radius, 0)
            hi = np.minimum(cv + radius + 1, inside.shape)
            grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
            world = _world(affine, grid.reshape(-1, 3).astype(np.float64))
            # elastic: smooth noise in mm on the box, amplitude about 1.5 mm
            field = np.stack([gaussian_filter(rng.normal(0, 1, grid.shape[:3]), sigma=2.0) for _ in range(3)], -1)
            field *= 1.5 / max(float(np.abs(field).std()), 1e-6)
            # target world -> source world: undo the rotation and scale about the centres
            src_world = example.centroid + ((world - centre) / scale + field.reshape(-1, 3)) @ rotation
            src_vox = _world(np.linalg.inv(example.affine), src_world)
            values = map_coordinates(example.mask.astype(np.float32), src_vox.T, order=1, mode="constant", cval=0.0)
            local = (values.reshape(grid.shape[:3]) > 0.5)
            if not local.any():
                continue
            mask = np.zeros(inside.shape, dtype=np.uint8)
            mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = local
            total = int(mask.sum())
            mask &= inside.astype(np.uint8)
            kept = int(mask.sum())
            if kept == 0 or kept < 0.5 * total:
                continue
            return DrawnLesion(mask=mask, kind=kind, volume_ml=kept * _voxel_ml(affine),
                               example=example.source, tries=tries)
        raise DataError(
            f"could not place a {kind} lesion inside the brain mask in {_MAX_TRIES} draws "
            "(is the brain mask much smaller than the training brains?)"
        )

#!/usr/bin/env python3
"""Build the committed sample cohort ``sample_data/`` from the MNI152 template bundled in nilearn.

Every subject is the MNI ICBM152 2009a (nonlinear, symmetric) T1 template that ships inside
nilearn's wheel, made into a different "person" by

1. a random affine (rotation, anisotropic scaling, translation) composed with a smooth random
   elastic displacement, applied as ONE coordinate map that samples the 1 mm template straight
   onto the 2 mm output grid (trilinear, ``scipy.ndimage.map_coordinates(order=1)``);
2. per-tissue intensity gains from the grey/white-matter probability maps (CSF is the rest of
   the brain mask);
3. for lesion subjects (test, val_lesions, train_lesions), a synthetic lesion (tumour-like,
   MS-like or stroke-like) painted onto the tissue image, with its binary label;
4. a smooth multiplicative bias field and Rician noise (applied after the lesion);
5. skull-stripping: everything outside the deformed brain mask is exactly 0.

Three CT-like volumes are also made by mapping the same deformed tissue maps to Hounsfield
units and adding a synthetic skull. They are synthetic through and through and say so.

Nothing is downloaded. Each subject draws from its own ``numpy.random.Generator`` seeded from
``(base seed, subject uid)``, so one subject never depends on another and any single subject
can be rebuilt alone with :func:`make_subject` (the tests do exactly that).

Usage::

    python pipelines/make_sample_data.py --out sample_data --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

# --------------------------------------------------------------------------------------------
# Constants of the cohort
# --------------------------------------------------------------------------------------------

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
SPACING_MM = 2.0
# One grid for every MRI subject: 192 x 224 x 192 mm at 2 mm. Each side is divisible by 16 (four
# U-Net downsamplings) and leaves >= 2 voxels of margin around the worst-case deformed brain.
MRI_SHAPE = (96, 112, 96)
# CT adds CSF gap + skull + scalp (up to ~16 mm a side) around the brain.
CT_SHAPE = (112, 128, 112)
# Template intensities are 0..255; 1.0 (=255) maps to this many output units, so white matter
# sits near 140 and the brightest lesion rims near 240 after bias and noise. MR images are
# stored as uint8: at SNR 25-40 the noise (sigma ~3-5 units) dominates the quantisation step,
# and uint8 compresses to ~60% of int16, which keeps the committed cohort small.
INTENSITY_SCALE = 160.0
MR_DTYPE = np.uint8
NIFTI_XFORM_SCANNER = 1
KINDS = ("tumor", "ms", "stroke", "healthy")
LESION_KINDS = ("tumor", "ms", "stroke")
# Splits whose scans carry a lesion label (all zero for a healthy test scan). ``test`` is only
# for reporting; ``val_lesions`` is for tuning anomaly settings; ``train_lesions`` is for
# mask-conditioned training. Their subjects never share a uid with any other split.
LABELLED_SPLITS = ("test", "val_lesions", "train_lesions")
VAL_LESIONS_PER_KIND = 4
TRAIN_LESIONS_PER_KIND = 8


def _param(default, doc: str):
    """A :class:`SimulationConfig` field whose meaning is kept for the README table."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class SimulationConfig:
    """Ranges of every random draw; ``(low, high)`` pairs are uniform ranges.

    Defaults are the values the committed ``sample_data/`` was built with; each field's
    ``metadata["doc"]`` says what it means (the README's parameter table is built from them).
    """

    rotation_deg: float = _param(8.0, "each Euler angle uniform in [-r, r] degrees")
    scaling: float = _param(0.06, "each axis scale uniform in [1 - s, 1 + s]")
    translation_mm: float = _param(4.0, "each axis shift uniform in [-t, t] mm")
    elastic_mm: tuple[float, float] = _param((2.0, 4.0), "peak elastic displacement (mm)")
    elastic_control_mm: float = _param(24.0, "spacing of the elastic field's control points")
    tissue_gain: float = _param(0.08, "GM, WM, CSF intensity gains each in [1 - g, 1 + g]")
    bias_amplitude: tuple[float, float] = _param(
        (0.10, 0.15), "bias field spans at most [1 - a, 1 + a] in the brain"
    )
    bias_control_mm: float = _param(64.0, "spacing of the bias field's control points")
    snr: tuple[float, float] = _param((25.0, 40.0), "mean brain intensity / noise sigma")
    brain_threshold: float = _param(
        round(20.0 / 255.0, 4), "deformed T1 (0-1) above this, holes filled, is brain"
    )
    tumor_radius_mm: tuple[float, float] = _param((10.0, 25.0), "tumour mass radius (core + rim)")
    tumor_rim_mm: tuple[float, float] = _param((2.0, 3.5), "enhancing rim thickness")
    tumor_oedema_mm: tuple[float, float] = _param(
        (6.0, 14.0), "oedema reach beyond the mass, scaled by local WM probability"
    )
    tumor_irregularity: float = _param(0.12, "relative std of the noise-perturbed radius")
    tumor_core_level: tuple[float, float] = _param((0.20, 0.30), "necrotic core, x WM level")
    tumor_rim_level: tuple[float, float] = _param((1.20, 1.35), "enhancing rim, x WM level")
    tumor_oedema_drop: tuple[float, float] = _param(
        (0.20, 0.30), "oedema darkening: intensity x (1 - d)"
    )
    ms_count: tuple[int, int] = _param((4, 10), "number of MS lesions (inclusive)")
    ms_semi_axis_mm: tuple[float, float] = _param((2.0, 5.0), "ellipsoid semi-axes")
    ms_ventricle_distance_mm: tuple[float, float] = _param(
        (2.0, 10.0), "lesion centre distance from the lateral ventricles"
    )
    ms_level: tuple[float, float] = _param((1.25, 1.40), "MS lesion intensity, x WM level")
    stroke_depth_mm: tuple[float, float] = _param(
        (15.0, 30.0), "cortical surface point to wedge apex"
    )
    stroke_half_angle_deg: tuple[float, float] = _param((25.0, 40.0), "wedge half-angle")
    stroke_level: tuple[float, float] = _param((0.45, 0.60), "infarct GM/WM, x WM level")
    stroke_edge_sigma_mm: float = _param(2.0, "Gaussian blur of the wedge edge")
    ct_hu_gm: float = _param(40.0, "CT grey matter (HU)")
    ct_hu_wm: float = _param(25.0, "CT white matter (HU)")
    ct_hu_csf: float = _param(8.0, "CT CSF (HU)")
    ct_hu_jitter: float = _param(2.0, "per-subject shift of each tissue's HU, uniform +-j")
    ct_hu_bone_table: tuple[float, float] = _param(
        (1100.0, 1250.0), "CT inner/outer skull tables (HU)"
    )
    ct_hu_bone_diploe: tuple[float, float] = _param((650.0, 800.0), "CT diploe (HU)")
    ct_hu_scalp: float = _param(20.0, "CT scalp (HU)")
    ct_gap_mm: tuple[float, float] = _param((1.0, 2.5), "CSF gap between brain and skull")
    ct_skull_mm: tuple[float, float] = _param((5.0, 8.0), "skull thickness")
    ct_scalp_mm: tuple[float, float] = _param((3.0, 6.0), "scalp thickness")
    ct_noise_hu: float = _param(5.0, "CT noise sigma inside the head (HU)")


@dataclass(frozen=True)
class SubjectSpec:
    """Who one subject is.

    Args:
        split: ``train``, ``val``, ``test``, ``val_lesions``, ``train_lesions`` or ``ct``.
        name: file stem, e.g. ``sub-000`` or ``tumor-002``; unique across the whole cohort.
        uid: unique integer mixed with the base seed; never reuse one.
        kind: ``healthy``, ``tumor``, ``ms``, ``stroke`` or ``ct``.
        axcodes: on-disk orientation, e.g. ``("R", "A", "S")``; the world-space anatomy is the
            same whatever the axcodes.
    """

    split: str
    name: str
    uid: int
    kind: str
    axcodes: tuple[str, str, str] = ("R", "A", "S")


def cohort_specs() -> list[SubjectSpec]:
    """The fixed list of subjects in ``sample_data/``.

    Returns:
        24 training, 6 validation, 16 test (4 per kind) and 3 CT subjects, then 12 labelled
        validation-lesion subjects (``val_lesions``: 4 tumour, 4 MS, 4 stroke, named
        ``<kind>-100`` ...) and 24 training-lesion subjects (``train_lesions``: 8 per lesion kind,
        named ``<kind>-200`` ...). Training ``sub-001`` (LPS) and ``sub-002`` (PIR), and test
        ``tumor-001`` (PIR) and ``ms-001`` (LPS) are stored in a non-RAS on-disk orientation.
        Subjects are only ever appended, with fresh uids: each subject's random streams depend
        on ``(seed, uid)`` alone, so adding one leaves every existing file byte-identical.
    """
    odd = {
        ("train", "sub-001"): ("L", "P", "S"),
        ("train", "sub-002"): ("P", "I", "R"),
        ("test", "tumor-001"): ("P", "I", "R"),
        ("test", "ms-001"): ("L", "P", "S"),
    }
    specs = [SubjectSpec("train", f"sub-{i:03d}", i, "healthy") for i in range(24)]
    specs += [SubjectSpec("val", f"sub-{100 + i:03d}", 100 + i, "healthy") for i in range(6)]
    for k, kind in enumerate(KINDS):
        specs += [SubjectSpec("test", f"{kind}-{i:03d}", 200 + 10 * k + i, kind) for i in range(4)]
    specs += [SubjectSpec("ct", f"ct-{i:03d}", 300 + i, "ct") for i in range(3)]
    for k, kind in enumerate(LESION_KINDS):
        specs += [
            SubjectSpec("val_lesions", f"{kind}-{100 + i:03d}", 400 + 10 * k + i, kind)
            for i in range(VAL_LESIONS_PER_KIND)
        ]
    for k, kind in enumerate(LESION_KINDS):
        specs += [
            SubjectSpec("train_lesions", f"{kind}-{200 + i:03d}", 500 + 10 * k + i, kind)
            for i in range(TRAIN_LESIONS_PER_KIND)
        ]
    return [
        SubjectSpec(s.split, s.name, s.uid, s.kind, odd.get((s.split, s.name), s.axcodes))
        for s in specs
    ]


# --------------------------------------------------------------------------------------------
# Template
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """The 1 mm MNI152 2009a template, scaled to [0, 1].

    Attributes:
        t1: T1-weighted intensities, shape (197, 233, 189), float32 in [0, 1].
        gm: grey-matter probability, same shape, float32 in [0, 1].
        wm: white-matter probability, same shape, float32 in [0, 1].
        affine: voxel-to-world (RAS, mm) matrix, (4, 4).
        centre_mm: world centre of the brain's bounding box, (3,).
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    affine: np.ndarray
    centre_mm: np.ndarray


def template_dir() -> Path:
    """Folder inside the installed nilearn wheel that holds the MNI152 2009a files."""
    try:
        import nilearn.datasets
    except ImportError:
        raise SystemExit(
            "error: nilearn is not installed; run `pip install 'nilearn>=0.10'` "
            "(or `make sample-data`, which installs it)"
        ) from None

    return Path(nilearn.datasets.__file__).parent / "data"


def load_template(data_dir: Path | None = None) -> Template:
    """Load the bundled T1, GM and WM templates (no download).

    Args:
        data_dir: folder holding :data:`TEMPLATE_FILES`; defaults to :func:`template_dir`.

    Returns:
        The :class:`Template`.
    """
    data_dir = template_dir() if data_dir is None else Path(data_dir)
    arrays, affine = {}, None
    for key, fname in TEMPLATE_FILES.items():
        path = data_dir / fname
        if not path.is_file():
            raise SystemExit(f"error: template {path} not found; install nilearn>=0.10 (pip)")
        img = nib.load(path)
        arrays[key] = (np.asarray(img.dataobj, dtype=np.float32) / 255.0).astype(np.float32)
        affine = img.affine if affine is None else affine
    idx = np.argwhere(arrays["t1"] > 0)
    bbox_centre_vox = (idx.min(0) + idx.max(0)) / 2.0
    centre = affine[:3, :3] @ bbox_centre_vox + affine[:3, 3]
    return Template(arrays["t1"], arrays["gm"], arrays["wm"], np.asarray(affine, float), centre)


# --------------------------------------------------------------------------------------------
# Geometry: output grid, random affine + elastic warp, reorientation
# --------------------------------------------------------------------------------------------


def grid_affine(shape: tuple[int, int, int], centre_mm: np.ndarray) -> np.ndarray:
    """RAS voxel-to-world matrix of an isotropic :data:`SPACING_MM` grid centred on a point.

    Args:
        shape: grid shape (X, Y, Z).
        centre_mm: world point at the grid's centre, (3,).

    Returns:
        (4, 4) affine.
    """
    affine = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    affine[:3, 3] = np.asarray(centre_mm) - SPACING_MM * (np.asarray(shape) - 1) / 2.0
    return affine


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation R = Rz @ Ry @ Rx from three Euler angles in degrees, (3, 3)."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def smooth_random_field(
    rng: np.random.Generator, shape: tuple[int, ...], control_vox: float
) -> np.ndarray:
    """Smooth zero-mean random field with peak |value| 1.

    White noise on a control grid (one point every ``control_vox`` voxels) is upsampled with a
    cubic spline to a quarter-resolution grid, then linearly to ``shape`` (fast; the field is
    smooth on scales far above 4 voxels, so the linear last step adds no visible kinks).

    Args:
        rng: generator.
        shape: output shape (X, Y, Z).
        control_vox: control-point spacing in voxels.

    Returns:
        float32 array of ``shape``.
    """
    coarse_shape = [max(2, int(np.ceil(s / control_vox)) + 1) for s in shape]
    coarse = rng.standard_normal(coarse_shape)
    quarter = [max(2, s // 4) for s in shape]
    mid = ndi.zoom(coarse, [q / c for q, c in zip(quarter, coarse_shape)], order=3)
    full = ndi.zoom(mid.astype(np.float32), [s / q for s, q in zip(shape, quarter)], order=1)
    full -= full.mean()
    return (full / np.abs(full).max()).astype(np.float32)


@dataclass(frozen=True)
class WarpParams:
    """Random spatial transform of one subject (template world -> subject world).

    A template point x maps to ``R @ S @ (x - c) + c + t`` where c is the template brain centre;
    an elastic displacement of peak ``elastic_mm`` is added on top.
    """

    rotation_deg: tuple[float, float, float]
    scaling: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    elastic_mm: float


def random_warp(rng: np.random.Generator, cfg: SimulationConfig) -> WarpParams:
    """Draw one subject's affine and elastic amplitude."""
    rot = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3)
    scale = rng.uniform(1 - cfg.scaling, 1 + cfg.scaling, 3)
    shift = rng.uniform(-cfg.translation_mm, cfg.translation_mm, 3)
    # rounded so the recorded parameters are readable and reproduce the subject exactly
    return WarpParams(
        tuple(round(float(v), 3) for v in rot),
        tuple(round(float(v), 4) for v in scale),
        tuple(round(float(v), 3) for v in shift),
        round(float(rng.uniform(*cfg.elastic_mm)), 3),
    )


def template_coordinates(
    warp: WarpParams,
    rng: np.random.Generator,
    template: Template,
    out_affine: np.ndarray,
    shape: tuple[int, int, int],
    cfg: SimulationConfig,
) -> np.ndarray:
    """One coordinate map: for each output voxel, where to sample the 1 mm template.

    For output world point y: template world point x = (R S)^-1 (y - c - t) + c + d(y), where d
    is the smooth elastic displacement (mm); then template voxel = A_tpl^-1 x. Affine and
    elastic parts are composed here, so the template is interpolated once.

    Args:
        warp: the subject's :class:`WarpParams`.
        rng: generator for the elastic field.
        template: the template (for its affine and centre).
        out_affine: output grid voxel-to-world, (4, 4).
        shape: output grid shape (X, Y, Z).
        cfg: simulation ranges.

    Returns:
        float32 template voxel coordinates, (3, X, Y, Z).
    """
    m = rotation_matrix(np.array(warp.rotation_deg)) @ np.diag(warp.scaling)
    # composed linear map and offset: output voxel -> template voxel
    tpl_inv = np.linalg.inv(template.affine)
    lin = tpl_inv[:3, :3] @ np.linalg.inv(m) @ out_affine[:3, :3]
    c = template.centre_mm
    x0 = np.linalg.inv(m) @ (out_affine[:3, 3] - c - np.array(warp.translation_mm)) + c
    off = tpl_inv[:3, :3] @ x0 + tpl_inv[:3, 3]
    ii = [np.arange(n, dtype=np.float32) for n in shape]
    coords = np.empty((3, *shape), dtype=np.float32)
    control_vox = cfg.elastic_control_mm / SPACING_MM
    for a in range(3):
        # explicit broadcasting (no BLAS) keeps the result bit-identical across machines
        coords[a] = (
            lin[a, 0] * ii[0][:, None, None]
            + lin[a, 1] * ii[1][None, :, None]
            + lin[a, 2] * ii[2][None, None, :]
            + off[a]
        )
    # elastic displacement d(y) in template world mm, turned into template voxels
    disp = np.stack([smooth_random_field(rng, shape, control_vox) for _ in range(3)])
    disp *= warp.elastic_mm / max(float(np.sqrt((disp**2).sum(0)).max()), 1e-6)
    for a in range(3):
        coords[a] += tpl_inv[a, 0] * disp[0] + tpl_inv[a, 1] * disp[1] + tpl_inv[a, 2] * disp[2]
    return coords


def reorient(array: np.ndarray, affine: np.ndarray, axcodes: tuple[str, str, str]):
    """Store an array in another on-disk orientation without moving it in world space.

    Args:
        array: (X, Y, Z) array on the grid of ``affine``.
        affine: its voxel-to-world matrix.
        axcodes: target orientation codes, e.g. ``("L", "P", "S")``.

    Returns:
        ``(array, affine)`` in the new orientation (same anatomy in world coordinates).
    """
    current = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(axcodes)
    transform = nib.orientations.ornt_transform(current, target)
    new_array = nib.orientations.apply_orientation(array, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(new_array), new_affine


# --------------------------------------------------------------------------------------------
# Anatomy and MR contrast
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anatomy:
    """Deformed template on the output grid, all (X, Y, Z).

    Attributes:
        t1: template T1 in [0, 1] (float32).
        gm, wm, csf: tissue probabilities in [0, 1]; csf = brain - gm - wm, clipped.
        brain: boolean brain mask (thresholded T1, holes filled, largest component).
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray


def sample_anatomy(template: Template, coords: np.ndarray, cfg: SimulationConfig) -> Anatomy:
    """Interpolate the template maps at ``coords`` (trilinear) and derive the brain mask."""

    def sample(volume: np.ndarray) -> np.ndarray:
        out = np.empty(coords.shape[1:], dtype=np.float32)
        ndi.map_coordinates(volume, coords, output=out, order=1, mode="constant", cval=0.0)
        return out

    t1, gm, wm = sample(template.t1), sample(template.gm), sample(template.wm)
    brain = ndi.binary_fill_holes(t1 > cfg.brain_threshold)
    labels, n = ndi.label(brain)
    if n > 1:
        sizes = ndi.sum_labels(brain, labels, index=np.arange(1, n + 1))
        brain = labels == (1 + int(np.argmax(sizes)))
    gm *= brain
    wm *= brain
    csf = np.clip(brain - gm - wm, 0.0, 1.0).astype(np.float32)
    return Anatomy(t1 * brain, gm, wm, csf, brain)


@dataclass(frozen=True)
class ContrastParams:
    """Per-tissue multiplicative gains of one subject."""

    gain_gm: float
    gain_wm: float
    gain_csf: float


def random_contrast(rng: np.random.Generator, cfg: SimulationConfig) -> ContrastParams:
    """Draw the GM, WM and CSF gains, each in ``[1 - tissue_gain, 1 + tissue_gain]``."""
    g = rng.uniform(1 - cfg.tissue_gain, 1 + cfg.tissue_gain, 3)
    return ContrastParams(*(round(float(v), 4) for v in g))


def tissue_contrast(anat: Anatomy, params: ContrastParams) -> np.ndarray:
    """Template T1 with per-tissue gains: I = S * T1 * (1 + sum_k (g_k - 1) p_k).

    Keeping the template's own intensities (and multiplying them by a gain mixed from the tissue
    probabilities p_k) preserves the real anatomy and partial-volume texture.

    Returns:
        float32 image in output units (white matter near 0.86 * :data:`INTENSITY_SCALE`).
    """
    gain = (
        1.0
        + (params.gain_gm - 1.0) * anat.gm
        + (params.gain_wm - 1.0) * anat.wm
        + (params.gain_csf - 1.0) * anat.csf
    )
    return (INTENSITY_SCALE * anat.t1 * gain).astype(np.float32)


def random_bias_field(
    rng: np.random.Generator, shape: tuple[int, int, int], brain: np.ndarray, cfg: SimulationConfig
) -> tuple[np.ndarray, float]:
    """Smooth multiplicative bias field B with B - 1 spanning [-a, a] at most inside the brain.

    Returns:
        ``(field, a)``: float32 (X, Y, Z) field and its amplitude a.
    """
    amplitude = float(rng.uniform(*cfg.bias_amplitude))
    f = smooth_random_field(rng, shape, cfg.bias_control_mm / SPACING_MM)
    f -= f[brain].mean()
    f /= np.abs(f[brain]).max()
    return (1.0 + amplitude * f).astype(np.float32), amplitude


def add_rician_noise(
    image: np.ndarray, brain: np.ndarray, rng: np.random.Generator, snr: float
) -> np.ndarray:
    """Magnitude of the complex signal plus Gaussian noise: |I + n_re + i n_im| (Rician).

    sigma = mean brain intensity / snr. The background is left at exactly 0 afterwards, like a
    skull-stripped scan.
    """
    sigma = float(image[brain].mean()) / snr
    n_re = rng.standard_normal(image.shape, dtype=np.float32) * sigma
    n_im = rng.standard_normal(image.shape, dtype=np.float32) * sigma
    noisy = np.sqrt((image + n_re) ** 2 + n_im**2)
    return (noisy * brain).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Lesions (painted before bias field and noise)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LesionContext:
    """Geometry shared by the lesion painters (computed once per subject).

    Attributes:
        coords_mm: voxel centres in mm along the grid axes, (3, X, Y, Z), origin at voxel 0.
        depth_mm: distance from each brain voxel to the outside of the brain (mm).
        centroid_mm: brain centroid in the same mm frame, (3,).
        wm_level: median intensity of pure white matter (wm > 0.9) before the lesion.
    """

    coords_mm: np.ndarray
    depth_mm: np.ndarray
    centroid_mm: np.ndarray
    wm_level: float


@dataclass(frozen=True)
class Lesion:
    """A painted lesion: the new image, its binary label (X, Y, Z) and recorded parameters."""

    image: np.ndarray
    label: np.ndarray
    params: dict


def lesion_context(image: np.ndarray, anat: Anatomy) -> LesionContext:
    """Precompute coordinates, depth below the brain surface and the white-matter level."""
    shape = anat.brain.shape
    axes = [np.arange(n, dtype=np.float32) * SPACING_MM for n in shape]
    grids = np.meshgrid(*axes, indexing="ij")
    coords = np.stack(grids)
    depth = ndi.distance_transform_edt(anat.brain).astype(np.float32) * SPACING_MM
    centroid = np.array([c[anat.brain].mean() for c in coords])
    wm_level = float(np.median(image[(anat.wm > 0.9) & anat.brain]))
    return LesionContext(coords, depth, centroid, wm_level)


def _soft(mask: np.ndarray, sigma_vox: float = 0.6) -> np.ndarray:
    """Blurred copy of a binary mask in [0, 1] (soft lesion edge)."""
    return np.clip(ndi.gaussian_filter(mask.astype(np.float32), sigma_vox), 0.0, 1.0)


def _unit_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation."""
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return (n / n.std()).astype(np.float32)


def _pick(rng: np.random.Generator, candidates: np.ndarray, ctx: LesionContext) -> np.ndarray:
    """A random candidate voxel's centre in mm, jittered by up to half a voxel."""
    idx = np.argwhere(candidates)
    if len(idx) == 0:
        raise RuntimeError("no voxel qualifies as a lesion centre; try another --seed")
    v = idx[rng.integers(len(idx))]
    return ctx.coords_mm[:, v[0], v[1], v[2]] + rng.uniform(-0.5, 0.5, 3) * SPACING_MM


def _distance_mm(ctx: LesionContext, point: np.ndarray) -> np.ndarray:
    d = ctx.coords_mm - point.astype(np.float32)[:, None, None, None]
    return np.sqrt((d**2).sum(0))


def add_tumor(
    image: np.ndarray,
    anat: Anatomy,
    ctx: LesionContext,
    rng: np.random.Generator,
    cfg: SimulationConfig,
) -> Lesion:
    """Tumour-like mass: necrotic core, enhancing rim, white-matter-following oedema.

    The mass is the set of points whose distance to the centre, divided by a smooth random
    factor (1 + irregularity * noise), is below the radius R: a sphere with a lumpy surface. The
    core (hypointense, like fluid) lies within R - rim; the rim (hyperintense, like contrast
    enhancement) fills the rest. Oedema reaches up to ``oedema_mm`` beyond the mass, scaled by
    the local white-matter probability, and darkens tissue mildly. Label = mass | oedema.
    """
    radius = float(rng.uniform(*cfg.tumor_radius_mm))
    rim = float(rng.uniform(*cfg.tumor_rim_mm))
    reach = float(rng.uniform(*cfg.tumor_oedema_mm))
    core_level = float(rng.uniform(*cfg.tumor_core_level))
    rim_level = float(rng.uniform(*cfg.tumor_rim_level))
    drop = float(rng.uniform(*cfg.tumor_oedema_drop))
    x_mid = ctx.centroid_mm[0]
    for _ in range(20):  # shrink until a deep-enough hemispheric white-matter centre exists
        candidates = (
            anat.brain
            & (anat.wm > 0.5)
            & (ctx.depth_mm >= 0.8 * radius + 4.0)
            & (np.abs(ctx.coords_mm[0] - x_mid) >= 0.8 * radius + 4.0)
            & (ctx.coords_mm[2] >= ctx.centroid_mm[2] - 10.0)  # supratentorial
        )
        if candidates.any():
            break
        radius *= 0.9
    centre = _pick(rng, candidates, ctx)
    lumpiness = 1.0 + cfg.tumor_irregularity * _unit_noise(rng, image.shape, 2.5)
    r_eff = _distance_mm(ctx, centre) / lumpiness
    mass = (r_eff <= radius) & anat.brain
    core = (r_eff <= radius - rim) & anat.brain
    wm_pref = np.clip(1.5 * ndi.gaussian_filter(anat.wm, 1.0), 0.0, 1.0)
    oedema = (r_eff <= radius + reach * wm_pref) & anat.brain
    # keep only the oedema connected to the mass (the lumpy boundary can pinch off islands)
    parts, _ = ndi.label(mass | oedema)
    label = np.isin(parts, np.unique(parts[mass])) & (parts > 0)
    texture = _unit_noise(rng, image.shape, 1.0)
    out = image * (1.0 - drop * _soft(label))
    w_mass, w_core = _soft(mass), _soft(core)
    out = out * (1.0 - w_mass) + w_mass * rim_level * ctx.wm_level * (1.0 + 0.04 * texture)
    out = out * (1.0 - w_core) + w_core * core_level * ctx.wm_level * (1.0 + 0.06 * texture)
    params = {
        "centre_mm_grid": [round(float(v), 2) for v in centre],
        "radius_mm": round(radius, 2), "rim_mm": round(rim, 2), "oedema_mm": round(reach, 2),
        "core_level": round(core_level, 3), "rim_level": round(rim_level, 3),
        "oedema_drop": round(drop, 3),
    }
    return Lesion((out * anat.brain).astype(np.float32), label, params)


def add_ms(
    image: np.ndarray,
    anat: Anatomy,
    ctx: LesionContext,
    rng: np.random.Generator,
    cfg: SimulationConfig,
) -> Lesion:
    """MS-like: 4-10 small randomly rotated ellipsoids in periventricular white matter.

    Ventricles are deep CSF (csf > 0.5, >= 15 mm under the brain surface, within 35 mm of the
    midline); lesion centres are white-matter voxels (wm > 0.6) 2-10 mm from them. Each lesion
    is pulled towards ``ms_level`` times the white-matter level (hyperintense); label = union.
    """
    x_mid = ctx.centroid_mm[0]
    ventricles = (
        (anat.csf > 0.5) & (ctx.depth_mm >= 15.0) & (np.abs(ctx.coords_mm[0] - x_mid) <= 35.0)
    )
    dist_vent = ndi.distance_transform_edt(~ventricles).astype(np.float32) * SPACING_MM
    lo, hi = cfg.ms_ventricle_distance_mm
    candidates = anat.brain & (anat.wm > 0.6) & (dist_vent >= lo) & (dist_vent <= hi)
    count = int(rng.integers(cfg.ms_count[0], cfg.ms_count[1] + 1))
    level = float(rng.uniform(*cfg.ms_level))
    label = np.zeros(image.shape, dtype=bool)
    lesions = []
    for _ in range(count):
        centre = _pick(rng, candidates, ctx)
        axes = rng.uniform(*cfg.ms_semi_axis_mm, 3)
        rot = rotation_matrix(rng.uniform(-180.0, 180.0, 3))
        d = ctx.coords_mm - centre.astype(np.float32)[:, None, None, None]
        # q = sum_i ((R^T d)_i / a_i)^2 <= 1 inside the ellipsoid
        q = sum(
            ((rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2]) / axes[i]) ** 2
            for i in range(3)
        )
        label |= (q <= 1.0) & anat.brain
        lesions.append({
            "centre_mm_grid": [round(float(v), 2) for v in centre],
            "semi_axes_mm": [round(float(v), 2) for v in axes],
        })
    w = _soft(label, 0.5) * anat.brain
    out = image * (1.0 - w) + w * level * ctx.wm_level
    return Lesion(out.astype(np.float32), label, {"level": round(level, 3), "lesions": lesions})


def add_stroke(
    image: np.ndarray,
    anat: Anatomy,
    ctx: LesionContext,
    rng: np.random.Generator,
    cfg: SimulationConfig,
) -> Lesion:
    """Stroke-like: a hypointense cortical-subcortical wedge with blurred edges.

    A cone with its apex ``depth`` mm inside the brain points at a cortical surface point (grey
    matter within 4 mm of the brain edge, lateral, supratentorial) and opens to the surface;
    its half-angle is perturbed by smooth noise. Grey and white matter inside the blurred cone
    are pulled towards ``stroke_level`` times the white-matter level. Label = blurred cone >= 0.5.
    """
    depth = float(rng.uniform(*cfg.stroke_depth_mm))
    half_angle = float(rng.uniform(*cfg.stroke_half_angle_deg))
    level = float(rng.uniform(*cfg.stroke_level))
    x_mid = ctx.centroid_mm[0]
    candidates = (
        anat.brain
        & (anat.gm > 0.5)
        & (ctx.depth_mm <= 4.0)
        & (np.abs(ctx.coords_mm[0] - x_mid) >= 25.0)
        & (ctx.coords_mm[2] >= ctx.centroid_mm[2] - 5.0)
    )
    surface = _pick(rng, candidates, ctx)
    inward = ctx.centroid_mm - surface
    inward /= np.linalg.norm(inward)
    apex = surface + depth * inward
    v = ctx.coords_mm - apex.astype(np.float32)[:, None, None, None]
    dist = np.sqrt((v**2).sum(0)) + 1e-6
    cos_angle = -(inward[0] * v[0] + inward[1] * v[1] + inward[2] * v[2]) / dist
    angle = np.degrees(np.arccos(np.clip(cos_angle, -1.0, 1.0)))
    limit = half_angle * (1.0 + 0.15 * _unit_noise(rng, image.shape, 3.0))
    cone = (angle <= limit) & (dist <= depth + 15.0) & anat.brain
    edge_sigma_vox = cfg.stroke_edge_sigma_mm / SPACING_MM
    w = np.clip(ndi.gaussian_filter(cone.astype(np.float32), edge_sigma_vox), 0.0, 1.0)
    label = (w >= 0.5) & anat.brain
    w_tissue = w * np.clip(anat.gm + anat.wm, 0.0, 1.0)
    out = image * (1.0 - w_tissue) + w_tissue * level * ctx.wm_level
    params = {
        "surface_mm_grid": [round(float(v), 2) for v in surface],
        "depth_mm": round(depth, 2), "half_angle_deg": round(half_angle, 2),
        "level": round(level, 3),
    }
    return Lesion((out * anat.brain).astype(np.float32), label, params)


LESION_PAINTERS = {"tumor": add_tumor, "ms": add_ms, "stroke": add_stroke}


# --------------------------------------------------------------------------------------------
# CT
# --------------------------------------------------------------------------------------------


def ct_from_anatomy(anat: Anatomy, rng: np.random.Generator, cfg: SimulationConfig):
    """Synthetic CT in Hounsfield units from the deformed tissue maps, with a synthetic skull.

    Layers outward from the brain, by distance d outside the brain mask: CSF gap, skull (dense
    tables around a lighter diploe: HU = table - (table - diploe) sin(pi u), u in [0, 1] across
    the bone), scalp, then air at exactly -1000. Gaussian noise (``ct_noise_hu``) inside the head.

    Returns:
        ``(hu, params)``: int16 (X, Y, Z) volume and the recorded parameters.
    """
    jitter = rng.uniform(-cfg.ct_hu_jitter, cfg.ct_hu_jitter, 3)
    hu_gm = cfg.ct_hu_gm + jitter[0]
    hu_wm = cfg.ct_hu_wm + jitter[1]
    hu_csf = cfg.ct_hu_csf + jitter[2]
    gap = float(rng.uniform(*cfg.ct_gap_mm))
    skull = float(rng.uniform(*cfg.ct_skull_mm))
    scalp = float(rng.uniform(*cfg.ct_scalp_mm))
    table = float(rng.uniform(*cfg.ct_hu_bone_table))
    diploe = float(rng.uniform(*cfg.ct_hu_bone_diploe))
    outside = ndi.distance_transform_edt(~anat.brain).astype(np.float32) * SPACING_MM
    tissue = np.clip(anat.gm + anat.wm, 0.0, 1.0)
    hu = np.full(anat.brain.shape, -1000.0, dtype=np.float32)
    hu[anat.brain] = (hu_gm * anat.gm + hu_wm * anat.wm + hu_csf * (1.0 - tissue))[anat.brain]
    hu[(~anat.brain) & (outside <= gap)] = hu_csf
    bone = (outside > gap) & (outside <= gap + skull)
    u = (outside[bone] - gap) / skull
    hu[bone] = table - (table - diploe) * np.sin(np.pi * u)
    hu[(outside > gap + skull) & (outside <= gap + skull + scalp)] = cfg.ct_hu_scalp
    head = outside <= gap + skull + scalp
    hu = ndi.gaussian_filter(hu, 0.5)  # partial-volume blur at the layer boundaries
    near_head = ndi.binary_dilation(head, iterations=2)
    hu[~near_head] = -1000.0
    hu[near_head] += rng.standard_normal(int(near_head.sum()), dtype=np.float32) * cfg.ct_noise_hu
    params = {
        "hu_gm": round(float(hu_gm), 2), "hu_wm": round(float(hu_wm), 2),
        "hu_csf": round(float(hu_csf), 2), "gap_mm": round(gap, 2), "skull_mm": round(skull, 2),
        "scalp_mm": round(scalp, 2), "hu_bone_table": round(table, 1),
        "hu_bone_diploe": round(diploe, 1), "noise_hu": cfg.ct_noise_hu,
    }
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), params


# --------------------------------------------------------------------------------------------
# One subject
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectVolumes:
    """One subject as stored on disk.

    Attributes:
        spec: the :class:`SubjectSpec`.
        image: (X, Y, Z) in the on-disk orientation: uint8 for MR, int16 Hounsfield units for CT.
        brainmask: uint8 0/1, same grid.
        label: uint8 lesion mask (all zero for healthy) for test subjects, else None.
        affine: on-disk voxel-to-world matrix (4, 4).
        params: every random draw, for the record.
    """

    spec: SubjectSpec
    image: np.ndarray
    brainmask: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    params: dict = field(default_factory=dict)


def subject_rngs(base_seed: int, uid: int) -> dict[str, np.random.Generator]:
    """Independent generators for each stage of one subject, from (base_seed, uid) alone."""
    stages = ("warp", "contrast", "lesion", "bias", "noise")
    children = np.random.SeedSequence([int(base_seed), int(uid)]).spawn(len(stages))
    return {s: np.random.default_rng(c) for s, c in zip(stages, children)}


def make_subject(
    spec: SubjectSpec,
    template: Template,
    base_seed: int = 0,
    cfg: SimulationConfig = SimulationConfig(),
) -> SubjectVolumes:
    """Generate one subject deterministically from ``(base_seed, spec.uid)``.

    Args:
        spec: which subject (split, name, uid, kind, on-disk axcodes).
        template: from :func:`load_template`.
        base_seed: the cohort seed (``--seed``).
        cfg: simulation ranges.

    Returns:
        The :class:`SubjectVolumes`, ready to write.
    """
    rngs = subject_rngs(base_seed, spec.uid)
    shape = CT_SHAPE if spec.kind == "ct" else MRI_SHAPE
    affine = grid_affine(shape, template.centre_mm)
    warp = random_warp(rngs["warp"], cfg)
    coords = template_coordinates(warp, rngs["warp"], template, affine, shape, cfg)
    anat = sample_anatomy(template, coords, cfg)
    params: dict = {"uid": spec.uid, "kind": spec.kind, "axcodes": "".join(spec.axcodes),
                    "warp": asdict(warp)}
    label = None
    if spec.kind == "ct":
        image, params["ct"] = ct_from_anatomy(anat, rngs["contrast"], cfg)
    else:
        contrast = random_contrast(rngs["contrast"], cfg)
        params["contrast"] = asdict(contrast)
        image = tissue_contrast(anat, contrast)
        if spec.split in LABELLED_SPLITS:
            label = np.zeros(shape, dtype=bool)
        if spec.kind in LESION_PAINTERS:
            ctx = lesion_context(image, anat)
            lesion = LESION_PAINTERS[spec.kind](image, anat, ctx, rngs["lesion"], cfg)
            image, label = lesion.image, lesion.label
            params["lesion"] = lesion.params
        bias, amplitude = random_bias_field(rngs["bias"], shape, anat.brain, cfg)
        snr = float(rngs["noise"].uniform(*cfg.snr))
        params["bias_amplitude"], params["snr"] = round(amplitude, 4), round(snr, 2)
        image = add_rician_noise(image * bias, anat.brain, rngs["noise"], snr)
        image = np.clip(np.rint(image), 0, np.iinfo(MR_DTYPE).max).astype(MR_DTYPE)
    arrays = [image, anat.brain.astype(np.uint8)]
    if label is not None:
        arrays.append(label.astype(np.uint8))
    disk_affine = affine
    if tuple(spec.axcodes) != ("R", "A", "S"):
        reoriented = [reorient(a, affine, spec.axcodes) for a in arrays]
        arrays = [r[0] for r in reoriented]
        disk_affine = reoriented[0][1]
    return SubjectVolumes(
        spec, arrays[0], arrays[1], arrays[2] if label is not None else None, disk_affine, params
    )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name in the same folder, then rename onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, description: str) -> None:
    """Write a gzip NIfTI-1 with qform = sform = ``affine`` (code 1, scanner) and mm units.

    The gzip stream has no timestamp, so the same data always gives the same bytes.
    """
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units(xyz="mm")
    img.set_qform(affine, code=NIFTI_XFORM_SCANNER)
    img.set_sform(affine, code=NIFTI_XFORM_SCANNER)
    img.header["descrip"] = description.encode()[:79]
    write_bytes_atomic(path, gzip.compress(img.to_bytes(), compresslevel=9, mtime=0))


def subject_paths(out_dir: Path, spec: SubjectSpec) -> dict[str, Path]:
    """``image``, ``mask`` and (labelled splits only) ``label`` paths of one subject."""
    base = out_dir / spec.split
    paths = {
        "image": base / "images" / f"{spec.name}.nii.gz",
        "mask": base / "brainmasks" / f"{spec.name}.nii.gz",
    }
    if spec.split in LABELLED_SPLITS:
        paths["label"] = base / "labels" / f"{spec.name}.nii.gz"
    return paths


def write_subject(out_dir: Path, vols: SubjectVolumes) -> None:
    """Write a subject's image, brain mask and (labelled splits) label on one grid and affine."""
    paths = subject_paths(out_dir, vols.spec)
    what = "synthetic CT (HU)" if vols.spec.kind == "ct" else "synthetic T1w"
    write_nifti(paths["image"], vols.image, vols.affine, f"medidiff sample_data {what} from MNI152")
    write_nifti(paths["mask"], vols.brainmask, vols.affine, "medidiff sample_data brain mask")
    if vols.label is not None:
        write_nifti(paths["label"], vols.label, vols.affine, "medidiff sample_data lesion label")


def _rel(out_dir: Path, path: Path) -> str:
    return "./" + path.relative_to(out_dir).as_posix()


def dataset_json(out_dir: Path, specs: list[SubjectSpec], seed: int) -> dict:
    """Medical-Segmentation-Decathlon-style description of the cohort (paths relative)."""
    def entries(split: str) -> list[dict]:
        rows = []
        for s in specs:
            if s.split != split:
                continue
            p = subject_paths(out_dir, s)
            row = {"image": _rel(out_dir, p["image"])}
            if "label" in p:
                row["label"] = _rel(out_dir, p["label"])
            row["mask"] = _rel(out_dir, p["mask"])
            if split in LABELLED_SPLITS:
                row["kind"] = s.kind
            rows.append(row)
        return rows

    training, validation, test, ct = (entries(s) for s in ("train", "val", "test", "ct"))
    validation_lesions, training_lesions = entries("val_lesions"), entries("train_lesions")
    return {
        "name": "medidiff-sample",
        "description": (
            "Small synthetic brain-MRI cohort made from the MNI ICBM152 2009a nonlinear symmetric "
            "T1 template (bundled in nilearn) by random affine + elastic warps, tissue-contrast "
            "variation, bias fields and Rician noise; test, validation_lesions and "
            "training_lesions scans carry synthetic tumour-, MS- and stroke-like lesions with "
            "labels ('validation' is healthy, for threshold calibration; 'validation_lesions' is "
            "for tuning; 'training_lesions' is for mask-conditioned training; 'test' is for "
            "reporting only). Skull-stripped, 2 mm isotropic. The 'ct' entries are SYNTHETIC "
            "CT-like volumes (tissue classes mapped to Hounsfield units plus a synthetic skull), "
            "not real CT. For software tests and demos only; not for clinical or scientific use."
        ),
        "reference": (
            "Fonov et al., NeuroImage 54(1), 2011, doi:10.1016/j.neuroimage.2010.07.033; "
            "Fonov et al., NeuroImage 47 S102, 2009; template via nilearn; built by "
            "pipelines/make_sample_data.py"
        ),
        "licence": (
            "Derived from the MNI ICBM152 2009a template; the template's copyright notice "
            "(Louis Collins, McConnell Brain Imaging Centre, MNI, McGill University) applies and "
            "is reproduced in sample_data/README.md"
        ),
        "release": f"seed {seed}",
        "tensorImageSize": "3D",
        "modality": {"0": "T1w"},
        "labels": {"0": "background", "1": "lesion"},
        "spacing_mm": [SPACING_MM] * 3,
        "shape": list(MRI_SHAPE),
        "numTraining": len(training),
        "numValidation": len(validation),
        "numTest": len(test),
        "numValidationLesions": len(validation_lesions),
        "numTrainingLesions": len(training_lesions),
        "training": training,
        "validation": validation,
        "test": test,
        "validation_lesions": validation_lesions,
        "training_lesions": training_lesions,
        "ct": [dict(r, modality="CT (synthetic)") for r in ct],
        "ct_shape": list(CT_SHAPE),
    }


def write_json(path: Path, obj: dict) -> None:
    """Pretty JSON, atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


# --------------------------------------------------------------------------------------------
# Montage and README
# --------------------------------------------------------------------------------------------


def _load_ras(path: Path) -> np.ndarray:
    return np.asanyarray(nib.as_closest_canonical(nib.load(path)).dataobj)


def make_montage(out_dir: Path, specs: list[SubjectSpec], path: Path) -> None:
    """PNG grid of axial slices read back from disk (reoriented to RAS for display).

    Top row: training subjects and one validation subject (mid slice). Bottom row: one test
    subject per kind, at the slice with the largest lesion area, label contour in red, and a CT
    slice in a brain window (0-80 HU).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {(s.split, s.name): s for s in specs}
    top = [("train", f"sub-{i:03d}") for i in range(4)] + [("val", "sub-100")]
    bottom = [("test", "tumor-001"), ("test", "ms-001"), ("test", "stroke-000"),
              ("test", "healthy-000"), ("ct", "ct-000")]
    fig, axes = plt.subplots(2, 5, figsize=(15, 7.4), facecolor="black")
    for ax, key in zip(axes.ravel(), top + bottom):
        spec = by_name[key]
        paths = subject_paths(out_dir, spec)
        img = _load_ras(paths["image"]).astype(np.float32)
        label = _load_ras(paths["label"]) if "label" in paths else None
        if label is not None and label.any():
            z = int(np.argmax(label.sum(axis=(0, 1))))
        else:
            brain = _load_ras(paths["mask"])
            zs = np.nonzero(brain.any(axis=(0, 1)))[0]
            z = int(zs.min() + 0.6 * (zs.max() - zs.min()))
        sl = img[:, :, z].T
        if spec.kind == "ct":
            ax.imshow(sl, cmap="gray", vmin=0, vmax=80, origin="lower")
        else:
            vmax = np.percentile(img[img > 0], 99.9)
            ax.imshow(sl, cmap="gray", vmin=0, vmax=vmax, origin="lower")
        if label is not None and label.any():
            ax.contour(label[:, :, z].T, levels=[0.5], colors="red", linewidths=0.8, origin="lower")
        ax.set_title(f"{spec.split}/{spec.name} ({''.join(spec.axcodes)} on disk) z={z}",
                     color="white", fontsize=9)
        ax.axis("off")
    fig.suptitle("medidiff sample_data: axial slices, RAS display (patient left on the left)",
                 color="white", fontsize=11)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=72, facecolor="black", metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)


ICBM_NOTICE = (
    "Copyright (C) 1993–2004 Louis Collins, McConnell Brain Imaging Centre, Montreal "
    "Neurological Institute, McGill University. Permission to use, copy, modify, and distribute "
    "this software and its documentation for any purpose and without fee is hereby granted, "
    "provided that the above copyright notice appear in all copies. The authors and McGill "
    "University make no representations about the suitability of this software for any purpose. "
    "It is provided \"as is\" without express or implied warranty. The authors are not "
    "responsible for any data loss, equipment damage, property loss, or injury to subjects or "
    "patients resulting from the use or misuse of this software package."
)


def _case_table(subjects: list[SubjectVolumes], split: str = "test") -> str:
    """Markdown rows of one labelled split: case, kind, on-disk orientation, lesion volume."""
    voxel_ml = SPACING_MM**3 / 1000.0
    rows = []
    for v in subjects:
        if v.spec.split == split:
            volume = float(v.label.sum()) * voxel_ml
            rows.append(
                f"| `{v.spec.name}` | {v.spec.kind} | {''.join(v.spec.axcodes)} | {volume:.1f} |"
            )
    return "\n".join(rows)


def readme_text(
    specs: list[SubjectSpec], subjects: list[SubjectVolumes], seed: int, cfg: SimulationConfig
) -> str:
    """The ``sample_data/README.md`` text (parameter table generated from ``cfg``)."""
    n = {
        split: sum(s.split == split for s in specs)
        for split in ("train", "val", "test", "ct", "val_lesions", "train_lesions")
    }
    per_kind = {
        split: sum(s.split == split and s.kind == LESION_KINDS[0] for s in specs)
        for split in ("val_lesions", "train_lesions")
    }
    odd = ", ".join(
        f"`{s.split}/{s.name}` ({''.join(s.axcodes)})"
        for s in specs
        if tuple(s.axcodes) != ("R", "A", "S")
    )
    rows = "\n".join(
        f"| `{f.name}` | {getattr(cfg, f.name)} | {f.metadata['doc']} |" for f in fields(cfg)
    )
    test_rows = _case_table(subjects, "test")
    val_lesion_rows = _case_table(subjects, "val_lesions")
    train_lesion_rows = _case_table(subjects, "train_lesions")
    return f"""# medidiff sample data

A small **synthetic** brain-MRI cohort for medidiff's tests, demo and tutorials: {n['train']}
healthy training scans, {n['val']} healthy validation scans, {n['test']} test scans (4 tumour-like,
4 MS-like, 4 stroke-like, 4 healthy, with lesion labels), {n['val_lesions']} labelled validation
lesion scans ({per_kind['val_lesions']} per lesion kind), {n['train_lesions']} labelled training lesion scans
({per_kind['train_lesions']} per lesion kind) and {n['ct']} CT-like volumes.
Every scan is the same real anatomy — the MNI ICBM152 template — warped, re-contrasted and
noised differently, so it is realistic enough to train a small model on and free to ship.
It is **not** patient data and **not** for clinical or scientific conclusions.

![montage](montage.png)

## Provenance

- Source: the **MNI ICBM152 2009a nonlinear symmetric** T1 template and its grey- and
  white-matter probability maps (1 mm, 197 x 233 x 189, skull-stripped, 0-255), as bundled
  inside the nilearn wheel (`nilearn/datasets/data/mni_icbm152_{{t1,gm,wm}}_tal_nlin_sym_09a_converted.nii.gz`).
  Nothing is downloaded.
- Template references: V.S. Fonov, A.C. Evans, K. Botteron, C.R. Almli, R.C. McKinstry,
  D.L. Collins and BDCG, *Unbiased average age-appropriate atlases for pediatric studies*,
  NeuroImage 54(1), 2011, doi:10.1016/j.neuroimage.2010.07.033; V.S. Fonov, A.C. Evans,
  R.C. McKinstry, C.R. Almli and D.L. Collins, *Unbiased nonlinear average age-appropriate brain
  templates from birth to adulthood*, NeuroImage 47 (Suppl. 1), S102, 2009.
- Built by `pipelines/make_sample_data.py` with seed {seed}.

  nilearn's documentation calls its bundled template the 2009a *asymmetric* release; the
  bundled file names say `sym` (symmetric). These volumes are whatever nilearn ships.

### The template's copyright notice

The following is the copyright notice of the MNI ICBM152 template (not of medidiff), as the
McConnell Brain Imaging Centre publishes it with the ICBM 2009 templates; it applies to these
derived volumes:

> {ICBM_NOTICE}

## Rebuild

```
make sample-data
# or
python pipelines/make_sample_data.py --out sample_data --seed 0
```

The build is deterministic: each subject has its own random generator seeded from
`(seed, subject uid)`, so any one subject can be regenerated alone
(`make_subject(spec, load_template(), seed)`); `tests/test_sample_data.py` does that.

## Splits and what each is for

| split (`dataset.json` key) | scans | use it for |
| --- | --- | --- |
| `train` (`training`) | {n['train']} healthy | training the healthy (unconditional) models |
| `val` (`validation`) | {n['val']} healthy | calibrating anomaly thresholds on healthy scans (voxel FPR, false-positive volume) |
| `val_lesions` (`validation_lesions`) | {n['val_lesions']} labelled: {per_kind['val_lesions']} tumour, {per_kind['val_lesions']} MS, {per_kind['val_lesions']} stroke | **tuning** anomaly settings (noise level, steps, post-processing, method choice) and reporting validation numbers |
| `train_lesions` (`training_lesions`) | {n['train_lesions']} labelled: {per_kind['train_lesions']} tumour, {per_kind['train_lesions']} MS, {per_kind['train_lesions']} stroke | mask-conditioned training (image + lesion mask pairs) |
| `test` (`test`) | {n['test']} labelled: 4 tumour, 4 MS, 4 stroke, 4 healthy | **reporting only**: never tune or train on it |
| `ct` (`ct`) | {n['ct']} synthetic CT-like | CT code paths (HU, no skull-stripping) |

Every subject has its own uid (its random streams), so no two splits share a subject; the
lesion splits use the same lesion simulators and ranges as the test split.

## Layout

| path | what it is |
| --- | --- |
| `train/images/sub-000.nii.gz` ... `sub-{n['train'] - 1:03d}` | healthy T1w, uint8 (white matter ~140), skull-stripped (background exactly 0) |
| `train/brainmasks/<same name>` | brain mask, uint8 0/1, same grid and affine as the image |
| `val/images/sub-100.nii.gz` ... `sub-{100 + n['val'] - 1:03d}` | healthy T1w for validation/threshold calibration |
| `val/brainmasks/<same name>` | brain masks |
| `test/images/<kind>-NNN.nii.gz` | T1w with a synthetic lesion (`tumor`, `ms`, `stroke`) or none (`healthy`) |
| `test/labels/<same name>` | lesion mask, uint8 0/1 (all zero for `healthy-*`) |
| `test/brainmasks/<same name>` | brain masks |
| `val_lesions/images/<kind>-1NN.nii.gz` | T1w with a synthetic lesion (`tumor`, `ms`, `stroke`), `<kind>-100` ... `<kind>-{100 + per_kind['val_lesions'] - 1:03d}` |
| `val_lesions/labels/<same name>`, `val_lesions/brainmasks/<same name>` | lesion masks (uint8 0/1) and brain masks |
| `train_lesions/images/<kind>-2NN.nii.gz` | T1w with a synthetic lesion, `<kind>-200` ... `<kind>-{200 + per_kind['train_lesions'] - 1:03d}` |
| `train_lesions/labels/<same name>`, `train_lesions/brainmasks/<same name>` | lesion masks (uint8 0/1) and brain masks |
| `ct/images/ct-NNN.nii.gz` | **synthetic** CT-like volumes in HU (int16), NOT skull-stripped, air = -1000 |
| `ct/brainmasks/<same name>` | brain masks of the CT volumes |
| `dataset.json` | Decathlon-style index: `training`, `validation`, `test`, `validation_lesions`, `training_lesions` (the last three with `label` and `kind`), `ct`; counters `numTraining`, `numValidation`, `numTest`, `numValidationLesions`, `numTrainingLesions`; paths relative to this folder |
| `simulation_parameters.json` | every random draw of every subject (warp, gains, lesion geometry, bias, SNR) |
| `montage.png` | axial slices (above) |

Geometry: MRI grid {MRI_SHAPE[0]} x {MRI_SHAPE[1]} x {MRI_SHAPE[2]}, CT grid {CT_SHAPE[0]} x {CT_SHAPE[1]} x {CT_SHAPE[2]}, {SPACING_MM:g} mm isotropic, gzip NIfTI-1
with qform and sform (code 1, scanner) set. Most files are stored RAS; to exercise geometry
handling {odd} are stored in another on-disk orientation with the matching affine — the same
anatomy in world space. Their masks and labels share their grid and affine exactly.

## How a subject is made

1. **Warp.** A random affine (rotation, per-axis scaling, translation about the template brain
   centre) and a smooth random elastic displacement are composed into one coordinate map that
   samples the 1 mm template trilinearly straight onto the 2 mm grid.
2. **Brain mask.** Deformed T1 above {cfg.brain_threshold * 255:.0f}/255, holes filled, largest component.
3. **Tissue contrast.** The template T1 is multiplied by `1 + sum_k (g_k - 1) p_k`, with p_k the
   deformed GM/WM/CSF probabilities (CSF = brain - GM - WM) and per-subject gains g_k;
   1.0 on the template scale = {INTENSITY_SCALE:g} output units.
4. **Lesion** (test, val_lesions and train_lesions; before bias and noise; label always inside
   the brain mask):
   - *tumour*: lumpy sphere (noise-perturbed radius) in hemispheric white matter: necrotic core
     (strongly hypointense), enhancing rim (hyperintense ring), oedema reaching further into
     white matter (mildly hypointense); label = core + rim + oedema.
   - *MS*: 4-10 small randomly rotated ellipsoids in white matter 2-10 mm from the lateral
     ventricles, hyperintense; label = their union.
   - *stroke*: a wedge (cone) from a cortical surface point inwards, blurred edges, grey and
     white matter pulled to a hypointense level; label = blurred wedge >= 0.5.
5. **Bias field** (smooth, multiplicative) and **Rician noise** (sigma = mean brain
   intensity / SNR); background set back to exactly 0; rounded and stored as uint8 (white
   matter near 140, so the noise, sigma 3-5, is far above the quantisation step).
6. **CT** (synthetic): GM/WM/CSF mapped to HU, then outward from the brain a CSF gap, a skull
   shell (dense tables around a lighter diploe), scalp, and air at -1000; Gaussian noise in the
   head.

## Test cases

| case | kind | on-disk orientation | lesion volume (ml) |
| --- | --- | --- | --- |
{test_rows}

## Validation lesion cases (`val_lesions`)

| case | kind | on-disk orientation | lesion volume (ml) |
| --- | --- | --- | --- |
{val_lesion_rows}

## Training lesion cases (`train_lesions`)

| case | kind | on-disk orientation | lesion volume (ml) |
| --- | --- | --- | --- |
{train_lesion_rows}

## Simulation parameters

`SimulationConfig` defaults in `pipelines/make_sample_data.py`; pairs are uniform ranges,
"x WM level" means a multiple of the subject's median pure-white-matter intensity.

| parameter | value | meaning |
| --- | --- | --- |
{rows}
"""


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def build_cohort(
    out_dir: Path, seed: int, cfg: SimulationConfig = SimulationConfig()
) -> list[SubjectVolumes]:
    """Generate and write the whole cohort, ``dataset.json``, README and montage.

    Args:
        out_dir: output folder (created).
        seed: base seed.
        cfg: simulation ranges.

    Returns:
        The generated subjects (for inspection).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    template = load_template()
    specs = cohort_specs()
    subjects, params = [], {}
    for i, spec in enumerate(specs, 1):
        t0 = time.perf_counter()
        vols = make_subject(spec, template, seed, cfg)
        write_subject(out_dir, vols)
        subjects.append(vols)
        params[f"{spec.split}/{spec.name}"] = vols.params
        print(f"[{i:2d}/{len(specs)}] {spec.split}/{spec.name} ({time.perf_counter() - t0:.1f} s)",
              flush=True)
    write_json(out_dir / "dataset.json", dataset_json(out_dir, specs, seed))
    write_json(out_dir / "simulation_parameters.json", {"seed": seed, "subjects": params})
    readme = readme_text(specs, subjects, seed, cfg)
    write_bytes_atomic(out_dir / "README.md", readme.encode())
    make_montage(out_dir, specs, out_dir / "montage.png")
    return subjects


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("sample_data"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    build_cohort(args.out, args.seed)
    print(f"wrote sample cohort to {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

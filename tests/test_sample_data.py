"""Checks on the committed sample cohort ``sample_data/`` and its builder.

The fast tests only read the committed files. The slow test regenerates single subjects with
``pipelines/make_sample_data.py`` and compares them with the committed files voxel for voxel.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
SCRIPT = ROOT / "pipelines" / "make_sample_data.py"
LESION_KINDS = ("tumor", "ms", "stroke")
SPLIT_DIRS = ("train", "val", "test", "ct", "val_lesions", "train_lesions")
LABELLED_DIRS = ("test", "val_lesions", "train_lesions")
# the lesion splits outside test: folder -> (dataset.json key, counter, scans per lesion kind)
LESION_SPLITS = {
    "val_lesions": ("validation_lesions", "numValidationLesions", 4),
    "train_lesions": ("training_lesions", "numTrainingLesions", 8),
}

@lru_cache(maxsize=None)
def dataset() -> dict:
    return json.loads((SAMPLE / "dataset.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def load(rel: str) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) of a file under sample_data/, as stored on disk."""
    img = nib.load(SAMPLE / rel)
    return np.asanyarray(img.dataobj), img.affine


def stems(split: str, sub: str = "images") -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (SAMPLE / split / sub).glob("*.nii.gz"))


def all_cases() -> list[tuple[str, str]]:
    return [(split, name) for split in SPLIT_DIRS for name in stems(split)]


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World (mm) centre of mass of a binary mask."""
    ijk = np.argwhere(mask > 0).mean(0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


@lru_cache(maxsize=None)
def load_script():
    """Import pipelines/make_sample_data.py (not a package) as a module."""
    spec = importlib.util.spec_from_file_location("make_sample_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=None)
def template():
    """The bundled MNI template, loaded once for all slow tests."""
    return load_script().load_template()


# ------------------------------------------------------------------------------- counts, json


def test_counts_per_split_and_kind():
    assert len(stems("train")) >= 24
    assert len(stems("val")) >= 6
    test_names = stems("test")
    for kind in (*LESION_KINDS, "healthy"):
        assert sum(n.startswith(f"{kind}-") for n in test_names) >= 4, kind
    assert len(test_names) >= 16
    assert len(stems("ct")) == 3
    for split in SPLIT_DIRS:
        assert stems(split, "brainmasks") == stems(split), split
    for split in LABELLED_DIRS:
        assert stems(split, "labels") == stems(split), split
    for split, (_, _, per_kind) in LESION_SPLITS.items():
        names = stems(split)
        for kind in LESION_KINDS:
            assert sum(n.startswith(f"{kind}-") for n in names) == per_kind, (split, kind)
        assert len(names) == per_kind * len(LESION_KINDS), split  # no healthy scans here


def test_dataset_json_paths_exist_and_counts_match():
    d = dataset()
    for key in ("name", "description", "reference", "licence"):
        assert d[key], key
    assert d["tensorImageSize"] == "3D"
    assert d["modality"] == {"0": "T1w"}
    assert d["labels"] == {"0": "background", "1": "lesion"}
    assert d["numTraining"] == len(d["training"]) == len(stems("train"))
    assert d["numTest"] == len(d["test"]) == len(stems("test"))
    assert len(d["validation"]) == len(stems("val"))
    assert len(d["ct"]) == len(stems("ct"))
    for split, (key, counter, _) in LESION_SPLITS.items():
        assert d[counter] == len(d[key]) == len(stems(split)), key
    lesion_keys = [key for key, _, _ in LESION_SPLITS.values()]
    for section in ("training", "validation", "test", "ct", *lesion_keys):
        for entry in d[section]:
            for key in ("image", "mask", "label"):
                if key in entry:
                    assert entry[key].startswith("./"), entry[key]
                    assert (SAMPLE / entry[key]).is_file(), entry[key]
    for entry in d["test"]:
        assert set(entry) >= {"image", "label", "mask", "kind"}
        assert entry["kind"] in (*LESION_KINDS, "healthy")
        assert Path(entry["image"]).name.startswith(entry["kind"] + "-")
        assert Path(entry["image"]).name == Path(entry["label"]).name
    for split, (key, _, _) in LESION_SPLITS.items():
        for entry in d[key]:
            assert set(entry) >= {"image", "label", "mask", "kind"}
            assert entry["kind"] in LESION_KINDS
            for field in ("image", "label", "mask"):
                assert entry[field].startswith(f"./{split}/"), entry[field]
            assert Path(entry["image"]).name.startswith(entry["kind"] + "-")
            assert Path(entry["image"]).name == Path(entry["label"]).name
    # the healthy calibration scans stay healthy and unlabelled
    assert all("label" not in e and "kind" not in e for e in d["validation"])
    assert "synthetic" in json.dumps(d["ct"]).lower()


def test_readme_and_montage_present():
    text = (SAMPLE / "README.md").read_text(encoding="utf-8")
    assert "montage.png" in text
    assert "Louis Collins" in text and "McGill University" in text
    assert "make_sample_data.py" in text
    assert (SAMPLE / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_total_size_under_25_mb():
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total < 25 * 1024 * 1024, f"{total / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("split,name", all_cases())
def test_image_mask_label_share_grid(split, name):
    img = nib.load(SAMPLE / split / "images" / f"{name}.nii.gz")
    others = [SAMPLE / split / "brainmasks" / f"{name}.nii.gz"]
    if split in LABELLED_DIRS:
        others.append(SAMPLE / split / "labels" / f"{name}.nii.gz")
    assert img.header["qform_code"] > 0 and img.header["sform_code"] > 0
    np.testing.assert_allclose(img.header.get_zooms(), (2.0, 2.0, 2.0))
    assert img.ndim == 3
    for path in others:
        other = nib.load(path)
        assert other.shape == img.shape, path
        np.testing.assert_array_equal(other.affine, img.affine)
        np.testing.assert_array_equal(other.header.get_qform(), img.header.get_qform())
        assert other.get_data_dtype() == np.uint8, path


@pytest.mark.parametrize("split,name", all_cases())
def test_masks_binary_nonempty_and_images_finite(split, name):
    image, _ = load(f"{split}/images/{name}.nii.gz")
    mask, _ = load(f"{split}/brainmasks/{name}.nii.gz")
    assert set(np.unique(mask)) == {0, 1}
    # a real brain at 2 mm: 1.0-2.5 litres
    assert 1.0e6 / 8 < mask.sum() < 2.5e6 / 8
    # the brain must not touch the grid border (it was cropped with a margin)
    for axis in range(3):
        assert not mask.take([0, -1], axis=axis).any(), axis
    assert np.isfinite(image.astype(np.float64)).all()
    if split == "ct":
        assert image.dtype == np.int16
        assert image[0, 0, 0] == -1000 and image[-1, -1, -1] == -1000
        assert 15 < np.median(image[mask > 0]) < 50  # brain tissue in HU
        assert (image > 600).sum() > 10_000  # a skull
    else:
        assert image.min() == 0
        assert (image[mask == 0] == 0).all()  # skull-stripped: background exactly 0
        assert np.median(image[mask > 0]) > 50


def test_same_world_grid_and_non_ras_files():
    """Non-RAS files are really stored non-RAS and sit where the RAS files sit in world space."""
    reference_affine = None
    non_ras = {"train": [], "test": []}
    centres = {"ras": [], "other": []}
    for split in ("train", "val", "test", "val_lesions", "train_lesions"):
        for name in stems(split):
            mask, affine = load(f"{split}/brainmasks/{name}.nii.gz")
            codes = nib.aff2axcodes(affine)
            canonical = nib.as_closest_canonical(nib.Nifti1Image(mask, affine))
            if reference_affine is None:
                reference_affine = canonical.affine
            # every MR subject, whatever its on-disk orientation, lives on one RAS world grid
            np.testing.assert_allclose(canonical.affine, reference_affine, atol=1e-4)
            kind = "ras" if codes == ("R", "A", "S") else "other"
            centres[kind].append(world_centroid(mask, affine))
            if kind == "other" and split in non_ras:
                non_ras[split].append(name)
    assert len(non_ras["train"]) >= 2 and len(non_ras["test"]) >= 2, non_ras
    ras_centre = np.mean(centres["ras"], axis=0)
    for c in centres["other"]:
        assert np.linalg.norm(c - ras_centre) < 20.0  # mm


# ------------------------------------------------------------------------------- lesions


def test_test_labels_nonempty_for_lesions_empty_for_healthy():
    for name in stems("test"):
        label, _ = load(f"test/labels/{name}.nii.gz")
        mask, _ = load(f"test/brainmasks/{name}.nii.gz")
        assert set(np.unique(label)) <= {0, 1}
        if name.startswith("healthy-"):
            assert not label.any(), name
        else:
            assert label.sum() >= 20, name
            inside = np.logical_and(label > 0, mask > 0).sum() / label.sum()
            assert inside >= 0.95, (name, inside)


@pytest.mark.parametrize("split", sorted(LESION_SPLITS))
def test_lesion_split_labels_nonempty_and_inside_brain(split):
    for name in stems(split):
        label, _ = load(f"{split}/labels/{name}.nii.gz")
        mask, _ = load(f"{split}/brainmasks/{name}.nii.gz")
        assert set(np.unique(label)) == {0, 1}, name
        assert label.sum() >= 20, name
        inside = np.logical_and(label > 0, mask > 0).sum() / label.sum()
        assert inside >= 0.95, (name, inside)


def test_lesion_splits_disjoint_from_every_other_subject():
    """No subject (uid, i.e. random streams) and no file stem is shared between splits."""
    recorded = json.loads((SAMPLE / "simulation_parameters.json").read_text(encoding="utf-8"))
    uids: dict[str, set[int]] = {}
    for key, params in recorded["subjects"].items():
        uids.setdefault(key.split("/")[0], set()).add(int(params["uid"]))
    assert set(uids) == set(SPLIT_DIRS)
    assert sum(map(len, uids.values())) == len(recorded["subjects"])  # uids unique overall
    for split in LESION_SPLITS:
        assert len(uids[split]) == len(stems(split)), split
        for other in SPLIT_DIRS:
            if other != split:
                assert not uids[split] & uids[other], (split, other)
                assert not set(stems(split)) & set(stems(other)), (split, other)


@pytest.mark.parametrize("split", ["test", *sorted(LESION_SPLITS)])
@pytest.mark.parametrize("kind,sign", [("tumor", -1.0), ("stroke", -1.0), ("ms", 1.0)])
def test_lesions_differ_from_surrounding_brain(kind, sign, split):
    """Tumours and strokes are hypointense on average, MS lesions hyperintense: each scan by
    >= 5 % against a 3-voxel ring around its label, the median scan of a split by >= 10 %.

    A small tumour's bright enhancing rim is a larger share of its label, so its mean sits
    closer to its surroundings (a 25 ml training tumour: -7 %) though its core is dark.
    """
    names = [n for n in stems(split) if n.startswith(f"{kind}-")]
    contrasts = []
    assert names
    for name in names:
        image, _ = load(f"{split}/images/{name}.nii.gz")
        label, _ = load(f"{split}/labels/{name}.nii.gz")
        mask, _ = load(f"{split}/brainmasks/{name}.nii.gz")
        lesion = label > 0
        ring = ndi.binary_dilation(lesion, iterations=3) & ~lesion & (mask > 0)
        relative = image[lesion].mean() / image[ring].mean() - 1.0
        assert sign * relative >= 0.05, (name, relative)
        contrasts.append(sign * relative)
    assert np.median(contrasts) >= 0.10, (split, kind, contrasts)


def test_healthy_test_scans_have_no_outlying_region():
    """Healthy test scans look like training scans: same intensity level inside the brain."""
    train = []
    for name in stems("train"):
        image, _ = load(f"train/images/{name}.nii.gz")
        mask, _ = load(f"train/brainmasks/{name}.nii.gz")
        train.append(np.median(image[mask > 0]))
    for name in (n for n in stems("test") if n.startswith("healthy-")):
        image, _ = load(f"test/images/{name}.nii.gz")
        mask, _ = load(f"test/brainmasks/{name}.nii.gz")
        assert min(train) * 0.9 <= np.median(image[mask > 0]) <= max(train) * 1.1


# ------------------------------------------------------------------------------- builder


def test_cohort_specs_match_committed_files():
    module = load_script()
    specs = module.cohort_specs()
    assert sorted((s.split, s.name) for s in specs) == sorted(all_cases())
    assert len({s.uid for s in specs}) == len(specs)  # one seed stream per subject
    for s in specs:
        if s.split in LABELLED_DIRS:
            assert s.name.startswith(s.kind + "-")


@pytest.mark.slow
@pytest.mark.parametrize(
    "split,name",
    [
        ("train", "sub-001"),
        ("test", "tumor-001"),
        ("test", "stroke-000"),
        ("ct", "ct-000"),
        ("val_lesions", "ms-100"),
        ("train_lesions", "stroke-205"),
    ],
)
def test_regenerating_one_subject_matches_committed(split, name, tmp_path):
    """The builder is deterministic per subject, including the non-RAS reorientation."""
    module = load_script()
    spec = next(s for s in module.cohort_specs() if (s.split, s.name) == (split, name))
    vols = module.make_subject(spec, template(), base_seed=0)
    module.write_subject(tmp_path, vols)
    for sub in ("images", "brainmasks") + (("labels",) if split in LABELLED_DIRS else ()):
        committed = nib.load(SAMPLE / split / sub / f"{name}.nii.gz")
        fresh = nib.load(tmp_path / split / sub / f"{name}.nii.gz")
        np.testing.assert_array_equal(
            np.asanyarray(fresh.dataobj), np.asanyarray(committed.dataobj)
        )
        np.testing.assert_allclose(fresh.affine, committed.affine, atol=1e-6)
        assert fresh.get_data_dtype() == committed.get_data_dtype()


@pytest.mark.slow
def test_non_ras_subject_is_the_ras_subject_reoriented():
    """Rebuilding a non-RAS subject as RAS gives what nibabel's canonical reorientation of the
    committed file gives (an independent check of the builder's reorientation)."""
    module = load_script()
    spec = next(s for s in module.cohort_specs() if (s.split, s.name) == ("train", "sub-002"))
    assert tuple(spec.axcodes) != ("R", "A", "S")
    ras = module.make_subject(dataclasses.replace(spec, axcodes=("R", "A", "S")), template(), 0)
    committed = nib.as_closest_canonical(nib.load(SAMPLE / "train/images/sub-002.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(committed.dataobj), ras.image)
    np.testing.assert_allclose(committed.affine, ras.affine, atol=1e-4)

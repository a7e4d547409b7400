"""Tests of medidiff.data.datalist and medidiff.data.datasets: datalists and cached slice/volume datasets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import medidiff.data.datasets as data_mod
from medidiff.data.datalist import DatalistEntry, class_names_of, load_datalist, volume_files
from medidiff.data.datasets import (
    Preprocessing,
    SliceDataset,
    VolumeDataset,
    build_dataset,
    prepare_entry,
)
from medidiff.errors import ConfigError, DataError, VolumeContentError
from medidiff.io import Volume, save_volume

REPO = Path(__file__).resolve().parents[1]
GRID = (16, 16, 12)  # the tiny model grid used here
CFG = Preprocessing(shape=GRID)


def brain_like(seed: int = 0) -> np.ndarray:
    """(16, 16, 12) volume: foreground in z 3..8 (6 slices), a speck in z 9, rest empty."""
    rng = np.random.default_rng(seed)
    arr = np.zeros(GRID, np.float32)
    arr[2:14, 2:14, 3:9] = rng.uniform(10, 100, size=(12, 12, 6))
    arr[8, 8, 9] = 50.0  # 1/256 of a slice: below min_foreground=0.1
    return arr


def write_case(folder: Path, name: str, *, seed: int = 0, lps: bool = False, mask: np.ndarray | None = None):
    affine = np.diag([-2.0, -2.0, 2.0, 1.0]) if lps else np.diag([2.0, 2.0, 2.0, 1.0])
    arr = brain_like(seed)
    if lps:  # store flipped so the RAS content is the same as the RAS cases
        arr = arr[::-1, ::-1].copy()
    image = save_volume(Volume(arr, affine), folder / f"{name}.nii.gz")
    mask_path = None
    if mask is not None:
        mask_path = save_volume(Volume(mask.astype(np.uint8), affine), folder / f"{name}_mask.nii.gz")
    return image, mask_path


@pytest.fixture
def cohort(tmp_path: Path) -> list[DatalistEntry]:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        write_case(folder, f"sub-{i}", seed=i, lps=(i == 1))
    return load_datalist(folder)


# ----------------------------------------------------------------------------------------
# datalists
# ----------------------------------------------------------------------------------------


def test_folder_lists_sorted_volume_files_only(tmp_path):
    for name in ("b", "a", "c"):
        write_case(tmp_path, name)
    (tmp_path / "notes.txt").write_text("not a volume")
    (tmp_path / ".a.nii.gz.tmp.nii.gz").write_bytes(b"partial")  # an atomic-write leftover
    (tmp_path / "sub").mkdir()
    entries = load_datalist(tmp_path)
    assert [e.name for e in entries] == ["a", "b", "c"]
    assert all(e.mask is None and e.segmentation is None and e.class_label is None for e in entries)


def test_empty_folder_points_to_its_datalist(tmp_path):
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(DataError, match="dataset.json"):
        load_datalist(tmp_path)


def test_glob_pattern(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "images").mkdir(parents=True)
        write_case(tmp_path / split / "images", f"{split}-0")
    (tmp_path / "train" / "images" / "x.txt").write_text("")
    entries = load_datalist(str(tmp_path / "*" / "images" / "*"))
    assert [e.name for e in entries] == ["train-0", "val-0"]
    assert len(load_datalist(str(tmp_path / "**" / "*.nii.gz"))) == 2
    with pytest.raises(DataError, match="matched no volume files"):
        load_datalist(str(tmp_path / "*" / "*.nrrd"))


def test_csv_columns_and_relative_paths(tmp_path):
    (tmp_path / "images").mkdir()
    image, mask = write_case(tmp_path / "images", "s1", mask=np.ones(GRID))
    write_case(tmp_path / "images", "s2")
    csv_path = tmp_path / "lists" / "train.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(
        "image,mask,label,segmentation,site\n"
        "../images/s1.nii.gz,../images/s1_mask.nii.gz,T1,,A\n"
        f"{tmp_path / 'images' / 's2.nii.gz'},,T2,../images/s1_mask.nii.gz,\n"
    )
    entries = load_datalist(csv_path)
    assert entries[0].image == image and entries[0].mask == mask
    assert entries[0].class_label == "T1" and entries[0].segmentation is None
    assert entries[0].extra == {"site": "A"}
    assert entries[1].mask is None and entries[1].segmentation == mask and entries[1].class_label == "T2"
    assert entries[1].extra == {}


def test_csv_errors(tmp_path):
    write_case(tmp_path, "s1")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\ns1.nii.gz,A\n")
    with pytest.raises(DataError, match=r"no 'image' column \(found: path, label\)"):
        load_datalist(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("image,mask\n" + "".join(f"gone{i}.nii.gz,s1.nii.gz\n" for i in range(5)))
    with pytest.raises(DataError, match=r"5 listed file\(s\) do not exist: .*gone0.nii.gz.*gone2.nii.gz and 2 more"):
        load_datalist(missing)
    empty = tmp_path / "empty.csv"
    empty.write_text("image,label\n")
    with pytest.raises(DataError, match="no rows"):
        load_datalist(empty)


def test_csv_split_column(tmp_path):
    write_case(tmp_path, "s1")
    write_case(tmp_path, "s2")
    path = tmp_path / "all.csv"
    path.write_text("image,split\ns1.nii.gz,train\ns2.nii.gz,val\n")
    assert [e.name for e in load_datalist(path, split="val")] == ["s2"]
    assert len(load_datalist(path)) == 2
    with pytest.raises(DataError, match="available: train, val"):
        load_datalist(path, split="test")


def test_decathlon_json(tmp_path):
    for sub in ("imagesTr", "imagesTs", "labelsTs", "masks"):
        (tmp_path / sub).mkdir()
    write_case(tmp_path / "imagesTr", "tr0", mask=np.ones(GRID))
    write_case(tmp_path / "imagesTs", "ts0", mask=np.ones(GRID))
    write_case(tmp_path / "labelsTs", "ts0")
    write_case(tmp_path / "imagesTr", "tr1")
    spec = {
        "name": "tiny",
        "labels": {"0": "background", "1": "lesion"},
        "training": [
            {"image": "./imagesTr/tr0.nii.gz", "mask": "./imagesTr/tr0_mask.nii.gz"},
            "./imagesTr/tr1.nii.gz",
        ],
        "validation": [{"image": "./imagesTr/tr1.nii.gz", "label": 2}],
        "test": [{"image": "./imagesTs/ts0.nii.gz", "label": "./labelsTs/ts0.nii.gz",
                  "mask": "./imagesTs/ts0_mask.nii.gz", "kind": "tumour"}],
    }
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(spec))
    train = load_datalist(path)  # default split: training
    assert [e.name for e in train] == ["tr0", "tr1"]
    assert train[0].mask == tmp_path / "imagesTr" / "tr0_mask.nii.gz"
    (val,) = load_datalist(path, split="validation")
    assert val.class_label == "2" and val.segmentation is None  # a numeric label is a class
    (test,) = load_datalist(path, split="test")
    assert test.segmentation == tmp_path / "labelsTs" / "ts0.nii.gz"  # a path label is a segmentation
    assert test.extra == {"kind": "tumour"}
    with pytest.raises(DataError, match="available splits: training, validation, test"):
        load_datalist(path, split="testing")
    # base_dir overrides the JSON's folder
    moved = tmp_path / "elsewhere" / "dataset.json"
    moved.parent.mkdir()
    moved.write_text(json.dumps(spec))
    assert load_datalist(moved, split="test", base_dir=tmp_path)[0].image == test.image
    with pytest.raises(DataError, match="do not exist"):
        load_datalist(moved, split="test")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_datalist(broken)


def test_list_of_sources_and_explicit_files(tmp_path):
    image, _ = write_case(tmp_path, "one")
    (tmp_path / "more").mkdir()
    write_case(tmp_path / "more", "two")
    write_case(tmp_path / "more", "three")
    entries = load_datalist([image, tmp_path / "more"])
    assert [e.name for e in entries] == ["one", "three", "two"]
    with pytest.raises(DataError, match="no such file or folder"):
        load_datalist([image, tmp_path / "nope.nii.gz"])
    with pytest.raises(DataError, match="no inputs"):
        load_datalist([])
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(DataError, match="not a volume file"):
        load_datalist(tmp_path / "x.txt")


def test_class_names_of():
    mk = lambda label: DatalistEntry(Path("x.nii.gz"), class_label=label)  # noqa: E731
    assert class_names_of([mk("10"), mk("2"), mk("2"), mk("1")]) == ["1", "2", "10"]
    assert class_names_of([mk("T2"), mk("FLAIR"), mk("T1")]) == ["FLAIR", "T1", "T2"]
    with pytest.raises(DataError, match="no class label"):
        class_names_of([mk("T1"), mk(None)])


# ----------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------


def test_slice_dataset_skips_empty_slices(cohort):
    ds = SliceDataset(cohort, CFG)
    assert len(ds) == 3 * 6  # 6 foreground slices per volume; empty ones and the speck skipped
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
        assert (item["image"] > 0).float().mean() >= 0.1
    assert len(SliceDataset(cohort, CFG, min_foreground=0.0)) == 3 * 12
    assert sorted({ds[i]["slice"] for i in range(len(ds))}) == [3, 4, 5, 6, 7, 8]


def test_lps_and_ras_copies_give_identical_slices(tmp_path):
    ras, _ = write_case(tmp_path, "ras", seed=5)
    lps, _ = write_case(tmp_path, "lps", seed=5, lps=True)
    a = SliceDataset(load_datalist(ras), CFG)
    b = SliceDataset(load_datalist(lps), CFG)
    assert len(a) == len(b) == 6
    for i in range(len(a)):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["slice"] == b[i]["slice"]


def test_slice_selection_follows_the_mask(tmp_path):
    mask = np.zeros(GRID)
    mask[2:14, 2:14, 4:6] = 1
    image, mask_path = write_case(tmp_path, "m", mask=mask)
    ds = SliceDataset([DatalistEntry(image, mask=mask_path)], CFG)
    assert len(ds) == 2


def test_volume_dataset_whole_and_patches(cohort):
    whole = VolumeDataset(cohort, CFG)
    assert len(whole) == 3 and whole[0]["image"].shape == (1, *GRID)
    patches = VolumeDataset(cohort, CFG, patch_size=(8, 8, 6), seed=3)
    first = patches[1]
    assert first["image"].shape == (1, 8, 8, 6)
    s = first["patch_start"].tolist()
    full = whole[1]["image"]
    assert torch.equal(first["image"], full[:, s[0]:s[0] + 8, s[1]:s[1] + 8, s[2]:s[2] + 6])
    again = VolumeDataset(cohort, CFG, patch_size=(8, 8, 6), seed=3)
    assert torch.equal(again[1]["image"], first["image"])  # same seed: same patch sequence
    starts = set()
    for epoch in range(6):
        patches.set_epoch(epoch)
        starts.add(tuple(patches[1]["patch_start"].tolist()))
    assert len(starts) > 1  # new patches each epoch
    patches.set_epoch(2)
    a = patches[1]["patch_start"].tolist()
    b = patches[1]["patch_start"].tolist()  # a second draw in the same epoch
    patches.set_epoch(2)
    assert patches[1]["patch_start"].tolist() == a  # set_epoch makes epochs reproducible
    assert len({tuple(patches[1]["patch_start"].tolist()) for _ in range(8)} | {tuple(b)}) > 1
    with pytest.raises(ConfigError, match="patch_size"):
        VolumeDataset(cohort, CFG, patch_size=(32, 8, 8))


def test_cache_reads_each_file_once(cohort, monkeypatch, tmp_path):
    calls: list[str] = []
    real = data_mod.load_volume

    def counting(path, **kw):
        calls.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(data_mod, "load_volume", counting)
    ds = SliceDataset(cohort, CFG)
    assert len(calls) == 3
    for _epoch in range(2):
        n = sum(b["image"].shape[0] for b in DataLoader(ds, batch_size=4, shuffle=True, num_workers=0))
        assert n == len(ds)
    assert len(calls) == 3  # no re-reads in later epochs

    calls.clear()
    cache_dir = tmp_path / "cache"
    disk = VolumeDataset(cohort, CFG, cache="disk", cache_dir=cache_dir)
    for _epoch in range(2):
        for _ in DataLoader(disk, batch_size=2, num_workers=0):
            pass
    assert len(calls) == 3 and len(list(cache_dir.glob("*.pt"))) == 3
    again = VolumeDataset(cohort, CFG, cache="disk", cache_dir=cache_dir)
    for _ in DataLoader(again, batch_size=2):
        pass
    assert len(calls) == 3  # a new run reuses the disk cache
    VolumeDataset(cohort, Preprocessing(shape=(16, 16, 16)), cache="disk", cache_dir=cache_dir)[0]
    assert len(calls) == 4  # other settings: a new cache entry, not a stale one


def test_distributed_sampler_shards_the_slices(cohort):
    ds = SliceDataset(cohort, CFG)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(1)
        for batch in DataLoader(ds, batch_size=3, sampler=sampler):
            assert batch["image"].shape[1:] == (1, 16, 16)
            seen.extend(zip(batch["volume"].tolist(), batch["slice"].tolist()))
    assert len(seen) == len(ds) and len(set(seen)) == len(ds)
    vol = VolumeDataset(cohort, CFG, patch_size=(8, 8, 8))
    sampler = DistributedSampler(vol, num_replicas=2, rank=1, shuffle=False)
    batches = list(DataLoader(vol, batch_size=2, sampler=sampler))
    assert batches[0]["image"].shape == (2, 1, 8, 8, 8)


def test_class_labels_are_served_as_indices(tmp_path):
    for i, label in enumerate(["T2", "T1", "T2"]):
        write_case(tmp_path, f"s{i}", seed=i)
    (tmp_path / "list.csv").write_text("image,label\ns0.nii.gz,T2\ns1.nii.gz,T1\ns2.nii.gz,T2\n")
    entries = load_datalist(tmp_path / "list.csv")
    names = class_names_of(entries)
    ds = build_dataset(entries, CFG, spatial_dims=3, class_names=names)
    assert ds.class_names == ("T1", "T2")
    assert [int(ds[i]["class_label"]) for i in range(3)] == [1, 0, 1]
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["class_label"].dtype == torch.long
    assert "class_label" not in build_dataset(entries, CFG, spatial_dims=3)[0]
    with pytest.raises(DataError, match="not among the classes"):
        build_dataset(entries, CFG, spatial_dims=2, class_names=["T1"])


def test_build_dataset_dispatch_and_errors(cohort):
    assert isinstance(build_dataset(cohort, CFG, spatial_dims=2), SliceDataset)
    assert isinstance(build_dataset(cohort, CFG, spatial_dims=3, patch_size=[8, 8, 8]), VolumeDataset)
    with pytest.raises(ConfigError, match="patch_size"):
        build_dataset(cohort, CFG, spatial_dims=2, patch_size=(8, 8, 8))
    with pytest.raises(ConfigError, match="spatial_dims"):
        build_dataset(cohort, CFG, spatial_dims=4)
    with pytest.raises(ConfigError, match="cache_dir"):
        build_dataset(cohort, CFG, spatial_dims=3, cache="disk")
    with pytest.raises(ConfigError, match="cache"):
        build_dataset(cohort, CFG, spatial_dims=3, cache="ram")


def test_bad_volume_in_datalist_raises_medidiff_error(tmp_path):
    save_volume(Volume(np.zeros(GRID, np.float32), np.eye(4)), tmp_path / "empty.nii.gz")
    with pytest.raises(VolumeContentError, match="empty.nii.gz: no voxel above"):
        SliceDataset(load_datalist(tmp_path), CFG)


def test_intensity_reference_and_preprocessing_dict(cohort):
    ds = SliceDataset(cohort, CFG)
    ref = ds.intensity_reference
    assert ref["num_volumes"] == 3 and ref["a_min"] < ref["a_max"]
    lows = [float(np.percentile(brain_like(i)[brain_like(i) > 0], 1)) for i in range(3)]
    assert ref["a_min"] == pytest.approx(np.median(lows), rel=1e-5)
    assert Preprocessing.from_dict(ds.preprocessing_dict()) == CFG


def test_prepare_entry(tmp_path):
    mask = np.zeros(GRID)
    mask[3:10, 3:10, 3:8] = 1
    image, mask_path = write_case(tmp_path, "p", lps=True, mask=mask)
    scan = prepare_entry(DatalistEntry(image, mask=mask_path), CFG)
    assert scan.volume.shape == GRID and scan.preprocessed.mask is not None
    back = data_mod.to_native(scan.preprocessed.mask, scan.preprocessed, scan.volume, interpolation="nearest")
    np.testing.assert_array_equal(back, mask)


def test_build_training_dataset_from_config(tmp_path):
    from medidiff.config import Config

    for i in range(2):
        write_case(tmp_path, f"s{i}", seed=i)
    (tmp_path / "list.csv").write_text("image\ns0.nii.gz\ns1.nii.gz\n")
    cfg = Config.from_dict({"data": {"datalist": "list.csv", "preprocessing": {"shape": list(GRID)}}})
    ds = data_mod.build_training_dataset(cfg, run_dir=tmp_path / "run", config_dir=tmp_path)
    assert ds.spatial_dims == cfg.model.spatial_dims
    assert len(ds) == (12 if ds.spatial_dims == 2 else 2)
    # a bad preprocessing key is refused when the config is loaded, naming the key
    with pytest.raises(ConfigError, match=r"data\.preprocessing\.spacng"):
        Config.from_dict({"data": {"datalist": "list.csv", "preprocessing": {"spacng": 2}}})


# ----------------------------------------------------------------------------------------
# the bundled sample cohort
# ----------------------------------------------------------------------------------------


def test_sample_data_integration():
    dataset_json = REPO / "sample_data" / "dataset.json"
    if not dataset_json.exists():
        pytest.skip("sample_data/dataset.json is not there (run `make sample-data`)")
    from medidiff.io import load_volume

    train = load_datalist(dataset_json)
    test = load_datalist(dataset_json, split="test")
    assert train and test
    assert all(e.mask is not None for e in train)
    assert all(e.segmentation is not None and "kind" in e.extra for e in test)
    cfg = Preprocessing(clip=False)
    # a case stored non-RAS, if the cohort has one (it is meant to)
    scans = [prepare_entry(e, cfg) for e in test[:4]]
    scan = next((s for s in scans if s.volume.orientation != "RAS"), scans[0])
    pre = scan.preprocessed
    assert pre.image.shape == cfg.shape
    # 2 mm in, 2 mm out, axis-aligned: orientation and crop/pad are exact, so the brain
    # mask and the intensities come back exactly (the whole brain fits in the grid)
    back = data_mod.to_native(pre.mask, pre, scan.volume, interpolation="nearest")
    np.testing.assert_array_equal(back, load_volume(scan.entry.mask).array)
    image = data_mod.intensity_to_native(data_mod.to_native(pre.image, pre, scan.volume), pre)
    native = np.asarray(scan.volume.array, dtype=np.float32)
    fov = data_mod.to_native(np.ones(cfg.shape, np.float32), pre, scan.volume) > 0.999
    assert fov[native > 0].all()  # the whole brain is inside the model grid
    np.testing.assert_allclose(image[fov], native[fov], atol=1e-3 * float(native.max()))
    assert np.all(data_mod.to_native(pre.image, pre, scan.volume)[~fov] == 0)
    # segmentation onto the model grid and back
    seg = load_volume(scan.entry.segmentation).array
    seg_model = data_mod.to_model(seg, pre)
    assert seg_model.sum() == seg.sum()
    ds = SliceDataset(train[:2], Preprocessing())
    assert len(ds) > 20 and ds[0]["image"].shape == (1, 96, 112)
    assert 0.0 <= float(ds[0]["image"].min()) and float(ds[0]["image"].max()) <= 1.0


def test_dicom_series_folders_are_cases(tmp_path):
    series = tmp_path / "cohort" / "patient1"
    series.mkdir(parents=True)
    for i in range(3):  # files with the DICOM preamble marker and no suffix
        (series / f"IM{i:04d}").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    write_case(tmp_path / "cohort", "nifti")
    assert [e.image.name for e in load_datalist(tmp_path / "cohort")] == ["nifti.nii.gz", "patient1"]
    assert [e.image for e in load_datalist(series)] == [series]


def test_stratified_by_kind_takes_kinds_in_turn():
    from medidiff.data.datalist import DatalistEntry, stratified_by_kind

    kinds = ["tumor", "tumor", "ms", "stroke", "ms", "healthy"]
    entries = [DatalistEntry(image=Path(f"{k}-{i}.nii.gz"), extra={"kind": k}) for i, k in enumerate(kinds)]
    picked = stratified_by_kind(entries, 4)
    assert [e.image.name for e in picked] == ["tumor-0.nii.gz", "ms-2.nii.gz", "stroke-3.nii.gz", "healthy-5.nii.gz"]
    assert [e.image.name for e in stratified_by_kind(entries, 5)][-1] == "tumor-1.nii.gz"
    assert stratified_by_kind(entries, None) == entries


def test_datalist_module_does_not_import_torch_or_monai(cohort):
    """Listing files must stay fast: medidiff.data.datalist imports neither torch nor MONAI."""
    folder = cohort[0].image.parent
    code = (
        "import sys; from medidiff.data.datalist import load_datalist; "
        f"entries = load_datalist({str(folder)!r}); assert len(entries) == 3; "
        "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_volume_files_lists_visible_volume_files_sorted(tmp_path):
    for name in ("b.nii.gz", "a.NRRD", "c.dcm", "notes.txt", ".hidden.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "d.nii").mkdir()  # a folder named like a volume is not a file
    assert [p.name for p in volume_files(tmp_path)] == ["a.NRRD", "b.nii.gz"]

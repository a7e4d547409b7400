"""Generic fixtures shared by the test modules.

- ``tmp_nifti``: a factory writing tiny NIfTI files with nibabel directly (independent of
  ``medidiff.io.volume``'s writer), returning their paths.
- ``run_cli``: runs ``medidiff.cli.main.main`` in-process and returns ``(rc, out, err)`` as a
  named tuple; output is captured at the file-descriptor level (``capfd``), so text that
  native libraries write straight to stderr is seen too. A test using ``run_cli`` cannot
  also request ``capsys``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest


class CliRun(NamedTuple):
    """What one ``medidiff`` call did."""

    rc: int
    out: str
    err: str


@pytest.fixture
def tmp_nifti(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tmp_nifti(array=None, affine=None, *, name="vol.nii.gz", ...) -> Path``.

    Args of the factory:
        array: voxel values (default: ``arange`` of ``shape`` as float32).
        affine: 4x4 voxel-to-RAS affine (default: identity).
        name: file name inside the test's ``tmp_path`` (``.nii`` or ``.nii.gz``).
        shape: shape of the default array, ``(X, Y, Z)``.
        qform_code, sform_code: NIfTI codes written into the header.
        nifti2: write NIfTI-2 instead of NIfTI-1.
    """
    import nibabel as nib

    def make(
        array: np.ndarray | None = None,
        affine: np.ndarray | None = None,
        *,
        name: str = "vol.nii.gz",
        shape: Sequence[int] = (4, 5, 6),
        qform_code: int = 1,
        sform_code: int = 1,
        nifti2: bool = False,
    ) -> Path:
        if array is None:
            array = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(tuple(shape))
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
        img = cls(np.asarray(array), affine, dtype=np.asarray(array).dtype)
        img.set_qform(affine, code=qform_code)
        img.set_sform(affine, code=sform_code)
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
        return path

    return make


@pytest.fixture
def run_cli(capfd: pytest.CaptureFixture[str]) -> Callable[[Sequence[Any]], CliRun]:
    """Run ``medidiff ARGS`` in this process; returns ``CliRun(rc, out, err)``."""
    from medidiff.cli.main import main

    def run(args: Sequence[Any]) -> CliRun:
        capfd.readouterr()  # drop anything printed before this call
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:  # argparse errors and --help
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capfd.readouterr()
        return CliRun(int(rc), out, err)

    return run


# ---- trained tiny checkpoints (session-scoped: trained once per test run) ----------------

_ROOT = Path(__file__).resolve().parents[1]


def _train_tiny(out: Path, overrides: list[str]) -> Path:
    from medidiff.config import Config
    from medidiff.training.trainer import Trainer

    cfg_path = _ROOT / "configs" / "tiny_test.yaml"
    cfg = Config.from_yaml(
        cfg_path,
        ["train.max_steps=3", "train.checkpoint_every=0", "train.batch_size=4", *overrides],
    )
    return Trainer(cfg, out, progress=False, config_dir=cfg_path.parent).fit().model_path


@pytest.fixture(scope="session")
def tiny_checkpoint_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.safetensors`` of a tiny 2D model trained 3 steps on sample_data (32x40 slices
    of a 6 mm grid 32x40x32); it records its preprocessing like any real checkpoint."""
    if not (_ROOT / "sample_data" / "dataset.json").exists():
        pytest.skip("sample_data not built")
    return _train_tiny(tmp_path_factory.mktemp("tiny2d"), [])


@pytest.fixture(scope="session")
def tiny_checkpoint_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 3D model (whole volumes, 12 mm grid 16x16x16) trained 3 steps on sample_data."""
    if not (_ROOT / "sample_data" / "dataset.json").exists():
        pytest.skip("sample_data not built")
    return _train_tiny(
        tmp_path_factory.mktemp("tiny3d"),
        ["model.spatial_dims=3", "data.preprocessing.spacing=[12,12,12]",
         "data.preprocessing.shape=[16,16,16]", "train.batch_size=2"],
    )


@pytest.fixture(scope="session")
def tiny_checkpoint_2d_conditional(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny class-conditional 2D model (2 classes from a CSV datalist's ``label`` column,
    condition dropout 0.2 for classifier-free guidance)."""
    if not (_ROOT / "sample_data" / "dataset.json").exists():
        pytest.skip("sample_data not built")
    out = tmp_path_factory.mktemp("tiny2dcond")
    images = sorted((_ROOT / "sample_data" / "train" / "images").glob("*.nii.gz"))[:6]
    csv_path = out / "datalist.csv"
    csv_path.write_text("image,label\n" + "".join(f"{p},{'a' if i % 2 else 'b'}\n" for i, p in enumerate(images)))
    return _train_tiny(
        out / "run",
        [f"data.datalist={csv_path}", "model.num_class_embeds=2", "train.cond_drop_prob=0.2"],
    )


@pytest.fixture(scope="session")
def tiny_latent_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(autoencoder run, latent run)``: a tiny autoencoder trained 3 steps, then a tiny
    rectified-flow latent model trained 3 steps on its latents (6 mm grid 32x40x32, latent
    3 x 16 x 20 x 16), from the shipped configs of the latent model."""
    if not (_ROOT / "sample_data" / "dataset.json").exists():
        pytest.skip("sample_data not built")
    from medidiff.config import Config
    from medidiff.training import build_trainer

    root = tmp_path_factory.mktemp("tinylatent")
    common = ["data.preprocessing.spacing=[6,6,6]", "data.preprocessing.shape=[32,40,32]",
              "train.batch_size=2", "train.log_every=1", "train.max_steps=3",
              "train.checkpoint_every=0", "train.preview_every=0"]
    runs = []
    for name, overrides in (
        ("brain_mri_3d_autoencoder", ["data.patch_size=[16,16,16]", "autoencoder.preset=tiny",
                                      "autoencoder.scale_batches=2"]),
        ("brain_mri_3d_latent", ["model.preset=tiny",
                                 f"autoencoder.checkpoint={root / 'ae' / 'model.safetensors'}"]),
    ):
        cfg_path = _ROOT / "configs" / f"{name}.yaml"
        out = root / ("ae" if "autoencoder" in name else "ldm")
        cfg = Config.from_yaml(cfg_path, [*common, *overrides])
        build_trainer(cfg, out, progress=False, config_dir=cfg_path.parent).fit()
        runs.append(out)
    return runs[0], runs[1]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests use tiny networks, which run fastest on one thread; two threads fighting for
    two cores with other processes (pytest workers, torchrun ranks) run many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def load_pipeline() -> Callable[[str], Any]:
    """Import a script of ``pipelines/`` by name (e.g. ``"benchmark_anomaly"``) as a module."""
    import importlib.util
    import sys

    def load(name: str) -> Any:
        path = Path(__file__).resolve().parents[1] / "pipelines" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module

    return load

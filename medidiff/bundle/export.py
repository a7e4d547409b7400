"""Export a medidiff checkpoint as a MONAI bundle folder.

:func:`export_bundle` checks everything first (the checkpoint loads, the method resolves
against it, the thresholds were calibrated for this checkpoint and these settings), then
writes the whole bundle into a temporary folder beside ``out`` and renames it into place,
so a failure never leaves a half-written bundle::

    OUT/
      configs/metadata.json      MONAI metadata (+ the exact medidiff settings)
      configs/inference.json     the workflow: python -m monai.bundle run --config_file ...
      configs/logging.conf
      models/model.safetensors   the checkpoint, byte for byte (same SHA-256: thresholds fit)
      models/model.pt            the network's state dict (MONAI's bundle convention)
      models/model_autoencoder.pt   (latent models: the autoencoder's)
      models/thresholds.json     (with thresholds: the calibration file, byte for byte)
      docs/README.md             what it is, the commands, the equivalent medidiff command
      docs/model_card.md         (shipped models: their card)
      LICENSE

Example:
    >>> from medidiff.bundle import export_bundle                          # doctest: +SKIP
    >>> export_bundle("brain_mri_2d", "bundles/brain_mri_2d").path         # doctest: +SKIP
    PosixPath('bundles/brain_mri_2d')
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import medidiff
from medidiff.bundle.contents import (
    LOGGING_CONF,
    BundleSpec,
    anomaly_command,
    dumps,
    inference_config,
    license_text,
    metadata,
    readme,
)
from medidiff.errors import CheckpointError, ConfigError, OutputError

__all__ = ["BundleExport", "export_bundle"]

#: packages whose versions the metadata records (MONAI, torch and numpy have their own keys)
_PACKAGES = ("monai", "torch", "numpy", "nibabel", "SimpleITK", "safetensors", "scipy", "einops",
             "fire")


@dataclass(frozen=True)
class BundleExport:
    """What :func:`export_bundle` wrote.

    Attributes:
        path: the bundle folder.
        files: bundle-relative paths of the files written.
        sha256: SHA-256 of the checkpoint (``models/model.safetensors``).
        method: the resolved method settings.
        command: the ``medidiff anomaly`` command that scores as the bundle does.
    """

    path: Path
    files: tuple[str, ...]
    sha256: str
    method: dict[str, Any]
    command: tuple[str, ...]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"medidiff": medidiff.__version__}
    for name in _PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name).split("+")[0]
    return out


def _shipped_name(checkpoint: Path) -> str | None:
    """The shipped model a checkpoint path is (``medidiff/weights/<name>.safetensors``)."""
    from medidiff.models.pretrained import MODELS, WEIGHTS_DIR

    try:
        same_dir = checkpoint.resolve().parent == WEIGHTS_DIR.resolve()
    except OSError:
        return None
    name = checkpoint.name.removesuffix(".safetensors")
    return name if same_dir and name in MODELS else None


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that exists (without ``overwrite``), is a file, or is a folder that is
    not a bundle (never deleted, even with ``overwrite``)."""
    from medidiff.io.atomic import check_writable_folder

    if out.is_file():
        raise OutputError(f"{out}: is a file; give a folder name for the bundle")
    if out.exists():
        if not overwrite:
            raise OutputError(f"{out}: already exists; pass --overwrite to replace the bundle")
        is_bundle = (out / "configs" / "metadata.json").is_file()
        if not is_bundle and any(out.iterdir()):
            raise OutputError(
                f"{out}: exists and is not a bundle (no configs/metadata.json); it is not "
                "replaced even with --overwrite: choose another folder"
            )
    check_writable_folder(out.parent)


def _state_dicts(checkpoint: Any) -> dict[str, dict[str, Any]]:
    """``models/*.pt`` contents: the network's state dict at the stored precision (a latent
    model: the U-Net's and the autoencoder's)."""
    import torch

    half = checkpoint.stored_dtype == "float16"

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.half() if half and t.is_floating_point() else t

    sd = checkpoint.state_dict
    if checkpoint.network != "latent_diffusion":
        return {"model.pt": {k: cast(v) for k, v in sd.items()}}
    parts: dict[str, dict[str, Any]] = {"model.pt": {}, "model_autoencoder.pt": {}}
    for key, value in sd.items():
        head, _, rest = key.partition(".")
        target = {"unet": "model.pt", "autoencoder": "model_autoencoder.pt"}.get(head)
        if target is None:
            raise CheckpointError(f"{checkpoint.path}: unexpected weight {key!r} in a latent model")
        parts[target][rest] = cast(value)
    return parts


def _spec(detector: Any, *, name: str, version: str, source: str, seed: int, batch_size: int,
          overlays: bool, thresholds: Any, authors: str | None, license: str | None) -> BundleSpec:
    from medidiff.models.pretrained import model_card_facts, model_card_path

    ckpt = detector.checkpoint
    shipped = _shipped_name(Path(ckpt.path))
    card = model_card_path(shipped) if shipped else None
    return BundleSpec(
        name=name,
        version=version,
        checkpoint_source=shipped or source,
        sha256=ckpt.sha256,
        network=ckpt.network,
        model_kwargs=ckpt.model_kwargs,
        stored_dtype=ckpt.stored_dtype,
        config=ckpt.config,
        preprocessing=ckpt.preprocessing,
        step=ckpt.extra.get("step"),
        spatial_dims=detector.spatial_dims,
        input_shape=tuple(int(s) for s in detector.input_shape),
        method=detector.method.to_dict(),
        postprocess=detector.postprocess.to_dict(),
        seed=seed,
        batch_size=batch_size,
        overlays=overlays,
        thresholds=thresholds.to_dict() if thresholds is not None else None,
        medidiff_version=medidiff.__version__,
        packages=_versions(),
        model_card=card.read_text(encoding="utf-8") if card is not None and card.is_file() else None,
        card_facts=model_card_facts(shipped) if shipped else {},
        authors=authors or ("medidiff contributors" if shipped else "unknown"),
        license=license,
    )


def _write_bundle(root: Path, spec: BundleSpec, checkpoint: Any, thresholds_file: Path | None) -> list[str]:
    """Every file of the bundle under ``root`` (an empty folder); returns their paths."""
    import torch

    from medidiff.models.checkpoint import file_sha256

    for sub in ("configs", "models", "docs"):
        (root / sub).mkdir()
    shutil.copyfile(checkpoint.path, root / "models" / "model.safetensors")
    if file_sha256(root / "models" / "model.safetensors") != spec.sha256:
        raise CheckpointError(f"{checkpoint.path}: changed while it was exported; export again")
    for fname, state in _state_dicts(checkpoint).items():
        torch.save(state, root / "models" / fname)
    if thresholds_file is not None:
        shutil.copyfile(thresholds_file, root / "models" / "thresholds.json")
    command = anomaly_command(spec)
    (root / "configs" / "inference.json").write_text(dumps(inference_config(spec)), encoding="utf-8")
    (root / "configs" / "metadata.json").write_text(dumps(metadata(spec, command)), encoding="utf-8")
    (root / "configs" / "logging.conf").write_text(LOGGING_CONF, encoding="utf-8")
    if spec.model_card is not None:
        (root / "docs" / "model_card.md").write_text(spec.model_card, encoding="utf-8")
    (root / "LICENSE").write_text(license_text(spec), encoding="utf-8")
    models = {f"models/{p.name}": file_sha256(p) for p in sorted((root / "models").iterdir())}
    (root / "docs" / "README.md").write_text(readme(spec, command, models), encoding="utf-8")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _open_permissions(root: Path) -> None:
    """Folders ``0o777`` less the umask (``mkdtemp`` makes ``0o700``)."""
    from medidiff.io.atomic import current_umask

    mode = 0o777 & ~current_umask()
    for folder in (root, *[p for p in root.rglob("*") if p.is_dir()]):
        os.chmod(folder, mode)


def export_bundle(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: Any = None,
    postprocess: Any = None,
    thresholds: str | os.PathLike | None = None,
    seed: int = 0,
    batch_size: int = 16,
    overlays: bool = True,
    version: str = "0.1.0",
    authors: str | None = None,
    license_file: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> BundleExport:
    """Write a MONAI bundle that scores scans as ``medidiff anomaly`` does with these settings.

    Args:
        checkpoint: ``model.safetensors`` from ``medidiff train``, or a shipped model's name
            (``brain_mri_2d``, ``brain_mri_3d``, ...).
        out: the bundle folder to create (its name is the bundle's name).
        method: a :class:`~medidiff.anomaly.methods.MethodConfig` (default: the checkpoint's
            default method), resolved against the checkpoint and written out in full.
        postprocess: a :class:`~medidiff.anomaly.postprocess.PostprocessConfig` (default one).
        thresholds: a thresholds file from ``medidiff calibrate`` for this checkpoint and
            these settings (copied into ``models/``; refused if it does not fit).
        seed: the noise seed the bundle uses.
        batch_size: network inputs per call (does not change the maps).
        overlays: whether the bundle's workflow draws ``NAME_overlay.png``.
        version: the bundle's version (metadata ``version``).
        authors: who made the weights (metadata ``authors``).
        license_file: a text file with the weights' licence (into ``LICENSE``).
        overwrite: replace an existing bundle at ``out``.

    Returns:
        The :class:`BundleExport`.

    Raises:
        CheckpointError: the checkpoint is missing, corrupt or not medidiff's.
        ConfigError: settings the checkpoint cannot take, or thresholds of other settings.
        OutputError: ``out`` exists (without ``overwrite``), is a file or a folder that is
            not a bundle, or cannot be written.
    """
    from medidiff.anomaly.detector import AnomalyDetector
    from medidiff.anomaly.thresholds import Thresholds
    from medidiff.models.pretrained import resolve_checkpoint

    out = Path(out).expanduser()
    if not out.name or out.name in (".", ".."):
        raise OutputError(f"{out}: give the bundle a folder name, e.g. bundles/my_model")
    _check_target(out, overwrite)
    if isinstance(version, bool) or not str(version).strip():
        raise ConfigError(f"the bundle version must be a non-empty string; got {version!r}")
    license = None
    if license_file is not None:
        try:
            license = Path(license_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--license {license_file}: cannot read ({exc})") from None
    path = resolve_checkpoint(str(checkpoint))
    detector = AnomalyDetector(path, method, postprocess, device="cpu", batch_size=batch_size,
                               seed=seed)
    loaded = None
    if thresholds is not None:
        loaded = Thresholds.load(thresholds)
        loaded.check(detector)
    spec = _spec(detector, name=out.name, version=str(version), source=str(checkpoint), seed=seed,
                 batch_size=batch_size, overlays=overlays, thresholds=loaded, authors=authors,
                 license=license)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old: Path | None = None
    try:
        files = _write_bundle(tmp, spec, detector.checkpoint,
                              Path(thresholds) if thresholds is not None else None)
        _open_permissions(tmp)
        if out.exists():  # --overwrite of a bundle (checked above): swap, then delete the old one
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.rmdir(old)
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out.exists():
            os.rename(old, out)  # put the previous bundle back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return BundleExport(out, tuple(files), spec.sha256, dict(spec.method),
                        tuple(anomaly_command(spec)))

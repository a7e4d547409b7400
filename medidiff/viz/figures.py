"""Figures that show how medidiff works, drawn from a real checkpoint.

Four strips and a loss curve, used by ``docs/how_it_works.md`` (made by
``pipelines/make_figures.py``), the demo report and the model cards:

- :func:`noising_strip`: the forward process q(x_t | x_0) on one slice, x_t =
  sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (:func:`medidiff.diffusion.q_sample`),
  with the checkpoint's noise (simplex for the default model; Wyatt et al. 2022).
- :func:`reverse_trajectory_strip`: the learned reverse process from pure noise to a sample:
  x_t and the network's x_0 estimate at evenly chosen steps (Ho et al. 2020; Song et al. 2021).
- :func:`anomaly_strip`: partial-diffusion anomaly detection on one scan: input, x_t at the
  method's start, reconstruction, anomaly map, segmentation and ground truth.
- :func:`loss_curve`: the training loss of a run's ``metrics.csv`` (from
  :mod:`medidiff.viz.curves`, re-exported here).

Slices are axial slices of the RAS model grid ``(X, Y)``, shown with
:func:`medidiff.io.images.display_view`: transposed and flipped so that anterior is up and
the patient's right is on the right (neurological convention). Every function returns a
:class:`matplotlib.figure.Figure` on an Agg canvas (no pyplot, no backend switch); write it
with :func:`medidiff.io.images.save_figure`. The pixel arrays a panel shows are the
``AxesImage`` arrays of its axes (``fig.axes[i].images[0].get_array()``), in display
orientation (see :func:`display_view`).

Example:
    >>> import numpy as np
    >>> from medidiff.diffusion import NoiseSchedule
    >>> from medidiff.diffusion.noise import NoiseSpec
    >>> image = np.zeros((32, 40), np.float32); image[8:24, 10:30] = 0.7
    >>> fig = noising_strip(image, NoiseSchedule.create(), NoiseSpec("simplex"),
    ...                     timesteps=(-1, 250, 999))
    >>> len(fig.axes)
    3
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medidiff.errors import ConfigError, DataError
from medidiff.viz.curves import loss_curve
from medidiff.viz.display import (
    axial,
    display_view,
    draw_contour,
    new_figure,
    robust_range,
    show_panel,
)

__all__ = [
    "FIGURE_NAMES",
    "TrajectoryFrame",
    "anomaly_strip",
    "display_view",
    "loss_curve",
    "noising_strip",
    "reverse_trajectory",
    "reverse_trajectory_strip",
    "save_how_it_works_figures",
]

#: The files :func:`save_how_it_works_figures` writes, by key.
FIGURE_NAMES = {"noising": "noising.png", "reverse": "reverse.png", "anomaly": "anomaly.png"}

_PANEL_INCH = 1.7  # width of one panel in inches


def _to_numpy(x: Any) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# The forward process
# --------------------------------------------------------------------------------------------


def noising_strip(
    image: Any,
    schedule: Any,
    noise_spec: Any,
    *,
    timesteps: Sequence[int] = (0, 50, 100, 250, 500, 750, 999),
    seed: int = 0,
) -> Any:
    """One slice noised by the forward process at several timesteps.

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4),
    computed with :func:`medidiff.diffusion.q_sample`, with one noise draw eps (of
    ``noise_spec``'s kind, seeded with ``seed``) shared by all panels, so the panels differ
    only by t. Timesteps follow medidiff's indexing ``0 .. T-1`` (index t is the paper's
    step t + 1); ``-1`` is the clean slice itself (alpha_bar = 1). At ``t = 0`` the slice
    carries noise of standard deviation sqrt(beta_1) (0.01 for the default schedule).
    The clean slice is shown on [0, 1], noised ones on their own 0.5-99.5 percentile range.

    Args:
        image: x_0, an axial slice ``(X, Y)`` of the RAS model grid on the model's
            intensity scale ([0, 1]); numpy array or tensor.
        schedule: the :class:`~medidiff.diffusion.NoiseSchedule` of the model.
        noise_spec: the :class:`~medidiff.diffusion.noise.NoiseSpec` the model was trained with.
        timesteps: the timesteps to show, each in ``-1 .. T-1``.
        seed: the noise seed.

    Returns:
        A figure with one panel per timestep, titled with t and sqrt(alpha_bar_t).

    Raises:
        ConfigError: the image is not 2D, or a timestep is out of range.
    """
    from medidiff.diffusion import alpha_bar_at, q_sample
    from medidiff.diffusion.noise import sample_noise

    x0_np = _to_numpy(image)
    if x0_np.ndim != 2:
        raise ConfigError(f"noising_strip needs a 2D slice (X, Y); got shape {x0_np.shape}")
    T = schedule.num_train_timesteps
    steps = [int(t) for t in timesteps]
    if not steps or any(not -1 <= t < T for t in steps):
        raise ConfigError(f"timesteps must be in -1 .. {T - 1}; got {list(timesteps)}")
    schedule = schedule.to("cpu")
    x0 = torch.from_numpy(np.ascontiguousarray(x0_np))[None, None]  # (1, 1, X, Y)
    eps = sample_noise(noise_spec, tuple(x0.shape), seeds=[int(seed)])

    fig, axes = new_figure(1, len(steps), (_PANEL_INCH * len(steps), 2.3))
    for ax, t in zip(axes[0], steps):
        x_t = q_sample(schedule, x0, t, eps)[0, 0].numpy()
        alpha_bar = float(alpha_bar_at(schedule, torch.tensor([t]))[0])
        vmin, vmax = (0.0, 1.0) if t < 0 else robust_range(x_t)
        label = "x_0 (clean)" if t < 0 else f"t={t}"
        title = f"{label}\n" + r"$\sqrt{\bar\alpha_t}$" + f"={math.sqrt(alpha_bar):.3f}"
        show_panel(ax, x_t, title, vmin=vmin, vmax=vmax)
    fig.suptitle(f"forward process q(x_t | x_0), {noise_spec.kind} noise", fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------
# The reverse process
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrajectoryFrame:
    """One state of a reverse trajectory.

    Attributes:
        t: the timestep of ``x_t`` (``-1`` for the final sample).
        x_t: the sample at t, ``(X, Y)`` or ``(X, Y, Z)`` float32.
        pred_x0: the network's x_0 estimate at t (the sample itself at ``t = -1``).
    """

    t: int
    x_t: np.ndarray
    pred_x0: np.ndarray


@torch.no_grad()
def reverse_trajectory(
    checkpoint: Any,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[TrajectoryFrame]:
    """Every state of one reverse run from pure noise x_{T-1} to a sample.

    Runs :func:`medidiff.diffusion.sample` exactly as :class:`medidiff.synthesis.synthesizer.Synthesizer`
    does for sample seed ``seed`` (same timesteps, noise kind, clip range and unconditional
    model call) and records each visited state through its ``callback``; the final frame
    equals the Synthesizer's sample.

    Args:
        checkpoint: ``model.safetensors`` path (2D or 3D model).
        sampler: ``"ddim"``, ``"ddpm"``, ``"dpm++2m"`` or ``"x0"``.
        steps: network evaluations (``None``: the sampler's default in
            :class:`~medidiff.synthesis.synthesizer.Synthesizer`, every timestep for ``"ddpm"``).
        seed: the sample's seed.
        device: where to run.

    Returns:
        ``steps + 1`` frames: one per visited timestep (noisiest first), then the sample
        (``t = -1``).
    """
    from medidiff.diffusion import sample
    from medidiff.synthesis.synthesizer import Synthesizer

    synth = Synthesizer(checkpoint, device=device, sampler=sampler, steps=steps, batch_size=1)
    frames: list[TrajectoryFrame] = []

    def keep(t: int, x_t: torch.Tensor, pred_x0: torch.Tensor) -> None:
        frames.append(TrajectoryFrame(int(t), _to_numpy(x_t[0, 0]), _to_numpy(pred_x0[0, 0])))

    result = sample(
        synth.model_fn(1), synth.schedule, (1, 1, *synth.spatial_shape),
        sampler=synth.sampler, steps=synth.steps, seeds=[int(seed)], noise_spec=synth.noise_spec,
        device=synth.device, prediction_type=synth.prediction_type, clip_range=synth.clip_range,
        callback=keep,
    )
    final = _to_numpy(result.sample[0, 0])
    frames.append(TrajectoryFrame(-1, final, final))
    return frames


def reverse_trajectory_strip(
    checkpoint: Any,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    shown: int = 6,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Any:
    """The reverse process from pure noise to a sample, in two rows.

    Top row: x_t at ``shown`` states chosen evenly from x_{T-1} (pure noise) to the final
    sample; bottom row: the network's x_0 estimate at the same states,
    x_0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_bar_t) for an epsilon
    model (:func:`medidiff.diffusion.predict_x0`). 3D models show the axial middle slice.

    Args:
        checkpoint: ``model.safetensors`` path.
        sampler: the sampler (see :func:`reverse_trajectory`).
        steps: network evaluations.
        shown: how many states to show (columns), at least 2.
        seed: the sample's seed.
        device: where to run.

    Returns:
        The figure.
    """
    if isinstance(shown, bool) or not isinstance(shown, int) or shown < 2:
        raise ConfigError(f"shown must be an integer >= 2; got {shown!r}")
    frames = reverse_trajectory(checkpoint, sampler=sampler, steps=steps, seed=seed, device=device)
    count = min(shown, len(frames))
    picks = sorted({int(round(i)) for i in np.linspace(0, len(frames) - 1, count)})
    fig, axes = new_figure(2, len(picks), (_PANEL_INCH * len(picks), 4.3))
    for col, k in enumerate(picks):
        frame = frames[k]
        x_t = axial(frame.x_t)
        last = frame.t < 0
        rng = (0.0, 1.0) if last else robust_range(x_t)
        show_panel(axes[0, col], x_t, "sample x_0" if last else f"x_t, t={frame.t}",
              vmin=rng[0], vmax=rng[1])
        show_panel(axes[1, col], axial(frame.pred_x0),
              "sample x_0" if last else r"$\hat{x}_0$" + f" at t={frame.t}")
    fig.suptitle(f"reverse process: {sampler}, {len(frames) - 1} steps, seed {seed}", fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------
# Anomaly detection
# --------------------------------------------------------------------------------------------


def _noised_input(detector: Any, image: np.ndarray, z: int | None, name: str) -> np.ndarray:
    """x_t of the detector's first start for one network input, with the detector's noise.

    Uses the detector's own seeding (:func:`medidiff.anomaly.seeds.noise_seed`) for an
    input covered by one window (the model grid equals the trained input size), start 0.
    """
    from medidiff.anomaly.seeds import noise_seed
    from medidiff.diffusion import q_sample
    from medidiff.diffusion.noise import per_sample_generators, sample_noise

    method = detector.method
    t = int(method.t_starts[0])
    if detector.spatial_dims == 2:
        x0 = image[:, :, z]
        origin: tuple[int, ...] = (0, 0)
    else:
        x0 = image
        origin = (0, 0, 0)
    seed = noise_seed(detector.seed, name, z if detector.spatial_dims == 2 else 0, origin)
    device = detector.device
    reconstructor = detector.reconstructor
    x0_t = torch.from_numpy(np.ascontiguousarray(x0, dtype=np.float32))[None, None].to(device)
    gens = per_sample_generators([seed], device)
    eps = sample_noise(reconstructor.noise_spec, tuple(x0_t.shape), generator=gens, device=device)
    x_t = q_sample(reconstructor.schedule.to(device), x0_t, t, eps)
    return _to_numpy(x_t[0, 0])


def anomaly_strip(
    detector: Any,
    volume: Any,
    *,
    mask: Any = None,
    truth: Any = None,
    thresholds: Any = None,
    slice_index: int | None = None,
    result: Any = None,
) -> Any:
    """Partial-diffusion anomaly detection on one scan, panel by panel, on the model grid.

    Panels: the input x_0; x_t at the method's start t (its first start for ``ensemble``),
    noised with the detector's noise kind and seed exactly as the detector noised it
    (``patched`` noises one patch at a time: the strip shows the whole slice noised);
    the reconstruction x_hat; the anomaly map (the post-processed residual of
    :func:`medidiff.anomaly.postprocess.anomaly_map`); the segmentation (when thresholds are known)
    and the ground truth (when given), as contours over the input.

    Args:
        detector: an :class:`~medidiff.anomaly.detector.AnomalyDetector`.
        volume: the scan, a :class:`~medidiff.io.volume.Volume` (any grid).
        mask: its brain mask (a Volume on the scan's grid), or ``None``.
        truth: its ground-truth lesion mask (a Volume on the scan's grid), or ``None``.
        thresholds: :class:`~medidiff.anomaly.thresholds.Thresholds` (or a path to a
            thresholds file) to segment with; default none (no segmentation).
        slice_index: the axial slice of the model grid to show; default the slice with the
            most ground-truth voxels, else the one with the largest anomaly-map mass.
        result: ``detector.score(volume, mask=mask)`` if already computed (with the
            thresholds wanted), to avoid scoring the scan again.

    Returns:
        The figure.
    """
    if result is None:
        result = _score(detector, volume, mask, thresholds)
    truth_grid = _truth_on_grid(truth, result)
    z = _strip_slice(slice_index, result.grid, truth_grid)
    return _anomaly_panels(detector, result, truth_grid, z)


def _score(detector: Any, volume: Any, mask: Any, thresholds: Any) -> Any:
    """``detector.score(volume, mask=mask)`` with ``thresholds`` (a Thresholds, a file or
    ``None`` for no segmentation)."""
    from medidiff.anomaly.thresholds import Thresholds

    if thresholds is not None and not isinstance(thresholds, Thresholds):
        thresholds = Thresholds.load(thresholds)
    return detector.score(volume, mask=mask, thresholds=thresholds)


def _truth_on_grid(truth: Any, result: Any) -> np.ndarray | None:
    """The ground-truth Volume resampled (nearest) onto the result's model grid, as bool."""
    from medidiff.data.transforms import to_model

    if truth is None:
        return None
    return to_model(np.asarray(truth.array) > 0, result.preprocessed,
                    reference=truth, interpolation="nearest") > 0


def _strip_slice(slice_index: Any, grid: Any, truth_grid: np.ndarray | None) -> int:
    """The axial slice to show: ``slice_index`` (checked), else the slice with the most
    ground-truth voxels, else the one with the largest anomaly-map mass."""
    depth = grid.image.shape[2]
    if slice_index is None:
        if truth_grid is not None and truth_grid.any():
            slice_index = int(np.argmax(truth_grid.sum(axis=(0, 1))))
        else:
            slice_index = int(np.argmax(grid.anomaly_map.sum(axis=(0, 1))))
    if (
        isinstance(slice_index, bool)
        or not isinstance(slice_index, int)
        or not 0 <= slice_index < depth
    ):
        raise ConfigError(
            f"slice_index must be an integer in 0 .. {depth - 1}; got {slice_index!r}"
        )
    return slice_index


def _anomaly_panels(detector: Any, result: Any, truth_grid: np.ndarray | None, z: int) -> Any:
    """The strip of :func:`anomaly_strip` for axial slice ``z`` of a scored scan."""
    grid = result.grid
    x_t = _noised_input(detector, grid.image, z, result.name)
    x_t_slice = x_t if detector.spatial_dims == 2 else x_t[:, :, z]
    method = detector.method
    t = int(method.t_starts[0])

    image = grid.image[:, :, z]
    amap = grid.anomaly_map[:, :, z]
    panels = 4 + (grid.segmentation is not None) + (truth_grid is not None)
    fig, axes = new_figure(1, panels, (_PANEL_INCH * panels, 2.4))
    axes = list(axes[0])
    show_panel(axes[0], image, "input x_0")
    lo, hi = robust_range(x_t_slice)
    show_panel(axes[1], x_t_slice, f"x_t, t={t} ({method.noise})", vmin=lo, vmax=hi)
    show_panel(axes[2], grid.reconstruction[:, :, z], f"reconstruction ({method.method})")
    vmax = float(np.percentile(grid.anomaly_map[grid.mask], 99.9)) if grid.mask.any() else 1.0
    show_panel(axes[3], amap, "anomaly map", vmin=0.0, vmax=max(vmax, 1e-6), cmap="hot")
    col = 4
    if grid.segmentation is not None:
        show_panel(axes[col], image, "segmentation")
        draw_contour(axes[col], grid.segmentation[:, :, z], "red")
        col += 1
    if truth_grid is not None:
        show_panel(axes[col], image, "ground truth")
        draw_contour(axes[col], truth_grid[:, :, z], "lime")
    fig.suptitle(f"{result.name}: axial slice {z}, score {result.score:.4f}", fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------
# The "how it works" set
# --------------------------------------------------------------------------------------------


def _dataset_json(sample_data: str | os.PathLike) -> Path:
    path = Path(sample_data)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; pass the sample_data folder or its dataset.json")
    return path


def _entry(dataset: Path, split: str, prefer: str | None = None, kind: str | None = None) -> Any:
    """A datalist entry of ``split`` (with ``kind``), preferring a name containing ``prefer``."""
    from medidiff.data.datalist import load_datalist

    entries = load_datalist(dataset, split=split)
    if kind is not None:
        entries = [e for e in entries if e.extra.get("kind") == kind]
    if not entries:
        raise DataError(f"{dataset}: no '{split}' entries" + (f" of kind {kind!r}" if kind else ""))
    if prefer:
        for e in entries:
            if prefer in Path(e.image).name:
                return e
    return entries[0]


def save_how_it_works_figures(
    checkpoint: str | os.PathLike,
    sample_data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    detector: Any = None,
    thresholds: Any = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    anomaly_result: Any = None,
) -> dict[str, Path]:
    """Write the three strips of ``docs/how_it_works.md`` for a checkpoint.

    - ``noising.png``: :func:`noising_strip` of the axial slice with the most brain of the
      first healthy validation scan (training split if there is none), preprocessed with
      the checkpoint's own preprocessing (3D models: the same slice of the volume);
    - ``reverse.png``: :func:`reverse_trajectory_strip` (DDIM, 50 steps);
    - ``anomaly.png``: :func:`anomaly_strip` of a tumour test scan (``tumor-000`` if
      present) with its brain mask and lesion label.

    Args:
        checkpoint: ``model.safetensors`` path.
        sample_data: the ``sample_data`` folder or its ``dataset.json``.
        out_dir: where to write the PNGs (created).
        detector: the :class:`~medidiff.anomaly.detector.AnomalyDetector` to use; default one built
            on ``checkpoint`` with the default method (DDIM, t = 50, 3 steps).
        thresholds: :class:`~medidiff.anomaly.thresholds.Thresholds` or a thresholds file, for the
            segmentation panel; ``None``: the detector's own, if any.
        device: where to run the network.
        seed: the seed of the noise and of the sample.
        anomaly_result: the detector's result for the tumour case, if already scored
            (used when its name matches the case shown).

    Returns:
        ``{"noising": path, "reverse": path, "anomaly": path}``.

    Raises:
        DataError: the sample data or one of its files is missing.
    """
    from medidiff.anomaly.detector import AnomalyDetector
    from medidiff.io.images import save_figure
    from medidiff.models.loaded import load_model
    from medidiff.runtime.distributed import resolve_device

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = _dataset_json(sample_data)
    loaded = load_model(checkpoint, resolve_device(device))
    schedule, spec, prep = loaded.schedule, loaded.noise_spec, loaded.preprocessing

    paths: dict[str, Path] = {}
    paths["noising"] = save_figure(
        noising_strip(_healthy_slice(dataset, prep), schedule, spec, seed=seed),
        out / FIGURE_NAMES["noising"],
    )
    paths["reverse"] = save_figure(
        reverse_trajectory_strip(loaded, seed=seed, device=device),
        out / FIGURE_NAMES["reverse"],
    )
    if detector is None:
        detector = AnomalyDetector(loaded, device=device, seed=seed)
    fig = _tumour_strip(detector, dataset, thresholds, anomaly_result)
    paths["anomaly"] = save_figure(fig, out / FIGURE_NAMES["anomaly"])
    return paths


def _healthy_slice(dataset: Path, prep: Any) -> np.ndarray:
    """The axial slice with the most brain of the first healthy validation scan (training
    split if there is none), preprocessed with ``prep``: ``(X, Y)``."""
    from medidiff.data.transforms import preprocess
    from medidiff.io.volume import load_volume

    raw = json.loads(dataset.read_text())
    healthy = _entry(dataset, "validation" if raw.get("validation") else "training")
    scan = preprocess(load_volume(healthy.image), prep,
                      mask=load_volume(healthy.mask) if healthy.mask else None)
    brain = scan.mask > 0 if scan.mask is not None else scan.foreground
    z = int(np.argmax(np.asarray(brain).sum(axis=(0, 1))))
    return scan.image[:, :, z]


def _tumour_strip(detector: Any, dataset: Path, thresholds: Any, anomaly_result: Any) -> Any:
    """:func:`anomaly_strip` of a tumour test scan (``tumor-000`` if present) with its brain
    mask and lesion label; ``anomaly_result`` is reused when it is that scan's."""
    from medidiff.io.volume import load_volume

    case = _entry(dataset, "test", prefer="tumor-000", kind="tumor")
    return anomaly_strip(
        detector,
        load_volume(case.image),
        mask=load_volume(case.mask) if case.mask else None,
        truth=load_volume(case.segmentation) if case.segmentation else None,
        thresholds=thresholds,
        result=anomaly_result if getattr(anomaly_result, "name", None) == case.name else None,
    )

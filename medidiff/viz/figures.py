"""Figures that show how medidiff works, drawn from a real checkpoint.

Four strips and a loss curve, used by ``docs/how_it_works.md`` (made by
``pipelines/make_figures.py``), the demo report and the model cards:

- :func:`noising_strip`: the forward process q(x_t | x_0) on one slice, x_t =
  sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (:func:`medidiff.diffusion.core.q_sample`),
  with the checkpoint's noise (simplex for the default model; Wyatt et al. 2022).
- :func:`reverse_trajectory_strip`: the learned reverse process from pure noise to a sample:
  x_t and the network's x_0 estimate at evenly chosen steps (Ho et al. 2020; Song et al. 2021).
- :func:`anomaly_strip`: partial-diffusion anomaly detection on one scan: input, x_t at the
  method's start, reconstruction, anomaly map, segmentation and ground truth.
- :func:`loss_curve`: the training loss of a run's ``metrics.csv``.

Slices are axial slices of the RAS model grid ``(X, Y)``, shown as
:func:`medidiff.viz.display.save_image_grid` does: transposed and flipped so that anterior is
up and the patient's right is on the right (neurological convention). Every function
returns a matplotlib ``Figure`` (Agg backend); write it with
:func:`medidiff.viz.display.save_figure`. The pixel arrays a panel shows are the
``AxesImage`` arrays of its axes (``fig.axes[i].images[0].get_array()``), in display
orientation (see :func:`display_view`).

Example:
    >>> import numpy as np
    >>> from medidiff.diffusion.core import NoiseSchedule
    >>> from medidiff.diffusion.noise import NoiseSpec
    >>> image = np.zeros((32, 40), np.float32); image[8:24, 10:30] = 0.7
    >>> fig = noising_strip(image, NoiseSchedule.create(), NoiseSpec("simplex"),
    ...                     timesteps=(-1, 250, 999))
    >>> len(fig.axes)
    3
"""

from __future__ import annotations

import csv
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


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def display_view(slice_2d: np.ndarray) -> np.ndarray:
    """An axial RAS slice ``(X, Y)`` in display orientation ``(Y, X)``: anterior up.

    Args:
        slice_2d: ``(X, Y)`` array of the RAS model grid.

    Returns:
        ``flipud(slice_2d.T)``, the array a panel shows.
    """
    return np.flipud(np.asarray(slice_2d).T)


def _to_numpy(x: Any) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _axial(x: np.ndarray) -> np.ndarray:
    """(X, Y) as is; (X, Y, Z) -> the axial middle slice."""
    x = np.asarray(x)
    return x[:, :, x.shape[2] // 2] if x.ndim == 3 else x


def _show(ax: Any, slice_2d: np.ndarray, title: str, *, vmin: float | None = 0.0,
          vmax: float | None = 1.0, cmap: str = "gray") -> Any:
    """Draw one panel (no axes, small title) and return its AxesImage."""
    image = ax.imshow(display_view(slice_2d), cmap=cmap, vmin=vmin, vmax=vmax,
                      interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return image


def _robust_range(x: np.ndarray) -> tuple[float, float]:
    """The 0.5th and 99.5th percentiles (a display range that noise does not blow up)."""
    lo, hi = np.percentile(np.asarray(x, dtype=np.float64), [0.5, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


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
    computed with :func:`medidiff.diffusion.core.q_sample`, with one noise draw eps (of
    ``noise_spec``'s kind, seeded with ``seed``) shared by all panels, so the panels differ
    only by t. Timesteps follow medidiff's indexing ``0 .. T-1`` (index t is the paper's
    step t + 1); ``-1`` is the clean slice itself (alpha_bar = 1). At ``t = 0`` the slice
    carries noise of standard deviation sqrt(beta_1) (0.01 for the default schedule).
    The clean slice is shown on [0, 1], noised ones on their own 0.5-99.5 percentile range.

    Args:
        image: x_0, an axial slice ``(X, Y)`` of the RAS model grid on the model's
            intensity scale ([0, 1]); numpy array or tensor.
        schedule: the :class:`~medidiff.diffusion.core.NoiseSchedule` of the model.
        noise_spec: the :class:`~medidiff.diffusion.noise.NoiseSpec` the model was trained with.
        timesteps: the timesteps to show, each in ``-1 .. T-1``.
        seed: the noise seed.

    Returns:
        A figure with one panel per timestep, titled with t and sqrt(alpha_bar_t).

    Raises:
        ConfigError: the image is not 2D, or a timestep is out of range.
    """
    from medidiff.diffusion.core import alpha_bar_at, q_sample
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

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(steps), figsize=(_PANEL_INCH * len(steps), 2.3), squeeze=False)
    for ax, t in zip(axes[0], steps):
        x_t = q_sample(schedule, x0, t, eps)[0, 0].numpy()
        alpha_bar = float(alpha_bar_at(schedule, torch.tensor([t]))[0])
        vmin, vmax = (0.0, 1.0) if t < 0 else _robust_range(x_t)
        label = "x_0 (clean)" if t < 0 else f"t={t}"
        _show(ax, x_t, f"{label}\n" + r"$\sqrt{\bar\alpha_t}$" + f"={math.sqrt(alpha_bar):.3f}",
              vmin=vmin, vmax=vmax)
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

    Runs :func:`medidiff.diffusion.core.sample` exactly as :class:`medidiff.synthesis.synthesizer.Synthesizer`
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
    from medidiff.diffusion.core import sample
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
    model (:func:`medidiff.diffusion.core.predict_x0`). 3D models show the axial middle slice.

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
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(picks), figsize=(_PANEL_INCH * len(picks), 4.3), squeeze=False)
    for col, k in enumerate(picks):
        frame = frames[k]
        x_t = _axial(frame.x_t)
        last = frame.t < 0
        rng = (0.0, 1.0) if last else _robust_range(x_t)
        _show(axes[0, col], x_t, "sample x_0" if last else f"x_t, t={frame.t}",
              vmin=rng[0], vmax=rng[1])
        _show(axes[1, col], _axial(frame.pred_x0),
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
    from medidiff.diffusion.core import q_sample
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


def _contour(ax: Any, mask_2d: np.ndarray, color: str) -> None:
    view = display_view(np.asarray(mask_2d, dtype=float))
    if view.max() > 0:
        ax.contour(view, levels=[0.5], colors=color, linewidths=0.9)


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
    from medidiff.anomaly.thresholds import Thresholds
    from medidiff.data.transforms import to_model

    if result is None:
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            thresholds = Thresholds.load(thresholds)
        result = detector.score(volume, mask=mask, thresholds=thresholds)
    grid = result.grid
    truth_grid = None
    if truth is not None:
        truth_grid = to_model(np.asarray(truth.array) > 0, result.preprocessed,
                              reference=truth, interpolation="nearest") > 0
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
    z = slice_index
    x_t = _noised_input(detector, grid.image, z, result.name)
    x_t_slice = x_t if detector.spatial_dims == 2 else x_t[:, :, z]
    method = detector.method
    t = int(method.t_starts[0])

    image = grid.image[:, :, z]
    amap = grid.anomaly_map[:, :, z]
    panels = 4 + (grid.segmentation is not None) + (truth_grid is not None)
    plt = _pyplot()
    fig, axes = plt.subplots(1, panels, figsize=(_PANEL_INCH * panels, 2.4), squeeze=False)
    axes = list(axes[0])
    _show(axes[0], image, "input x_0")
    lo, hi = _robust_range(x_t_slice)
    _show(axes[1], x_t_slice, f"x_t, t={t} ({method.noise})", vmin=lo, vmax=hi)
    _show(axes[2], grid.reconstruction[:, :, z], f"reconstruction ({method.method})")
    vmax = float(np.percentile(grid.anomaly_map[grid.mask], 99.9)) if grid.mask.any() else 1.0
    _show(axes[3], amap, "anomaly map", vmin=0.0, vmax=max(vmax, 1e-6), cmap="hot")
    col = 4
    if grid.segmentation is not None:
        _show(axes[col], image, "segmentation")
        _contour(axes[col], grid.segmentation[:, :, z], "red")
        col += 1
    if truth_grid is not None:
        _show(axes[col], image, "ground truth")
        _contour(axes[col], truth_grid[:, :, z], "lime")
    fig.suptitle(f"{result.name}: axial slice {z}, score {result.score:.4f}", fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------
# Training loss
# --------------------------------------------------------------------------------------------


def _read_loss(metrics_csv: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses) of a metrics.csv; a resumed run's repeated steps keep the last row."""
    if not metrics_csv.is_file():
        raise DataError(
            f"{metrics_csv}: no such metrics file (a training run writes RUN_DIR/metrics.csv)"
        )
    by_step: dict[int, float] = {}
    with open(metrics_csv, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "step" not in columns or "loss" not in columns:
            raise DataError(f"{metrics_csv}: needs 'step' and 'loss' columns; has {columns}")
        for row in reader:
            try:
                step, loss = int(float(row["step"])), float(row["loss"])
            except (TypeError, ValueError):
                continue
            if math.isfinite(loss) and loss > 0:
                by_step[step] = loss
    if not by_step:
        raise DataError(f"{metrics_csv}: no rows with a positive finite loss")
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def loss_curve(metrics_csv: str | os.PathLike, *, title: str | None = None) -> Any:
    """The training loss against the step, log y, with a smoothed line.

    The smoothed line is a centred moving average of log(loss) over an odd window of about
    5 % of the logged points (at least 1; the ends repeat the first and last values), i.e.
    a running geometric mean.

    Args:
        metrics_csv: a run's ``metrics.csv`` (columns ``step`` and ``loss``).
        title: the figure title (default: the run folder's name).

    Returns:
        The figure.

    Raises:
        DataError: missing file, missing columns or no usable rows.
    """
    path = Path(metrics_csv)
    steps, losses = _read_loss(path)
    window = max(1, int(round(0.05 * len(losses)))) | 1  # odd, so the average is centred
    logs = np.log(losses)
    kernel = np.ones(window) / window
    padded = np.pad(logs, window // 2, mode="edge")
    smooth = np.exp(np.convolve(padded, kernel, mode="valid"))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.0))
    ax.plot(steps, losses, color="0.7", linewidth=0.8, label="loss (logged)")
    ax.plot(steps, smooth, color="C0", linewidth=1.6, label=f"moving geometric mean ({window})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("noise-prediction MSE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title if title is not None else path.parent.name, fontsize=9)
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
    from medidiff.data.datasets import load_datalist

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
    from medidiff.models.checkpoint import load_inference
    from medidiff.config import Config
    from medidiff.diffusion.core import NoiseSchedule
    from medidiff.io.volume import load_volume
    from medidiff.diffusion.noise import NoiseSpec
    from medidiff.viz.display import save_figure
    from medidiff.data.transforms import Preprocessing, preprocess

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = _dataset_json(sample_data)
    ckpt = load_inference(checkpoint)
    config = Config.from_dict(ckpt.config)
    d = config.diffusion
    schedule = NoiseSchedule.create(d.schedule, num_train_timesteps=d.num_train_timesteps,
                                    beta_start=d.beta_start, beta_end=d.beta_end)
    spec = NoiseSpec(kind=d.noise, octaves=d.simplex_octaves, persistence=d.simplex_persistence,
                     **({"frequency": d.simplex_frequency} if d.simplex_frequency else {}))
    prep = Preprocessing.from_dict(ckpt.preprocessing)

    paths: dict[str, Path] = {}
    raw = json.loads(dataset.read_text())
    healthy = _entry(dataset, "validation" if raw.get("validation") else "training")
    scan = preprocess(load_volume(healthy.image), prep,
                      mask=load_volume(healthy.mask) if healthy.mask else None)
    brain = scan.mask > 0 if scan.mask is not None else scan.foreground
    z = int(np.argmax(np.asarray(brain).sum(axis=(0, 1))))
    paths["noising"] = save_figure(
        noising_strip(scan.image[:, :, z], schedule, spec, seed=seed), out / FIGURE_NAMES["noising"]
    )
    paths["reverse"] = save_figure(
        reverse_trajectory_strip(checkpoint, seed=seed, device=device),
        out / FIGURE_NAMES["reverse"],
    )
    if detector is None:
        detector = AnomalyDetector(checkpoint, device=device, seed=seed)
    case = _entry(dataset, "test", prefer="tumor-000", kind="tumor")
    fig = anomaly_strip(
        detector,
        load_volume(case.image),
        mask=load_volume(case.mask) if case.mask else None,
        truth=load_volume(case.segmentation) if case.segmentation else None,
        thresholds=thresholds,
        result=anomaly_result if getattr(anomaly_result, "name", None) == case.name else None,
    )
    paths["anomaly"] = save_figure(fig, out / FIGURE_NAMES["anomaly"])
    return paths

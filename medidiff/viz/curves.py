r"""The training-loss curve of a run's ``metrics.csv`` (:func:`loss_curve`).

Used by the model cards (``pipelines/export_default_models.py``) and ``docs/how_it_works.md``
(``pipelines/make_figures.py``); also re-exported by :mod:`medidiff.viz.figures`. The figure
is a :class:`matplotlib.figure.Figure` on an Agg canvas; write it with
:func:`medidiff.io.images.save_figure`.

Example:
    >>> import os, tempfile
    >>> run = tempfile.mkdtemp()
    >>> path = os.path.join(run, "metrics.csv")
    >>> _ = open(path, "w").write("step,loss\n1,0.5\n2,0.25\n3,0.2\n")
    >>> fig = loss_curve(path)
    >>> fig.axes[0].get_yscale()
    'log'
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.errors import DataError
from medidiff.io.images import new_figure

__all__ = ["loss_curve"]


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
    fig, axes = new_figure(1, 1, (5.0, 3.0))
    ax = axes[0, 0]
    ax.plot(steps, losses, color="0.7", linewidth=0.8, label="loss (logged)")
    ax.plot(steps, smooth, color="C0", linewidth=1.6, label=f"moving geometric mean ({window})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("noise-prediction MSE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title if title is not None else path.parent.name, fontsize=9)
    return fig

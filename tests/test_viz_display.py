"""Tests of medidiff.io.images and medidiff.viz.display/overlay: one display orientation, and
figures built without pyplot or a backend switch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medidiff.io.images import display_view, mid_slice, new_figure, save_figure
from medidiff.viz.overlay import overlay_figure

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _shown(ax) -> np.ndarray:
    return np.asarray(ax.images[0].get_array())


def test_mid_slice_of_2d_and_3d_samples():
    rng = np.random.default_rng(0)
    two = rng.uniform(size=(2, 5, 6))
    three = rng.uniform(size=(2, 5, 6, 7))
    np.testing.assert_array_equal(mid_slice(two), two[0])
    np.testing.assert_array_equal(mid_slice(three), three[0, :, :, 3])
    np.testing.assert_array_equal(mid_slice(two[0]), two[0])  # already 2D


def test_image_grid_panels_use_the_display_view(tmp_path, monkeypatch):
    import medidiff.io.images as images

    kept = {}

    def keep(fig, path, *, dpi=100):
        kept["fig"] = fig
        return save_figure(fig, path, dpi=dpi)

    monkeypatch.setattr(images, "save_figure", keep)
    rng = np.random.default_rng(1)
    batch = rng.uniform(size=(3, 1, 8, 10, 4)).astype(np.float32)
    path = images.save_image_grid(batch, tmp_path / "grid.png", columns=2, title="t")
    assert path.read_bytes()[:8] == PNG_MAGIC
    fig = kept["fig"]
    assert len(fig.axes) == 4 and not fig.axes[3].images  # 2 x 2, the last cell empty
    for i in range(3):
        np.testing.assert_array_equal(_shown(fig.axes[i]), display_view(batch[i, 0, :, :, 2]))


def test_overlay_figure_panels_and_contours():
    rng = np.random.default_rng(2)
    image = rng.uniform(size=(12, 14, 6)).astype(np.float32)
    recon = image * 0.5
    amap = np.zeros_like(image)
    amap[3:7, 4:9, 2:4] = 0.9
    seg = amap > 0.5
    fig = overlay_figure(image, recon, amap, segmentation=seg, truth=seg, slices=[1, 3],
                         title="case")
    assert [ax.get_title() for ax in fig.axes[:4]] == [
        "input", "reconstruction", "anomaly map", "segmentation"]
    assert len(fig.axes) == 9  # two rows of four, and the map's colour bar
    assert fig.axes[8].get_ylabel().startswith("|x - x_hat|")
    np.testing.assert_array_equal(_shown(fig.axes[0]), display_view(image[:, :, 1]))
    np.testing.assert_array_equal(_shown(fig.axes[5]), display_view(recon[:, :, 3]))
    # the map panel: the input under the map, the map masked at or below the floor
    np.testing.assert_array_equal(_shown(fig.axes[6]), display_view(image[:, :, 3]))
    top = np.ma.asarray(fig.axes[6].images[1].get_array())
    np.testing.assert_array_equal(top.filled(0), display_view(amap[:, :, 3]))
    # contours only where the masks have voxels: slice 1 none, slice 3 truth + segmentation
    assert not fig.axes[3].collections and len(fig.axes[7].collections) == 2


def _texts(ax):
    return [t.get_text() for t in ax.texts]


def test_overlay_reads_on_its_own_letters_slice_grid_colour_bar():
    """Orientation letters from the affine, each slice named with its grid, world z and
    the input's slice, a colour bar in the map's units, and a caption for the scale."""
    from medidiff.viz.overlay import orientation_letters, slice_label

    image = np.zeros((12, 14, 6), np.float32)
    image[2:10, 2:12, 1:5] = 0.5
    affine = np.diag([2.5, 2.5, 2.5, 1.0])
    affine[:3, 3] = (-15.0, -17.5, -7.5)
    native = np.diag([-2.0, 2.0, 2.0, 1.0])  # an LAS input: its k axis runs along z
    native[:3, 3] = (20.0, -20.0, -10.0)
    fig = overlay_figure(image, image, np.zeros_like(image), slices=[3], affine=affine,
                         native_affine=native, grid_note="model grid: a test")
    texts = _texts(fig.axes[0])
    assert {"L", "R", "A", "P"} <= set(texts)
    # slice 3: z = -7.5 + 3 * 2.5 = 0.0 mm; the input's k there: (0 + 10) / 2 = 5
    assert "axial slice 3 of 6 (model grid)\nz = +0.0 mm, input k = 5" in texts
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "model grid: a test" in caption and "not calibrated" in caption
    # a flipped grid gets flipped letters
    assert orientation_letters(np.diag([-1.0, -1.0, 1.0, 1.0])) == {
        "left": "R", "right": "L", "top": "P", "bottom": "A"}
    assert slice_label(0, 4) == "axial slice 0 of 4 (model grid)"


def test_overlay_colour_scale_is_fixed_not_each_scans_maximum():
    """Without thresholds two scans with very different maps get the same colour scale;
    with thresholds it is 3x the voxel threshold, marked on the colour bar."""
    from types import SimpleNamespace

    from medidiff.viz.overlay import UNCALIBRATED_TOP, map_scale

    image = np.full((8, 8, 4), 0.5, np.float32)
    tops = []
    for peak in (0.05, 0.9):
        amap = np.zeros_like(image)
        amap[2:5, 2:5, 1] = peak
        fig = overlay_figure(image, image, amap, slices=[1])
        tops.append(fig.axes[2].images[1].get_clim())
    assert tops[0] == tops[1] == (0.0, UNCALIBRATED_TOP["l1"])
    scale = map_scale(SimpleNamespace(voxel_threshold=0.05), "l2")
    assert scale.top == pytest.approx(0.15) and scale.units.startswith("(x - x_hat)^2")
    fig = overlay_figure(image, image, np.zeros_like(image), slices=[1], scale=scale)
    assert fig.axes[2].images[1].get_clim() == (0.0, pytest.approx(0.15))
    assert any("threshold" in t for t in _texts(fig.axes[-1]))
    assert "3x the calibrated voxel threshold" in " ".join(t.get_text() for t in fig.texts)


def test_save_figure_writes_png_atomically(tmp_path):
    fig, axes = new_figure(1, 2, (2.0, 1.0))
    axes[0, 0].plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "f.png")
    assert path == tmp_path / "f.png" and path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]  # no temporary left behind


_NO_BACKEND_SWITCH = r"""
import sys
import matplotlib
matplotlib.use("svg")  # a user's own (non-Agg) backend, e.g. a notebook's
import numpy as np
from pathlib import Path
from medidiff.diffusion import NoiseSchedule
from medidiff.diffusion.noise import NoiseSpec
from medidiff.io.images import save_figure, save_image_grid
from medidiff.viz import figures
from medidiff.viz.overlay import save_overlay

out = Path(sys.argv[1])
x = np.zeros((16, 16, 8), np.float32); x[4:12, 4:12, 2:6] = 0.5
m = np.zeros_like(x); m[6:9, 6:9, 3:5] = 0.4
save_overlay(x, x, m, out / "o.png", segmentation=m > 0.2, truth=m > 0.1, title="t")
save_image_grid(np.zeros((2, 1, 8, 8)), out / "g.png", title="t")
fig = figures.noising_strip(x[:, :, 3], NoiseSchedule.create(num_train_timesteps=10),
                            NoiseSpec("gaussian"), timesteps=(-1, 5))
save_figure(fig, out / "n.png")
(out / "metrics.csv").write_text("step,loss\n1,0.5\n2,0.25\n")
save_figure(figures.loss_curve(out / "metrics.csv"), out / "l.png")
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""


def test_figures_do_not_switch_the_backend_or_import_pyplot(tmp_path):
    """A fresh interpreter (the backend is process-wide) with the svg backend selected: the
    overlay, grid, strip and loss-curve writers leave it selected and never import pyplot."""
    proc = subprocess.run([sys.executable, "-c", _NO_BACKEND_SWITCH, str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["svg", "False"]
    for name in ("o.png", "g.png", "n.png", "l.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC, name


def test_save_figure_closes_a_pyplot_figure(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    fig = plt.figure(figsize=(1, 1))
    number = fig.number
    save_figure(fig, tmp_path / "p.png")
    assert number not in plt.get_fignums()

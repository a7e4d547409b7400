"""Tests of medidiff.viz.figures and of the function links in docs/how_it_works.md."""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from medidiff.diffusion import NoiseSchedule, inference_timesteps
from medidiff.diffusion.noise import NoiseSpec, sample_noise
from medidiff.errors import ConfigError, DataError
from medidiff.io.images import display_view, save_figure
from medidiff.viz import figures

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
DOC = ROOT / "docs" / "how_it_works.md"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _panel(fig, i: int) -> np.ndarray:
    """The data panel ``i`` shows, back in RAS (X, Y) order."""
    shown = np.asarray(fig.axes[i].images[0].get_array())
    return np.flipud(shown).T


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def _linear_alpha_bar(t: int, T: int = 1000) -> float:
    """alpha_bar_t of the linear schedule 1e-4 .. 0.02, by hand in numpy (independent)."""
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    return float(np.prod(1.0 - betas[: t + 1]))


# ---- the forward process -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "simplex"])
def test_noising_strip_shows_q_sample_closed_form(kind, tmp_path):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (32, 40)).astype(np.float32)
    schedule, spec = NoiseSchedule.create("linear_beta", 1000), NoiseSpec(kind)
    fig = figures.noising_strip(image, schedule, spec, timesteps=(-1, 0, 500, 999), seed=3)
    assert len(fig.axes) == 4
    eps = sample_noise(spec, (1, 1, 32, 40), seeds=[3])[0, 0].numpy().astype(np.float64)
    # t = -1: the clean slice, bit for bit
    np.testing.assert_array_equal(_panel(fig, 0), image)
    # t = 0: one step of beta_1 = 1e-4, i.e. noise of standard deviation 0.01
    x_0 = _panel(fig, 1)
    assert np.abs(x_0 - image).max() < 0.01 * np.abs(eps).max() + 1e-4
    for i, t in ((1, 0), (2, 500), (3, 999)):
        a = _linear_alpha_bar(t)
        expected = math.sqrt(a) * image + math.sqrt(1 - a) * eps
        np.testing.assert_allclose(_panel(fig, i), expected, atol=2e-5)
        assert f"={math.sqrt(a):.3f}" in fig.axes[i].get_title()
    assert "t=500" in fig.axes[2].get_title()
    assert _is_png(save_figure(fig, tmp_path / "noising.png"))


def test_noising_strip_default_starts_at_t0_nearly_the_input():
    image = np.full((24, 24), 0.5, np.float32)
    image[6:18, 6:18] = 0.9
    fig = figures.noising_strip(image, NoiseSchedule.create(), NoiseSpec("simplex"))
    assert len(fig.axes) == 7
    assert fig.axes[0].get_title().startswith("t=0")
    first = _panel(fig, 0)
    # unchanged up to the t=0 noise (std sqrt(1e-4) = 0.01 on unit-variance simplex noise)
    assert np.abs(first - image).max() < 0.06
    assert np.corrcoef(first.ravel(), image.ravel())[0, 1] > 0.99


def test_noising_strip_rejects_bad_input():
    schedule, spec = NoiseSchedule.create(num_train_timesteps=10), NoiseSpec()
    with pytest.raises(ConfigError, match="2D slice"):
        figures.noising_strip(np.zeros((4, 4, 4)), schedule, spec)
    with pytest.raises(ConfigError, match="timesteps"):
        figures.noising_strip(np.zeros((8, 8)), schedule, spec, timesteps=(0, 10))


def test_display_view_puts_anterior_up():
    x = np.zeros((4, 6))
    x[0, 5] = 1  # patient's left (x = 0 in RAS), most anterior (largest y)
    view = display_view(x)
    assert view.shape == (6, 4) and view[0, 0] == 1


# ---- the reverse process -------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_reverse_trajectory_ends_at_the_samplers_sample(tiny_checkpoint_2d, sampler):
    from medidiff.synthesis.synthesizer import Synthesizer

    frames = figures.reverse_trajectory(tiny_checkpoint_2d, sampler=sampler, steps=3, seed=5)
    assert [f.t for f in frames] == inference_timesteps(999, 3).tolist() + [-1]
    synth = Synthesizer(tiny_checkpoint_2d, device="cpu", sampler=sampler, steps=3)
    (reference,) = list(synth.generate([0], seed=5))  # sample 0 uses seed 5 + 0
    np.testing.assert_allclose(frames[-1].x_t, reference.array, atol=1e-5)
    # the first state is the initial noise itself: x_{T-1} of the model's noise kind
    noise = sample_noise(synth.noise_spec, (1, 1, *synth.spatial_shape), seeds=[5])[0, 0]
    np.testing.assert_allclose(frames[0].x_t, noise.numpy(), atol=1e-6)
    # x_0 estimates are clipped to the data range like the Synthesizer's
    assert all(f.pred_x0.min() >= 0 and f.pred_x0.max() <= 1 for f in frames)


def test_reverse_trajectory_strip_two_rows(tiny_checkpoint_2d, tmp_path):
    fig = figures.reverse_trajectory_strip(tiny_checkpoint_2d, steps=4, shown=3, seed=1)
    assert len(fig.axes) == 6  # 2 rows x 3 columns
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "x_t, t=999" and titles[2] == "sample x_0"
    frames = figures.reverse_trajectory(tiny_checkpoint_2d, steps=4, seed=1)
    np.testing.assert_allclose(_panel(fig, 2), frames[-1].x_t, atol=1e-6)
    np.testing.assert_allclose(_panel(fig, 4), frames[2].pred_x0, atol=1e-6)  # middle state
    assert _is_png(save_figure(fig, tmp_path / "reverse.png"))
    with pytest.raises(ConfigError, match="shown"):
        figures.reverse_trajectory_strip(tiny_checkpoint_2d, steps=2, shown=1)


# ---- anomaly detection ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tumour():
    from medidiff.io.volume import load_volume

    if not (SAMPLE / "dataset.json").exists():
        pytest.skip("sample_data not built")
    return {
        key: load_volume(SAMPLE / "test" / folder / "tumor-000.nii.gz")
        for key, folder in (("image", "images"), ("mask", "brainmasks"), ("truth", "labels"))
    }


def test_anomaly_strip_panels_and_noise(tiny_checkpoint_2d, tumour, tmp_path):
    from medidiff.anomaly.detector import AnomalyDetector, MethodConfig
    from medidiff.diffusion import predict_x0
    from medidiff.data.transforms import to_model

    detector = AnomalyDetector(tiny_checkpoint_2d, MethodConfig("x0"), seed=4)
    fig = figures.anomaly_strip(detector, tumour["image"], mask=tumour["mask"],
                                truth=tumour["truth"])
    assert [ax.get_title().split(" ")[0] for ax in fig.axes] == [
        "input", "x_t,", "reconstruction", "anomaly", "ground"]
    result = detector.score(tumour["image"], mask=tumour["mask"])
    truth = to_model(tumour["truth"].array > 0, result.preprocessed, interpolation="nearest")
    z = int(np.argmax((truth > 0).sum(axis=(0, 1))))
    assert f"slice {z}" in fig.texts[0].get_text()
    np.testing.assert_allclose(_panel(fig, 0), result.grid.image[:, :, z])
    np.testing.assert_allclose(_panel(fig, 2), result.grid.reconstruction[:, :, z], atol=1e-6)
    np.testing.assert_allclose(_panel(fig, 3), result.grid.anomaly_map[:, :, z], atol=1e-6)
    # the x_t panel is the detector's own x_t: one x_0 prediction from it gives its recon
    x_t = torch.from_numpy(np.ascontiguousarray(_panel(fig, 1), dtype=np.float32))[None, None]
    t = torch.full((1,), detector.method.t_starts[0], dtype=torch.long)
    with torch.no_grad():
        x0 = predict_x0(detector.reconstructor.schedule, detector.model(x_t, t), x_t, t).clamp(0, 1)
    np.testing.assert_allclose(x0[0, 0].numpy(), result.grid.reconstruction[:, :, z], atol=1e-4)
    assert _is_png(save_figure(fig, tmp_path / "anomaly.png"))


def test_anomaly_strip_segmentation_with_thresholds(tiny_checkpoint_2d, tumour):
    from medidiff.anomaly.detector import AnomalyDetector, MethodConfig
    from medidiff.anomaly.runner import calibrate
    from medidiff.io.volume import load_volume

    detector = AnomalyDetector(tiny_checkpoint_2d, MethodConfig("x0"))
    healthy = [load_volume(SAMPLE / "test" / "images" / "healthy-000.nii.gz")]
    thresholds = calibrate(detector, healthy, fpr=0.05, allow_few=True)
    fig = figures.anomaly_strip(detector, tumour["image"], thresholds=thresholds, slice_index=10)
    assert [ax.get_title() for ax in fig.axes][-1] == "segmentation"  # no truth given
    assert "slice 10" in fig.texts[0].get_text()
    with pytest.raises(ConfigError, match="slice_index"):
        figures.anomaly_strip(detector, tumour["image"], slice_index=999)


# ---- loss curve ----------------------------------------------------------------------------


def test_loss_curve_log_scale_resume_and_smoothing(tmp_path):
    rows = ["step,loss,lr"] + [f"{s},{1.0 / s},0.1" for s in range(1, 41)]
    rows += ["30,0.5,0.1", "41,nan,0.1"]  # a resumed run repeats step 30; a NaN row is skipped
    path = tmp_path / "run" / "metrics.csv"
    path.parent.mkdir()
    path.write_text("\n".join(rows) + "\n")
    fig = figures.loss_curve(path)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_title() == "run"
    raw, smooth = ax.lines[0], ax.lines[1]
    np.testing.assert_array_equal(raw.get_xdata(), np.arange(1, 41))
    y = raw.get_ydata()
    assert y[29] == 0.5 and y[0] == 1.0  # last row of step 30 wins
    # window = round(0.05 * 40) = 2, made odd: 3, a centred geometric mean, ends repeated
    padded = np.concatenate([y[:1], y, y[-1:]])
    expected = np.cbrt(padded[:-2] * padded[1:-1] * padded[2:])
    np.testing.assert_allclose(smooth.get_ydata(), expected, rtol=1e-9)
    assert _is_png(save_figure(fig, tmp_path / "loss.png"))


def test_loss_curve_errors(tmp_path):
    with pytest.raises(DataError, match="no such metrics file"):
        figures.loss_curve(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("step,lr\n1,0.1\n")
    with pytest.raises(DataError, match="'loss'"):
        figures.loss_curve(bad)


# ---- the set for the docs ------------------------------------------------------------------


def test_save_how_it_works_figures_writes_three_pngs(tiny_checkpoint_2d, tmp_path):
    from medidiff.anomaly.detector import AnomalyDetector, MethodConfig

    detector = AnomalyDetector(tiny_checkpoint_2d, MethodConfig("x0"))
    paths = figures.save_how_it_works_figures(tiny_checkpoint_2d, SAMPLE, tmp_path / "figs",
                                              detector=detector)
    assert set(paths) == {"noising", "reverse", "anomaly"}
    for key, path in paths.items():
        assert path == tmp_path / "figs" / figures.FIGURE_NAMES[key] and _is_png(path)
    with pytest.raises(DataError, match="dataset.json"):
        figures.save_how_it_works_figures(tiny_checkpoint_2d, tmp_path, tmp_path / "x")


# ---- the doc stays honest ------------------------------------------------------------------

_LINK = re.compile(r"\[`([A-Za-z_][\w.]*)(?:\(\))?`\]\((\.\./[^)#\s]+\.py)\)")


def _doc_links() -> list[tuple[str, str]]:
    if not DOC.exists():
        pytest.skip("docs/how_it_works.md not written")
    return _LINK.findall(DOC.read_text(encoding="utf-8"))


def test_doc_links_name_functions_that_exist():
    links = _doc_links()
    assert len(links) >= 10, "how_it_works.md should link the functions it explains"
    missing = []
    for name, rel in links:
        path = (DOC.parent / rel).resolve()
        assert path.is_file(), f"{rel} linked from how_it_works.md does not exist"
        module_name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        obj = importlib.import_module(module_name)
        for part in name.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                missing.append(f"{name} in {rel}")
                break
    assert not missing, f"how_it_works.md links names that do not exist: {missing}"


def test_doc_figures_exist():
    if not DOC.exists():
        pytest.skip("docs/how_it_works.md not written")
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", DOC.read_text(encoding="utf-8"))
    assert {"figures/noising.png", "figures/reverse.png", "figures/anomaly.png"} <= set(images)
    for rel in images:
        path = DOC.parent / rel
        assert _is_png(path) and path.stat().st_size < 300 * 1024, rel

"""Quality, diversity and memorisation metrics of synthetic scans against real ones.

Every metric compares images on the **model grid and scale**: real scans go through the
checkpoint's preprocessing (RAS, spacing, crop/pad, intensity to [0, 1]); synthetic
samples written by ``medidiff synthesize`` are mapped back from the training data's
intensity scale with the reference recorded in ``synthesis_config.json``. For a 2D model
the real images are the axial slices a 2D model trains on (foreground fraction at least
the checkpoint's ``data.min_foreground``), for a 3D model the whole volumes.

The metrics (:class:`SynthesisEvaluation`):

- **Diversity, MS-SSIM** (Wang, Simoncelli & Bovik 2003; MONAI's
  :class:`monai.metrics.MultiScaleSSIMMetric`): the mean MS-SSIM over pairs of synthetic
  samples, and over pairs of real images for reference. Lower means more diverse; a
  generator that collapses to one image scores near 1. Pinaya et al. 2022 report 0.66
  for real brain MRI. The standard setting (5 scales, 11-voxel Gaussian window) needs
  images larger than 160 voxels per side; :func:`ms_ssim_settings` keeps the largest window
  that allows at least 3 scales (11, 7, 5, then 3 voxels, sigma scaled by window/11) and
  renormalises the first weights of Wang et al.'s five. Settings are reported; compare
  numbers only between runs with the same settings.
- **Foreground intensity distance**: the Wasserstein-1 (earth mover's) distance between
  the intensity distributions of the foreground voxels (model scale > 0.05), pooled over
  each set. A shift of every foreground value by d gives exactly d.
- **Fréchet distance on fixed features** (:func:`image_features`, ``medidiff-stats-v1``):
  hand-crafted, fully specified statistics that need no weights and no download. NOT FID:
  no Inception network is involved, and the numbers are not comparable with published
  FIDs. See :func:`image_features` for what the features see and miss.
- **Memorisation**: for each synthetic sample, the real image with the highest SSIM
  (Gaussian window 11, sigma 1.5, MONAI's formulation; 2D samples against every training
  slice, 3D against every volume). A sample is flagged as a near-copy when that SSIM
  exceeds the threshold. Default threshold: ``max(0.95, q99)``, where q99 is the 99th
  percentile of the real-vs-real nearest-neighbour SSIM (each real image's nearest image
  from *another* scan): a synthetic sample closer to a training image than 99 % of real
  images are to another subject's, and above 0.95 in absolute terms, is suspicious. On
  cohorts whose subjects are very alike (e.g. simulated from one template) the data-driven
  part raises the bar so that ordinary similarity is not called copying.

The pieces live in :mod:`~medidiff.synthesis.image_sets` (real and synthetic images on the
model grid), :mod:`~medidiff.synthesis.similarity` (MS-SSIM, SSIM search) and
:mod:`~medidiff.synthesis.distances` (Fréchet, Wasserstein); this module combines them and
re-exports their public names.

Example:
    >>> import numpy as np
    >>> from medidiff.synthesis.metrics import frechet_distance
    >>> rng = np.random.default_rng(0)
    >>> a = rng.normal(size=(500, 3))
    >>> round(frechet_distance(a, a), 6)
    0.0
"""


from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medidiff.errors import ConfigError, DataError
from medidiff.synthesis.distances import (
    DEFAULT_FOREGROUND_THRESHOLD,
    FEATURES_DESCRIPTION,
    FEATURES_VERSION,
    FrechetResult,
    foreground_values,
    foreground_wasserstein,
    frechet_distance,
    image_features,
)
from medidiff.synthesis.image_sets import ImageSet, load_real_images, load_synthetic_images
from medidiff.synthesis.similarity import (
    MEMORISATION_FLOOR,
    MEMORISATION_PERCENTILE,
    Diversity,
    Memorisation,
    MSSSIMSettings,
    SSIMSearch,
    ms_ssim_diversity,
    ms_ssim_settings,
)

__all__ = [
    "FEATURES_VERSION",
    "Diversity",
    "FrechetResult",
    "ImageSet",
    "MSSSIMSettings",
    "Memorisation",
    "RealReference",
    "SSIMSearch",
    "SynthesisEvaluation",
    "evaluate_against",
    "evaluate_synthesis",
    "foreground_wasserstein",
    "frechet_distance",
    "image_features",
    "load_real_images",
    "load_synthetic_images",
    "ms_ssim_diversity",
    "ms_ssim_settings",
]


# --------------------------------------------------------------------------------------------
# putting it together
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RealReference:
    """Everything computed once from the real set (reused across synthetic sets).

    Build it with :meth:`build`; :func:`evaluate_against` then scores synthetic sets.
    """

    images: ImageSet
    features: np.ndarray
    foreground: np.ndarray
    diversity: Diversity
    search: SSIMSearch
    real_nn_ssim: Mapping[str, float]
    foreground_threshold: float
    max_pairs: int
    seed: int

    @staticmethod
    def build(
        real: ImageSet,
        *,
        foreground_threshold: float = DEFAULT_FOREGROUND_THRESHOLD,
        max_pairs: int = 500,
        reference_queries: int = 64,
        seed: int = 0,
    ) -> RealReference:
        """Features, diversity, SSIM index and real-vs-real nearest-neighbour SSIMs of ``real``.

        Args:
            real: the real images (ideally the training scans: memorisation is about them).
            foreground_threshold: model-scale foreground for the intensity distance.
            max_pairs: MS-SSIM pairs for the diversity.
            reference_queries: real images (seeded random subset) whose nearest image from
                another scan sets the real-vs-real SSIM distribution.
            seed: seed of the random subsets.
        """
        if len(real) < 2:
            raise DataError(f"need at least 2 real images; got {len(real)}")
        search = SSIMSearch(real.images, real.spatial_dims)
        groups = np.asarray(real.groups)
        rng = np.random.default_rng(seed)
        queries = rng.choice(len(real), size=min(reference_queries, len(real)), replace=False)
        nn = []
        for q in queries:
            others = groups != groups[q]
            if others.any():
                nn.append(float(search.ssim(real.images[q])[others].max()))
        stats = {"queries": len(nn)}
        if nn:
            stats.update({
                "p50": float(np.percentile(nn, 50)), "p95": float(np.percentile(nn, 95)),
                "p99": float(np.percentile(nn, 99)), "max": float(np.max(nn)),
            })
        return RealReference(
            images=real, features=image_features(real),
            foreground=foreground_values(real, foreground_threshold),
            diversity=ms_ssim_diversity(real, max_pairs=max_pairs, seed=seed), search=search,
            real_nn_ssim=stats, foreground_threshold=foreground_threshold, max_pairs=max_pairs, seed=seed,
        )

    def default_threshold(self) -> tuple[float, str]:
        """``max(0.95, p99 of real-vs-real nearest-neighbour SSIM)`` and its explanation."""
        p99 = self.real_nn_ssim.get("p99")
        if p99 is None or not math.isfinite(p99):
            return MEMORISATION_FLOOR, f"fixed {MEMORISATION_FLOOR} (no real-vs-real reference: one scan)"
        value = max(MEMORISATION_FLOOR, float(p99))
        return value, (
            f"max({MEMORISATION_FLOOR}, p{MEMORISATION_PERCENTILE:g} of real-vs-real nearest-neighbour "
            f"SSIM = {p99:.4f})"
        )


#: Below this many images on either side the Fréchet distance gets a warning (see
#: :attr:`SynthesisEvaluation.warnings`).
FRECHET_MIN_SAMPLES = 10


@dataclass(frozen=True)
class SynthesisEvaluation:
    """All synthesis metrics of one synthetic set against one real set.

    Attributes:
        n_real, n_synthetic: set sizes (images: slices for 2D, volumes for 3D).
        kind: ``"2d-slice"`` or ``"3d-volume"``.
        diversity_synthetic, diversity_real: mean pairwise MS-SSIM (lower = more diverse).
        foreground_w1: Wasserstein-1 between foreground intensity distributions (model scale).
        frechet: the Fréchet distance on fixed features (NOT FID).
        memorisation: nearest real image per sample and the near-copy flags.
        foreground_threshold: the model-scale foreground threshold used.
        sources: provenance (folders, checkpoint, grid).
    """

    n_real: int
    n_synthetic: int
    kind: str
    diversity_synthetic: Diversity
    diversity_real: Diversity
    foreground_w1: float
    frechet: FrechetResult
    memorisation: Memorisation
    foreground_threshold: float
    sources: Mapping[str, Any] = field(default_factory=dict)

    @property
    def warnings(self) -> tuple[str, ...]:
        """Caveats the numbers need: a Fréchet distance from fewer than
        :data:`FRECHET_MIN_SAMPLES` images on either side.

        The Fréchet distance compares means and covariances estimated from the two sets.
        With few images the estimates are noisy and the distance is biased upwards: two
        samples of n images from the *same* distribution are apart by 2 tr(Sigma) / n in
        expectation in the mean term alone (Chong & Forsyth, CVPR 2020, show that FID's
        bias falls like 1/n), and with fewer images than features the covariance is
        singular. A value from a handful of
        samples therefore cannot be compared with one from a larger set (e.g. a model
        card's), and is not a quality measure on its own.
        """
        small = min(self.n_synthetic, self.n_real)
        if small >= FRECHET_MIN_SAMPLES:
            return ()
        sides = " and ".join(
            f"{n} {side}" for side, n in (("synthetic", self.n_synthetic), ("real", self.n_real))
            if n < FRECHET_MIN_SAMPLES
        )
        return (
            f"Frechet distance from only {sides} image(s) (< {FRECHET_MIN_SAMPLES} per side): "
            "means and covariances from so few images are noisy and the distance is biased "
            "upwards at small n (the covariance is singular with fewer images than the "
            f"{self.frechet.num_features} features), so it is not comparable with values from "
            "larger sets such as a model card's; generate more samples (--num)",
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN written as ``NaN``)."""
        out = {"warnings": list(self.warnings), **asdict(self)}
        out["metric_notes"] = {
            "ms_ssim": "mean pairwise MS-SSIM (MONAI MultiScaleSSIMMetric); lower = more diverse",
            "foreground_w1": "Wasserstein-1 distance between foreground (> threshold) intensity "
                             "distributions on the model scale [0, 1]",
            "frechet": FEATURES_DESCRIPTION,
            "memorisation": "nearest real image by SSIM (window 11, sigma 1.5); flagged above threshold",
        }
        return out

    def table(self) -> str:
        """The aligned text table ``medidiff evaluate-synthesis`` prints."""
        d_s, d_r, m = self.diversity_synthetic, self.diversity_real, self.memorisation
        s = d_s.settings
        nn = np.asarray(m.nearest_ssim) if m.nearest_ssim else np.asarray([np.nan])
        rows = [
            ("images", f"{self.n_synthetic} synthetic vs {self.n_real} real ({self.kind})"),
            ("MS-SSIM synthetic",
             f"{d_s.mean:.4f} +- {d_s.std:.4f} ({d_s.pairs} pairs; lower = more diverse)"),
            ("MS-SSIM real", f"{d_r.mean:.4f} +- {d_r.std:.4f} ({d_r.pairs} pairs)"),
            ("MS-SSIM settings", f"{s.scales} scales, window {s.kernel_size} (sigma {s.kernel_sigma:.3g})"),
            ("foreground W1",
             f"{self.foreground_w1:.4f} (model scale, foreground > {self.foreground_threshold:g})"),
            ("Frechet (stats-v1)", f"{self.frechet.distance:.4f} ({self.frechet.num_features} fixed "
                                   "features; NOT FID)"),
            ("nearest real SSIM", f"median {np.nanmedian(nn):.4f}, max {np.nanmax(nn):.4f}"),
            ("memorisation", f"{len(m.flagged)} of {len(m.nearest_ssim)} flagged (SSIM > {m.threshold:.4f})"),
        ]
        rows += [("  near-copy", f"{name} ~ {real} (SSIM {v:.4f})")
                 for name, real, v in zip(self._synthetic_names(), m.nearest_real, m.nearest_ssim)
                 if name in m.flagged]
        width = max(len(r[0]) for r in rows) + 2
        lines = [f"WARNING: {w}" for w in self.warnings]
        return "\n".join([*lines, *(f"{k.ljust(width)}{v}" for k, v in rows)])

    def _synthetic_names(self) -> tuple[str, ...]:
        return tuple(self.sources.get("synthetic_names", ()))


def evaluate_against(
    reference: RealReference,
    synthetic: ImageSet,
    *,
    memorisation_threshold: float | None = None,
    sources: Mapping[str, Any] | None = None,
) -> SynthesisEvaluation:
    """Score a synthetic set against a prepared real reference.

    Args:
        reference: from :meth:`RealReference.build`.
        synthetic: the synthetic images (same grid and ``spatial_dims`` as the real ones).
        memorisation_threshold: SSIM above which a sample is a near-copy; ``None``: the
            reference's default (:meth:`RealReference.default_threshold`).
        sources: provenance to keep in the result.

    Raises:
        DataError: the sets have different image shapes, or fewer than 2 synthetic images.
    """
    real = reference.images
    if synthetic.images.shape[1:] != real.images.shape[1:]:
        raise DataError(
            f"synthetic images {synthetic.images.shape[2:]} and real images {real.images.shape[2:]} "
            "are not on the same grid"
        )
    if len(synthetic) < 2:
        raise DataError(f"need at least 2 synthetic images; got {len(synthetic)}")
    if memorisation_threshold is None:
        threshold, rule = reference.default_threshold()
    else:
        if not 0 < memorisation_threshold <= 1:
            raise ConfigError(f"--memorisation-threshold must lie in (0, 1]; got {memorisation_threshold}")
        threshold, rule = float(memorisation_threshold), "given"
    feats = image_features(synthetic)
    frechet = FrechetResult(
        distance=frechet_distance(reference.features, feats), num_features=feats.shape[1],
        n_real=len(real), n_synthetic=len(synthetic),
    )
    nearest, names = [], []
    for image in synthetic.images:
        scores = reference.search.ssim(image)
        best = int(np.argmax(scores))
        nearest.append(float(scores[best]))
        names.append(real.names[best])
    flagged = tuple(n for n, v in zip(synthetic.names, nearest) if v > threshold)
    memo = Memorisation(threshold, rule, tuple(nearest), tuple(names), flagged, dict(reference.real_nn_ssim))
    kind = "2d-slice" if synthetic.spatial_dims == 2 else "3d-volume"
    return SynthesisEvaluation(
        n_real=len(real), n_synthetic=len(synthetic), kind=kind,
        diversity_synthetic=ms_ssim_diversity(synthetic, max_pairs=reference.max_pairs, seed=reference.seed),
        diversity_real=reference.diversity,
        foreground_w1=foreground_wasserstein(reference.foreground, foreground_values(
            synthetic, reference.foreground_threshold)),
        frechet=frechet, memorisation=memo, foreground_threshold=reference.foreground_threshold,
        sources={**(sources or {}), "synthetic_names": list(synthetic.names)},
    )


def evaluate_synthesis(
    real: Any,
    synthetic_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    split: str | None = None,
    memorisation_threshold: float | None = None,
    foreground_threshold: float = DEFAULT_FOREGROUND_THRESHOLD,
    max_pairs: int = 500,
    seed: int = 0,
) -> SynthesisEvaluation:
    """Evaluate a folder of synthetic samples against real scans.

    Args:
        real: real scans (files, folder, glob, datalist, or a list of these); pass the
            model's training scans for a meaningful memorisation check.
        synthetic_dir: a ``medidiff synthesize`` output folder (or any folder of volumes
            with ``checkpoint``).
        checkpoint: the model whose preprocessing defines the common grid; default: the
            one recorded in ``synthetic_dir/synthesis_config.json``.
        split: the split of a Decathlon ``real`` datalist (default ``training``).
        memorisation_threshold: SSIM above which a sample is a near-copy (default: see
            :meth:`RealReference.default_threshold`).
        foreground_threshold: model-scale foreground for the intensity distance.
        max_pairs: MS-SSIM pairs per set.
        seed: seed of random pair / query subsets.

    Returns:
        The :class:`SynthesisEvaluation`.
    """
    synthetic, source, prep, min_foreground = load_synthetic_images(synthetic_dir, checkpoint=checkpoint)
    real_set = load_real_images(real, prep, spatial_dims=synthetic.spatial_dims,
                                min_foreground=min_foreground, split=split)
    reference = RealReference.build(real_set, foreground_threshold=foreground_threshold,
                                    max_pairs=max_pairs, seed=seed)
    sources = {
        "synthetic": asdict(source),
        "real": [str(r) for r in (real if isinstance(real, (list, tuple)) else [real])],
        "model_grid": {"shape": list(prep.shape), "spacing": list(prep.spacing)},
        "real_min_foreground": min_foreground if synthetic.spatial_dims == 2 else None,
    }
    return evaluate_against(reference, synthetic, memorisation_threshold=memorisation_threshold,
                            sources=sources)

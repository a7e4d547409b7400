"""The names medidiff accepts, in one place: anomaly methods, samplers, schedules, noise
kinds, prediction types, timestep spacings, and the defaults the CLI help quotes.

Config validation (:mod:`medidiff.config`), the CLI's ``choices=`` and help texts, the
diffusion registries (:data:`medidiff.diffusion.samplers.SAMPLER_CLASSES`, the schedule
table of :mod:`medidiff.diffusion.schedules`, the prediction table of
:mod:`medidiff.diffusion.prediction`) and the anomaly methods all read them from here, and
``tests/test_constants.py`` checks that every name has an implementation and every
implementation a name. This module imports nothing, so ``medidiff --help`` stays instant.

Example:
    >>> from medidiff.constants import SAMPLERS, SCHEDULES
    >>> "dpm++2m" in SAMPLERS, "sigmoid_beta" in SCHEDULES
    (True, True)
"""

from __future__ import annotations

__all__ = [
    "ANOMALY_DEFAULTS",
    "ANOMALY_METHODS",
    "AUTOENCODER_KINDS",
    "CALIBRATION_DEFAULTS",
    "DEFAULT_RESIDUALS",
    "ENSEMBLE_STARTS",
    "MULTI_STARTS",
    "MULTI_START_METHODS",
    "FLOW_TIME_SAMPLINGS",
    "GENERATIVE_SAMPLERS",
    "NOISE_KINDS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SCHEDULES",
    "SPACINGS",
    "STAGES",
    "SYNTHESIS_DEFAULT_STEPS",
]

#: What ``medidiff train`` trains: a diffusion U-Net on images, the autoencoder that is
#: the first stage of a latent model, or the latent model's diffusion U-Net on the latents
#: of a trained (frozen) autoencoder.
STAGES = ("diffusion", "autoencoder", "latent", "controlnet")

#: The autoencoders of a latent model (``autoencoder.kind``): KL-regularised (MONAI
#: ``AutoencoderKL``) or vector-quantised (MONAI ``VQVAE``); Rombach et al. 2022's "KL-reg."
#: and "VQ-reg." first stages (see :mod:`medidiff.models.autoencoder`).
AUTOENCODER_KINDS = ("kl", "vq")

#: Noise schedules (MONAI's names, ``monai.networks.schedulers.NoiseSchedules``).
SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")

#: What the network outputs: eps, v (Salimans & Ho 2022), x_0 itself, or the rectified-flow
#: velocity u = x_0 - eps (Liu et al. 2023; see :mod:`medidiff.diffusion.flow`).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

#: The kinds of noise eps: white Gaussian, or multi-octave simplex (AnoDDPM).
NOISE_KINDS = ("gaussian", "simplex")

#: Reverse samplers: ancestral DDPM, DDIM, DPM-Solver++(2M), one-shot x_0 prediction, and
#: the Euler integrator of rectified-flow models (``prediction_type: flow``; the only
#: generative sampler those models take, with ``"x0"``).
SAMPLERS = ("ddpm", "ddim", "dpm++2m", "x0", "euler")

#: The samplers that generate from pure noise (the one-shot ``"x0"`` predictor does not).
GENERATIVE_SAMPLERS = ("ddpm", "ddim", "dpm++2m", "euler")

#: How a rectified-flow model's training times s are drawn (``diffusion.flow_time_sampling``):
#: logit-normal (Esser et al. 2024, better than uniform) or uniform on (0, 1).
FLOW_TIME_SAMPLINGS = ("logit-normal", "uniform")

#: Timestep spacings of the samplers (see :func:`medidiff.diffusion.sampling.inference_timesteps`).
SPACINGS = ("trailing", "linspace")

#: Network evaluations per synthesised sample when ``--steps`` is not given: DDPM runs the
#: whole ancestral chain (``None`` = all T timesteps); DDIM 50 (Pinaya et al. 2022's brain
#: LDM); DPM-Solver++(2M) 20 (Lu et al. 2022 report good samples at 10-20); rectified-flow
#: Euler 30 (MAISI-v2 generates CT with 30 rectified-flow steps).
SYNTHESIS_DEFAULT_STEPS: dict[str, int | None] = {"ddpm": None, "ddim": 50, "dpm++2m": 20, "euler": 30}

#: Anomaly-detection methods (see :mod:`medidiff.anomaly.methods`).
ANOMALY_METHODS = ("anoddpm", "ddim", "x0", "patched", "ensemble", "multi", "thor", "latent")

#: Per-method defaults: (t_start, sampler, steps). ``steps=None`` for anoddpm is the full
#: chain (t_start + 1 evaluations); ``ensemble`` has several starts (:data:`ENSEMBLE_STARTS`).
ANOMALY_DEFAULTS: dict[str, tuple[int | None, str, int | None]] = {
    "anoddpm": (250, "ddpm", None),
    # t = 50, K = 3: first chosen on 4 test scans (session 2, t in {25..300}); re-checked on
    # the labelled validation_lesions split (pipelines/tune_anomaly.py, 12 scans, model grid):
    # t in {25, 50} x K in {1, 3} x residual {l1, l1ssim} x median {5, 9}: t = 50, K = 3, l1,
    # median 9 is best (AUPRC 0.613, AUROC 0.939; K = 1: 0.567 / 0.942; t = 25: 0.539), and
    # beats the multi method (4 evaluations, AUPRC 0.528) (benchmarks/RESULTS.md)
    "ddim": (50, "ddim", 3),
    "x0": (250, "x0", 1),
    "patched": (500, "x0", 1),
    "ensemble": (None, "x0", 1),
    # several partial reconstructions scored by their per-voxel Mahalanobis distance
    # (Behrendt et al. 2024); starts MULTI_STARTS, one DDIM step each
    "multi": (None, "ddim", 1),
    # THOR (Bercea et al. 2024): DDIM steps from t, each intermediate state harmonised with
    # the noised input outside the suspected anomaly
    "thor": (100, "ddim", 5),
    # latent models only: partial diffusion of the autoencoder's latent, decoded, residual in
    # image space (MAD-AD / REFLECT recipe, whole 3D volumes). t = 600, one step (one Euler
    # step of a rectified-flow model, as REFLECT): chosen with pipelines/tune_anomaly.py on 6
    # validation_lesions scans with the default brain_mri_3d model at step 2000 (model grid,
    # median 9): t in {100, 250, 400, 600, 750, 900} x K in {1, 2, 5} -> AUPRC rises with t to
    # 0.673 at t = 600, K = 1 (AUROC 0.948; t = 750 0.667 / 0.948; t = 900 0.511); K = 1 beat
    # K = 2 and 5 at every t (benchmarks/RESULTS.md)
    "latent": (600, "ddim", 1),
}

#: The noise levels the ``ensemble`` method averages by default.
ENSEMBLE_STARTS = (250, 500, 750)

#: The starts of the ``multi`` method (one reconstruction each, one network evaluation
#: each with the default single DDIM step).
MULTI_STARTS = (25, 50, 100, 200)

#: Methods with several starts (``t_starts``) rather than one ``t_start``.
MULTI_START_METHODS = ("ensemble", "multi")

#: How ``medidiff calibrate`` (and the demo and benchmarks) set the voxel threshold by
#: default: see :mod:`medidiff.anomaly.calibration`.
#: Chosen with pipelines/tune_anomaly.py --calibrate-on validation on the 12 validation_lesions
#: scans (model grid, multi l1ssim): 1 ml / 0.5 ml gave dataset-wise Dice 0.528 against an
#: oracle Dice of 0.528; 0.5-2 ml and 0-2 ml components all within 0.02 of it; the classic
#: 5 % voxel FPR far below (benchmarks/RESULTS.md, "Anomaly detection").
CALIBRATION_DEFAULTS: dict[str, object] = {
    "target": "fp-volume",
    "max_fp_ml": 1.0,
    "min_component_ml": 0.5,
}

#: The residual a method scores with by default (others: ``"l1"``).
#: ``multi``: l1ssim, chosen on validation_lesions (AUPRC 0.528 against 0.439 for l1 and
#: 0.341 for the Mahalanobis distance at median 9; benchmarks/RESULTS.md).
DEFAULT_RESIDUALS = {"multi": "l1ssim"}

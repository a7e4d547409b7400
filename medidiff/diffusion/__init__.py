"""The diffusion maths, by concept.

- :mod:`~medidiff.diffusion.schedules`: noise schedules (float64) and the forward process
  q(x_t | x_0);
- :mod:`~medidiff.diffusion.noise`: Gaussian and simplex noise, seeded per sample;
- :mod:`~medidiff.diffusion.prediction`: prediction types (eps, v, x_0) and how to read them;
- :mod:`~medidiff.diffusion.flow`: rectified flow (straight path, velocity target, Euler);
- :mod:`~medidiff.diffusion.samplers`: one object per reverse sampler (DDPM, DDIM,
  DPM-Solver++(2M), x0, rectified-flow Euler) behind one registry;
- :mod:`~medidiff.diffusion.sampling`: the sampling loop (``sample``, ``denoise``,
  ``partial_reconstruction``) and its network-evaluation count;
- :mod:`~medidiff.diffusion.guidance`: class conditioning and classifier-free guidance.

The public names of each are re-exported here.
"""

from medidiff.diffusion.guidance import (
    class_embeddings,
    conditional_model_fn,
    drop_labels,
    guided_model_fn,
    null_class_index,
    resolve_null_label,
)
from medidiff.diffusion.noise import NOISE_KINDS, NoiseSpec, per_sample_generators, sample_noise
from medidiff.diffusion.prediction import (
    PARAMETERISATIONS,
    PREDICTION_TYPES,
    Parameterisation,
    forward_noise,
    is_flow,
    path_coefficients,
    predict_eps,
    predict_x0,
    training_target,
)
from medidiff.diffusion.samplers import (
    SAMPLER_CLASSES,
    SAMPLERS,
    SPACINGS,
    DDIMSampler,
    DDPMSampler,
    DPMSolver2MSampler,
    EulerSampler,
    Sampler,
    StepResult,
    X0Sampler,
    ddim_step,
    ddpm_step,
    dpm_solver_2m_step,
    euler_step,
    inference_timesteps,
    make_sampler,
    sampler_for,
)
from medidiff.diffusion.sampling import (
    GAUSSIAN_NOISE,
    ModelFn,
    Reconstruction,
    SampleResult,
    SamplingOptions,
    denoise,
    partial_reconstruction,
    sample,
)
from medidiff.diffusion.schedules import (
    BETA_SCHEDULES,
    SCHEDULES,
    Gaussian,
    NoiseSchedule,
    alpha_bar_at,
    extract,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
)

__all__ = [
    "BETA_SCHEDULES", "DDIMSampler", "DDPMSampler", "DPMSolver2MSampler", "EulerSampler",
    "GAUSSIAN_NOISE",
    "Gaussian", "ModelFn", "NOISE_KINDS", "NoiseSchedule", "NoiseSpec", "PARAMETERISATIONS",
    "PREDICTION_TYPES", "Parameterisation", "Reconstruction", "SAMPLERS", "SAMPLER_CLASSES",
    "SCHEDULES", "SPACINGS", "SampleResult", "Sampler", "SamplingOptions", "StepResult",
    "X0Sampler", "alpha_bar_at", "class_embeddings", "conditional_model_fn", "ddim_step",
    "ddpm_step", "denoise", "dpm_solver_2m_step", "drop_labels", "euler_step", "extract",
    "forward_noise", "guided_model_fn", "is_flow", "path_coefficients", "sampler_for",
    "inference_timesteps", "make_sampler", "null_class_index", "partial_reconstruction",
    "per_sample_generators", "predict_eps", "predict_x0", "q_mean_variance",
    "q_posterior_mean_variance", "q_sample", "resolve_null_label", "sample", "sample_noise",
    "training_target",
]

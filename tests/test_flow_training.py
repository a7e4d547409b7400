"""Rectified flow wired in: the "flow" prediction type, the "euler" sampler, flow forward
noising, sampler defaults for flow models, Trainer training and synthesis of a flow model.

Time convention under test: the loop's integer timestep t is flow time s = (t + 1) / T, and
the network sees s T - 1 (so exactly t at sampling).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from medidiff.config import Config
from medidiff.diffusion.flow import flow_euler, flow_interpolate, flow_times
from medidiff.diffusion.noise import NoiseSpec, per_sample_generators, sample_noise
from medidiff.diffusion.prediction import (
    forward_noise,
    path_coefficients,
    predict_eps,
    predict_x0,
    training_target,
)
from medidiff.diffusion.samplers import euler_step, sampler_for
from medidiff.diffusion.sampling import denoise, partial_reconstruction, sample
from medidiff.diffusion.schedules import NoiseSchedule, q_sample
from medidiff.errors import ConfigError

T = 1000
SCHEDULE = NoiseSchedule.create(num_train_timesteps=T)
ROOT = Path(__file__).resolve().parents[1]


def _s(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return ((t.to(torch.float64) + 1) / T).to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _oracle(x0: torch.Tensor):
    """The exact velocity when the data are ``x0``: u(x_s, s) = (x0 - x_s) / s."""
    return lambda x, t: (x0 - x) / _s(t, x)


def _data(shape=(2, 1, 8, 6), seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# ---- the prediction type ------------------------------------------------------------------


def test_flow_reading_and_forward_noise():
    x0, eps = _data(), torch.randn(2, 1, 8, 6, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([299, 699])
    x_t = forward_noise(SCHEDULE, x0, t, eps, prediction_type="flow")
    s = torch.tensor([0.3, 0.7])
    assert torch.allclose(x_t, flow_interpolate(x0, eps, s), atol=1e-6)
    u = training_target(SCHEDULE, x0, t, eps, prediction_type="flow")
    assert torch.equal(u, x0 - eps)
    assert torch.allclose(predict_x0(SCHEDULE, u, x_t, t, prediction_type="flow"), x0, atol=1e-6)
    assert torch.allclose(predict_eps(SCHEDULE, u, x_t, t, prediction_type="flow"), eps, atol=1e-6)
    alpha, sigma = path_coefficients(SCHEDULE, -1, x0, prediction_type="flow")
    assert alpha.eq(1).all() and sigma.eq(0).all()  # t = -1 is clean data
    # diffusion models keep their forward process, bit for bit
    for pt in ("epsilon", "v_prediction", "sample"):
        assert torch.equal(forward_noise(SCHEDULE, x0, t, eps, prediction_type=pt),
                           q_sample(SCHEDULE, x0, t, eps))


# ---- the Euler sampler ----------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4, 30])
def test_euler_with_the_exact_velocity_generates_the_data(steps):
    x0 = _data()
    result = sample(_oracle(x0), SCHEDULE, x0.shape, sampler="euler", steps=steps, seeds=[0, 1],
                    prediction_type="flow")
    assert result.nfe == steps and result.timesteps[0] == T - 1
    assert torch.allclose(result.sample, x0, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_euler_matches_flow_euler_on_the_same_grid(steps):
    """The loop's Euler steps equal flow.flow_euler on times 1, 1 - 1/k, ..., 0 with a
    velocity that depends on x and on the timestep the network is given."""
    c = _data(seed=3)

    def velocity(x, t):
        return c - x * (t.to(x.dtype).reshape(-1, 1, 1, 1) + 1) / T

    seeds = [5, 6]
    noise = sample_noise(NoiseSpec("gaussian"), c.shape, generator=per_sample_generators(seeds, "cpu"))
    loop = sample(velocity, SCHEDULE, c.shape, sampler="euler", steps=steps, seeds=seeds,
                  prediction_type="flow").sample
    reference = flow_euler(velocity, noise, flow_times(steps), num_train_timesteps=T)
    assert torch.allclose(loop, reference, atol=1e-6)
    # a constant velocity too (the timestep plays no role there)
    v = torch.randn(c.shape, generator=torch.Generator().manual_seed(7))
    loop = sample(lambda x, t: v, SCHEDULE, c.shape, sampler="euler", steps=steps, seeds=seeds,
                  prediction_type="flow").sample
    assert torch.allclose(loop, noise + v, atol=1e-6)


def test_euler_step_with_clipping_equals_the_plain_step_when_nothing_is_clipped():
    x0 = _data() * 0.5 + 0.25
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    x_t = forward_noise(SCHEDULE, x0, 499, eps, prediction_type="flow")
    u = x0 - eps
    plain = euler_step(SCHEDULE, u, x_t, 499, 199)
    clipped = euler_step(SCHEDULE, u, x_t, 499, 199, clip_range=(0.0, 1.0))
    assert torch.allclose(plain.prev_sample, clipped.prev_sample, atol=1e-6)
    assert torch.allclose(plain.prev_sample, flow_interpolate(x0, eps, torch.tensor([0.2, 0.2])), atol=1e-6)
    assert torch.allclose(plain.pred_x0, x0, atol=1e-6)
    # a clamped estimate moves the step
    far = euler_step(SCHEDULE, u + 3.0, x_t, 499, 199, clip_range=(0.0, 1.0))
    assert far.pred_x0.max() <= 1.0


@pytest.mark.parametrize("sampler,steps", [("x0", 1), ("euler", 1), ("euler", 3)])
def test_partial_reconstruction_and_x0_on_a_flow_oracle(sampler, steps):
    x0 = _data((2, 1, 6, 6, 4), seed=4)
    result = partial_reconstruction(_oracle(x0), SCHEDULE, x0, 299, sampler=sampler, steps=steps,
                                    seeds=[1, 2], prediction_type="flow")
    assert result.nfe == steps
    assert torch.allclose(result.reconstruction, x0, atol=1e-5)
    assert torch.allclose(result.pred_x0, x0, atol=1e-5)
    # the start is on the straight path at s = 0.3, with the per-sample noise of the seeds
    eps = sample_noise(NoiseSpec("gaussian"), x0.shape, generator=per_sample_generators([1, 2], "cpu"))
    assert torch.allclose(result.x_t, 0.7 * x0 + 0.3 * eps, atol=1e-6)


def test_x0_sampler_is_one_step_reflect_reconstruction():
    """x_0 = x_s + s u with the true velocity u = x_0 - eps (REFLECT's one step)."""
    x0 = _data(seed=5)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    x_t = forward_noise(SCHEDULE, x0, 599, eps, prediction_type="flow")
    out = denoise(lambda x, t: x0 - eps, SCHEDULE, x_t, 599, sampler="x0", prediction_type="flow")
    assert out.nfe == 1 and torch.allclose(out.reconstruction, x0, atol=1e-6)


# ---- which sampler fits which model --------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm++2m"])
def test_diffusion_samplers_refuse_flow_models(sampler):
    with pytest.raises(ConfigError, match=r"rectified-flow.*x0, euler"):
        sample(lambda x, t: x, SCHEDULE, (1, 1, 4, 4), sampler=sampler, steps=2, seeds=[0],
               prediction_type="flow")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_euler_refuses_diffusion_models(prediction_type):
    with pytest.raises(ConfigError, match=rf"'euler'.*predicts '{prediction_type}'.*ddim"):
        sample(lambda x, t: x, SCHEDULE, (1, 1, 4, 4), sampler="euler", steps=2, seeds=[0],
               prediction_type=prediction_type)


def test_sampler_for_defaults_and_refusals():
    assert sampler_for("flow") == "euler"
    assert sampler_for("flow", None, "ddpm") == "euler"
    assert sampler_for("flow", None, "x0") == "x0"
    assert sampler_for("flow", "x0") == "x0"
    assert sampler_for("epsilon") == "ddim" and sampler_for("epsilon", None, "ddpm") == "ddpm"
    assert sampler_for("v_prediction", "dpm++2m") == "dpm++2m"
    with pytest.raises(ConfigError, match="euler"):
        sampler_for("flow", "ddim")
    with pytest.raises(ConfigError, match="predicts 'epsilon'"):
        sampler_for("epsilon", "euler")
    with pytest.raises(ConfigError, match="unknown"):
        sampler_for("flow", "heun")


def test_anomaly_methods_take_euler_for_flow_models():
    from medidiff.anomaly.methods import MethodConfig

    def resolve(method, **kw):
        return MethodConfig(method, **kw).resolve(
            num_train_timesteps=T, noise="gaussian", input_shape=(16, 16), prediction_type="flow"
        )

    assert resolve("ddim").sampler == "euler" and resolve("ddim").steps == 3
    assert resolve("anoddpm").sampler == "euler"
    assert resolve("x0").sampler == "x0" and resolve("patched").sampler == "x0"
    assert resolve("ensemble").sampler == "x0"
    assert resolve("ensemble", sampler="euler").sampler == "euler"
    with pytest.raises(ConfigError, match="rectified-flow"):
        resolve("ddim", sampler="dpm++2m")
    with pytest.raises(ConfigError, match="predicts 'epsilon'"):
        MethodConfig("ddim", sampler="euler").resolve(
            num_train_timesteps=T, noise="gaussian", input_shape=(16, 16)
        )


@pytest.mark.parametrize("method", ["ddim", "x0", "patched", "anoddpm"])
def test_anomaly_reconstruction_of_a_flow_oracle_returns_the_input(method):
    from medidiff.anomaly.methods import MethodConfig, reconstruct

    # the same scan twice, so that the oracle knows the answer whatever the batching
    # (patched batches image-patch pairs)
    images = _data((1, 1, 8, 8), seed=8).repeat(2, 1, 1, 1)
    steps = {"ddim": 4, "anoddpm": None, "x0": 1, "patched": 1}[method]
    config = MethodConfig(method, t_start=499, steps=steps)
    config = config.resolve(num_train_timesteps=T, noise="gaussian", input_shape=(8, 8),
                            prediction_type="flow")
    oracle, first_inputs = _oracle(images[:1]), []

    def model(x, t):
        if not first_inputs:
            first_inputs.append(x.clone())
        return oracle(x, t)

    out = reconstruct(model, SCHEDULE, images, config, seeds=[3, 4],
                      noise_spec=NoiseSpec("gaussian"), prediction_type="flow")
    assert out.shape == (2, 1, 8, 8)
    assert torch.allclose(out, images, atol=1e-4)
    # the network's first input is on the straight path at s = 0.5: x = 0.5 x0 + 0.5 eps
    # where it was noised (q_sample would give 0.28 x0 + 0.96 eps)
    x = first_inputs[0]
    noised = (x - images[:1]).abs() > 0
    eps = ((x - 0.5 * images[:1]) / 0.5)[noised]
    assert eps.numel() >= 32 and 0.7 < eps.std().item() < 1.3


# ---- training and synthesis ------------------------------------------------------------------


def _flow_config(**train) -> Config:
    base = {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2,
            "preview_every": 0, "log_every": 1, "seed": 3}
    base.update(train)
    return Config.from_dict({"model": {"preset": "tiny"}, "diffusion": {"prediction_type": "flow"},
                             "train": base})


def _toy_data(n: int = 8, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(1, size, size, generator=g) for _ in range(n)]


def test_config_accepts_flow_and_its_time_sampling():
    cfg = Config.from_dict({"diffusion": {"prediction_type": "flow", "flow_time_sampling": "uniform"}})
    assert cfg.diffusion.flow_time_sampling == "uniform"
    assert Config.from_dict({}).diffusion.flow_time_sampling == "logit-normal"
    with pytest.raises(ConfigError, match="flow_time_sampling.*logit-normal"):
        Config.from_dict({"diffusion": {"flow_time_sampling": "beta"}})


def test_flow_loss_feeds_the_straight_path_and_float_timesteps(tmp_path):
    from medidiff.training.trainer import Trainer

    trainer = Trainer(_flow_config(), tmp_path / "run", dataset=_toy_data(), progress=False)
    seen = {}
    inner = trainer.ddp_model

    def spy(x, timesteps, class_labels=None):
        seen["x"], seen["t"] = x, timesteps
        return inner(x, timesteps=timesteps, class_labels=class_labels)

    trainer.ddp_model = spy
    x0 = torch.stack(_toy_data()[:4])
    loss = trainer._loss({"image": x0}, step=0)
    assert torch.isfinite(loss)
    t = seen["t"]
    assert t.dtype.is_floating_point and t.shape == (4,)
    assert bool((t > -1).all() and (t < T - 1).all()) and not torch.equal(t, t.round())
    # x_s = (1 - s) x0 + s eps with s = (t + 1) / T: eps recovered from x_s is the same for
    # the loss's own target (x0 - eps) and is unit-variance noise
    s = _s(t, x0)
    eps = (seen["x"] - (1 - s) * x0) / s
    assert 0.7 < eps.std().item() < 1.3


def test_flow_training_resumes_bit_identically_and_previews(tmp_path):
    from medidiff.models.training_state import load_training_state
    from medidiff.training.trainer import Trainer

    data = _toy_data()
    full = Trainer(_flow_config(preview_every=4, preview_samples=2, preview_steps=2),
                   tmp_path / "full", dataset=data, progress=False).fit()
    assert full.steps == 4 and torch.isfinite(torch.tensor(full.final_loss))
    assert list((tmp_path / "full" / "previews").glob("*.png"))  # sampled with euler
    Trainer(_flow_config(), tmp_path / "cut", dataset=data, progress=False).fit(stop_after=3)
    resumed = Trainer(_flow_config(), tmp_path / "cut", dataset=data, progress=False).fit(resume=True)
    assert resumed.resumed_from == 2
    a = load_training_state(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = load_training_state(tmp_path / "cut" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # flow training differs from epsilon training of the same seed (the branch is taken)
    eps_cfg = Config.from_dict({**_flow_config().to_dict(), "diffusion": {}})
    Trainer(eps_cfg, tmp_path / "eps", dataset=data, progress=False).fit()
    c = load_training_state(tmp_path / "eps" / "checkpoints" / "last.pt")["model"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.fixture(scope="module")
def flow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 2D flow model trained 3 steps on sample_data (records its preprocessing)."""
    from medidiff.training.trainer import Trainer

    if not (ROOT / "sample_data" / "dataset.json").exists():
        pytest.skip("sample_data not built")
    cfg_path = ROOT / "configs" / "tiny_test.yaml"
    cfg = Config.from_yaml(cfg_path, ["train.max_steps=3", "train.checkpoint_every=0",
                                      "train.batch_size=4", "diffusion.prediction_type=flow"])
    out = tmp_path_factory.mktemp("flow2d")
    return Trainer(cfg, out, progress=False, config_dir=cfg_path.parent).fit().model_path


def test_synthesizer_samples_a_flow_model_with_euler(flow_checkpoint):
    from medidiff.synthesis.synthesizer import Synthesizer

    synth = Synthesizer(flow_checkpoint, device="cpu", steps=3)
    assert synth.sampler == "euler" and synth.prediction_type == "flow"
    calls = [0]
    synth.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    samples = list(synth.generate([0, 1], seed=4))
    assert len(samples) == 2 and calls[0] == 3  # one batch of two, three Euler steps
    assert all(bool(torch.isfinite(torch.as_tensor(s.array)).all()) for s in samples)
    with pytest.raises(ConfigError, match="rectified-flow"):
        Synthesizer(flow_checkpoint, device="cpu", sampler="ddim", steps=3)


def test_cli_synthesize_defaults_to_euler_for_flow_models(flow_checkpoint, run_cli, tmp_path):
    out = tmp_path / "synth"
    r = run_cli(["synthesize", "--checkpoint", flow_checkpoint, "--num", 2, "--out", out,
                 "--steps", 3, "--no-progress", "--device", "cpu"])
    assert r.rc == 0, r.err
    with (out / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["sampler"] for r in rows} == {"euler"} and {r["steps"] for r in rows} == {"3"}
    bad = run_cli(["synthesize", "--checkpoint", flow_checkpoint, "--num", 1, "--out",
                   tmp_path / "bad", "--sampler", "dpm++2m", "--no-progress", "--device", "cpu"])
    assert bad.rc != 0 and "euler" in bad.err


def test_anomaly_reconstructor_of_a_flow_checkpoint_uses_euler(flow_checkpoint):
    from medidiff.anomaly.detector import diffusion_reconstructor
    from medidiff.anomaly.methods import MethodConfig

    _, recon = diffusion_reconstructor(flow_checkpoint, MethodConfig("ddim"),
                                       device=torch.device("cpu"), batch_size=2, seed=0)
    assert recon.method.sampler == "euler" and recon.prediction_type == "flow"

"""medidiff.constants is the one list of names: every name has an implementation, every
implementation a name, and config validation and the CLI accept exactly these names."""

from __future__ import annotations

import argparse

import pytest
import torch

from medidiff import constants
from medidiff.config import Config


def test_every_sampler_has_one_class_and_every_class_a_name():
    from medidiff.diffusion.samplers import SAMPLER_CLASSES

    assert tuple(SAMPLER_CLASSES) == constants.SAMPLERS
    assert all(cls.name == name for name, cls in SAMPLER_CLASSES.items())
    assert set(constants.GENERATIVE_SAMPLERS) <= set(constants.SAMPLERS)
    assert tuple(constants.SYNTHESIS_DEFAULT_STEPS) == constants.GENERATIVE_SAMPLERS


def test_every_prediction_type_has_a_generative_sampler_and_a_default():
    from medidiff.diffusion.samplers import SAMPLER_CLASSES, sampler_for

    for pt in constants.PREDICTION_TYPES:
        fits = [n for n in constants.GENERATIVE_SAMPLERS if SAMPLER_CLASSES[n].accepts(pt)]
        assert fits, pt
        assert sampler_for(pt) in fits
    assert sampler_for("flow") == "euler" and not SAMPLER_CLASSES["euler"].accepts("epsilon")
    assert SAMPLER_CLASSES["x0"].accepts("flow") and SAMPLER_CLASSES["x0"].accepts("epsilon")


def test_every_flow_time_sampling_is_implemented_and_accepted():
    from medidiff.diffusion.flow import sample_flow_time

    for method in constants.FLOW_TIME_SAMPLINGS:
        cfg = Config.from_dict({"diffusion": {"prediction_type": "flow", "flow_time_sampling": method}})
        s = sample_flow_time(64, method=cfg.diffusion.flow_time_sampling)
        assert s.shape == (64,) and bool(((s > 0) & (s < 1)).all())


def test_every_schedule_is_implemented_and_accepted_by_the_config():
    from medidiff.diffusion.schedules import BETA_SCHEDULES, NoiseSchedule

    assert set(BETA_SCHEDULES) == set(constants.SCHEDULES)
    for name in constants.SCHEDULES:
        cfg = Config.from_dict({"diffusion": {"schedule": name}})
        schedule = NoiseSchedule.create(cfg.diffusion.schedule, num_train_timesteps=10)
        assert schedule.betas.dtype == torch.float64 and bool((schedule.betas > 0).all())


def test_every_prediction_type_and_noise_kind_is_implemented_and_accepted():
    from medidiff.diffusion.noise import NoiseSpec, sample_noise
    from medidiff.diffusion.prediction import PARAMETERISATIONS

    assert tuple(PARAMETERISATIONS) == constants.PREDICTION_TYPES
    for name in constants.PREDICTION_TYPES:
        assert Config.from_dict({"diffusion": {"prediction_type": name}}).diffusion.prediction_type == name
    for kind in constants.NOISE_KINDS:
        assert Config.from_dict({"diffusion": {"noise": kind}}).diffusion.noise == kind
        assert sample_noise(NoiseSpec(kind), (1, 1, 8, 8), seeds=[0]).shape == (1, 1, 8, 8)


def test_every_autoencoder_kind_has_a_network_a_preset_set_and_a_trainer(tmp_path):
    from medidiff.models.autoencoder import (
        AUTOENCODER_NETWORKS,
        autoencoder_kwargs,
        build_autoencoder,
        network_kind,
    )
    from medidiff.models.checkpoint import NETWORK_BUILDERS
    from medidiff.models.loaded import _AUTOENCODER_NETWORKS
    from medidiff.training import build_trainer

    assert tuple(AUTOENCODER_NETWORKS) == constants.AUTOENCODER_KINDS
    assert {v: k for k, v in AUTOENCODER_NETWORKS.items()} == _AUTOENCODER_NETWORKS
    assert set(AUTOENCODER_NETWORKS.values()) <= set(NETWORK_BUILDERS)
    data = [torch.rand(1, 16, 16) for _ in range(2)]
    for kind in constants.AUTOENCODER_KINDS:
        cfg = Config.from_dict({"stage": "autoencoder", "model": {"spatial_dims": 2},
                                "autoencoder": {"kind": kind, "preset": "tiny"}})
        for preset in ("tiny", "small", "base"):
            autoencoder_kwargs(2, preset, kind=cfg.autoencoder.kind)
        network = NETWORK_BUILDERS[AUTOENCODER_NETWORKS[kind]](autoencoder_kwargs(2, "tiny", kind=kind))
        assert network_kind(network) == kind
        assert network_kind(build_autoencoder(autoencoder_kwargs(2, "tiny", kind=kind), kind)) == kind
        trainer = build_trainer(cfg, tmp_path / kind, dataset=data, progress=False, device="cpu")
        assert trainer.kind == kind and trainer.network_name == AUTOENCODER_NETWORKS[kind]


def test_every_anomaly_method_resolves():
    from medidiff.anomaly.methods import METHODS, MethodConfig

    assert METHODS == constants.ANOMALY_METHODS == tuple(constants.ANOMALY_DEFAULTS)
    for name in constants.ANOMALY_METHODS:
        resolved = MethodConfig(name).resolve(
            num_train_timesteps=1000, noise="gaussian", input_shape=(16, 16)
        )
        t, sampler, steps = constants.ANOMALY_DEFAULTS[name]
        assert resolved.sampler == sampler and resolved.sampler in constants.SAMPLERS
        if t is not None:
            assert resolved.t_start == t
        if steps is not None:
            assert resolved.steps == steps
        flow = MethodConfig(name).resolve(
            num_train_timesteps=1000, noise="gaussian", input_shape=(16, 16), prediction_type="flow"
        )
        assert flow.sampler == (sampler if sampler == "x0" else "euler")
    ensemble = MethodConfig("ensemble").resolve(
        num_train_timesteps=1000, noise="gaussian", input_shape=(16, 16)
    )
    assert ensemble.t_starts == constants.ENSEMBLE_STARTS


def _options(command: str) -> dict[str, argparse.Action]:
    from medidiff.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {o: a for a in sub.choices[command]._actions for o in a.option_strings}


def test_cli_choices_and_help_defaults_come_from_constants():
    anomaly = _options("anomaly")
    assert tuple(anomaly["--method"].choices) == constants.ANOMALY_METHODS
    assert tuple(anomaly["--sampler"].choices) == constants.SAMPLERS
    assert tuple(anomaly["--noise"].choices) == constants.NOISE_KINDS
    ddim_steps = constants.ANOMALY_DEFAULTS["ddim"][2]
    assert f"ddim {ddim_steps}," in anomaly["--steps"].help
    assert f"ddim {constants.ANOMALY_DEFAULTS['ddim'][0]}" in anomaly["--t-start"].help
    synthesize = _options("synthesize")
    assert tuple(synthesize["--sampler"].choices) == constants.GENERATIVE_SAMPLERS
    assert f"ddim {constants.SYNTHESIS_DEFAULT_STEPS['ddim']}" in synthesize["--steps"].help


def test_anomaly_method_table_in_help_is_written_from_the_constants(monkeypatch):
    """The method table of 'medidiff anomaly --help' (it once said ddim 5 steps while the
    code used 3) is built from ANOMALY_DEFAULTS: every default appears, and a changed
    constant changes the table."""
    from medidiff.cli.commands import anomaly
    from medidiff.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = sub.choices["anomaly"].description
    d = constants.ANOMALY_DEFAULTS
    assert "{METHOD_TABLE}" not in text and anomaly.method_table() in text
    assert f"--t-start ({d['ddim'][0]}), --steps DDIM steps ({d['ddim'][2]})" in text
    assert f"(t + 1 = {d['anoddpm'][0] + 1} steps)" in text
    assert f"--t-start ({d['latent'][0]}), --steps steps ({d['latent'][2]})" in text
    assert " ".join(map(str, constants.ENSEMBLE_STARTS)) in text
    monkeypatch.setitem(constants.ANOMALY_DEFAULTS, "ddim", (40, "ddim", 7))
    assert "--t-start (40), --steps DDIM steps (7)" in anomaly.method_table()


@pytest.mark.parametrize("value", ["sigmoid", "quadratic"])
def test_config_refuses_unknown_schedules_naming_the_known_ones(value):
    from medidiff.errors import ConfigError

    with pytest.raises(ConfigError, match="diffusion.schedule.*sigmoid_beta"):
        Config.from_dict({"diffusion": {"schedule": value}})

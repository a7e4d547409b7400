"""The GPU configs of latent diffusion (1 mm brain MRI, 512^2 CT) and their memory presets:
each loads, its networks build (on the meta device: no memory, no training), the grids
divide as the networks need, the presets in docs/latent_diffusion.md are the ones
pipelines/estimate_memory.py knows, and the estimator's --help runs."""

from __future__ import annotations

import functools
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medidiff.config import Config
from medidiff.models.autoencoder import (
    autoencoder_kwargs,
    build_autoencoder,
    downsample_factor,
    latent_shape,
)
from medidiff.models.unet import build_model_from_kwargs, model_kwargs, spatial_multiple

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "brain_mri_1mm_autoencoder.yaml": "autoencoder",
    "brain_mri_1mm_latent.yaml": "latent",
    "ct_autoencoder.yaml": "autoencoder",
    "ct_latent.yaml": "latent",
}
SCRIPT = ROOT / "pipelines" / "estimate_memory.py"
DOC = ROOT / "docs" / "latent_diffusion.md"


@functools.lru_cache(maxsize=1)
def _estimator():
    spec = importlib.util.spec_from_file_location("estimate_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("estimate_memory", module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def _cases() -> list[tuple[str, str | int]]:
    presets = _estimator().PRESETS
    return [(name, "file") for name in CONFIGS] + [
        (name, gb) for name in CONFIGS for gb in sorted(presets[name])
    ]


def _load(name: str, preset: str | int) -> Config:
    overrides = [] if preset == "file" else _estimator().PRESETS[name][preset]
    return Config.from_yaml(ROOT / "configs" / name, overrides)


def _ae_kwargs(cfg: Config) -> dict:
    a = cfg.autoencoder
    overrides = {k: getattr(a, k) for k in ("channels", "latent_channels", "num_res_blocks", "norm_num_groups")
                 if getattr(a, k) is not None}
    return autoencoder_kwargs(cfg.model.spatial_dims, a.preset, **overrides)


def _unet_kwargs(cfg: Config, latent_channels: int) -> dict:
    m = cfg.model
    overrides = {k: getattr(m, k) for k in ("channels", "attention_levels", "num_res_blocks",
                                             "num_head_channels", "norm_num_groups")
                 if getattr(m, k) is not None}
    return model_kwargs(m.spatial_dims, m.preset, in_channels=latent_channels,
                        out_channels=latent_channels, **overrides)


def test_every_config_has_presets_for_24_48_and_80_gb():
    presets = _estimator().PRESETS
    assert set(presets) == set(CONFIGS)
    for name in CONFIGS:
        assert sorted(presets[name]) == [24, 48, 80]
        assert "train.amp=true" in presets[name][24]


@pytest.mark.parametrize(("name", "preset"), _cases())
def test_config_loads_builds_and_its_grids_divide(name, preset):
    cfg = _load(name, preset)
    assert cfg.stage == CONFIGS[name]
    assert cfg.model.spatial_dims == 3 and cfg.train.amp
    grid = list(cfg.data.preprocessing["shape"])
    ae = _ae_kwargs(cfg)
    f = downsample_factor(ae)
    assert f == 4 and all(s % f == 0 for s in grid)
    with torch.device("meta"):
        autoencoder = build_autoencoder(ae)
    assert sum(p.numel() for p in autoencoder.parameters()) > 1e6
    if cfg.stage == "autoencoder":
        patch = cfg.data.patch_size
        assert patch is not None and all(p % f == 0 and p <= g for p, g in zip(patch, grid))
        assert math.prod(patch) < math.prod(grid)  # trains on patches, not whole volumes
        return
    assert cfg.data.patch_size is None and cfg.autoencoder.checkpoint
    tile = cfg.autoencoder.tile
    assert tile is not None and len(tile) == 3
    assert all(t % f == 0 for t in tile) and any(t < g for t, g in zip(tile, grid))  # encodes tiled
    lat = latent_shape(ae, grid)
    unet = _unet_kwargs(cfg, lat[0])
    mult = spatial_multiple(unet)
    assert all(s % mult == 0 for s in lat[1:]), (lat, mult)
    with torch.device("meta"):
        net = build_model_from_kwargs(unet)
    assert net.in_channels == lat[0] == net.out_channels


def test_file_defaults_are_the_48_gb_preset():
    for name in CONFIGS:
        assert _load(name, "file").to_dict() == _load(name, 48).to_dict(), name


def test_presets_table_in_the_guide_matches_the_estimator():
    text = DOC.read_text(encoding="utf-8")
    for name, presets in _estimator().PRESETS.items():
        for gb, overrides in presets.items():
            line = next((ln for ln in text.splitlines()
                         if ln.startswith(f"| `{name}` | {gb} GB |")), None)
            assert line is not None, f"no row for {name} at {gb} GB"
            for item in overrides:
                assert f"`{item}`" in line, (name, gb, item)


def test_probe_shapes_are_smaller_and_keep_the_multiple():
    probe = _estimator()._probe_shapes
    small, big = probe([128, 128, 64], 8, 65_536)
    assert math.prod(small) < math.prod(big) <= 65_536
    assert all(s % 8 == 0 for s in small + big)
    assert probe([16, 16, 16], 4, 65_536)[1] == [16, 16, 16]  # small inputs measured as they are


def test_estimate_memory_help_runs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], check=False, capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--preset" in out.stdout and "estimate" in out.stdout

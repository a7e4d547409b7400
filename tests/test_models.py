"""Tests for medidiff.models.unet: presets over MONAI's DiffusionModelUNet."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from medidiff.errors import ConfigError
from medidiff.models.unet import (
    PRESET_NAMES,
    build_model,
    build_model_from_kwargs,
    count_parameters,
    describe,
    enable_flash_attention,
    get_preset,
    model_kwargs,
    spatial_multiple,
)

SHAPES = {2: (2, 1, 32, 32), 3: (2, 1, 16, 16, 16)}


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """MONAI zero-initialises the output conv and each block's last layer, so an untrained
    model ignores its conditioning; add noise to every parameter so it cannot."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_tiny_output_shape_equals_input_and_backward_runs(spatial_dims):
    torch.manual_seed(0)
    model = build_model(spatial_dims, "tiny")
    x_t = torch.randn(SHAPES[spatial_dims])
    out = model(x_t, timesteps=torch.tensor([3, 700]))
    assert out.shape == x_t.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_multichannel_in_out():
    model = build_model(2, "tiny", in_channels=2, out_channels=3)
    out = model(torch.randn(1, 2, 32, 32), timesteps=torch.tensor([1]))
    assert out.shape == (1, 3, 32, 32)


def test_class_conditioning_changes_output():
    torch.manual_seed(0)
    model = build_model(2, "tiny", num_class_embeds=3)
    _randomise(model)
    x_t = torch.randn(1, 1, 32, 32)
    t = torch.tensor([100])
    with torch.no_grad():
        out_0 = model(x_t, t, class_labels=torch.tensor([0]))
        out_1 = model(x_t, t, class_labels=torch.tensor([1]))
        out_0_again = model(x_t, t, class_labels=torch.tensor([0]))
    assert torch.equal(out_0, out_0_again)
    assert (out_0 - out_1).abs().max() > 1e-4


def test_cross_attention_conditioning_sets_with_conditioning():
    kwargs = model_kwargs(2, "tiny", cross_attention_dim=4)
    assert kwargs["with_conditioning"] is True and kwargs["cross_attention_dim"] == 4
    model = build_model_from_kwargs(kwargs)
    _randomise(model)
    x_t, t = torch.randn(1, 1, 32, 32), torch.tensor([5])
    with torch.no_grad():
        a = model(x_t, t, context=torch.zeros(1, 1, 4))
        b = model(x_t, t, context=torch.ones(1, 1, 4))
    assert a.shape == x_t.shape
    assert (a - b).abs().max() > 1e-5


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_kwargs_are_json_and_rebuild_identical_architecture(spatial_dims, preset):
    kwargs = model_kwargs(spatial_dims, preset, num_class_embeds=2)
    round_tripped = json.loads(json.dumps(kwargs))
    assert round_tripped == kwargs
    if preset == "base":  # building base models is slow-ish; check one preset per dims
        return
    original = build_model(spatial_dims, preset, num_class_embeds=2)
    # Rebuilt straight from MONAI, not through medidiff: the kwargs alone are enough.
    rebuilt = DiffusionModelUNet(**round_tripped)
    a, b = original.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    rebuilt.load_state_dict(a, strict=True)


def test_kwargs_name_every_monai_constructor_argument():
    import inspect

    params = set(inspect.signature(DiffusionModelUNet.__init__).parameters) - {"self"}
    assert set(model_kwargs(2, "small")) == params


def test_overrides_apply():
    kwargs = model_kwargs(
        2,
        "tiny",
        channels=(16, 32, 32),
        attention_levels=(False, True, True),
        num_res_blocks=2,
        num_head_channels=16,
        norm_num_groups=16,
    )
    assert kwargs["channels"] == [16, 32, 32]
    assert kwargs["attention_levels"] == [False, True, True]
    assert kwargs["num_res_blocks"] == 2 and kwargs["norm_num_groups"] == 16
    model = build_model_from_kwargs(kwargs)
    assert tuple(model.block_out_channels) == (16, 32, 32)
    assert spatial_multiple(model) == 4 == spatial_multiple(kwargs)


def test_presets_differ_between_dims_and_grow():
    for dims in (2, 3):
        counts = [count_parameters(build_model(dims, p)) for p in ("tiny", "small")]
        assert counts[0] < counts[1]
    assert get_preset(2, "base").channels == (128, 256, 256)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(channels=(8, 12)), "norm_num_groups"),
        (dict(channels=(8, 16, 32)), "attention_levels"),
        (dict(attention_levels=(True,)), "attention_levels"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(num_res_blocks=(1, 1, 1)), "num_res_blocks"),
        (dict(num_head_channels=3), "num_head_channels"),
        (dict(norm_num_groups=0), "norm_num_groups"),
        (dict(channels=()), "channels"),
        (dict(dropout=0.1), "dropout"),
    ],
)
def test_bad_configs_raise_config_error_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        model_kwargs(2, "tiny", **overrides)


def test_bad_preset_and_dims():
    with pytest.raises(ConfigError, match="preset 'huge'.*tiny, small, base"):
        build_model(2, "huge")
    with pytest.raises(ConfigError, match="spatial_dims=1"):
        build_model(1, "tiny")
    with pytest.raises(ConfigError, match="num_class_embeds"):
        build_model(2, "tiny", num_class_embeds=0)


def test_build_from_kwargs_rejects_unknown_and_missing_keys():
    kwargs = model_kwargs(2, "tiny")
    with pytest.raises(ConfigError, match="'warp_drive'"):
        build_model_from_kwargs({**kwargs, "warp_drive": True})
    del kwargs["in_channels"]
    with pytest.raises(ConfigError, match="in_channels"):
        build_model_from_kwargs(kwargs)
    with pytest.raises(ConfigError, match="with_conditioning"):
        build_model_from_kwargs({**model_kwargs(2, "tiny"), "with_conditioning": True})


def test_parameter_count_of_tiny_matches_numel_and_hand_count():
    model = build_model(2, "tiny")
    n = count_parameters(model)
    assert n == sum(p.numel() for p in model.parameters())
    # Independent count of the first and last layers: conv_in is 3x3, 1 -> 8 channels with
    # bias; the time MLP maps 8 -> 32 -> 32 (time_embed_dim = 4 * channels[0]).
    assert model.conv_in.conv.weight.numel() + model.conv_in.conv.bias.numel() == 9 * 8 + 8
    time_mlp = sum(p.numel() for p in model.time_embed.parameters())
    assert time_mlp == (8 * 32 + 32) + (32 * 32 + 32)
    assert 10_000 < n < 200_000
    model.conv_in.conv.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == n - 72


def test_describe_names_preset_or_custom():
    text = describe(build_model(2, "tiny"))
    assert text.startswith("DiffusionModelUNet 2D tiny: ")
    assert "M parameters" in text and "(8, 16)" in text
    assert "\n" not in text
    assert describe(build_model(3, "tiny", channels=(8, 8))).startswith(
        "DiffusionModelUNet 3D custom"
    )
    assert "3 classes" in describe(build_model(2, "tiny", num_class_embeds=3))


def test_flash_attention_only_on_cuda():
    model = build_model(2, "tiny", device="cpu")
    flags = [m.use_flash_attention for m in model.modules() if hasattr(m, "use_flash_attention")]
    assert flags and not any(flags)
    assert enable_flash_attention(model, "cpu") is False
    if not torch.cuda.is_available():
        assert enable_flash_attention(model, "cuda") is False
    assert model_kwargs(2, "tiny")["use_flash_attention"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_attention_matches_dense_on_cuda():
    torch.manual_seed(0)
    dense = build_model(2, "tiny", attention_levels=(False, True)).cuda().eval()
    _randomise(dense)
    flash = build_model_from_kwargs(
        model_kwargs(2, "tiny", attention_levels=(False, True)), device="cuda"
    ).eval()
    flash.load_state_dict(dense.state_dict())
    assert any(m.use_flash_attention for m in flash.modules() if hasattr(m, "use_flash_attention"))
    x_t, t = torch.randn(2, 1, 32, 32, device="cuda"), torch.tensor([1, 900], device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(flash(x_t, t), dense(x_t, t), rtol=1e-3, atol=1e-4)


def test_prepare_for_inference_keeps_outputs():
    """channels_last on the CPU is a layout change only: same outputs, eval mode."""
    import copy

    from medidiff.models.unet import build_model, prepare_for_inference

    torch.manual_seed(0)
    model = build_model(2, "tiny")
    ref = copy.deepcopy(model).eval()
    fast = prepare_for_inference(model, "cpu")
    assert not fast.training
    assert fast.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x, t = torch.randn(3, 1, 16, 24), torch.tensor([0, 10, 999])
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t), ref(x, t), atol=1e-5, rtol=1e-4)
    model3d = prepare_for_inference(build_model(3, "tiny"), "cpu")  # 3D: layout untouched
    assert model3d.conv_in.conv.weight.is_contiguous()

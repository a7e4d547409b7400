"""pipelines/export_default_models.py: fp16 export, fp16 check, samples montage and model card
of pixel (2D, 3D) and latent models, and --card-only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export():
    spec = importlib.util.spec_from_file_location("export_default_models",
                                                  ROOT / "pipelines" / "export_default_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:4] == b"\x89PNG"


def test_latent_model_export_card_and_card_only(export, tiny_latent_run, tmp_path):
    from medidiff.models.checkpoint import checkpoint_network, file_sha256, load_inference
    from medidiff.models.loaded import load_model
    from medidiff.models.pretrained import MODELS

    ae_run, run = tiny_latent_run
    out = tmp_path / "weights"
    assert export.main(["--run", str(run), "--name", "brain_mri_3d", "--config",
                        "configs/brain_mri_3d_latent.yaml", "--autoencoder-run", str(ae_run),
                        "--samples", "2", "--out", str(out)]) == 0
    weights = out / "brain_mri_3d.safetensors"
    assert checkpoint_network(weights) == "latent_diffusion"
    loaded = load_model(weights)
    assert loaded.is_latent and loaded.checkpoint.stored_dtype == "float16"
    assert loaded.checkpoint.extra["latent"] == load_inference(run / "model.safetensors").extra["latent"]

    facts = json.loads((out / "brain_mri_3d.json").read_text())
    assert facts["description"] == MODELS["brain_mri_3d"] and facts["stage"] == "latent"
    assert facts["sha256"] == file_sha256(weights) and facts["steps"] == 3
    assert facts["prediction_type"] == "flow" and "rectified flow" in facts["diffusion"]
    # the fp16 check ran the U-Net on latents and the decoder; both change little
    assert set(facts["fp16_errors"]) == {"network", "decoder"}
    assert 0 < facts["fp16_max_abs_error"] == max(facts["fp16_errors"].values()) < 0.05
    ae = facts["autoencoder"]
    assert ae["preset"] == "tiny" and ae["channels"] == [8, 16] and ae["latent_channels"] == 3
    assert ae["factor"] == 2 and ae["latent_shape"] == [3, 16, 20, 16] and ae["steps"] == 3
    assert ae["config"] == "configs/brain_mri_3d_autoencoder.yaml"
    assert ae["wall_time_s"] > 0 and facts["diffusion_wall_time_s"] > 0
    assert facts["wall_time_s"] == pytest.approx(ae["wall_time_s"] + facts["diffusion_wall_time_s"], abs=0.11)
    # the sample montage: the model's default sampler and steps (euler 30 for flow)
    assert facts["samples"]["sampler"] == "euler" and facts["samples"]["steps"] == 30
    assert facts["samples"]["seeds"] == [0, 1] and _png(out / "brain_mri_3d_samples.png")
    assert _png(out / "brain_mri_3d_loss.png")
    card = (out / "brain_mri_3d.md").read_text()
    for text in ("![samples](brain_mri_3d_samples.png)", "![loss curve](brain_mri_3d_loss.png)",
                 "| autoencoder | MONAI AutoencoderKL, preset 'tiny'", "autoencoder", "in all on",
                 "decoded image", f"--autoencoder-run {ae_run}"):
        assert text in card, text

    # --card-only: a new note, the samples kept; the weights untouched
    before = weights.read_bytes()
    assert export.main(["--name", "brain_mri_3d", "--card-only", "--samples", "0", "--note",
                        "a test export", "--out", str(out)]) == 0
    assert weights.read_bytes() == before
    card = (out / "brain_mri_3d.md").read_text()
    assert "| note | a test export |" in card and "brain_mri_3d_samples.png" in card

    # an autoencoder run that is not the model's autoencoder is refused
    with pytest.raises(SystemExit, match="not the autoencoder this latent model was trained on"):
        export.main(["--run", str(run), "--name", "brain_mri_3d", "--config", "c.yaml",
                     "--autoencoder-run", str(run), "--samples", "0", "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("fixture, kind", [("tiny_checkpoint_2d", "2d-slice"),
                                           ("tiny_checkpoint_3d", "3d-volume")])
def test_pixel_model_export(export, request, tmp_path, fixture, kind):
    from medidiff.models.loaded import load_model

    run = request.getfixturevalue(fixture).parent
    out = tmp_path / "weights"
    assert export.main(["--run", str(run), "--name", "brain_mri_3d_5mm", "--config", "configs/x.yaml",
                        "--samples", "2", "--out", str(out)]) == 0
    loaded = load_model(out / "brain_mri_3d_5mm.safetensors")
    assert not loaded.is_latent and loaded.checkpoint.stored_dtype == "float16"
    facts = json.loads((out / "brain_mri_3d_5mm.json").read_text())
    assert facts["stage"] == "pixel" and "autoencoder" not in facts
    assert list(facts["fp16_errors"]) == ["network"] and facts["fp16_errors"]["network"] < 0.05
    assert facts["samples"]["kind"] == kind and facts["samples"]["sampler"] == "ddim"
    assert _png(out / "brain_mri_3d_5mm_samples.png")
    card = (out / "brain_mri_3d_5mm.md").read_text()
    assert "max abs change of the network output" in card and "| autoencoder |" not in card
    with pytest.raises(SystemExit, match="not a latent model"):
        export.main(["--run", str(run), "--name", "brain_mri_3d", "--config", "c.yaml",
                     "--autoencoder-run", str(run), "--out", str(tmp_path / "x")])
    # the run recorded its training scans' input profile; the card shows it
    assert loaded.input_profile is not None and "| input profile | measured on 8 training scans" in card
    assert facts["tensors_sha256"] and "input_profile" in facts
    if kind == "2d-slice":
        _add_profile_to_an_old_file(export, out, loaded.checkpoint.extra)


def _add_profile_to_an_old_file(export, out, extra):
    """--add-input-profile on a file shipped before profiles existed: the profile is measured
    from its config's datalist and split, the tensors stay bit-identical, the card follows."""
    from medidiff.models.checkpoint import file_sha256, load_inference, replace_extra, tensors_sha256

    weights, facts_path = out / "brain_mri_3d_5mm.safetensors", out / "brain_mri_3d_5mm.json"
    replace_extra(weights, {k: v for k, v in extra.items() if k != "input_profile"})
    facts = json.loads(facts_path.read_text())
    facts["sha256"] = file_sha256(weights)
    facts.pop("input_profile")
    facts_path.write_text(json.dumps(facts))
    tensors = tensors_sha256(weights)
    assert export.main(["--name", "brain_mri_3d_5mm", "--add-input-profile", "--out", str(out)]) == 0
    assert tensors_sha256(weights) == tensors
    assert load_inference(weights).extra["input_profile"] == extra["input_profile"]
    facts = json.loads(facts_path.read_text())
    assert facts["sha256"] == file_sha256(weights) and facts["tensors_sha256"] == tensors
    assert "| input profile |" in (out / "brain_mri_3d_5mm.md").read_text()


def test_demo_metrics_card_section_shows_the_3d_latent_rows(export, tmp_path):
    def group(auroc):
        return {"voxel_auroc": auroc, "voxel_auprc": 0.5, "dice_dataset_wise": 0.25,
                "oracle_dice_dataset_wise": 0.5, "scan_auroc": None}

    def evaluation(auroc):
        return {"overall": group(auroc), "groups": {"tumor": group(auroc)}}

    metrics = {"evaluation": {"default": evaluation(0.9), "baseline": evaluation(0.7)},
               "method": {"method": "ddim", "t_start": 50, "steps": 3}, "postprocess": {},
               "data": {"test_scans": [{"name": "a", "kind": "tumor"}]}}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    table = export.demo_card_metrics(path)["table"]
    assert "| all 1 | default method | 0.900 |" in table and "3D latent" not in table
    metrics["anomaly_3d"] = {"ran": True, "evaluation": evaluation(0.8),
                             "method": {"method": "latent", "t_start": 250, "steps": 5, "sampler": "euler"},
                             "cost": {"latent_3d": {"nfe_per_volume": 5.0, "seconds_per_volume": 2.0},
                                      "default_2d": {"nfe_per_volume": 80.0, "seconds_per_volume": 3.0}}}
    path.write_text(json.dumps(metrics))
    section = export.demo_card_metrics(path)
    assert "| tumor | 3D latent method | 0.800 |" in section["table"]
    assert "| tumor | 2D default method | 0.900 |" in section["table"]
    assert "latent (t = 250, 5 euler steps)" in section["notes"]


def test_shipped_cards_are_the_generators_and_name_only_files_that_exist(export):
    """The cards in medidiff/weights are what card_markdown writes from their facts, and
    every document, script or config they point to is in the repository (they once pointed
    to a DOMAIN.md that is not)."""
    import re

    from medidiff.models import pretrained

    for name in sorted(pretrained.MODELS):
        path = pretrained.model_card_path(name)
        if not path.is_file():
            continue
        card = path.read_text(encoding="utf-8")
        assert export.card_markdown(pretrained.model_card_facts(name)) == card, name
        named = set(re.findall(r"[\w./-]+\.(?:md|py|yaml)\b", card))
        assert "sample_data/README.md" in named and "docs/own_data.md" in named
        missing = [p for p in named if not (ROOT / p).is_file()]
        assert not missing, f"{name}.md names files that do not exist: {missing}"

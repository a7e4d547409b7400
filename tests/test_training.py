"""The Trainer: loss goes down, resume is bit-identical, DDP runs, NaN stops cleanly."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medidiff.config import Config
from medidiff.errors import ConfigError, TrainingDivergedError
from medidiff.training.trainer import Trainer, lr_factor

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_test.yaml"
HAS_SAMPLE = (ROOT / "sample_data" / "dataset.json").exists()


def _tiny(**train) -> Config:
    base = {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 2,
            "preview_every": 0, "log_every": 1, "seed": 3}
    base.update(train)
    return Config.from_dict({"model": {"preset": "tiny"}, "train": base})


def _toy_data(n: int = 12, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        c = torch.rand(2, generator=g) - 0.5
        out.append(((xx - c[0]) ** 2 + (yy - c[1]) ** 2 < 0.3).float()[None])
    return out


def test_lr_schedule_shape():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)


def test_resume_is_bit_identical(tmp_path):
    data = _toy_data()
    full = Trainer(_tiny(), tmp_path / "full", dataset=data, progress=False).fit()
    assert full.steps == 6
    # "crash" after step 3: the last checkpoint is step 2, so step 3 is redone on resume
    Trainer(_tiny(), tmp_path / "cut", dataset=data, progress=False).fit(stop_after=3)
    resumed = Trainer(_tiny(), tmp_path / "cut", dataset=data, progress=False).fit(resume=True)
    assert resumed.resumed_from == 2 and resumed.steps == 6
    # metrics.csv: the interrupted run's row of step 3 (after its last checkpoint) is
    # replaced by the resumed run's, not repeated; the losses are those of the full run
    cut_rows = list(csv.DictReader(open(tmp_path / "cut" / "metrics.csv")))
    full_rows = list(csv.DictReader(open(tmp_path / "full" / "metrics.csv")))
    assert [int(r["step"]) for r in cut_rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in cut_rows] == [r["loss"] for r in full_rows]
    from medidiff.models.checkpoint import load_inference
    from medidiff.models.training_state import load_training_state

    a = load_training_state(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_training_state(tmp_path / "cut" / "checkpoints" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ia = load_inference(tmp_path / "full" / "model.safetensors").state_dict
    ib = load_inference(tmp_path / "cut" / "model.safetensors").state_dict
    assert all(torch.equal(ia[k], ib[k]) for k in ia)
    # a different seed gives different weights (the comparison above can fail)
    other = Trainer(_tiny(seed=4), tmp_path / "other", dataset=data, progress=False)
    other.fit()
    c = load_training_state(tmp_path / "other" / "checkpoints" / "last.pt")
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def test_outputs_and_metrics(tmp_path):
    run = tmp_path / "run"
    Trainer(_tiny(preview_every=3, preview_samples=2, preview_steps=2), run, dataset=_toy_data(),
            progress=False).fit()
    assert (run / "model.safetensors").exists() and (run / "config.yaml").exists()
    assert (run / "checkpoints" / "last.pt").exists()
    assert list((run / "previews").glob("*.png"))
    assert list((run / "tb").glob("events.*"))
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert Config.from_yaml(run / "config.yaml") == _tiny(preview_every=3, preview_samples=2, preview_steps=2)
    from medidiff.models.checkpoint import load_inference

    ck = load_inference(run / "model.safetensors")
    assert ck.config["train"]["max_steps"] == 6


def test_fit_refuses_a_folder_with_a_trained_run_unless_told(tmp_path):
    """Trainer.fit() from Python refuses to overwrite a run, as `medidiff train` does."""
    from medidiff.errors import OutputError

    data = _toy_data(4)
    cfg = _tiny(max_steps=2, checkpoint_every=0)
    Trainer(cfg, tmp_path / "r", dataset=data, progress=False).fit()
    before = (tmp_path / "r" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(OutputError, match="already holds a trained run.*resume.*overwrite"):
        Trainer(cfg, tmp_path / "r", dataset=data, progress=False).fit()
    assert (tmp_path / "r" / "model.safetensors").stat().st_mtime_ns == before
    again = Trainer(cfg, tmp_path / "r", dataset=data, progress=False).fit(overwrite=True)
    assert again.resumed_from == 0 and again.steps == 2
    rows = list(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = _toy_data()
    data[5] = data[5] * float("nan")
    cfg = _tiny(batch_size=12, max_steps=4, checkpoint_every=1)
    with pytest.raises(TrainingDivergedError, match="last good checkpoint"):
        Trainer(cfg, tmp_path / "nan", dataset=data, progress=False).fit()


def test_resume_refuses_changed_model(tmp_path):
    data = _toy_data()
    Trainer(_tiny(max_steps=2), tmp_path / "r", dataset=data, progress=False).fit()
    changed = Config.from_dict({**_tiny(max_steps=4).to_dict(), "model": {"preset": "tiny", "spatial_dims": 2,
                                                                          "channels": [16, 16]}})
    with pytest.raises(ConfigError, match="model"):
        Trainer(changed, tmp_path / "r", dataset=data, progress=False).fit(resume=True)


@pytest.mark.skipif(not HAS_SAMPLE, reason="sample_data not built")
def test_loss_decreases_on_sample_data(tmp_path):
    cfg = Config.from_yaml(TINY, ["train.max_steps=40", "train.log_every=1", "train.checkpoint_every=0"])
    Trainer(cfg, tmp_path / "run", progress=False, config_dir=TINY.parent).fit()
    losses = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv"))]
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.6 * first, (first, last)


@pytest.mark.skipif(not HAS_SAMPLE, reason="sample_data not built")
def test_cli_train_and_torchrun_ddp(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medidiff", "train", "--config", str(TINY), "--out", str(out), "--no-progress",
           "--set", "train.max_steps=3", "--set", "train.checkpoint_every=0", "--set", "train.batch_size=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors").exists()
    assert len(list((out / "checkpoints").glob("*.pt"))) == 1
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert rows[-1]["step"] == "3"
    assert proc.stdout.count("trained 3 steps") == 1  # rank 0 only


def test_cli_errors(tmp_path, capsys):
    from medidiff.cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: lots\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "train.max_steps" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_conditional_training_with_preview(tmp_path):
    """Class labels reach the network, and the preview samples one image per class."""
    data = [{"image": x, "class_label": i % 2} for i, x in enumerate(_toy_data())]
    cfg = Config.from_dict({"model": {"preset": "tiny", "num_class_embeds": 2},
                            "train": {"max_steps": 2, "batch_size": 4, "checkpoint_every": 0,
                                      "preview_every": 2, "preview_samples": 2, "preview_steps": 2}})
    trainer = Trainer(cfg, tmp_path / "c", dataset=data, progress=False)
    assert trainer.model_kwargs["num_class_embeds"] == 3  # 2 classes + the null class
    trainer.fit()
    assert list((tmp_path / "c" / "previews").glob("*.png"))


def test_preview_samples_with_the_training_noise(tmp_path, monkeypatch):
    """A simplex-trained model must be previewed from simplex noise, not Gaussian."""
    import medidiff.diffusion.sampling as diffusion

    seen = {}
    real_sample = diffusion.sample

    def spy(*args, **kwargs):
        seen["kind"] = kwargs["noise_spec"].kind
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(diffusion, "sample", spy)
    cfg = Config.from_dict({"model": {"preset": "tiny"}, "diffusion": {"noise": "simplex"},
                            "train": {"max_steps": 1, "batch_size": 4, "checkpoint_every": 0,
                                      "preview_every": 1, "preview_samples": 2, "preview_steps": 2}})
    Trainer(cfg, tmp_path / "p", dataset=_toy_data(), progress=False).fit()
    assert seen["kind"] == "simplex"

"""Progress reports (medidiff.runtime.progress): a bar on a terminal, plain periodic lines in a
log, used by train, calibrate, anomaly and synthesize."""

from __future__ import annotations

import io

import pytest
import torch

from medidiff.runtime.progress import Progress, format_seconds, log_every, progress_iter


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_periodic_plain_lines_and_a_final_one(monkeypatch):
    clock = iter(range(0, 1000, 10))  # every call to the clock: 10 s later
    monkeypatch.setattr("medidiff.runtime.progress.time.monotonic", lambda: float(next(clock)))
    log = io.StringIO()
    p = Progress(16, "anomaly", unit="scan", stream=log, every=30)
    for _ in range(16):
        p.update()
    p.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()  # no bar redraws in a log
    # one line every 30 s of work (3 updates apart), each with count, elapsed and what is left
    assert lines[0] == "anomaly: 3/16 scans, 30s elapsed, ~2m10s left"
    assert 4 <= len(lines) <= 6 and lines[-1] == "anomaly: 16/16 scans in 2m50s"


def test_a_terminal_gets_a_bar_and_lines_can_be_switched_off(monkeypatch):
    tty = _Terminal()
    with Progress(4, "train", unit="step", stream=tty, every=0) as p:
        p.update(4)
        p.set_postfix(loss="0.1")
    assert "train" in tty.getvalue() and "4/4" in tty.getvalue() and "\r" in tty.getvalue()
    quiet = io.StringIO()
    with Progress(4, "x", stream=quiet, every=0, enabled=False) as p:
        p.update(4)
    assert quiet.getvalue() == ""
    inner = io.StringIO()  # leave=False: no final line (one per scan would flood the log)
    assert list(progress_iter(range(3), "slices", stream=inner, every=1e9, leave=False)) == [0, 1, 2]
    assert inner.getvalue() == ""


def test_log_every_from_the_environment(monkeypatch):
    monkeypatch.setenv("MEDIDIFF_LOG_EVERY", "5")
    assert log_every() == 5.0
    for bad in ("soon", "-1"):
        monkeypatch.setenv("MEDIDIFF_LOG_EVERY", bad)
        assert log_every() == 30.0
    assert [format_seconds(s) for s in (4.4, 80, 7500)] == ["4s", "1m20s", "2h05m"]


def test_train_logs_a_few_lines_not_a_bar_per_step(capsys, tmp_path, monkeypatch):
    """`train` piped to a log: one final line (plus one per MEDIDIFF_LOG_EVERY seconds),
    never hundreds of bar updates."""
    from medidiff.config import Config
    from medidiff.training.trainer import Trainer

    cfg = Config.from_dict({"model": {"preset": "tiny"}, "train": {
        "max_steps": 6, "batch_size": 2, "checkpoint_every": 0, "preview_every": 0, "log_every": 1}})
    data = [torch.rand(1, 16, 16) for _ in range(4)]
    Trainer(cfg, tmp_path / "a", dataset=data, progress=True).fit()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("train:")]
    assert len(lines) == 1 and lines[0].startswith("train: 6/6 steps in ") and "loss" in lines[0]
    monkeypatch.setenv("MEDIDIFF_LOG_EVERY", "0")
    Trainer(cfg, tmp_path / "b", dataset=data, progress=True).fit()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train:")]
    assert len(lines) == 6 and lines[2].startswith("train: 3/6 steps, ") and "left" in lines[2]


def test_scan_loops_report_in_a_log(capsys, monkeypatch):
    """The runner's scan loop (anomaly, calibrate) prints lines when stderr is not a terminal."""
    from medidiff.runtime.parallel import map_scans

    monkeypatch.setenv("MEDIDIFF_LOG_EVERY", "0")
    assert list(map_scans(lambda shared, x: x * shared, 2, [1, 2, 3], desc="scoring",
                          progress=True)) == [2, 4, 6]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("scoring: 1/3 scans, ") and lines[-1].startswith("scoring: 3/3 scans in ")
    assert list(map_scans(lambda shared, x: x, None, [1], progress=False)) == [1]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("progress", [True, False])
def test_synthesis_reports_progress_in_a_log(progress, tiny_checkpoint_2d, tmp_path, capsys):
    from medidiff.synthesis.folder import synthesize_to_folder
    from medidiff.synthesis.synthesizer import Synthesizer

    synth = Synthesizer(tiny_checkpoint_2d, sampler="ddim", steps=2, batch_size=2)
    synthesize_to_folder(synth, tmp_path / "s", 2, seed=0, progress=progress)
    err = capsys.readouterr().err
    assert ("synthesizing" in err and "2/2 samples in" in err) == progress

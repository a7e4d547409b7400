"""The CLI surface: every DESIGN.md command (plus issue 14's inpaint) is listed, has help, and is a thin wrapper."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medidiff.cli.main import COMMANDS, main

DESIGN_COMMANDS = ["info", "train", "synthesize", "inpaint", "calibrate", "anomaly", "evaluate",
                   "evaluate-synthesis", "export-bundle", "demo"]


def test_help_lists_all_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in DESIGN_COMMANDS:
        assert name in out
    assert [c[0] for c in COMMANDS] == DESIGN_COMMANDS


@pytest.mark.parametrize("name", DESIGN_COMMANDS)
def test_each_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert "usage: medidiff " + name in capsys.readouterr().out


def test_every_command_module_is_parsing_plus_one_call():
    """A command module holds argument parsing (``add_arguments``) and one entry (``run``),
    and no class of its own: the work lives in the library."""
    import importlib
    import inspect

    for name, mod, _ in COMMANDS:
        module = importlib.import_module(mod)
        assert callable(getattr(module, "add_arguments", None)), name
        assert callable(getattr(module, "run", None)), name
        own_classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == mod]
        assert own_classes == [], (name, own_classes)


def test_console_script_runs_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "medidiff", "train", "--config", "/nonexistent.yaml",
                           "--out", "/tmp/x"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("medidiff: error:") and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1

"""The documentation runs: docs/own_data.md's commands, its datalist script, the files the
docs name, and the licence/citation metadata.

docs/own_data.md writes its commands with two shell variables, ``$DATA`` (the cohort) and
``$RUN`` (the run folder). The fast tests parse every ``medidiff`` command of the page with
the CLI's own parser (with ``DATA=sample_data``), run its ``info`` commands, and run its
``make_datalist.py`` on a BIDS-like tree; the slow test runs the whole page, train to
evaluate, on a copy of part of sample_data with a tiny model (the page's commands with a
few size overrides appended).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "own_data.md"
SAMPLE = ROOT / "sample_data"

needs_sample = pytest.mark.skipif(not (SAMPLE / "dataset.json").exists(),
                                  reason="sample_data not built")


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def doc_variables(text: str) -> dict[str, str]:
    """``NAME=value`` lines of the page's bash blocks."""
    found = {}
    for block in _blocks(text, "bash"):
        for line in block.splitlines():
            m = re.match(r"([A-Z]+)=(\S+)", line.strip())
            if m:
                found[m.group(1)] = m.group(2)
    return found


def doc_commands(text: str) -> list[str]:
    """The ``medidiff ...`` command lines of the page's bash blocks (continuations joined)."""
    commands = []
    for block in _blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("medidiff "):
                commands.append(" ".join(line.split()))
    return commands


def expand(command: str, values: dict[str, str]) -> list[str]:
    for name, value in values.items():
        command = command.replace(f"${name}", value)
    assert "$" not in command, f"undefined variable in: {command}"
    return shlex.split(command)[1:]


def test_every_command_of_own_data_parses():
    from medidiff.cli.main import build_parser

    text = DOC.read_text(encoding="utf-8")
    variables = doc_variables(text)
    assert variables.get("DATA") == "sample_data" and "RUN" in variables
    commands = doc_commands(text)
    kinds = {shlex.split(c)[1] for c in commands}
    assert {"info", "train", "calibrate", "anomaly", "evaluate"} <= kinds, kinds
    parser = build_parser()
    for command in commands:
        argv = expand(command, variables)
        try:
            parser.parse_args(argv)
        except SystemExit:  # argparse printed why
            pytest.fail(f"docs/own_data.md: does not parse: {command}")


def test_files_the_docs_name_exist():
    """Every config, pipeline, doc and weights path docs/own_data.md, the README and the
    model cards mention is in the repository; the README links the page."""
    for page in (DOC, ROOT / "README.md", *sorted((ROOT / "medidiff" / "weights").glob("*.md"))):
        text = page.read_text(encoding="utf-8")
        named = set(re.findall(r"(?<![\w/.$])((?:configs|pipelines|docs|benchmarks|medidiff|"
                               r"sample_data)/[\w./-]+\.(?:yaml|py|md|json|safetensors))", text))
        missing = sorted(p for p in named if not (ROOT / p).is_file())
        assert not missing, f"{page.name} names files that do not exist: {missing}"
    assert "(docs/own_data.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


@needs_sample
def test_info_commands_of_own_data_run(run_cli):
    text = DOC.read_text(encoding="utf-8")
    values = {**doc_variables(text), "DATA": str(SAMPLE)}
    ran = 0
    for command in doc_commands(text):
        argv = expand(command, values)
        if argv[0] == "info":
            res = run_cli(argv)
            assert res.rc == 0 and res.err == "", (command, res.err)
            ran += 1
    assert ran >= 1


@needs_sample
def test_make_datalist_script_of_own_data(tmp_path):
    """The page's BIDS script on a BIDS-like tree of sample_data scans: its dataset.json
    loads, with controls in training/validation and patients (with lesion masks) in test."""
    from medidiff.data.datalist import load_datalist

    (script,) = _blocks(DOC.read_text(encoding="utf-8"), "python")
    (tmp_path / "make_datalist.py").write_text(script)
    deriv = tmp_path / "derivatives" / "prep"
    rows = ["participant_id\tgroup"]
    cases = [("train", f"sub-{i:03d}", "control") for i in range(5)]
    cases += [("test", "tumor-000", "tumor"), ("test", "ms-000", "ms")]
    for n, (split, name, group) in enumerate(cases):
        sub = f"sub-{n:02d}"
        anat = deriv / sub / "anat"
        anat.mkdir(parents=True)
        shutil.copy(SAMPLE / split / "images" / f"{name}.nii.gz", anat / f"{sub}_desc-brain_T1w.nii.gz")
        shutil.copy(SAMPLE / split / "brainmasks" / f"{name}.nii.gz", anat / f"{sub}_desc-brain_mask.nii.gz")
        if group != "control":
            shutil.copy(SAMPLE / split / "labels" / f"{name}.nii.gz", anat / f"{sub}_label-lesion_mask.nii.gz")
        rows.append(f"{sub}\t{group}")
    (tmp_path / "participants.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "dataset.json"
    proc = subprocess.run([sys.executable, "make_datalist.py", str(deriv),
                           str(tmp_path / "participants.tsv"), str(out)],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "{'training': 4, 'validation': 1, 'test': 2}"
    test = load_datalist(out, split="test")
    assert [e.name for e in test] == ["sub-05_desc-brain_T1w", "sub-06_desc-brain_T1w"]
    assert all(e.mask.is_file() and e.segmentation.is_file() for e in test)
    assert [e.extra["kind"] for e in test] == ["tumor", "ms"]
    assert len(load_datalist(out, split="validation")) == 1


def _small_cohort(root: Path) -> Path:
    """sample_data's layout and dataset.json keys with fewer scans: 4 training, the 6
    validation, 3 test (tumour, MS, healthy)."""
    data = root / "sample_data"
    keep = {"train": [f"sub-{i:03d}" for i in range(4)],
            "val": [f"sub-{i}" for i in range(100, 106)],
            "test": ["tumor-000", "ms-000", "healthy-000"]}
    full = json.loads((SAMPLE / "dataset.json").read_text(encoding="utf-8"))
    small = {}
    for key, folder in (("training", "train"), ("validation", "val"), ("test", "test")):
        small[key] = [e for e in full[key] if Path(e["image"]).name.split(".")[0] in keep[folder]]
        for entry in small[key]:
            for field in ("image", "mask", "label"):
                if field in entry:
                    target = data / entry[field]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(SAMPLE / entry[field], target)
    (data / "dataset.json").write_text(json.dumps(small))
    return data


#: what makes the page's commands quick: a tiny model on a coarse grid, few steps
TINY_TRAIN = ["--set", "model.preset=tiny", "--set", "train.max_steps=3",
              "--set", "train.batch_size=4", "--set", "train.checkpoint_every=0",
              "--set", "train.preview_every=0", "--set", "data.preprocessing.spacing=[6,6,6]",
              "--set", "data.preprocessing.shape=[32,40,32]", "--no-progress", "--device", "cpu"]
FAST_METHOD = ["--t-start", "6", "--steps", "2", "--device", "cpu"]


@pytest.mark.slow
@needs_sample
def test_own_data_page_runs_end_to_end(run_cli, tmp_path, monkeypatch):
    text = DOC.read_text(encoding="utf-8")
    data = _small_cohort(tmp_path)
    monkeypatch.chdir(tmp_path)  # the page's relative paths: configs/ and $DATA, $RUN
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    values = {**doc_variables(text), "DATA": data.name}
    for command in doc_commands(text):
        argv = expand(command, values)
        extra = {"train": TINY_TRAIN, "calibrate": FAST_METHOD,
                 "anomaly": [*FAST_METHOD, "--no-overlay"]}.get(argv[0], [])
        res = run_cli([*argv, *extra])
        assert res.rc == 0, (command, res.err)
    run = tmp_path / values["RUN"]
    for folder in ("test_maps", "folder_maps"):
        assert len(list((run / folder).glob("*_anomaly.nii.gz"))) == 3
    for name in ("test_metrics.json", "folder_metrics.json"):
        metrics = json.loads((run / name).read_text(encoding="utf-8"))
        assert metrics["masks"] == "voxels inside the brain masks" and metrics["warnings"] == []


def test_licence_and_citation_agree_with_pyproject():
    import tomllib

    import yaml

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    licence = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert project["license"] == citation["license"] == "Apache-2.0"
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert str(citation["version"]) == project["version"]
    assert citation["cff-version"] == "1.2.0" and citation["title"] and citation["authors"]
    # the pages the citation message points to exist, one with the references
    pages = re.findall(r"[\w/]+\.md", citation["message"])
    assert pages and all((ROOT / p).is_file() for p in pages), pages
    assert any("## References" in (ROOT / p).read_text(encoding="utf-8") for p in pages)


def test_docs_state_the_anomaly_defaults_the_code_uses():
    """The method defaults written in the docs are those of medidiff.constants (the
    latent method's once read 250 / 5 after the code had moved to 600 / 1)."""
    from medidiff.constants import ANOMALY_DEFAULTS as D

    latent = (ROOT / "docs" / "latent_diffusion.md").read_text(encoding="utf-8")
    assert f"`--t-start` (default {D['latent'][0]})" in " ".join(latent.split())
    assert f"deterministic steps (default {D['latent'][2]};" in " ".join(latent.split())
    how = (ROOT / "docs" / "how_it_works.md").read_text(encoding="utf-8")
    assert f"| `anoddpm` | {D['anoddpm'][0]} |" in how and f"| {D['anoddpm'][0] + 1} |" in how
    assert f"| `ddim` (default) | {D['ddim'][0]} | {D['ddim'][2]} deterministic DDIM steps" in how
    assert f"| `x0` | {D['x0'][0]} |" in how and f"| `patched` | {D['patched'][0]} |" in how


def test_results_page_is_by_topic_with_run_details():
    """benchmarks/RESULTS.md: sections by topic (not by session; the history is in
    CHANGELOG.md), and every subsection with a table says its run: date and command."""
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    top = re.findall(r"^## (.+)$", results, re.M)
    assert top[:6] == ["Default models and what they measure", "Anomaly detection", "Synthesis",
                       "Latent models and the autoencoder", "Training speed", "Tiling and memory"]
    assert not re.search(r"^#+ .*[Ss]ession", results, re.M)
    assert (ROOT / "benchmarks" / "CHANGELOG.md").is_file()
    for section in re.split(r"^### ", results, flags=re.M)[1:]:
        title = section.splitlines()[0]
        if "\n|---" in section or "\n| ---" in section:
            assert "Run:" in section and "2026-" in section, title
            assert re.search(r"`(python pipelines/|medidiff |make )", section), title

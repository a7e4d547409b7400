"""``medidiff anomaly`` over the robustness corpus (nibabel's and pydicom's bundled test
files): one batch, every entry scored or rejected with one clear line, nothing crashes it.

The batch is run by ``pipelines/corpus_report.py --command anomaly`` (``run_anomaly``),
which links each entry under a unique name and lists the links in a CSV datalist.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from medidiff.io import load_volume

_spec = importlib.util.spec_from_file_location(
    "corpus_report", Path(__file__).resolve().parents[1] / "pipelines" / "corpus_report.py"
)
corpus_report = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("corpus_report", corpus_report)  # dataclasses look their module up
_spec.loader.exec_module(corpus_report)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# A few entries of each kind, for the quick test: two 3D volumes that score, a 4D file, a
# single DICOM slice (2D), an unsupported format, a DICOMDIR without pixels, a DICOM folder
# whose slices are not on a regular grid.
QUICK = {
    "nibabel:anatomical.nii": "scored",
    "pydicom:rtdose.dcm": "scored",
    "nibabel:example4d.nii.gz": "4D data",
    "pydicom:MR_small.dcm": "a 2D image",
    "nibabel:minc1_1_scale.mnc": "unsupported format",
    "pydicom:dicomdirtests/DICOMDIR": "no pixel data",
    "pydicom-dir:dicomdirtests/98892001/CT2N/": "lies",
}


def _check_run(run, files) -> None:
    """Every entry scored or rejected with one line naming it; nothing else."""
    assert run.exit_code in (0, 4), run.stderr[-2000:]
    assert [o.file for o in run.outcomes] == files
    crashes = [f"{o.file.name}: {o.detail}" for o in run.outcomes if o.outcome == "CRASH"]
    assert not crashes, crashes
    assert "Traceback" not in run.stderr
    rejected = sum(o.outcome == "reject" for o in run.outcomes)
    error_lines = [line for line in run.stderr.splitlines() if line.startswith("medidiff: error:")]
    assert len(error_lines) == rejected  # exactly one line per rejected entry
    assert run.exit_code == (4 if rejected else 0)
    for o in run.outcomes:
        if o.outcome == "scored":  # outputs on the input's own grid
            name = next(p for p in (run.out_dir).glob("*_anomaly.nii.gz")
                        if _key(run, o) in p.name)  # a series folder: inputs_cNNNN__series
            assert load_volume(name).shape == load_volume(o.file.path).shape


def _key(run, outcome) -> str:
    return f"c{[o.file for o in run.outcomes].index(outcome.file):04d}__"


def test_quick_subset(tiny_checkpoint_2d, tmp_path):
    by_name = {f.name: f for f in corpus_report.corpus_files()}
    missing = sorted(set(QUICK) - set(by_name))
    assert not missing, missing
    files = [by_name[name] for name in QUICK]
    run = corpus_report.run_anomaly(files, tiny_checkpoint_2d, tmp_path)
    _check_run(run, files)
    for o in run.outcomes:
        expected = QUICK[o.file.name]
        if expected == "scored":
            assert o.outcome == "scored", o.detail
        else:
            assert o.outcome == "reject" and expected in o.detail, (o.file.name, o.detail)


def test_report_needs_a_checkpoint(capsys):
    assert corpus_report.main(["--command", "anomaly"]) == 2
    assert "--checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_anomaly_over_the_whole_corpus(tiny_checkpoint_2d, tmp_path):
    files = corpus_report.corpus_files()
    run = corpus_report.run_anomaly(files, tiny_checkpoint_2d, tmp_path)
    _check_run(run, files)
    outcome = {o.file.name: o for o in run.outcomes}
    # what the reader refuses, the batch reports and skips; what it scores, the reader loads
    for item in files:
        loaded = corpus_report.check(item)
        if loaded.outcome == "reject":
            assert outcome[item.name].outcome == "reject", item.name
        if outcome[item.name].outcome == "scored":
            assert loaded.outcome == "load", item.name
    scored = {name for name, o in outcome.items() if o.outcome == "scored"}
    assert {"nibabel:anatomical.nii", "nibabel:reoriented_anat_moved.nii",
            "pydicom:rtdose.dcm"} <= scored

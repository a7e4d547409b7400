"""Tests of medidiff.viz.report: the demo's page from a hand-made metrics.json, its escaping,
and the templates shipped as package data."""

from __future__ import annotations

import copy
import re
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path

import pytest

from medidiff.viz.report import fmt, render_demo_report, write_demo_report

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "medidiff" / "viz" / "templates"


def _kind_row(n, auprc, auroc, dice, fpr, oracle, scan_auroc=None):
    return {"n_scans": n, "voxel_auroc": auroc, "voxel_auprc": auprc,
            "dice_dataset_wise": dice, "voxel_fpr": fpr, "oracle_dice": oracle,
            "scan_auroc": scan_auroc}


def _scan(name, kind, score, flagged, dice, overlay=True):
    return {"name": name, "kind": kind, "score": score, "flagged": flagged,
            "voxels_over_threshold": 1485, "lesion_voxels": 10472 if kind != "healthy" else 0,
            "dice": dice, "seconds": 7.248, "network_evaluations": 78, "baseline_score": 0.2391,
            "baseline_dice": 0.0125,
            "files": {"overlay": f"anomaly/{name}_overlay.png"} if overlay else {}}


@pytest.fixture
def metrics():
    """A metrics.json as cli/demo.py writes it (two kinds, three scans, both models)."""
    return {
        "created": "2026-11-30 10:46",
        "data": {"calibration_scans": ["sub-100", "sub-101", "sub-102"],
                 "test_scans": [{"name": "tumor-000", "kind": "tumor"},
                                {"name": "ms-000", "kind": "ms"},
                                {"name": "healthy-000", "kind": "healthy"}],
                 "limit": None},
        "method": {"method": "ddim", "t_start": 50, "steps": 3, "sampler": "ddim",
                   "noise": "simplex"},
        "postprocess": {"top_fraction": 0.01},
        "thresholds": {"default": {"voxel_threshold": 0.11178, "scan_threshold": 0.121974,
                                   "fpr": 0.05}},
        "per_kind": {
            "tumor": {"default": _kind_row(1, 0.4321, 0.9512, 0.3456, 0.0242, 0.5678),
                      "baseline": _kind_row(1, 0.1234, 0.8123, 0.0987, 0.0396, 0.2345)},
            "ms": {"default": _kind_row(1, 0.0111, 0.7012, 0.0222, 0.0333, 0.0444),
                   "baseline": _kind_row(1, 0.0555, 0.7123, 0.0666, 0.0777, 0.0888)},
            "healthy": {"default": _kind_row(1, None, None, None, 0.0031, None),
                        "baseline": _kind_row(1, None, None, None, 0.0913, None)},
            "all": {"default": _kind_row(3, 0.3012, 0.9234, 0.2987, 0.0201, 0.4012, 0.75),
                    "baseline": _kind_row(3, 0.1012, 0.8012, 0.0812, 0.0412, 0.2012, 0.5)},
        },
        "quality": [
            {"name": "voxel_auroc", "passed": True, "detail": "voxel AUROC 0.923: PASS"},
            {"name": "auprc_tumor", "passed": True, "detail": "tumor AUPRC 0.432: PASS"},
            {"name": "auprc_ms", "passed": False, "detail": "ms AUPRC 0.011: FAIL"},
            {"name": "auprc_stroke", "passed": None, "detail": "no test scan of this kind"},
        ],
        "scans": [_scan("tumor-000", "tumor", 0.1133, True, 0.0237),
                  _scan("ms-000", "ms", 0.0912, False, 0.0019),
                  _scan("healthy-000", "healthy", 0.0811, False, None, overlay=False)],
        "synthesis": {"2d": {"num": 4, "sampler": "ddim", "steps": 50, "shape": [32, 40],
                             "seconds": 12.34, "folder": "synthesis_2d",
                             "montage": "synthesis_2d/montage.png"}},
        "figures": {"reverse": "figures/reverse.png", "noising": "figures/noising.png"},
        "models": {
            "2d": {"name": "brain_mri_2d", "shipped": True,
                   "checkpoint": {"path": "/w/brain_mri_2d.safetensors", "sha256": "abc123",
                                  "training_step": 4000, "grid_shape": [96, 112, 96],
                                  "noise": "simplex", "T": 1000},
                   "card": {"description": "2D brain MRI", "steps": 4000, "final_loss": 0.01234,
                            "sha256": "def456", "data": {"train": 40},
                            "metrics": {"voxel_auroc": 0.9321}}},
            "3d": {"name": "mine", "shipped": False,
                   "checkpoint": {"path": "/w/mine.safetensors", "spatial_dims": 3},
                   "card": {}},
        },
        "commands": ["make demo", "medidiff demo --out demo_out"],
        "versions": {"torch": "2.5.1", "monai": "1.5.0"},
        "machine": {"cpu_count": 2, "torch_threads": 1, "device": "cpu"},
        "workers": 2,
        "timings": {"load": 1.25, "score": 30.5, "figures": 8.25},
        "time_budget_s": 300.0,
        "notes": ["the 3D model was not run"],
        "total_seconds": 40.0,
    }


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts: list[str] = []

    def handle_data(self, data):
        self.parts.append(data)


def _text(page: str) -> str:
    """The page's visible text, whitespace collapsed."""
    parser = _Text()
    parser.feed(page)
    return re.sub(r"\s+", " ", " ".join(parser.parts))


def _cells(page: str, row_start: str) -> list[str]:
    """The cells of the table row whose first cell is ``row_start``."""
    row = re.search(rf"<tr[^>]*><td>{re.escape(row_start)}</td>(.*?)</tr>", page, re.S)
    assert row, row_start
    return [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))]


def test_report_shows_every_number_and_verdict(metrics):
    page = render_demo_report(metrics)
    text = _text(page)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # the summary: method, calibration, counts, cards, bars, timing, notes
    assert ("The default anomaly method (ddim: noise to t = 50 with simplex noise, 3 ddim steps "
            "back) of the 2D model was calibrated on 3 healthy validation scans (5% voxel FPR; "
            "voxel threshold 0.1118, scan threshold 0.122 at a 5% scan false-positive rate), "
            "then scored 3 scans of the test split (1 tumor, 1 ms, 1 healthy), which no setting "
            "was tuned on") in text
    for card in ("0.923 voxel AUROC (default)", "0.801 voxel AUROC (baseline)",
                 "0.301 voxel AUPRC (default)", "0.101 voxel AUPRC (baseline)",
                 "0.299 Dice at the calibrated threshold (default; 5% voxel FPR)", "0.750 scan AUROC (default)",
                 "40 s total time"):
        assert card in text, card
    assert "Quality bars: 2 of 4 passed" in text
    verdicts = re.findall(r'<li class="(\w+)"><span class="badge">(\w+/?\w*)</span>', page)
    assert verdicts == [("pass", "PASS"), ("pass", "PASS"), ("fail", "FAIL"), ("na", "N/A")]
    assert ("Wall time 40 s: within the 300 s budget, on this machine (2 CPUs, 1 torch threads, "
            "2 scoring worker(s), device cpu).") in text
    assert '<p class="note">the 3D model was not run</p>' in page
    # per kind: default marked better/worse than the baseline, the winner badge, the total row
    assert _cells(page, "tumor") == ["1", "0.432", "0.123", "0.951", "0.812", "0.346", "0.099",
                                     "0.024", "0.040", "0.568", "default"]
    assert '<span class="better">0.432</span>' in page
    assert '<span class="worse">0.011</span>' in page
    assert _cells(page, "healthy") == ["1"] + ["n/a"] * 6 + ["0.003", "0.091", "n/a", "n/a"]
    assert '<tr class="total"><td>all</td>' in page
    # per scan, with its own decimals per column; a flagged badge; n/a Dice
    assert _cells(page, "tumor-000") == ["tumor", "10472", "0.113", "flagged", "1485", "0.024",
                                         "0.013", "0.239", "78", "7.2"]
    assert _cells(page, "healthy-000")[5] == "n/a"
    assert "mean of the top 1% of its voxel scores) exceeds the scan threshold 0.122" in text
    # figures: strips in their order, overlays (a missing one says so), montage, missing 3D
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources == ["figures/noising.png", "figures/reverse.png", "synthesis_2d/montage.png",
                       "anomaly/tumor-000_overlay.png", "anomaly/ms-000_overlay.png"]
    assert "overlay of healthy-000: not available" in text
    assert "tumor-000 (tumor): score 0.1133, Dice 0.024." in text
    assert ("2D model: single axial slices; 4 samples, ddim 50 steps, shape 32x40, 12.3 s; "
            "files in synthesis_2d/") in text
    assert "3D model: whole volumes (middle axial slice shown): not run" in text
    # models: card facts first, checkpoint facts, card metrics, the user-checkpoint note
    assert "<tr><th>final_loss</th><td>0.012</td></tr>" in page
    assert '<tr><th>data</th><td>{&#34;train&#34;: 40}</td></tr>' in page
    assert "<tr><th>grid_shape</th><td>96 x 112 x 96</td></tr>" in page
    assert "checkpoint sha256" not in page and "<td>def456</td>" in page  # the card's wins
    assert "<tr><th>shipped default</th><td>yes</td></tr>" in page
    assert '&#34;voxel_auroc&#34;: 0.9321' in page
    assert "no model card: a user checkpoint, not a shipped model" in text
    # reproduce and run details
    assert "<pre>make demo\nmedidiff demo --out demo_out</pre>" in page
    assert _cells(page, "score") == ["30.5", "76.2"]
    assert _cells(page, "total") == ["40.0", "100.0"]
    versions = re.findall(r"<tr><th>(torch|monai)</th>", page)
    assert versions == ["monai", "torch"]  # sorted


def test_report_variants(metrics):
    m = copy.deepcopy(metrics)
    m["figures"] = {}
    m["method"] = {"method": "ensemble", "t_starts": [25, 50, 100]}
    m["data"]["limit"] = 3
    m["total_seconds"] = 400.0
    m["models"]["2d"]["card"] = {}
    text = _text(render_demo_report(m))
    assert "the strips were not drawn" in text
    assert "The default anomaly method (ensemble of t = 25, 50, 100)" in text
    assert "Wall time 400 s (a limited run: --limit): OVER the 300 s budget" in text
    assert "medidiff/weights/brain_mri_2d.json is missing from this installation" in text


def test_report_escapes_text_from_the_metrics(metrics, tmp_path):
    evil = "<script>alert('x')</script>"
    m = copy.deepcopy(metrics)
    m["scans"][0]["name"] = evil
    m["notes"] = [evil]
    m["quality"][0]["detail"] = evil
    m["models"]["3d"]["name"] = evil
    m["versions"]["torch"] = evil
    m["commands"] = [evil]
    m["created"] = evil
    m["figures"] = {"noising": 'x.png" onerror="alert(1)'}
    page = write_demo_report(m, tmp_path).read_text(encoding="utf-8")
    assert "<script" not in page and "onerror=\"" not in page
    assert page.count("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;") >= 8
    assert '<img src="x.png&#34; onerror=&#34;alert(1)"' in page


def test_fmt():
    assert fmt(0.12345) == "0.123" and fmt(0.12345, 1) == "0.1"
    assert fmt(3) == "3" and fmt(True) == "yes" and fmt(False) == "no"
    assert fmt(None) == "n/a" and fmt(float("nan")) == "n/a" and fmt(float("inf")) == "n/a"
    assert fmt("text") == "text"


def test_templates_are_package_data():
    """Every template file matches a package-data pattern, so a wheel ships it."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["medidiff"]
    files = sorted(p.relative_to(ROOT / "medidiff").as_posix() for p in TEMPLATES.iterdir())
    assert {"viz/templates/base.html", "viz/templates/demo_report.html"} <= set(files)
    assert all(any(fnmatch(f, pat) for pat in patterns) for f in files), (files, patterns)
    config_deps = config["project"]["dependencies"]
    assert any(d.startswith("jinja2") for d in config_deps)

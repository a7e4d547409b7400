"""The demo's HTML report, rendered with jinja2 templates (inline CSS, images by relative path).

The markup lives in ``medidiff/viz/templates/`` (``base.html``: the page; ``macros.html``:
tables, fact lists, figures, sections; ``demo_report.html``: the demo's sections;
``style.css``), rendered with autoescaping on, so every piece of text from the metrics (scan
names, notes, paths) is escaped. This module only turns the demo's ``metrics.json`` content
into the values the templates show (:func:`render_demo_report`), so a report can be
re-rendered from that file alone.

Images are referenced by paths relative to the report's folder (the PNGs live beside it),
so the folder can be moved, zipped or served as it is. The page is readable in a browser
and when printed (tables and figures avoid page breaks; the navigation is hidden).

Example:
    >>> fmt(0.12345), fmt(None), fmt(True), fmt(7)
    ('0.123', 'n/a', 'yes', '7')
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "Span",
    "Table",
    "fmt",
    "render_demo_report",
    "write_demo_report",
    "write_html",
]


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers for tables: floats with ``digits`` decimals, ``n/a`` for None/NaN, ints as
    they are, booleans as yes/no."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"
    return str(value)


@dataclass(frozen=True)
class Span:
    """A table cell shown as it is (``text`` already formatted), in a ``<span>`` of CSS
    class ``css`` when one is given (e.g. ``"better"``, ``"badge pass"``)."""

    text: str
    css: str | None = None


@dataclass(frozen=True)
class Table:
    """A table for the ``table`` macro: numbers are formatted with :func:`fmt` (``digits``
    decimals per column) and right-aligned.

    Attributes:
        header: column titles.
        rows: cells (text, numbers, ``None`` for n/a, or :class:`Span`).
        row_classes: a CSS class per row (e.g. ``"total"``) or ``None``.
        digits: decimals of floats, one per column.
    """

    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    row_classes: Sequence[str | None]
    digits: Sequence[int]

    @classmethod
    def of(cls, header: Sequence[str], rows: Sequence[Sequence[Any]], *,
           row_classes: Sequence[str | None] | None = None,
           digits: int | Sequence[int] = 3) -> Table:
        """A table; ``digits`` for all columns or one per column."""
        per_column = [digits] * len(header) if isinstance(digits, int) else list(digits)
        return cls(list(header), [list(r) for r in rows],
                   list(row_classes or [None] * len(rows)), per_column)

    def lines(self) -> Iterator[tuple[str | None, list[tuple[Any, int]]]]:
        """``(row class, [(cell, digits), ...])`` per row."""
        for row, css in zip(self.rows, self.row_classes):
            yield css, list(zip(row, self.digits))


@lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("medidiff.viz", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = fmt
    env.filters["num"] = format  # prose numbers: {{ x|num(".4g") }}
    env.tests["span"] = lambda value: isinstance(value, Span)
    env.tests["numeric"] = lambda value: (isinstance(value, (int, float))
                                          and not isinstance(value, bool))
    return env


def write_html(path: str | os.PathLike, text: str) -> Path:
    """Write the page atomically."""
    from medidiff.io import write_text_atomic

    return write_text_atomic(path, text)


# --------------------------------------------------------------------------------------------
# the demo report: metrics.json -> what each section of demo_report.html shows
# --------------------------------------------------------------------------------------------

_SECTIONS = (
    ("summary", "Summary"),
    ("kinds", "Per lesion kind"),
    ("anomaly3d", "3D latent"),
    ("scans", "Per scan"),
    ("how", "How it works"),
    ("synthesis", "Synthesis"),
    ("overlays", "Overlays"),
    ("models", "Models"),
    ("reproduce", "Reproduce"),
    ("run", "Run details"),
)


def _compare(value: float | None, ref: float | None) -> Span:
    """``value`` marked better/worse than ``ref``."""
    if value is None or ref is None:
        return Span(fmt(value))
    return Span(fmt(value), "better" if value > ref else "worse")


def _verdict(passed: bool | None) -> tuple[str, str]:
    return {True: ("pass", "PASS"), False: ("fail", "FAIL"), None: ("na", "N/A")}[passed]


def _method_text(m: Mapping[str, Any]) -> str:
    name = m.get("method", "?")
    if name == "ensemble":
        return f"ensemble of t = {', '.join(str(t) for t in m.get('t_starts') or [])}"
    return (f"{name}: noise to t = {m.get('t_start')} with {m.get('noise')} noise, "
            f"{m.get('steps')} {m.get('sampler')} steps back")


def _timing(m: Mapping[str, Any]) -> dict[str, Any] | None:
    """The wall-time line's values (``None`` without a budget or a total)."""
    budget, total = m.get("time_budget_s"), m.get("total_seconds")
    if not (budget and total):
        return None
    machine = m.get("machine", {})
    device = machine.get("device")
    return {"total": total, "budget": budget, "limited": bool(m.get("data", {}).get("limit")),
            "cpu_count": machine.get("cpu_count"), "torch_threads": machine.get("torch_threads"),
            "workers": m.get("workers", 1), "device": "" if device is None else device}


def _threshold_text(th: Mapping[str, Any]) -> str:
    """The calibration target of a thresholds record, in words."""
    if th.get("target") == "fp-volume":
        return f"<= {th.get('max_fp_ml'):g} ml false positives per healthy scan"
    return f"{th.get('fpr', 0.05):.0%} voxel FPR"


def _summary(m: Mapping[str, Any]) -> dict[str, Any]:
    data = m.get("data", {})
    kinds: dict[str, int] = {}
    for scan in data.get("test_scans", []):
        kinds[scan["kind"]] = kinds.get(scan["kind"], 0) + 1
    allrow = m["per_kind"]["all"]
    d, b = allrow["default"], allrow["baseline"]
    th = m["thresholds"]["default"]
    cards = [
        ("voxel AUROC (default)", d["voxel_auroc"]),
        ("voxel AUROC (baseline)", b["voxel_auroc"]),
        ("voxel AUPRC (default)", d["voxel_auprc"]),
        ("voxel AUPRC (baseline)", b["voxel_auprc"]),
        (f"Dice at the calibrated threshold (default; {_threshold_text(th)})",
         d["dice_dataset_wise"]),
        ("scan AUROC (default)", d["scan_auroc"]),
        ("total time", f"{m.get('total_seconds', float('nan')):.0f} s"),
    ]
    quality = m.get("quality", [])
    return {
        "method_text": _method_text(m["method"]),
        "n_calibration": len(data.get("calibration_scans", [])),
        "n_test": len(data.get("test_scans", [])),
        "kind_counts": ", ".join(f"{n} {k}" for k, n in kinds.items()),
        "th": th,
        "target_text": _threshold_text(th),
        "cards": cards,
        "bars": [(*_verdict(q.get("passed")), q["detail"]) for q in quality],
        "n_pass": sum(q.get("passed") is True for q in quality),
        "timing": _timing(m),
        "notes": list(m.get("notes", [])),
    }


def _kinds(m: Mapping[str, Any]) -> Table:
    header = ["kind", "scans", "AUPRC default", "AUPRC baseline", "AUROC default",
              "AUROC baseline", "Dice default", "Dice baseline", "voxel FPR default",
              "voxel FPR baseline", "oracle Dice default", "AUPRC: better"]
    rows, classes = [], []
    for kind, row in m["per_kind"].items():
        d, b = row["default"], row["baseline"]
        winner: Any = "n/a"
        if d["voxel_auprc"] is not None and b["voxel_auprc"] is not None:
            winner = (Span("default", "badge pass") if d["voxel_auprc"] > b["voxel_auprc"]
                      else Span("baseline", "badge fail"))
        rows.append([
            kind, d["n_scans"], _compare(d["voxel_auprc"], b["voxel_auprc"]), b["voxel_auprc"],
            _compare(d["voxel_auroc"], b["voxel_auroc"]), b["voxel_auroc"],
            d["dice_dataset_wise"], b["dice_dataset_wise"], d["voxel_fpr"], b["voxel_fpr"],
            d["oracle_dice"], winner,
        ])
        classes.append("total" if kind == "all" else None)
    return Table.of(header, rows, row_classes=classes)


def _anomaly_3d(m: Mapping[str, Any]) -> dict[str, Any]:
    """The 3D latent anomaly scoring next to the 2D default: per-kind numbers and cost, or
    why it did not run (an older metrics.json without it: not run, no reason)."""
    a = m.get("anomaly_3d") or {}
    if not a.get("ran"):
        return {"ran": False, "reason": a.get("reason") or "not part of this run"}
    header = ["kind", "scans", "AUROC 2D default", "AUROC 3D latent", "AUPRC 2D default",
              "AUPRC 3D latent", "Dice 2D default", "Dice 3D latent", "voxel FPR 2D default",
              "voxel FPR 3D latent"]
    rows, classes = [], []
    for kind, row in a["per_kind"].items():
        d, z = row["default_2d"], row["latent_3d"]
        rows.append([kind, z["n_scans"], d["voxel_auroc"], _compare(z["voxel_auroc"], d["voxel_auroc"]),
                     d["voxel_auprc"], _compare(z["voxel_auprc"], d["voxel_auprc"]),
                     d["dice_dataset_wise"], _compare(z["dice_dataset_wise"], d["dice_dataset_wise"]),
                     d["voxel_fpr"], z["voxel_fpr"]])
        classes.append("total" if kind == "all" else None)
    cost = a.get("cost", {})
    th2, th3 = m["thresholds"]["default"], a["thresholds"]
    cost_rows = [
        ["2D default (" + _method_text(m["method"]) + ")",
         cost.get("default_2d", {}).get("nfe_per_volume"),
         cost.get("default_2d", {}).get("seconds_per_volume"),
         th2["voxel_threshold"], th2["scan_threshold"]],
        ["3D latent (" + _method_text(a["method"]) + ")",
         cost.get("latent_3d", {}).get("nfe_per_volume"),
         cost.get("latent_3d", {}).get("seconds_per_volume"),
         th3["voxel_threshold"], th3["scan_threshold"]],
    ]
    return {
        "ran": True,
        "checkpoint": a.get("checkpoint"),
        "folder": a.get("folder") or "anomaly_3d",
        "thresholds_file": a.get("thresholds_file") or "thresholds_3d.json",
        "fpr": th3.get("fpr"),
        "table": Table.of(header, rows, row_classes=classes),
        "cost": Table.of(["method", "network evaluations per volume", "seconds per volume",
                          "voxel threshold", "scan threshold"], cost_rows,
                         digits=[3, 0, 1, 4, 4]),
    }


def _scans(m: Mapping[str, Any]) -> dict[str, Any]:
    header = ["scan", "kind", "lesion voxels", "score", "flagged", "voxels over threshold",
              "Dice", "Dice baseline", "score baseline", "network evaluations", "time (s)"]
    rows = []
    for s in m.get("scans", []):
        flag = Span("flagged", "badge fail") if s["flagged"] else "no"
        rows.append([s["name"], s["kind"], s["lesion_voxels"], s["score"], flag,
                     s["voxels_over_threshold"], s["dice"], s["baseline_dice"],
                     s["baseline_score"], s["network_evaluations"], s["seconds"]])
    digits = [3, 3, 0, 3, 3, 0, 3, 3, 3, 0, 1]
    return {"table": Table.of(header, rows, digits=digits),
            "top_fraction": m["postprocess"].get("top_fraction", 0.01),
            "scan_threshold": m["thresholds"]["default"]["scan_threshold"]}


def _overlays(m: Mapping[str, Any]) -> list[tuple[Any, str, str]]:
    """``(src, alt, caption)`` per scan."""
    return [(s.get("files", {}).get("overlay"), f"overlay of {s['name']}",
             f"{s['name']} ({s['kind']}): score {fmt(s['score'], 4)}, Dice {fmt(s['dice'])}. "
             "Columns: input, reconstruction, anomaly map, segmentation (red) and ground truth "
             "(green).")
            for s in m.get("scans", [])]


def _synthesis(m: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per model: its label, montage and caption (``None``: not run)."""
    runs = []
    for key, label in (("2d", "2D model: single axial slices"),
                       ("3d", "3D model: whole volumes (middle axial slice shown)")):
        s = m.get("synthesis", {}).get(key)
        caption = None
        if s:
            caption = (f"{label}; {s['num']} samples, {s['sampler']} {s['steps']} steps, "
                       f"shape {'x'.join(str(v) for v in s['shape'])}, {s['seconds']:.1f} s; "
                       f"files in {s['folder']}/")
        runs.append({"key": key, "label": label, "caption": caption,
                     "montage": s.get("montage") if s else None})
    return runs


_FIGURE_TEXT = {
    "noising": "The forward process q(x_t | x_0): a brain slice noised at several t "
               "(x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps).",
    "reverse": "The learned reverse process: from pure noise to a sample (top: x_t, bottom: "
               "the predicted x_0).",
    "anomaly": "Partial diffusion on an anomaly case: input, noised x_t, reconstruction, "
               "residual, segmentation.",
}


def _how(m: Mapping[str, Any]) -> list[tuple[Any, str, str]]:
    """``(src, alt, caption)`` per how-it-works strip, the three known ones first."""
    figs = m.get("figures") or {}
    order = [k for k in ("noising", "reverse", "anomaly") if k in figs]
    order += [k for k in figs if k not in order]
    return [(figs[k], k, _FIGURE_TEXT.get(k, k)) for k in order]


_CARD_KEYS = ("description", "config", "data", "network", "parameters", "steps", "batch_size",
              "wall_time_s", "machine", "final_loss", "trained_on", "sha256", "size_bytes")
_CHECKPOINT_KEYS = ("path", "sha256", "training_step", "spatial_dims", "preset", "parameters",
                    "grid_shape", "grid_spacing_mm", "noise", "schedule", "T", "prediction_type",
                    "written_by")


def _model_facts(info: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    """The key facts of one model: its card's, then its checkpoint's."""
    ck = info.get("checkpoint", {})
    card = info.get("card") or {}
    pairs: list[tuple[Any, Any]] = [("name", info.get("name")),
                                    ("shipped default", bool(info.get("shipped")))]
    for k in _CARD_KEYS:
        if k in card:
            v = card[k]
            pairs.append((k, v if isinstance(v, (str, int, float)) or v is None else
                          json.dumps(v, default=str)))
    for k in _CHECKPOINT_KEYS:
        if k in ck and not (k == "sha256" and "sha256" in card):
            v = ck[k]
            pairs.append((f"checkpoint {k}" if k in ("path", "sha256") else k,
                          v if not isinstance(v, (list, tuple)) else
                          " x ".join(str(x) for x in v)))
    return pairs


def _models(m: Mapping[str, Any]) -> list[dict[str, Any]]:
    models = []
    latent = bool((m.get("anomaly_3d") or {}).get("ran"))
    for key, label in (("2d", "2D model (anomaly detection, slice synthesis)"),
                       ("3d", "3D model (volume synthesis, 3D latent anomaly scoring)" if latent
                        else "3D model (volume synthesis)")):
        info = m.get("models", {}).get(key)
        if not info:
            continue
        card = info.get("card") or {}
        metrics = (json.dumps(card["metrics"], indent=2, default=str) if "metrics" in card
                   else None)
        models.append({"label": label, "pairs": _model_facts(info), "card_metrics": metrics,
                       "has_card": bool(card), "shipped": bool(info.get("shipped")),
                       "name": info.get("name")})
    return models


def _run(m: Mapping[str, Any]) -> dict[str, Any]:
    timings = m.get("timings", {})
    total = m.get("total_seconds") or sum(timings.values())
    rows = [[k, v, (100.0 * v / total if total else None)] for k, v in timings.items()]
    rows.append(["total", total, 100.0 if total else None])
    return {
        "timings": Table.of(["stage", "seconds", "share (%)"], rows,
                            row_classes=[None] * len(timings) + ["total"], digits=1),
        "versions": sorted((m.get("versions") or {}).items()),
        "machine": list((m.get("machine") or {}).items()),
    }


def render_demo_report(metrics: Mapping[str, Any]) -> str:
    """The demo's HTML page from the content of its ``metrics.json``.

    Args:
        metrics: the dict :func:`medidiff.cli.demo.run_demo` writes as ``metrics.json``
            (image paths in it are relative to the report's folder).

    Returns:
        The HTML text.
    """
    import medidiff

    version = medidiff.__version__
    return _environment().get_template("demo_report.html").render(
        title="medidiff demo report",
        subtitle=(f"sample_data, {metrics.get('created', '')}; medidiff {version}. "
                  "Synthetic data for software demonstration only, not for clinical use."),
        nav=_SECTIONS,
        footer=f"metrics.json holds every number of this page; written by medidiff {version}.",
        summary=_summary(metrics),
        kinds=_kinds(metrics),
        anomaly3d=_anomaly_3d(metrics),
        scans=_scans(metrics),
        how=_how(metrics),
        synthesis=_synthesis(metrics),
        overlays=_overlays(metrics),
        models=_models(metrics),
        commands="\n".join(metrics.get("commands", [])),
        run=_run(metrics),
    )


def write_demo_report(metrics: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/report.html`` (atomically) from the demo's metrics.

    Returns:
        The path written.
    """
    return write_html(Path(out_dir) / "report.html", render_demo_report(metrics))
